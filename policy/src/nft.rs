//! NetworkPolicy compiled to Margay's own nftables table,
//! `inet margay_policy`, kept up to date in O(changed).
//!
//! Layout (names are readable: `in/NAMESPACE/POLICY`):
//!
//! ```text
//! chain source (hook prerouting, priority raw, policy accept)
//!   iifname != "cali*" accept                   not a workload interface
//!   iifname . ip saddr @src/4 accept            a workload's own addresses only:
//!   iifname . ip6 saddr @src/6 accept           no pod sends as another
//!   ip6 saddr fe80::/10 accept                  link-local (neighbour discovery)
//!   drop                                        forged, or an unknown interface
//! set src/4, src/6       { "caliXXX" . ADDRESS, ... }  every attachment's addresses
//! set ifaces             { "caliXXX", ... }   every workload interface Margay knows
//! chain forward (hook forward, priority filter, policy accept)
//!   oifname "cali*" oifname != @ifaces drop     nothing into an unknown interface
//!   ct state established,related accept         replies of allowed connections
//!   jump dispatch-out                           a local pod sending: its egress chain
//!   jump dispatch-in                            a local pod receiving: its ingress chain
//! chain dispatch-in      oifname @if-in/drop drop                (quarantined)
//!                        oifname @if-in/HASH goto ep-in/HASH     one line per endpoint chain
//! set if-in/HASH         { "caliXXX", ... }   the isolated endpoints that chain serves
//! chain ep-in/HASH       clear the allow mark; jump each policy of the list; no mark:
//!                        drop. One per list of isolating policies (HASH is the
//!                        list's), shared by every endpoint those policies isolate:
//!                        a new pod is a set element, not a chain
//! chain in/NS/NAME       one rule line per (peer, port) of each rule: match, set the
//!                        allow mark, return; an ipBlock is matched in its line
//!                        (`ip saddr CIDR ip saddr != EXCEPT ...`). A rule with
//!                        several peers and several ports is one line per port
//!                        jumping to its chain `in/NS/NAME/RULE`, one line per
//!                        peer: lines grow with peers + ports, never their
//!                        product; an ipBlock with many excepts jumps to a chain
//!                        `.../RULE/PEER` returning on each except. A name too
//!                        long for the kernel is cut and ends in a hash.
//! set peer/HASH.p4       addresses of the pods one pod peer selects (p6: IPv6)
//! set port/HASH.n4       destination address . protocol . port of a named port (n6)
//! ```
//!
//! Pod sets are named by a hash of what they hold (the peer's namespace
//! scope and selectors, or the port's name and protocol) and shared by
//! every rule that needs the same, as Calico shares an IP set per
//! selector: a pod's change is one element per distinct selector, and
//! a new policy usually only a chain. An index (a namespace or one of its
//! labels, one pod label, a port name) finds the sets a pod may be in.
//!
//! Every workload interface (an attachment: network, container,
//! interface) is in `ifaces` with its addresses in `src/4`/`src/6`, pod
//! or no pod ([`Compiler::set_workload`]); one Margay does not know takes
//! nothing and sends nothing. Its pod's policies are dispatched per
//! interface ([`Compiler::set_endpoint`]), so two attachments of one pod
//! are each enforced.
//!
//! Traffic the node itself sends to its pods leaves through the output
//! hook and is not filtered (kubelet probes), and a pod's traffic to its
//! own node goes to the input hook, not filtered either: the API's
//! documentation says traffic to and from the node where a pod runs is
//! always allowed. A pod reaching itself never leaves it. Only policies
//! that select a pod of this node are compiled.
//!
//! [`Compiler`] holds the inputs and the [`Table`]; each change
//! ([`Compiler::set_pod`], [`set_namespace`](Compiler::set_namespace),
//! [`set_policy`](Compiler::set_policy),
//! [`set_endpoint`](Compiler::set_endpoint)) updates the table and returns
//! the [`Delta`] that takes the kernel from the old table to the new one:
//! a pod or a label is set elements, a policy its own chains and
//! sets.
//! The delta is computed over what the change touched (a journal of the
//! old values), never over the whole table. There are no interval sets:
//! before any element update nft reads back the elements of every
//! interval set, which would make each pod change cost the whole table.
//! Nor are endpoints dispatched through verdict maps: a `jump` added to
//! a verdict map makes the kernel check the whole table for loops,
//! through every entry of the map (an ADD then costs more with every
//! pod of the node), while an interface added to a set of names is a
//! plain element. The price is one set lookup per endpoint chain in use,
//! for the first packet of a connection only (replies and established
//! traffic are accepted before).
//! A delta is one `nft -f` transaction ([`Delta::script`]); [`Table::script`]
//! rebuilds the whole table atomically (start-up, periodic resync, or
//! after a failed delta).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Direction, Namespace, Peer, Pod, PodKey, Policy, PolicyKey, PortMatch, Rule};
use crate::selector::Labels;
use crate::{Proto, World};

pub use crate::enforce::{MAX_POLICY_COST, cost};

mod ops;
pub use ops::{Batch, Field, L4Match, Line, Op, PeerMatch};

/// The table, as `nft` names it.
pub const TABLE: &str = "inet margay_policy";
/// The table's name within its family (`inet`).
pub const TABLE_NAME: &str = "margay_policy";
/// The packet mark bit a policy rule sets when it allows.
pub const ALLOW_MARK: u32 = 0x0001_0000;

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
    fn decl(self) -> &'static str {
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

/// Where an interface's packets are dispatched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Its endpoint chain (shared by the endpoints that the same policies
    /// isolate).
    Jump(String),
    /// Dropped (a quarantined interface: its Pod cannot be read).
    Drop,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jump(c) => write!(f, "jump {c}"),
            Self::Drop => f.write_str("drop"),
        }
    }
}

/// The whole table as Margay wants it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Named sets.
    pub sets: BTreeMap<String, Set>,
    /// Regular chains and their rules (the base chain is fixed).
    pub chains: BTreeMap<String, Vec<Line>>,
    /// Ingress dispatch as decided: interface → verdict (`jump
    /// ep-in/HASH`, or `drop` for a quarantined interface). In the kernel
    /// it is the interface's name in that verdict's set ([`iface_set`]),
    /// which `sets` holds; this map is not loaded itself.
    pub ingress: BTreeMap<String, Verdict>,
    /// Egress dispatch as decided: interface → verdict.
    pub egress: BTreeMap<String, Verdict>,
}

/// The prefix of every workload interface's name (Calico's, and the
/// agent's `cali` + hash of the attachment).
pub const WORKLOAD_PREFIX: &str = "cali";
/// The set of every workload interface Margay knows.
pub const IFACES_SET: &str = "ifaces";

/// The set of the workloads' own sources of one family.
pub fn source_set(v6: bool) -> &'static str {
    if v6 { "src/6" } else { "src/4" }
}

/// The dispatch chain of `dir` (the base chain jumps to both).
pub fn dispatch_chain(dir: Direction) -> String {
    format!("dispatch-{}", dir_prefix(dir))
}

/// The set of the interfaces dispatched to `verdict` in `dir`: an
/// endpoint chain's (`ep-in/HASH` → `if-in/HASH`), or the quarantined
/// ones (`if-in/drop`).
pub fn iface_set(dir: Direction, verdict: &Verdict) -> String {
    match verdict {
        Verdict::Jump(chain) => chain.replacen("ep-", "if-", 1),
        Verdict::Drop => format!("if-{}/drop", dir_prefix(dir)),
    }
}

