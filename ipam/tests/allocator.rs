//! The allocator task and the janitor over the in-memory store, one
//! behaviour per test, with injected faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use margay_api::ipam::{AllowedUse, IPAMConfigurationSpec, IPPool, IPPoolSpec, PodRef};
use margay_ipam::gc::{Janitor, LeakReason};
use margay_ipam::store::Fault;
use margay_ipam::{Allocator, Assign, Error, MemStore, Options, Store};

fn pool(name: &str, cidr: &str, size: u8) -> IPPool {
    IPPool::new(name, IPPoolSpec::with_cidr(cidr, Some(size)))
}

fn store(pools: Vec<IPPool>, cfg: IPAMConfigurationSpec) -> Arc<MemStore> {
    let s = Arc::new(MemStore::new());
    s.set_pools(pools);
    s.set_config(cfg);
    for n in ["n1", "n2"] {
        s.add_node(n, BTreeMap::new());
    }
    s
}

fn req(h: &str) -> Assign {
    Assign {
        handle: h.into(),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: h.into(),
            uid: format!("uid-{h}"),
        }),
        use_: AllowedUse::Workload,
    }
}

fn cfg() -> IPAMConfigurationSpec {
    IPAMConfigurationSpec {
        empty_block_grace_seconds: 0,
        leak_grace_seconds: 0,
        ..Default::default()
    }
}

/// Assigns `{prefix}{i}` for every `i` of `range`, each succeeding.
async fn assign_all(a: &Allocator, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        a.assign(req(&format!("{prefix}{i}"))).await.unwrap();
    }
}

/// A store of pool `p` (`cidr`, blocks of /28) in which a node may claim
/// one block.
fn one_block_per_node(cidr: &str) -> Arc<MemStore> {
    let cfg = IPAMConfigurationSpec {
        max_blocks_per_node: 1,
        ..cfg()
    };
    store(vec![pool("p", cidr, 28)], cfg)
}

#[tokio::test]
async fn a_burst_costs_a_few_writes() {
    let s = store(vec![pool("p", "10.0.0.0/16", 26)], cfg());
    let a = Allocator::start(s.clone(), "n1", Options::default());
    // Warm up: claim the first block.
    a.assign(req("warm")).await.unwrap();
    let before = s.writes();
    let answers =
        futures::future::join_all((0..100).map(|i| a.assign(req(&format!("h{i}"))))).await;
    assert!(answers.iter().all(|r| r.is_ok()));
    let writes = s.writes() - before;
    // 100 addresses need two more blocks: 2 claims plus at most a handful
    // of block writes, not 100.
    assert!(writes <= 8, "{writes} writes for 100 assigns");
}

#[tokio::test]
async fn lost_answers_and_conflicts_are_resolved_by_reading_back() {
    let s = store(vec![pool("p", "10.0.0.0/24", 26)], cfg());
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let first = a.assign(req("a")).await.unwrap();
    s.inject(Fault::LostAck);
    let second = a.assign(req("b")).await.unwrap();
    assert_ne!(first, second);
    s.inject(Fault::Conflict);
    s.inject(Fault::Unavailable);
    let third = a.assign(req("c")).await.unwrap();
    assert!(third != first && third != second);
    let held: usize = s.snapshot().iter().map(|b| b.allocations.len()).sum();
    assert_eq!(held, 3);
    // The same handle again: same address, no write.
    let w = s.writes();
    assert_eq!(a.assign(req("b")).await.unwrap(), second);
    assert_eq!(s.writes(), w);
}

#[tokio::test]
async fn an_assign_whose_address_was_collected_gets_a_fresh_one() {
    let s = store(vec![pool("p", "10.0.0.0/24", 26)], cfg());
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let ip = a.assign(req("a")).await.unwrap();
    // The pod vanished and the janitor freed the address behind the
    // allocator's back; an ADD retry must not answer from a stale view.
    let mut j = Janitor::new(s.clone()).with_grace(Duration::ZERO);
    let r = j.run_once().await.unwrap();
    assert_eq!(r.released.len(), 1);
    assert_eq!(r.released[0].reason, LeakReason::PodGone);
    let b = a.assign(req("b")).await.unwrap();
    assert_eq!(b, ip, "the freed address is reused");
    let again = a.assign(req("a")).await.unwrap();
    assert_ne!(again, ip, "never two handles on one address");
}

