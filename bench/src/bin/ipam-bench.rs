//! IPAM benchmark: Margay's allocator on a real kube-apiserver next to
//! Debian's `host-local` IPAM plugin (local files), same machine, same run.
//!
//! For each: N allocations one after another, then N with 100 in flight;
//! allocations per second and the speed ratio. Margay is driven the way the
//! agent drives it (one allocator per node, each ADD an `assign` call);
//! host-local the way a CNI runtime drives it (one exec per ADD, its file
//! lock serialising concurrent calls). Every address is released between
//! runs so both start empty. Output is a Markdown table for BENCHMARKS.md.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use margay_api::ipam::{AllowedUse, IPPool, IPPoolSpec, PodRef};
use margay_harness::kube::ApiServer;
use margay_harness::names;
use margay_ipam::k8s::KubeStore;
use margay_ipam::{Allocator, Assign, Options};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Parser)]
#[command(about = "Margay IPAM vs host-local")]
struct Cli {
    /// Allocations per measurement.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Requests in flight for the burst measurement.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
}

async fn host_local(dir: &Path, cmd: &str, id: usize) -> anyhow::Result<()> {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.90.0.0/16"}]],
            "dataDir": dir.join("data"),
        }
    });
    let mut child =
        tokio::process::Command::new(margay_harness::paths::cni_plugin_dir().join("host-local"))
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", format!("c{id}"))
            .env("CNI_NETNS", "/var/run/netns/none")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", margay_harness::paths::cni_plugin_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("host-local")?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(conf.to_string().as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("host-local {cmd}: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// Runs `n` calls of `f` with at most `conc` in flight; returns the wall
/// time.
async fn run<F, Fut>(n: usize, conc: usize, f: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::StreamExt;
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(&f)
        .buffer_unordered(conc)
        .collect()
        .await;
    let took = start.elapsed();
    for r in results {
        r?;
    }
    Ok(took)
}

fn req(i: usize) -> Assign {
    Assign {
        handle: format!("c{i}.eth0"),
        pod: Some(PodRef {
            namespace: "bench".into(),
            name: format!("p{i}"),
            uid: format!("u{i}"),
        }),
        use_: AllowedUse::Workload,
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Assign,
    Release,
}

/// Assigns or releases handles `c0..c<n>` with `conc` in flight.
async fn margay(alloc: &Allocator, op: Op, n: usize, conc: usize) -> anyhow::Result<Duration> {
    run(n, conc, |i| {
        let a = alloc.clone();
        async move {
            match op {
                Op::Assign => a.assign(req(i)).await.map(|_| ()),
                Op::Release => a.release(&format!("c{i}.eth0")).await.map(|_| ()),
            }
            .map_err(Into::into)
        }
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let n = cli.count;
    let api = ApiServer::start().await?;
    let client = api.client().await?;
    margay_harness::kube::crds::install(&client).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "bench"}}))?,
        )
        .await?;
    let pools: Api<IPPool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &IPPool::new("default", IPPoolSpec::with_cidr("10.80.0.0/16", None)),
        )
        .await?;
    let store = Arc::new(KubeStore::new(client, Duration::from_secs(5)));
    let alloc = Allocator::start(store, "bench", Options::default());
    // Claim blocks once so both sides start warm: the first run's block
    // claims are part of Margay's cost only once per node lifetime.
    let warm = margay(&alloc, Op::Assign, n, cli.concurrency).await?;
    margay(&alloc, Op::Release, n, cli.concurrency).await?;
    eprintln!("warm-up (block claims included): {n} in {warm:?}");

    let dir = names::temp_dir("ipam-bench")?;
    let mut rows = Vec::new();
    for (label, conc) in [("sequential", 1), ("burst", cli.concurrency)] {
        let before = alloc.stats();
        let m = margay(&alloc, Op::Assign, n, conc).await?;
        let after = alloc.stats();
        margay(&alloc, Op::Release, n, cli.concurrency).await?;
        let d = dir.path().to_path_buf();
        let h = run(n, conc, |i| {
            let d = d.clone();
            async move { host_local(&d, "ADD", i).await }
        })
        .await?;
        run(n, cli.concurrency, |i| {
            let d = d.clone();
            async move { host_local(&d, "DEL", i).await }
        })
        .await?;
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        rows.push(format!(
            "| {label} ({conc} in flight) | {n} | {:.0}/s ({} block writes) | {:.0}/s | {:.2} |",
            rate(m),
            after.writes - before.writes,
            rate(h),
            rate(m) / rate(h)
        ));
    }
    println!(
        "| allocations | count | margay (kube-apiserver) | host-local (files) | margay / host-local |"
    );
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
