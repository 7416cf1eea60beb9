//! What this node routes for, as `routing::local` publishes it: its
//! blocks and its pods' addresses, and what follows from them (what it
//! advertises, which learned routes it must not install). Shared by the
//! routing pass and the CNI service (which pokes `routing::local` only for
//! addresses the published state does not cover).

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;

/// What this node routes for: the blocks affine to it and its pods'
/// addresses (host networks, from the interfaces' aliases).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    /// Blocks affine to this node.
    pub blocks: BTreeSet<IpNetwork>,
    /// Every address a pod of this node holds, as a host network.
    pub pods: BTreeSet<IpNetwork>,
}

impl Local {
    /// This node's blocks and no pod (tests, start-up).
    pub fn blocks(blocks: impl IntoIterator<Item = IpNetwork>) -> Self {
        Self {
            blocks: blocks.into_iter().collect(),
            pods: BTreeSet::new(),
        }
    }

    /// Pods' addresses outside this node's blocks: borrowed from another
    /// node's block (or from a block affine to none).
    pub fn borrowed(&self) -> impl Iterator<Item = &IpNetwork> {
        self.pods
            .iter()
            .filter(|p| !self.blocks.iter().any(|b| b.contains(p.ip())))
    }

    /// What this node advertises: its blocks and its borrowed addresses.
    pub fn advertised(&self) -> impl Iterator<Item = &IpNetwork> {
        self.blocks.iter().chain(self.borrowed())
    }

    /// Whether a route to `cidr` learned from elsewhere must stay out of
    /// this node's kernel: it is one of ours (a block, or an address a pod
    /// of ours holds: a stale advertisement must not replace its route), or
    /// it lies inside one of our blocks and is not a single address another
    /// node borrowed. (A block holding an address we borrowed is routed: our
    /// pod's host route is more specific.)
    pub fn shadows(&self, cidr: &IpNetwork) -> bool {
        let host = cidr.prefix() == if cidr.is_ipv4() { 32 } else { 128 };
        self.blocks.contains(cidr)
            || self.pods.contains(cidr)
            || (!host && self.blocks.iter().any(|b| b.contains(cidr.network())))
    }
}
