//! The typed pieces of Margay's policy table and of a change to it: the
//! rule lines the compiler emits ([`Line`]), and the commands a delta is
//! made of ([`Op`], gathered in a [`Batch`]), in the order one kernel
//! transaction takes them. Each has one nft text (`Display`), which is
//! what `nft -f` is given; the agent encodes the same commands for
//! netlink itself (the `margay-nftnl` crate), so a change needs no `nft` run.

use std::fmt;

use ipnetwork::IpNetwork;

use super::{ALLOW_MARK, Element, ElementOp, SetKind, TABLE};
use crate::Proto;
use crate::model::Direction;

/// Which address of the packet a match looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// The source (ingress: the peer sending).
    Saddr,
    /// The destination (egress: the peer receiving).
    Daddr,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Saddr => "saddr",
            Self::Daddr => "daddr",
        })
    }
}

fn family(v6: bool) -> &'static str {
    if v6 { "ip6" } else { "ip" }
}

/// A rule line's peer match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerMatch {
    /// `ip saddr @SET`: the address in a pod set.
    Set {
        /// IPv6 (`ip6`, a `.p6` set).
        v6: bool,
        /// Which address.
        field: Field,
        /// The set.
        set: String,
    },
    /// `ip saddr CIDR ip saddr != EXCEPT ...`: an ipBlock.
    Block {
        /// Which address.
        field: Field,
        /// The block.
        cidr: IpNetwork,
        /// Its excepts (same family).
        except: Vec<IpNetwork>,
    },
}

impl PeerMatch {
    /// Its address family (true: IPv6).
    pub fn v6(&self) -> bool {
        match self {
            Self::Set { v6, .. } => *v6,
            Self::Block { cidr, .. } => cidr.is_ipv6(),
        }
    }
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Set { v6, field, set } => write!(f, "{} {field} @{set}", family(*v6)),
            Self::Block {
                field,
                cidr,
                except,
            } => {
                let fam = family(cidr.is_ipv6());
                write!(f, "{fam} {field} {}", prefix(cidr))?;
                for e in except {
                    write!(f, " {fam} {field} != {}", prefix(e))?;
                }
                Ok(())
            }
        }
    }
}

/// A rule line's protocol and port match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Match {
    /// `meta l4proto P`: every port.
    Proto(Proto),
    /// `meta l4proto P th dport N` or `... th dport N-M`.
    Ports {
        /// The protocol.
        proto: Proto,
        /// The first port.
        first: u16,
        /// The last port (`first` for one).
        last: u16,
    },
    /// `ip daddr . meta l4proto . th dport @SET`: a named port.
    Named {
        /// IPv6 (`ip6`, an `.n6` set).
        v6: bool,
        /// The set.
        set: String,
    },
}

impl L4Match {
    /// Its address family, if it has one (true: IPv6).
    pub fn v6(&self) -> Option<bool> {
        match self {
            Self::Named { v6, .. } => Some(*v6),
            _ => None,
        }
    }
}

impl fmt::Display for L4Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proto(p) => write!(f, "meta l4proto {p}"),
            Self::Ports { proto, first, last } if first == last => {
                write!(f, "meta l4proto {proto} th dport {first}")
            }
            Self::Ports { proto, first, last } => {
                write!(f, "meta l4proto {proto} th dport {first}-{last}")
            }
            Self::Named { v6, set } => {
                write!(f, "{} daddr . meta l4proto . th dport @{set}", family(*v6))
            }
        }
    }
}

