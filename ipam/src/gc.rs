//! Garbage collection: addresses whose pod or node is gone, and blocks of
//! deleted nodes.
//!
//! [`find_leaks`] is pure: it compares allocations with the cluster's nodes
//! and pods. [`Janitor`] runs it, waits out a grace period per candidate
//! (a candidate must be seen on consecutive runs spanning the grace period,
//! and the allocation itself must be older than it), re-reads the node or
//! pod right before releasing, and releases with a compare-and-swap that
//! names the handle, so an address reused in the meantime is never freed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crd::AllowedUse;
use crate::model::Block;
use crate::store::{Cluster, Store};
use crate::{Error, Result};

pub use margay_api::ctl::{Leak, LeakReason};

/// Allocations whose node or pod is gone. Allocations without a pod
/// (non-Kubernetes callers) are judged only by their node.
pub fn find_leaks<'a>(
    blocks: impl IntoIterator<Item = &'a Block>,
    nodes: &BTreeSet<String>,
    pods: &HashMap<(String, String), String>,
) -> Vec<Leak> {
    let mut out = Vec::new();
    for b in blocks {
        for (ip, a) in &b.allocations {
            let reason = if !nodes.contains(&a.node) {
                Some(LeakReason::NodeGone)
            } else if let (Some(p), AllowedUse::Workload) = (&a.pod, a.use_) {
                match pods.get(&(p.namespace.clone(), p.name.clone())) {
                    None => Some(LeakReason::PodGone),
                    Some(uid) if !p.uid.is_empty() && *uid != p.uid => {
                        Some(LeakReason::PodReplaced)
                    }
                    Some(_) => None,
                }
            } else {
                None
            };
            if let Some(reason) = reason {
                out.push(Leak {
                    block: b.name.clone(),
                    address: *ip,
                    handle: a.handle.clone(),
                    node: a.node.clone(),
                    pod: a.pod.clone(),
                    reason,
                    since: a.since.clone(),
                });
            }
        }
    }
    out
}

/// Blocks affine to nodes that no longer exist, as (block, node).
pub fn orphaned_blocks<'a>(
    blocks: impl IntoIterator<Item = &'a Block>,
    nodes: &BTreeSet<String>,
) -> Vec<(String, String)> {
    blocks
        .into_iter()
        .filter_map(|b| {
            let n = b.node.as_ref()?;
            (!nodes.contains(n)).then(|| (b.name.clone(), n.clone()))
        })
        .collect()
}

/// What one collection run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Addresses released.
    pub released: Vec<Leak>,
    /// Candidates still within their grace period.
    pub waiting: Vec<Leak>,
    /// Blocks of deleted nodes deleted (they were empty).
    pub blocks_deleted: Vec<String>,
    /// Blocks of deleted nodes left without affinity (others still hold
    /// addresses in them).
    pub blocks_unaffined: Vec<String>,
    /// Problems met (the run goes on past them).
    pub errors: Vec<String>,
}

/// Runs garbage collection against a store.
#[derive(Debug)]
pub struct Janitor<S> {
    store: Arc<S>,
    grace: Option<Duration>,
    first_seen: HashMap<(IpAddr, String), Instant>,
}

fn age(since: &str) -> Option<Duration> {
    let t: jiff::Timestamp = since.parse().ok()?;
    let d = jiff::Timestamp::now().duration_since(t);
    Duration::try_from(d).ok()
}