#[tokio::test]
async fn exhaustion_is_a_clear_error() {
    let s = store(
        vec![pool("p", "10.0.0.0/30", 30)],
        IPAMConfigurationSpec {
            strict_affinity: true,
            ..cfg()
        },
    );
    let a = Allocator::start(s.clone(), "n1", Options::default());
    assign_all(&a, "h", 0..4).await;
    let e = a.assign(req("h4")).await.unwrap_err();
    assert!(matches!(e, Error::Exhausted { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("every block of pool(s) p is claimed"), "{msg}");
    // Another node with strict affinity cannot borrow.
    let b = Allocator::start(s.clone(), "n2", Options::default());
    let e = b.assign(req("x")).await.unwrap_err();
    assert!(e.to_string().contains("strictAffinity"), "{e}");
}

#[tokio::test]
async fn borrowing_and_node_deletion() {
    let s = one_block_per_node("10.0.0.0/27");
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let b = Allocator::start(s.clone(), "n2", Options::default());
    assign_all(&a, "a", 0..16).await;
    assign_all(&b, "b", 0..16).await;
    for i in 0..16 {
        s.set_pod("default", &format!("a{i}"), &format!("uid-a{i}"));
        s.set_pod("default", &format!("b{i}"), &format!("uid-b{i}"));
    }
    // n1 releases half; n2 (at its block limit) borrows from n1's block.
    for i in 0..8 {
        a.release(&format!("a{i}")).await.unwrap();
    }
    let borrowed = b.assign(req("b16")).await.unwrap();
    s.set_pod("default", "b16", "uid-b16");
    assert!(borrowed[0].ip().to_string().starts_with("10.0.0."));
    // n1 is deleted: its addresses go, its block stays (n2 borrows from
    // it) but loses its affinity.
    s.remove_node("n1");
    let mut j = Janitor::new(s.clone()).with_grace(Duration::ZERO);
    let r = j.run_once().await.unwrap();
    assert_eq!(r.released.len(), 8, "{r:?}");
    assert!(r.released.iter().all(|l| l.reason == LeakReason::NodeGone));
    assert_eq!(r.blocks_unaffined.len(), 1, "{r:?}");
    // Once the borrowed address is released too, the block is deleted.
    b.release("b16").await.unwrap();
    let n1_block: Vec<_> = s
        .snapshot()
        .into_iter()
        .filter(|b| b.node.is_none())
        .collect();
    assert_eq!(n1_block.len(), 1);
    // Unaffined blocks are claimed again before new ones are carved.
    s.add_node("n3", BTreeMap::new());
    let c = Allocator::start(s.clone(), "n3", Options::default());
    c.assign(req("c0")).await.unwrap();
    assert!(s.snapshot().iter().all(|b| b.node.is_some()));
}

#[tokio::test]
async fn empty_blocks_are_released_but_one_is_kept() {
    let s = store(vec![pool("p", "10.0.0.0/24", 28)], cfg());
    let a = Allocator::start(s.clone(), "n1", Options::default());
    assign_all(&a, "h", 0..40).await;
    assert_eq!(s.snapshot().len(), 3);
    for i in 0..40 {
        a.release(&format!("h{i}")).await.unwrap();
    }
    let released = a.release_empty_blocks().await.unwrap();
    assert_eq!(released.len(), 2);
    assert_eq!(s.snapshot().len(), 1, "one block per node is kept");
    // A grace period holds them.
    s.set_config(IPAMConfigurationSpec {
        empty_block_grace_seconds: 3600,
        ..cfg()
    });
    assign_all(&a, "g", 0..40).await;
    for i in 0..40 {
        a.release(&format!("g{i}")).await.unwrap();
    }
    assert!(a.release_empty_blocks().await.unwrap().is_empty());
}

#[tokio::test]
async fn gc_waits_out_its_grace_and_rechecks() {
    let s = store(vec![pool("p", "10.0.0.0/24", 26)], cfg());
    let a = Allocator::start(s.clone(), "n1", Options::default());
    a.assign(req("gone")).await.unwrap();
    a.assign(req("alive")).await.unwrap();
    s.set_pod("default", "alive", "uid-alive");
    // A pod recreated under the same name is not the pod that holds it.
    a.assign(req("again")).await.unwrap();
    s.set_pod("default", "again", "another-uid");
    let mut j = Janitor::new(s.clone()).with_grace(Duration::from_millis(300));
    let r = j.run_once().await.unwrap();
    assert!(r.released.is_empty());
    assert_eq!(r.waiting.len(), 2);
    // Not a wait: the Janitor's grace runs on the wall clock; let it pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // "gone" comes back before the grace period ends: not released.
    s.set_pod("default", "gone", "uid-gone");
    let r = j.run_once().await.unwrap();
    let released: Vec<_> = r
        .released
        .iter()
        .map(|l| (l.handle.as_str(), l.reason))
        .collect();
    assert_eq!(released, [("again", LeakReason::PodReplaced)]);
}

/// With a store that follows its blocks by a watch, the allocator's view
/// is the watch's: other nodes' changes come in by it, and nothing is
/// listed again, not even before saying `Exhausted`, unless the watch is
/// broken.
#[tokio::test]
async fn a_view_kept_by_a_watch_lists_nothing_again() {
    let s = one_block_per_node("10.0.0.0/28");
    s.enable_feed();
    let a = Allocator::start(s.clone(), "n1", Options::default());
    let b = Allocator::start(s.clone(), "n2", Options::default());
    // n2's view is loaded (from its watch's list) before n1 fills the pool.
    assert_eq!(b.blocks().await.unwrap(), vec![]);
    assign_all(&a, "a", 0..16).await;
    let e = b.assign(req("b0")).await.unwrap_err();
    assert!(matches!(e, Error::Exhausted { .. }), "{e}");
    // n1 frees one: n2 learns it from its watch and borrows it.
    let freed = a.release("a3").await.unwrap();
    let got = b.assign(req("b1")).await.unwrap();
    assert_eq!(got[0].ip(), freed[0]);
    assert!(matches!(
        a.assign(req("a16")).await.unwrap_err(),
        Error::Exhausted { .. }
    ));
    assert_eq!(s.lists(), 0, "no block list: every view came from a watch");

    // A broken watch: before saying no, everything is listed.
    s.set_feed_stale(Some("the watch is broken"));
    assert!(matches!(
        b.assign(req("b2")).await.unwrap_err(),
        Error::Exhausted { .. }
    ));
    assert_eq!(s.lists(), 1);
}

/// The same without a watch: a list at start and before each `Exhausted`
/// (what the watch saves).
#[tokio::test]
async fn a_view_without_a_watch_is_listed_before_saying_no() {
    let s = store(vec![pool("p", "10.0.0.0/28", 28)], cfg());
    let a = Allocator::start(s.clone(), "n1", Options::default());
    assign_all(&a, "a", 0..16).await;
    assert_eq!(s.lists(), 1);
    for i in 16..19 {
        assert!(matches!(
            a.assign(req(&format!("a{i}"))).await.unwrap_err(),
            Error::Exhausted { .. }
        ));
    }
    assert_eq!(s.lists(), 4);
}

/// A watch that lags never takes the allocator's own writes back out of
/// its view: a change older than a write, shown after it, is skipped (else
/// the handle's address would go missing from the view, and a release
/// would free nothing: a leak).
#[tokio::test]
async fn a_lagging_watch_does_not_undo_the_allocators_own_writes() {
    let s = store(vec![pool("p", "10.0.0.0/28", 28)], cfg());
    s.enable_feed();
    let a = Allocator::start(s.clone(), "n1", Options::default());
    a.assign(req("h1")).await.unwrap();
    s.hold_feed(true);
    // Another writer changes the block first (the allocator loses its
    // compare-and-swap, reads the block back, writes again): the watch
    // holds back both changes.
    s.inject(Fault::Conflict);
    let h2 = a.assign(req("h2")).await.unwrap();
    // The other writer's change (older than the allocator's write) shows.
    s.release_feed(1);
    let holders = |blocks: Vec<margay_ipam::Block>| -> Vec<String> {
        blocks
            .iter()
            .flat_map(|b| b.allocations.values().map(|r| r.handle.clone()))
            .collect()
    };
    assert_eq!(holders(a.blocks().await.unwrap()), vec!["h1", "h2"]);
    assert_eq!(a.release("h2").await.unwrap(), vec![h2[0].ip()]);
    s.hold_feed(false);
    assert_eq!(holders(a.blocks().await.unwrap()), vec!["h1"]);
    assert_eq!(holders(s.snapshot()), vec!["h1"]);
    assert_eq!(s.lists(), 0);
}

/// What [`Trapped::pools`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trap {
    Answer,
    Hang,
    Panic,
}

/// A [`MemStore`] whose pool reads can be made to hang (an API that never
/// answers) or to panic (a bug in the allocator's task).
struct Trapped {
    inner: Arc<MemStore>,
    trap: std::sync::Mutex<Trap>,
}

impl Trapped {
    fn new(inner: Arc<MemStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            trap: std::sync::Mutex::new(Trap::Answer),
        })
    }

    fn set(&self, t: Trap) {
        *self.trap.lock().unwrap() = t;
    }
}

