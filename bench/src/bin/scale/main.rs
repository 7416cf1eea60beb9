//! `scale`: what a node's agent costs as the cluster grows (issue 27).
//!
//! On a running lab (`margay-lab up --nodes 3 --tor none`: real etcd,
//! kube-apiserver and agents; its state under `$MARGAY_LAB_DIR`), this
//! makes fake Nodes (an InternalIP and Margay's identity annotations), with
//! the `MargayNode` and endpoint slices their agents would write, and fake
//! Pods bound to them
//! (`spec.nodeName`, labels, `status.podIP`/`podIPs` written through the
//! status subresource as a kubelet would), with real API writes, `N` nodes
//! at a time (cumulative: 10, then 90 more, ...). No NetworkPolicy, or
//! with `--policy` one whose peer is every pod (every agent then keeps
//! every remote pod; `--probe K` times K real pods from their start on
//! node1 to their address in node2's peer set). At
//! each size, once the agents' CPU has settled, it reads:
//!
//! - each real agent's RSS (`VmRSS`) and CPU time (`/proc/PID/stat`), the
//!   elected one (the leader Lease's holder) apart from the others; the
//!   apiserver's and etcd's RSS;
//! - the apiserver's own `/metrics`: watch events (and their bytes) sent
//!   per kind, watchers per kind, requests: per Pod write while loading,
//!   per second over a quiet window (requests per agent are the total
//!   over the lab's agents: the apiserver does not count by client);
//! - with `--churn R`: R pods replaced per second (delete, create, status:
//!   three Pod writes each) for `--churn-seconds`, and the Pod watch
//!   events sent per Pod write.
//!
//! It prints Markdown tables, writes the figures as JSON (`--json`) and a
//! line chart of agent RSS against N as SVG (`--plot`, drawn here; with
//! `--baseline OLD.json` the old run's curves beside this one's and the
//! ratios). Everything it made is deleted at the end (`--no-cleanup`
//! leaves it, for a lab about to be torn down). `bench/scale.sh` brings
//! the lab up, runs this and tears it down.

mod fake;
mod metrics;
mod svg;

/// The NetworkPolicy `--policy` makes.
const POLICY: &str = "scale-every-pod";
/// The real pod on node2 it selects.
const ANCHOR: &str = "scale-anchor";

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use margay_api::identity::MargayNode;
use margay_api::slice::MargayEndpointSlice;
use serde::{Deserialize, Serialize};

use fake::Gen;
use metrics::Api as Metrics;

#[derive(Debug, Parser)]
#[command(
    about = "agent cost and API fan-out against the number of (fake) nodes, on a running lab"
)]
struct Cli {
    /// Fake node counts, ascending; the cluster grows from one to the next.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    sizes: Vec<u32>,
    /// Fake pods per fake node.
    #[arg(long, default_value_t = 30)]
    pods_per_node: u32,
    /// API writes in flight while loading.
    #[arg(long, default_value_t = 24)]
    concurrency: usize,
    /// Pods replaced per second at each size (0: no churn).
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// How long the churn lasts at each size, in seconds (a watch of the
    /// pods counts the changes: at most 280).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=280))]
    churn_seconds: u64,
    /// Each fake node's status (its Ready condition) written every this
    /// many seconds, spread evenly, as a kubelet reports (0: never; a
    /// kubelet with Leases writes it every 300 s, older ones every 10 s).
    #[arg(long, default_value_t = 0)]
    node_status_interval: u64,
    /// The quiet window at each size, in seconds.
    #[arg(long, default_value_t = 30)]
    window: u64,
    /// Settled: the agents together used less than this share of a core
    /// (percent) over two 5-s samples in a row.
    #[arg(long, default_value_t = 5.0)]
    settle_cpu: f64,
    /// Waiting for that at least this long, at most `--settle-max` seconds.
    #[arg(long, default_value_t = 10)]
    settle_min: u64,
    /// At most this long.
    #[arg(long, default_value_t = 300)]
    settle_max: u64,
    /// The lab's directory (its `state.json`, `kubeconfig`).
    #[arg(long, env = "MARGAY_LAB_DIR", default_value = "/run/margay-lab")]
    lab_dir: PathBuf,
    /// The fake pods' namespace.
    #[arg(long, default_value = "scale")]
    namespace: String,
    /// Write the line chart of agent RSS against N here (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write every figure here (JSON; what `--baseline` reads).
    #[arg(long)]
    json: Option<PathBuf>,
    /// A previous run's JSON: its curves in the chart (dashed) and ratios.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// This run's name in the chart and the JSON (e.g. `old`, `new`).
    #[arg(long, default_value = "this run")]
    label: String,
    /// A NetworkPolicy in the fake pods' namespace whose peer is every
    /// pod of every namespace: every agent then keeps every remote pod
    /// (its peer set is counted on one agent at each size).
    #[arg(long)]
    policy: bool,
    /// With `--policy`: at each size, this many real pods started on the
    /// lab's node1 (one a second, during the churn when there is one), and
    /// the time from their start until node2's agent has their address in
    /// its peer set (the way: node1's Pod watch, its endpoint slice, node2's
    /// slice watch, its table).
    #[arg(long, default_value_t = 0)]
    probe: u32,
    /// Leave the fake objects in place at the end.
    #[arg(long)]
    no_cleanup: bool,
    /// No lab: the tables and the chart of a run's JSON again (with
    /// `--baseline`, beside another run's).
    #[arg(long)]
    replot: Option<PathBuf>,
}

fn load_results(p: &Path) -> anyhow::Result<Results> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("{}", p.display()))?)
        .with_context(|| format!("{}: not a scale run's JSON", p.display()))
}

/// Prints the tables (and the ratios to `base`), writes the chart.
fn report(r: &Results, base: Option<&Results>, plot: Option<&Path>) -> anyhow::Result<()> {
    let mut text = tables(r);
    if let Some(base) = base {
        text.push_str(&ratios(r, base));
    }
    print!("{text}");
    if let Some(p) = plot {
        write(p, &chart(r, base).render())?;
        eprintln!("scale: chart in {}", p.display());
    }
    Ok(())
}

/// What the bench reads of the lab's `state.json`.
#[derive(Debug, Deserialize)]
struct LabState {
    kubeconfig: String,
    apiserver_url: String,
    nodes: Vec<LabNode>,
}

#[derive(Debug, Deserialize)]
struct LabNode {
    name: String,
    agent_pid: u32,
    #[serde(default)]
    restarts: u32,
}

