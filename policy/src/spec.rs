//! The reference semantics of NetworkPolicy, written from the API
//! documentation (networking.k8s.io/v1 NetworkPolicySpec, -IngressRule,
//! -EgressRule, -Peer, -Port) and not from Margay's rules, so that the
//! rules can be tested against it:
//!
//! - a pod is isolated for ingress (egress) when at least one policy in
//!   its namespace selects it and has that direction in its policyTypes;
//!   a pod not isolated for a direction allows everything that way;
//! - an isolated pod allows a connection when at least one rule of one of
//!   the policies isolating it allows it (policies are additive);
//! - a rule allows when one of its peers matches the other end (no peers:
//!   every peer) and one of its ports matches (no ports: every port);
//! - a peer is pods (podSelector in the policy's namespace;
//!   namespaceSelector alone: every pod of the matching namespaces; both:
//!   the matching pods of the matching namespaces) or an ipBlock (its CIDR
//!   but none of its excepts, matched on the address);
//! - a port is a number or a range (endPort) of a protocol, every port of
//!   a protocol (port omitted), or a name resolved on the destination pod
//!   (a destination that is no pod matches no named port);
//! - a connection passes when the source's egress and the destination's
//!   ingress both allow it.
//!
//! Outside it, for the data plane to add: replies of allowed connections,
//! and connections from a node's own host network to its pods, always
//! pass; a pod reaching itself is never filtered.

use std::net::IpAddr;

use serde::Serialize;

use crate::model::{Direction, Peer, Pod, PortMatch, Rule};
use crate::{PodKey, PolicyKey, Proto, World};

/// A connection as the kernel sees its first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Connection {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol.
    pub proto: Proto,
    /// Destination port.
    pub port: u16,
}

/// A rule of a policy: which one allowed a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// The policy.
    pub policy: PolicyKey,
    /// The index of the rule in its direction's list.
    pub rule: usize,
}

/// What one end's policies say about a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "decision")]
pub enum Side {
    /// The end is not a pod of the pod network (no policy applies).
    NotAPod,
    /// No policy isolates the pod in this direction: allowed.
    NotIsolated,
    /// Isolated, and these rules allow it.
    Allowed {
        /// The rules that allow it.
        by: Vec<RuleRef>,
    },
    /// Isolated by these policies, and none allows it.
    Denied {
        /// The policies isolating the pod.
        isolated_by: Vec<PolicyKey>,
    },
}

impl Side {
    /// Whether this end lets the connection through.
    pub fn allows(&self) -> bool {
        !matches!(self, Self::Denied { .. })
    }
}

/// The decision on a connection, both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The source pod's egress.
    pub egress: Side,
    /// The destination pod's ingress.
    pub ingress: Side,
}

