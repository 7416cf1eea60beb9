//! `ipam-sim`: one simulated node for the IPAM concurrency test.
//!
//! Runs the real allocator on the real Kubernetes store, as the agent does,
//! and plays kubelet: creates a Pod object, asks for its address, holds it a
//! moment, releases it, deletes the Pod; `--concurrency` at a time,
//! `--pods` in all. Each address it is told it holds is printed as
//! `<t> + <handle> <ip>` *after* the allocation returned and
//! `<t> - <handle> <ip>` *before* the release is sent (`<t>`: the
//! machine-wide monotonic clock), so the test's ledger of who holds what,
//! merged from all nodes in time order, is never behind the datastore. SIGTERM finishes the pods in flight and
//! exits 0; SIGKILL (the test's point) leaves whatever it leaves.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use margay_api::ipam::{AllowedUse, PodRef};
use margay_ipam::k8s::KubeStore;
use margay_ipam::{Allocator, Assign, Options};
use margay_task::Owned;
use tokio::sync::Notify;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    kubeconfig: PathBuf,
    #[arg(long)]
    node: String,
    /// Distinguishes this run's handles from a killed predecessor's.
    #[arg(long)]
    incarnation: u32,
    #[arg(long, default_value_t = 300)]
    pods: u64,
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    #[arg(long, default_value = "default")]
    namespace: String,
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "none"}]
        }
    }))
    .expect("pod literal")
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
/// machine, so the test can merge the output of all simulated nodes in the
/// order things happened.
fn stamp() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, margay_ipam::Error>>,
{
    for _ in 0..100 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => anyhow::bail!("{what}: {e}"),
        }
    }
    anyhow::bail!("{what}: still failing after 100 tries")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let client = margay_harness::kube::client_from(&args.kubeconfig).await?;
    // The node's store as the agent makes it: pools, settings, its labels
    // and the blocks (the allocator's view) from watches.
    let (store, watches) = KubeStore::watched(client.clone(), &args.node, Arc::new(Notify::new()));
    let _watches = Owned::spawn(watches);
    let alloc = Allocator::start(Arc::new(store), &args.node, Options::default());
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let _sigterm = {
        let stop = stop.clone();
        Owned::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            term.recv().await;
            stop.store(true, Ordering::SeqCst);
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency {
        let (alloc, pods, stop, next) = (alloc.clone(), pods.clone(), stop.clone(), next.clone());
        let (node, inc, total, ns) = (
            args.node.clone(),
            args.incarnation,
            args.pods,
            args.namespace.clone(),
        );
        workers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(u64::from(inc) * 1000 + w as u64);
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let id = next.fetch_add(1, Ordering::SeqCst);
                if id >= total {
                    break;
                }
                let name = format!("{node}-{inc}-{id}");
                let handle = format!("{name}.eth0");
                let created = pods.create(&PostParams::default(), &pod(&name)).await?;
                let uid = created.metadata.uid.clone().unwrap_or_default();
                let req = Assign {
                    handle: handle.clone(),
                    pod: Some(PodRef {
                        namespace: ns.clone(),
                        name: name.clone(),
                        uid,
                    }),
                    use_: AllowedUse::Workload,
                };
                // Like kubelet after CNI "try again": retry transient errors.
                let mut answer = alloc.assign(req.clone()).await;
                for _ in 0..20 {
                    match &answer {
                        Err(e) if e.is_transient() => {
                            println!("{} ~ {handle} {e}", stamp());
                            answer = alloc.assign(req.clone()).await;
                        }
                        _ => break,
                    }
                }
                match answer {
                    Ok(nets) => {
                        let ips: Vec<String> = nets.iter().map(|n| n.ip().to_string()).collect();
                        println!("{} + {handle} {}", stamp(), ips.join(" "));
                        tokio::time::sleep(Duration::from_millis(rng.u64(0..30))).await;
                        println!("{} - {handle} {}", stamp(), ips.join(" "));
                    }
                    Err(e) => println!("{} ! {handle} {e}", stamp()),
                }
                retry("release", || alloc.release(&handle)).await?;
                pods.delete(&name, &DeleteParams::default()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(w) = workers.join_next().await {
        w??;
    }
    let st = alloc.stats();
    println!(
        "{} stats batches={} ops={} writes={} conflicts={} busy={}",
        stamp(),
        st.batches,
        st.ops,
        st.writes,
        st.conflicts,
        st.busy
    );
    println!("done");
    Ok(())
}
