//! The agent's `/status` document and the BGP speaker's views of its
//! sessions and routes, as types: the agent serialises them, `margayctl`
//! and the end-to-end tests deserialise them, so a renamed field is a
//! compile error on both sides instead of an empty column.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// BGP session states (RFC 4271 §8.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionState {
    /// Refusing connections.
    Idle,
    /// Waiting for an outgoing TCP connection to complete.
    Connect,
    /// Waiting for an incoming connection (or the retry timer).
    Active,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for KEEPALIVE.
    OpenConfirm,
    /// Up: UPDATEs flow.
    Established,
}

/// One BGP session as the speaker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighborView {
    /// Peer address.
    pub address: IpAddr,
    /// Peer AS.
    pub asn: u32,
    /// Session state.
    pub state: SessionState,
    /// Seconds since the state last changed.
    #[serde(default)]
    pub since_seconds: Option<u64>,
    /// Prefixes received and accepted.
    pub prefixes_received: usize,
    /// Prefixes advertised.
    pub prefixes_sent: usize,
    /// UPDATE messages received.
    pub updates_in: u64,
    /// UPDATE messages sent.
    pub updates_out: u64,
    /// Why the session last went down.
    #[serde(default)]
    pub last_error: Option<String>,
    /// A dynamic neighbor (from a listen range), not a configured one.
    pub dynamic: bool,
    /// Routes withdrawn from this peer instead of announced: their
    /// attributes need an UPDATE over 4096 octets.
    #[serde(default)]
    pub routes_too_big: u64,
    /// Its BFD session's state, when BFD is on for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdState>,
}

/// A BFD session's state (RFC 5880).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BfdState {
    /// Held down by its operator (or the peer's).
    AdminDown,
    /// Down: the peer is not heard, or said it is down.
    Down,
    /// The peer is heard and has not heard us yet.
    Init,
    /// Both sides hear each other.
    Up,
}

/// One best route of the speaker's RIB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    /// The prefix, e.g. `10.244.1.0/26`.
    pub prefix: String,
    /// Its next hops (several with ECMP; none for a local route).
    pub next_hops: Vec<IpAddr>,
    /// The peer it came from, or `local`.
    pub from: String,
    /// The AS path, flattened.
    pub as_path: Vec<u32>,
    /// LOCAL_PREF.
    #[serde(default)]
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC.
    #[serde(default)]
    pub med: Option<u32>,
    /// ORIGIN: `igp`, `egp` or `incomplete`.
    pub origin: String,
    /// Paths known for the prefix.
    pub paths: usize,
    /// Kept from a restarting peer, not yet refreshed (graceful restart).
    pub stale: bool,
}

/// What kind of thing keeps routing from being complete: what a reader
/// matches (never the sentence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// This node has no Node object.
    NodeMissing,
    /// An input could not be read (what depends on it was kept).
    InputUnknown,
    /// The NetworkPolicy table is not current.
    PolicyTable,
    /// The BGPConfiguration is invalid (defaults used).
    ConfigIgnored,
    /// A BGPPeer is invalid.
    PeerIgnored,
    /// The node's address could not be chosen.
    NoAddress,
    /// The node has no BGP address yet.
    NoBgpAddress,
    /// BGP needs an IPv4 router ID.
    NeedsIpv4,
    /// A peering's password Secret (or key) does not exist.
    PasswordMissing,
    /// A peering's password Secret cannot be read now.
    PasswordUnknown,
    /// A peering's password Secret was not read.
    PasswordNotRead,
    /// Two Nodes announce the same BGP address.
    DuplicateAddress,
    /// A neighbor the speaker would refuse.
    NeighborInvalid,
    /// A block that cannot be routed.
    Unroutable,
    /// A tunnel address could not be allocated or released.
    NoTunnelAddress,
    /// The node's identity could not be published.
    Publish,
    /// The BGP speaker refused or failed a call.
    Speaker,
    /// The kernel refused some of the routing state.
    Kernel,
    /// The tunnel filter could not be brought up to date.
    TunnelFilter,
    /// Read from `/status`, which carries the sentence only.
    Reported,
}

/// One thing that keeps routing from being complete: its kind and its
/// sentence (naming the object and the fix). On the wire it is the
/// sentence alone, as it always was; read back, its kind is
/// [`ProblemKind::Reported`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The sentence.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Serialize for Problem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.message)
    }
}

