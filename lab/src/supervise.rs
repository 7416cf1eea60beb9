//! The background supervisor: owns every part of the lab for its lifetime.
//!
//! All parts are harness values; returning from [`run`] drops them, which
//! stops every process by PID and deletes every namespace.

use std::process::ExitCode;

use anyhow::Context;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{Api, PostParams};
use margay_harness::bgpd::{Bird, Frr, Gobgp};
use margay_harness::kube::ApiServer;
use margay_harness::{Daemon, Fabric, Node, names, wait};

use crate::state::{NodeState, State};
use crate::{Tor, UpArgs};

/// The ToR's AS; nodes use the cluster AS (64512).
pub const TOR_ASN: u32 = 65000;

#[derive(Debug)]
#[allow(dead_code)] // held for their destructors
enum Router {
    Bird(Bird),
    Frr(Frr),
    Gobgp(Gobgp),
}

fn start_tor(fabric: &Fabric, tor: Tor) -> anyhow::Result<Option<Router>> {
    let ns = fabric.ns();
    Ok(match tor {
        Tor::None => None,
        Tor::Bird => Some(Router::Bird(Bird::start(
            ns,
            &format!(
                "log stderr all;\nrouter id 10.99.0.254;\nprotocol device {{}}\n\
                 protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; merge paths on; }}\n\
                 protocol bgp nodes {{\n  local 10.99.0.254 as {TOR_ASN};\n  neighbor range 10.99.0.0/24 as 64512;\n  direct;\n  hold time 9; keepalive time 3;\n  ipv4 {{ import all; export all; }};\n}}\n"
            ),
        )?)),
        Tor::Frr => Some(Router::Frr(Frr::start(
            ns,
            &format!(
                "frr defaults traditional\nhostname tor\nrouter bgp {TOR_ASN}\n bgp router-id 10.99.0.254\n no bgp ebgp-requires-policy\n neighbor nodes peer-group\n neighbor nodes remote-as 64512\n neighbor nodes timers 3 9\n bgp listen range 10.99.0.0/24 peer-group nodes\n!\n"
            ),
            true,
        )?)),
        Tor::Gobgp => Some(Router::Gobgp(Gobgp::start(
            ns,
            &format!(
                "[global.config]\n  as = {TOR_ASN}\n  router-id = \"10.99.0.254\"\n\
                 [[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = \"nodes\"\n    peer-as = 64512\n\
                 [[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = \"10.99.0.0/24\"\n    peer-group = \"nodes\"\n"
            ),
        )?)),
    })
}

/// The node's block: node N originates 10.244.N.0/26 and holds a stand-in
/// pod address 10.244.N.1 until the agent and CNI plugin exist.
pub fn node_block(index: u8) -> (String, String) {
    (format!("10.244.{index}.0/26"), format!("10.244.{index}.1"))
}

/// Starts `margay-bgp` in a node: iBGP full mesh with the other nodes (the
/// higher index of each pair connects, the lower one listens), eBGP with
/// the ToR, importing only pool routes.
fn start_speaker(
    node: &Node,
    all: &[u8],
    tor: bool,
    dir: &std::path::Path,
) -> anyhow::Result<Daemon> {
    let bin = std::env::current_exe()?.with_file_name("margay-bgp");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p margay-bgp`",
        bin.display()
    );
    let (block, pod) = node_block(node.index);
    node.ns.ip(&["route", "replace", "blackhole", &block])?;
    node.ns
        .ip(&["addr", "add", &format!("{pod}/32"), "dev", "lo"])?;
    let mut conf = format!(
        "asn = 64512
router_id = \"{}\"\ncontrol_socket = \"{}\"\nimport_prefixes = [\"10.244.0.0/16\"]\n[[originate]]\nprefix = \"{block}\"\n",
        node.v4,
        dir.join(format!("bgp-node{}.sock", node.index)).display()
    );
    for &j in all.iter().filter(|&&j| j != node.index) {
        conf.push_str(&format!(
            "[[neighbor]]\naddress = \"10.99.0.{j}\"\nasn = 64512\nhold_time = 9\npassive = {}\n",
            node.index < j
        ));
    }
    if tor {
        conf.push_str(&format!(
            "[[neighbor]]\naddress = \"10.99.0.254\"\nasn = {TOR_ASN}\nhold_time = 9\n"
        ));
    }
    let path = dir.join(format!("bgp-node{}.toml", node.index));
    std::fs::write(&path, conf)?;
    let mut cmd = node.ns.cmd(bin);
    cmd.arg("--config").arg(&path);
    Ok(Daemon::spawn(
        "margay-bgp",
        cmd,
        &dir.join(format!("bgp-node{}.log", node.index)),
    )?)
}

/// Builds the lab, publishes `state.json`, waits for SIGTERM/SIGINT, tears down.
pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt().with_target(false).init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tracing::info!(?args, "starting lab");
        let api = ApiServer::start().await.context("kube-apiserver")?;
        let kubeconfig = crate::state::dir().join("kubeconfig");
        std::fs::copy(api.kubeconfig(), &kubeconfig)?;
        let client = api.client().await?;
        let fabric = Fabric::new().context("fabric")?;
        let mut nodes: Vec<(String, Node)> = Vec::new();
        let kube_nodes: Api<KubeNode> = Api::all(client.clone());
        for i in 1..=args.nodes {
            let name = format!("node{i}");
            let node = fabric.add_node(&name)?;
            let obj: KubeNode = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "status": {"addresses": [{"type": "InternalIP", "address": node.v4.to_string()}]}
            }))?;
            kube_nodes.create(&PostParams::default(), &obj).await?;
            nodes.push((name, node));
        }
        let _tor = start_tor(&fabric, args.tor).context("top-of-rack router")?;
        let work = names::temp_dir("lab")?;
        let indexes: Vec<u8> = nodes.iter().map(|(_, n)| n.index).collect();
        let mut speakers = Vec::new();
        for (_, n) in &nodes {
            speakers.push(start_speaker(
                n,
                &indexes,
                args.tor != Tor::None,
                work.path(),
            )?);
        }
        // Ready when every node's kernel holds every other node's block.
        wait::until_async(
            "routes to every block on every node",
            std::time::Duration::from_secs(120),
            std::time::Duration::from_millis(200),
            || {
                let nodes = &nodes;
                let indexes = &indexes;
                async move {
                    for (name, n) in nodes {
                        let routes = n.routes_v4().map_err(|e| e.to_string())?;
                        for &j in indexes.iter().filter(|&&j| j != n.index) {
                            let (block, _) = node_block(j);
                            if !routes
                                .lines()
                                .any(|l| l.starts_with(&block) && !l.starts_with("blackhole"))
                            {
                                return Err(format!("{name} has no route to {block}"));
                            }
                        }
                    }
                    Ok(Some(()))
                }
            },
        )
        .await?;
        let state = State {
            supervisor_pid: std::process::id(),
            args: args.clone(),
            apiserver_url: api.url(),
            kubeconfig: kubeconfig.display().to_string(),
            fabric_netns: fabric.ns().name().to_owned(),
            tor_v4: margay_harness::topo::FABRIC_GW_V4.to_string(),
            nodes: nodes
                .iter()
                .map(|(name, n)| NodeState {
                    name: name.clone(),
                    netns: n.ns.name().to_owned(),
                    v4: n.v4.to_string(),
                    v6: n.v6.to_string(),
                    block: node_block(n.index).0,
                    pod_v4: node_block(n.index).1,
                })
                .collect(),
        };
        state.save()?;
        tracing::info!("lab ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("tearing down");
        State::clear();
        Ok(ExitCode::SUCCESS)
    })
}