fn elements(e: &BTreeSet<Element>) -> String {
    e.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Table {
    /// A table with nothing isolated: the dispatch chains and the
    /// quarantine sets, which are always there.
    pub fn new() -> Self {
        let mut t = Self::default();
        for (name, kind) in [
            (IFACES_SET, SetKind::Iface),
            (source_set(false), SetKind::IfaceAddr4),
            (source_set(true), SetKind::IfaceAddr6),
        ] {
            t.sets.insert(
                name.to_string(),
                Set {
                    kind,
                    elements: BTreeSet::new(),
                },
            );
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            let drop = iface_set(dir, &Verdict::Drop);
            t.sets.insert(
                drop.clone(),
                Set {
                    kind: SetKind::Iface,
                    elements: BTreeSet::new(),
                },
            );
            t.chains.insert(
                dispatch_chain(dir),
                vec![Line::Quarantine { dir, set: drop }],
            );
        }
        t
    }

    /// One transaction that replaces the whole table (creating it first,
    /// so the delete never fails): atomic, and other tables untouched.
    pub fn script(&self) -> String {
        let mut s = format!("table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n");
        for (name, set) in &self.sets {
            s.push_str(&format!("  set {name} {{ {} ", set.kind.decl()));
            if !set.elements.is_empty() {
                s.push_str(&format!("elements = {{ {} }}; ", elements(&set.elements)));
            }
            s.push_str("}\n");
        }
        for name in self.chains.keys() {
            s.push_str(&format!("  chain {name} {{ }}\n"));
        }
        for (name, rules) in &self.chains {
            s.push_str(&format!("  chain {name} {{\n"));
            for r in rules {
                s.push_str(&format!("    {r}\n"));
            }
            s.push_str("  }\n");
        }
        let w = WORKLOAD_PREFIX;
        s.push_str(&format!(
            "  chain source {{\n    type filter hook prerouting priority raw; policy accept;\n    \
             iifname != \"{w}*\" accept\n    \
             iifname . ip saddr @{} accept\n    \
             iifname . ip6 saddr @{} accept\n    \
             ip6 saddr fe80::/10 accept\n    drop\n  }}\n",
            source_set(false),
            source_set(true)
        ));
        s.push_str(&format!(
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
             oifname \"{w}*\" oifname != @{IFACES_SET} drop\n    \
             ct state established,related accept\n    jump dispatch-out\n    \
             jump dispatch-in\n  }}\n}}\n"
        ));
        s
    }

    /// The script that removes the table (nothing of it left).
    pub fn remove_script() -> String {
        format!("table {TABLE}\ndelete table {TABLE}\n")
    }

    /// The changes that take `self` to `new`.
    pub fn delta(&self, new: &Table) -> Delta {
        let mut d = Delta::default();
        for (name, set) in &new.sets {
            match self.sets.get(name) {
                None => d.new_sets.push((name.clone(), set.clone())),
                Some(old) if old.kind != set.kind => {
                    // Names carry their kind (p4, b6, ...): cannot happen,
                    // but a set of another type would need a new name.
                    d.del_sets.push(name.clone());
                    d.late_sets.push((name.clone(), set.clone()));
                }
                Some(old) => {
                    let add: BTreeSet<Element> =
                        set.elements.difference(&old.elements).cloned().collect();
                    let del: BTreeSet<Element> =
                        old.elements.difference(&set.elements).cloned().collect();
                    if !add.is_empty() {
                        d.add_elements.push((name.clone(), add));
                    }
                    if !del.is_empty() {
                        d.del_elements.push((name.clone(), del));
                    }
                }
            }
        }
        for name in self.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
            d.del_sets.push(name.clone());
        }
        for (name, rules) in &new.chains {
            match self.chains.get(name) {
                None => {
                    d.new_chains.push(name.clone());
                    d.rewrite.push((name.clone(), rules.clone()));
                }
                Some(old) if old != rules => d.rewrite.push((name.clone(), rules.clone())),
                Some(_) => {}
            }
        }
        for name in self.chains.keys().filter(|n| !new.chains.contains_key(*n)) {
            d.del_chains.push(name.clone());
        }
        d
    }
}

/// The changes between two tables, in an order the kernel accepts in one
/// transaction: what is referenced exists before what references it, and
/// goes after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    new_sets: Vec<(String, Set)>,
    /// Sets whose type changed: deleted, then created again.
    late_sets: Vec<(String, Set)>,
    new_chains: Vec<String>,
    add_elements: Vec<(String, BTreeSet<Element>)>,
    rewrite: Vec<(String, Vec<Line>)>,
    del_elements: Vec<(String, BTreeSet<Element>)>,
    del_chains: Vec<String>,
    del_sets: Vec<String>,
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

impl Delta {
    /// Its commands, in an order the kernel accepts in one transaction:
    /// what is referenced exists before what references it, and goes
    /// after it.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        let elements = |op, set: &str, e: &BTreeSet<Element>| Op::Elements {
            op,
            set: set.to_string(),
            elements: e.iter().cloned().collect(),
        };
        let set_decl = |ops: &mut Vec<Op>, name: &str, set: &Set| {
            ops.push(Op::AddSet {
                name: name.to_string(),
                kind: set.kind,
            });
            if !set.elements.is_empty() {
                ops.push(elements(ElementOp::Add, name, &set.elements));
            }
        };
        for (name, set) in &self.new_sets {
            set_decl(&mut ops, name, set);
        }
        for name in &self.new_chains {
            ops.push(Op::AddChain(name.clone()));
        }
        for (name, e) in &self.add_elements {
            ops.push(elements(ElementOp::Add, name, e));
        }
        let rules = |ops: &mut Vec<Op>, name: &str, lines: &[Line]| {
            ops.extend(lines.iter().map(|l| Op::AddRule {
                chain: name.to_string(),
                line: l.clone(),
            }));
        };
        // With a set to renew, the chains are refilled after it is. A new
        // chain has nothing to flush.
        for (name, lines) in &self.rewrite {
            if !self.new_chains.contains(name) {
                ops.push(Op::FlushChain(name.clone()));
            }
            if self.late_sets.is_empty() {
                rules(&mut ops, name, lines);
            }
        }
        for (name, e) in &self.del_elements {
            ops.push(elements(ElementOp::Delete, name, e));
        }
        for name in &self.del_chains {
            ops.push(Op::FlushChain(name.clone()));
        }
        for name in &self.del_chains {
            ops.push(Op::DeleteChain(name.clone()));
        }
        for name in &self.del_sets {
            ops.push(Op::DeleteSet(name.clone()));
        }
        if !self.late_sets.is_empty() {
            for (name, set) in &self.late_sets {
                set_decl(&mut ops, name, set);
            }
            for (name, lines) in &self.rewrite {
                rules(&mut ops, name, lines);
            }
        }
        ops
    }

    /// Its element changes, if that is all it changes.
    #[cfg(test)]
    pub(crate) fn element_ops(&self) -> Option<Vec<(ElementOp, String, Vec<Element>)>> {
        self.ops()
            .into_iter()
            .map(|op| match op {
                Op::Elements { op, set, elements } => Some((op, set, elements)),
                _ => None,
            })
            .collect()
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// How many objects it touches (set elements, chains):
    /// what an update costs.
    pub fn size(&self) -> usize {
        self.new_sets
            .iter()
            .chain(&self.late_sets)
            .map(|(_, s)| 1 + s.elements.len())
            .sum::<usize>()
            + self.new_chains.len()
            + self
                .add_elements
                .iter()
                .map(|(_, e)| e.len())
                .sum::<usize>()
            + self.rewrite.len()
            + self
                .del_elements
                .iter()
                .map(|(_, e)| e.len())
                .sum::<usize>()
            + self.del_chains.len()
            + self.del_sets.len()
    }

    /// One `nft -f` transaction.
    pub fn script(&self) -> String {
        let mut b = Batch::default();
        b.extend(self);
        b.script()
    }
}