impl Store for Trapped {
    async fn list_blocks(&self) -> margay_ipam::Result<Vec<margay_ipam::Block>> {
        self.inner.list_blocks().await
    }
    async fn get_block(&self, name: &str) -> margay_ipam::Result<Option<margay_ipam::Block>> {
        self.inner.get_block(name).await
    }
    async fn create_block(
        &self,
        b: &margay_ipam::Block,
    ) -> margay_ipam::Result<margay_ipam::Block> {
        self.inner.create_block(b).await
    }
    async fn update_block(
        &self,
        b: &margay_ipam::Block,
    ) -> margay_ipam::Result<margay_ipam::Block> {
        self.inner.update_block(b).await
    }
    async fn delete_block(&self, name: &str, version: &str) -> margay_ipam::Result<()> {
        self.inner.delete_block(name, version).await
    }
    async fn pools(&self) -> margay_ipam::Result<Vec<IPPool>> {
        let trap = *self.trap.lock().unwrap();
        match trap {
            Trap::Answer => self.inner.pools().await,
            Trap::Hang => std::future::pending().await,
            Trap::Panic => panic!("a trapped pool read"),
        }
    }
    async fn config(&self) -> margay_ipam::Result<IPAMConfigurationSpec> {
        self.inner.config().await
    }
    async fn node_labels(&self, node: &str) -> margay_ipam::Result<BTreeMap<String, String>> {
        self.inner.node_labels(node).await
    }
}

