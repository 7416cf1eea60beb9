//! Property test of the allocator over the in-memory store: random bursts
//! of assigns and releases on three nodes, with random faults injected into
//! a tenth of all writes (conflicts, unavailability, applied writes whose
//! answer is lost), empty-block maintenance and leak collection running in
//! between; once with views listed when needed, once with views kept by
//! watches that lag, break and start over. After every step the store must hold exactly the addresses the
//! callers were told they hold: never one address for two handles, never
//! an allocation nobody holds, never a held address missing.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use margay_api::ipam::{AllowedUse, IPAMConfigurationSpec, IPPool, IPPoolSpec, PodRef};
use margay_ipam::gc::Janitor;
use margay_ipam::{Allocator, Assign, Error, MemStore, Options};

fn pool(name: &str, cidr: &str, size: u8) -> IPPool {
    IPPool::new(name, IPPoolSpec::with_cidr(cidr, Some(size)))
}

const NODES: [&str; 3] = ["n0", "n1", "n2"];

struct World {
    store: Arc<MemStore>,
    allocs: Vec<Allocator>,
    /// address -> handle, as told to callers.
    ledger: HashMap<IpAddr, String>,
    /// handle -> (node index, addresses).
    held: BTreeMap<String, (usize, Vec<IpAddr>)>,
}

impl World {
    fn record(&mut self, handle: &str, node: usize, ips: Vec<IpAddr>) {
        if let Some((_, prev)) = self.held.get(handle) {
            assert_eq!(prev, &ips, "asking again must return the same addresses");
            return;
        }
        for ip in &ips {
            if let Some(other) = self.ledger.insert(*ip, handle.to_string()) {
                panic!("{ip} handed to {handle} while {other} holds it");
            }
        }
        self.held.insert(handle.to_string(), (node, ips));
    }

    fn forget(&mut self, handle: &str) {
        if let Some((_, ips)) = self.held.remove(handle) {
            for ip in ips {
                self.ledger.remove(&ip);
            }
        }
    }

    fn check(&self, max_blocks: u32) {
        let blocks = self.store.snapshot();
        let mut in_store: HashMap<IpAddr, String> = HashMap::new();
        let mut per_node: HashMap<(String, bool), u32> = HashMap::new();
        for b in &blocks {
            if let Some(n) = &b.node {
                *per_node.entry((n.clone(), b.cidr.is_ipv4())).or_default() += 1;
            }
            for (ip, a) in &b.allocations {
                assert!(b.cidr.contains(*ip));
                assert!(in_store.insert(*ip, a.handle.clone()).is_none());
            }
        }
        assert_eq!(in_store, self.ledger, "store and callers disagree");
        for (k, n) in per_node {
            assert!(n <= max_blocks, "{k:?} has {n} blocks");
        }
    }
}

async fn release_until_done(a: &Allocator, handle: &str) {
    for _ in 0..50 {
        match a.release(handle).await {
            Ok(_) => return,
            Err(e) if e.is_transient() => continue,
            Err(e) => panic!("release {handle}: {e}"),
        }
    }
    panic!("release {handle} never succeeded");
}

/// How the allocators see the blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Views {
    /// Listed when needed.
    Listed,
    /// Followed by watches that lag (changes held back and let go at
    /// random), break (stale) and start over (a new list).
    Watched,
}

