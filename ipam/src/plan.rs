//! The allocation planner: pure logic, no I/O.
//!
//! Given the allocator's view of the blocks and a batch of operations, a
//! [`Plan`] says which blocks to write (whole new contents, each to be
//! written with a compare-and-swap on the version it was read at), what each
//! operation's outcome will be once those writes succeed, and at most one
//! block to claim before the operations that wait on it can be planned.
//! The caller performs the writes and plans again for what is left; nothing
//! here changes the view.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::crd::{AllocationRecord, AllowedUse, IPAMConfigurationSpec, PodRef};
use crate::model::{Block, Family, Pool, overlaps};
use crate::{Error, Result};

/// Ask for addresses for `handle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assign {
    /// `<container id>.<interface>` (or `tunnel.<kind>.<node>`).
    pub handle: String,
    /// The pod, when known.
    pub pod: Option<PodRef>,
    /// What the address is for.
    pub use_: AllowedUse,
}

/// One operation on the allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Addresses for a handle (the same ones again if it has them already).
    Assign(Assign),
    /// Release every address of a handle (nothing to do is success).
    Release {
        /// The handle.
        handle: String,
    },
    /// Move every address of handle `from` to handle `to`, recording the
    /// pod: how a pre-assigned address is attributed to the pod that got
    /// it. Fails with `NotFound` when `from` holds nothing and `to` does
    /// not hold the addresses already (a retried rename succeeds).
    Rename {
        /// The handle the addresses are under now.
        from: String,
        /// The handle they move to.
        to: String,
        /// The addresses expected (a rename never moves anything else).
        addrs: Vec<IpAddr>,
        /// The pod, when known.
        pod: Option<PodRef>,
    },
}

/// What an operation achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handle's addresses, one per family, as host networks.
    Assigned(Vec<IpNetwork>),
    /// The addresses that were released (empty when there were none).
    Released(Vec<IpAddr>),
    /// The addresses now under the new handle.
    Renamed(Vec<IpAddr>),
}

/// A block to claim for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Create a block object that does not exist yet.
    Create(Block),
    /// Take an existing block without affinity (its node was deleted).
    Adopt(Block),
}

impl Claim {
    /// The block claimed.
    pub fn block(&self) -> &Block {
        match self {
            Claim::Create(b) | Claim::Adopt(b) => b,
        }
    }
}

/// Why this node may claim no block (the reason an [`Error::Exhausted`]
/// gives).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoClaim {
    /// The node holds as many blocks as the configuration allows.
    #[error("the node has {own} {family:?} blocks, maxBlocksPerNode is {max}")]
    MaxBlocks {
        /// Its blocks of the family.
        own: usize,
        /// The family.
        family: Family,
        /// `maxBlocksPerNode`.
        max: u32,
    },
    /// No pool may give this node a block.
    #[error("no usable pool")]
    NoPool,
    /// Every usable pool is stranded (a changed shape: each one's
    /// message) or full (their names).
    #[error("{}", pools_message(stranded, full))]
    Pools {
        /// Each stranded pool's message.
        stranded: Vec<String>,
        /// The pools whose every block is claimed.
        full: Vec<String>,
    },
}

fn pools_message(stranded: &[String], full: &[String]) -> String {
    let mut why = stranded.to_vec();
    if !full.is_empty() {
        why.push(format!(
            "every block of pool(s) {} is claimed",
            full.join(", ")
        ));
    }
    why.join("; ")
}

/// The result of [`plan`].
#[derive(Debug, Default)]
pub struct Plan {
    /// Blocks to write, by name: the new content, carrying the version of
    /// the view it was derived from.
    pub writes: BTreeMap<String, Block>,
    /// Decided operations (by batch index). An `Ok` outcome holds only once
    /// every block in `depends[index]` has been written.
    pub done: Vec<(usize, Result<Outcome>)>,
    /// Blocks each decided operation's outcome depends on.
    pub depends: HashMap<usize, Vec<String>>,
    /// A block to claim before the waiting operations can proceed.
    pub claim: Option<Claim>,
    /// Operations to plan again in the next round.
    pub waiting: Vec<usize>,
}

/// Who is asking, and under which rules.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// This node's name.
    pub node: &'a str,
    /// This node's labels (for pools' node selectors).
    pub labels: &'a BTreeMap<String, String>,
    /// Valid pools, oldest first.
    pub pools: &'a [Pool],
    /// Cluster IPAM settings.
    pub config: &'a IPAMConfigurationSpec,
    /// The current time, RFC 3339, for `since`.
    pub now: &'a str,
}

