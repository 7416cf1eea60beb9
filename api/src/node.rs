//! What Margay says on Kubernetes Node objects: the identity annotations
//! each node's agent publishes and the others read, the route reflector
//! annotation operators set, and the Node condition with its heartbeat.

use std::time::Duration;

/// The node's BGP address with its subnet length, e.g. `10.0.0.5/24`.
pub const ANN_ADDRESS: &str = "margay.dev/bgp-address";
/// The node's AS number.
pub const ANN_ASN: &str = "margay.dev/bgp-asn";
/// Its VXLAN device's address.
pub const ANN_VXLAN_ADDRESS: &str = "margay.dev/vxlan-tunnel-address";
/// Its VXLAN device's MAC.
pub const ANN_VXLAN_MAC: &str = "margay.dev/vxlan-tunnel-mac";
/// Set by the operator: this node is a route reflector with this cluster ID.
pub const ANN_RR_CLUSTER_ID: &str = "margay.dev/route-reflector-cluster-id";

/// The Node condition the agent maintains.
pub const CONDITION: &str = "MargayReady";
/// Its reason when routing is complete.
pub const REASON_UP: &str = "MargayIsUp";
/// Its reason when something keeps routing from being complete.
pub const REASON_INCOMPLETE: &str = "RoutingIncomplete";
/// How often the condition's heartbeat is renewed even when nothing
/// changed (`margayctl` reads an older heartbeat as "agent not running").
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// Whether a Node condition's heartbeat is more recent than `within`.
#[cfg(feature = "crd")]
pub fn heartbeat_within(c: &k8s_openapi::api::core::v1::NodeCondition, within: Duration) -> bool {
    c.last_heartbeat_time.as_ref().is_some_and(|t| {
        let age = jiff::Timestamp::now().duration_since(t.0);
        age < jiff::SignedDuration::from_secs(within.as_secs() as i64)
    })
}

/// Node `n`'s condition of `type_`.
#[cfg(feature = "crd")]
pub fn condition<'a>(
    n: &'a k8s_openapi::api::core::v1::Node,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::NodeCondition> {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == type_))
}

/// Whether node `n`'s agent looks alive: its [`CONDITION`] heartbeat is
/// within two heartbeats (and a little slack).
#[cfg(feature = "crd")]
pub fn agent_alive(n: &k8s_openapi::api::core::v1::Node) -> bool {
    let within = 2 * HEARTBEAT + Duration::from_secs(30);
    condition(n, CONDITION).is_some_and(|c| heartbeat_within(c, within))
}