async fn scenario(seed: u64, steps: usize, views: Views) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lag = fastrand::Rng::with_seed(seed ^ 0xfeed);
    let store = Arc::new(MemStore::new());
    if views == Views::Watched {
        store.enable_feed();
    }
    store.set_pools(vec![
        pool("v4", "10.0.0.0/25", 28),
        pool("v6", "fd00::/120", 124),
    ]);
    let max_blocks = 3;
    store.set_config(IPAMConfigurationSpec {
        strict_affinity: false,
        max_blocks_per_node: max_blocks,
        empty_block_grace_seconds: 0,
        leak_grace_seconds: 0,
    });
    for n in NODES {
        store.add_node(n, BTreeMap::new());
    }
    store.random_faults(seed, 10);
    let opts = Options {
        maintenance_every: Duration::from_secs(3600),
        ..Options::default()
    };
    let allocs = NODES
        .iter()
        .map(|n| Allocator::start(store.clone(), n, opts.clone()))
        .collect();
    let mut w = World {
        store: store.clone(),
        allocs,
        ledger: HashMap::new(),
        held: BTreeMap::new(),
    };
    let mut next = 0u64;
    for _ in 0..steps {
        if views == Views::Watched {
            match lag.u32(0..100) {
                0..=14 => store.hold_feed(true),
                15..=34 => store.release_feed(lag.usize(0..6)),
                35..=44 => store.hold_feed(false),
                45..=47 => store.relist_feed(),
                48..=52 => store.set_feed_stale(Some("injected")),
                53..=60 => store.set_feed_stale(None),
                _ => {}
            }
        }
        match rng.u32(0..100) {
            // A burst of new pods on one node.
            0..=44 => {
                let node = rng.usize(0..3);
                let n = rng.usize(1..12);
                let reqs: Vec<String> = (0..n)
                    .map(|_| {
                        next += 1;
                        format!("c{next}.eth0")
                    })
                    .collect();
                for h in &reqs {
                    store.set_pod("default", h, h);
                }
                let a = &w.allocs[node];
                let answers = futures::future::join_all(reqs.iter().map(|h| {
                    a.assign(Assign {
                        handle: h.clone(),
                        pod: Some(PodRef {
                            namespace: "default".into(),
                            name: h.clone(),
                            uid: h.clone(),
                        }),
                        use_: AllowedUse::Workload,
                    })
                }))
                .await;
                for (h, ans) in reqs.iter().zip(answers) {
                    match ans {
                        Ok(nets) => {
                            assert_eq!(nets.len(), 2, "dual stack");
                            w.record(h, node, nets.iter().map(|n| n.ip()).collect());
                        }
                        Err(e) => {
                            assert!(
                                matches!(e, Error::Exhausted { .. }) || e.is_transient(),
                                "{e}"
                            );
                            // The CNI runtime follows a failed ADD with DEL.
                            release_until_done(&w.allocs[node], h).await;
                            store.remove_pod("default", h);
                        }
                    }
                }
            }
            // Pods go away.
            45..=79 => {
                let n = rng.usize(1..10).min(w.held.len());
                for _ in 0..n {
                    let keys: Vec<String> = w.held.keys().cloned().collect();
                    let h = &keys[rng.usize(0..keys.len())];
                    let node = w.held[h].0;
                    release_until_done(&w.allocs[node], h).await;
                    store.remove_pod("default", h);
                    w.forget(h);
                }
            }
            // ADD retried for a running pod.
            80..=87 => {
                if let Some((h, (node, _))) = w.held.iter().nth(rng.usize(0..w.held.len().max(1))) {
                    let (h, node) = (h.clone(), *node);
                    let pod = PodRef {
                        namespace: "default".into(),
                        name: h.clone(),
                        uid: h.clone(),
                    };
                    let ans = w.allocs[node]
                        .assign(Assign {
                            handle: h.clone(),
                            pod: Some(pod),
                            use_: AllowedUse::Workload,
                        })
                        .await;
                    if let Ok(nets) = ans {
                        w.record(&h, node, nets.iter().map(|n| n.ip()).collect());
                    }
                }
            }
            // A stale DEL for a handle long gone.
            88..=91 => release_until_done(&w.allocs[rng.usize(0..3)], "c0.eth0").await,
            // Empty blocks are given back.
            92..=95 => {
                let _ = w.allocs[rng.usize(0..3)].release_empty_blocks().await;
            }
            // A pod object vanishes behind the agent's back; GC frees it.
            _ => {
                if let Some(h) = w.held.keys().next().cloned() {
                    store.remove_pod("default", &h);
                    let mut j = Janitor::new(store.clone()).with_grace(Duration::ZERO);
                    let report = j.run_once().await.expect("gc");
                    assert!(
                        report.errors.iter().all(|e| e.contains("injected")),
                        "{report:?}"
                    );
                    if report.released.iter().any(|l| l.handle == h) {
                        assert!(report.released.iter().all(|l| l.handle == h), "{report:?}");
                        w.forget(&h);
                    } else {
                        // The release hit injected faults; the pod is gone,
                        // so its address goes through the normal path.
                        let node = w.held[&h].0;
                        release_until_done(&w.allocs[node], &h).await;
                        w.forget(&h);
                    }
                }
            }
        }
        w.check(max_blocks);
    }
}

/// Runs the scenario for every seed (`MARGAY_IPAM_SEEDS`, default 40)
/// with the allocators' views kept as `views` says.
async fn every_seed(views: Views) {
    let seeds: u64 = std::env::var("MARGAY_IPAM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 1..=seeds {
        eprintln!("seed {seed}");
        scenario(seed, 250, views).await;
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn random_sequences_keep_every_invariant() {
    every_seed(Views::Listed).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn random_sequences_over_lagging_watches_keep_every_invariant() {
    every_seed(Views::Watched).await;
}