fn dir_prefix(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

/// The longest policy chain name: the kernel takes names of up to 255
/// bytes, and a policy's rule chains add `/RULE/PEER` to it.
pub const MAX_CHAIN_NAME: usize = 200;

/// The chain of `policy` for `dir`: `in/NAMESPACE/NAME` (a namespace
/// has at most 63 characters, a name 253), or, when that is longer than
/// [`MAX_CHAIN_NAME`], the name cut and ended with `_` and a hash of the
/// whole: every legal name gives a name the kernel and `nft`'s parser
/// take (`_` is in nft's identifiers and in no Kubernetes name, so a cut
/// name is never another policy's full one), and a cut name can only
/// meet another policy of its own namespace.
pub fn policy_chain(dir: Direction, policy: &PolicyKey) -> String {
    let full = format!("{}/{}/{}", dir_prefix(dir), policy.namespace, policy.name);
    if full.len() <= MAX_CHAIN_NAME {
        return full;
    }
    let hash = format!("_{:016x}", fnv(&full));
    let mut keep = MAX_CHAIN_NAME - hash.len();
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{hash}", &full[..keep])
}

/// The chain rule `rule` of a policy whose chain is `policy_chain` goes
/// on in when it has several peers and several ports.
fn rule_chain(policy_chain: &str, rule: usize) -> String {
    format!("{policy_chain}/{rule}")
}

/// The chain of the excepts of peer `peer` of a rule (its chain
/// `rule_chain`).
fn except_chain(rule_chain: &str, peer: usize) -> String {
    format!("{rule_chain}/{peer}")
}

/// An ipBlock with more excepts than this matches them in a chain of
/// its own (a rule of the kernel holds at most 128 expressions; each
/// except takes two or three).
pub const INLINE_EXCEPTS: usize = 8;

/// The endpoint chain for `dir` of the endpoints that `policies` (in
/// order) isolate, named by a hash of that list: every endpoint the same
/// policies isolate shares it, so a new pod is a set element, not a
/// chain. (A hash collision takes the next free `-N` suffix.)
pub fn endpoint_chain(dir: Direction, policies: &[PolicyKey]) -> String {
    let list: String = policies
        .iter()
        .map(|p| policy_chain(dir, p) + "\n")
        .collect();
    format!("ep-{}/{:016x}", dir_prefix(dir), fnv(&list))
}

/// FNV-1a, 64 bits, of `text`: stable across runs and builds.
fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What a pod set holds, which is also its identity: every rule that
/// needs the same set shares it (as Calico shares an IP set per
/// selector), so a pod's change is one element per distinct selector, not
/// one per rule that repeats it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SetDef {
    /// Addresses of the pods `pods` selects in namespace `ns` (a peer
    /// without namespaceSelector: the policy's own) or in the namespaces
    /// `namespaces` selects.
    Peer {
        ns: Option<String>,
        namespaces: Option<crate::Selector>,
        pods: crate::Selector,
        v6: bool,
    },
    /// `address . proto . port` of the pods whose port `name` resolves
    /// (only local endpoints when `local`: an ingress rule's destination).
    Named {
        local: bool,
        proto: Proto,
        name: String,
        v6: bool,
    },
}

impl SetDef {
    fn kind(&self) -> SetKind {
        match self {
            Self::Peer { v6: false, .. } => SetKind::Addr4,
            Self::Peer { v6: true, .. } => SetKind::Addr6,
            Self::Named { v6: false, .. } => SetKind::Named4,
            Self::Named { v6: true, .. } => SetKind::Named6,
        }
    }

    /// Its name: what it is, and a hash of its definition (`-N` added on
    /// a collision).
    fn name(&self) -> String {
        let h = fnv(&format!("{self:?}"));
        match self {
            Self::Peer { v6, .. } => format!("peer/{h:016x}.p{}", if *v6 { 6 } else { 4 }),
            Self::Named { v6, .. } => format!("port/{h:016x}.n{}", if *v6 { 6 } else { 4 }),
        }
    }

    /// What a pod must have to be in it (a necessary condition).
    fn index_key(&self) -> IndexKey {
        match self {
            Self::Peer {
                ns,
                namespaces,
                pods,
                ..
            } => {
                let n = match (ns, namespaces) {
                    (Some(ns), _) => NsPart::Name(ns.clone()),
                    (None, Some(sel)) => {
                        required(sel).map_or(NsPart::Any, |(k, v)| NsPart::Label(k, v))
                    }
                    (None, None) => NsPart::Any,
                };
                let p = required(pods).map_or(PodPart::Any, |(k, v)| PodPart::Label(k, v));
                IndexKey::Peer(n, p)
            }
            Self::Named { name, .. } => IndexKey::Port(name.clone()),
        }
    }
}

/// Objects of the table shared by definition and kept while something
/// uses them (endpoint chains by their list of policies, pod sets by
/// [`SetDef`]): each named by its definition's hash, a collision taking
/// the next free `-N` suffix.
#[derive(Debug, Clone)]
struct Registry<D, U> {
    by_name: BTreeMap<String, (D, BTreeSet<U>)>,
    by_def: BTreeMap<D, String>,
}

impl<D, U> Default for Registry<D, U> {
    fn default() -> Self {
        Self {
            by_name: BTreeMap::new(),
            by_def: BTreeMap::new(),
        }
    }
}

impl<D: Ord + Clone, U: Ord> Registry<D, U> {
    /// The name of `def`'s object, `user` recorded as using it; `true`
    /// when the object is new (named from `base`), to be made.
    fn acquire(&mut self, def: D, base: impl FnOnce() -> String, user: U) -> (String, bool) {
        if let Some(name) = self.by_def.get(&def) {
            if let Some((_, users)) = self.by_name.get_mut(name) {
                users.insert(user);
            }
            return (name.clone(), false);
        }
        let base = base();
        let mut name = base.clone();
        for n in 1.. {
            if !self.by_name.contains_key(&name) {
                break;
            }
            name = format!("{base}-{n}");
        }
        self.by_def.insert(def.clone(), name.clone());
        self.by_name
            .insert(name.clone(), (def, [user].into_iter().collect()));
        (name, true)
    }

    /// `user` no longer uses object `name`; its definition if that was
    /// its last user (the object goes).
    fn release(&mut self, name: &str, user: &U) -> Option<D> {
        let (_, users) = self.by_name.get_mut(name)?;
        users.remove(user);
        if !users.is_empty() {
            return None;
        }
        let (def, _) = self.by_name.remove(name)?;
        self.by_def.remove(&def);
        Some(def)
    }

    /// The definition of object `name`.
    fn def(&self, name: &str) -> Option<&D> {
        self.by_name.get(name).map(|(d, _)| d)
    }
}

/// Everything compiled for one policy: what the incremental updates need.
#[derive(Debug, Clone, Default)]
struct Compiled {
    /// The shared pod sets its rules use.
    sets: BTreeSet<String>,
    /// Its rule and except chains (besides its policy chains).
    chains: BTreeSet<String>,
}

/// The namespace side of a pod set's index key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum NsPart {
    /// The pod's namespace is this one (a peer without
    /// namespaceSelector).
    Name(String),
    /// The pod's namespace has this label.
    Label(String, String),
    /// Any namespace.
    Any,
}

/// The pod side of a pod set's index key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PodPart {
    /// The pod has this label.
    Label(String, String),
    /// Any pod.
    Any,
}

/// What a pod must have for a pod set to hold it: a necessary condition,
/// so a pod's change looks only at the sets its keys find.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum IndexKey {
    /// A pod peer's set: its namespace and one label it requires.
    Peer(NsPart, PodPart),
    /// A named port's set: pods with a port of this name.
    Port(String),
}

/// Shared pod sets by [`IndexKey`].
type Index = BTreeMap<IndexKey, BTreeSet<String>>;

/// A label a selector requires (one of its matchLabels), if any.
fn required(sel: &crate::Selector) -> Option<(String, String)> {
    sel.match_labels
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
}

/// The old values of what a change touched (`None`: it did not exist),
/// so its delta is computed over those keys only: a change costs what it
/// touches, not the size of the table.
#[derive(Debug, Clone, Default)]
struct Journal {
    sets: BTreeMap<String, SetWas>,
    chains: BTreeMap<String, Option<Vec<Line>>>,
}

/// What a set was before the change under way.
#[derive(Debug, Clone)]
enum SetWas {
    /// All of it (`None`: it did not exist).
    Whole(Option<Set>),
    /// Only elements changed so far: those added and those removed since
    /// (a pod's change touches a few elements of large sets).
    Elements {
        kind: SetKind,
        added: BTreeSet<Element>,
        removed: BTreeSet<Element>,
    },
}

/// A user of an endpoint chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum User {
    /// An interface dispatched to it.
    Iface(String),
    /// A Pod scheduled to this node and not wired yet: its chains are
    /// made ready before its ADD, which then only adds elements.
    Scheduled(PodKey),
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