/// One rule of a regular chain of the table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Line {
    /// `ct state invalid drop`.
    DropInvalid,
    /// `meta mark set meta mark & ~ALLOW`: the allow bit cleared.
    ClearMark,
    /// `jump CHAIN`.
    Jump(String),
    /// `meta mark & ALLOW == 0 drop`: nothing allowed it.
    DropUnmarked,
    /// `[PEER] [PORT] meta mark set meta mark | ALLOW return`: a policy
    /// rule's (peer, port) allows.
    Allow {
        /// Whom (none: anyone).
        peer: Option<PeerMatch>,
        /// Which ports (none: every port of every protocol).
        port: Option<L4Match>,
    },
    /// `oifname @SET goto CHAIN` (ingress: the pod receiving) or
    /// `iifname @SET goto CHAIN` (egress: the pod sending): the
    /// interfaces of an endpoint chain to it. `goto`: when it returns,
    /// the base chain goes on.
    Dispatch {
        /// Which direction (which interface is matched).
        dir: Direction,
        /// The interfaces' set.
        set: String,
        /// The endpoint chain.
        chain: String,
    },
    /// `oifname @SET drop` / `iifname @SET drop`: quarantined interfaces.
    Quarantine {
        /// Which direction.
        dir: Direction,
        /// The interfaces' set.
        set: String,
    },
    /// `[PEER] [PORT] jump CHAIN`: a rule too large to spell out as
    /// peers × ports lines goes on in a chain of its own (its ports
    /// here, its peers there), and an ipBlock with many excepts in a
    /// chain of its excepts: every rule's size is linear in what it
    /// lists.
    JumpIf {
        /// Whom (none: anyone).
        peer: Option<PeerMatch>,
        /// Which ports (none: every port of every protocol).
        port: Option<L4Match>,
        /// Where the rule goes on.
        chain: String,
    },
    /// `PEER return`: an ipBlock's except (its chain allows what
    /// none of them returned).
    ReturnIf {
        /// The except.
        peer: PeerMatch,
    },
}

/// The interface a packet of `dir` is matched by: `oifname` for ingress
/// (it leaves the host towards the pod), `iifname` for egress.
fn iface(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "oifname",
        Direction::Egress => "iifname",
    }
}

impl Line {
    /// The address family its matches need, if any (true: IPv6).
    pub fn v6(&self) -> Option<bool> {
        match self {
            Self::Allow { peer, port } | Self::JumpIf { peer, port, .. } => peer
                .as_ref()
                .map(PeerMatch::v6)
                .or_else(|| port.as_ref().and_then(L4Match::v6)),
            Self::ReturnIf { peer } => Some(peer.v6()),
            _ => None,
        }
    }

    /// How many matches it makes (a peer, a port, each except): what a
    /// rule costs the kernel.
    pub fn matches(&self) -> usize {
        let peer = |p: &Option<PeerMatch>| match p {
            None => 0,
            Some(PeerMatch::Set { .. }) => 1,
            Some(PeerMatch::Block { except, .. }) => 1 + except.len(),
        };
        match self {
            Self::Allow { peer: p, port } | Self::JumpIf { peer: p, port, .. } => {
                peer(p) + usize::from(port.is_some())
            }
            Self::ReturnIf { peer: p } => peer(&Some(p.clone())),
            _ => 1,
        }
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DropInvalid => f.write_str("ct state invalid drop"),
            Self::ClearMark => write!(f, "meta mark set meta mark & {:#010x}", !ALLOW_MARK),
            Self::Jump(c) => write!(f, "jump {c}"),
            Self::Dispatch { dir, set, chain } => {
                write!(f, "{} @{set} goto {chain}", iface(*dir))
            }
            Self::Quarantine { dir, set } => write!(f, "{} @{set} drop", iface(*dir)),
            Self::DropUnmarked => write!(f, "meta mark & {ALLOW_MARK:#010x} == 0 drop"),
            Self::Allow { peer, port } => {
                if let Some(p) = peer {
                    write!(f, "{p} ")?;
                }
                if let Some(p) = port {
                    write!(f, "{p} ")?;
                }
                write!(f, "meta mark set meta mark | {ALLOW_MARK:#010x} return")
            }
            Self::JumpIf { peer, port, chain } => {
                if let Some(p) = peer {
                    write!(f, "{p} ")?;
                }
                if let Some(p) = port {
                    write!(f, "{p} ")?;
                }
                write!(f, "jump {chain}")
            }
            Self::ReturnIf { peer } => write!(f, "{peer} return"),
        }
    }
}