impl LabState {
    fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = dir.join("state.json");
        let b = std::fs::read(&p)
            .with_context(|| format!("{}: is a lab up (margay-lab up)?", p.display()))?;
        Ok(serde_json::from_slice(&b)?)
    }
}

/// The churn at one size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Churn {
    /// Pods replaced per second asked.
    rate: f64,
    /// Seconds it took.
    seconds: f64,
    /// Pod writes done (delete, create, status).
    writes: u64,
    /// Pod changes: the events the bench's watch of the fake pods'
    /// namespace got (a deletion is two: its deletion timestamp, then its
    /// removal).
    changes: u64,
    /// Pod watch events the apiserver sent meanwhile, less the bench's
    /// own watch's.
    pod_events: f64,
    /// Their bytes (the mean event size times `pod_events`).
    pod_bytes: f64,
    /// The agents' CPU meanwhile, all together (percent of a core).
    agents_cpu_percent: f64,
}

/// Everything measured at one size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Point {
    /// Fake nodes.
    nodes: u32,
    /// Fake pods.
    pods: u64,
    /// With `--policy`: the fake pods' addresses in one (non-leader)
    /// agent's NetworkPolicy table.
    #[serde(default)]
    peer_set: Option<u64>,
    /// With `--probe`: milliseconds from each probe pod's start to its
    /// address in node2's peer set (a probe never seen: absent).
    #[serde(default)]
    peer_latency_ms: Vec<f64>,
    /// Seconds the load to this size took.
    load_seconds: f64,
    /// Pod writes of that load (create + status).
    load_pod_writes: u64,
    /// Node writes of that load (create; status if written).
    load_node_writes: u64,
    /// Pod and Node changes during the load, as the bench's own watches
    /// saw them (a Node's include its agent's writes, for the real ones).
    load_pod_changes: u64,
    load_node_changes: u64,
    /// Pod and Node watch events the apiserver sent during the load, less
    /// the bench's own watches'.
    load_pod_events: f64,
    load_node_events: f64,
    /// Seconds from the end of the load to settled.
    settle_seconds: f64,
    /// Whether the agents' CPU settled before `--settle-max`.
    settled: bool,
    /// The leader's node, its RSS (MiB).
    leader: String,
    leader_rss_mib: f64,
    /// The other agents' RSS (MiB): mean and max.
    others_rss_mib_mean: f64,
    others_rss_mib_max: f64,
    /// Control plane RSS (MiB).
    apiserver_rss_mib: Option<f64>,
    etcd_rss_mib: Option<f64>,
    /// CPU seconds of all agents from the start of the load to settled.
    agents_cpu_load_seconds: f64,
    /// CPU at rest over the window (percent of a core): the leader, the
    /// others' mean, all agents together.
    rest_cpu_leader_percent: f64,
    rest_cpu_others_percent: f64,
    rest_cpu_all_percent: f64,
    /// Requests per second at rest to what agents use, all agents
    /// together, by "VERB resource".
    rest_requests_by: BTreeMap<String, f64>,
    /// Their total per agent (the total over the lab's agents).
    rest_requests_per_agent: f64,
    /// Watch events per second at rest, by kind.
    rest_events_per_s: BTreeMap<String, f64>,
    /// Watchers registered for Pods and Nodes.
    pod_watchers: f64,
    node_watchers: f64,
    /// The churn, if asked.
    churn: Option<Churn>,
    /// Agent restarts so far (the lab starts a dead agent again).
    agent_restarts: u32,
}

impl Point {
    fn pod_events_per_change(&self) -> Option<f64> {
        (self.load_pod_changes > 0).then(|| self.load_pod_events / self.load_pod_changes as f64)
    }

    fn node_events_per_change(&self) -> Option<f64> {
        (self.load_node_changes > 0).then(|| self.load_node_events / self.load_node_changes as f64)
    }
}

/// A run's figures (the JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Results {
    label: String,
    command: String,
    agents: usize,
    pods_per_node: u32,
    points: Vec<Point>,
}

/// One process's figures.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    cpu_ticks: u64,
}

fn proc_sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ProcSample {
        rss_kib: metrics::rss_kib(&status)?,
        cpu_ticks: metrics::cpu_ticks(&stat)?,
    })
}

/// Every process's command line.
fn command_lines() -> Vec<(u32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let raw = std::fs::read(e.path().join("cmdline")).ok()?;
        let args = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some((pid, args))
    })
    .collect()
}

/// The apiserver serving on `port` and the etcd behind it, by their
/// command lines.
fn control_plane(procs: &[(u32, Vec<String>)], port: u16) -> (Option<u32>, Option<u32>) {
    let is = |args: &[String], prog: &str| {
        args.first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|f| f == prog))
    };
    let api = procs.iter().find(|(_, a)| {
        is(a, "kube-apiserver") && metrics::flag(a, "--secure-port") == Some(&port.to_string())
    });
    let etcd_port = api
        .and_then(|(_, a)| metrics::flag(a, "--etcd-servers"))
        .and_then(|u| metrics::url_port(u.split(',').next().unwrap_or(u)));
    let etcd = etcd_port.and_then(|p| {
        procs.iter().find(|(_, a)| {
            is(a, "etcd")
                && metrics::flag(a, "--listen-client-urls")
                    .is_some_and(|u| u.split(',').any(|u| metrics::url_port(u) == Some(p)))
        })
    });
    (api.map(|p| p.0), etcd.map(|p| p.0))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

/// Retries `f` on errors other than "already there" / "not there" a few
/// times (the apiserver under load answers 429/5xx or times out).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(None),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing_less_warn(&format!("{what}: {e} (retry {attempt})"));
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(what.to_string())),
        }
    }
}

fn tracing_less_warn(msg: &str) {
    eprintln!("scale: {msg}");
}

struct Bench {
    cli: Cli,
    client: kube::Client,
    fakes: Gen,
    lab_dir: PathBuf,
    api_port: u16,
    clk_tck: f64,
    /// Fake nodes the node status writer cycles through.
    status_nodes: Arc<AtomicU32>,
    /// Node status writes it made.
    status_writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Pod and Node changes the bench's own watches saw.
    seen: Seen,
}

/// The changes of the fake pods (their namespace) and of every Node, as a
/// watcher gets them: what the apiserver's watch events are divided by.
#[derive(Debug, Clone, Default)]
struct Seen {
    pods: Arc<AtomicU64>,
    nodes: Arc<AtomicU64>,
}