/// The incremental compiler: inputs, the table, and what was compiled.
#[derive(Debug, Clone)]
pub struct Compiler {
    world: World,
    /// Every workload interface of this node and its addresses (its
    /// allowed sources), pod or no pod.
    sources: BTreeMap<String, Vec<IpAddr>>,
    /// Local endpoints: host interface → its pod.
    endpoints: BTreeMap<String, PodKey>,
    /// Local endpoints by pod: its interfaces (one per attachment).
    local: BTreeMap<PodKey, BTreeSet<String>>,
    /// Pods by address (two pods may briefly share one).
    by_ip: BTreeMap<IpAddr, BTreeSet<PodKey>>,
    compiled: BTreeMap<PolicyKey, Compiled>,
    /// Interfaces of pods whose Pod cannot be read: everything dropped
    /// but replies, until it can.
    quarantined: BTreeSet<String>,
    /// Endpoint chains, by direction and the policies they jump to.
    ep_chains: Registry<(Direction, Vec<PolicyKey>), User>,
    /// Pods scheduled to this node and not wired yet, with their labels:
    /// the policies selecting them are compiled and their endpoint chains
    /// made before their ADD.
    scheduled: BTreeMap<PodKey, Labels>,
    /// The endpoint chains each scheduled pod holds.
    prepared: BTreeMap<PodKey, Vec<String>>,
    /// For each pod here (a local endpoint, or scheduled), the policies
    /// selecting it.
    selecting: BTreeMap<PodKey, BTreeSet<PolicyKey>>,
    /// The labels `selecting` was last worked out from, per pod here: a
    /// pod whose labels did not change keeps its selection (a policy's
    /// change updates it itself), without matching every policy of its
    /// namespace again.
    selected_as: BTreeMap<PodKey, Vec<Labels>>,
    /// For each policy, how many pods here it selects (compiled while
    /// not zero).
    here: BTreeMap<PolicyKey, usize>,
    /// Shared pod sets, used by policies.
    shared: Registry<SetDef, PolicyKey>,
    /// Shared pod sets by what a pod needs to be in them.
    index: Index,
    table: Table,
    /// What the change under way touched.
    journal: Journal,
    /// The directions whose endpoint chains came or went in the change
    /// under way: their dispatch chains are written once, at its end.
    stale_dispatch: BTreeSet<Direction>,
}

impl Compiler {
    /// Nothing known: a table isolating nothing.
    pub fn new() -> Self {
        Self {
            world: World::default(),
            sources: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            local: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            compiled: BTreeMap::new(),
            quarantined: BTreeSet::new(),
            ep_chains: Registry::default(),
            scheduled: BTreeMap::new(),
            prepared: BTreeMap::new(),
            selecting: BTreeMap::new(),
            selected_as: BTreeMap::new(),
            here: BTreeMap::new(),
            shared: Registry::default(),
            index: Index::new(),
            table: Table::new(),
            journal: Journal::default(),
            stale_dispatch: BTreeSet::new(),
        }
    }

    /// Compiles `world` with the local endpoints `local` (one interface
    /// per pod, its sources the pod's addresses) in one go.
    pub fn full(world: World, local: BTreeMap<PodKey, String>) -> Self {
        let sources = local
            .iter()
            .map(|(k, i)| {
                let ips = world.pods.get(k).map(|p| p.ips.clone()).unwrap_or_default();
                (i.clone(), ips)
            })
            .collect();
        let endpoints = local.into_iter().map(|(k, i)| (i, k)).collect();
        Self::full_with(world, sources, endpoints, BTreeMap::new())
    }

    /// The same inputs compiled again in one go (what an incremental
    /// table must equal).
    pub fn rebuilt(&self) -> Self {
        self.rebuilt_with(self.world.clone())
    }

    /// This node's inputs (workloads, endpoints, scheduled pods,
    /// quarantine) compiled in one go with `world` instead.
    pub fn rebuilt_with(&self, world: World) -> Self {
        let mut c = Self::full_with(
            world,
            self.sources.clone(),
            self.endpoints.clone(),
            self.scheduled.clone(),
        );
        for i in &self.quarantined {
            let _ = c.set_quarantine(i, true);
        }
        c
    }

    /// The policies compiled here (those selecting a pod of this node).
    pub fn compiled(&self) -> impl Iterator<Item = &PolicyKey> {
        self.compiled.keys()
    }

    /// Compiles `world` in one go with this node's workload interfaces
    /// (`sources`: interface → its addresses), the local endpoints among
    /// them (interface → pod) and the pods scheduled to this node and not
    /// wired yet (see [`Compiler::set_scheduled`]).
    pub fn full_with(
        world: World,
        sources: BTreeMap<String, Vec<IpAddr>>,
        endpoints: BTreeMap<String, PodKey>,
        scheduled: BTreeMap<PodKey, Labels>,
    ) -> Self {
        let mut local: BTreeMap<PodKey, BTreeSet<String>> = BTreeMap::new();
        for (i, k) in &endpoints {
            local.entry(k.clone()).or_default().insert(i.clone());
        }
        let mut c = Self {
            world,
            endpoints,
            local,
            scheduled,
            ..Self::new()
        };
        for (i, ips) in sources {
            let _ = c.set_workload(&i, Some(ips));
        }
        for (k, p) in &c.world.pods {
            for ip in &p.ips {
                c.by_ip.entry(*ip).or_default().insert(k.clone());
            }
        }
        let here: BTreeSet<PodKey> = c.local.keys().chain(c.scheduled.keys()).cloned().collect();
        for k in here {
            c.update_here(&k);
        }
        let keys: Vec<PolicyKey> = c.world.policies.keys().cloned().collect();
        for k in keys {
            c.recompile_policy(&k);
        }
        let eps: Vec<PodKey> = c.local.keys().cloned().collect();
        for k in eps {
            c.recompile_endpoint(&k);
        }
        let scheduled: Vec<PodKey> = c.scheduled.keys().cloned().collect();
        for k in scheduled {
            c.prepare(&k);
        }
        c.redispatch();
        c.journal = Journal::default();
        c
    }

    /// The delta of the change just made: the touched keys, old against
    /// new.
    fn finish(&mut self) -> Delta {
        self.redispatch();
        let j = std::mem::take(&mut self.journal);
        let mut old = Table::default();
        let mut new = Table::default();
        for (name, was) in j.sets {
            match was {
                SetWas::Whole(was) => {
                    if let Some(set) = was {
                        old.sets.insert(name.clone(), set);
                    }
                    if let Some(set) = self.table.sets.get(&name) {
                        new.sets.insert(name, set.clone());
                    }
                }
                // Both sides hold only what changed: the delta is the
                // same as between the whole sets.
                SetWas::Elements {
                    kind,
                    added,
                    removed,
                } => {
                    old.sets.insert(
                        name.clone(),
                        Set {
                            kind,
                            elements: removed,
                        },
                    );
                    new.sets.insert(
                        name,
                        Set {
                            kind,
                            elements: added,
                        },
                    );
                }
            }
        }
        for (name, was) in j.chains {
            if let Some(rules) = was {
                old.chains.insert(name.clone(), rules);
            }
            if let Some(rules) = self.table.chains.get(&name) {
                new.chains.insert(name, rules.clone());
            }
        }
        old.delta(&new)
    }

    fn touch_set(&mut self, name: &str) {
        let was = match self.journal.sets.get(name) {
            Some(SetWas::Whole(_)) => return,
            None => self.table.sets.get(name).cloned(),
            Some(SetWas::Elements { added, removed, .. }) => {
                self.table.sets.get(name).cloned().map(|mut set| {
                    set.elements.retain(|e| !added.contains(e));
                    set.elements.extend(removed.iter().cloned());
                    set
                })
            }
        };
        self.journal
            .sets
            .insert(name.to_string(), SetWas::Whole(was));
    }

    /// Removes `remove` from set `name` and adds `add`, journaling the
    /// elements only.
    fn change_elements(&mut self, name: &str, remove: &BTreeSet<Element>, add: BTreeSet<Element>) {
        let Some(set) = self.table.sets.get_mut(name) else {
            return;
        };
        let j = self
            .journal
            .sets
            .entry(name.to_string())
            .or_insert_with(|| SetWas::Elements {
                kind: set.kind,
                added: BTreeSet::new(),
                removed: BTreeSet::new(),
            });
        let mut log = match j {
            SetWas::Whole(_) => None,
            SetWas::Elements { added, removed, .. } => Some((added, removed)),
        };
        for e in remove {
            if set.elements.remove(e)
                && let Some((added, removed)) = log.as_mut()
                && !added.remove(e)
            {
                removed.insert(e.clone());
            }
        }
        for e in add {
            if !set.elements.contains(&e) {
                set.elements.insert(e.clone());
                if let Some((added, removed)) = log.as_mut()
                    && !removed.remove(&e)
                {
                    added.insert(e);
                }
            }
        }
    }

    fn put_set(&mut self, name: String, set: Set) {
        self.touch_set(&name);
        self.table.sets.insert(name, set);
    }

