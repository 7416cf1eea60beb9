//! The allocator's view of blocks and pools: parsed, validated, and
//! convertible to and from the custom resources.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use kube::api::ObjectMeta;

use crate::block::block_size;
use crate::crd::{
    AllocationRecord, AllowedUse, Condition, Encapsulation, IPAMBlock, IPAMBlockSpec, IPPool,
    IPPoolStatus, LabelSelector, block_name,
};
use crate::{Error, Result};

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of a network.
    pub fn of(net: &IpNetwork) -> Self {
        match net {
            IpNetwork::V4(_) => Family::V4,
            IpNetwork::V6(_) => Family::V6,
        }
    }

    /// The family of an address.
    pub fn of_addr(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Host prefix length (32 or 128).
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// One block as the allocator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Object name (derived from `cidr`).
    pub name: String,
    /// The block's range.
    pub cidr: IpNetwork,
    /// The pool it belongs to.
    pub pool: String,
    /// The affine node.
    pub node: Option<String>,
    /// Allocated addresses.
    pub allocations: BTreeMap<IpAddr, AllocationRecord>,
    /// The store's version of the object this was read from (`None` for a
    /// block not yet created).
    pub version: Option<String>,
    /// Why the object's content does not parse, when it does not: its
    /// range (from its name) stays taken, its affinity (when readable)
    /// keeps its blackhole and advertisement, and its addresses are
    /// unknown: none is handed out, released, or counted free, and the
    /// block is never written or deleted, until someone fixes or deletes it.
    pub corrupt: Option<String>,
}

/// The `n`th address of a network (no bounds check beyond the family).
pub fn nth(net: &IpNetwork, n: u128) -> IpAddr {
    match net {
        IpNetwork::V4(v4) => IpAddr::V4((u32::from(v4.network()) + n as u32).into()),
        IpNetwork::V6(v6) => IpAddr::V6((u128::from(v6.network()) + n).into()),
    }
}

/// How many addresses (or sub-blocks) a prefix length spans inside `bits`.
pub fn span(bits: u8, prefix: u8) -> u128 {
    let shift = u32::from(bits.saturating_sub(prefix));
    if shift >= 128 {
        u128::MAX
    } else {
        1u128 << shift
    }
}

impl Block {
    /// A new, empty block affine to `node`.
    pub fn new(cidr: IpNetwork, pool: &str, node: &str) -> Self {
        Self {
            name: block_name(&cidr),
            cidr,
            pool: pool.to_string(),
            node: Some(node.to_string()),
            allocations: BTreeMap::new(),
            version: None,
            corrupt: None,
        }
    }

    /// Number of addresses in the block.
    pub fn capacity(&self) -> u128 {
        span(Family::of(&self.cidr).host_prefix(), self.cidr.prefix())
    }

    /// Number of free addresses (none in a corrupt block: its addresses
    /// are unknown).
    pub fn free(&self) -> u128 {
        if self.corrupt.is_some() {
            return 0;
        }
        self.capacity() - self.allocations.len() as u128
    }

    /// Holds no address, as far as anyone can tell (a corrupt block may
    /// hold any: never empty).
    pub fn is_empty(&self) -> bool {
        self.corrupt.is_none() && self.allocations.is_empty()
    }

    /// The lowest free address.
    pub fn first_free(&self) -> Option<IpAddr> {
        if self.free() == 0 {
            return None;
        }
        (0..self.capacity())
            .map(|i| nth(&self.cidr, i))
            .find(|ip| !self.allocations.contains_key(ip))
    }

    /// Addresses held by `handle`.
    pub fn held_by<'a>(&'a self, handle: &'a str) -> impl Iterator<Item = IpAddr> + 'a {
        self.allocations
            .iter()
            .filter(move |(_, a)| a.handle == handle)
            .map(|(ip, _)| *ip)
    }

    /// Family of the block.
    pub fn family(&self) -> Family {
        Family::of(&self.cidr)
    }

