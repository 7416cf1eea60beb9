//! The pre-assigned-address fast path over the in-memory store: a take
//! waits for no write, attributions and releases are written behind in
//! order, a restart adopts what the store holds, disabled pools stop it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use margay_api::ipam::{AllowedUse, IPAMConfigurationSpec, IPPool, IPPoolSpec, PodRef};
use margay_ipam::store::Fault;
use margay_ipam::{Allocator, Assign, Block, MemStore, Options, Reserve, ReserveOptions};

fn pool(name: &str, cidr: &str, disabled: bool) -> IPPool {
    let mut spec = IPPoolSpec::with_cidr(cidr, Some(26));
    spec.disabled = disabled;
    IPPool::new(name, spec)
}

fn store() -> Arc<MemStore> {
    let s = Arc::new(MemStore::new());
    s.set_pools(vec![pool("p", "10.0.0.0/16", false)]);
    s.set_config(IPAMConfigurationSpec::default());
    s.add_node("n1", BTreeMap::new());
    s
}

fn pod(h: &str) -> PodRef {
    PodRef {
        namespace: "default".into(),
        name: h.into(),
        uid: format!("uid-{h}"),
    }
}

fn req(h: &str) -> Assign {
    Assign {
        handle: h.into(),
        pod: Some(pod(h)),
        use_: AllowedUse::Workload,
    }
}

fn opts(depth: usize) -> ReserveOptions {
    ReserveOptions {
        depth,
        max_depth: depth,
        recheck: Duration::from_millis(100),
        ..ReserveOptions::default()
    }
}