impl<'de> Deserialize<'de> for Problem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Problem {
            kind: ProblemKind::Reported,
            message: String::deserialize(d)?,
        })
    }
}

/// What the agent's routing loop last found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingStatus {
    /// This node's BGP address (with its subnet length).
    pub address: Option<String>,
    /// Its AS.
    pub asn: u32,
    /// Everything that keeps routing from being complete (on the wire, as
    /// sentences).
    pub problems: Vec<Problem>,
    /// Every input of the last pass was read from the Kubernetes API.
    pub datastore_ok: bool,
    /// Inputs the last pass could not read (their part of the plan kept
    /// what it had: nothing that depends on them was removed).
    #[serde(default)]
    pub unknown_inputs: Vec<String>,
    /// Every configured peer has sent its full table.
    pub bgp_synced: bool,
    /// Neighbors configured.
    pub neighbors: usize,
    /// Prefixes this node advertises.
    pub advertised: Vec<String>,
    /// Routes to remote blocks programmed.
    pub remote_routes: usize,
    /// This node's tunnel devices in use (`IPIP tunl0 10.244.1.1 MTU
    /// 1480`, with `not up` when the kernel refused), and the filter in
    /// front of them (`filter: IPIP (tunl0) taken from 3 node addresses
    /// only`).
    #[serde(default)]
    pub tunnels: Vec<String>,
}

/// How the Kubernetes API answers this agent, from its heartbeat Lease
/// renewals (every 30 s; a frozen API that leaves every watch open and
/// quiet shows here, not in the watched inputs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiView {
    /// The last renewal was answered.
    pub answering: bool,
    /// Why the last renewal failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Seconds since the API last answered (`None`: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_seconds_ago: Option<u64>,
    /// This agent holds the leader Lease (it writes pool status, collects
    /// leaks and writes the `Valid` conditions).
    pub leader: bool,
}

/// Why a NetworkPolicy is not enforced as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnenforcedReason {
    /// Margay cannot read it (the API server accepted something this
    /// version refuses).
    Refused,
    /// Its rules cost more than a policy may.
    TooLarge,
    /// This node's kernel refused its rules (this node only).
    LoadFailed,
}

/// A NetworkPolicy not enforced as written: it is enforced fail closed
/// (the pods it selects isolated by it, nothing allowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnenforcedPolicy {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID, when known (what its Events name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Why, as a kind.
    pub reason: UnenforcedReason,
    /// Why, as a sentence.
    pub message: String,
}

/// The node's NetworkPolicy engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// NetworkPolicies are watched and enforced (`false` with
    /// `--disable-policy`: workload sources are still checked).
    pub enforcing: bool,
    /// Kinds not listed yet (nothing is written until all are).
    #[serde(default)]
    pub waiting_for: Vec<String>,
    /// NetworkPolicies known.
    pub policies: usize,
    /// This node's workload interfaces.
    pub endpoints: usize,
    /// Pods known (this node's, and while watched other nodes').
    #[serde(default)]
    pub pods: usize,
    /// Other nodes' Pods are watched: a policy has pod or namespace
    /// peers (without one a node watches only its own Pods).
    #[serde(default)]
    pub remote_pods: bool,
    /// The kernel holds the table the engine computed: everything listed
    /// and the last load succeeded.
    pub current: bool,
    /// The last load's error, while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Policies not enforced as written.
    #[serde(default)]
    pub unenforced: Vec<UnenforcedPolicy>,
}

/// The agent's `/status` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The node's name.
    pub node: String,
    /// Ready (what `/readyz` answers).
    pub ready: bool,
    /// Why not, when not.
    pub not_ready: Vec<String>,
    /// The routing loop's findings.
    pub routing: RoutingStatus,
    /// How the Kubernetes API answers.
    #[serde(default)]
    pub api: ApiView,
    /// BGP sessions.
    pub peers: Vec<NeighborView>,
    /// BGP best routes.
    pub routes: Vec<RouteView>,
    /// NetworkPolicy (absent before the engine first reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_its_sentence_on_the_wire() {
        let p = Problem {
            kind: ProblemKind::NeedsIpv4,
            message: "BGP needs an IPv4 node address (the router ID)".into(),
        };
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json, serde_json::json!(p.message));
        let back: Problem = serde_json::from_value(json).unwrap();
        assert_eq!(back.kind, ProblemKind::Reported);
        assert_eq!(back.to_string(), p.message);
    }
}