    fn drop_set(&mut self, name: &str) {
        self.touch_set(name);
        self.table.sets.remove(name);
    }

    fn touch_chain(&mut self, name: &str) {
        if !self.journal.chains.contains_key(name) {
            let was = self.table.chains.get(name).cloned();
            self.journal.chains.insert(name.to_string(), was);
        }
    }

    fn put_chain(&mut self, name: String, rules: Vec<Line>) {
        self.touch_chain(&name);
        self.table.chains.insert(name, rules);
    }

    fn drop_chain(&mut self, name: &str) {
        self.touch_chain(name);
        self.table.chains.remove(name);
    }

    fn map(&self, dir: Direction) -> &BTreeMap<String, Verdict> {
        match dir {
            Direction::Ingress => &self.table.ingress,
            Direction::Egress => &self.table.egress,
        }
    }

    fn map_mut(&mut self, dir: Direction) -> &mut BTreeMap<String, Verdict> {
        match dir {
            Direction::Ingress => &mut self.table.ingress,
            Direction::Egress => &mut self.table.egress,
        }
    }

    /// Dispatches `ifname` to `verdict` in `dir`: its name moved to that
    /// verdict's interface set (which exists: the quarantine's always, an
    /// endpoint chain's with the chain).
    fn put_map(&mut self, dir: Direction, ifname: &str, verdict: Verdict) {
        let name = BTreeSet::from([Element::Iface(ifname.to_string())]);
        let set = iface_set(dir, &verdict);
        if let Some(old) = self.map_mut(dir).insert(ifname.to_string(), verdict)
            && iface_set(dir, &old) != set
        {
            self.change_elements(&iface_set(dir, &old), &name, BTreeSet::new());
        }
        self.change_elements(&set, &BTreeSet::new(), name);
    }

    /// `ifname` no longer dispatched in `dir`.
    fn drop_map(&mut self, dir: Direction, ifname: &str) {
        if let Some(old) = self.map_mut(dir).remove(ifname) {
            let name = BTreeSet::from([Element::Iface(ifname.to_string())]);
            self.change_elements(&iface_set(dir, &old), &name, BTreeSet::new());
        }
    }

    /// Writes the dispatch chains whose endpoint chains came or went
    /// during the change again (once per change, however many came or
    /// went): the quarantine, then one line per endpoint chain.
    fn redispatch(&mut self) {
        for dir in std::mem::take(&mut self.stale_dispatch) {
            self.write_dispatch(dir);
        }
    }

    fn write_dispatch(&mut self, dir: Direction) {
        let mut lines = vec![Line::Quarantine {
            dir,
            set: iface_set(dir, &Verdict::Drop),
        }];
        lines.extend(
            self.ep_chains
                .by_name
                .iter()
                .filter(|(_, ((d, _), _))| *d == dir)
                .map(|(chain, _)| Line::Dispatch {
                    dir,
                    set: iface_set(dir, &Verdict::Jump(chain.clone())),
                    chain: chain.clone(),
                }),
        );
        self.put_chain(dispatch_chain(dir), lines);
    }

    /// The table as it should be.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The inputs.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The local endpoints, by pod: its interfaces.
    pub fn local(&self) -> &BTreeMap<PodKey, BTreeSet<String>> {
        &self.local
    }

    /// The local endpoints: interface → pod.
    pub fn endpoints(&self) -> &BTreeMap<String, PodKey> {
        &self.endpoints
    }

    /// Every workload interface and its addresses.
    pub fn workloads(&self) -> &BTreeMap<String, Vec<IpAddr>> {
        &self.sources
    }

    /// Workload interface `ifname` of this node with its addresses (the
    /// only sources its packets may carry), or gone (`None`). An
    /// interface not known here takes and sends nothing.
    pub fn set_workload(&mut self, ifname: &str, addrs: Option<Vec<IpAddr>>) -> Delta {
        let old = match addrs {
            Some(a) => self.sources.insert(ifname.to_string(), a),
            None => self.sources.remove(ifname),
        };
        let new = self.sources.get(ifname).cloned();
        let name = || BTreeSet::from([Element::Iface(ifname.to_string())]);
        match (&old, &new) {
            (None, Some(_)) => self.change_elements(IFACES_SET, &BTreeSet::new(), name()),
            (Some(_), None) => self.change_elements(IFACES_SET, &name(), BTreeSet::new()),
            _ => {}
        }
        for v6 in [false, true] {
            let of = |a: &Option<Vec<IpAddr>>| -> BTreeSet<Element> {
                a.iter()
                    .flatten()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .map(|ip| Element::IfaceAddr {
                        ifname: ifname.to_string(),
                        addr: *ip,
                    })
                    .collect()
            };
            let (was, now) = (of(&old), of(&new));
            let gone: BTreeSet<Element> = was.difference(&now).cloned().collect();
            let added: BTreeSet<Element> = now.difference(&was).cloned().collect();
            self.change_elements(source_set(v6), &gone, added);
        }
        self.finish()
    }

    /// The pods scheduled to this node and not wired yet.
    pub fn scheduled(&self) -> &BTreeMap<PodKey, Labels> {
        &self.scheduled
    }

    /// A Pod the API schedules to this node and that is not wired yet
    /// (`Some`: its labels), or no longer so (`None`). The policies that
    /// select it are compiled and its endpoint chains made now, so its ADD
    /// changes only set elements (the kernel's fast path); nothing
    /// it prepares lets traffic through, since no interface is in its set.
    pub fn set_scheduled(&mut self, key: &PodKey, labels: Option<Labels>) -> Delta {
        match labels {
            Some(l) => self.scheduled.insert(key.clone(), l),
            None => self.scheduled.remove(key),
        };
        self.endpoint_changed(key);
        self.finish()
    }

