//! The world policy decisions are made over: namespaces with their
//! labels, pods with their labels, addresses and named container ports,
//! and NetworkPolicies in a typed form where every default of the API is
//! already applied (policyTypes, TCP, empty `from`/`to`/`ports`).
//!
//! Conversions from the Kubernetes objects (`convert.rs`) refuse what
//! the API server would refuse ([`crate::Error`]): the agent reports such
//! a policy and leaves the rules it had for it in place. This file holds
//! the world's types.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::selector::{Labels, Selector};
use crate::{Error, Result};

mod convert;
#[cfg(test)]
mod tests;

pub use convert::named_ports;

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
    /// The number of the port named `name` for `proto`, if it has one.
    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
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
