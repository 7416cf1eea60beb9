//! The world policy decisions are made over: namespaces with their
//! labels, pods with their labels, addresses and named container ports,
//! and NetworkPolicies in a typed form where every default of the API is
//! already applied (policyTypes, TCP, empty `from`/`to`/`ports`).
//!
//! Conversions from the Kubernetes objects refuse what the API server
//! would refuse ([`crate::Error`]): the agent reports such a policy and
//! leaves the rules it had for it in place.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::cidr::Cidr;
use crate::selector::{Labels, Selector};
use crate::{Error, Result};

/// A transport protocol a policy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    /// TCP (the API's default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    /// Every protocol.
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// From the API's field (absent = TCP).
    pub fn from_k8s(p: Option<&str>) -> Result<Self> {
        match p {
            None | Some("TCP") => Ok(Self::Tcp),
            Some("UDP") => Ok(Self::Udp),
            Some("SCTP") => Ok(Self::Sctp),
            Some(other) => Err(Error::Protocol(other.into())),
        }
    }

    /// Lower case, as nftables and `margayctl` write it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Proto {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_k8s(Some(&s.to_ascii_uppercase()))
    }
}

/// A namespaced name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    /// The namespace (shared: see [`Key::in_namespace`]).
    pub namespace: Arc<str>,
    /// The name.
    pub name: Arc<str>,
}

impl Key {
    /// `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `name` in namespace `namespace`, whose text is shared with the
    /// other keys holding it: a key's clones (the compiler keeps a pod's
    /// in several indexes) share both texts.
    pub fn in_namespace(namespace: &Arc<str>, name: &str) -> Self {
        Self {
            namespace: namespace.clone(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for Key {
    type Err = Error;
    /// `namespace/name`, or `name` in `default`.
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() => Ok(Self::new(ns, n)),
            None if !s.is_empty() => Ok(Self::new("default", s)),
            _ => Err(Error::Missing("namespace/name")),
        }
    }
}

/// A pod's key.
pub type PodKey = Key;
/// A policy's key.
pub type PolicyKey = Key;

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// Its protocol.
    pub proto: Proto,
    /// Its number.
    pub port: u16,
}

/// A pod as policy sees it: only pods on the pod network (not host
/// network) with an address take part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// Its labels: shared by pods labelled alike (a remote pod's are
    /// interned by the agent), so a cluster's pods cost their distinct
    /// label sets, not one map each.
    pub labels: std::sync::Arc<Labels>,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// The node it runs on (shared by its node's pods).
    pub node: Option<Arc<str>>,
    /// Its containers' named ports (shared by pods with the same).
    pub ports: Arc<[NamedPort]>,
}

impl Pod {
    /// From the Kubernetes object; `None` for a pod that has no part in
    /// policy (host network, no address yet, finished).
    pub fn from_k8s(p: &core::Pod) -> Option<(PodKey, Self)> {
        Self::from_k8s_unaddressed(p).filter(|(_, pod)| !pod.ips.is_empty())
    }

    /// As [`Pod::from_k8s`], but a pod with no address yet is kept (with
    /// none): the agent must know a pod's labels before the kubelet
    /// reports its address, to enforce from its first packet.
    pub fn from_k8s_unaddressed(p: &core::Pod) -> Option<(PodKey, Self)> {
        let key = Key::new(
            p.metadata.namespace.as_deref()?,
            p.metadata.name.as_deref()?,
        );
        let spec = p.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let st = p.status.as_ref();
        if matches!(
            st.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let mut ips: Vec<IpAddr> = st
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| a.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = st
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse().ok())
        {
            ips.push(ip);
        }
        let ports = named_ports(spec);
        Some((
            key,
            Self {
                labels: std::sync::Arc::new(p.metadata.labels.clone().unwrap_or_default()),
                ips,
                node: spec.node_name.as_deref().map(Arc::from),
                ports: ports.into(),
            },
        ))
    }

    /// The number of the port named `name` for `proto`, if it has one.
    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

/// The named ports of a pod's containers.
pub fn named_ports(spec: &core::PodSpec) -> Vec<NamedPort> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                proto: Proto::from_k8s(p.protocol.as_deref()).ok()?,
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect()
}

/// A namespace's labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Namespace {
    /// Its labels.
    pub labels: Labels,
}

