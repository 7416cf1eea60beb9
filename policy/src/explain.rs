//! What operators ask of the policies (`margayctl policy show|check`), as
//! typed reports over a [`World`]: for a pod, the policies selecting it in
//! each direction with every rule's peers resolved to the pods they match
//! now and its ports (named ports resolved on the pod, for ingress); for a
//! connection, [`spec::decide`]'s verdict with the rules behind it. Pure:
//! the CLI reads the world, this decides, the CLI renders.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Serialize;

use crate::enforce::Unenforced;
use crate::model::{Direction, Peer, PortMatch};
use crate::spec::{self, Connection, Verdict};
use crate::{Error, Namespace, Pod, PodKey, PolicyKey, Proto, World};

/// The world built from lists of the Kubernetes objects, and the policies
/// that could not be read (the API server would have refused them).
pub fn world_from_k8s(
    namespaces: &[core::Namespace],
    pods: &[core::Pod],
    policies: &[net::NetworkPolicy],
) -> (World, Vec<(PolicyKey, Unenforced)>) {
    let mut w = World::default();
    w.namespaces
        .extend(namespaces.iter().filter_map(Namespace::from_k8s));
    w.pods.extend(pods.iter().filter_map(Pod::from_k8s));
    let mut bad = Vec::new();
    for p in policies {
        // As the agents enforce it: one that cannot be enforced as
        // written, fail closed.
        if let Some((k, v, why)) = crate::enforce::enforced(p) {
            if let Some(why) = why {
                bad.push((k.clone(), why));
            }
            w.policies.insert(k, v);
        }
    }
    (w, bad)
}

/// Marks the policies of `s` that are not enforced as written (`bad`,
/// from [`world_from_k8s`]) with why.
pub fn mark_unenforced(s: &mut PodPolicies, bad: &[(PolicyKey, Unenforced)]) {
    for p in s
        .ingress
        .policies
        .iter_mut()
        .chain(s.egress.policies.iter_mut())
    {
        p.unenforced = bad
            .iter()
            .find(|(k, _)| *k == p.policy)
            .map(|(_, why)| why.to_string());
    }
}

/// A pod and what its policies allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodPolicies {
    /// The pod.
    pub pod: PodKey,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its node.
    pub node: Option<String>,
    /// Incoming connections.
    pub ingress: DirectionView,
    /// Outgoing connections.
    pub egress: DirectionView,
}

/// One direction of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionView {
    /// Whether a policy isolates it (if not, everything is allowed).
    pub isolated: bool,
    /// The policies selecting it for this direction (their union allows).
    pub policies: Vec<PolicyView>,
}

/// A policy selecting the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyView {
    /// The policy.
    pub policy: PolicyKey,
    /// Its rules for the direction (none: it allows nothing).
    pub rules: Vec<RuleView>,
    /// Why it is not enforced as written, when it is not (it is then
    /// enforced fail closed: no rules, nothing allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenforced: Option<String>,
}

/// A rule, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleView {
    /// No peers given: every source or destination.
    pub any_peer: bool,
    /// Its peers.
    pub peers: Vec<PeerView>,
    /// Its ports as written (empty: every port of every protocol).
    pub ports: Vec<PortView>,
}

/// A peer and the pods it matches now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// The peer as the policy says it.
    pub peer: String,
    /// The pods it matches (an ipBlock: the pods inside it).
    pub pods: Vec<PodRef>,
}

/// A pod a peer matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// The pod.
    pub pod: PodKey,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// A port match and, for a named port on the pod itself, its number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortView {
    /// As written: `tcp/80`, `udp/1000-2000`, `tcp/*`, `tcp/http`.
    pub port: String,
    /// A named ingress port: the pod's number for it (`None`: the pod has
    /// no such port, so the rule allows nothing on it). Egress named ports
    /// resolve on each destination pod.
    pub resolved: Option<u16>,
}