impl Verdict {
    /// Whether the connection passes.
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// Decides `c` in `world`.
pub fn decide(world: &World, c: &Connection) -> Verdict {
    let src = world.pod_by_ip(c.src);
    let dst = world.pod_by_ip(c.dst);
    let egress = match src {
        None => Side::NotAPod,
        Some((key, _)) => side(world, key, Direction::Egress, c, dst),
    };
    let ingress = match dst {
        None => Side::NotAPod,
        Some((key, _)) => side(world, key, Direction::Ingress, c, dst),
    };
    Verdict { egress, ingress }
}

/// The policies that isolate pod `key` in `dir`.
pub fn isolating(world: &World, key: &PodKey, dir: Direction) -> Vec<PolicyKey> {
    let Some(pod) = world.pods.get(key) else {
        return Vec::new();
    };
    world
        .policies
        .iter()
        .filter(|(pk, p)| {
            pk.namespace == key.namespace
                && p.rules(dir).is_some()
                && p.selector.matches(&pod.labels)
        })
        .map(|(pk, _)| pk.clone())
        .collect()
}

/// `me`'s side in `dir`; the other end is the source (ingress) or the
/// destination (egress); `dst` is the destination pod, for named ports.
fn side(
    world: &World,
    me: &PodKey,
    dir: Direction,
    c: &Connection,
    dst: Option<(&PodKey, &Pod)>,
) -> Side {
    let isolated_by = isolating(world, me, dir);
    if isolated_by.is_empty() {
        return Side::NotIsolated;
    }
    let other_ip = match dir {
        Direction::Ingress => c.src,
        Direction::Egress => c.dst,
    };
    let other = world.pod_by_ip(other_ip);
    let mut by = Vec::new();
    for pk in &isolated_by {
        let rules = world.policies[pk].rules(dir).unwrap_or_default();
        for (i, r) in rules.iter().enumerate() {
            if rule_allows(
                world,
                &pk.namespace,
                r,
                other_ip,
                other,
                c,
                dst.map(|d| d.1),
            ) {
                by.push(RuleRef {
                    policy: pk.clone(),
                    rule: i,
                });
            }
        }
    }
    if by.is_empty() {
        Side::Denied { isolated_by }
    } else {
        Side::Allowed { by }
    }
}

fn rule_allows(
    world: &World,
    policy_ns: &str,
    r: &Rule,
    other_ip: IpAddr,
    other: Option<(&PodKey, &Pod)>,
    c: &Connection,
    dst: Option<&Pod>,
) -> bool {
    let peer_ok = r.peers.is_empty()
        || r.peers
            .iter()
            .any(|p| peer_matches(world, policy_ns, p, other_ip, other));
    let port_ok = r.ports.is_empty() || r.ports.iter().any(|p| port_matches(p, c, dst));
    peer_ok && port_ok
}

/// Whether `peer` of a policy in `policy_ns` matches the end at `ip`
/// (`pod` if it is one).
pub fn peer_matches(
    world: &World,
    policy_ns: &str,
    peer: &Peer,
    ip: IpAddr,
    pod: Option<(&PodKey, &Pod)>,
) -> bool {
    match peer {
        Peer::Block { cidr, except } => cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)),
        Peer::Pods { namespaces, pods } => {
            let Some((key, p)) = pod else { return false };
            let ns_ok = match namespaces {
                None => &*key.namespace == policy_ns,
                Some(sel) => {
                    let empty = Default::default();
                    sel.matches(world.namespace_labels(&key.namespace).unwrap_or(&empty))
                }
            };
            ns_ok && pods.matches(&p.labels)
        }
    }
}