/// Every block the allocator knows, with an index by handle.
#[derive(Debug, Default, Clone)]
pub struct View {
    blocks: BTreeMap<String, Block>,
    handles: HashMap<String, Vec<(String, IpAddr)>>,
}

impl View {
    /// Builds a view from a full list of blocks.
    pub fn new(blocks: impl IntoIterator<Item = Block>) -> Self {
        let mut v = Self::default();
        for b in blocks {
            v.insert(b);
        }
        v
    }

    /// Adds or replaces a block.
    pub fn insert(&mut self, block: Block) {
        self.remove(&block.name.clone());
        for (ip, a) in &block.allocations {
            self.handles
                .entry(a.handle.clone())
                .or_default()
                .push((block.name.clone(), *ip));
        }
        self.blocks.insert(block.name.clone(), block);
    }

    /// Forgets a block.
    pub fn remove(&mut self, name: &str) -> Option<Block> {
        let old = self.blocks.remove(name)?;
        for a in old.allocations.values() {
            if let Some(v) = self.handles.get_mut(&a.handle) {
                v.retain(|(b, _)| b != name);
                if v.is_empty() {
                    self.handles.remove(&a.handle);
                }
            }
        }
        Some(old)
    }

    /// A block by name.
    pub fn get(&self, name: &str) -> Option<&Block> {
        self.blocks.get(name)
    }

