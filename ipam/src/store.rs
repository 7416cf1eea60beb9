//! The datastore the allocator writes through, and an in-memory one.
//!
//! Every write is a compare-and-swap: `create_block` fails with
//! `AlreadyExists` when the name is taken, `update_block` and `delete_block`
//! fail with `Conflict` unless the stored version is the one the caller read.
//! [`MemStore`] implements the same contract in memory and can inject
//! faults: conflicts (as if another writer got there first), unavailability,
//! and writes that are applied but whose answer is lost.
//!
//! A store may also follow its blocks with a watch ([`BlockFeed`], from
//! [`Store::block_feed`]): the allocator then keeps its view current from
//! the watch's changes instead of listing every block again. [`MemStore`]
//! has one on request, which can lag (changes held back), break (stale)
//! and start over (a new list), like a real watch.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::crd::{IPAMConfigurationSpec, IPPool};
use crate::model::Block;
use crate::{Error, Result};

/// A node's labels.
pub type NodeLabels = BTreeMap<String, String>;

/// Every pod's sandbox UID by (namespace, name) ([`Cluster::pods`]).
pub type PodSandboxes = HashMap<(String, String), String>;

/// Blocks, pools and settings, with compare-and-swap writes.
pub trait Store: Send + Sync + 'static {
    /// Every block.
    fn list_blocks(&self) -> impl Future<Output = Result<Vec<Block>>> + Send;
    /// One block, read now.
    fn get_block(&self, name: &str) -> impl Future<Output = Result<Option<Block>>> + Send;
    /// Creates a block; `AlreadyExists` if the name is taken. Returns the
    /// block with its new version.
    fn create_block(&self, block: &Block) -> impl Future<Output = Result<Block>> + Send;
    /// Replaces a block if its stored version is `block.version`.
    fn update_block(&self, block: &Block) -> impl Future<Output = Result<Block>> + Send;
    /// Deletes a block if its stored version is `version`.
    fn delete_block(&self, name: &str, version: &str) -> impl Future<Output = Result<()>> + Send;
    /// Every pool (the store may serve this from a cache).
    fn pools(&self) -> impl Future<Output = Result<Vec<IPPool>>> + Send;
    /// The IPAM settings (defaults when there is no configuration object).
    fn config(&self) -> impl Future<Output = Result<IPAMConfigurationSpec>> + Send;
    /// A node's labels (empty when the node is unknown).
    fn node_labels(&self, node: &str) -> impl Future<Output = Result<NodeLabels>> + Send;
    /// The blocks as a watch follows them, when this store has one (the
    /// allocator takes it when it starts; a store may have only one to
    /// give).
    fn block_feed(&self) -> Option<BlockFeed> {
        None
    }
}

/// A change to the blocks, as a watch of the store saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockChange {
    /// Every block: the watch listed them (it started, or started over
    /// because the store no longer had the version it was at). Never a
    /// part of a list.
    Listed(Vec<Block>),
    /// A block created or changed.
    Put(Block),
    /// A block deleted (its name).
    Gone(String),
}

/// The blocks as a watch of the store follows them: its changes, in the
/// order the store made them (a watch shows every version of a block, in
/// order, unless it starts over with [`BlockChange::Listed`]), and whether
/// it is current. It lags: a change comes some time after the write.
pub struct BlockFeed {
    changes: mpsc::UnboundedReceiver<BlockChange>,
    stale: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

impl std::fmt::Debug for BlockFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockFeed")
            .field("stale", &(self.stale)())
            .finish_non_exhaustive()
    }
}

impl BlockFeed {
    /// A feed of `changes`; `stale` says why what was handed on may not
    /// be current (the watch is broken), or `None` when it is.
    pub fn new(
        changes: mpsc::UnboundedReceiver<BlockChange>,
        stale: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            changes,
            stale: Box::new(stale),
        }
    }

    /// The next change; `None` when the watch has ended for good.
    pub async fn next(&mut self) -> Option<BlockChange> {
        self.changes.recv().await
    }

    /// The next change if one is there already.
    pub fn try_next(&mut self) -> Option<BlockChange> {
        self.changes.try_recv().ok()
    }

    /// Why what the feed handed on may not be current (`None`: it is).
    pub fn stale(&self) -> Option<String> {
        (self.stale)()
    }
}