/// `ADDRESS/LEN`, the address being the network's.
pub(super) fn prefix(cidr: &IpNetwork) -> String {
    format!("{}/{}", cidr.network(), cidr.prefix())
}

/// One command of a change to the table, as `nft` and netlink both take
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new (empty) set.
    AddSet {
        /// Its name.
        name: String,
        /// What it holds.
        kind: SetKind,
    },
    /// A new (empty) regular chain.
    AddChain(String),
    /// Every rule of a chain removed.
    FlushChain(String),
    /// A rule appended to a chain.
    AddRule {
        /// The chain.
        chain: String,
        /// The rule.
        line: Line,
    },
    /// Set elements added or deleted.
    Elements {
        /// Add or delete.
        op: ElementOp,
        /// The set.
        set: String,
        /// The elements.
        elements: Vec<Element>,
    },
    /// An empty chain nothing jumps to removed.
    DeleteChain(String),
    /// A set no rule uses removed.
    DeleteSet(String),
}

impl Op {
    /// Whether it only changes set elements (what a pod's change
    /// should be: the tests check it).
    pub fn is_element(&self) -> bool {
        matches!(self, Self::Elements { .. })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddSet { name, kind } => {
                write!(f, "add set {TABLE} {name} {{ {} }}", kind.decl())
            }
            Self::AddChain(c) => write!(f, "add chain {TABLE} {c}"),
            Self::FlushChain(c) => write!(f, "flush chain {TABLE} {c}"),
            Self::AddRule { chain, line } => write!(f, "add rule {TABLE} {chain} {line}"),
            Self::Elements { op, set, elements } => {
                let verb = match op {
                    ElementOp::Add => "add",
                    ElementOp::Delete => "delete",
                };
                write!(f, "{verb} element {TABLE} {set} {{ ")?;
                for (i, e) in elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_str(" }")
            }
            Self::DeleteChain(c) => write!(f, "delete chain {TABLE} {c}"),
            Self::DeleteSet(s) => write!(f, "delete set {TABLE} {s}"),
        }
    }
}

/// Commands for one transaction, in order: one or more deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The commands.
    pub ops: Vec<Op>,
}

impl Batch {
    /// Whether it changes set elements only.
    pub fn elements_only(&self) -> bool {
        self.ops.iter().all(Op::is_element)
    }

    /// The same commands as an `nft -f` script.
    pub fn script(&self) -> String {
        let mut s = String::new();
        for op in &self.ops {
            use fmt::Write as _;
            let _ = writeln!(s, "{op}");
        }
        s
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_print_as_nft_reads_them() {
        let allow = " meta mark set meta mark | 0x00010000 return";
        let cases = [
            (Line::DropInvalid, "ct state invalid drop".to_string()),
            (
                Line::ClearMark,
                "meta mark set meta mark & 0xfffeffff".into(),
            ),
            (Line::Jump("in/x/p".into()), "jump in/x/p".into()),
            (
                Line::DropUnmarked,
                "meta mark & 0x00010000 == 0 drop".into(),
            ),
            (
                Line::Allow {
                    peer: None,
                    port: None,
                },
                allow.trim_start().into(),
            ),
            (
                Line::Allow {
                    peer: Some(PeerMatch::Block {
                        field: Field::Daddr,
                        cidr: "fd00::/8".parse().unwrap(),
                        except: vec!["fd00:1::/32".parse().unwrap()],
                    }),
                    port: Some(L4Match::Ports {
                        proto: Proto::Udp,
                        first: 80,
                        last: 90,
                    }),
                },
                format!(
                    "ip6 daddr fd00::/8 ip6 daddr != fd00:1::/32 meta l4proto udp th dport 80-90{allow}"
                ),
            ),
            (
                Line::Allow {
                    peer: None,
                    port: Some(L4Match::Named {
                        v6: false,
                        set: "port/1.n4".into(),
                    }),
                },
                format!("ip daddr . meta l4proto . th dport @port/1.n4{allow}"),
            ),
        ];
        for (line, text) in cases {
            assert_eq!(line.to_string(), text);
        }
    }
}
