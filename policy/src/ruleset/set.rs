//! What the table's sets hold: a set's type ([`SetKind`]) and its
//! elements, typed ([`Element`]), and whether an element change adds or
//! deletes ([`ElementOp`]).

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::Proto;

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// IPv4 addresses.
    Addr4,
    /// IPv6 addresses.
    Addr6,
    /// IPv4 address . protocol . port.
    Named4,
    /// IPv6 address . protocol . port.
    Named6,
    /// Interface names.
    Iface,
    /// Interface name . IPv4 address (a workload's sources).
    IfaceAddr4,
    /// Interface name . IPv6 address.
    IfaceAddr6,
}

impl SetKind {
    pub(super) fn decl(self) -> &'static str {
        match self {
            Self::Addr4 => "type ipv4_addr;",
            Self::Addr6 => "type ipv6_addr;",
            Self::Named4 => "type ipv4_addr . inet_proto . inet_service;",
            Self::Named6 => "type ipv6_addr . inet_proto . inet_service;",
            Self::Iface => "type ifname;",
            Self::IfaceAddr4 => "type ifname . ipv4_addr;",
            Self::IfaceAddr6 => "type ifname . ipv6_addr;",
        }
    }
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Its type.
    pub kind: SetKind,
    /// Its elements.
    pub elements: BTreeSet<Element>,
}

/// A set element, typed: what a set of the table holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    /// An address (sets `.p4`, `.p6`).
    Addr(IpAddr),
    /// `address . protocol . port` (sets `.n4.I`, `.n6.I`).
    Port {
        /// The address.
        addr: IpAddr,
        /// The protocol.
        proto: Proto,
        /// The port.
        port: u16,
    },
    /// An interface's name (sets `if-in/...`, `if-out/...`, `ifaces`).
    Iface(String),
    /// `interface . address` (sets `src/4`, `src/6`).
    IfaceAddr {
        /// The interface.
        ifname: String,
        /// One of its addresses.
        addr: IpAddr,
    },
}

impl Element {
    /// The address it is about, if any.
    pub fn addr(&self) -> Option<IpAddr> {
        match self {
            Self::Addr(a) | Self::Port { addr: a, .. } | Self::IfaceAddr { addr: a, .. } => {
                Some(*a)
            }
            Self::Iface(_) => None,
        }
    }
}

/// Whether an element change adds or deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementOp {
    /// Add the elements.
    Add,
    /// Delete the elements.
    Delete,
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Port { addr, proto, port } => write!(f, "{addr} . {proto} . {port}"),
            Self::Iface(name) => write!(f, "\"{name}\""),
            Self::IfaceAddr { ifname, addr } => write!(f, "\"{ifname}\" . {addr}"),
        }
    }
}