/// handle -> addresses, from the store itself.
fn held(blocks: &[Block]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for b in blocks {
        for (ip, a) in &b.allocations {
            out.entry(a.handle.clone()).or_default().push(*ip);
        }
    }
    out
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A fresh store with n1's allocator and reserve (`o`), once that holds
/// its `o.depth` spares.
async fn filled(o: ReserveOptions) -> (Arc<MemStore>, Allocator, Reserve) {
    let s = store();
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let depth = o.depth;
    let r = Reserve::start(a.clone(), "n1", o).await.unwrap();
    until(&format!("{depth} spares"), || r.stats().spares == depth).await;
    (s, a, r)
}

#[tokio::test]
async fn a_take_waits_for_no_write_and_the_attribution_is_written_behind() {
    let (s, _a, r) = filled(opts(4)).await;
    // The store can no longer be written: takes must still answer.
    let writes = s.writes();
    // (Enough faults that the refill, retrying, cannot get through either.)
    for _ in 0..10_000 {
        s.inject(Fault::Unavailable);
    }
    let mut taken = Vec::new();
    for h in ["h0", "h1", "h2", "h3"] {
        taken.push(r.take(&req(h)).await.unwrap());
    }
    assert_eq!(s.writes(), writes, "a take wrote to the store");
    s.clear_faults();
    let addrs: HashSet<_> = taken.iter().map(|t| t.addrs[0]).collect();
    assert_eq!(addrs.len(), 4, "one address handed out twice: {taken:?}");
    // Each address is already held in the store, by a spare of n1.
    let before = held(&s.snapshot());
    for t in &taken {
        let spare = t.spare.clone().expect("from a spare");
        assert!(spare.starts_with("spare.n1."));
        assert_eq!(before[&spare], vec![t.addrs[0].ip()]);
    }
    for t in &taken {
        r.commit(t, Some(pod(&t.handle)));
    }
    r.flush().await;
    let after = s.snapshot();
    let by_handle = held(&after);
    for t in &taken {
        assert_eq!(by_handle[&t.handle], vec![t.addrs[0].ip()]);
    }
    // The pod is recorded with the allocation (the collector needs it).
    let rec = after
        .iter()
        .flat_map(|b| b.allocations.values())
        .find(|a| a.handle == "h2")
        .unwrap();
    assert_eq!(rec.pod.as_ref().unwrap().uid, "uid-h2");
    assert_eq!(r.stats().pending, 0);
    until("refilled", || r.stats().spares == 4).await;
}

#[tokio::test]
async fn one_handles_writes_stay_in_order() {
    let (s, _a, r) = filled(opts(4)).await;
    let first = r.take(&req("h")).await.unwrap();
    r.commit(&first, Some(pod("h")));
    assert_eq!(r.release("h"), first.addrs);
    let second = r.take(&req("h")).await.unwrap();
    assert_ne!(first.addrs, second.addrs);
    r.commit(&second, Some(pod("h")));
    r.flush().await;
    let by_handle = held(&s.snapshot());
    assert_eq!(by_handle["h"], vec![second.addrs[0].ip()]);
    assert!(
        !by_handle.values().any(|v| v.contains(&first.addrs[0].ip())),
        "the first address was not released: {by_handle:?}"
    );
}

#[tokio::test]
async fn an_add_retry_gets_the_same_addresses_and_abort_gives_the_spare_back() {
    let (_s, _a, r) = filled(opts(2)).await;
    let t = r.take(&req("h")).await.unwrap();
    // Retried before the rename is written, and after.
    assert_eq!(r.take(&req("h")).await.unwrap().addrs, t.addrs);
    r.commit(&t, Some(pod("h")));
    r.flush().await;
    assert_eq!(r.take(&req("h")).await.unwrap().addrs, t.addrs);

    until("2 spares", || r.stats().spares == 2).await;
    let t2 = r.take(&req("g")).await.unwrap();
    let spare = t2.spare.clone().unwrap();
    r.abort(t2.clone()).await.unwrap();
    let t3 = r.take(&req("k")).await.unwrap();
    assert_eq!(t3.spare, Some(spare));
    assert_eq!(t3.addrs, t2.addrs);
}

#[tokio::test]
async fn a_restart_adopts_spares_and_pods_without_new_writes() {
    let (s, _a, r) = filled(opts(3)).await;
    let t = r.take(&req("h")).await.unwrap();
    r.commit(&t, Some(pod("h")));
    r.flush().await;
    until("3 spares", || r.stats().spares == 3).await;
    let snapshot = held(&s.snapshot());
    drop(r);

    // A new agent process: new allocator, new reserve, same store.
    let a2 = Allocator::start(s.clone(), "n1", Options::default());
    let r2 = Reserve::start(a2.clone(), "n1", opts(3)).await.unwrap();
    assert_eq!(r2.stats().spares, 3, "spares not adopted");
    let again = r2.take(&req("h")).await.unwrap();
    assert_eq!(again.addrs, t.addrs);
    assert_eq!(again.spare, None);
    let n = r2.take(&req("new")).await.unwrap();
    assert!(n.spare.is_some());
    r2.commit(&n, Some(pod("new")));
    r2.flush().await;
    // Nobody holds two addresses, no address is held twice.
    let after = held(&s.snapshot());
    let mut all: Vec<IpAddr> = after.values().flatten().copied().collect();
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), total);
    assert!(after.values().all(|v| v.len() == 1));
    assert_eq!(after["h"], snapshot["h"]);
}

#[tokio::test]
async fn a_disabled_pool_takes_its_spares_back() {
    let (s, _a, r) = filled(opts(2)).await;
    s.set_pools(vec![pool("p", "10.0.0.0/16", true)]);
    until("spares given back", || r.stats().spares == 0).await;
    r.flush().await;
    assert!(
        held(&s.snapshot()).is_empty(),
        "spares of a disabled pool still held"
    );
    let e = r.take(&req("h")).await.unwrap_err();
    assert!(matches!(e, margay_ipam::Error::NoPool { .. }), "{e}");
}

#[tokio::test]
async fn depth_zero_assigns_directly() {
    let s = store();
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let r = Reserve::start(a.clone(), "n1", opts(0)).await.unwrap();
    let t = r.take(&req("h")).await.unwrap();
    assert_eq!(t.spare, None);
    assert_eq!(held(&s.snapshot())["h"], vec![t.addrs[0].ip()]);
    r.abort(t).await.unwrap();
    assert!(held(&s.snapshot()).is_empty());
}

