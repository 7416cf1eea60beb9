//! The datastore the allocator writes through, and an in-memory one.
//!
//! Every write is a compare-and-swap: `create_block` fails with
//! `AlreadyExists` when the name is taken, `update_block` and `delete_block`
//! fail with `Conflict` unless the stored version is the one the caller read.
//! [`MemStore`] implements the same contract in memory and can inject
//! faults: conflicts (as if another writer got there first), unavailability,
//! and writes that are applied but whose answer is lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::crd::{IPAMConfigurationSpec, IPPool};
use crate::model::Block;
use crate::{Error, Result};

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
    fn node_labels(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, String>>> + Send;
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
    fn pods(&self) -> impl Future<Output = Result<HashMap<(String, String), String>>> + Send;
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
                    }
                    Err(Error::Conflict(format!("block {name}")))
                }
                Some(Fault::Unavailable) => Err(Error::Unavailable("injected".into())),
                Some(Fault::LostAck) => {
                    apply(s)?;
                    s.writes += 1;
                    Err(Error::Unavailable("injected: answer lost".into()))
                }
                None => {
                    let r = apply(s)?;
                    s.writes += 1;
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
        Ok(self.snapshot())
    }

    async fn get_block(&self, name: &str) -> Result<Option<Block>> {
        Ok(self.with(|s| s.blocks.get(name).cloned()))
    }

    async fn create_block(&self, block: &Block) -> Result<Block> {
        let name = block.name.clone();
        let block = block.clone();
        self.write(&name, move |s| {
            if s.blocks.contains_key(&block.name) {
                return Err(Error::AlreadyExists(format!("block {}", block.name)));
            }
            s.version += 1;
            let mut b = block;
            b.version = Some(s.version.to_string());
            s.blocks.insert(b.name.clone(), b.clone());
            Ok(Some(b))
        })
        .map(|b| b.expect("created"))
    }

    async fn update_block(&self, block: &Block) -> Result<Block> {
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
            s.version += 1;
            let mut b = block;
            b.version = Some(s.version.to_string());
            s.blocks.insert(b.name.clone(), b.clone());
            Ok(Some(b))
        })
        .map(|b| b.expect("updated"))
    }

    async fn delete_block(&self, name: &str, version: &str) -> Result<()> {
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

    async fn node_labels(&self, node: &str) -> Result<BTreeMap<String, String>> {
        Ok(self.with(|s| s.labels.get(node).cloned().unwrap_or_default()))
    }
}

impl Cluster for MemStore {
    async fn nodes(&self) -> Result<BTreeSet<String>> {
        Ok(self.with(|s| s.nodes.clone()))
    }

    async fn node_exists(&self, name: &str) -> Result<bool> {
        Ok(self.with(|s| s.nodes.contains(name)))
    }

    async fn pods(&self) -> Result<HashMap<(String, String), String>> {
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