/// The label every namespace carries with its own name (set and kept
/// immutable by the API server from Kubernetes 1.21).
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl Namespace {
    /// From the Kubernetes object, with [`NAME_LABEL`] set to its name
    /// when the API server did not (before 1.21), so that a policy naming
    /// a namespace by it means the same on every version.
    pub fn from_k8s(n: &core::Namespace) -> Option<(String, Self)> {
        let name = n.metadata.name.clone()?;
        let mut labels = n.metadata.labels.clone().unwrap_or_default();
        labels
            .entry(NAME_LABEL.to_string())
            .or_insert_with(|| name.clone());
        Some((name, Self { labels }))
    }
}

/// Which ports a rule allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum PortMatch {
    /// Every port of the protocol (`port` omitted).
    All {
        /// The protocol.
        proto: Proto,
    },
    /// `port` .. `endPort` (one port when they are equal).
    Range {
        /// The protocol.
        proto: Proto,
        /// The first port.
        first: u16,
        /// The last port.
        last: u16,
    },
    /// A named port, resolved on the destination pod.
    Named {
        /// The protocol.
        proto: Proto,
        /// The container port's name.
        name: String,
    },
}

impl PortMatch {
    /// The protocol it applies to.
    pub fn proto(&self) -> Proto {
        match self {
            Self::All { proto } | Self::Range { proto, .. } | Self::Named { proto, .. } => *proto,
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All { proto } => write!(f, "{proto}/*"),
            Self::Range { proto, first, last } if first == last => write!(f, "{proto}/{first}"),
            Self::Range { proto, first, last } => write!(f, "{proto}/{first}-{last}"),
            Self::Named { proto, name } => write!(f, "{proto}/{name}"),
        }
    }
}

