//! What a NetworkPolicy means on a node, including one that cannot be
//! enforced as written: the model refuses it (the API server accepted
//! something this version cannot read), or its rules cost more than
//! [`MAX_POLICY_COST`]. Such a policy is enforced *fail closed*: the pods
//! it selects are isolated by it in its directions with nothing allowed,
//! so a tenant's bad object can only deny its own pods, never open them,
//! and every node (whatever it saw before) decides the same. The agent
//! enforces it so and reports it; `margayctl` shows it so.

use k8s_openapi::api::networking::v1 as net;

use crate::model::{Direction, Key, Peer};
use crate::{Policy, PolicyKey, Selector};

/// The most a policy may cost ([`cost`]): above it the policy is refused,
/// reported, and enforced fail closed, while every other policy stays
/// enforced. A rule with 1,000 ipBlocks and 1,000 ports costs about 4,000.
pub const MAX_POLICY_COST: usize = 10_000;

/// Why a NetworkPolicy is not enforced as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unenforced {
    /// The model refuses it.
    #[error("refused: {0}")]
    Refused(crate::Error),
    /// Its rules would cost more than the bound.
    #[error("too large: its rules cost {cost} (at most {max})")]
    TooLarge {
        /// What it costs ([`cost`]).
        cost: usize,
        /// The bound ([`MAX_POLICY_COST`]).
        max: usize,
    },
    /// This node's kernel refused its rules (the rest of the table loads
    /// without them): until it changes.
    #[error("this node's kernel refused its rules: {0}")]
    LoadFailed(String),
}

/// `policy` enforced fail closed: its selector and directions, nothing
/// allowed.
pub fn closed(policy: &Policy) -> Policy {
    Policy {
        selector: policy.selector.clone(),
        ingress: policy.ingress.as_ref().map(|_| Vec::new()),
        egress: policy.egress.as_ref().map(|_| Vec::new()),
    }
}

/// What enforcing `policy` costs: the rule lines its peers, ports and
/// excepts make (they add up: never their product).
pub fn cost(policy: &Policy) -> usize {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .filter_map(|d| policy.rules(d))
        .flatten()
        .map(|r| {
            let excepts: usize = r
                .peers
                .iter()
                .map(|p| match p {
                    Peer::Block { except, .. } => except.len(),
                    Peer::Pods { .. } => 0,
                })
                .sum();
            1 + 2 * r.peers.len() + 2 * r.ports.len() + excepts
        })
        .sum()
}

/// What `p` means when it cannot be enforced as written: the pods it
/// selects (all of its namespace when even its selector cannot be read)
/// isolated in its directions (both when its policyTypes cannot be
/// read), nothing allowed.
pub fn fail_closed(p: &net::NetworkPolicy) -> Policy {
    let spec = p.spec.as_ref();
    let selector = spec
        .and_then(|s| s.pod_selector.as_ref())
        .map_or(Ok(Selector::everything()), Selector::from_k8s)
        .unwrap_or_else(|_| Selector::everything());
    let (ingress, egress) = match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(t) if !t.is_empty() && t.iter().all(|x| x == "Ingress" || x == "Egress") => (
            t.iter().any(|x| x == "Ingress"),
            t.iter().any(|x| x == "Egress"),
        ),
        Some(t) if !t.is_empty() => (true, true),
        _ => (
            true,
            spec.and_then(|s| s.egress.as_ref())
                .is_some_and(|e| !e.is_empty()),
        ),
    };
    Policy {
        selector,
        ingress: ingress.then(Vec::new),
        egress: egress.then(Vec::new),
    }
}

/// The policy as this node enforces it, and why not as written when it
/// is not; `None` for an object without namespace or name.
pub fn enforced(p: &net::NetworkPolicy) -> Option<(PolicyKey, Policy, Option<Unenforced>)> {
    let key = Key::new(
        p.metadata.namespace.as_deref()?,
        p.metadata.name.as_deref()?,
    );
    Some(match Policy::from_k8s(p) {
        Ok((_, kp)) => {
            let cost = cost(&kp);
            if cost <= MAX_POLICY_COST {
                (key, kp, None)
            } else {
                let closed = closed(&kp);
                let why = Unenforced::TooLarge {
                    cost,
                    max: MAX_POLICY_COST,
                };
                (key, closed, Some(why))
            }
        }
        Err(e) => (key, fail_closed(p), Some(Unenforced::Refused(e))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(v: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_policy_that_cannot_be_enforced_is_enforced_fail_closed() {
        let ok = policy(serde_json::json!({
            "metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{}]}
        }));
        let (_, p, why) = enforced(&ok).unwrap();
        assert_eq!((p.ingress.unwrap().len(), why), (1, None));
        // An unknown policyType: isolated both ways, its own selector.
        let mut bad = ok.clone();
        bad.spec.as_mut().unwrap().policy_types = Some(vec!["Sideways".into()]);
        let (_, p, why) = enforced(&bad).unwrap();
        assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
        assert!(
            p.selector
                .matches(&[("app".to_string(), "a".to_string())].into())
        );
        assert!(matches!(why, Some(Unenforced::Refused(_))));
        // A selector it cannot read: every pod of its namespace.
        let mut sel = ok.clone();
        sel.spec.as_mut().unwrap().pod_selector = Some(
            serde_json::from_value(serde_json::json!({
                "matchExpressions": [{"key": "a", "operator": "Near"}]
            }))
            .unwrap(),
        );
        let (_, p, _) = enforced(&sel).unwrap();
        assert!(p.selector.is_everything());
        // Too large: its own selector and directions, nothing allowed.
        let big = policy(serde_json::json!({
            "metadata": {"namespace": "x", "name": "big"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": (0..3000).map(|i| serde_json::json!({"ipBlock": {"cidr": format!("10.{}.{}.0/24", i / 256, i % 256)}})).collect::<Vec<_>>(),
                "ports": (0..3000).map(|i| serde_json::json!({"port": 1 + i})).collect::<Vec<_>>()
            }]}
        }));
        let (_, p, why) = enforced(&big).unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
        assert!(matches!(why, Some(Unenforced::TooLarge { cost, .. }) if cost > MAX_POLICY_COST));
    }
}
