//! IPAM against a real etcd + kube-apiserver: separate node processes
//! allocating concurrently while being killed, a conflict storm on one
//! block, pool exhaustion, node deletion and leak collection.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use margay_api::ipam::{AllowedUse, IPAMConfigurationSpec, IPPool, PodRef};
use margay_harness::process::Daemon;
use margay_ipam::gc::{Janitor, LeakReason};
use margay_ipam::k8s::KubeStore;
use margay_ipam::{Allocator, Assign, Error, Options, Store};
use margay_tests::{add_pool, cluster};

fn fast_gc() -> IPAMConfigurationSpec {
    IPAMConfigurationSpec {
        empty_block_grace_seconds: 0,
        leak_grace_seconds: 0,
        ..Default::default()
    }
}

async fn allocations(client: &kube::Client) -> usize {
    margay_tests::allocations(client).await.len()
}

const KILLS: usize = 6;

/// One `ipam-sim` process and how far its output has been read.
struct Sim {
    node: usize,
    daemon: Daemon,
    log: PathBuf,
    offset: u64,
    partial: String,
    killed: bool,
}

impl Sim {
    fn start(dir: &Path, kubeconfig: &Path, node: usize, inc: u32, pods: u64) -> Self {
        let log = dir.join(format!("sim-n{node}-{inc}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipam-sim"));
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node", &format!("n{node}")])
            .args(["--incarnation", &inc.to_string()])
            .args(["--pods", &pods.to_string()])
            .args(["--concurrency", "20"]);
        let daemon = Daemon::spawn(&format!("ipam-sim n{node}/{inc}"), cmd, &log).expect("spawn");
        Self {
            node,
            daemon,
            log,
            offset: 0,
            partial: String::new(),
            killed: false,
        }
    }

    /// Complete new lines of output.
    fn lines(&mut self) -> Vec<String> {
        let mut f = std::fs::File::open(&self.log).expect("log");
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = String::new();
        let n = f.read_to_string(&mut buf).unwrap();
        self.offset += n as u64;
        self.partial.push_str(&buf);
        let mut out: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = out.pop().unwrap_or_default();
        out
    }
}

/// How long after its stamp a line is surely in its log file.
const SETTLE_NS: u128 = 500_000_000;

fn now_ns() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

/// Who holds which address, as the simulated nodes were told.
#[derive(Default)]
struct Ledger {
    holder: HashMap<String, String>,
    handed_out: usize,
    refused: usize,
    conflicts: u64,
    retried: usize,
    queued: Vec<(u128, String, String)>,
}

impl Ledger {
    fn queue(&mut self, who: &str, line: &str) {
        if let Some((t, rest)) = line.split_once(' ')
            && let Ok(t) = t.parse::<u128>()
        {
            self.queued.push((t, who.to_string(), rest.to_string()));
        }
    }

    fn apply_until(&mut self, watermark: u128) {
        self.queued.sort_by_key(|(t, _, _)| *t);
        let n = self.queued.partition_point(|(t, _, _)| *t <= watermark);
        let ready: Vec<_> = self.queued.drain(..n).collect();
        for (_, who, line) in ready {
            self.apply(&who, &line);
        }
    }