/// A peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Peer {
    /// Pods matching `pods` in the namespaces matching `namespaces` (the
    /// policy's own namespace when `None`).
    Pods {
        /// The namespaces (`None`: the policy's own).
        namespaces: Option<Selector>,
        /// The pods in them.
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`.
    Block {
        /// The block: the network its text means ([`crate::cidr`]), host
        /// bits clear, IPv4-mapped IPv6 as IPv4.
        cidr: IpNetwork,
        /// Its exceptions, each of `cidr`'s family and within it.
        except: Vec<IpNetwork>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pods {
                namespaces: None,
                pods,
            } => write!(f, "pods {pods} (own namespace)"),
            Self::Pods {
                namespaces: Some(ns),
                pods,
            } => write!(f, "pods {pods} in namespaces {ns}"),
            Self::Block { cidr, except } if except.is_empty() => write!(f, "ipBlock {cidr}"),
            Self::Block { cidr, except } => {
                let e: Vec<String> = except.iter().map(ToString::to_string).collect();
                write!(f, "ipBlock {cidr} except {}", e.join(","))
            }
        }
    }
}

/// One ingress or egress rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Rule {
    /// Who (empty: everyone).
    pub peers: Vec<Peer>,
    /// Which ports (empty: every port of every protocol).
    pub ports: Vec<PortMatch>,
}

/// A NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The pods it applies to, in its namespace.
    pub selector: Selector,
    /// Its ingress rules if it isolates for ingress (an empty list allows
    /// nothing in).
    pub ingress: Option<Vec<Rule>>,
    /// Its egress rules if it isolates for egress.
    pub egress: Option<Vec<Rule>>,
}

/// The direction of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    /// Into the selected pod.
    Ingress,
    /// Out of the selected pod.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

impl Policy {
    /// The rules for `dir`, if it isolates in that direction.
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// From the Kubernetes object. policyTypes default as the API server
    /// defaults them: Ingress, plus Egress when there are egress rules.
    pub fn from_k8s(p: &net::NetworkPolicy) -> Result<(PolicyKey, Self)> {
        let key = Key::new(
            p.metadata
                .namespace
                .as_deref()
                .ok_or(Error::Missing("metadata.namespace"))?,
            p.metadata
                .name
                .as_deref()
                .ok_or(Error::Missing("metadata.name"))?,
        );
        let spec = p.spec.as_ref().ok_or(Error::Missing("spec"))?;
        let selector = spec
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()?
            .unwrap_or_default();
        let (mut ing, mut eg) = (false, false);
        match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for t in types {
                    match t.as_str() {
                        "Ingress" => ing = true,
                        "Egress" => eg = true,
                        other => return Err(Error::PolicyType(other.into())),
                    }
                }
            }
            _ => {
                ing = true;
                eg = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
        }
        let ingress = if ing {
            let mut rules = Vec::new();
            for r in spec.ingress.iter().flatten() {
                rules.push(rule(r.from.as_deref(), r.ports.as_deref())?);
            }
            Some(rules)
        } else {
            None
        };
        let egress = if eg {
            let mut rules = Vec::new();
            for r in spec.egress.iter().flatten() {
                rules.push(rule(r.to.as_deref(), r.ports.as_deref())?);
            }
            Some(rules)
        } else {
            None
        };
        Ok((
            key,
            Self {
                selector,
                ingress,
                egress,
            },
        ))
    }
}

fn rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
) -> Result<Rule> {
    let mut out = Rule {
        peers: Vec::new(),
        ports: Vec::new(),
    };
    for p in peers.unwrap_or_default() {
        out.peers.push(peer(p)?);
    }
    for p in ports.unwrap_or_default() {
        out.ports.push(port(p)?);
    }
    Ok(out)
}

/// An ipBlock as the API server takes it ([`crate::cidr`]): `cidr` and
/// each `except` CIDR text it accepts, each except a strict subset of
/// `cidr` by its test. Each except is kept as what it removes from the
/// block (within `cidr`).
fn ip_block(b: &net::IPBlock) -> Result<Peer> {
    if b.cidr.is_empty() {
        return Err(Error::Missing("ipBlock.cidr"));
    }
    let read = |field, value: &String| {
        Cidr::parse(value).map_err(|why| Error::Cidr {
            field,
            value: value.clone(),
            why,
        })
    };
    let cidr = read("cidr", &b.cidr)?;
    let mut except = Vec::new();
    for e in b.except.iter().flatten() {
        let x = read("except", e)?;
        if !cidr.admits_except(&x) {
            return Err(Error::ExceptNotInCidr {
                cidr: b.cidr.clone(),
                except: e.clone(),
            });
        }
        except.push(cidr.clamp(&x));
    }
    Ok(Peer::Block {
        cidr: cidr.net,
        except,
    })
}

fn peer(p: &net::NetworkPolicyPeer) -> Result<Peer> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(Error::IpBlockWithSelectors);
        }
        return ip_block(b);
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err(Error::Missing("podSelector, namespaceSelector or ipBlock"));
    }
    Ok(Peer::Pods {
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()?,
        pods: p
            .pod_selector
            .as_ref()
            .map(Selector::from_k8s)
            .transpose()?
            .unwrap_or_default(),
    })
}

fn port(p: &net::NetworkPolicyPort) -> Result<PortMatch> {
    let proto = Proto::from_k8s(p.protocol.as_deref())?;
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortMatch::All { proto }),
        (None, Some(_)) => Err(Error::Port("endPort without port".into())),
        (Some(IntOrString::String(name)), None) => match name.parse::<i32>() {
            // A number written as a string is that number (as kube-proxy
            // and the upstream implementations read it).
            Ok(n) => range(proto, n, n),
            Err(_) if name.is_empty() => Err(Error::Port("an empty port name".into())),
            Err(_) => Ok(PortMatch::Named {
                proto,
                name: name.clone(),
            }),
        },
        (Some(IntOrString::String(name)), Some(_)) => {
            Err(Error::Port(format!("endPort with the named port {name:?}")))
        }
        (Some(IntOrString::Int(n)), end) => range(proto, *n, end.unwrap_or(*n)),
    }
}

fn range(proto: Proto, first: i32, last: i32) -> Result<PortMatch> {
    let ok = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
    match (ok(first), ok(last)) {
        (Some(first), Some(last)) if last >= first => Ok(PortMatch::Range { proto, first, last }),
        _ => Err(Error::Port(format!(
            "{first}..{last} is not a range within 1-65535"
        ))),
    }
}

/// Everything policy decisions are made over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct World {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods on the pod network that have an address.
    pub pods: BTreeMap<PodKey, Pod>,
    /// Policies.
    pub policies: BTreeMap<PolicyKey, Policy>,
}

impl World {
    /// The labels of namespace `ns` (none if it is not known).
    pub fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    /// The pod holding `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<(&PodKey, &Pod)> {
        self.pods.iter().find(|(_, p)| p.ips.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> Result<Policy> {
        let mut v = serde_json::json!({
            "metadata": {"namespace": "x", "name": "p"},
        });
        v["spec"] = json;
        let p: net::NetworkPolicy = serde_json::from_value(v).unwrap();
        Policy::from_k8s(&p).map(|(_, p)| p)
    }

    #[test]
    fn a_namespace_carries_its_name_label_on_every_api_version() {
        let ns = |labels: serde_json::Value| -> core::Namespace {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "x", "labels": labels}
            }))
            .unwrap()
        };
        let (name, n) = Namespace::from_k8s(&ns(serde_json::json!({"team": "a"}))).unwrap();
        assert_eq!(name, "x");
        assert_eq!(n.labels.get(NAME_LABEL).map(String::as_str), Some("x"));
        assert_eq!(n.labels.get("team").map(String::as_str), Some("a"));
        // What the API server set stays as it is.
        let (_, n) = Namespace::from_k8s(&ns(serde_json::json!({NAME_LABEL: "x"}))).unwrap();
        assert_eq!(n.labels.len(), 1);
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let p = policy(serde_json::json!({"podSelector": {}})).unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
        let p = policy(serde_json::json!({"podSelector": {}, "egress": [{}]})).unwrap();
        assert!(p.ingress.is_some());
        assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
        let p = policy(serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]})).unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
    }

    #[test]
    fn ports_and_peers() {
        let p = policy(serde_json::json!({
            "podSelector": {"matchLabels": {"a": "b"}},
            "ingress": [{
                "from": [
                    {"podSelector": {}},
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"c": "d"}}},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                ],
                "ports": [
                    {"port": 80},
                    {"protocol": "UDP", "port": 1000, "endPort": 2000},
                    {"protocol": "SCTP"},
                    {"port": "http"},
                    {"port": "81"},
                ]
            }]
        }))
        .unwrap();
        let r = &p.ingress.unwrap()[0];
        assert_eq!(
            r.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["tcp/80", "udp/1000-2000", "sctp/*", "tcp/http", "tcp/81"]
        );
        assert_eq!(
            r.peers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "pods <all> (own namespace)",
                "pods <all> in namespaces ns=y",
                "pods c=d in namespaces <all>",
                "ipBlock 10.0.0.0/8 except 10.1.0.0/16",
            ]
        );
    }

    #[test]
    fn what_the_api_server_refuses_is_refused() {
        for (spec, what) in [
            (
                serde_json::json!({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
                "protocol",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 0}]}]}),
                "port 0",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "endPort below port",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
                "named with endPort",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"endPort": 80}]}]}),
                "endPort alone",
            ),
            (
                serde_json::json!({"ingress": [{"from": [{}]}]}),
                "empty peer",
            ),
            (
                serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
                "except outside",
            ),
            (
                serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]}),
                "bad cidr",
            ),
            (
                serde_json::json!({"policyTypes": ["Sideways"]}),
                "policy type",
            ),
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
                "In without values",
            ),
        ] {
            let mut spec = spec;
            if spec.get("podSelector").is_none() {
                spec["podSelector"] = serde_json::json!({});
            }
            assert!(policy(spec).is_err(), "{what}");
        }
    }

    /// The ipBlock peer of a policy with `cidr` and `except`, as its
    /// meaning (`CIDR` or `CIDR except E1,E2`), or why it is refused.
    fn ip_block(cidr: &str, except: &[&str]) -> std::result::Result<String, Error> {
        let mut b = serde_json::json!({"cidr": cidr});
        if !except.is_empty() {
            b["except"] = serde_json::json!(except);
        }
        let p = policy(
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": b}]}]}),
        )?;
        let peer = p.ingress.unwrap()[0].peers[0].to_string();
        Ok(peer.trim_start_matches("ipBlock ").to_string())
    }

    /// Every ipBlock text the API server accepts means what Kubernetes
    /// means by it; what it refuses is refused, with its reason. The API
    /// server's test is `k8s.io/utils/net.ParseCIDRSloppy` (through 1.32,
    /// and for values stored before 1.33's strict validation), and an
    /// except must be a strict subset by Go's `IPNet.Contains` and the
    /// prefix lengths as written (crate::cidr).
    #[test]
    fn ip_blocks_read_as_the_api_server_reads_them() {
        use crate::cidr::CidrError::{Address, NoPrefix, Prefix};
        let bad = |field: &'static str, value: &str, why| {
            Err(Error::Cidr {
                field,
                value: value.into(),
                why,
            })
        };
        let outside = |cidr: &str, except: &str| {
            Err(Error::ExceptNotInCidr {
                cidr: cidr.into(),
                except: except.into(),
            })
        };
        let means = |s: &str| Ok(s.to_string());
        let v4 = Prefix { max: 32 };
        let v6 = Prefix { max: 128 };
        let cases: Vec<(&str, Vec<&str>, std::result::Result<String, Error>)> = vec![
            // IPv4.
            ("10.0.0.0/8", vec![], means("10.0.0.0/8")),
            ("0.0.0.0/0", vec![], means("0.0.0.0/0")),
            ("255.255.255.255/32", vec![], means("255.255.255.255/32")),
            // Leading zeros are decimal (not octal: 010 is 10, not 8),
            // as many as written, in the prefix length too.
            ("010.0.0.0/8", vec![], means("10.0.0.0/8")),
            ("010.001.002.003/32", vec![], means("10.1.2.3/32")),
            ("192.168.001.000/24", vec![], means("192.168.1.0/24")),
            ("0000000000172.016.0.0/12", vec![], means("172.16.0.0/12")),
            ("10.0.0.0/08", vec![], means("10.0.0.0/8")),
            ("10.0.0.0/0000032", vec![], means("10.0.0.0/32")),
            ("000.000.000.000/000", vec![], means("0.0.0.0/0")),
            // Bits beyond the prefix are dropped.
            ("10.0.0.1/8", vec![], means("10.0.0.0/8")),
            ("192.168.1.255/24", vec![], means("192.168.1.0/24")),
            ("010.255.255.255/9", vec![], means("10.128.0.0/9")),
            // IPv6, any case, groups with leading zeros (any number).
            ("2001:db8::/32", vec![], means("2001:db8::/32")),
            ("2001:DB8::1/32", vec![], means("2001:db8::/32")),
            (
                "2001:0db8:0000:0000:0000:0000:0000:0001/128",
                vec![],
                means("2001:db8::1/128"),
            ),
            ("2001:00000db8::/32", vec![], means("2001:db8::/32")),
            ("::/0", vec![], means("::/0")),
            ("::1/128", vec![], means("::1/128")),
            ("fe80::1/10", vec![], means("fe80::/10")),
            ("1:2:3:4:5:6:7::/112", vec![], means("1:2:3:4:5:6:7:0/112")),
            ("::2:3:4:5:6:7:8/128", vec![], means("0:2:3:4:5:6:7:8/128")),
            ("fd00::/0008", vec![], means("fd00::/8")),
            // An IPv4 tail: in the last 32 bits, or anywhere after `::`.
            ("64:ff9b::10.0.0.0/120", vec![], means("64:ff9b::a00:0/120")),
            ("::10.0.0.0/104", vec![], means("::a00:0/104")),
            ("1::10.0.0.0/112", vec![], means("1::a00:0/112")),
            (
                "1::10.0.0.0:0/112",
                vec![],
                bad("cidr", "1::10.0.0.0:0/112", Address),
            ),
            // IPv4-mapped IPv6 with the mapping in the prefix: the IPv4
            // network (prefix - 96), however the address is written.
            ("::ffff:10.0.0.0/104", vec![], means("10.0.0.0/8")),
            ("::ffff:10.1.2.3/104", vec![], means("10.0.0.0/8")),
            ("::FFFF:a00:0/104", vec![], means("10.0.0.0/8")),
            ("0:0:0:0:0:ffff:10.0.0.0/104", vec![], means("10.0.0.0/8")),
            (
                "0:0:0:0:000000:ffff:010.000.000.000/104",
                vec![],
                means("10.0.0.0/8"),
            ),
            ("::ffff:10.0.0.1/128", vec![], means("10.0.0.1/32")),
            ("::ffff:0.0.0.0/96", vec![], means("0.0.0.0/0")),
            // ... and with it cut: IPv6.
            ("::ffff:10.0.0.0/95", vec![], means("::fffe:0:0/95")),
            ("::ffff:10.0.0.0/80", vec![], means("::/80")),
            // Refused by the API server.
            ("", vec![], Err(Error::Missing("ipBlock.cidr"))),
            ("10.0.0.0", vec![], bad("cidr", "10.0.0.0", NoPrefix)),
            ("10.0.0.0/", vec![], bad("cidr", "10.0.0.0/", v4)),
            ("10.0.0.0/33", vec![], bad("cidr", "10.0.0.0/33", v4)),
            ("10.0.0.0/-1", vec![], bad("cidr", "10.0.0.0/-1", v4)),
            ("10.0.0.0/+8", vec![], bad("cidr", "10.0.0.0/+8", v4)),
            ("10.0.0.0/8 ", vec![], bad("cidr", "10.0.0.0/8 ", v4)),
            ("10.0.0.0/8/8", vec![], bad("cidr", "10.0.0.0/8/8", v4)),
            (
                "10.0.0.0/255.0.0.0",
                vec![],
                bad("cidr", "10.0.0.0/255.0.0.0", v4),
            ),
            ("::/129", vec![], bad("cidr", "::/129", v6)),
            (" 10.0.0.0/8", vec![], bad("cidr", " 10.0.0.0/8", Address)),
            ("10.0.0/8", vec![], bad("cidr", "10.0.0/8", Address)),
            ("10.0.0.0.0/8", vec![], bad("cidr", "10.0.0.0.0/8", Address)),
            ("10..0.0/8", vec![], bad("cidr", "10..0.0/8", Address)),
            ("256.0.0.0/8", vec![], bad("cidr", "256.0.0.0/8", Address)),
            ("0x0a.0.0.0/8", vec![], bad("cidr", "0x0a.0.0.0/8", Address)),
            ("nope/8", vec![], bad("cidr", "nope/8", Address)),
            ("1::2::3/64", vec![], bad("cidr", "1::2::3/64", Address)),
            (
                "1:2:3:4:5:6:7:8::/64",
                vec![],
                bad("cidr", "1:2:3:4:5:6:7:8::/64", Address),
            ),
            (
                "1:2:3:4:5:6:7:8:9/64",
                vec![],
                bad("cidr", "1:2:3:4:5:6:7:8:9/64", Address),
            ),
            (
                "1:2:3:4:5:6:7/64",
                vec![],
                bad("cidr", "1:2:3:4:5:6:7/64", Address),
            ),
            (":1::/64", vec![], bad("cidr", ":1::/64", Address)),
            ("1::2:/64", vec![], bad("cidr", "1::2:/64", Address)),
            ("12345::/16", vec![], bad("cidr", "12345::/16", Address)),
            (
                "fe80::1%eth0/64",
                vec![],
                bad("cidr", "fe80::1%eth0/64", Address),
            ),
            ("[::1]/128", vec![], bad("cidr", "[::1]/128", Address)),
            (
                "1:2:3:4:5:10.0.0.0/104",
                vec![],
                bad("cidr", "1:2:3:4:5:10.0.0.0/104", Address),
            ),
            (
                "1::2:3:4:5:6:7:10.0.0.0/128",
                vec![],
                bad("cidr", "1::2:3:4:5:6:7:10.0.0.0/128", Address),
            ),
            (
                "::ffff:10.0.0/104",
                vec![],
                bad("cidr", "::ffff:10.0.0/104", Address),
            ),
            (
                "::ffff:256.0.0.0/104",
                vec![],
                bad("cidr", "::ffff:256.0.0.0/104", Address),
            ),
            // Excepts: CIDR text as above, each a strict subset of cidr.
            (
                "10.0.0.0/8",
                vec!["10.1.0.0/16"],
                means("10.0.0.0/8 except 10.1.0.0/16"),
            ),
            (
                "10.0.0.0/8",
                vec!["010.001.000.000/016"],
                means("10.0.0.0/8 except 10.1.0.0/16"),
            ),
            (
                "10.0.0.0/8",
                vec!["10.1.2.3/16"],
                means("10.0.0.0/8 except 10.1.0.0/16"),
            ),
            (
                "10.0.0.1/8",
                vec!["10.0.0.0/9", "10.0.0.0/10"],
                means("10.0.0.0/8 except 10.0.0.0/9,10.0.0.0/10"),
            ),
            (
                "2001:db8::/32",
                vec!["2001:db8:1::/48", "2001:DB8:1:2::/64"],
                means("2001:db8::/32 except 2001:db8:1::/48,2001:db8:1:2::/64"),
            ),
            (
                "10.0.0.0/8",
                vec!["::ffff:10.1.0.0/112"],
                means("10.0.0.0/8 except 10.1.0.0/16"),
            ),
            (
                "::ffff:10.0.0.0/104",
                vec!["::ffff:10.1.0.0/112"],
                means("10.0.0.0/8 except 10.1.0.0/16"),
            ),
            // The API server compares the lengths as written: IPv4 /8
            // against IPv4-mapped /104 (10.0.0.0/8 again) or /103 (a
            // wider 10.0.0.0/7) passes, and excepts the whole block.
            (
                "10.0.0.0/8",
                vec!["::ffff:10.0.0.0/104"],
                means("10.0.0.0/8 except 10.0.0.0/8"),
            ),
            (
                "10.0.0.0/8",
                vec!["::ffff:10.0.0.0/103"],
                means("10.0.0.0/8 except 10.0.0.0/8"),
            ),
            (
                "0.0.0.0/0",
                vec!["::ffff:0.0.0.0/96"],
                means("0.0.0.0/0 except 0.0.0.0/0"),
            ),
            (
                "10.0.0.0/8",
                vec!["11.0.0.0/16"],
                outside("10.0.0.0/8", "11.0.0.0/16"),
            ),
            (
                "10.0.0.0/8",
                vec!["10.0.0.0/8"],
                outside("10.0.0.0/8", "10.0.0.0/8"),
            ),
            (
                "10.0.0.0/8",
                vec!["10.0.0.0/7"],
                outside("10.0.0.0/8", "10.0.0.0/7"),
            ),
            (
                "10.0.0.0/8",
                vec!["10.1.0.0/16", "11.0.0.0/16"],
                outside("10.0.0.0/8", "11.0.0.0/16"),
            ),
            (
                "10.0.0.0/8",
                vec!["::ffff:10.0.0.0/100"],
                outside("10.0.0.0/8", "::ffff:10.0.0.0/100"),
            ),
            (
                "::ffff:10.0.0.0/104",
                vec!["10.1.0.0/16"],
                outside("::ffff:10.0.0.0/104", "10.1.0.0/16"),
            ),
            (
                "::ffff:10.0.0.0/104",
                vec!["::ffff:10.0.0.0/104"],
                outside("::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"),
            ),
            ("0.0.0.0/0", vec!["::/1"], outside("0.0.0.0/0", "::/1")),
            ("::/0", vec!["10.0.0.0/8"], outside("::/0", "10.0.0.0/8")),
            (
                "::/0",
                vec!["::ffff:10.0.0.0/104"],
                outside("::/0", "::ffff:10.0.0.0/104"),
            ),
            (
                "10.0.0.0/8",
                vec!["10.1.0.0"],
                bad("except", "10.1.0.0", NoPrefix),
            ),
            (
                "10.0.0.0/8",
                vec!["10.1.0.0/33"],
                bad("except", "10.1.0.0/33", v4),
            ),
            ("10.0.0.0/8", vec![""], bad("except", "", NoPrefix)),
        ];
        for (cidr, except, want) in cases {
            assert_eq!(
                ip_block(cidr, &except),
                want,
                "cidr {cidr:?} except {except:?}"
            );
        }
    }

    #[test]
    fn pods_from_kubernetes() {
        let pod: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [
                {"name": "serve-80", "containerPort": 80},
                {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
                {"containerPort": 81}
            ]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }))
        .unwrap();
        let (key, p) = Pod::from_k8s(&pod).unwrap();
        assert_eq!(key.to_string(), "x/a");
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.named_port("serve-80", Proto::Tcp), Some(80));
        assert_eq!(p.named_port("serve-80", Proto::Udp), None);
        assert_eq!(p.named_port("serve-80-udp", Proto::Udp), Some(80));
        let mut host = pod.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(Pod::from_k8s(&host).is_none());
        let mut done = pod.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(Pod::from_k8s(&done).is_none());
        let mut pending = pod;
        pending.status.as_mut().unwrap().pod_ip = None;
        pending.status.as_mut().unwrap().pod_ips = None;
        assert!(Pod::from_k8s(&pending).is_none());
    }
}