impl Seen {
    /// (Pod changes, Node changes) so far.
    fn snapshot(&self) -> (u64, u64) {
        (
            self.pods.load(Ordering::Relaxed),
            self.nodes.load(Ordering::Relaxed),
        )
    }

    /// Watches `api` until `stop`, counting its objects' changes into
    /// `count`, resuming from the last version seen (from the current one
    /// after an error that cannot be resumed).
    #[allow(clippy::disallowed_methods)] // aborted at the end of main
    fn spawn<K>(
        api: Api<K>,
        count: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        tokio::spawn(async move {
            let mut rv: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                let from = match rv.clone() {
                    Some(v) => v,
                    None => match api.list_metadata(&ListParams::default().limit(1)).await {
                        Ok(l) => l.metadata.resource_version.unwrap_or_default(),
                        Err(e) => {
                            eprintln!("scale: listing to watch: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                let stream = match api.watch(&WatchParams::default().timeout(290), &from).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("scale: watching: {e}");
                        rv = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let mut s = std::pin::pin!(stream);
                rv = Some(from);
                while let Some(ev) = s.next().await {
                    match ev {
                        Ok(
                            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o),
                        ) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            rv = o.meta().resource_version.clone().or(rv);
                        }
                        Ok(WatchEvent::Bookmark(b)) => rv = Some(b.metadata.resource_version),
                        Ok(WatchEvent::Error(e)) => {
                            eprintln!("scale: watch: {e}; resuming from now");
                            rv = None;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        })
    }
}

/// The agents at one moment: (node, pid, sample).
type Agents = Vec<(String, u32, ProcSample)>;

impl Bench {
    fn lab(&self) -> anyhow::Result<LabState> {
        LabState::load(&self.lab_dir)
    }

    fn agents(&self) -> anyhow::Result<(Agents, u32)> {
        let s = self.lab()?;
        let restarts = s.nodes.iter().map(|n| n.restarts).sum();
        let a = s
            .nodes
            .iter()
            .filter(|n| n.agent_pid != 0)
            .filter_map(|n| Some((n.name.clone(), n.agent_pid, proc_sample(n.agent_pid)?)))
            .collect();
        Ok((a, restarts))
    }

    /// CPU ticks of all agents, by pid (a restarted agent counts anew).
    fn cpu(&self) -> anyhow::Result<BTreeMap<u32, u64>> {
        Ok(self
            .agents()?
            .0
            .into_iter()
            .map(|(_, pid, s)| (pid, s.cpu_ticks))
            .collect())
    }

    fn cpu_seconds_since(&self, before: &BTreeMap<u32, u64>) -> anyhow::Result<f64> {
        let now = self.cpu()?;
        let ticks: u64 = now
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
            .sum();
        Ok(ticks as f64 / self.clk_tck)
    }

    async fn metrics(&self) -> anyhow::Result<Metrics> {
        let req = http::Request::get("/metrics").body(Vec::new())?;
        let text = self
            .client
            .request_text(req)
            .await
            .context("the apiserver's /metrics")?;
        Ok(Metrics::from_text(&text))
    }

    async fn leader(&self) -> String {
        let leases: Api<Lease> =
            Api::namespaced(self.client.clone(), margay_api::node::LEASE_NAMESPACE);
        match leases.get_opt("margay-agent-leader").await {
            Ok(Some(l)) => l.spec.and_then(|s| s.holder_identity).unwrap_or_default(),
            _ => String::new(),
        }
    }

    async fn prepare(&self) -> anyhow::Result<()> {
        let pp = PostParams::default();
        let ns: Api<Namespace> = Api::all(self.client.clone());
        let obj: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": self.cli.namespace, "labels": {fake::LABEL: "true"}}
        }))?;
        retry("creating the namespace", || ns.create(&pp, &obj)).await?;
        // No controller-manager in the lab: the namespace's ServiceAccount
        // is ours to make, or every Pod POST is refused.
        let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        let obj: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))?;
        retry("creating its ServiceAccount", || sa.create(&pp, &obj)).await?;
        if self.cli.policy {
            let np: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.cli.namespace);
            let obj: NetworkPolicy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": POLICY, "labels": {fake::LABEL: "true"}},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}
            }))?;
            retry("creating the NetworkPolicy", || np.create(&pp, &obj)).await?;
            // A real pod the policy selects on node2: its table then holds
            // the policy's peer set (a node builds the sets its own pods'
            // policies use, no other).
            let lab = std::env::current_exe()?.with_file_name("margay-lab");
            let out = tokio::process::Command::new(&lab)
                .args([
                    "pod",
                    "add",
                    "node2",
                    ANCHOR,
                    "--namespace",
                    &self.cli.namespace,
                ])
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "margay-lab pod add node2 {ANCHOR}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// `--probe` pods on node1, each timed until node2's peer set has it.
    async fn probe(&self, size: u32) -> anyhow::Result<Vec<f64>> {
        if !self.cli.policy || self.cli.probe == 0 || size == 0 || self.fakes.pods_per_node == 0 {
            return Ok(Vec::new());
        }
        let (agents, _) = self.agents()?;
        let Some(pid) = agents.iter().find(|(n, _, _)| n == "node2").map(|a| a.1) else {
            bail!("--probe needs a lab node named node2");
        };
        let lab = std::env::current_exe()?.with_file_name("margay-lab");
        let nft = |args: Vec<String>| {
            let mut a = vec!["-t".to_string(), pid.to_string(), "-n".into(), "nft".into()];
            a.extend(args);
            tokio::process::Command::new("nsenter").args(a).output()
        };
        // The peer set: the set holding a fake pod's address.
        let sets = nft(vec![
            "-t".into(),
            "list".into(),
            "sets".into(),
            "inet".into(),
        ])
        .await?;
        let text = String::from_utf8_lossy(&sets.stdout).to_string();
        let probe_ip = self.fakes.pod_address(0, 0)?.to_string();
        let mut set = None;
        for name in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("set "))
            .map(|l| l.trim_end_matches(" {").to_string())
        {
            let o = nft(vec![
                "get".into(),
                "element".into(),
                "inet".into(),
                "margay_policy".into(),
                name.clone(),
                format!("{{ {probe_ip} }}"),
            ])
            .await?;
            if o.status.success() {
                set = Some(name);
                break;
            }
        }
        let Some(set) = set else {
            eprintln!("scale: no set of node2's table holds {probe_ip}: no probe");
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for i in 0..self.cli.probe {
            let name = format!("probe-{size}-{i}");
            let t0 = Instant::now();
            let add = tokio::process::Command::new(&lab)
                .args([
                    "pod",
                    "add",
                    "node1",
                    &name,
                    "--namespace",
                    &self.cli.namespace,
                ])
                .output()
                .await?;
            let said = String::from_utf8_lossy(&add.stdout).to_string();
            let Some(ip) = said.split_whitespace().nth(1).map(str::to_string) else {
                bail!(
                    "margay-lab pod add: {said} {}",
                    String::from_utf8_lossy(&add.stderr)
                );
            };
            loop {
                let o = nft(vec![
                    "get".into(),
                    "element".into(),
                    "inet".into(),
                    "margay_policy".into(),
                    set.clone(),
                    format!("{{ {ip} }}"),
                ])
                .await?;
                if o.status.success() {
                    out.push(t0.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    eprintln!("scale: probe {name} ({ip}) not in node2's peer set after 30 s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tokio::process::Command::new(&lab)
                .args(["pod", "del", &name])
                .output()
                .await;
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed())).await;
        }
        Ok(out)
    }

    /// The pod addresses (of the fake range) in one non-leader agent's
    /// NetworkPolicy table: its peer set.
    async fn peer_set(&self, leader: &str) -> Option<u64> {
        if !self.cli.policy {
            return None;
        }
        let (agents, _) = self.agents().ok()?;
        let pid = agents
            .iter()
            .find(|(n, _, _)| n != leader)
            .or(agents.first())?
            .1;
        let out = tokio::process::Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "nft",
                "list",
                "table",
                "inet",
                "margay_policy",
            ])
            .output()
            .await
            .ok()?;
        Some(fake::pod_addresses_in(&String::from_utf8_lossy(
            &out.stdout,
        )))
    }

    /// Deletes every object of kind `K` carrying the bench's label.
    async fn delete_all<K>(&self, api: Api<K>, what: &str) -> anyhow::Result<u64>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default()
                .labels(&format!("{}=true", fake::LABEL))
                .limit(500);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let l = api.list_metadata(&lp).await?;
            names.extend(l.items.into_iter().filter_map(|o| o.metadata.name));
            token = l.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        let n = names.len() as u64;
        if n == 0 {
            return Ok(0);
        }
        eprintln!("scale: deleting {n} {what}");
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        futures::stream::iter(names)
            .map(|name| {
                let (api, dp) = (api.clone(), dp.clone());
                async move { retry(&format!("deleting {name}"), || api.delete(&name, &dp)).await }
            })
            .buffer_unordered(self.cli.concurrency.max(1))
            .try_for_each(|_| async { Ok(()) })
            .await?;
        Ok(n)
    }

    async fn cleanup(&self) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        self.delete_all(pods, "pods").await?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        self.delete_all(nodes, "nodes").await?;
        let slices: Api<MargayEndpointSlice> = Api::all(self.client.clone());
        self.delete_all(slices, "endpoint slices").await?;
        let np: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        self.delete_all(np, "NetworkPolicies").await?;
        let identities: Api<MargayNode> = Api::all(self.client.clone());
        self.delete_all(identities, "MargayNodes").await?;
        Ok(())
    }

    /// Fake nodes `from..to` and their pods: (node writes, pod writes).
    async fn load(&self, from: u32, to: u32) -> anyhow::Result<(u64, u64)> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let objs: Vec<Node> = (from..to)
            .map(|i| self.fakes.node(i))
            .collect::<anyhow::Result<_>>()?;
        let identities: Api<MargayNode> = Api::all(self.client.clone());
        let slices: Api<MargayEndpointSlice> = Api::all(self.client.clone());
        let node_writes = futures::stream::iter((from..to).zip(objs))
            .map(|(i, n)| {
                let (nodes, identities, slices) =
                    (nodes.clone(), identities.clone(), slices.clone());
                async move {
                    let pp = PostParams::default();
                    let name = n.metadata.name.clone().unwrap_or_default();
                    let r =
                        retry(&format!("creating Node {name}"), || nodes.create(&pp, &n)).await?;
                    let created = r.is_some();
                    // Its agent's MargayNode, owned by the Node.
                    let uid = match r.and_then(|n| n.metadata.uid) {
                        Some(u) => u,
                        None => nodes.get(&name).await?.metadata.uid.unwrap_or_default(),
                    };
                    let m = self.fakes.identity(i, &uid)?;
                    let ap = PatchParams::apply("margay-agent").force();
                    identities.patch(&name, &ap, &Patch::Apply(&m)).await?;
                    // Its pods as its agent publishes them.
                    for sl in self.fakes.slices(i, &uid)? {
                        let sn = sl.metadata.name.clone().unwrap_or_default();
                        slices.patch(&sn, &ap, &Patch::Apply(&sl)).await?;
                    }
                    Ok::<u64, anyhow::Error>(u64::from(created))
                }
            })
            .buffer_unordered(self.cli.concurrency.max(1))
            .try_fold(0u64, |a, b| async move { Ok(a + b) })
            .await?;
        self.status_nodes.store(to, Ordering::Relaxed);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        let per = self.fakes.pods_per_node;
        let total = u64::from(to - from) * u64::from(per);
        let t0 = Instant::now();
        let mut done = 0u64;
        let mut writes = 0u64;
        let mut stream =
            futures::stream::iter((from..to).flat_map(|i| (0..per).map(move |k| (i, k))))
                .map(|(i, k)| {
                    let pods = pods.clone();
                    async move { self.add_pod(&pods, i, k).await }
                })
                .buffer_unordered(self.cli.concurrency.max(1));
        let mut shown = Instant::now();
        while let Some(r) = stream.next().await {
            writes += r?;
            done += 1;
            if shown.elapsed() > Duration::from_secs(10) {
                shown = Instant::now();
                eprintln!(
                    "scale: {done}/{total} pods ({:.0}/s)",
                    done as f64 / t0.elapsed().as_secs_f64()
                );
            }
        }
        Ok((node_writes, writes))
    }

    /// Creates fake pod `k` of node `i` and writes its status: the writes
    /// made.
    async fn add_pod(&self, pods: &Api<Pod>, i: u32, k: u32) -> anyhow::Result<u64> {
        let (pp, ppatch) = (PostParams::default(), PatchParams::default());
        let p = self.fakes.pod(i, k)?;
        let name = Gen::pod_name(i, k);
        let mut writes = 0;
        if retry(&format!("creating Pod {name}"), || pods.create(&pp, &p))
            .await?
            .is_some()
        {
            writes += 1;
        }
        let status = self.fakes.pod_status(i, k, &now_rfc3339())?;
        let patch = Patch::Merge(&status);
        if retry(&format!("writing Pod {name}'s status"), || {
            pods.patch_status(&name, &ppatch, &patch)
        })
        .await?
        .is_some()
        {
            writes += 1;
        }
        Ok(writes)
    }

    /// Waits until the agents' CPU is quiet: (seconds, settled).
    async fn settle(&self) -> anyhow::Result<(f64, bool)> {
        let t0 = Instant::now();
        let mut history = Vec::new();
        loop {
            let before = self.cpu()?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let pct = self.cpu_seconds_since(&before)? / 5.0 * 100.0;
            history.push(pct);
            let e = t0.elapsed();
            if e >= Duration::from_secs(self.cli.settle_min)
                && settled(&history, self.cli.settle_cpu)
            {
                return Ok((e.as_secs_f64(), true));
            }
            if e >= Duration::from_secs(self.cli.settle_max) {
                eprintln!(
                    "scale: agents still at {pct:.1}% of a core after {:.0} s",
                    e.as_secs_f64()
                );
                return Ok((e.as_secs_f64(), false));
            }
        }
    }

    /// Replaces pods at `--churn` per second for `--churn-seconds` over
    /// the `nodes` fake nodes.
    async fn churn(&self, nodes: u32) -> anyhow::Result<Churn> {
        let rate = self.cli.churn;
        let count = (rate * self.cli.churn_seconds as f64).round() as u64;
        let per = u64::from(self.fakes.pods_per_node.max(1));
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        let seen0 = self.seen.snapshot();
        let cpu0 = self.cpu()?;
        let m0 = self.metrics().await?;
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sem = Arc::new(tokio::sync::Semaphore::new(self.cli.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for j in 0..count {
            tick.tick().await;
            // Spread over the nodes: node j mod N, then the next pod.
            let i = u32::try_from(j % u64::from(nodes))?;
            let k = u32::try_from((j / u64::from(nodes)) % per)?;
            let permit = sem.clone().acquire_owned().await?;
            let (pods, dp, fakes) = (pods.clone(), dp.clone(), self.fakes.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let (pp, ppatch) = (PostParams::default(), PatchParams::default());
                let name = Gen::pod_name(i, k);
                let mut w = 0u64;
                if retry(&format!("deleting {name}"), || pods.delete(&name, &dp))
                    .await?
                    .is_some()
                {
                    w += 1;
                }
                let p = fakes.pod(i, k)?;
                if retry(&format!("creating {name}"), || pods.create(&pp, &p))
                    .await?
                    .is_some()
                {
                    w += 1;
                }
                let st = fakes.pod_status(i, k, &now_rfc3339())?;
                let patch = Patch::Merge(&st);
                if retry(&format!("status of {name}"), || {
                    pods.patch_status(&name, &ppatch, &patch)
                })
                .await?
                .is_some()
                {
                    w += 1;
                }
                Ok::<u64, anyhow::Error>(w)
            });
        }
        let mut writes = 0;
        while let Some(r) = tasks.join_next().await {
            writes += r??;
        }
        let seconds = t0.elapsed().as_secs_f64();
        // Let the last events go out.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let d = self.metrics().await?.since(&m0);
        let changes = self.seen.snapshot().0 - seen0.0;
        let (all, bytes) = (d.events("Pod"), d.bytes("Pod"));
        let others = (all - changes as f64).max(0.0);
        Ok(Churn {
            rate,
            seconds,
            writes,
            changes,
            pod_events: others,
            pod_bytes: if all > 0.0 { bytes / all * others } else { 0.0 },
            agents_cpu_percent: self.cpu_seconds_since(&cpu0)? / (seconds + 2.0) * 100.0,
        })
    }

    /// Writes each fake node's status every `--node-status-interval`,
    /// spread evenly, until stopped.
    #[allow(clippy::disallowed_methods)] // stopped and joined at the end of main
    fn spawn_node_status(&self) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.cli.node_status_interval;
        if every == 0 {
            return None;
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let (count, writes, stop) = (
            self.status_nodes.clone(),
            self.status_writes.clone(),
            self.stop.clone(),
        );
        Some(tokio::spawn(async move {
            let mut next = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let n = count.load(Ordering::Relaxed);
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let gap = Duration::from_secs_f64(every as f64 / f64::from(n));
                let t = Instant::now();
                let name = Gen::node_name(next % n);
                next = next.wrapping_add(1);
                let p = Gen::node_status(&now_rfc3339());
                let (ppatch, patch) = (PatchParams::default(), Patch::Merge(&p));
                if nodes.patch_status(&name, &ppatch, &patch).await.is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(gap.saturating_sub(t.elapsed())).await;
            }
        }))
    }

    /// Grows the fake cluster from `from` to `to` nodes and measures.
    async fn step(&self, from: u32, to: u32) -> anyhow::Result<Point> {
        let m0 = self.metrics().await?;
        let seen0 = self.seen.snapshot();
        let cpu0 = self.cpu()?;
        let status0 = self.status_writes.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let (node_writes, pod_writes) = if to > from {
            eprintln!("scale: growing to {to} fake nodes");
            self.load(from, to).await?
        } else {
            (0, 0)
        };
        let load_seconds = t0.elapsed().as_secs_f64();
        // The watch events of the load; the status writer's Node writes
        // meanwhile count too.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status_load = self.status_writes.load(Ordering::Relaxed) - status0;
        let d = self.metrics().await?.since(&m0);
        let seen = self.seen.snapshot();
        let (pod_changes, node_changes) = (seen.0 - seen0.0, seen.1 - seen0.1);
        let (settle_seconds, settled) = self.settle().await?;
        let agents_cpu_load_seconds = self.cpu_seconds_since(&cpu0)?;

        // Memory, then the quiet window.
        let leader = self.leader().await;
        let (agents, restarts) = self.agents()?;
        let procs = command_lines();
        let (api_pid, etcd_pid) = control_plane(&procs, self.api_port);
        let rss_of = |pid: Option<u32>| pid.and_then(proc_sample).map(|s| mib(s.rss_kib));
        let (lead, others): (Vec<_>, Vec<_>) = agents.iter().partition(|(n, _, _)| *n == leader);
        let others_rss: Vec<f64> = others.iter().map(|(_, _, s)| mib(s.rss_kib)).collect();

        let w0 = self.metrics().await?;
        let s0 = self.status_writes.load(Ordering::Relaxed);
        let c0: BTreeMap<u32, u64> = agents.iter().map(|(_, p, s)| (*p, s.cpu_ticks)).collect();
        tokio::time::sleep(Duration::from_secs(self.cli.window)).await;
        let secs = self.cli.window.max(1) as f64;
        let w = self.metrics().await?.since(&w0);
        let mine = (self.status_writes.load(Ordering::Relaxed) - s0) as f64;
        let (after, _) = self.agents()?;
        let pct = |pid: u32| {
            let b = c0.get(&pid).copied().unwrap_or(0);
            after
                .iter()
                .find(|(_, p, _)| *p == pid)
                .map_or(0.0, |(_, _, s)| {
                    s.cpu_ticks.saturating_sub(b) as f64 / self.clk_tck / secs * 100.0
                })
        };
        let others_pct: Vec<f64> = others.iter().map(|(_, p, _)| pct(*p)).collect();
        let n_agents = agents.len().max(1) as f64;
        let mut by: BTreeMap<String, f64> = BTreeMap::new();
        for ((verb, res), v) in &w.requests {
            let mut v = *v;
            if verb == "PATCH" && res == "nodes/status" {
                v = (v - mine).max(0.0);
            }
            if v > 0.0 {
                by.insert(format!("{verb} {res}"), v / secs);
            }
        }
        let total = w.requests_less("PATCH", "nodes/status", mine) / secs;
        let mut point = Point {
            nodes: to,
            pods: u64::from(to) * u64::from(self.fakes.pods_per_node),
            load_seconds,
            load_pod_writes: pod_writes,
            load_node_writes: node_writes + status_load,
            load_pod_changes: pod_changes,
            load_node_changes: node_changes,
            load_pod_events: (d.events("Pod") - pod_changes as f64).max(0.0),
            load_node_events: (d.events("Node") - node_changes as f64).max(0.0),
            settle_seconds,
            settled,
            leader: leader.clone(),
            leader_rss_mib: lead.first().map_or(0.0, |(_, _, s)| mib(s.rss_kib)),
            others_rss_mib_mean: mean(&others_rss),
            others_rss_mib_max: others_rss.iter().copied().fold(0.0, f64::max),
            apiserver_rss_mib: rss_of(api_pid),
            etcd_rss_mib: rss_of(etcd_pid),
            agents_cpu_load_seconds,
            rest_cpu_leader_percent: lead.first().map_or(0.0, |(_, p, _)| pct(*p)),
            rest_cpu_others_percent: mean(&others_pct),
            rest_cpu_all_percent: agents.iter().map(|(_, p, _)| pct(*p)).sum(),
            rest_requests_by: by,
            rest_requests_per_agent: total / n_agents,
            rest_events_per_s: w
                .watch_events
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(k, v)| (k.clone(), v / secs))
                .collect(),
            // Not the bench's own.
            pod_watchers: (w.watchers_of("Pod") - 1.0).max(0.0),
            node_watchers: (w.watchers_of("Node") - 1.0).max(0.0),
            churn: None,
            agent_restarts: restarts,
            peer_set: self.peer_set(&leader).await,
            peer_latency_ms: Vec::new(),
        };
        let churn = async {
            if self.cli.churn > 0.0 && to > 0 && self.fakes.pods_per_node > 0 {
                eprintln!(
                    "scale: churn at {} pods/s for {} s",
                    self.cli.churn, self.cli.churn_seconds
                );
                return self.churn(to).await.map(Some);
            }
            Ok(None)
        };
        let (churn, probe) = tokio::join!(churn, self.probe(to));
        point.churn = churn?;
        point.peer_latency_ms = probe?;
        eprintln!(
            "scale: {to} fake nodes: leader {} {:.1} MiB, others {:.1} MiB (max {:.1}), {:.2} Pod events per Pod change",
            point.leader,
            point.leader_rss_mib,
            point.others_rss_mib_mean,
            point.others_rss_mib_max,
            point.pod_events_per_change().unwrap_or(f64::NAN)
        );
        Ok(point)
    }
}