    /// All blocks, by name.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.blocks.values()
    }

    /// Where a handle's addresses are, as far as the view knows.
    pub fn holding(&self, handle: &str) -> &[(String, IpAddr)] {
        self.handles.get(handle).map_or(&[], |v| v.as_slice())
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the view has no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// A stable per-node starting point so nodes claiming at once try
/// different blocks (FNV-1a of the node name).
fn node_offset(node: &str, count: u128) -> u128 {
    u128::from(margay_api::stable::fnv1a(node.as_bytes())) % count.max(1)
}

struct Planner<'a, 'v> {
    ctx: Context<'a>,
    view: &'v View,
    work: BTreeMap<String, Block>,
    plan: Plan,
}

impl<'a, 'v> Planner<'a, 'v> {
    fn block(&self, name: &str) -> Option<&Block> {
        self.work.get(name).or_else(|| self.view.get(name))
    }

    fn block_mut(&mut self, name: &str) -> &mut Block {
        if !self.work.contains_key(name) {
            let b = self
                .view
                .get(name)
                .expect("planned block is in the view")
                .clone();
            self.work.insert(name.to_string(), b);
        }
        self.work.get_mut(name).expect("just inserted")
    }

    fn usable_pools(
        &self,
        family: Family,
        use_: AllowedUse,
    ) -> impl Iterator<Item = &'a Pool> + 'a {
        let labels = self.ctx.labels;
        self.ctx
            .pools
            .iter()
            .filter(move |p| p.family() == family && p.usable(labels, use_))
    }

    /// A block affine to this node in a usable pool with a free address.
    fn own_block_with_space(&self, family: Family, use_: AllowedUse) -> Option<String> {
        for pool in self.usable_pools(family, use_) {
            let found = self
                .view
                .blocks()
                .filter(|b| pool.owns(b) && b.node.as_deref() == Some(self.ctx.node))
                .map(|b| self.block(&b.name).expect("in view"))
                .find(|b| b.free() > 0);
            if let Some(b) = found {
                return Some(b.name.clone());
            }
        }
        None
    }

    fn own_blocks(&self, family: Family) -> usize {
        self.view
            .blocks()
            .filter(|b| b.family() == family && b.node.as_deref() == Some(self.ctx.node))
            .count()
    }

    /// A block this node may claim, or why none.
    fn claim_candidate(
        &self,
        family: Family,
        use_: AllowedUse,
    ) -> std::result::Result<Claim, NoClaim> {
        let max = self.ctx.config.max_blocks_per_node;
        let own = self.own_blocks(family);
        if max > 0 && own >= max as usize {
            return Err(NoClaim::MaxBlocks { own, family, max });
        }
        let mut full = Vec::new();
        let mut stranded_pools = Vec::new();
        for pool in self.usable_pools(family, use_) {
            let stranded = pool.stranded(self.view.blocks());
            if !stranded.is_empty() {
                stranded_pools.push(pool.stranded_message(&stranded));
                continue;
            }
            // Blocks left without affinity (their node was deleted) first.
            if let Some(b) = self
                .view
                .blocks()
                .filter(|b| pool.owns(b) && b.node.is_none())
                .find(|b| self.block(&b.name).is_some_and(|b| b.free() > 0))
            {
                let mut b = self.block(&b.name).expect("in view").clone();
                b.node = Some(self.ctx.node.to_string());
                return Ok(Claim::Adopt(b));
            }
            // Every block inside the pool's range, of any pool or shape: a
            // new block overlaps none of them. Each covers at most this
            // many of the pool's slots, so that many steps and one more
            // find a free slot if there is one.
            let inside: Vec<&Block> = self
                .view
                .blocks()
                .filter(|b| overlaps(&b.cidr, &pool.cidr))
                .collect();
            let count = pool.block_count();
            let covered: u128 = inside
                .iter()
                .map(|b| {
                    let wider = pool.block_size.saturating_sub(b.cidr.prefix());
                    1u128 << u32::from(wider).min(100)
                })
                .fold(0u128, u128::saturating_add)
                .min(count);
            if covered < count {
                let start = node_offset(self.ctx.node, count);
                for step in 0..=covered {
                    let i = (start + step) % count;
                    let cidr = pool.block(i);
                    if !inside.iter().any(|b| overlaps(&b.cidr, &cidr)) {
                        return Ok(Claim::Create(Block::new(cidr, &pool.name, self.ctx.node)));
                    }
                }
            }
            full.push(pool.name.clone());
        }
        Err(if stranded_pools.is_empty() && full.is_empty() {
            NoClaim::NoPool
        } else {
            NoClaim::Pools {
                stranded: stranded_pools,
                full,
            }
        })
    }

    /// A block of another node (or none) with a free address, in a pool
    /// this node may use. Blocks without affinity come first; among the
    /// others each node starts at its own place, so borrowing nodes spread
    /// over blocks instead of all writing to the same one.
    fn borrowable(&self, family: Family, use_: AllowedUse) -> Option<String> {
        let pools: Vec<&Pool> = self.usable_pools(family, use_).collect();
        let mut unaffined = Vec::new();
        let mut affined = Vec::new();
        for b in self.view.blocks() {
            if b.family() != family
                || b.node.as_deref() == Some(self.ctx.node)
                || !pools.iter().any(|p| p.owns(b))
                || self.block(&b.name).is_none_or(|b| b.free() == 0)
            {
                continue;
            }
            if b.node.is_none() {
                unaffined.push(b.name.as_str());
            } else {
                affined.push(b.name.as_str());
            }
        }
        if let Some(n) = unaffined.first() {
            return Some(n.to_string());
        }
        if affined.is_empty() {
            return None;
        }
        let i = node_offset(self.ctx.node, affined.len() as u128) as usize;
        Some(affined[i].to_string())
    }

    fn release(&mut self, idx: usize, handle: &str) {
        let held: Vec<String> = self
            .view
            .holding(handle)
            .iter()
            .map(|(b, _)| b.clone())
            .collect();
        let mut ips = Vec::new();
        let mut deps = Vec::new();
        for name in held {
            let b = self.block_mut(&name);
            let before = b.allocations.len();
            b.allocations.retain(|ip, a| {
                let hit = a.handle == handle;
                if hit {
                    ips.push(*ip);
                }
                !hit
            });
            if b.allocations.len() != before && !deps.contains(&name) {
                deps.push(name);
            }
        }
        ips.sort();
        self.plan.depends.insert(idx, deps);
        self.plan.done.push((idx, Ok(Outcome::Released(ips))));
    }

    fn rename(&mut self, idx: usize, from: &str, to: &str, addrs: &[IpAddr], pod: &Option<PodRef>) {
        let mut want: Vec<IpAddr> = addrs.to_vec();
        want.sort();
        let have_to: Vec<IpAddr> = {
            let mut v: Vec<IpAddr> = self.view.holding(to).iter().map(|(_, ip)| *ip).collect();
            v.sort();
            v
        };
        let held: Vec<(String, IpAddr)> = self
            .view
            .holding(from)
            .iter()
            .filter(|(_, ip)| want.contains(ip))
            .cloned()
            .collect();
        if held.is_empty() {
            let outcome = if !want.is_empty() && want.iter().all(|ip| have_to.contains(ip)) {
                Ok(Outcome::Renamed(want))
            } else {
                Err(Error::NotFound(format!(
                    "handle {from} holds none of {want:?} (to move to {to})"
                )))
            };
            self.plan.depends.insert(idx, Vec::new());
            self.plan.done.push((idx, outcome));
            return;
        }
        let mut deps = Vec::new();
        let mut ips = Vec::new();
        for (name, ip) in held {
            let b = self.block_mut(&name);
            if let Some(a) = b.allocations.get_mut(&ip) {
                a.handle = to.to_string();
                a.pod = pod.clone();
                ips.push(ip);
                if !deps.contains(&name) {
                    deps.push(name);
                }
            }
        }
        ips.sort();
        self.plan.depends.insert(idx, deps);
        self.plan.done.push((idx, Ok(Outcome::Renamed(ips))));
    }

    fn assign(&mut self, idx: usize, a: &Assign) {
        let families: Vec<Family> = [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| self.usable_pools(*f, a.use_).next().is_some())
            .collect();
        if families.is_empty() {
            self.plan.done.push((
                idx,
                Err(Error::NoPool {
                    node: self.ctx.node.to_string(),
                    use_: a.use_,
                }),
            ));
            return;
        }
        let mut got: Vec<IpNetwork> = Vec::new();
        let mut tentative: Vec<(String, IpAddr)> = Vec::new();
        let mut failure: Option<Error> = None;
        let mut wait = false;
        for family in families {
            let existing = self
                .view
                .holding(&a.handle)
                .iter()
                .find(|(_, ip)| Family::of_addr(ip) == family)
                .cloned();
            if let Some((_, ip)) = existing {
                got.push(IpNetwork::new(ip, family.host_prefix()).expect("host prefix"));
                continue;
            }
            let target = match self.own_block_with_space(family, a.use_) {
                Some(b) => Some(b),
                None => match self.claim_candidate(family, a.use_) {
                    Ok(claim) => {
                        if self.plan.claim.is_none() {
                            self.plan.claim = Some(claim);
                        }
                        wait = true;
                        break;
                    }
                    Err(why) => {
                        if self.ctx.config.strict_affinity {
                            failure = Some(Error::Exhausted {
                                family,
                                node: self.ctx.node.to_string(),
                                why: format!(
                                    "{why}, and strictAffinity forbids borrowing from other nodes' blocks"
                                ),
                            });
                            break;
                        }
                        match self.borrowable(family, a.use_) {
                            Some(b) => Some(b),
                            None => {
                                failure = Some(Error::Exhausted {
                                    family,
                                    node: self.ctx.node.to_string(),
                                    why: format!("{why}, and no other block has a free address"),
                                });
                                break;
                            }
                        }
                    }
                },
            };
            let name = target.expect("a block was chosen");
            let record = AllocationRecord {
                handle: a.handle.clone(),
                node: self.ctx.node.to_string(),
                use_: a.use_,
                pod: a.pod.clone(),
                since: self.ctx.now.to_string(),
            };
            let b = self.block_mut(&name);
            let ip = b.first_free().expect("block has space");
            b.allocations.insert(ip, record);
            tentative.push((name, ip));
            got.push(IpNetwork::new(ip, family.host_prefix()).expect("host prefix"));
        }
        if wait || failure.is_some() {
            for (name, ip) in tentative {
                self.block_mut(&name).allocations.remove(&ip);
            }
            if wait {
                self.plan.waiting.push(idx);
            } else {
                self.plan.done.push((idx, Err(failure.expect("set"))));
            }
            return;
        }
        let mut deps: Vec<String> = tentative.into_iter().map(|(b, _)| b).collect();
        deps.dedup();
        self.plan.depends.insert(idx, deps);
        self.plan.done.push((idx, Ok(Outcome::Assigned(got))));
    }
}

/// Plans a batch of operations against the view. An operation on a handle
/// already seen earlier in the same batch waits for the next round, so
/// each round treats a handle once.
pub fn plan(ctx: Context<'_>, view: &View, ops: &[(usize, &Op)]) -> Plan {
    let mut p = Planner {
        ctx,
        view,
        work: BTreeMap::new(),
        plan: Plan::default(),
    };
    let mut seen: HashSet<&str> = HashSet::new();
    for (idx, op) in ops {
        let handles: Vec<&str> = match op {
            Op::Assign(a) => vec![a.handle.as_str()],
            Op::Release { handle } => vec![handle.as_str()],
            Op::Rename { from, to, .. } => vec![from.as_str(), to.as_str()],
        };
        if handles.iter().any(|h| seen.contains(h)) {
            // Later operations on these handles keep their order.
            seen.extend(handles);
            p.plan.waiting.push(*idx);
            continue;
        }
        seen.extend(handles);
        match op {
            Op::Assign(a) => p.assign(*idx, a),
            Op::Release { handle } => p.release(*idx, handle),
            Op::Rename {
                from,
                to,
                addrs,
                pod,
            } => p.rename(*idx, from, to, addrs, pod),
        }
    }
    let mut plan = p.plan;
    // Only blocks whose content changed are written.
    plan.writes = p
        .work
        .into_iter()
        .filter(|(name, b)| view.get(name) != Some(b))
        .collect();
    plan
}

#[cfg(test)]
mod tests;
