//! What `margayctl ipam show` and `margayctl ipam check` report (their
//! `-o json` output), as types. `ipam release --from-report` reads a
//! check report back with these same types.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ipam::{Encapsulation, PodRef};

/// One pool's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    /// The pool's name.
    pub name: String,
    /// Its range.
    pub cidr: String,
    /// How it is carried between nodes.
    pub encapsulation: Encapsulation,
    /// Addresses allocated (pre-assigned spares included).
    pub used: usize,
    /// Of those, spares pre-assigned to nodes for their next pods.
    #[serde(default)]
    pub spares: usize,
    /// Addresses in the range (a decimal string: IPv6 ranges exceed 64 bits).
    pub capacity: String,
    /// Blocks claimed.
    pub blocks: usize,
}

/// One block's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockUsage {
    /// The IPAMBlock's name.
    pub name: String,
    /// Its range.
    pub cidr: String,
    /// Its pool.
    pub pool: String,
    /// The node it is affine to (`-`: none).
    pub node: String,
    /// Addresses allocated (pre-assigned spares included).
    pub used: usize,
    /// Of those, spares pre-assigned to the node for its next pods.
    #[serde(default)]
    pub spares: usize,
    /// Addresses in the block (a decimal string).
    pub size: String,
}

/// One node's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    /// The node (`-`: blocks affine to none).
    pub node: String,
    /// Blocks affine to it.
    pub blocks: usize,
    /// Addresses allocated in them (pre-assigned spares included).
    pub addresses: usize,
    /// Of those, spares pre-assigned for its next pods.
    #[serde(default)]
    pub spares: usize,
}

/// `margayctl ipam show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamShow {
    /// Per valid pool.
    pub pools: Vec<PoolUsage>,
    /// Per block.
    pub blocks: Vec<BlockUsage>,
    /// Per node.
    pub nodes: Vec<NodeUsage>,
}

/// Why an allocation looks leaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LeakReason {
    /// The node it was handed out on no longer exists.
    NodeGone,
    /// The pod no longer exists.
    PodGone,
    /// A pod of that name exists, with another UID.
    PodReplaced,
}

/// An allocation that looks leaked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leak {
    /// The block holding it.
    pub block: String,
    /// The address.
    pub address: IpAddr,
    /// Its handle.
    pub handle: String,
    /// The node it was handed out on.
    pub node: String,
    /// The pod it was for.
    pub pod: Option<PodRef>,
    /// Why it looks leaked.
    pub reason: LeakReason,
    /// When it was handed out (RFC 3339).
    pub since: String,
}

/// An address allocated in more than one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicate {
    /// The address.
    pub address: IpAddr,
    /// The blocks holding it.
    pub blocks: Vec<String>,
}

/// A block whose node or pool is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// The block's name.
    pub block: String,
    /// What is gone.
    pub why: String,
}

/// `margayctl ipam check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamCheck {
    /// Addresses whose pod or node is gone.
    pub leaks: Vec<Leak>,
    /// Addresses allocated in more than one block.
    pub duplicates: Vec<Duplicate>,
    /// Blocks whose node is gone, or whose pool is.
    pub orphans: Vec<Orphan>,
    /// Blocks whose content does not parse (`why` says what): their
    /// addresses are unknown, none is handed out or released.
    #[serde(default)]
    pub corrupt: Vec<Orphan>,
    /// Nothing found.
    pub ok: bool,
}