/// Whether the agents' CPU has settled, from its 5-s samples (percent of
/// a core, all agents): the last two under `quiet`, or a plateau (the last
/// 15 s within a fifth, or 1 % of a core, of the 15 s before: what a
/// steady load such as Node status writes leaves).
fn settled(history: &[f64], quiet: f64) -> bool {
    let n = history.len();
    if n >= 2 && history[n - 2..].iter().all(|p| *p < quiet) {
        return true;
    }
    if n >= 6 {
        let (a, b) = (mean(&history[n - 3..]), mean(&history[n - 6..n - 3]));
        return (a - b).abs() <= (0.2 * b).max(1.0);
    }
    false
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// `x` with `d` decimals, or `-`.
fn f(x: Option<f64>, d: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.d$}"),
        _ => "-".into(),
    }
}

/// The Markdown tables of a run.
fn tables(r: &Results) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "{} real agents, {} fake pods per fake node, {} ({})\n\n",
        r.agents,
        r.pods_per_node,
        if r.points.iter().any(|p| p.peer_set.is_some()) {
            "a NetworkPolicy whose peer is every pod"
        } else {
            "no NetworkPolicy"
        },
        r.label
    ));
    if let Some(p0) = r.points.first().filter(|p| p.peer_set.is_some()) {
        o.push_str("| fake nodes | fake pods | peer set (pod addresses in one agent's table) | other agents' growth per remote pod (bytes) | pod started to its address in node2's peer set, p50 / p99 / max (ms, probes) |\n|---|---|---|---|---|\n");
        for p in &r.points {
            let per = (p.pods > 0).then(|| {
                (p.others_rss_mib_mean - p0.others_rss_mib_mean) * 1048576.0 / p.pods as f64
            });
            let mut l = p.peer_latency_ms.clone();
            l.sort_by(f64::total_cmp);
            let q = |x: f64| l[((l.len() as f64 - 1.0) * x).round() as usize];
            o.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                p.nodes,
                p.pods,
                p.peer_set.map_or("-".into(), |n| n.to_string()),
                f(per, 0),
                if l.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "{:.0} / {:.0} / {:.0} ({})",
                        q(0.5),
                        q(0.99),
                        l[l.len() - 1],
                        l.len()
                    )
                }
            ));
        }
        o.push('\n');
    }
    o.push_str("| fake nodes | fake pods | leader RSS (MiB) | other agents RSS avg / max (MiB) | agent CPU at rest, leader / others (% of a core) | apiserver RSS (MiB) | etcd RSS (MiB) | load (s) | settled after (s) | agent restarts |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.points {
        o.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {} | {:.1} | {:.0}{} | {} |\n",
            p.nodes,
            p.pods,
            p.leader_rss_mib,
            p.others_rss_mib_mean,
            p.others_rss_mib_max,
            p.rest_cpu_leader_percent,
            p.rest_cpu_others_percent,
            f(p.apiserver_rss_mib, 0),
            f(p.etcd_rss_mib, 0),
            p.load_seconds,
            p.settle_seconds,
            if p.settled { "" } else { " (not settled)" },
            p.agent_restarts
        ));
    }
    o.push('\n');
    o.push_str("| fake nodes | Pod / Node watchers | Pod watch events per Pod change (load) | Node watch events per Node change (load) | watch events/s at rest (Pod / Node / all) | requests/s at rest per agent (est.) | churn: Pod changes (writes) | churn: Pod events per Pod change | churn: KiB sent per Pod change | agent CPU during churn, all (above rest) (% of a core) |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.points {
        let ev = |k: &str| p.rest_events_per_s.get(k).copied().unwrap_or(0.0);
        let all: f64 = p.rest_events_per_s.values().fold(0.0, |a, b| a + b);
        let c = p.churn.as_ref().filter(|c| c.changes > 0);
        o.push_str(&format!(
            "| {} | {:.0} / {:.0} | {} | {} | {:.2} / {:.2} / {:.2} | {:.3} | {} | {} | {} | {} |\n",
            p.nodes,
            p.pod_watchers,
            p.node_watchers,
            f(p.pod_events_per_change(), 2),
            f(p.node_events_per_change(), 2),
            ev("Pod"),
            ev("Node"),
            all,
            p.rest_requests_per_agent,
            c.map_or("-".into(), |c| format!("{} ({})", c.changes, c.writes)),
            f(c.map(|c| c.pod_events / c.changes as f64), 2),
            f(c.map(|c| c.pod_bytes / c.changes as f64 / 1024.0), 2),
            c.map_or("-".into(), |c| format!(
                "{:.1} ({:+.1})",
                c.agents_cpu_percent,
                c.agents_cpu_percent - p.rest_cpu_all_percent
            )),
        ));
    }
    if let Some(p) = r.points.last()
        && !p.rest_requests_by.is_empty()
    {
        o.push_str(&format!(
            "\nRequests/s at rest at {} fake nodes, all agents: {}\n",
            p.nodes,
            p.rest_requests_by
                .iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    o
}

/// Ratios of this run to a baseline at the sizes both measured.
fn ratios(r: &Results, base: &Results) -> String {
    let mut o = format!(
        "\n| fake nodes | leader RSS {a} / {b} | others RSS {a} / {b} | Pod events per Pod change {a} / {b} | requests/s per agent {a} / {b} |\n|---|---|---|---|---|\n",
        a = r.label,
        b = base.label
    );
    let ratio = |x: f64, y: f64| {
        if y > 0.0 {
            format!("{:.2}x", x / y)
        } else {
            "-".into()
        }
    };
    for p in &r.points {
        let Some(q) = base.points.iter().find(|q| q.nodes == p.nodes) else {
            continue;
        };
        o.push_str(&format!(
            "| {} | {:.1} / {:.1} ({}) | {:.1} / {:.1} ({}) | {} / {} | {:.3} / {:.3} ({}) |\n",
            p.nodes,
            p.leader_rss_mib,
            q.leader_rss_mib,
            ratio(p.leader_rss_mib, q.leader_rss_mib),
            p.others_rss_mib_mean,
            q.others_rss_mib_mean,
            ratio(p.others_rss_mib_mean, q.others_rss_mib_mean),
            f(p.pod_events_per_change(), 2),
            f(q.pod_events_per_change(), 2),
            p.rest_requests_per_agent,
            q.rest_requests_per_agent,
            ratio(p.rest_requests_per_agent, q.rest_requests_per_agent),
        ));
    }
    o
}

/// The chart of agent RSS against N (fake nodes > 0; a log axis).
fn chart(r: &Results, base: Option<&Results>) -> svg::Chart {
    let mut series = Vec::new();
    let mut add = |res: &Results, dashed: bool| {
        let pts = |g: &dyn Fn(&Point) -> f64| -> Vec<(f64, f64)> {
            res.points
                .iter()
                .filter(|p| p.nodes > 0)
                .map(|p| (f64::from(p.nodes), g(p)))
                .collect()
        };
        series.push(svg::Series {
            name: format!("elected agent ({})", res.label),
            points: pts(&|p| p.leader_rss_mib),
            dashed,
            color: 0,
        });
        series.push(svg::Series {
            name: format!("other agents, mean ({})", res.label),
            points: pts(&|p| p.others_rss_mib_mean),
            dashed,
            color: 1,
        });
    };
    add(r, false);
    if let Some(b) = base {
        add(b, true);
    }
    svg::Chart {
        title: format!(
            "Agent RSS against cluster size ({} real agents, {} pods per fake node)",
            r.agents, r.pods_per_node
        ),
        x_label: "fake nodes (log scale)".into(),
        y_label: "RSS (MiB)".into(),
        log_x: true,
        series,
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.sizes.windows(2).any(|w| w[0] >= w[1]) || cli.sizes.first() == Some(&0) {
        bail!(
            "--sizes must be ascending and above 0 (0 is always measured first): {:?}",
            cli.sizes
        );
    }
    if !(cli.churn >= 0.0 && cli.churn.is_finite()) {
        bail!("--churn must be a rate >= 0");
    }
    let fakes = Gen {
        pods_per_node: cli.pods_per_node,
        namespace: cli.namespace.clone(),
        asn: margay_api::bgp::DEFAULT_ASN,
    };
    if let Some(max) = cli.sizes.last() {
        fakes.check(*max)?;
    }
    let base = cli.baseline.as_deref().map(load_results).transpose()?;
    if let Some(p) = &cli.replot {
        return report(&load_results(p)?, base.as_ref(), cli.plot.as_deref());
    }
    let lab = LabState::load(&cli.lab_dir)?;
    let client = margay_harness::kube::client_from(Path::new(&lab.kubeconfig)).await?;
    let api_port = metrics::url_port(&lab.apiserver_url)
        .with_context(|| format!("the apiserver's port in {}", lab.apiserver_url))?;
    let clk_tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64);
    let b = Bench {
        lab_dir: cli.lab_dir.clone(),
        fakes,
        client,
        api_port,
        clk_tck,
        status_nodes: Arc::new(AtomicU32::new(0)),
        status_writes: Arc::new(AtomicU64::new(0)),
        stop: Arc::new(AtomicBool::new(false)),
        seen: Seen::default(),
        cli,
    };
    // Leftovers of an earlier run first.
    b.cleanup().await?;
    b.prepare().await?;
    let status_task = b.spawn_node_status();
    let watches = [
        Seen::spawn(
            Api::<Pod>::namespaced(b.client.clone(), &b.cli.namespace),
            b.seen.pods.clone(),
            b.stop.clone(),
        ),
        Seen::spawn(
            Api::<Node>::all(b.client.clone()),
            b.seen.nodes.clone(),
            b.stop.clone(),
        ),
    ];
    // Both watching before anything is measured.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut results = Results {
        label: b.cli.label.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        agents: lab.nodes.len(),
        pods_per_node: b.cli.pods_per_node,
        points: Vec::new(),
    };
    let run = async {
        let mut have = 0;
        for n in std::iter::once(0).chain(b.cli.sizes.iter().copied()) {
            let p = b.step(have, n).await?;
            have = n;
            results.points.push(p);
            // Partial results survive a later failure.
            if let Some(j) = &b.cli.json {
                write(j, &serde_json::to_string_pretty(&results)?)?;
            }
        }
        anyhow::Ok(())
    };
    let outcome = run.await;
    b.stop.store(true, Ordering::Relaxed);
    if let Some(t) = status_task {
        let _ = t.await;
    }
    for w in watches {
        w.abort();
    }
    report(&results, base.as_ref(), b.cli.plot.as_deref())?;
    if !b.cli.no_cleanup {
        b.cleanup().await?;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn settles_when_quiet_or_on_a_plateau() {
        assert!(!settled(&[], 5.0));
        assert!(!settled(&[4.0], 5.0));
        assert!(settled(&[80.0, 4.0, 3.0], 5.0));
        assert!(!settled(&[80.0, 4.0, 30.0], 5.0));
        // Still falling: not yet.
        assert!(!settled(&[90.0, 80.0, 70.0, 50.0, 40.0, 35.0], 5.0));
        // A steady 30 %, noisy.
        assert!(settled(&[90.0, 31.0, 27.0, 33.0, 29.0, 30.0, 28.0], 5.0));
        // Small figures: within 1 % of a core.
        assert!(settled(&[6.0, 5.5, 6.5, 6.0, 5.2, 6.3], 5.0));
    }

    #[test]
    fn finds_the_labs_apiserver_and_its_etcd_by_command_line() {
        let procs = vec![
            (
                10,
                args(&[
                    "/usr/bin/etcd",
                    "--listen-client-urls=http://127.0.0.1:2000",
                ]),
            ),
            (
                11,
                args(&[
                    "/usr/bin/etcd",
                    "--listen-client-urls=http://127.0.0.1:3000",
                ]),
            ),
            (
                20,
                args(&[
                    "/x/kube-apiserver",
                    "--etcd-servers=http://127.0.0.1:2000",
                    "--secure-port=7000",
                ]),
            ),
            (
                21,
                args(&[
                    "/x/kube-apiserver",
                    "--etcd-servers=http://127.0.0.1:3000",
                    "--secure-port=8000",
                ]),
            ),
            (
                30,
                args(&["bash", "-c", "kube-apiserver --secure-port=8000"]),
            ),
        ];
        assert_eq!(control_plane(&procs, 8000), (Some(21), Some(11)));
        assert_eq!(control_plane(&procs, 7000), (Some(20), Some(10)));
        assert_eq!(control_plane(&procs, 9000), (None, None));
    }

    fn point(nodes: u32, leader: f64, others: f64) -> Point {
        Point {
            nodes,
            pods: u64::from(nodes) * 30,
            leader_rss_mib: leader,
            others_rss_mib_mean: others,
            others_rss_mib_max: others + 1.0,
            load_pod_writes: 600,
            load_pod_changes: 600,
            load_pod_events: 3000.0,
            settled: true,
            rest_requests_per_agent: 0.1,
            churn: Some(Churn {
                rate: 10.0,
                seconds: 20.0,
                writes: 600,
                changes: 800,
                pod_events: 4000.0,
                pod_bytes: 800.0 * 5.0 * 2048.0,
                agents_cpu_percent: 12.0,
            }),
            ..Default::default()
        }
    }

    fn results(label: &str) -> Results {
        Results {
            label: label.into(),
            command: "scale".into(),
            agents: 3,
            pods_per_node: 30,
            points: vec![
                point(0, 22.0, 21.0),
                point(10, 23.0, 21.5),
                point(1000, 364.0, 94.0),
            ],
        }
    }

    #[test]
    fn tables_name_every_size_and_the_fan_out() {
        let t = tables(&results("old"));
        assert!(t.contains("| 1000 | 30000 | 364.0 | 94.0 / 95.0 |"), "{t}");
        // 3000 events for 600 writes; 10 KiB per write during churn.
        assert!(t.contains("| 1000 | 0 / 0 | 5.00 | - |"), "{t}");
        assert!(
            t.contains("| 800 (600) | 5.00 | 10.00 | 12.0 (+12.0) |"),
            "{t}"
        );
        let r = ratios(&results("new"), &results("old"));
        assert!(r.contains("| 1000 | 364.0 / 364.0 (1.00x) |"), "{r}");
    }

    #[test]
    fn the_chart_leaves_out_n_0_and_overlays_the_baseline() {
        let new = results("new");
        let old = results("old");
        let c = chart(&new, Some(&old));
        assert_eq!(c.series.len(), 4);
        assert!(c.series.iter().all(|s| s.points.len() == 2));
        assert!(c.series[2].dashed && !c.series[0].dashed);
        assert_eq!((c.series[0].color, c.series[2].color), (0, 0));
        assert!(c.series[2].name.contains("(old)"));
        let svg = c.render();
        assert_eq!(svg.matches("<circle").count(), 8);
    }

    #[test]
    fn results_round_trip_through_json() {
        let r = results("old");
        let back: Results = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.points.len(), 3);
        assert_eq!(back.points[2].leader_rss_mib, 364.0);
    }
}