/// What `key`'s policies allow; `None` if it is not a pod of the world.
pub fn show(world: &World, key: &PodKey) -> Option<PodPolicies> {
    let pod = world.pods.get(key)?;
    let view = |dir: Direction| {
        let policies: Vec<PolicyView> = spec::isolating(world, key, dir)
            .into_iter()
            .map(|pk| {
                let rules = world.policies[&pk]
                    .rules(dir)
                    .unwrap_or_default()
                    .iter()
                    .map(|r| RuleView {
                        any_peer: r.peers.is_empty(),
                        peers: r
                            .peers
                            .iter()
                            .map(|p| peer_view(world, &pk.namespace, p))
                            .collect(),
                        ports: r
                            .ports
                            .iter()
                            .map(|m| PortView {
                                port: m.to_string(),
                                resolved: match (m, dir) {
                                    (PortMatch::Named { proto, name }, Direction::Ingress) => {
                                        pod.named_port(name, *proto)
                                    }
                                    _ => None,
                                },
                            })
                            .collect(),
                    })
                    .collect();
                PolicyView {
                    policy: pk,
                    rules,
                    unenforced: None,
                }
            })
            .collect();
        DirectionView {
            isolated: !policies.is_empty(),
            policies,
        }
    };
    Some(PodPolicies {
        pod: key.clone(),
        ips: pod.ips.clone(),
        node: pod.node.as_deref().map(String::from),
        ingress: view(Direction::Ingress),
        egress: view(Direction::Egress),
    })
}

fn peer_view(world: &World, policy_ns: &str, peer: &Peer) -> PeerView {
    let pods = world
        .pods
        .iter()
        .filter(|(k, p)| {
            p.ips
                .iter()
                .any(|ip| spec::peer_matches(world, policy_ns, peer, *ip, Some((k, p))))
        })
        .map(|(k, p)| PodRef {
            pod: k.clone(),
            ips: p.ips.clone(),
        })
        .collect();
    PeerView {
        peer: peer.to_string(),
        pods,
    }
}

/// One end of a connection to check: a pod or an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum End {
    /// A pod, by `namespace/name`.
    Pod {
        /// The pod.
        pod: PodKey,
    },
    /// An address (a pod's or not).
    Address {
        /// The address.
        ip: IpAddr,
    },
}

impl std::str::FromStr for End {
    type Err = Error;
    /// An address, else `namespace/name` (`name` in `default`).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(Self::Address { ip }),
            Err(_) => Ok(Self::Pod { pod: s.parse()? }),
        }
    }
}

/// `PORT[/PROTO]` (TCP when no protocol is given).
pub fn parse_port(s: &str) -> Result<(u16, Proto), Error> {
    let (n, proto) = match s.split_once('/') {
        Some((n, p)) => (n, p.parse()?),
        None => (s, Proto::Tcp),
    };
    let port = n
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::Port(format!("{s:?}: want PORT[/tcp|udp|sctp], PORT 1-65535")))?;
    Ok((port, proto))
}

/// A connection checked, and why it passes or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The connection, as addresses.
    pub connection: Connection,
    /// The source pod, if the source is one.
    pub from: Option<PodKey>,
    /// The destination pod, if the destination is one.
    pub to: Option<PodKey>,
    /// Whether it passes.
    pub allowed: bool,
    /// Each end's policies' say.
    pub verdict: Verdict,
}

/// The address of `end`: a pod's first address of the family of `other`
/// (any when `other` is not known).
fn address(world: &World, end: &End, family_of: Option<IpAddr>) -> Result<IpAddr, Error> {
    match end {
        End::Address { ip } => Ok(*ip),
        End::Pod { pod } => {
            let p = world
                .pods
                .get(pod)
                .ok_or_else(|| Error::Lookup(format!("no pod {pod} with an address")))?;
            p.ips
                .iter()
                .find(|ip| family_of.is_none_or(|o| o.is_ipv4() == ip.is_ipv4()))
                .copied()
                .ok_or_else(|| Error::Lookup(format!("pod {pod} has no address of that family")))
        }
    }
}