/// What garbage collection needs to know about the cluster.
pub trait Cluster: Send + Sync + 'static {
    /// Names of the nodes that exist (may be served from a cache).
    fn nodes(&self) -> impl Future<Output = Result<BTreeSet<String>>> + Send;
    /// Whether a node exists, read now.
    fn node_exists(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Every pod's sandbox UID by (namespace, name): what the kubelet
    /// passes as K8S_POD_UID, a static pod's own UID for its mirror pod
    /// (may be served from a cache).
    fn pods(&self) -> impl Future<Output = Result<PodSandboxes>> + Send;
    /// A pod's sandbox UID (as [`Cluster::pods`]), read now (`None` when it
    /// does not exist).
    fn pod_uid(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// Which fault to inject into the next matching write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with `Conflict` and change the stored version, as a concurrent
    /// writer would.
    Conflict,
    /// Fail with `Unavailable` without applying.
    Unavailable,
    /// Apply the write, then fail with `Unavailable` (the answer was lost).
    LostAck,
}

/// One feed of a [`MemStore`].
#[derive(Debug)]
struct MemFeed {
    tx: mpsc::UnboundedSender<BlockChange>,
}

#[derive(Debug, Default)]
struct MemState {
    blocks: BTreeMap<String, Block>,
    version: u64,
    pools: Vec<IPPool>,
    config: IPAMConfigurationSpec,
    labels: HashMap<String, BTreeMap<String, String>>,
    nodes: BTreeSet<String>,
    pods: HashMap<(String, String), String>,
    queued: Vec<Fault>,
    random: Option<(fastrand_lite::Rng, u32)>,
    reads_down: bool,
    writes: u64,
    /// Feeds are handed out ([`MemStore::enable_feed`]).
    feed_on: bool,
    feeds: Vec<MemFeed>,
    /// Changes held back from the feeds (they lag), in order.
    held: Option<VecDeque<BlockChange>>,
    /// Why the feeds are not current.
    feed_stale: Option<String>,
    /// Block lists made ([`Store::list_blocks`]).
    lists: u64,
    /// How long each block write takes before it is applied (a slow or
    /// frozen API server).
    write_delay: Duration,
}

impl MemState {
    /// Keeps `b` at the next version (the write that calls it publishes
    /// the change).
    fn put(&mut self, mut b: Block) -> Block {
        self.version += 1;
        b.version = Some(self.version.to_string());
        self.blocks.insert(b.name.clone(), b.clone());
        b
    }

    /// A write's change, to every feed (or held back).
    fn publish(&mut self, change: BlockChange) {
        match &mut self.held {
            Some(q) => q.push_back(change),
            None => self.feeds.retain(|f| f.tx.send(change.clone()).is_ok()),
        }
    }
}

/// A tiny deterministic generator so failure injection needs no extra
/// dependency.
mod fastrand_lite {
    #[derive(Debug, Clone)]
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }
}