/// Waits until only the test holds `s` (the allocator's task, which holds
/// the other reference, has ended).
async fn task_ended<T>(s: &Arc<T>) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while Arc::strong_count(s) > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the allocator's task ended");
}

/// n1's allocator over a [`Trapped`] store, one pod assigned (the store
/// still answering).
async fn trapped_with_one_pod() -> (Arc<Trapped>, Allocator) {
    let s = Trapped::new(store(vec![pool("p", "10.0.0.0/24", 26)], cfg()));
    let a = Allocator::start(s.clone(), "n1", Options::default());
    a.assign(req("a")).await.unwrap();
    (s, a)
}

#[tokio::test]
async fn the_task_ends_with_its_last_handle_even_mid_request() {
    let (s, a) = trapped_with_one_pod().await;
    // A request the store never answers: the task waits in it.
    s.set(Trap::Hang);
    let gave_up = tokio::time::timeout(Duration::from_millis(50), a.assign(req("b"))).await;
    assert!(gave_up.is_err(), "answered: {gave_up:?}");
    assert_eq!(Arc::strong_count(&s), 2, "the task holds the store");
    // The caller gave up and the last handle goes: the task, stuck in the
    // store, is aborted.
    drop(a);
    task_ended(&s).await;
}

#[tokio::test]
async fn a_task_that_died_answers_stopped_and_never_hangs() {
    let (s, a) = trapped_with_one_pod().await;
    s.set(Trap::Panic);
    // The request in the batch that killed the task, and every one after.
    for h in ["b", "c"] {
        let r = tokio::time::timeout(Duration::from_secs(5), a.assign(req(h)))
            .await
            .expect("an answer, not a hang");
        assert!(matches!(r, Err(Error::Stopped)), "{r:?}");
    }
    task_ended(&s).await;
}