    /// Parses a block resource; a block whose content does not parse is an
    /// error (the allocator then leaves it alone).
    pub fn from_resource(res: &IPAMBlock) -> Result<Self> {
        let name = res.metadata.name.clone().unwrap_or_default();
        let corrupt = |why: String| Error::CorruptBlock {
            name: name.clone(),
            why,
        };
        let cidr: IpNetwork = res
            .spec
            .cidr
            .parse()
            .map_err(|e| corrupt(format!("cidr {:?}: {e}", res.spec.cidr)))?;
        if cidr.network() != cidr.ip() || block_name(&cidr) != name {
            return Err(corrupt(format!("cidr {cidr} does not match the name")));
        }
        let mut allocations = BTreeMap::new();
        for (k, v) in &res.spec.allocations {
            let ip: IpAddr = k
                .parse()
                .map_err(|e| corrupt(format!("allocation key {k:?}: {e}")))?;
            if !cidr.contains(ip) {
                return Err(corrupt(format!("allocation {ip} is outside {cidr}")));
            }
            allocations.insert(ip, v.clone());
        }
        Ok(Self {
            name,
            cidr,
            pool: res.spec.pool.clone(),
            node: res.spec.node.clone(),
            allocations,
            version: res.metadata.resource_version.clone(),
            corrupt: None,
        })
    }

    /// Reads a block resource for a listing: as [`Block::from_resource`],
    /// but a block whose content does not parse comes back marked
    /// [`corrupt`](Block::corrupt), its range taken from its name. An error
    /// only for an object whose name is no block's and whose content does
    /// not parse: no range is known to keep.
    pub fn read(res: &IPAMBlock) -> Result<Self> {
        Self::from_resource(res).or_else(|e| {
            let name = res.metadata.name.clone().unwrap_or_default();
            let Some(cidr) = crate::crd::block_cidr_from_name(&name) else {
                return Err(e);
            };
            Ok(Self {
                name,
                cidr,
                pool: res.spec.pool.clone(),
                node: res.spec.node.clone(),
                allocations: BTreeMap::new(),
                version: res.metadata.resource_version.clone(),
                corrupt: Some(e.to_string()),
            })
        })
    }

    /// The resource to write for this block (carrying `version` for the
    /// compare-and-swap).
    pub fn to_resource(&self) -> IPAMBlock {
        IPAMBlock {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: self.version.clone(),
                ..Default::default()
            },
            spec: IPAMBlockSpec {
                cidr: self.cidr.to_string(),
                pool: self.pool.clone(),
                node: self.node.clone(),
                allocations: self
                    .allocations
                    .iter()
                    .map(|(ip, a)| (ip.to_string(), a.clone()))
                    .collect(),
            },
        }
    }
}

/// A pool that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Object name.
    pub name: String,
    /// The pool's range.
    pub cidr: IpNetwork,
    /// Block prefix length.
    pub block_size: u8,
    /// Hands out nothing new.
    pub disabled: bool,
    /// Being deleted: hands out nothing new.
    pub deleting: bool,
    /// Which nodes may use it.
    pub selector: Option<LabelSelector>,
    /// What it may be used for.
    pub uses: Vec<AllowedUse>,
    /// Encapsulation towards other nodes.
    pub encapsulation: Encapsulation,
    /// Masquerade outgoing traffic.
    pub nat_outgoing: bool,
}

impl Pool {
    /// Family of the pool.
    pub fn family(&self) -> Family {
        Family::of(&self.cidr)
    }

    /// Number of blocks in the pool.
    pub fn block_count(&self) -> u128 {
        span(self.block_size, self.cidr.prefix())
    }

    /// The `i`th block's range.
    pub fn block(&self, i: u128) -> IpNetwork {
        let shift = u32::from(self.family().host_prefix() - self.block_size);
        let base = nth(&self.cidr, i << shift);
        IpNetwork::new(base, self.block_size).expect("prefix within family")
    }

    /// Whether a block belongs to this pool as the pool is now (a block
    /// left over from an edited pool does not).
    pub fn owns(&self, b: &Block) -> bool {
        b.pool == self.name
            && b.cidr.prefix() == self.block_size
            && self.cidr.contains(b.cidr.network())
    }

