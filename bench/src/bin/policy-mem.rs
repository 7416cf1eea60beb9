//! What a remote pod costs the policy engine in memory: live heap bytes
//! per pod of another node, with a policy whose peer is every pod (issue
//! 27: an agent's RSS grows by at most 200 bytes per remote pod, its peer
//! set holding every pod). No cluster, no kernel: the agent's own
//! `Engine` (`margay_netpol`, the agent's policy engine) fed as its loop feeds it.
//!
//! - The engine of `node0`, everything listed: namespace `scale`, one
//!   pod of `node0` there (wired), one NetworkPolicy there (`podSelector: {}`, ingress from
//!   `namespaceSelector: {}`), the table loaded; remote pods turned on.
//! - N remote pods arrive as the endpoint slice watch's list (`Init`, an
//!   `InitApply` per slice, `InitDone`): the scale bench's fake cluster
//!   (`scale/fake.rs`: 30 pods a node, 64 endpoints a slice, labels
//!   `app`, `margay.dev/scale-bench`, `margay.dev/scale-node`, one
//!   address, named port `http/TCP/80`); the load is taken and reported
//!   loaded, as the loop does.
//! - Memory is counted by this binary's global allocator: live bytes
//!   asked for (after minus before, over N), the allocations still live,
//!   and what glibc's malloc would hold for them (each chunk its size plus
//!   8, rounded up to 16, at least 32: the agent runs on glibc's malloc,
//!   and RSS is what the scale bench measures). Slices are made one at a
//!   time and dropped once fed: what stays is the engine's.
//! - The time is the engine's alone (events, the load taken), not the
//!   making of the slices.
//!
//! Output: a Markdown table for BENCHMARKS.md.

// A global allocator is an `unsafe impl`: it only counts, then calls the
// system's.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use margay_netpol::{Endpoint, Engine, Event, Load};

#[allow(dead_code)]
#[path = "scale/fake.rs"]
mod fake;

/// Counts live bytes and allocations, and glibc's chunks for them.
struct Counting;

static BYTES: AtomicI64 = AtomicI64::new(0);
static CHUNKS: AtomicI64 = AtomicI64::new(0);
static ALLOCS: AtomicI64 = AtomicI64::new(0);

/// What glibc's malloc holds for `size` bytes on 64 bits.
fn chunk(size: usize) -> i64 {
    (((size + 8 + 15) & !15).max(32)) as i64
}

fn count(size: usize, sign: i64) {
    BYTES.fetch_add(sign * size as i64, Relaxed);
    CHUNKS.fetch_add(sign * chunk(size), Relaxed);
    ALLOCS.fetch_add(sign, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size(), 1);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size(), 1);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(l.size(), -1);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(l.size(), -1);
        count(new, 1);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Live bytes, glibc chunk bytes, allocations.
fn live() -> [i64; 3] {
    [
        BYTES.load(Relaxed),
        CHUNKS.load(Relaxed),
        ALLOCS.load(Relaxed),
    ]
}

#[derive(Debug, Parser)]
#[command(about = "Policy engine: live heap per remote pod (slices in, peer set of every pod)")]
struct Cli {
    /// Remote pods, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000,100000")]
    pods: Vec<u32>,
    /// Pods per fake node.
    #[arg(long, default_value_t = 30)]
    pods_per_node: u32,
}

/// One run's figures.
struct Row {
    pods: u32,
    per_pod: [f64; 3],
    ingest: Duration,
    in_set: u64,
    in_load: u64,
}

fn policy() -> net::NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "scale", "name": "from-every-pod"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}
    }))
    .expect("a valid NetworkPolicy")
}

fn namespace() -> core::Namespace {
    serde_json::from_value(serde_json::json!({"metadata": {"name": "scale"}}))
        .expect("a valid Namespace")
}

/// The one pod of `node0`, which the policy selects (so it is compiled
/// here).
fn local_pod() -> core::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "scale", "name": "local", "labels": {"app": "local"}},
        "spec": {"nodeName": "node0", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"}
    }))
    .expect("a valid Pod")
}