#[tokio::test]
async fn a_failed_retry_before_the_rename_is_written_leaks_nothing() {
    let (s, _a, r) = filled(opts(2)).await;
    let first = r.take(&req("h")).await.unwrap();
    r.commit(&first, Some(pod("h")));
    // The runtime retries ADD at once and that wiring fails.
    let retry = r.take(&req("h")).await.unwrap();
    assert_eq!(retry.addrs, first.addrs);
    r.abort(retry).await.unwrap();
    r.flush().await;
    let by_handle = held(&s.snapshot());
    assert!(!by_handle.contains_key("h"), "h still holds {by_handle:?}");
    assert!(
        !by_handle.values().any(|v| v.contains(&first.addrs[0].ip())),
        "{by_handle:?}"
    );
}

/// A pool of another family added after the spares were made: the next
/// pod gets both families at once, not a spare that misses one (the
/// rechecker is far off here, so only the check at take time can see it).
#[tokio::test]
async fn a_spare_missing_a_new_pools_family_is_not_handed_out() {
    let recheck = Duration::from_secs(3600);
    let (s, _a, r) = filled(ReserveOptions { recheck, ..opts(2) }).await;
    s.set_pools(vec![
        pool("p", "10.0.0.0/16", false),
        IPPool::new("v6", IPPoolSpec::with_cidr("fd00::/112", Some(122))),
    ]);
    let t = r.take(&req("pod-a")).await.unwrap();
    let v6 = t.addrs.iter().filter(|n| n.is_ipv6()).count();
    let v4 = t.addrs.iter().filter(|n| n.is_ipv4()).count();
    assert_eq!((v4, v6), (1, 1), "{:?}", t.addrs);
}

#[tokio::test]
async fn dropping_the_reserve_and_its_allocator_stops_every_task() {
    let (s, a, r) = filled(opts(2)).await;
    let r2 = r.clone();
    drop(r);
    // A clone still holds the tasks.
    let t = r2.take(&req("h")).await.unwrap();
    assert!(t.spare.is_some());
    until("refilled", || r2.stats().spares == 2).await;
    // The last handles gone, nothing holds the store but the test: the
    // reserve's tasks (which hold the allocator) and the allocator's task
    // (which holds the store) have ended.
    drop((r2, a));
    until("every task ended", || Arc::strong_count(&s) == 1).await;
}

/// The allocator is waiting on a write the API server does not answer
/// (a refill, here frozen): a take still hands out a spare at once, its
/// pool check answered beside the allocator, not behind the write. (On
/// the test's paused clock: no time passes for the take; it used to wait
/// out a 50 ms bound.)
#[tokio::test(start_paused = true)]
async fn a_take_does_not_wait_behind_a_write_the_api_server_holds() {
    let (s, a, r) = filled(opts(4)).await;
    s.set_write_delay(Duration::from_secs(3600));
    // A write the allocator is now waiting on.
    let stuck = margay_task::Owned::spawn({
        let a = a.clone();
        async move {
            let _ = a.assign(req("direct")).await;
        }
    });
    until("the allocator in its write", || {
        r.stats().spares == 4 && !stuck.is_finished()
    })
    .await;
    tokio::task::yield_now().await;
    for h in ["h0", "h1", "h2"] {
        let t0 = tokio::time::Instant::now();
        let t = r.take(&req(h)).await.unwrap();
        assert!(t.spare.is_some(), "{t:?}");
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the take waited for the allocator"
        );
    }
    drop(stuck);
}

