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
use margay_harness::{Fabric, Node};

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

/// Builds the lab, publishes `state.json`, waits for SIGTERM/SIGINT, tears down.
pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt().with_target(false).init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tracing::info!(?args, "starting lab");
        let api = ApiServer::start().await.context("kube-apiserver")?;
        let kubeconfig = std::path::Path::new(crate::state::DIR).join("kubeconfig");
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