    /// Blocks that name this pool but no longer have its shape (its `cidr`
    /// or `blockSize` was edited while they existed): new blocks of the new
    /// shape could overlap them, so while any exists the pool claims none.
    pub fn stranded<'b>(&self, blocks: impl IntoIterator<Item = &'b Block>) -> Vec<&'b Block> {
        blocks
            .into_iter()
            .filter(|b| b.pool == self.name && !self.owns(b))
            .collect()
    }

    /// Why the pool claims no new block while `stranded` exist, and the fix.
    pub fn stranded_message(&self, stranded: &[&Block]) -> String {
        let addrs: usize = stranded.iter().map(|b| b.allocations.len()).sum();
        let first = stranded
            .first()
            .map(|b| b.cidr.to_string())
            .unwrap_or_default();
        format!(
            "pool {}: its cidr or blockSize was changed (now {} in /{} blocks) while {} block(s) of the old shape exist (e.g. {first}, {addrs} address(es) in use); it claims no new block: revert the change, or create a new pool, drain this one and delete it",
            self.name,
            self.cidr,
            self.block_size,
            stranded.len()
        )
    }

    /// Whether a node with these labels may get addresses for `use_` from
    /// this pool now.
    pub fn usable(&self, labels: &BTreeMap<String, String>, use_: AllowedUse) -> bool {
        !self.disabled
            && !self.deleting
            && self.uses.contains(&use_)
            && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

/// Why a pool is not usable at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolProblem {
    /// The pool's name.
    pub pool: String,
    /// One CamelCase word.
    pub reason: &'static str,
    /// For a person.
    pub message: String,
}

/// Validates pools. Pools are considered oldest first (creation time, then
/// name); a pool overlapping an older valid pool is rejected, so blocks of
/// two pools can never overlap. Returns the valid pools (oldest first) and
/// the problems of the others.
pub fn validate_pools(pools: &[IPPool]) -> (Vec<Pool>, Vec<PoolProblem>) {
    let mut sorted: Vec<&IPPool> = pools.iter().collect();
    sorted.sort_by(|a, b| {
        let ka = (&a.metadata.creation_timestamp, &a.metadata.name);
        let kb = (&b.metadata.creation_timestamp, &b.metadata.name);
        ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut valid: Vec<Pool> = Vec::new();
    let mut problems = Vec::new();
    for p in sorted {
        let name = p.metadata.name.clone().unwrap_or_default();
        let problem = |reason, message| PoolProblem {
            pool: name.clone(),
            reason,
            message,
        };
        let cidr: IpNetwork = match p.spec.cidr.parse() {
            Ok(c) => c,
            Err(e) => {
                problems.push(problem(
                    "InvalidCIDR",
                    format!("cidr {:?} is not a network: {e}", p.spec.cidr),
                ));
                continue;
            }
        };
        if cidr.network() != cidr.ip() {
            problems.push(problem(
                "InvalidCIDR",
                format!(
                    "cidr {cidr} has host bits set; did you mean {}/{}?",
                    cidr.network(),
                    cidr.prefix()
                ),
            ));
            continue;
        }
        let size = match block_size(cidr, p.spec.block_size) {
            Ok(s) => s,
            Err(e) => {
                problems.push(problem("InvalidBlockSize", e.to_string()));
                continue;
            }
        };
        if let Some(other) = valid.iter().find(|v| overlaps(&v.cidr, &cidr)) {
            problems.push(problem(
                "Overlaps",
                format!(
                    "cidr {cidr} overlaps pool {} ({}), which is older; this pool is not used",
                    other.name, other.cidr
                ),
            ));
            continue;
        }
        valid.push(Pool {
            name,
            cidr,
            block_size: size,
            disabled: p.spec.disabled,
            deleting: p.metadata.deletion_timestamp.is_some(),
            selector: p.spec.node_selector.clone(),
            uses: p.spec.allowed_uses.clone(),
            encapsulation: p.spec.encapsulation,
            nat_outgoing: p.spec.nat_outgoing,
        });
    }
    (valid, problems)
}

/// What a pool's condition says of its blocks that do not parse.
fn corrupt_message(mine: &[&Block]) -> Option<String> {
    let bad: Vec<String> = mine
        .iter()
        .filter_map(|b| Some(format!("{} ({})", b.name, b.corrupt.as_deref()?)))
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "block(s) {} do not parse: their ranges stay taken and their addresses are neither handed out nor released, their nodes keep routing them; fix or delete the object (kubectl edit ipamblock NAME); new addresses come from the pool's other blocks",
            bad.join(", ")
        )
    })
}