/// An in-memory [`Store`] and [`Cluster`] with failure injection.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    state: Arc<Mutex<MemState>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemState) -> T) -> T {
        f(&mut self.state.lock().expect("store lock"))
    }

    /// Replaces the pools.
    pub fn set_pools(&self, pools: Vec<IPPool>) {
        self.with(|s| s.pools = pools);
    }

    /// Replaces the IPAM settings.
    pub fn set_config(&self, config: IPAMConfigurationSpec) {
        self.with(|s| s.config = config);
    }

    /// Adds a node (with labels).
    pub fn add_node(&self, name: &str, labels: BTreeMap<String, String>) {
        self.with(|s| {
            s.nodes.insert(name.to_string());
            s.labels.insert(name.to_string(), labels);
        });
    }

    /// Removes a node.
    pub fn remove_node(&self, name: &str) {
        self.with(|s| {
            s.nodes.remove(name);
            s.labels.remove(name);
        });
    }

    /// Adds or replaces a pod.
    pub fn set_pod(&self, namespace: &str, name: &str, uid: &str) {
        self.with(|s| {
            s.pods
                .insert((namespace.to_string(), name.to_string()), uid.to_string())
        });
    }

    /// Removes a pod.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.with(|s| s.pods.remove(&(namespace.to_string(), name.to_string())));
    }

    /// Injects `fault` into the next write.
    pub fn inject(&self, fault: Fault) {
        self.with(|s| s.queued.push(fault));
    }

    /// Makes listing blocks fail with `Unavailable` (or work again).
    pub fn set_reads_unavailable(&self, down: bool) {
        self.with(|s| s.reads_down = down);
    }

    /// Makes every block write wait `d` before it is applied (on the
    /// runtime's clock: a paused test clock makes it a frozen API server).
    pub fn set_write_delay(&self, d: Duration) {
        self.with(|s| s.write_delay = d);
    }

    /// Waits the write delay.
    async fn delay(&self) {
        let d = self.with(|s| s.write_delay);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    /// Drops the faults injected and not yet hit.
    pub fn clear_faults(&self) {
        self.with(|s| s.queued.clear());
    }

    /// Injects a random fault into about `percent`% of writes, from `seed`.
    pub fn random_faults(&self, seed: u64, percent: u32) {
        self.with(|s| s.random = Some((fastrand_lite::Rng(seed | 1), percent)));
    }

    /// A snapshot of every block.
    pub fn snapshot(&self) -> Vec<Block> {
        self.with(|s| s.blocks.values().cloned().collect())
    }

    /// Successful writes so far.
    pub fn writes(&self) -> u64 {
        self.with(|s| s.writes)
    }

    /// Block lists made so far.
    pub fn lists(&self) -> u64 {
        self.with(|s| s.lists)
    }

    /// Hands out block feeds from now on ([`Store::block_feed`]).
    pub fn enable_feed(&self) {
        self.with(|s| s.feed_on = true);
    }

    /// Holds the feeds' changes back (`true`: a lagging watch), or
    /// delivers every held change and stops holding (`false`).
    pub fn hold_feed(&self, hold: bool) {
        self.with(|s| match (hold, s.held.take()) {
            (true, h) => s.held = Some(h.unwrap_or_default()),
            (false, Some(q)) => {
                for c in q {
                    s.publish(c);
                }
            }
            (false, None) => {}
        });
    }

    /// Delivers the first `n` held changes (they stay held after).
    pub fn release_feed(&self, n: usize) {
        self.with(|s| {
            let Some(q) = s.held.as_mut() else { return };
            let first: Vec<BlockChange> = q.drain(..n.min(q.len())).collect();
            let rest = s.held.take();
            for c in first {
                s.publish(c);
            }
            s.held = rest;
        });
    }

    /// Marks the feeds broken (`Some(why)`: stale) or current again.
    pub fn set_feed_stale(&self, why: Option<&str>) {
        self.with(|s| s.feed_stale = why.map(str::to_string));
    }

    /// The feeds start over: the changes held back are never delivered,
    /// a whole list is (as a watch whose version the store no longer has).
    pub fn relist_feed(&self) {
        self.with(|s| {
            let holding = s.held.take().map(|_| VecDeque::new());
            let all = BlockChange::Listed(s.blocks.values().cloned().collect());
            s.feeds.retain(|f| f.tx.send(all.clone()).is_ok());
            s.held = holding;
        });
    }

    /// The write path: checks, faults, applies.
    fn write(
        &self,
        name: &str,
        apply: impl FnOnce(&mut MemState) -> Result<Option<Block>>,
    ) -> Result<Option<Block>> {
        self.with(|s| {
            let fault = if !s.queued.is_empty() {
                Some(s.queued.remove(0))
            } else if let Some((rng, pct)) = &mut s.random {
                let r = rng.next();
                if (r % 100) < u64::from(*pct) {
                    Some(match (r >> 8) % 3 {
                        0 => Fault::Conflict,
                        1 => Fault::Unavailable,
                        _ => Fault::LostAck,
                    })
                } else {
                    None
                }
            } else {
                None
            };
            match fault {
                Some(Fault::Conflict) => {
                    // A concurrent writer bumped the version.
                    s.version += 1;
                    let v = s.version.to_string();
                    if let Some(b) = s.blocks.get_mut(name) {
                        b.version = Some(v);
                        let b = b.clone();
                        s.publish(BlockChange::Put(b));
                    }
                    Err(Error::Conflict(format!("block {name}")))
                }
                Some(Fault::Unavailable) => Err(Error::Unavailable("injected".into())),
                Some(Fault::LostAck) => {
                    let r = apply(s)?;
                    s.writes += 1;
                    s.publish(r.map_or_else(|| BlockChange::Gone(name.into()), BlockChange::Put));
                    Err(Error::Unavailable("injected: answer lost".into()))
                }
                None => {
                    let r = apply(s)?;
                    s.writes += 1;
                    s.publish(
                        r.clone()
                            .map_or_else(|| BlockChange::Gone(name.into()), BlockChange::Put),
                    );
                    Ok(r)
                }
            }
        })
    }
}

