//! Everything that keeps routing from being complete, as one type. The plan
//! and the apply step collect them; they are rendered (one sentence each,
//! naming the object and the fix) into the `MargayReady` Node condition
//! and `/status` (as [`status::Problem`]s: the kind and the sentence).

use std::net::IpAddr;

use margay_api::bgp::{ConfigInvalid, PeerInvalid};
use margay_api::status::{self, ProblemKind};

use super::encap::Unroutable;
use crate::kube::Why;

/// What a node does about two Nodes announcing one BGP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Resolution {
    /// Only one of them has a live agent: it is the one peered with.
    #[error("peering with {0}, the one whose agent is alive")]
    Alive(String),
    /// Neither or both look alive, and a session to the address exists: it
    /// is kept as it is.
    #[error("the existing peering with the address is kept as it is")]
    Kept,
    /// Neither or both look alive, no session exists: none is made.
    #[error("neither is peered with")]
    Neither,
}

/// One reason routing is incomplete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// This node has no Node object.
    #[error("Node {0} not found in the API")]
    NodeMissing(String),
    /// An input could not be read; what depends on it was kept as it was.
    #[error("{0}")]
    Unknown(Why),
    /// This node's NetworkPolicy table is not what the engine computed
    /// (not listed yet, or a load failed and is retried): the kernel
    /// keeps the rules it has.
    #[error("the NetworkPolicy table is not current: {0}")]
    PolicyTable(String),
    /// The BGPConfiguration is invalid.
    #[error("BGPConfiguration {name} ignored (defaults used): {why}")]
    ConfigIgnored {
        /// Its name.
        name: String,
        /// What is wrong.
        why: ConfigInvalid,
    },
    /// A BGPPeer is invalid.
    #[error("BGPPeer {name} ignored: {why}")]
    PeerIgnored {
        /// Its name.
        name: String,
        /// What is wrong.
        why: PeerInvalid,
    },
    /// The node's address could not be chosen.
    #[error(transparent)]
    NoAddress(#[from] super::nodes::NoNodeAddress),
    /// The node has no BGP address yet (nothing to peer from).
    #[error("this node has no BGP address yet")]
    NoBgpAddress,
    /// BGP needs an IPv4 router ID.
    #[error("BGP needs an IPv4 node address (the router ID)")]
    NeedsIpv4,
    /// A peering's password Secret (or its key) does not exist.
    #[error("BGPPeer {peer}: password Secret {secret}/{key} not found; peering left out")]
    PasswordMissing {
        /// The BGPPeer.
        peer: String,
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// A peering's password Secret cannot be read now: the peering keeps
    /// what it had.
    #[error("BGPPeer {peer}: {why}")]
    PasswordUnknown {
        /// The BGPPeer.
        peer: String,
        /// Why.
        why: Why,
    },
    /// A peering's password Secret was not read at all.
    #[error("BGPPeer {peer}: password Secret {secret}/{key} not read")]
    PasswordNotRead {
        /// The BGPPeer.
        peer: String,
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// Two Nodes announce the same BGP address.
    #[error(
        "Nodes {first} and {second} both announce BGP address {address}; {resolution} (remove the stale Node)"
    )]
    DuplicateAddress {
        /// The address.
        address: IpAddr,
        /// One node.
        first: String,
        /// The other.
        second: String,
        /// What this node does about it.
        resolution: Resolution,
    },
    /// A neighbor the speaker would refuse.
    #[error("neighbor {address} ({origin}) left out: {why}")]
    NeighborInvalid {
        /// Its address.
        address: IpAddr,
        /// Where it came from (a Node or a BGPPeer).
        origin: String,
        /// What the speaker says.
        why: margay_bgp::config::NeighborInvalid,
    },
    /// A block that cannot be routed.
    #[error(transparent)]
    Route(#[from] Unroutable),
    /// A tunnel address could not be allocated (or released).
    #[error("{tunnel} tunnel address: {why}")]
    NoTunnelAddress {
        /// Which tunnel.
        tunnel: crate::dataplane::Tunnel,
        /// What went wrong.
        why: String,
    },
    /// The node's identity could not be published.
    #[error("cannot publish this node's BGP identity: {0}")]
    Publish(String),
    /// The speaker refused or failed a call.
    #[error("BGP speaker: {0}")]
    Speaker(String),
    /// The kernel refused some of the routing state.
    #[error("routes to other nodes' blocks: {0}")]
    Kernel(String),
    /// The tunnel filter could not be read or loaded: the tunnels take
    /// packets as the kernel's table (if any) says until it is.
    #[error(
        "the tunnel filter ({table}) could not be brought up to date: {0}; encapsulated packets are taken as the kernel's table says until it is",
        table = crate::dataplane::ownership::NFT_TUNNEL_TABLE
    )]
    TunnelFilter(String),
}

impl Problem {
    /// Its kind, as `/status` names it.
    pub fn kind(&self) -> ProblemKind {
        match self {
            Problem::NodeMissing(_) => ProblemKind::NodeMissing,
            Problem::Unknown(_) => ProblemKind::InputUnknown,
            Problem::PolicyTable(_) => ProblemKind::PolicyTable,
            Problem::ConfigIgnored { .. } => ProblemKind::ConfigIgnored,
            Problem::PeerIgnored { .. } => ProblemKind::PeerIgnored,
            Problem::NoAddress(_) => ProblemKind::NoAddress,
            Problem::NoBgpAddress => ProblemKind::NoBgpAddress,
            Problem::NeedsIpv4 => ProblemKind::NeedsIpv4,
            Problem::PasswordMissing { .. } => ProblemKind::PasswordMissing,
            Problem::PasswordUnknown { .. } => ProblemKind::PasswordUnknown,
            Problem::PasswordNotRead { .. } => ProblemKind::PasswordNotRead,
            Problem::DuplicateAddress { .. } => ProblemKind::DuplicateAddress,
            Problem::NeighborInvalid { .. } => ProblemKind::NeighborInvalid,
            Problem::Route(_) => ProblemKind::Unroutable,
            Problem::NoTunnelAddress { .. } => ProblemKind::NoTunnelAddress,
            Problem::Publish(_) => ProblemKind::Publish,
            Problem::Speaker(_) => ProblemKind::Speaker,
            Problem::Kernel(_) => ProblemKind::Kernel,
            Problem::TunnelFilter(_) => ProblemKind::TunnelFilter,
        }
    }

    /// As `/status` carries it.
    pub fn report(&self) -> status::Problem {
        status::Problem {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}