/// What a pool's status should say, given every block: `Ready`
/// (usable: valid, not overlapping, enabled, not being deleted) and
/// `Exhausted` (every block claimed and full), with usage counts. Times are
/// left to the caller (kept when a condition's status does not change).
pub fn pool_statuses(pools: &[IPPool], blocks: &[Block]) -> Vec<(String, IPPoolStatus)> {
    let (valid, problems) = validate_pools(pools);
    let mut out = Vec::new();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: None,
    };
    for p in &valid {
        // Every block naming the pool counts (an edited pool's old blocks
        // too: their addresses are in use, and deletion waits for them).
        let mine: Vec<&Block> = blocks.iter().filter(|b| b.pool == p.name).collect();
        let stranded = p.stranded(mine.iter().copied());
        let allocated: u64 = mine.iter().map(|b| b.allocations.len() as u64).sum();
        let (ready, reason, message) = if p.deleting {
            (
                false,
                "Terminating",
                format!(
                    "being deleted: hands out no new addresses; {allocated} address(es) in {} block(s) are still allocated, deletion completes when they are released",
                    mine.len()
                ),
            )
        } else if p.disabled {
            (
                false,
                "Disabled",
                "disabled: hands out no new addresses".to_string(),
            )
        } else if let Some(c) = corrupt_message(&mine) {
            (false, "CorruptBlock", c)
        } else if !stranded.is_empty() {
            (false, "ShapeChanged", p.stranded_message(&stranded))
        } else {
            (
                true,
                "Valid",
                format!("{} blocks of /{}", p.block_count(), p.block_size),
            )
        };
        let full = mine.len() as u128 >= p.block_count() && mine.iter().all(|b| b.free() == 0);
        let total = p.block_count();
        let free_blocks =
            u64::try_from(total.saturating_sub(mine.len() as u128)).unwrap_or(u64::MAX);
        let (room, room_reason) = node_capacity(free_blocks, total);
        out.push((
            p.name.clone(),
            IPPoolStatus {
                conditions: vec![
                    cond("Ready", ready, reason, message),
                    cond(
                        "Exhausted",
                        full,
                        if full {
                            "AllBlocksFull"
                        } else {
                            "HasFreeAddresses"
                        },
                        if full {
                            "every block is claimed and full: add a pool or free addresses"
                                .to_string()
                        } else {
                            "free addresses remain".to_string()
                        },
                    ),
                    cond(
                        "NodeCapacity",
                        room,
                        room_reason,
                        format!(
                            "{free_blocks} of {total} blocks of /{} unclaimed: room for {free_blocks} more nodes (a node claims a block at its first address from this pool){}",
                            p.block_size,
                            if room { "" } else { "; add a pool or use a smaller blockSize before nodes go without" }
                        ),
                    ),
                ],
                allocated,
                blocks: mine.len() as u64,
                free_blocks,
            },
        ));
    }
    for pr in problems {
        out.push((
            pr.pool.clone(),
            IPPoolStatus {
                conditions: vec![cond("Ready", false, pr.reason, pr.message)],
                allocated: 0,
                blocks: 0,
                free_blocks: 0,
            },
        ));
    }
    out
}

/// Whether a pool with `free` of `total` blocks unclaimed has room for
/// more nodes (`False` with none left or fewer than a tenth), and the
/// condition's reason.
pub fn node_capacity(free: u64, total: u128) -> (bool, &'static str) {
    let low = total / 10;
    if free == 0 {
        (false, "NoBlocksLeft")
    } else if u128::from(free) < low {
        (false, "FewBlocksLeft")
    } else {
        (true, "BlocksLeft")
    }
}

