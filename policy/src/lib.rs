//! `margay-policy`: Kubernetes NetworkPolicy (networking.k8s.io/v1) as
//! Margay enforces it, with no I/O.
//!
//! - [`model`]: the typed world the decisions are made over (namespaces
//!   and their labels, pods and their labels, addresses and named ports,
//!   policies), converted from the Kubernetes objects with every invalid
//!   field a typed [`Error`];
//! - [`cidr`]: ipBlock CIDR text as the API server reads it (leading
//!   zeros, IPv4-mapped IPv6, bits beyond the prefix) and what it means;
//! - [`selector`]: label selectors (matchLabels, matchExpressions);
//! - [`spec`]: the reference semantics, written from the API
//!   documentation and not from Margay's rules: what a connection is
//!   allowed by, and why. `margayctl policy check` and the differential
//!   tests use it;
//! - [`enforce`]: what a policy means on a node when it cannot be
//!   enforced as written (refused, or too large): fail closed;
//! - [`explain`]: what `margayctl policy show|check` report, as typed
//!   values over the world;
//! - [`ruleset`]: the policies compiled to Margay's nftables table, updated
//!   in O(changed).

pub mod cidr;
pub mod enforce;
pub mod explain;
pub mod model;
pub mod random;
pub mod ruleset;
pub mod selector;
pub mod spec;

pub use model::{Namespace, Pod, PodKey, Policy, PolicyKey, Proto, World};
pub use selector::{Labels, Selector};

/// What is wrong with an object this crate was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A field that must be set is not.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A matchExpression with an unknown operator or values that do not
    /// fit it.
    #[error("selector: {0}")]
    Selector(String),
    /// A protocol other than TCP, UDP and SCTP.
    #[error("protocol {0:?} is not TCP, UDP or SCTP")]
    Protocol(String),
    /// A port outside 1-65535, a named port with endPort, an endPort below
    /// its port.
    #[error("port: {0}")]
    Port(String),
    /// An ipBlock `cidr` or `except` entry that is not CIDR text the API
    /// server accepts ([`cidr`]).
    #[error("ipBlock {field} {value:?}: {why}")]
    Cidr {
        /// `cidr` or `except`.
        field: &'static str,
        /// The text.
        value: String,
        /// What is wrong with it.
        why: cidr::CidrError,
    },
    /// An ipBlock `except` entry that is not a strict subset of its
    /// `cidr` as the API server tests it ([`cidr::Cidr::admits_except`]).
    #[error("ipBlock except {except:?} is not a strict subset of cidr {cidr:?}")]
    ExceptNotInCidr {
        /// The `cidr` text.
        cidr: String,
        /// The `except` text.
        except: String,
    },
    /// An ipBlock peer with a pod or namespace selector beside it.
    #[error("an ipBlock peer cannot also have selectors")]
    IpBlockWithSelectors,
    /// A policyType other than Ingress and Egress.
    #[error("policyType {0:?} is not Ingress or Egress")]
    PolicyType(String),
    /// A question about a pod the world does not have (or not with an
    /// address of the family asked).
    #[error("{0}")]
    Lookup(String),
}

/// This crate's results.
pub type Result<T> = std::result::Result<T, Error>;