    /// A pod added, changed (`Some`) or gone (`None`).
    pub fn set_pod(&mut self, key: &PodKey, pod: Option<Pod>) -> Delta {
        // The sets that may hold it as it was.
        let mut before = BTreeSet::new();
        if let Some(p) = self.world.pods.get(key) {
            let ns = self.world.namespace_labels(&key.namespace);
            self.candidates(&key.namespace, ns, p, &mut before);
        }
        let old = match pod {
            Some(p) => self.world.pods.insert(key.clone(), p),
            None => self.world.pods.remove(key),
        };
        let mut ips: BTreeSet<IpAddr> = old.iter().flat_map(|p| p.ips.clone()).collect();
        for ip in &old.as_ref().map(|p| p.ips.clone()).unwrap_or_default() {
            if let Some(s) = self.by_ip.get_mut(ip) {
                s.remove(key);
                if s.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        if let Some(p) = self.world.pods.get(key) {
            for ip in &p.ips {
                ips.insert(*ip);
                self.by_ip.entry(*ip).or_default().insert(key.clone());
            }
        }
        let labels_changed =
            old.as_ref().map(|p| &p.labels) != self.world.pods.get(key).map(|p| &p.labels);
        self.refresh_addresses(&ips, before);
        if self.local.contains_key(key) && labels_changed {
            self.endpoint_changed(key);
        }
        self.finish()
    }

    /// A namespace added, relabelled or gone.
    pub fn set_namespace(&mut self, name: &str, ns: Option<Namespace>) -> Delta {
        // Its pods' addresses, and the sets that may hold those pods under
        // its old labels.
        let mut before = BTreeSet::new();
        let mut ips = BTreeSet::new();
        let old = self.world.namespace_labels(name);
        for (_, p) in in_namespace(&self.world.pods, name) {
            self.candidates(name, old, p, &mut before);
            ips.extend(p.ips.iter().copied());
        }
        match ns {
            Some(n) => self.world.namespaces.insert(name.to_string(), n),
            None => self.world.namespaces.remove(name),
        };
        self.refresh_addresses(&ips, before);
        self.finish()
    }

    /// A policy added, changed or gone.
    pub fn set_policy(&mut self, key: &PolicyKey, policy: Option<Policy>) -> Delta {
        match policy {
            Some(p) => self.world.policies.insert(key.clone(), p),
            None => self.world.policies.remove(key),
        };
        self.recount(key);
        self.recompile_policy(key);
        for k in keys_in(&self.local, &key.namespace) {
            self.recompile_endpoint(&k);
        }
        for k in keys_in(&self.scheduled, &key.namespace) {
            self.prepare(&k);
        }
        self.finish()
    }

    /// Quarantines interface `ifname` (every new connection in or out
    /// dropped) or lifts it. An interface that is a local endpoint keeps
    /// its endpoint's rules.
    pub fn set_quarantine(&mut self, ifname: &str, on: bool) -> Delta {
        if on {
            self.quarantined.insert(ifname.to_string());
        } else {
            self.quarantined.remove(ifname);
        }
        self.quarantine_maps(ifname);
        self.finish()
    }

    /// Whether `ifname` is quarantined.
    pub fn is_quarantined(&self, ifname: &str) -> bool {
        self.quarantined.contains(ifname)
    }

    fn quarantine_maps(&mut self, ifname: &str) {
        if let Some(k) = self.endpoints.get(ifname).cloned() {
            self.recompile_iface(&k, ifname);
            return;
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            if self.quarantined.contains(ifname) {
                self.put_map(dir, ifname, Verdict::Drop);
            } else if self.map(dir).get(ifname) == Some(&Verdict::Drop) {
                self.drop_map(dir, ifname);
            }
        }
    }

    /// Interface `ifname` of this node is an endpoint of pod `pod`
    /// (`Some`: it gets the pod's policies), or of none (`None`). A pod
    /// has one per attachment, each enforced.
    pub fn set_endpoint(&mut self, ifname: &str, pod: Option<PodKey>) -> Delta {
        let old = match &pod {
            Some(k) => self.endpoints.insert(ifname.to_string(), k.clone()),
            None => self.endpoints.remove(ifname),
        };
        if old == pod {
            return self.finish();
        }
        if let Some(old) = &old {
            if let Some(ifs) = self.local.get_mut(old) {
                ifs.remove(ifname);
                if ifs.is_empty() {
                    self.local.remove(old);
                }
            }
            for dir in [Direction::Ingress, Direction::Egress] {
                self.release_ep_chain(dir, ifname);
                self.drop_map(dir, ifname);
            }
            self.quarantine_maps(ifname);
            self.endpoint_changed(old);
            self.refresh_pod_addresses(old);
        }
        if let Some(k) = &pod {
            self.local
                .entry(k.clone())
                .or_default()
                .insert(ifname.to_string());
            self.endpoint_changed(k);
            self.refresh_pod_addresses(k);
        }
        self.finish()
    }

    /// Pod `key`'s addresses in the pod sets again (whether it is local
    /// changes the named-port sets of ingress rules).
    fn refresh_pod_addresses(&mut self, key: &PodKey) {
        let ips: BTreeSet<IpAddr> = self
            .world
            .pods
            .get(key)
            .map(|p| p.ips.iter().copied().collect())
            .unwrap_or_default();
        self.refresh_addresses(&ips, BTreeSet::new());
    }

    /// The endpoint `key`'s selection may have changed: the policies of
    /// its namespace compiled or dropped as they now select local pods,
    /// and its own chains.
    fn endpoint_changed(&mut self, key: &PodKey) {
        for k in self.update_here(key) {
            if self.selects_local(&k) != self.compiled.contains_key(&k) {
                self.recompile_policy(&k);
            }
        }
        self.recompile_endpoint(key);
        self.prepare(key);
    }

    /// The policies of namespace `ns`.
    fn policies_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = (&'a PolicyKey, &'a Policy)> {
        in_namespace(&self.world.policies, ns)
    }

    /// Whether policy `p` selects pod `key` as a pod here: a local
    /// endpoint with its Pod's labels, or a scheduled pod.
    fn selects_here(&self, p: &Policy, key: &PodKey) -> bool {
        self.here_labels(key)
            .into_iter()
            .any(|l| p.selector.matches(l))
    }

    /// The labels pod `key` is selected by here: its Pod's as a local
    /// endpoint, those it was scheduled with (once each; none if it is
    /// neither).
    fn here_labels(&self, key: &PodKey) -> Vec<&Labels> {
        let mut v = Vec::new();
        if self.local.contains_key(key)
            && let Some(p) = self.world.pods.get(key)
        {
            v.push(&p.labels);
        }
        if let Some(l) = self.scheduled.get(key)
            && !v.contains(&l)
        {
            v.push(l);
        }
        v
    }

    /// Brings `selecting` and `here` in line for pod `key`; returns the
    /// policies whose count went from or to zero. Nothing to do when its
    /// labels here are those its selection was worked out from.
    fn update_here(&mut self, key: &PodKey) -> Vec<PolicyKey> {
        let here = self.here_labels(key);
        let same = match self.selected_as.get(key) {
            Some(l) => l.iter().eq(here.iter().copied()),
            None => here.is_empty(),
        };
        if same {
            return Vec::new();
        }
        let new: BTreeSet<PolicyKey> = self
            .policies_in(&key.namespace)
            .filter(|(_, p)| here.iter().any(|l| p.selector.matches(l)))
            .map(|(k, _)| k.clone())
            .collect();
        let labels: Vec<Labels> = here.into_iter().cloned().collect();
        if labels.is_empty() {
            self.selected_as.remove(key);
        } else {
            self.selected_as.insert(key.clone(), labels);
        }
        let old = self.selecting.remove(key).unwrap_or_default();
        let mut changed = Vec::new();
        for k in old.difference(&new) {
            if let Some(n) = self.here.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.here.remove(k);
                    changed.push(k.clone());
                }
            }
        }
        for k in new.difference(&old) {
            let n = self.here.entry(k.clone()).or_default();
            *n += 1;
            if *n == 1 {
                changed.push(k.clone());
            }
        }
        if !new.is_empty() {
            self.selecting.insert(key.clone(), new);
        }
        changed
    }

    /// Counts again the pods here that policy `key` selects (it changed).
    fn recount(&mut self, key: &PolicyKey) {
        // A pod both wired and still scheduled counts once.
        let pods: BTreeSet<PodKey> = keys_in(&self.local, &key.namespace)
            .into_iter()
            .chain(keys_in(&self.scheduled, &key.namespace))
            .collect();
        let policy = self.world.policies.get(key).cloned();
        let mut n = 0;
        for pk in pods {
            let on = policy.as_ref().is_some_and(|p| self.selects_here(p, &pk));
            let set = self.selecting.entry(pk.clone()).or_default();
            if on {
                set.insert(key.clone());
                n += 1;
            } else {
                set.remove(key);
            }
            if set.is_empty() {
                self.selecting.remove(&pk);
            }
        }
        if n > 0 {
            self.here.insert(key.clone(), n);
        } else {
            self.here.remove(key);
        }
    }

    /// Whether policy `key` selects a local endpoint or a pod scheduled
    /// here.
    fn selects_local(&self, key: &PolicyKey) -> bool {
        self.here.contains_key(key) && self.world.policies.contains_key(key)
    }

    /// The policies isolating local endpoint `key` in `dir`: of those
    /// selecting it here (kept up to date), the ones matching its Pod's
    /// labels with rules for `dir`.
    fn isolating(&self, key: &PodKey, dir: Direction) -> Vec<PolicyKey> {
        let (Some(pod), Some(selecting)) = (self.world.pods.get(key), self.selecting.get(key))
        else {
            return Vec::new();
        };
        selecting
            .iter()
            .filter(|k| {
                self.world
                    .policies
                    .get(*k)
                    .is_some_and(|p| p.rules(dir).is_some() && p.selector.matches(&pod.labels))
            })
            .cloned()
            .collect()
    }