impl<S: Store + Cluster> Janitor<S> {
    /// A janitor using the configured `leakGraceSeconds`.
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            grace: None,
            first_seen: HashMap::new(),
        }
    }

    /// Overrides the grace period (tests, `margayctl ipam release`).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// One collection run.
    pub async fn run_once(&mut self) -> Result<Report> {
        let grace = match self.grace {
            Some(g) => g,
            None => Duration::from_secs(self.store.config().await?.leak_grace_seconds),
        };
        let blocks = self.store.list_blocks().await?;
        let nodes = self.store.nodes().await?;
        let pods = self.store.pods().await?;
        let leaks = find_leaks(&blocks, &nodes, &pods);
        let now = Instant::now();
        let keys: BTreeSet<(IpAddr, String)> = leaks
            .iter()
            .map(|l| (l.address, l.handle.clone()))
            .collect();
        self.first_seen.retain(|k, _| keys.contains(k));
        let mut report = Report::default();
        let mut due: BTreeMap<String, Vec<Leak>> = BTreeMap::new();
        // Live node re-checks, once per node per run.
        let mut gone: HashMap<String, bool> = HashMap::new();
        for leak in leaks {
            let seen = *self
                .first_seen
                .entry((leak.address, leak.handle.clone()))
                .or_insert(now);
            let old_enough = age(&leak.since).is_none_or(|a| a >= grace);
            if now.duration_since(seen) < grace || !old_enough {
                report.waiting.push(leak);
                continue;
            }
            // Re-check right before releasing.
            let still = match (&leak.reason, &leak.pod) {
                (LeakReason::NodeGone, _) => self.node_gone(&mut gone, &leak.node).await,
                (_, Some(p)) => self
                    .store
                    .pod_uid(&p.namespace, &p.name)
                    .await
                    .map(|uid| uid.is_none_or(|u| !p.uid.is_empty() && u != p.uid)),
                (_, None) => Ok(false),
            };
            match still {
                Ok(true) => due.entry(leak.block.clone()).or_default().push(leak),
                Ok(false) => {}
                Err(e) => report
                    .errors
                    .push(format!("re-check {}: {e}", leak.address)),
            }
        }
        for (name, leaks) in due {
            match self.release_in_block(&name, &leaks).await {
                Ok(released) => {
                    for l in &released {
                        self.first_seen.remove(&(l.address, l.handle.clone()));
                        tracing::info!(address = %l.address, handle = %l.handle, node = %l.node,
                            reason = ?l.reason, "released leaked address");
                    }
                    report.released.extend(released);
                }
                Err(e) => report.errors.push(format!("block {name}: {e}")),
            }
        }
        for (name, node) in orphaned_blocks(&blocks, &nodes) {
            match self.node_gone(&mut gone, &node).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    report.errors.push(format!("re-check node {node}: {e}"));
                    continue;
                }
            }
            match self.release_orphan(&name, &node).await {
                Ok(Some(true)) => report.blocks_deleted.push(name),
                Ok(Some(false)) => report.blocks_unaffined.push(name),
                Ok(None) => {}
                Err(e) => report.errors.push(format!("block {name}: {e}")),
            }
        }
        Ok(report)
    }

    /// Whether `node` is gone, read live once per run (`cache`).
    async fn node_gone(&self, cache: &mut HashMap<String, bool>, node: &str) -> Result<bool> {
        if let Some(g) = cache.get(node) {
            return Ok(*g);
        }
        let g = !self.store.node_exists(node).await?;
        cache.insert(node.to_string(), g);
        Ok(g)
    }

    /// Removes the given allocations from a block if each still has the
    /// same handle; retries on conflict.
    async fn release_in_block(&self, name: &str, leaks: &[Leak]) -> Result<Vec<Leak>> {
        for _ in 0..8 {
            let Some(mut b) = self.store.get_block(name).await? else {
                return Ok(Vec::new());
            };
            let mut released = Vec::new();
            for l in leaks {
                if b.allocations
                    .get(&l.address)
                    .is_some_and(|a| a.handle == l.handle)
                {
                    b.allocations.remove(&l.address);
                    released.push(l.clone());
                }
            }
            if released.is_empty() {
                return Ok(released);
            }
            match self.store.update_block(&b).await {
                Ok(_) => return Ok(released),
                Err(Error::Conflict(_) | Error::NotFound(_) | Error::Unavailable(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy(format!("block {name} kept changing")))
    }

    /// Deletes a dead node's block if empty, else drops its affinity.
    /// `Some(true)`: deleted; `Some(false)`: unaffined; `None`: changed
    /// hands meanwhile.
    async fn release_orphan(&self, name: &str, node: &str) -> Result<Option<bool>> {
        for _ in 0..8 {
            let Some(mut b) = self.store.get_block(name).await? else {
                return Ok(None);
            };
            if b.node.as_deref() != Some(node) {
                return Ok(None);
            }
            let version = b.version.clone().unwrap_or_default();
            let res = if b.is_empty() {
                self.store.delete_block(name, &version).await.map(|_| true)
            } else {
                b.node = None;
                self.store.update_block(&b).await.map(|_| false)
            };
            match res {
                Ok(deleted) => return Ok(Some(deleted)),
                Err(Error::Conflict(_) | Error::Unavailable(_)) => continue,
                Err(Error::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy(format!("block {name} kept changing")))
    }
}
