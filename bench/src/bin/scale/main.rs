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
//!
//! Here: the command line and the figures of a run (the JSON `--json`
//! writes and `--baseline` and `--replot` read: a [`Point`] per size, its
//! [`Churn`]). `bench.rs` the loads and readings, `watch.rs` the bench's
//! own watches, `lab.rs` the lab's state and processes, `report.rs` the
//! tables and the chart, `fake.rs` the objects, `metrics.rs` what is
//! parsed, `svg.rs` the chart's drawing.

mod bench;
mod fake;
mod lab;
mod metrics;
mod report;
mod svg;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};

use bench::Bench;
use fake::Gen;
use lab::LabState;
use report::{report, write};

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

/// Reads a run's JSON.
fn load_results(p: &Path) -> anyhow::Result<Results> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("{}", p.display()))?)
        .with_context(|| format!("{}: not a scale run's JSON", p.display()))
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
    let b = Bench::new(cli, fakes, &lab).await?;
    // Leftovers of an earlier run first.
    b.cleanup().await?;
    b.prepare().await?;
    // The status writer stops when told and is joined; the watches are
    // aborted when their handles go, at the end.
    let mut status_task = tokio::task::JoinSet::new();
    b.spawn_node_status(&mut status_task);
    let watches = b.watches();
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
    b.finish();
    while status_task.join_next().await.is_some() {}
    drop(watches);
    report(&results, base.as_ref(), b.cli.plot.as_deref())?;
    if !b.cli.no_cleanup {
        b.cleanup().await?;
    }
    outcome
}
