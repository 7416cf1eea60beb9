//! Margay IPAM: which node owns which block, and which pod owns which address.
//!
//! - the `margay.dev/v1` resources (IPPool, IPAMBlock, IPAMConfiguration)
//!   live in `margay_api::ipam`;
//! - [`model`]: blocks and pools as the allocator sees them, pool validation;
//! - [`plan`]: the pure allocation planner;
//! - [`store`]: the compare-and-swap store trait and an in-memory store with
//!   failure injection;
//! - [`k8s`]: the store on the Kubernetes API and the pools' status and
//!   finalizer;
//! - [`allocator`]: the per-node actor that batches requests into as few
//!   block writes as possible (group commit), its view of the blocks kept
//!   by a watch when the store has one (`ahead`: what it knows ahead of
//!   that watch);
//! - [`reserve`]: pre-assigned addresses with write-behind;
//! - [`gc`]: leak and dead-node garbage collection.
//!
//! See `DESIGN.md` beside this crate for the invariants.

mod ahead;
pub mod allocator;
pub mod block;
pub mod demand;
pub mod gc;
pub mod k8s;
pub mod model;
pub mod plan;
pub mod reserve;
pub mod store;

pub use allocator::{Allocator, Options, StatsSnapshot};
pub use model::{Block, Family, Pool};
pub use plan::{Assign, Op, Outcome};
pub use reserve::{Reserve, ReserveOptions, Taken};
pub use store::{Cluster, MemStore, Store};

use margay_api::ipam as crd;

use crd::AllowedUse;
use model::Family as Fam;

/// Errors of the IPAM crate.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The block size does not fit the pool's address family.
    #[error("block size /{size} is invalid for {family} pool {cidr} (allowed /{min} to /{max})")]
    InvalidBlockSize {
        cidr: String,
        family: &'static str,
        size: u8,
        min: u8,
        max: u8,
    },
    /// A block object whose content does not make sense; it is left alone.
    #[error("IPAMBlock {name} is corrupt ({why}); it is left alone, inspect it with kubectl")]
    CorruptBlock { name: String, why: String },
    /// No pool can give this node an address for this use.
    #[error(
        "no enabled IPPool selects node {node} for {use_:?} addresses (check the pools' disabled, nodeSelector and allowedUses)"
    )]
    NoPool { node: String, use_: AllowedUse },
    /// No address left for this node.
    #[error("no free {family:?} address for node {node}: {why}")]
    Exhausted {
        family: Fam,
        node: String,
        why: String,
    },
    /// The object changed since it was read (compare-and-swap failed).
    #[error("{0} changed since it was read")]
    Conflict(String),
    /// The object already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The store could not be reached or did not answer; a write may or may
    /// not have been applied.
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    /// The store refused the request for another reason.
    #[error("datastore refused: {0}")]
    Refused(String),
    /// Conflicts did not resolve within the retry bound; try again.
    #[error("busy: {0}")]
    Busy(String),
    /// The allocator has stopped.
    #[error("the allocator has stopped")]
    Stopped,
}

impl Error {
    /// Whether asking again later may succeed (CNI code 11, "try again").
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Conflict(_) | Error::Unavailable(_) | Error::Busy(_) | Error::Stopped
        )
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) use margay_api::condition::now_rfc3339;