/// A burst of pod starts raises the spares (twice the burst, within the
/// ceiling); once the node is quiet for the hold period they go back to
/// the floor and the surplus is released in the store.
#[tokio::test]
async fn a_burst_grows_the_spares_and_a_quiet_node_gives_them_back() {
    let o = ReserveOptions {
        depth: 2,
        max_depth: 8,
        recheck: Duration::from_millis(50),
        hold: Duration::from_millis(400),
        ..ReserveOptions::default()
    };
    let (s, _a, r) = filled(o).await;
    let mut taken = Vec::new();
    for i in 0..5 {
        taken.push(r.take(&req(&format!("p{i}"))).await.unwrap());
    }
    assert_eq!(r.stats().target, 8);
    until("8 spares", || r.stats().spares == 8).await;
    let spares_in_store = |s: &MemStore| {
        held(&s.snapshot())
            .keys()
            .filter(|h| h.starts_with("spare.n1."))
            .count()
    };
    for t in &taken {
        r.commit(t, Some(pod(&t.handle)));
    }
    r.flush().await;
    assert_eq!(spares_in_store(&s), 8);
    // Quiet: 5 -> 2 -> 1 (target 2, the floor).
    until("back to 2 spares", || r.stats().spares == 2).await;
    r.flush().await;
    assert_eq!(spares_in_store(&s), 2, "the surplus stays held");
    // The pods keep theirs; nothing was handed out twice.
    let by_handle = held(&s.snapshot());
    let mut all: Vec<IpAddr> = by_handle.values().flatten().copied().collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "{by_handle:?}");
    for t in &taken {
        assert_eq!(by_handle[&t.handle], vec![t.addrs[0].ip()]);
    }
}

/// A restarted agent keeps the spares it held (up to the ceiling): its
/// last demand is remembered for a hold period, not released at start.
#[tokio::test]
async fn a_restart_keeps_the_spares_a_burst_left() {
    let o = ReserveOptions {
        depth: 2,
        max_depth: 8,
        recheck: Duration::from_millis(50),
        hold: Duration::from_secs(3600),
        ..ReserveOptions::default()
    };
    let (s, a, r) = filled(o.clone()).await;
    for i in 0..5 {
        let t = r.take(&req(&format!("p{i}"))).await.unwrap();
        r.commit(&t, Some(pod(&t.handle)));
    }
    until("8 spares", || r.stats().spares == 8).await;
    r.flush().await;
    r.halt();
    drop((r, a));
    let writes = s.writes();
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let r = Reserve::start(a, "n1", o).await.unwrap();
    assert_eq!(r.stats().spares, 8);
    assert_eq!(r.stats().target, 8);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.writes(), writes, "the restart wrote");
}

/// Pod starts 20 ms apart (a busy node) within the coalescing window,
/// half the spares left: their attributions and the refill behind them
/// cost one write per block each, not a write or two per start. (Paused
/// clock: the window is exact.)
#[tokio::test(start_paused = true)]
async fn the_writes_behind_a_window_of_pod_starts_are_coalesced() {
    let o = ReserveOptions {
        recheck: Duration::from_secs(3600),
        coalesce: Duration::from_millis(200),
        ..opts(8)
    };
    let (s, _a, r) = filled(o).await;
    let writes = s.writes();
    for i in 0..4 {
        let t = r.take(&req(&format!("p{i}"))).await.unwrap();
        r.commit(&t, Some(pod(&t.handle)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until("refilled", || r.stats().spares == r.stats().target).await;
    r.flush().await;
    let by_handle = held(&s.snapshot());
    for i in 0..4 {
        assert!(by_handle.contains_key(&format!("p{i}")), "{by_handle:?}");
    }
    // One block: the renames in one write, the refill in one (or both in
    // one batch of the allocator).
    let made = s.writes() - writes;
    assert!(made <= 2, "{made} writes for 4 pod starts");
}

/// The refill does not sit out its window while the spares run low: a
/// take that leaves fewer than half of them starts it at once.
#[tokio::test(start_paused = true)]
async fn spares_running_low_are_refilled_without_waiting_the_window() {
    let o = ReserveOptions {
        recheck: Duration::from_secs(3600),
        coalesce: Duration::from_secs(10),
        ..opts(4)
    };
    let (_s, _a, r) = filled(o).await;
    let t0 = tokio::time::Instant::now();
    for i in 0..3 {
        r.take(&req(&format!("p{i}"))).await.unwrap();
    }
    until("refilled", || r.stats().spares == 4).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}
