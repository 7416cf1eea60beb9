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
//! Modules: `cli` is here; `bench.rs` the loads and readings, `watch.rs`
//! the bench's own watches, `lab.rs` the lab's state and processes,
//! `results.rs` the figures (JSON), `report.rs` the tables and the chart,
//! `fake.rs` the objects, `metrics.rs` what is parsed, `svg.rs` the chart's
//! drawing.

mod bench;
mod fake;
mod lab;
mod metrics;
mod report;
mod results;
mod svg;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;

use bench::Bench;
use fake::Gen;
use lab::LabState;
use report::{report, write};
use results::{Results, load_results};

#[derive(Debug, Parser)]
#[command(
    about = "agent cost and API fan-out against the number of (fake) nodes, on a running lab"
)]
pub(crate) struct Cli {
    /// Fake node counts, ascending; the cluster grows from one to the next.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub sizes: Vec<u32>,
    /// Fake pods per fake node.
    #[arg(long, default_value_t = 30)]
    pub pods_per_node: u32,
    /// API writes in flight while loading.
    #[arg(long, default_value_t = 24)]
    pub concurrency: usize,
    /// Pods replaced per second at each size (0: no churn).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// How long the churn lasts at each size, in seconds (a watch of the
    /// pods counts the changes: at most 280).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=280))]
    pub churn_seconds: u64,
    /// Each fake node's status (its Ready condition) written every this
    /// many seconds, spread evenly, as a kubelet reports (0: never; a
    /// kubelet with Leases writes it every 300 s, older ones every 10 s).
    #[arg(long, default_value_t = 0)]
    pub node_status_interval: u64,
    /// The quiet window at each size, in seconds.
    #[arg(long, default_value_t = 30)]
    pub window: u64,
    /// Settled: the agents together used less than this share of a core
    /// (percent) over two 5-s samples in a row.
    #[arg(long, default_value_t = 5.0)]
    pub settle_cpu: f64,
    /// Waiting for that at least this long, at most `--settle-max` seconds.
    #[arg(long, default_value_t = 10)]
    pub settle_min: u64,
    /// At most this long.
    #[arg(long, default_value_t = 300)]
    pub settle_max: u64,
    /// The lab's directory (its `state.json`, `kubeconfig`).
    #[arg(long, env = "MARGAY_LAB_DIR", default_value = "/run/margay-lab")]
    pub lab_dir: PathBuf,
    /// The fake pods' namespace.
    #[arg(long, default_value = "scale")]
    pub namespace: String,
    /// Write the line chart of agent RSS against N here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write every figure here (JSON; what `--baseline` reads).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A previous run's JSON: its curves in the chart (dashed) and ratios.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// This run's name in the chart and the JSON (e.g. `old`, `new`).
    #[arg(long, default_value = "this run")]
    pub label: String,
    /// A NetworkPolicy in the fake pods' namespace whose peer is every
    /// pod of every namespace: every agent then keeps every remote pod
    /// (its peer set is counted on one agent at each size).
    #[arg(long)]
    pub policy: bool,
    /// With `--policy`: at each size, this many real pods started on the
    /// lab's node1 (one a second, during the churn when there is one), and
    /// the time from their start until node2's agent has their address in
    /// its peer set (the way: node1's Pod watch, its endpoint slice, node2's
    /// slice watch, its table).
    #[arg(long, default_value_t = 0)]
    pub probe: u32,
    /// Leave the fake objects in place at the end.
    #[arg(long)]
    pub no_cleanup: bool,
    /// No lab: the tables and the chart of a run's JSON again (with
    /// `--baseline`, beside another run's).
    #[arg(long)]
    pub replot: Option<PathBuf>,
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