    fn apply(&mut self, who: &str, line: &str) {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("+") => {
                let handle = parts.next().expect("handle").to_string();
                for ip in parts {
                    if let Some(other) = self.holder.insert(ip.to_string(), handle.clone()) {
                        assert_eq!(
                            other, handle,
                            "DUPLICATE: {ip} handed to {handle} ({who}) while {other} holds it"
                        );
                    }
                    self.handed_out += 1;
                }
            }
            Some("-") => {
                let handle = parts.next().expect("handle");
                for ip in parts {
                    if self.holder.get(ip).map(String::as_str) == Some(handle) {
                        self.holder.remove(ip);
                    }
                }
            }
            Some("stats") => {
                for kv in parts {
                    if let Some(("conflicts", n)) = kv.split_once('=') {
                        self.conflicts += n.parse::<u64>().unwrap();
                    }
                }
            }
            Some("~") => self.retried += 1,
            Some("!") => {
                self.refused += 1;
                // Only exhaustion may refuse an address; transient errors
                // are retried (as kubelet retries "try again") and must
                // resolve within 20 retries.
                assert!(line.contains("no free"), "{who}: {line}");
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_sigkill_never_share_an_address_and_gc_leaves_no_leak() {
    let (api, client) = cluster(
        &["n0", "n1", "n2", "reserve"],
        "10.50.0.0/24",
        28,
        IPAMConfigurationSpec {
            max_blocks_per_node: 1,
            ..fast_gc()
        },
    )
    .await;
    // One block of 16 per node is not enough for 20 pods at a time: every
    // node borrows, and the only other block is one /24 of a fourth node,
    // so three processes write to one object all the time.
    add_pool(&client, "shared", "10.51.0.0/24", Some(24)).await;
    let store = Arc::new(KubeStore::new(client.clone(), Duration::from_secs(1)));
    store
        .create_block(&margay_ipam::Block::new(
            "10.51.0.0/24".parse().unwrap(),
            "shared",
            "reserve",
        ))
        .await
        .expect("shared block");
    let dir = margay_harness::names::temp_dir("ipam-sim").expect("dir");
    let per_incarnation = 700;
    let mut inc = 0u32;
    let mut sims: Vec<Sim> = (0..3)
        .map(|n| {
            inc += 1;
            Sim::start(dir.path(), api.kubeconfig(), n, inc, per_incarnation)
        })
        .collect();
    let mut ledger = Ledger::default();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(1500);
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        assert!(Instant::now() < deadline, "simulation did not finish");
        for s in &mut sims {
            let who = format!("n{}", s.node);
            for line in s.lines() {
                ledger.queue(&who, &line);
            }
        }
        // Lines stamped a while ago are surely all written by now: apply
        // them in time order across every node's output.
        ledger.apply_until(now_ns().saturating_sub(SETTLE_NS));
        if kills < KILLS && Instant::now() >= next_kill {
            let live: Vec<usize> = (0..sims.len())
                .filter(|&i| !sims[i].killed && sims[i].daemon.is_running())
                .collect();
            if let Some(&i) = live.get(rng.usize(0..live.len().max(1))) {
                sims[i].daemon.kill9();
                sims[i].killed = true;
                kills += 1;
                // Read what it printed before dying, then restart the node.
                let node = sims[i].node;
                for line in sims[i].lines() {
                    ledger.queue(&format!("n{node}"), &line);
                }
                inc += 1;
                sims.push(Sim::start(
                    dir.path(),
                    api.kubeconfig(),
                    node,
                    inc,
                    per_incarnation,
                ));
            }
            next_kill = Instant::now() + Duration::from_millis(rng.u64(500..1500));
        }
        let running = sims
            .iter_mut()
            .filter(|s| !s.killed)
            .any(|s| s.daemon.is_running());
        if !running {
            break;
        }
        // Not a wait: the pace of the kill schedule above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in &mut sims {
        let who = format!("n{}", s.node);
        for line in s.lines() {
            ledger.queue(&who, &line);
        }
        if !s.killed {
            let text = std::fs::read_to_string(&s.log).unwrap();
            assert!(
                text.contains("done"),
                "{} did not finish:\n{}",
                who,
                s.daemon.log_tail(20)
            );
        }
    }
    ledger.apply_until(u128::MAX);
    eprintln!(
        "handed out {} addresses, refused {}, {} retried as busy, {} conflicts in finished runs, {} kills, {} still held by killed runs",
        ledger.handed_out,
        ledger.refused,
        ledger.retried,
        ledger.conflicts,
        kills,
        ledger.holder.len()
    );
    assert!(
        ledger.handed_out >= 1000,
        "only {} allocations",
        ledger.handed_out
    );
    assert!(kills >= 3, "only {kills} kills before the runs finished");
    assert!(
        ledger.conflicts > 0,
        "the test is meant to make writers collide"
    );

    // What killed runs left: their pods are deleted behind IPAM's back (as
    // when kubelet's DEL never came); GC must free every address.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for p in pods.list(&ListParams::default()).await.unwrap().items {
        let name = p.metadata.name.unwrap();
        pods.delete(&name, &DeleteParams::default()).await.unwrap();
    }
    let mut janitor = Janitor::new(store.clone()).with_grace(Duration::ZERO);
    let report = janitor.run_once().await.expect("gc");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let borrowed = report
        .released
        .iter()
        .filter(|l| l.block.starts_with("10-51-"))
        .count();
    eprintln!(
        "collected {} leaked addresses ({borrowed} borrowed)",
        report.released.len()
    );
    for (ip, handle) in &ledger.holder {
        assert!(
            report
                .released
                .iter()
                .any(|l| l.address.to_string() == *ip && l.handle == *handle),
            "{ip} of {handle} not collected"
        );
    }
    assert_eq!(allocations(&client).await, 0, "leaked addresses after GC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_storm_on_one_block_resolves_then_exhaustion_is_clear() {
    let nodes = ["s0", "s1", "s2", "s3", "s4"];
    let (_api, client) = cluster(&nodes, "10.60.0.0/26", 26, fast_gc()).await;
    let store = Arc::new(KubeStore::new(client.clone(), Duration::from_secs(1)));
    let allocs: Vec<Allocator> = nodes
        .iter()
        .map(|n| Allocator::start(store.clone(), n, Options::default()))
        .collect();
    let req = |h: String| Assign {
        handle: h.clone(),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: h,
            uid: String::new(),
        }),
        use_: AllowedUse::Workload,
    };
    // s0 claims the only block; everyone else must borrow from it, all at
    // once: a compare-and-swap storm on one object.
    allocs[0].assign(req("first".into())).await.unwrap();
    let mut calls = Vec::new();
    for (i, a) in allocs.iter().enumerate() {
        for j in 0..12 {
            calls.push(a.assign(req(format!("s{i}-{j}"))));
        }
    }
    let answers = futures::future::join_all(calls).await;
    let mut ips = std::collections::HashSet::new();
    for a in answers {
        let nets = a.expect("every request in the storm succeeds");
        assert!(ips.insert(nets[0].ip()), "duplicate {}", nets[0]);
    }
    assert_eq!(allocations(&client).await, 61);
    for j in 0..3 {
        allocs[1].assign(req(format!("fill{j}"))).await.unwrap();
    }
    let err = allocs[2]
        .assign(req("one-too-many".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("no free V4 address for node s2")
            && msg.contains("every block of pool(s) default is claimed")
            && msg.contains("no other block has a free address"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_node_frees_its_blocks_and_pools_print_useful_columns() {
    let (api, client) = cluster(&["d1", "d2"], "10.70.0.0/24", 29, fast_gc()).await;
    let store = Arc::new(KubeStore::new(client.clone(), Duration::from_secs(1)));
    let a = Allocator::start(store.clone(), "d1", Options::default());
    let b = Allocator::start(store.clone(), "d2", Options::default());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..10 {
        // Live pods: only the node's deletion may free these.
        let name = format!("p{i}");
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"automountServiceAccountToken": false, "containers": [{"name": "c", "image": "x"}]}
        }))
        .unwrap();
        let p = pods.create(&PostParams::default(), &p).await.unwrap();
        a.assign(Assign {
            handle: format!("{name}.eth0"),
            pod: Some(PodRef {
                namespace: "default".into(),
                name,
                uid: p.metadata.uid.unwrap(),
            }),
            use_: AllowedUse::Workload,
        })
        .await
        .unwrap();
    }
    b.assign(Assign {
        handle: "tunnel.vxlan.d2".into(),
        pod: None,
        use_: AllowedUse::Tunnel,
    })
    .await
    .unwrap();
    let blocks_of = |node: &'static str| {
        let store = store.clone();
        async move {
            store
                .list_blocks()
                .await
                .unwrap()
                .into_iter()
                .filter(|b| b.node.as_deref() == Some(node))
                .count()
        }
    };
    assert_eq!(blocks_of("d1").await, 2);
    let mut janitor = Janitor::new(store.clone()).with_grace(Duration::ZERO);
    let r = janitor.run_once().await.unwrap();
    assert!(r.released.is_empty(), "nothing is leaked yet: {r:?}");

    let nodes: Api<Node> = Api::all(client.clone());
    nodes.delete("d1", &DeleteParams::default()).await.unwrap();
    let r = janitor.run_once().await.unwrap();
    assert_eq!(r.released.len(), 10, "{r:?}");
    assert!(r.released.iter().all(|l| l.reason == LeakReason::NodeGone));
    assert_eq!(r.blocks_deleted.len(), 2, "{r:?}");
    assert_eq!(blocks_of("d1").await, 0);
    assert_eq!(allocations(&client).await, 1, "d2's tunnel address stays");

    let out = api
        .kubectl()
        .unwrap()
        .args(["get", "ippools,ipamblocks"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    margay_tests::assert_ran(&out, "");
    for col in [
        "CIDR",
        "BLOCK",
        "ENCAP",
        "NAT",
        "DISABLED",
        "10.70.0.0/24",
        "NODE",
        "d2",
    ] {
        assert!(text.contains(col), "{col} missing in:\n{text}");
    }
}

fn ready(p: &IPPool) -> (String, String, String) {
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_status_reports_problems_and_deletion_waits_for_the_last_address() {
    let (_api, client) = cluster(&["k1"], "10.80.0.0/24", 26, fast_gc()).await;
    let pools: Api<IPPool> = Api::all(client.clone());
    add_pool(&client, "overlapping", "10.80.0.128/25", Some(26)).await;
    add_pool(&client, "tiny-blocks", "10.81.0.0/16", Some(19)).await;

    let store = Arc::new(KubeStore::new(client.clone(), Duration::ZERO));
    let a = Allocator::start(store.clone(), "k1", Options::default());
    let req = |h: &str| Assign {
        handle: h.into(),
        pod: None,
        use_: AllowedUse::Workload,
    };
    a.assign(req("one")).await.unwrap();
    margay_ipam::k8s::pools::reconcile(&client).await.unwrap();
    let p = pools.get("default").await.unwrap();
    assert_eq!(ready(&p).0, "True");
    assert_eq!(p.status.as_ref().unwrap().allocated, 1);
    // /24 in /26 blocks: one claimed, room for three more nodes.
    assert_eq!(p.status.as_ref().unwrap().free_blocks, 3);
    let room = p
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "NodeCapacity");
    assert!(
        room.is_some_and(|c| c.status == "True" && c.message.contains("room for 3 more nodes")),
        "{room:?}"
    );
    assert!(p.finalizers().contains(&"margay.dev/ipam".to_string()));
    let (st, reason, msg) = ready(&pools.get("overlapping").await.unwrap());
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("False", "Overlaps"),
        "{msg}"
    );
    assert!(msg.contains("overlaps pool default"), "{msg}");
    let (_, reason, msg) = ready(&pools.get("tiny-blocks").await.unwrap());
    assert_eq!(reason, "InvalidBlockSize", "{msg}");

    // Deleting the pool in use: it stays, says why, hands out nothing new.
    pools
        .delete("default", &DeleteParams::default())
        .await
        .unwrap();
    margay_ipam::k8s::pools::reconcile(&client).await.unwrap();
    let p = pools.get("default").await.unwrap();
    let (st, reason, msg) = ready(&p);
    assert_eq!((st.as_str(), reason.as_str()), ("False", "Terminating"));
    assert!(msg.contains("1 address(es)"), "{msg}");
    let err = a.assign(req("two")).await.unwrap_err();
    assert!(matches!(err, Error::NoPool { .. }), "{err}");
    // The last address goes, then the pool and its blocks.
    a.release("one").await.unwrap();
    margay_ipam::k8s::pools::reconcile(&client).await.unwrap();
    assert!(pools.get_opt("default").await.unwrap().is_none());
    assert!(store.list_blocks().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_edited_under_live_addresses_hands_out_no_duplicate() {
    let strict = IPAMConfigurationSpec {
        strict_affinity: true,
        ..fast_gc()
    };
    let (_api, client) = cluster(&["e1", "e2"], "10.82.0.0/25", 26, strict).await;
    let pools: Api<IPPool> = Api::all(client.clone());
    let req = |h: &str| Assign {
        handle: h.into(),
        pod: None,
        use_: AllowedUse::Workload,
    };
    // e1 claims a /26 and fills part of it.
    let s1 = Arc::new(KubeStore::new(client.clone(), Duration::ZERO));
    let a1 = Allocator::start(s1.clone(), "e1", Options::default());
    let mut held = Vec::new();
    for i in 0..10 {
        held.extend(a1.assign(req(&format!("e1-{i}"))).await.unwrap());
    }
    // The operator edits blockSize to 28 while those addresses live.
    let block_size = |size: u8| {
        let pools = pools.clone();
        async move {
            let mut p = pools.get("default").await.unwrap();
            p.spec.block_size = Some(size);
            let pp = PostParams::default();
            pools.replace("default", &pp, &p).await.unwrap();
        }
    };
    block_size(28).await;
    // e2 needs a block: none of the new shape may be claimed over e1's.
    let s2 = Arc::new(KubeStore::new(client.clone(), Duration::ZERO));
    let a2 = Allocator::start(s2.clone(), "e2", Options::default());
    let err = a2.assign(req("e2-0")).await.unwrap_err().to_string();
    assert!(err.contains("blockSize was changed"), "{err}");
    assert!(err.contains("create a new pool"), "{err}");
    let blocks = s2.list_blocks().await.unwrap();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    // The pool says why and how to fix it; its addresses are counted.
    margay_ipam::k8s::pools::reconcile(&client).await.unwrap();
    let p = pools.get("default").await.unwrap();
    let (st, reason, msg) = ready(&p);
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("False", "ShapeChanged"),
        "{msg}"
    );
    assert!(msg.contains("10 address(es) in use"), "{msg}");
    assert_eq!(p.status.as_ref().unwrap().allocated, 10);
    // Reverting the edit: claims work again, without overlap.
    block_size(26).await;
    let got = a2.assign(req("e2-1")).await.unwrap();
    assert!(
        !held.contains(&got[0]),
        "{got:?} duplicates one of {held:?}"
    );
    let blocks = s2.list_blocks().await.unwrap();
    assert_eq!(blocks.len(), 2);
    assert!(!margay_ipam::model::overlaps(
        &blocks[0].cidr,
        &blocks[1].cidr
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_static_pod_keeps_its_address() {
    let (_api, client) = cluster(&["s1"], "10.83.0.0/24", 26, fast_gc()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // A static pod's mirror: its own UID is the apiserver's, the kubelet
    // gives its sandboxes the static pod's (the config hash).
    for (name, mirror) in [("etcd-s1", Some("0c0ffee5")), ("web", None)] {
        let mut meta = serde_json::json!({"name": name});
        if let Some(h) = mirror {
            meta["annotations"] = serde_json::json!({"kubernetes.io/config.mirror": h});
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": meta,
            "spec": {"nodeName": "s1", "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let store = Arc::new(KubeStore::new(client.clone(), Duration::ZERO));
    let a = Allocator::start(store.clone(), "s1", Options::default());
    let pod = |name: &str, uid: &str| Assign {
        handle: format!("h-{name}"),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
        }),
        use_: AllowedUse::Workload,
    };
    a.assign(pod("etcd-s1", "0c0ffee5")).await.unwrap();
    // The same name, but recorded for a sandbox of an older pod: leaked.
    a.assign(pod("web", "an-older-uid")).await.unwrap();
    let mut janitor = Janitor::new(store.clone()).with_grace(Duration::ZERO);
    let r = janitor.run_once().await.unwrap();
    let released: Vec<&str> = r.released.iter().map(|l| l.handle.as_str()).collect();
    assert_eq!(released, vec!["h-web"], "{r:?}");
    assert_eq!(r.released[0].reason, LeakReason::PodReplaced);
    let r = janitor.run_once().await.unwrap();
    assert!(r.released.is_empty(), "{r:?}");
    assert_eq!(
        allocations(&client).await,
        1,
        "the static pod's address stays"
    );
}