impl Store for MemStore {
    async fn list_blocks(&self) -> Result<Vec<Block>> {
        if self.with(|s| s.reads_down) {
            return Err(Error::Unavailable("injected: listing blocks".into()));
        }
        self.with(|s| s.lists += 1);
        Ok(self.snapshot())
    }

    async fn get_block(&self, name: &str) -> Result<Option<Block>> {
        Ok(self.with(|s| s.blocks.get(name).cloned()))
    }

    async fn create_block(&self, block: &Block) -> Result<Block> {
        self.delay().await;
        let name = block.name.clone();
        let block = block.clone();
        self.write(&name, move |s| {
            if s.blocks.contains_key(&block.name) {
                return Err(Error::AlreadyExists(format!("block {}", block.name)));
            }
            Ok(Some(s.put(block)))
        })
        .map(|b| b.expect("created"))
    }

    async fn update_block(&self, block: &Block) -> Result<Block> {
        self.delay().await;
        let name = block.name.clone();
        let block = block.clone();
        self.write(&name, move |s| {
            let cur = s
                .blocks
                .get(&block.name)
                .ok_or_else(|| Error::NotFound(format!("block {}", block.name)))?;
            if cur.version != block.version {
                return Err(Error::Conflict(format!("block {}", block.name)));
            }
            Ok(Some(s.put(block)))
        })
        .map(|b| b.expect("updated"))
    }

    async fn delete_block(&self, name: &str, version: &str) -> Result<()> {
        self.delay().await;
        let n = name.to_string();
        let v = version.to_string();
        self.write(name, move |s| {
            let cur = s
                .blocks
                .get(&n)
                .ok_or_else(|| Error::NotFound(format!("block {n}")))?;
            if cur.version.as_deref() != Some(v.as_str()) {
                return Err(Error::Conflict(format!("block {n}")));
            }
            s.blocks.remove(&n);
            Ok(None)
        })
        .map(|_| ())
    }

    async fn pools(&self) -> Result<Vec<IPPool>> {
        Ok(self.with(|s| s.pools.clone()))
    }

    async fn config(&self) -> Result<IPAMConfigurationSpec> {
        Ok(self.with(|s| s.config.clone()))
    }

    async fn node_labels(&self, node: &str) -> Result<NodeLabels> {
        Ok(self.with(|s| s.labels.get(node).cloned().unwrap_or_default()))
    }

    fn block_feed(&self) -> Option<BlockFeed> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.with(|s| {
            if !s.feed_on {
                return None;
            }
            // A watch starts with a list.
            let all = BlockChange::Listed(s.blocks.values().cloned().collect());
            tx.send(all).expect("receiver here");
            s.feeds.push(MemFeed { tx });
            Some(())
        })?;
        let state = self.state.clone();
        Some(BlockFeed::new(rx, move || {
            state.lock().expect("store lock").feed_stale.clone()
        }))
    }
}

impl Cluster for MemStore {
    async fn nodes(&self) -> Result<BTreeSet<String>> {
        Ok(self.with(|s| s.nodes.clone()))
    }

    async fn node_exists(&self, name: &str) -> Result<bool> {
        Ok(self.with(|s| s.nodes.contains(name)))
    }

    async fn pods(&self) -> Result<PodSandboxes> {
        Ok(self.with(|s| s.pods.clone()))
    }

    async fn pod_uid(&self, namespace: &str, name: &str) -> Result<Option<String>> {
        Ok(self.with(|s| {
            s.pods
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
        }))
    }
}