/// The engine of `node0` with everything listed and loaded, remote pods
/// on.
fn engine() -> Engine {
    let mut e = Engine::on_node("node0");
    e.pod_event(Event::Init);
    e.pod_event(Event::InitApply(local_pod()));
    e.pod_event(Event::InitDone);
    e.namespace_event(Event::Init);
    e.namespace_event(Event::InitApply(namespace()));
    e.namespace_event(Event::InitDone);
    e.policy_event(Event::Init);
    e.policy_event(Event::InitApply(policy()));
    e.policy_event(Event::InitDone);
    e.endpoint_added(Endpoint {
        host_if: "cali0".into(),
        pod: Some(margay_policy::PodKey::new("scale", "local")),
        ips: vec![[10, 0, 0, 1].into()],
    });
    let _ = e.take_load();
    e.loaded(true);
    assert!(e.needs_remote_pods(), "the policy has a pod peer");
    e.remote_pods(true);
    e
}

fn run(cli: &Cli, n: u32) -> anyhow::Result<Row> {
    let g = fake::Gen {
        pods_per_node: cli.pods_per_node,
        namespace: "scale".into(),
        asn: 64512,
    };
    let nodes = n.div_ceil(cli.pods_per_node);
    g.check(nodes)?;
    let mut e = engine();
    let before = live();
    let mut ingest = Duration::ZERO;
    let timed = |e: &mut Engine, ingest: &mut Duration, ev| {
        let t = Instant::now();
        e.slice_event(ev);
        *ingest += t.elapsed();
    };
    timed(&mut e, &mut ingest, Event::Init);
    let mut left = n as usize;
    for i in 0..nodes {
        for mut s in g.slices(i, "uid")? {
            s.spec.endpoints.truncate(left);
            left -= s.spec.endpoints.len();
            if !s.spec.endpoints.is_empty() {
                timed(&mut e, &mut ingest, Event::InitApply(s));
            }
        }
    }
    timed(&mut e, &mut ingest, Event::InitDone);
    let t = Instant::now();
    let load = e.take_load();
    e.loaded(true);
    ingest += t.elapsed();
    let in_load = match &load {
        Some(Load::Batch(b)) => fake::pod_addresses_in(&b.script()),
        Some(Load::Script(s)) => fake::pod_addresses_in(s),
        None => 0,
    };
    drop(load);
    let in_set = e
        .compiler()
        .table()
        .sets
        .iter()
        .filter(|(name, _)| name.starts_with("peer/"))
        .map(|(_, s)| {
            let local = std::net::IpAddr::from([10, 0, 0, 1]);
            s.elements
                .iter()
                .filter(|el| el.addr() != Some(local))
                .count() as u64
        })
        .max()
        .unwrap_or(0);
    let after = live();
    let per_pod = [0, 1, 2].map(|i| (after[i] - before[i]) as f64 / f64::from(n));
    drop(e);
    Ok(Row {
        pods: n,
        per_pod,
        ingest,
        in_set,
        in_load,
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rows = Vec::new();
    for &n in &cli.pods {
        let r = run(&cli, n)?;
        anyhow::ensure!(
            r.in_set == u64::from(n) && r.in_load == u64::from(n),
            "{n} remote pods: the peer set holds {}, the load {}",
            r.in_set,
            r.in_load
        );
        eprintln!(
            "{n} remote pods: {:.0} B/pod live, {:.0} B/pod in glibc chunks, {:.2} allocations/pod, {:?}",
            r.per_pod[0], r.per_pod[1], r.per_pod[2], r.ingest
        );
        rows.push(r);
    }
    println!(
        "| remote pods | heap bytes / pod (asked) | heap bytes / pod (glibc chunks) | live allocations / pod | ingest (list + load) | peer set / load hold |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} ms | {} / {} |",
            r.pods,
            r.per_pod[0],
            r.per_pod[1],
            r.per_pod[2],
            r.ingest.as_secs_f64() * 1e3,
            r.in_set,
            r.in_load
        );
    }
    Ok(())
}