/// Whether two networks share an address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    Family::of(a) == Family::of(b) && (a.contains(b.network()) || b.contains(a.network()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::IPPoolSpec;

    pub(crate) fn pool(name: &str, cidr: &str, size: Option<u8>) -> IPPool {
        let mut p = IPPool::new(
            name,
            IPPoolSpec {
                cidr: cidr.into(),
                block_size: size,
                encapsulation: Encapsulation::None,
                nat_outgoing: false,
                disabled: false,
                node_selector: None,
                allowed_uses: vec![AllowedUse::Workload, AllowedUse::Tunnel],
            },
        );
        p.metadata.creation_timestamp = None;
        p
    }

    #[test]
    fn a_pool_says_when_its_blocks_run_low() {
        // The default pool: 10.244.0.0/16 in /26 blocks is 1,024 nodes.
        let pools = [pool("default", "10.244.0.0/16", Some(26))];
        let claimed: Vec<Block> = (0..930u32)
            .map(|i| {
                let net = std::net::Ipv4Addr::from(0x0af4_0000 + i * 64);
                Block::new(
                    IpNetwork::new(IpAddr::V4(net), 26).unwrap(),
                    "default",
                    &format!("n{i}"),
                )
            })
            .collect();
        let at = |n: usize| {
            let st = pool_statuses(&pools, &claimed[..n]).remove(0).1;
            let c = st
                .conditions
                .iter()
                .find(|c| c.type_ == "NodeCapacity")
                .cloned()
                .unwrap();
            (st.free_blocks, c.status, c.reason, c.message)
        };
        let (free, status, reason, message) = at(0);
        assert_eq!(
            (free, status.as_str(), reason.as_str()),
            (1024, "True", "BlocksLeft")
        );
        assert!(
            message.starts_with("1024 of 1024 blocks of /26 unclaimed: room for 1024 more nodes"),
            "{message}"
        );
        assert_eq!(at(922).1, "True", "102 left: a tenth");
        let (free, status, reason, message) = at(930);
        assert_eq!(
            (free, status.as_str(), reason.as_str()),
            (94, "False", "FewBlocksLeft")
        );
        assert!(message.contains("add a pool"), "{message}");
        assert_eq!(node_capacity(0, 4), (false, "NoBlocksLeft"));
        assert_eq!(
            node_capacity(1, 4),
            (true, "BlocksLeft"),
            "a small pool warns only when none is left"
        );
    }

    #[test]
    fn overlapping_pools_younger_loses() {
        let (valid, problems) = validate_pools(&[
            pool("a", "10.0.0.0/16", None),
            pool("b", "10.0.128.0/24", Some(28)),
            pool("c", "10.1.0.0/16", None),
            pool("d", "10.2.0.1/16", None),
            pool("e", "10.3.0.0/16", Some(19)),
            pool("f", "fd00::/64", None),
        ]);
        let names: Vec<_> = valid.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "f"]);
        let reasons: Vec<_> = problems
            .iter()
            .map(|p| (p.pool.as_str(), p.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("b", "Overlaps"),
                ("d", "InvalidCIDR"),
                ("e", "InvalidBlockSize")
            ]
        );
        assert_eq!(valid[2].block_size, 122);
    }

    #[test]
    fn blocks_of_a_pool() {
        let (valid, _) = validate_pools(&[pool("a", "10.0.0.0/24", None)]);
        let p = &valid[0];
        assert_eq!(p.block_count(), 4);
        assert_eq!(p.block(3).to_string(), "10.0.0.192/26");
        let (valid, _) = validate_pools(&[pool("v6", "fd00::/64", None)]);
        assert_eq!(valid[0].block_count(), 1 << 58);
        assert_eq!(valid[0].block(1).to_string(), "fd00::40/122");
    }

    #[test]
    fn block_round_trip_and_corruption() {
        let mut b = Block::new("10.0.0.64/26".parse().unwrap(), "a", "n1");
        assert_eq!(b.first_free(), Some("10.0.0.64".parse().unwrap()));
        b.allocations.insert(
            "10.0.0.64".parse().unwrap(),
            AllocationRecord {
                handle: "h".into(),
                node: "n1".into(),
                use_: AllowedUse::Workload,
                pod: None,
                since: "2026-01-01T00:00:00Z".into(),
            },
        );
        assert_eq!(b.first_free(), Some("10.0.0.65".parse().unwrap()));
        assert_eq!(b.free(), 63);
        let back = Block::from_resource(&b.to_resource()).unwrap();
        assert_eq!(back, b);
        let mut res = b.to_resource();
        res.spec
            .allocations
            .insert("10.0.1.1".into(), res.spec.allocations["10.0.0.64"].clone());
        assert!(Block::from_resource(&res).is_err());
        let mut res = b.to_resource();
        res.metadata.name = Some("10-0-0-0-26".into());
        assert!(Block::from_resource(&res).is_err());
        // Listed, a corrupt block keeps the range its name gives, and
        // nothing in it is free, empty or ready to be handed out.
        res.spec.cidr = "garbage".into();
        let c = Block::read(&res).unwrap();
        assert_eq!(c.cidr.to_string(), "10.0.0.0/26");
        assert_eq!(c.node.as_deref(), Some("n1"));
        assert!(c.corrupt.as_deref().unwrap().contains("garbage"));
        assert_eq!((c.free(), c.first_free(), c.is_empty()), (0, None, false));
        // Its pool says so, naming it.
        let pools = [pool("a", "10.0.0.0/24", Some(26))];
        let st = pool_statuses(&pools, &[c]);
        let ready = &st[0].1.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "CorruptBlock")
        );
        assert!(ready.message.contains("10-0-0-0-26"), "{}", ready.message);
        // No range to keep: an error.
        res.metadata.name = Some("not-a-block".into());
        assert!(Block::read(&res).is_err());
    }
}
