//! Helpers shared by the integration tests in `tests/` (the tests
//! themselves live there); the `ipam-sim` binary is in `src/bin/`.
//! [`datagrams`]: UDP sent from any source address and seen at a receiver.

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use margay_api::ipam::{
    AllocationRecord, CONFIG_NAME, IPAMBlock, IPAMConfiguration, IPAMConfigurationSpec, IPPool,
    IPPoolSpec,
};
use margay_harness::kube::ApiServer;

pub mod tunnel;

/// A real apiserver with Margay's CRDs, the agents' Lease namespace, the
/// `default` ServiceAccount, the given Node objects, a pool `default` and
/// the IPAM configuration.
pub async fn cluster(
    nodes: &[&str],
    pool_cidr: &str,
    block: u8,
    cfg: IPAMConfigurationSpec,
) -> (ApiServer, kube::Client) {
    let api = ApiServer::start().await.expect("apiserver");
    let client = api.client().await.expect("client");
    margay_harness::kube::crds::install(&client)
        .await
        .expect("CRDs");
    margay_lab::cluster::create_lease_namespace(&client)
        .await
        .expect("Lease namespace");
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

/// Creates BGPPeer `name` to `ip` (AS `asn`) whose password is key `pw`
/// of Secret `secret`.
pub async fn create_password_peer(
    client: &kube::Client,
    name: &str,
    ip: &str,
    asn: u32,
    secret: &str,
) {
    let peers: Api<margay_api::bgp::BGPPeer> = Api::all(client.clone());
    let peer = serde_json::json!({
        "apiVersion": "margay.dev/v1", "kind": "BGPPeer",
        "metadata": {"name": name},
        "spec": {"peerIP": ip, "asNumber": asn, "password": {"name": secret, "key": "pw"}}
    });
    peers
        .create(
            &PostParams::default(),
            &serde_json::from_value(peer).unwrap(),
        )
        .await
        .expect("BGPPeer");
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

pub mod datagrams;

/// A lab of two nodes peering with each other (no router), as the policy
/// suites start from.
pub async fn two_node_lab() -> margay_lab::cluster::Cluster {
    margay_lab::cluster::Cluster::start(margay_lab::cluster::Options {
        nodes: 2,
        tor: margay_lab::Tor::None,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The outcome a finished `margay-lab netcheck probe` printed (its last
/// word); panics with what it said if that is none.
pub fn probe_outcome(out: &std::process::Output) -> margay_harness::netcheck::Outcome {
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit(' ')
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("probe said {text:?}"))
}

/// `margay-lab netcheck probe` of `target` (`IP:PORT/tcp|udp`, 700 ms)
/// from inside `ns`: prints the outcome, succeeds only if it is `ok`.
pub fn probe(ns: &margay_harness::Netns, target: &str) -> std::process::Command {
    let lab = margay_harness::paths::workspace_bin("margay-lab").expect("margay-lab built");
    let mut cmd = ns.cmd(lab);
    cmd.args(["netcheck", "probe", "--timeout-ms", "700", target]);
    cmd
}

/// Waits until `wrong` lists nothing (polled every `every`, up to
/// `timeout`); the error names `what` and the last things wrong.
pub async fn until_none_wrong<W: std::fmt::Debug>(
    what: &str,
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut wrong: impl FnMut() -> Vec<W>,
) -> margay_harness::Result<()> {
    until_none_wrong_async(what, timeout, every, || std::future::ready(wrong())).await
}

/// [`until_none_wrong`] for a `wrong` that awaits.
pub async fn until_none_wrong_async<W: std::fmt::Debug, Fut>(
    what: &str,
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut wrong: impl FnMut() -> Fut,
) -> margay_harness::Result<()>
where
    Fut: std::future::Future<Output = Vec<W>>,
{
    margay_harness::wait::until_async(what, timeout, every, || {
        let w = wrong();
        async move {
            let w = w.await;
            if w.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("still wrong: {w:?}").into())
            }
        }
    })
    .await
}

/// Panics unless the command that gave `out` succeeded; the message is
/// `what` then its stdout and stderr.
pub fn assert_ran(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what}{}", output_text(out));
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

/// Set inside the VM by [`rerun_in_vm`]: the test runs its body there
/// instead of booting one.
pub const IN_VM: &str = "MARGAY_IN_VM";

/// Whether this process is the test re-run inside the VM.
pub fn in_vm() -> bool {
    std::env::var_os(IN_VM).is_some()
}

/// Runs test `name` of this test binary again inside a VM with a stock
/// Debian kernel (`scripts/in-vm.sh`, 3 GiB, 2 CPUs, the workspace's
/// binaries), for what this host's kernel lacks; the run's output,
/// printed, after checking that it succeeded. The test calls it unless
/// [`in_vm`].
pub fn rerun_in_vm(name: &str) -> String {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let bin = margay_harness::paths::workspace_bin("margay-lab").expect("margay-lab built");
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(format!("{repo}/scripts/in-vm.sh"))
        .env("MARGAY_BIN_DIR", bin.parent().expect("a directory"))
        .args(["--memory", "3G", "--cpus", "2", "--", "env"])
        .arg(format!("{IN_VM}=1"))
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .output()
        .expect("scripts/in-vm.sh");
    let text = output_text(&out);
    println!("{text}");
    assert!(out.status.success(), "in the VM:\n{text}");
    text
}

/// What `ping -D -i 0.02` printed: how many it sent, and the sequence
/// number and kernel receive time of every reply.
#[derive(Debug, Default)]
pub struct PingLog {
    /// Echo requests sent (from ping's summary line).
    pub sent: u64,
    /// (icmp_seq, receive time) of every reply, in order.
    pub replies: Vec<(u64, f64)>,
}

impl PingLog {
    /// Parses `ping -D` output.
    pub fn parse(text: &str) -> Self {
        let mut log = PingLog::default();
        for l in text.lines() {
            if let Some(n) = l.split_once(" packets transmitted").map(|(n, _)| n) {
                log.sent = n.trim().parse().unwrap_or(0);
            }
            if !l.contains("bytes from") {
                continue;
            }
            let ts = l
                .strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse::<f64>().ok());
            let seq = l
                .split("icmp_seq=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(ts), Some(seq)) = (ts, seq) {
                log.replies.push((seq, ts));
            }
        }
        log
    }

    /// Lost pings, each with the time of the reply before it (or the first
    /// one's), and the longest run of lost pings.
    pub fn losses(&self) -> (Vec<f64>, u64) {
        let mut lost = Vec::new();
        let mut longest = 0;
        let mut prev: Option<(u64, f64)> = None;
        let first_ts = self.replies.first().map_or(0.0, |r| r.1);
        for &(seq, ts) in &self.replies {
            // iputils numbers its first echo request 1.
            let (from, at) = prev.map_or((1, first_ts), |(s, t)| (s + 1, t));
            if seq > from {
                longest = longest.max(seq - from);
                lost.extend(std::iter::repeat_n(at, (seq - from) as usize));
            }
            prev = Some((seq.max(from), ts));
        }
        // The tail (after the last reply) is what was in flight at the end
        // (a few packets) or a real loss: count it too.
        let last = prev.map_or(0, |(s, _)| s);
        if self.sent > last + 2 {
            let tail = self.sent - last - 2;
            longest = longest.max(tail);
            let at = prev.map_or(first_ts, |p| p.1);
            lost.extend(std::iter::repeat_n(at, tail as usize));
        }
        (lost, longest)
    }

    /// The longest time between two replies (a stall of the sender counts
    /// too: on a loaded VM that is the scheduler, not the network).
    pub fn longest_silence(&self) -> std::time::Duration {
        let gap = self
            .replies
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .fold(0.0_f64, f64::max);
        std::time::Duration::from_secs_f64(gap)
    }
}

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, Copy)]
pub struct PingReport {
    /// Replies received.
    pub replies: usize,
    /// The longest run of pings lost in a row, as time (run x 20 ms): what
    /// the network dropped, whatever the sender's scheduling.
    pub outage: std::time::Duration,
    /// The longest time between two replies (includes the sender stalling).
    pub silence: std::time::Duration,
}

