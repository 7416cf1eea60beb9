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

mod compile;
mod delta;
mod names;
mod ops;
mod registry;
mod set;
mod table;

pub use crate::enforce::{MAX_POLICY_COST, cost};
pub use compile::Compiler;
pub use delta::Delta;
pub use names::{INLINE_EXCEPTS, MAX_CHAIN_NAME, endpoint_chain, policy_chain};
pub use ops::{Batch, Field, L4Match, Line, Op, PeerMatch};
pub use set::{Element, ElementOp, Set, SetKind};
pub use table::{
    IFACES_SET, Table, Verdict, WORKLOAD_PREFIX, dispatch_chain, iface_set, source_set,
};

/// The table, as `nft` names it.
pub const TABLE: &str = "inet margay_policy";
/// The table's name within its family (`inet`).
pub const TABLE_NAME: &str = "margay_policy";
/// The packet mark bit a policy rule sets when it allows.
pub const ALLOW_MARK: u32 = 0x0001_0000;

#[cfg(test)]
mod tests;
