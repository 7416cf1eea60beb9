//! Helpers shared by the integration tests in `tests/` (the tests
//! themselves live there); the `ipam-sim` binary is in `src/bin/`.

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use margay_api::ipam::{
    AllocationRecord, CONFIG_NAME, IPAMBlock, IPAMConfiguration, IPAMConfigurationSpec, IPPool,
    IPPoolSpec,
};
use margay_harness::kube::ApiServer;

/// A real apiserver with Margay's CRDs, the `default` ServiceAccount, the
/// given Node objects, a pool `default` and the IPAM configuration.
pub async fn cluster(
    nodes: &[&str],
    pool_cidr: &str,
    block: u8,
    cfg: IPAMConfigurationSpec,
) -> (ApiServer, kube::Client) {
    let api = ApiServer::start().await.expect("apiserver");
    let client = api.client().await.expect("client");
    margay_api::crds::install(&client).await.expect("CRDs");
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sa.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap(),
    )
    .await
    .expect("service account");
    let napi: Api<Node> = Api::all(client.clone());
    for n in nodes {
        napi.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).unwrap(),
        )
        .await
        .expect("node");
    }
    add_pool(&client, "default", pool_cidr, Some(block)).await;
    let cfgs: Api<IPAMConfiguration> = Api::all(client.clone());
    cfgs.create(
        &PostParams::default(),
        &IPAMConfiguration::new(CONFIG_NAME, cfg),
    )
    .await
    .expect("config");
    (api, client)
}

/// Creates a pool.
pub async fn add_pool(client: &kube::Client, name: &str, cidr: &str, block: Option<u8>) {
    let pools: Api<IPPool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &IPPool::new(name, IPPoolSpec::with_cidr(cidr, block)),
        )
        .await
        .expect("pool");
}

/// The command line of `margay-agent run` as node `name`, inside `node`'s
/// namespace, talking to `api` and serving CNI on `socket` (leak
/// collection off); callers add flags or environment, then
/// [`start_agent`].
pub fn agent_cmd(
    node: &margay_harness::topo::Node,
    name: &str,
    api: &ApiServer,
    socket: &std::path::Path,
) -> anyhow::Result<std::process::Command> {
    let mut cmd = margay_lab::cluster::agent_cmd(node, name, api, socket)?;
    cmd.args(["--gc-interval", "0"]);
    Ok(cmd)
}

/// Spawns the agent from `cmd` (log in `log`); returns once its socket
/// is there.
pub fn start_agent(
    cmd: std::process::Command,
    socket: &std::path::Path,
    log: &std::path::Path,
) -> anyhow::Result<margay_harness::process::Daemon> {
    let agent = margay_harness::process::Daemon::spawn("margay-agent", cmd, log)?;
    margay_harness::wait::until(
        "agent socket",
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(50),
        || Ok(socket.exists().then_some(())),
    )?;
    Ok(agent)
}

/// A CRI client for the sandbox calls (generated from
/// `tests/proto/cri_subset.proto`).
pub mod cri {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("runtime.v1");
}

/// Every allocation in the datastore: (address, who holds it), in block
/// order.
pub async fn allocations(client: &kube::Client) -> Vec<(String, AllocationRecord)> {
    let blocks: Api<IPAMBlock> = Api::all(client.clone());
    blocks
        .list(&ListParams::default())
        .await
        .expect("IPAMBlocks")
        .items
        .into_iter()
        .flat_map(|b| b.spec.allocations.into_iter())
        .collect()
}

/// A ping every 20 ms from network namespace `from` (an `ip netns` name)
/// to an address, stopped by PID: how the tests see traffic through a
/// change (longest time without a reply).
#[derive(Debug)]
pub struct Pinger {
    child: std::process::Child,
    what: String,
}

impl Pinger {
    /// Starts pinging `to` from `from`; `what` names the pair in reports.
    pub fn start(from: &str, to: &str, what: String) -> Self {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", from, "ping", "-D", "-i", "0.02", to])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping");
        Self { child, what }
    }

    /// Stops it; (replies, longest time without a reply). Prints both.
    pub fn stop(self) -> (usize, std::time::Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let out = self.child.wait_with_output().expect("ping's output");
        let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        let gap = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0_f64, f64::max);
        println!(
            "{}: {} replies, longest gap {:.3} s",
            self.what,
            times.len(),
            gap
        );
        (times.len(), std::time::Duration::from_secs_f64(gap))
    }
}