impl PingReport {
    /// The longest run lost in a row through a change that keeps traffic.
    pub const KEPT: std::time::Duration = std::time::Duration::from_secs(1);

    /// Whether traffic went on: what [`PingReport::assert_kept`] asserts.
    pub fn kept(&self, min: usize) -> bool {
        self.replies > min && self.outage < Self::KEPT
    }

    /// Panics unless traffic went on through `what`: more than `min`
    /// replies, and no [`PingReport::KEPT`] of pings lost in a row.
    pub fn assert_kept(&self, what: &str, min: usize) {
        self.assert_outage_under(what, min, Self::KEPT);
    }

    /// Panics unless more than `min` replies came and no run of pings
    /// lost in a row lasted `most`.
    pub fn assert_outage_under(&self, what: &str, min: usize, most: std::time::Duration) {
        assert!(self.replies > min, "{what}: {} replies", self.replies);
        assert!(
            self.outage < most,
            "{what}: {:?} of pings lost in a row",
            self.outage
        );
    }
}

/// Stdout then stderr of a finished command, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A ping every 20 ms from network namespace `from` (an `ip netns` name)
/// to an address, stopped by PID: how the tests see traffic through a
/// change.
///
/// Its output goes to a file, not a pipe: a pipe nobody reads fills after
/// about 800 replies (64 KiB) and then stops ping, so a change that lasts
/// longer than 16 s would be watched for its first 16 s only.
#[derive(Debug)]
pub struct Pinger {
    child: std::process::Child,
    out: std::fs::File,
    what: String,
}

