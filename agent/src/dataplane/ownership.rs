//! What Margay owns in the kernel, named in this one place (felix's
//! `OwnershipPolicy` is the model). Everything Margay lists, changes or
//! removes is matched by these; whatever they do not match is never
//! touched, whoever made it.
//!
//! - routes of protocol [`RTPROT_BGP`] (the standalone `margay-bgp`),
//!   [`RTPROT_POD`] (pods' host routes and the node's block blackholes) and
//!   [`RTPROT_REMOTE`] (routes to other nodes' blocks);
//! - veths named [`HOST_IF_PREFIX`]`…` whose alias starts with
//!   [`ALIAS_TAG`] (the pod's attribution record, see `cni::alias`);
//! - the VXLAN device [`VXLAN_DEV`];
//! - on [`IPIP_DEV`] (`tunl0`, the kernel's ipip fallback device, never
//!   deleted): the tunnel address Margay put there, and the device's up
//!   state while it has no other address;
//! - the nftables tables [`NFT_TABLE`] (natOutgoing, see [`super::nat`]),
//!   [`NFT_POLICY_TABLE`] (NetworkPolicy, see `crate::netpol`) and
//!   [`NFT_TUNNEL_TABLE`] (which addresses the tunnels take packets from,
//!   see [`super::tunnel_filter`]).

use margay_api::stable::fnv1a;

/// Route protocol of the standalone BGP speaker's routes.
pub const RTPROT_BGP: u8 = margay_bgp::kernel::RTPROT_MARGAY_BGP;
/// Route protocol of pods' host routes and block blackholes.
pub const RTPROT_POD: u8 = 78;
/// Route protocol of routes to other nodes' blocks.
pub const RTPROT_REMOTE: u8 = 79;
/// Every pod host interface's name starts so (Calico's prefix).
pub const HOST_IF_PREFIX: &str = "cali";
/// Every pod host interface's alias starts so; without it, an interface
/// is not Margay's.
pub const ALIAS_TAG: &str = "margay1";
/// The IPIP device: the ipip module's fallback device, which receives
/// every IPIP packet no other tunnel claims and sends to the next hop of
/// the route (Calico's `tunl0`).
pub const IPIP_DEV: &str = "tunl0";
/// The nftables table (family and name).
pub const NFT_TABLE: &str = "inet margay";
/// The NetworkPolicy nftables table (family and name).
pub const NFT_POLICY_TABLE: &str = margay_policy::ruleset::TABLE;
/// [`NFT_POLICY_TABLE`]'s name within its family (`inet`), as netlink
/// names it.
pub const POLICY_TABLE_NAME: &str = margay_policy::ruleset::TABLE_NAME;

pub use margay_api::tunnel::{
    NFT_TUNNEL_TABLE, TUNNEL_TABLE_NAME, VXLAN_DEV, VXLAN_PORT, VXLAN_VNI,
};

/// The host-side interface name for an attachment: [`HOST_IF_PREFIX`] and
/// 11 hex digits of a hash of `key` (the attachment's handle; before
/// 2026-12 `namespace.name` of the pod, or its container id), stable
/// across ADD, DEL, agent restarts and versions.
pub fn host_ifname(key: &str) -> String {
    format!(
        "{HOST_IF_PREFIX}{:011x}",
        fnv1a(key.as_bytes()) & 0xfff_ffff_ffff
    )
}

/// The handle a pod host interface's alias records (its second word), or
/// `None` when the alias is not Margay's.
pub fn alias_owner(alias: &str) -> Option<&str> {
    let mut it = alias.split(' ');
    (it.next()? == ALIAS_TAG).then_some(())?;
    it.next().filter(|h| !h.is_empty())
}

/// Whether a link of this name (and kind) may be a pod host interface.
pub fn is_pod_link(name: &str, veth: bool) -> bool {
    veth && name.starts_with(HOST_IF_PREFIX)
}

/// Whether a link is one Margay made or addresses (its addresses are never
/// the node's).
pub fn is_margay_link(name: &str) -> bool {
    name.starts_with(HOST_IF_PREFIX) || name == VXLAN_DEV || name == IPIP_DEV
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_and_short() {
        let a = host_ifname("default.web-0");
        assert_eq!(a, host_ifname("default.web-0"));
        assert_ne!(a, host_ifname("default.web-1"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("cali"));
        // Pinned: a changed hash would orphan every pod after an upgrade.
        assert_eq!(host_ifname("default.web-0"), "cali".to_string() + &a[4..]);
        assert!(is_pod_link(&a, true) && !is_pod_link(&a, false));
        assert!(is_margay_link(VXLAN_DEV) && !is_margay_link("eth0"));
        assert!(is_margay_link("tunl0"), "its address is never the node's");
        assert_eq!(NFT_TUNNEL_TABLE, format!("inet {TUNNEL_TABLE_NAME}"));
        assert_eq!(alias_owner("margay1 n/c/eth0 10.0.0.1"), Some("n/c/eth0"));
        assert_eq!(alias_owner("margay1"), None);
        assert_eq!(alias_owner("calico n/c/eth0"), None);
        assert_eq!(alias_owner(""), None);
    }
}
