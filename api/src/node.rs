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
/// Its IPIP tunnel address (on `tunl0`), published once `tunl0` is up
/// with it: the other nodes encapsulate to this node only then.
pub const ANN_IPIP_ADDRESS: &str = "margay.dev/ipip-tunnel-address";
/// Set by the operator: this node is a route reflector with this cluster ID.
pub const ANN_RR_CLUSTER_ID: &str = "margay.dev/route-reflector-cluster-id";

/// The Node condition the agent maintains.
pub const CONDITION: &str = "MargayReady";
/// Its reason when routing is complete.
pub const REASON_UP: &str = "MargayIsUp";
/// Its reason when something keeps routing from being complete.
pub const REASON_INCOMPLETE: &str = "RoutingIncomplete";
/// How often the condition is rewritten even when nothing changed (its
/// `lastHeartbeatTime`, as kubelet refreshes its own conditions). Liveness
/// is the heartbeat Lease's ([`heartbeat_lease`]), renewed far more often
/// and watched by nobody.
pub const HEARTBEAT: Duration = Duration::from_secs(300);

/// How often an agent renews its heartbeat Lease.
pub const HEARTBEAT_RENEW: Duration = Duration::from_secs(30);
/// How long a heartbeat Lease says its agent is alive after a renewal.
pub const HEARTBEAT_DURATION: Duration = Duration::from_secs(90);

/// The namespace of Margay's Leases (the leader Lease and every node's
/// heartbeat Lease) unless configured otherwise (the agent's and
/// margayctl's `--lease-namespace`, the chart's `leaseNamespace.name`). A
/// namespace of their own, because RBAC cannot limit `create` to names: the
/// agents may create and update Leases there and in no other namespace
/// (not `kube-system`, where the scheduler's and controller-manager's
/// leader Leases are).
pub const LEASE_NAMESPACE: &str = "margay-system";

/// The name of node `node`'s heartbeat Lease (`coordination.k8s.io`, in
/// the Lease namespace, [`LEASE_NAMESPACE`] by default): `margay-node-NODE`,
/// shortened with a hash when that would exceed an object name's 253
/// characters.
pub fn heartbeat_lease(node: &str) -> String {
    crate::stable::bounded_name("margay-node-", node, "")
}

/// Whether a heartbeat Lease was renewed within its duration (by the
/// reader's clock; `slack` allows for clock differences).
#[cfg(feature = "crd")]
pub fn lease_alive(l: &k8s_openapi::api::coordination::v1::Lease, slack: Duration) -> bool {
    let Some(s) = l.spec.as_ref() else {
        return false;
    };
    let duration = s
        .lease_duration_seconds
        .map_or(HEARTBEAT_DURATION, |d| Duration::from_secs(d.max(0) as u64));
    s.renew_time.as_ref().is_some_and(|t| {
        let age = jiff::Timestamp::now().duration_since(t.0);
        age < jiff::SignedDuration::from_secs((duration + slack).as_secs() as i64)
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_lease_names_are_valid_and_distinct() {
        assert_eq!(heartbeat_lease("node1"), "margay-node-node1");
        let long_a = format!("{}a", "x".repeat(250));
        let long_b = format!("{}b", "x".repeat(250));
        let (a, b) = (heartbeat_lease(&long_a), heartbeat_lease(&long_b));
        assert!(a.len() <= 253 && b.len() <= 253, "{} {}", a.len(), b.len());
        assert_ne!(a, b);
        assert!(a.starts_with("margay-node-xxx"));
    }

    #[cfg(feature = "crd")]
    #[test]
    fn a_lease_is_alive_within_its_duration() {
        use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let at = |ago: i64| Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(
                    jiff::Timestamp::now() - jiff::SignedDuration::from_secs(ago),
                )),
                lease_duration_seconds: Some(90),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(lease_alive(&at(10), Duration::ZERO));
        assert!(!lease_alive(&at(100), Duration::ZERO));
        assert!(lease_alive(&at(100), Duration::from_secs(30)));
        assert!(!lease_alive(&Lease::default(), Duration::from_secs(30)));
    }
}