impl Pinger {
    /// The interval between pings.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

    /// Starts pinging `to` from `from`; `what` names the pair in reports.
    pub fn start(from: &str, to: &str, what: String) -> Self {
        let out = tempfile::tempfile().expect("a file for ping's output");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", from, "ping", "-D", "-n", "-i", "0.02", to])
            .stdout(out.try_clone().expect("ping's output file"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping");
        Self { child, out, what }
    }

    /// Stops it and reports what it saw (printed too).
    pub fn stop(self) -> PingReport {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let mut child = self.child;
        child.wait().expect("ping's exit");
        let mut text = String::new();
        let mut out = self.out;
        std::io::Seek::rewind(&mut out).expect("ping's output");
        std::io::Read::read_to_string(&mut out, &mut text).expect("ping's output");
        let log = PingLog::parse(&text);
        let (lost, longest) = log.losses();
        let r = PingReport {
            replies: log.replies.len(),
            outage: Self::INTERVAL * longest as u32,
            silence: log.longest_silence(),
        };
        println!(
            "{}: {} replies of {} sent, {} lost (longest run {:.3} s), longest silence {:.3} s",
            self.what,
            r.replies,
            log.sent,
            lost.len(),
            r.outage.as_secs_f64(),
            r.silence.as_secs_f64()
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::PingLog;

    #[test]
    fn a_stalled_sender_is_silence_and_dropped_pings_are_loss() {
        // seq 3..=5 never answered; a 1.5 s stall of the sender after 7.
        let mut text = String::new();
        for (seq, t) in [(1, 0.00), (2, 0.02), (6, 0.12), (7, 0.14), (8, 1.64)] {
            text += &format!("[{t}] 64 bytes from 10.0.0.2: icmp_seq={seq} ttl=63 time=0.1 ms\n");
        }
        text += "9 packets transmitted, 5 received, 44% packet loss, time 1640ms\n";
        let log = PingLog::parse(&text);
        assert_eq!(log.sent, 9);
        let (lost, longest) = log.losses();
        // 3, 4 and 5; the last (9) is in flight.
        assert_eq!((lost.len(), longest), (3, 3));
        assert!((log.longest_silence().as_secs_f64() - 1.5).abs() < 1e-9);
    }
}
