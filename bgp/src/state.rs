//! State the RIB task shares with readers outside it: the peers' states and
//! the speaker-wide counters, read for the neighbor view and the metrics
//! without a round trip through the task. Only the RIB task and the peer
//! tasks write it.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::kernel::FibStats;
use crate::peer::PeerStatus;
use crate::rib::PeerId;

/// The shared part of a speaker.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Every known peer (configured and dynamic).
    pub peers: Mutex<BTreeMap<PeerId, Arc<Mutex<PeerStatus>>>>,
    /// Prefixes with a best path.
    pub rib_prefixes: AtomicU64,
    /// UPDATEs turned into withdrawals under RFC 7606.
    pub treat_as_withdraw: AtomicU64,
    /// Update groups (peers sharing one Adj-RIB-Out).
    pub update_groups: AtomicU64,
    /// Entries of every group's Adj-RIB-Out together (grows with routes
    /// × groups, not with peers).
    pub adj_out_entries: AtomicU64,
    /// The kernel writer's counters (with `fib`).
    pub kernel: Option<Arc<FibStats>>,
}