/// What the policies decide for a connection from `from` to `to` on
/// `port`/`proto`, and why.
pub fn check(world: &World, from: &End, to: &End, port: u16, proto: Proto) -> Result<Check, Error> {
    let hint = match (from, to) {
        (End::Address { ip }, _) | (_, End::Address { ip }) => Some(*ip),
        _ => None,
    };
    let src = address(world, from, hint)?;
    let dst = address(world, to, Some(src))?;
    let c = Connection {
        src,
        dst,
        proto,
        port,
    };
    let verdict = spec::decide(world, &c);
    Ok(Check {
        connection: c,
        from: world.pod_by_ip(src).map(|(k, _)| k.clone()),
        to: world.pod_by_ip(dst).map(|(k, _)| k.clone()),
        allowed: verdict.allowed(),
        verdict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Side;

    fn world() -> World {
        let ns = |n: &str| -> core::Namespace {
            serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).unwrap()
        };
        let pod = |ns: &str, name: &str, ip: &str| -> core::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "ports": [
                    {"name": "web", "containerPort": 8080, "protocol": "TCP"}]}]},
                "status": {"podIP": ip}
            }))
            .unwrap()
        };
        let pol =
            |v: serde_json::Value| -> net::NetworkPolicy { serde_json::from_value(v).unwrap() };
        let (w, bad) = world_from_k8s(
            &[ns("x"), ns("y")],
            &[
                pod("x", "a", "10.0.0.1"),
                pod("x", "b", "10.0.0.2"),
                pod("y", "c", "10.0.0.3"),
            ],
            &[
                pol(serde_json::json!({
                    "metadata": {"namespace": "x", "name": "a-from-b"},
                    "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                                          "ports": [{"port": "web"}]}]}
                })),
                pol(serde_json::json!({
                    "metadata": {"namespace": "z", "name": "bad"},
                    "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}
                })),
            ],
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].0.to_string(), "z/bad");
        w
    }

    #[test]
    fn show_resolves_peers_and_named_ports() {
        let w = world();
        let s = show(&w, &"x/a".parse().unwrap()).unwrap();
        assert!(s.ingress.isolated);
        assert!(!s.egress.isolated);
        let r = &s.ingress.policies[0].rules[0];
        assert_eq!(s.ingress.policies[0].policy.to_string(), "x/a-from-b");
        assert_eq!(r.peers[0].pods.len(), 1);
        assert_eq!(r.peers[0].pods[0].pod.to_string(), "x/b");
        assert_eq!(r.ports[0].port, "tcp/web");
        assert_eq!(r.ports[0].resolved, Some(8080));
        // Not selected: not isolated either way.
        let s = show(&w, &"x/b".parse().unwrap()).unwrap();
        assert!(!s.ingress.isolated && !s.egress.isolated);
        assert!(show(&w, &"x/nope".parse().unwrap()).is_none());
    }

    #[test]
    fn check_says_which_rule_allows_and_which_policy_denies() {
        let w = world();
        let b: End = "x/b".parse().unwrap();
        let a: End = "x/a".parse().unwrap();
        let ok = check(&w, &b, &a, 8080, Proto::Tcp).unwrap();
        assert!(ok.allowed);
        assert!(
            matches!(&ok.verdict.ingress, Side::Allowed { by } if &*by[0].policy.name == "a-from-b")
        );
        assert_eq!(ok.verdict.egress, Side::NotIsolated);
        let no = check(&w, &"y/c".parse().unwrap(), &a, 8080, Proto::Tcp).unwrap();
        assert!(!no.allowed);
        assert!(
            matches!(&no.verdict.ingress, Side::Denied { isolated_by } if isolated_by.len() == 1)
        );
        // An address outside the cluster, and one that is a pod's.
        let ext: End = "192.0.2.1".parse().unwrap();
        assert!(!check(&w, &ext, &a, 8080, Proto::Tcp).unwrap().allowed);
        let by_ip = check(&w, &"10.0.0.2".parse().unwrap(), &a, 8080, Proto::Tcp).unwrap();
        assert!(by_ip.allowed);
        assert_eq!(by_ip.from.unwrap().to_string(), "x/b");
        assert!(check(&w, &"x/nope".parse().unwrap(), &a, 80, Proto::Tcp).is_err());
    }

    #[test]
    fn ports_parse_as_operators_write_them() {
        assert_eq!(parse_port("80").unwrap(), (80, Proto::Tcp));
        assert_eq!(parse_port("53/udp").unwrap(), (53, Proto::Udp));
        assert_eq!(parse_port("9/SCTP").unwrap(), (9, Proto::Sctp));
        assert!(parse_port("0").is_err());
        assert!(parse_port("80/icmp").is_err());
        assert!(parse_port("http").is_err());
    }
}