    /// The policies of namespace `ns` isolating a pod labelled `labels` in
    /// `dir`.
    fn isolating_labels(&self, ns: &str, labels: &Labels, dir: Direction) -> Vec<PolicyKey> {
        self.policies_in(ns)
            .filter(|(_, p)| p.rules(dir).is_some() && p.selector.matches(labels))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Makes the endpoint chains of scheduled pod `key` (and lets go of
    /// those it no longer needs, or all of them once it is not scheduled).
    fn prepare(&mut self, key: &PodKey) {
        let mut want = Vec::new();
        if let Some(labels) = self.scheduled.get(key).cloned()
            && !self.local.contains_key(key)
        {
            for dir in [Direction::Ingress, Direction::Egress] {
                let policies = self.isolating_labels(&key.namespace, &labels, dir);
                if !policies.is_empty() {
                    want.push(self.ep_chain(dir, policies, User::Scheduled(key.clone())));
                }
            }
        }
        let held = self.prepared.remove(key).unwrap_or_default();
        for chain in held.into_iter().filter(|c| !want.contains(c)) {
            self.release(&chain, &User::Scheduled(key.clone()));
        }
        if !want.is_empty() {
            self.prepared.insert(key.clone(), want);
        }
    }

    /// Each interface of local endpoint `key` dispatched as its policies
    /// say.
    fn recompile_endpoint(&mut self, key: &PodKey) {
        for ifname in self.local.get(key).cloned().unwrap_or_default() {
            self.recompile_iface(key, &ifname);
        }
    }

    fn recompile_iface(&mut self, key: &PodKey, ifname: &str) {
        let ifname = ifname.to_string();
        for dir in [Direction::Ingress, Direction::Egress] {
            let policies = self.isolating(key, dir);
            let current = match self.map(dir).get(&ifname) {
                Some(Verdict::Jump(c)) => self.ep_chains.def(c),
                _ => None,
            };
            if !policies.is_empty() && current.is_some_and(|(_, p)| *p == policies) {
                continue;
            }
            self.release_ep_chain(dir, &ifname);
            if policies.is_empty() {
                if self.quarantined.contains(&ifname) {
                    // Known now, and not isolated: the quarantine is over
                    // only when the engine lifts it.
                    self.put_map(dir, &ifname, Verdict::Drop);
                } else {
                    self.drop_map(dir, &ifname);
                }
                continue;
            }
            let chain = self.ep_chain(dir, policies, User::Iface(ifname.clone()));
            self.put_map(dir, &ifname, Verdict::Jump(chain));
        }
    }

    /// The endpoint chain for `dir` jumping to `policies`, used by
    /// `user`; made if nothing used it yet.
    fn ep_chain(&mut self, dir: Direction, policies: Vec<PolicyKey>, user: User) -> String {
        let base = || endpoint_chain(dir, &policies);
        let (name, new) = self.ep_chains.acquire((dir, policies.clone()), base, user);
        if !new {
            return name;
        }
        let mut rules = vec![Line::DropInvalid, Line::ClearMark];
        rules.extend(policies.iter().map(|p| Line::Jump(policy_chain(dir, p))));
        rules.push(Line::DropUnmarked);
        rules.push(Line::ClearMark);
        self.put_chain(name.clone(), rules);
        self.put_set(
            iface_set(dir, &Verdict::Jump(name.clone())),
            Set {
                kind: SetKind::Iface,
                elements: BTreeSet::new(),
            },
        );
        self.stale_dispatch.insert(dir);
        name
    }

    /// Interface `ifname` no longer uses the endpoint chain its `dir` map
    /// entry jumps to. The entry stays.
    fn release_ep_chain(&mut self, dir: Direction, ifname: &str) {
        if let Some(Verdict::Jump(chain)) = self.map(dir).get(ifname).cloned() {
            self.release(&chain, &User::Iface(ifname.to_string()));
        }
    }

    /// `user` no longer uses endpoint chain `chain` (dropped with its last
    /// user).
    fn release(&mut self, chain: &str, user: &User) {
        if let Some((dir, _)) = self.ep_chains.release(chain, user) {
            self.stale_dispatch.insert(dir);
            self.drop_chain(chain);
            self.drop_set(&iface_set(dir, &Verdict::Jump(chain.to_string())));
        }
    }

    /// Drops what was compiled for `key` and compiles it again if it
    /// exists and selects a local endpoint. The shared sets it still uses
    /// stay as they are (no refill).
    fn recompile_policy(&mut self, key: &PolicyKey) {
        let old = self.compiled.remove(key).unwrap_or_default();
        for dir in [Direction::Ingress, Direction::Egress] {
            self.drop_chain(&policy_chain(dir, key));
        }
        for c in &old.chains {
            self.drop_chain(c);
        }
        let mut compiled = Compiled::default();
        let wanted = self.selects_local(key);
        if wanted {
            let policy = self.world.policies[key].clone();
            for dir in [Direction::Ingress, Direction::Egress] {
                let Some(rules) = policy.rules(dir) else {
                    continue;
                };
                let chain = policy_chain(dir, key);
                let mut lines = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    lines.extend(self.rule_lines(dir, key, &chain, i, r, &mut compiled));
                }
                self.put_chain(chain, lines);
            }
        }
        for name in old.sets.difference(&compiled.sets) {
            self.release_set(name, key);
        }
        if wanted {
            self.compiled.insert(key.clone(), compiled);
        }
    }

    /// The shared set `def` for policy `key`: made and filled if no
    /// policy uses it yet.
    fn use_set(&mut self, def: SetDef, key: &PolicyKey) -> String {
        let (name, new) = self.shared.acquire(def.clone(), || def.name(), key.clone());
        if !new {
            return name;
        }
        let mut elements = BTreeSet::new();
        for (pk, pod) in &self.world.pods {
            elements.extend(self.pod_elements(&def, pk, pod));
        }
        self.put_set(
            name.clone(),
            Set {
                kind: def.kind(),
                elements,
            },
        );
        self.index
            .entry(def.index_key())
            .or_default()
            .insert(name.clone());
        name
    }

    /// Policy `key` no longer uses shared set `name` (dropped with its
    /// last user).
    fn release_set(&mut self, name: &str, key: &PolicyKey) {
        let Some(def) = self.shared.release(name, key) else {
            return;
        };
        let k = def.index_key();
        if let Some(e) = self.index.get_mut(&k) {
            e.remove(name);
            if e.is_empty() {
                self.index.remove(&k);
            }
        }
        self.drop_set(name);
    }

    /// The lines rule `index` of policy `key` puts in its chain `chain`
    /// (its shared sets used, its own chains made, both recorded in
    /// `compiled`): one per (peer, port) when it has one peer or one port,
    /// else one per port jumping to the rule's chain, which has one per
    /// peer: never peers × ports lines.
    fn rule_lines(
        &mut self,
        dir: Direction,
        key: &PolicyKey,
        chain: &str,
        index: usize,
        r: &Rule,
        compiled: &mut Compiled,
    ) -> Vec<Line> {
        let field = match dir {
            Direction::Ingress => Field::Saddr,
            Direction::Egress => Field::Daddr,
        };
        // Peer matches (None: anyone).
        let mut peers: Vec<Option<PeerMatch>> = Vec::new();
        if r.peers.is_empty() {
            peers.push(None);
        }
        for p in &r.peers {
            let Peer::Pods { namespaces, pods } = p else {
                continue;
            };
            for v6 in [false, true] {
                let def = SetDef::Peer {
                    ns: namespaces.is_none().then(|| key.namespace.clone()),
                    namespaces: namespaces.clone(),
                    pods: pods.clone(),
                    v6,
                };
                let set = self.use_set(def, key);
                compiled.sets.insert(set.clone());
                let m = Some(PeerMatch::Set { v6, field, set });
                if !peers.contains(&m) {
                    peers.push(m);
                }
            }
        }
        // ipBlocks as prefix matches in the rule, not interval sets: they
        // change only with their policy (which rewrites its chain anyway),
        // and nft reads back every interval set's elements before any
        // element update, which made each pod change cost the whole
        // table's blocks.
        for p in &r.peers {
            if let Peer::Block { cidr, except } = p {
                peers.push(Some(PeerMatch::Block {
                    field,
                    cidr: *cidr,
                    except: except.clone(),
                }));
            }
        }
        // Port matches (None: every port of every protocol).
        let mut ports: Vec<Option<L4Match>> = Vec::new();
        if r.ports.is_empty() {
            ports.push(None);
        }
        for p in &r.ports {
            match p {
                PortMatch::All { proto } => ports.push(Some(L4Match::Proto(*proto))),
                PortMatch::Range { proto, first, last } => ports.push(Some(L4Match::Ports {
                    proto: *proto,
                    first: *first,
                    last: *last,
                })),
                PortMatch::Named { proto, name } => {
                    for v6 in [false, true] {
                        let def = SetDef::Named {
                            local: dir == Direction::Ingress,
                            proto: *proto,
                            name: name.clone(),
                            v6,
                        };
                        let set = self.use_set(def, key);
                        compiled.sets.insert(set.clone());
                        ports.push(Some(L4Match::Named { v6, set }));
                    }
                }
            }
        }
        let rule_chain = rule_chain(chain, index);
        // An ipBlock with many excepts: the block in the line, the
        // excepts in a chain of their own that returns on each and
        // allows the rest.
        let mut excepts: Vec<Option<String>> = Vec::with_capacity(peers.len());
        for (j, peer) in peers.iter_mut().enumerate() {
            let Some(PeerMatch::Block { field, except, .. }) = peer else {
                excepts.push(None);
                continue;
            };
            if except.len() <= INLINE_EXCEPTS {
                excepts.push(None);
                continue;
            }
            let name = except_chain(&rule_chain, j);
            let mut lines: Vec<Line> = std::mem::take(except)
                .into_iter()
                .map(|e| Line::ReturnIf {
                    peer: PeerMatch::Block {
                        field: *field,
                        cidr: e,
                        except: Vec::new(),
                    },
                })
                .collect();
            lines.push(Line::Allow {
                peer: None,
                port: None,
            });
            self.put_chain(name.clone(), lines);
            compiled.chains.insert(name.clone());
            excepts.push(Some(name));
        }
        let line = |peer: &Option<PeerMatch>, port: &Option<L4Match>, x: &Option<String>| match x {
            Some(chain) => Line::JumpIf {
                peer: peer.clone(),
                port: port.clone(),
                chain: chain.clone(),
            },
            None => Line::Allow {
                peer: peer.clone(),
                port: port.clone(),
            },
        };
        let mut lines = Vec::new();
        if peers.len() > 1 && ports.len() > 1 {
            // Ports here, peers in the rule's chain.
            let peer_lines = peers
                .iter()
                .zip(&excepts)
                .map(|(p, x)| line(p, &None, x))
                .collect();
            self.put_chain(rule_chain.clone(), peer_lines);
            compiled.chains.insert(rule_chain.clone());
            for port in &ports {
                lines.push(Line::JumpIf {
                    peer: None,
                    port: port.clone(),
                    chain: rule_chain.clone(),
                });
            }
            return lines;
        }
        for (peer, x) in peers.iter().zip(&excepts) {
            for port in &ports {
                let pf = peer.as_ref().map(PeerMatch::v6);
                let qf = port.as_ref().and_then(L4Match::v6);
                if let (Some(a), Some(b)) = (pf, qf)
                    && a != b
                {
                    continue;
                }
                lines.push(line(peer, port, x));
            }
        }
        lines
    }

    /// The elements pod `pk` contributes to the shared set `def` (the
    /// same decision as [`crate::spec::peer_matches`] for a pod peer).
    fn pod_elements(&self, def: &SetDef, pk: &PodKey, pod: &Pod) -> Vec<Element> {
        let (v6, elements): (bool, Vec<Element>) = match def {
            SetDef::Peer {
                ns,
                namespaces,
                pods,
                v6,
            } => {
                let ns_ok = match (ns, namespaces) {
                    (Some(ns), _) => pk.namespace == *ns,
                    (None, Some(sel)) => {
                        let empty = Labels::new();
                        sel.matches(self.world.namespace_labels(&pk.namespace).unwrap_or(&empty))
                    }
                    (None, None) => true,
                };
                if !(ns_ok && pods.matches(&pod.labels)) {
                    return Vec::new();
                }
                (*v6, pod.ips.iter().map(|ip| Element::Addr(*ip)).collect())
            }
            SetDef::Named {
                local,
                proto,
                name,
                v6,
            } => {
                if *local && !self.local.contains_key(pk) {
                    return Vec::new();
                }
                let Some(port) = pod.named_port(name, *proto) else {
                    return Vec::new();
                };
                let e = pod
                    .ips
                    .iter()
                    .map(|ip| Element::Port {
                        addr: *ip,
                        proto: *proto,
                        port,
                    })
                    .collect();
                (*v6, e)
            }
        };
        elements
            .into_iter()
            .filter(|e| e.addr().is_some_and(|a| a.is_ipv6() == v6))
            .collect()
    }

    /// Adds to `out` the pod sets that may hold pod `pod` of namespace
    /// `ns` (labelled `ns_labels`): those its labels, namespace and port
    /// names find in the index. Every set that holds it is among them.
    fn candidates(
        &self,
        ns: &str,
        ns_labels: Option<&Labels>,
        pod: &Pod,
        out: &mut BTreeSet<String>,
    ) {
        let label = |(k, v): (&String, &String)| (k.clone(), v.clone());
        let nss: Vec<NsPart> = [NsPart::Name(ns.to_string()), NsPart::Any]
            .into_iter()
            .chain(
                ns_labels
                    .into_iter()
                    .flatten()
                    .map(&label)
                    .map(|(k, v)| NsPart::Label(k, v)),
            )
            .collect();
        let pods: Vec<PodPart> = [PodPart::Any]
            .into_iter()
            .chain(
                pod.labels
                    .iter()
                    .map(label)
                    .map(|(k, v)| PodPart::Label(k, v)),
            )
            .collect();
        for n in &nss {
            for p in &pods {
                if let Some(e) = self.index.get(&IndexKey::Peer(n.clone(), p.clone())) {
                    out.extend(e.iter().cloned());
                }
            }
        }
        for port in &pod.ports {
            if let Some(e) = self.index.get(&IndexKey::Port(port.name.clone())) {
                out.extend(e.iter().cloned());
            }
        }
    }

    /// Recomputes the elements of `ips` from the pods that hold them now,
    /// in the pod sets that may hold those pods and in `before` (the sets
    /// that may have held them before the change).
    fn refresh_addresses(&mut self, ips: &BTreeSet<IpAddr>, mut before: BTreeSet<String>) {
        if ips.is_empty() {
            return;
        }
        let holders: BTreeSet<PodKey> = ips
            .iter()
            .flat_map(|ip| self.by_ip.get(ip).into_iter().flatten().cloned())
            .collect();
        for pk in &holders {
            if let Some(pod) = self.world.pods.get(pk) {
                let ns = self.world.namespace_labels(&pk.namespace);
                self.candidates(&pk.namespace, ns, pod, &mut before);
            }
        }
        let mut updates: Vec<(String, BTreeSet<Element>)> = Vec::new();
        for name in &before {
            let Some(def) = self.shared.def(name) else {
                continue;
            };
            let mut elems = BTreeSet::new();
            for pk in &holders {
                if let Some(pod) = self.world.pods.get(pk) {
                    elems.extend(
                        self.pod_elements(def, pk, pod)
                            .into_iter()
                            .filter(|e| e.addr().is_some_and(|a| ips.contains(&a))),
                    );
                }
            }
            updates.push((name.clone(), elems));
        }
        for (name, elems) in updates {
            let Some(set) = self.table.sets.get(&name) else {
                continue;
            };
            let now: BTreeSet<Element> = ips
                .iter()
                .flat_map(|ip| elements_about(&set.elements, *ip))
                .collect();
            if now == elems {
                continue;
            }
            let gone: BTreeSet<Element> = now.difference(&elems).cloned().collect();
            let new: BTreeSet<Element> = elems.difference(&now).cloned().collect();
            self.change_elements(&name, &gone, new);
        }
    }
}

/// The entries of `m` in namespace `ns`: a range, since keys sort
/// namespace first.
fn in_namespace<'a, V>(
    m: &'a BTreeMap<crate::model::Key, V>,
    ns: &'a str,
) -> impl Iterator<Item = (&'a crate::model::Key, &'a V)> {
    let from = crate::model::Key {
        namespace: ns.to_string(),
        name: String::new(),
    };
    m.range(from..).take_while(move |(k, _)| k.namespace == ns)
}

/// The keys of `m` in namespace `ns`.
fn keys_in<V>(m: &BTreeMap<PodKey, V>, ns: &str) -> Vec<PodKey> {
    in_namespace(m, ns).map(|(k, _)| k.clone()).collect()
}

/// The elements of `set` about `ip`: the address itself, or the
/// `address . proto . port` ones, which sort together.
fn elements_about(set: &BTreeSet<Element>, ip: IpAddr) -> Vec<Element> {
    let mut v: Vec<Element> = set.get(&Element::Addr(ip)).cloned().into_iter().collect();
    let first = Element::Port {
        addr: ip,
        proto: Proto::Tcp,
        port: 0,
    };
    v.extend(
        set.range(first..)
            .take_while(|e| matches!(e, Element::Port { addr, .. } if *addr == ip))
            .cloned(),
    );
    v
}

#[cfg(test)]
mod tests;