fn port_matches(p: &PortMatch, c: &Connection, dst: Option<&Pod>) -> bool {
    match p {
        PortMatch::All { proto } => *proto == c.proto,
        PortMatch::Range { proto, first, last } => {
            *proto == c.proto && (*first..=*last).contains(&c.port)
        }
        PortMatch::Named { proto, name } => {
            *proto == c.proto && dst.and_then(|d| d.named_port(name, *proto)) == Some(c.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, NamedPort, Namespace, Policy};
    use crate::selector::Selector;

    /// Namespaces x, y; pods x/a (app=a), x/b (app=b), y/a (app=a).
    fn world() -> World {
        let mut w = World::default();
        for ns in ["x", "y"] {
            w.namespaces.insert(
                ns.into(),
                Namespace {
                    labels: [("ns".to_string(), ns.to_string())].into(),
                },
            );
        }
        for (i, (ns, name)) in [("x", "a"), ("x", "b"), ("y", "a")].iter().enumerate() {
            w.pods.insert(
                Key::new(ns, name),
                Pod {
                    labels: std::sync::Arc::new([("app".to_string(), name.to_string())].into()),
                    ips: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
                    node: None,
                    ports: [NamedPort {
                        name: "web".into(),
                        proto: Proto::Tcp,
                        port: 80,
                    }]
                    .into(),
                },
            );
        }
        w
    }

    fn conn(src: &str, dst: &str, port: u16) -> Connection {
        Connection {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Proto::Tcp,
            port,
        }
    }

    /// Policy `x/<name>` in `w`: of the pods `selector` picks, in one
    /// direction, allowing what `rules` say.
    fn insert(w: &mut World, name: &str, selector: Selector, dir: Direction, rules: Vec<Rule>) {
        let (ingress, egress) = match dir {
            Direction::Ingress => (Some(rules), None),
            Direction::Egress => (None, Some(rules)),
        };
        let p = Policy {
            selector,
            ingress,
            egress,
        };
        w.policies.insert(Key::new("x", name), p);
    }

    const XA: &str = "10.0.0.1";
    const XB: &str = "10.0.0.2";
    const YA: &str = "10.0.0.3";

    #[test]
    fn no_policy_allows_everything() {
        let w = world();
        let v = decide(&w, &conn(XA, XB, 80));
        assert!(v.allowed());
        assert_eq!(v.ingress, Side::NotIsolated);
        assert_eq!(decide(&w, &conn("192.0.2.1", XB, 80)).egress, Side::NotAPod);
    }

    #[test]
    fn deny_all_then_an_allow_is_additive() {
        let mut w = world();
        insert(
            &mut w,
            "deny",
            Selector::everything(),
            Direction::Ingress,
            vec![],
        );
        assert!(!decide(&w, &conn(XA, XB, 80)).allowed());
        assert!(!decide(&w, &conn(YA, XB, 80)).allowed());
        // Egress from x is not isolated: x/a reaches y/a.
        assert!(decide(&w, &conn(XA, YA, 80)).allowed());
        let from_a = Rule {
            peers: vec![Peer::Pods {
                namespaces: None,
                pods: Selector::labels([("app", "a")]),
            }],
            ports: vec![PortMatch::Named {
                proto: Proto::Tcp,
                name: "web".into(),
            }],
        };
        let to_b = Selector::labels([("app", "b")]);
        insert(&mut w, "allow-a", to_b, Direction::Ingress, vec![from_a]);
        let v = decide(&w, &conn(XA, XB, 80));
        assert!(v.allowed(), "{v:?}");
        assert_eq!(
            v.ingress,
            Side::Allowed {
                by: vec![RuleRef {
                    policy: Key::new("x", "allow-a"),
                    rule: 0
                }]
            }
        );
        // The named port resolves to 80 on x/b: 81 is not it.
        assert!(!decide(&w, &conn(XA, XB, 81)).allowed());
        // A podSelector alone means the policy's namespace: y/a is out.
        assert!(!decide(&w, &conn(YA, XB, 80)).allowed());
    }

    #[test]
    fn namespace_and_pod_selectors_together_are_an_and() {
        let mut w = world();
        let peer = |namespaces| Peer::Pods {
            namespaces,
            pods: Selector::labels([("app", "a")]),
        };
        let rule = Rule {
            peers: vec![peer(Some(Selector::labels([("ns", "y")])))],
            ports: vec![],
        };
        let to_b = Selector::labels([("app", "b")]);
        insert(&mut w, "p", to_b, Direction::Ingress, vec![rule]);
        assert!(decide(&w, &conn(YA, XB, 1)).allowed());
        assert!(!decide(&w, &conn(XA, XB, 1)).allowed());
    }

    #[test]
    fn egress_ip_block_with_except() {
        let mut w = world();
        let rule = Rule {
            peers: vec![Peer::Block {
                cidr: "10.0.0.0/24".parse().unwrap(),
                except: vec!["10.0.0.3/32".parse().unwrap()],
            }],
            ports: vec![PortMatch::Range {
                proto: Proto::Tcp,
                first: 80,
                last: 81,
            }],
        };
        let from_a = Selector::labels([("app", "a")]);
        insert(&mut w, "p", from_a, Direction::Egress, vec![rule]);
        assert!(decide(&w, &conn(XA, XB, 81)).allowed());
        assert!(!decide(&w, &conn(XA, XB, 82)).allowed());
        assert!(!decide(&w, &conn(XA, YA, 80)).allowed());
        assert!(!decide(&w, &conn(XA, "192.0.2.1", 80)).allowed());
        // Ingress into x/a is not isolated by an egress-only policy.
        assert!(decide(&w, &conn(XB, XA, 9)).allowed());
        let mut udp = conn(XA, XB, 80);
        udp.proto = Proto::Udp;
        assert!(!decide(&w, &udp).allowed());
    }
}
