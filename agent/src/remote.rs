//! Routes to other nodes' blocks, per the pool's encapsulation.
//!
//! The routing loop ([`crate::bgp`]) says which blocks live on which node
//! (from BGP); this module
//! turns that into kernel state and keeps it in step:
//! - `None` (native): `block via <node address>`, protocol
//!   [`RTPROT_MARGAY_REMOTE`];
//! - `VXLAN`: one device [`VXLAN_DEV`] (VNI [`VXLAN_VNI`], UDP
//!   [`VXLAN_PORT`], learning off), per remote node a permanent neighbour
//!   entry (its tunnel address → its VTEP MAC) and an FDB entry (that MAC →
//!   its node address), and `block via <tunnel address> dev margay.vxlan
//!   onlink`;
//! - `IPIP`: refused with a clear error (this kernel has no `ipip` module;
//!   the agent reports it as a Node condition).
//!
//! [`plan`] is pure (desired state, or the errors); [`Netlink::apply_remote`]
//! diffs it against the kernel and changes only what differs, and only
//! Margay's objects: routes of its protocol, entries on its device.
//!
//! [`Netlink::apply_remote`]: crate::dataplane::Netlink::apply_remote

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use margay_ipam::crd::Encapsulation;

/// Route protocol of routes to remote blocks (pods and blackholes use 78,
/// the BGP speaker 77).
pub const RTPROT_MARGAY_REMOTE: u8 = 79;
/// The VXLAN device.
pub const VXLAN_DEV: &str = "margay.vxlan";
/// Its VNI (Calico's).
pub const VXLAN_VNI: u32 = 4096;
/// Its UDP port (IANA's).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN adds to a packet (outer IPv4 + UDP + VXLAN + inner Ethernet).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes IPIP adds.
pub const IPIP_OVERHEAD: u32 = 20;

/// A remote node's VXLAN endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vtep {
    /// Its VXLAN device's MAC.
    pub mac: [u8; 6],
    /// Its VXLAN device's address (from its own block).
    pub tunnel_ip: Ipv4Addr,
}

/// A block that lives on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBlock {
    /// The block.
    pub cidr: IpNetwork,
    /// The node it lives on.
    pub node: String,
    /// That node's address on the underlay.
    pub node_ip: IpAddr,
    /// The pool's encapsulation.
    pub encap: Encapsulation,
    /// The node's VXLAN endpoint (needed for VXLAN).
    pub vtep: Option<Vtep>,
}

/// How a block is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Straight to the node.
    Native(IpAddr),
    /// Through the VXLAN device, to this tunnel address (on-link).
    Vxlan(Ipv4Addr),
}

/// The kernel state for a set of remote blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Block → next hop.
    pub routes: BTreeMap<IpNetwork, Via>,
    /// Tunnel address → VTEP MAC (neighbour entries on the device).
    pub neigh: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// VTEP MAC → node address (FDB entries on the device).
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
}

impl Desired {
    /// Whether the VXLAN device is needed.
    pub fn needs_vxlan(&self) -> bool {
        !self.fdb.is_empty()
    }
}

/// Why a block cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// IPIP is not available.
    #[error(
        "block {cidr} (node {node}) uses IPIP, which this kernel cannot do (no ipip module, no tunl0): use encapsulation VXLAN or None for this pool"
    )]
    IpipUnsupported {
        /// The block.
        cidr: IpNetwork,
        /// Its node.
        node: String,
    },
    /// VXLAN needs the remote node's VTEP and an IPv4 underlay.
    #[error("block {cidr} (node {node}) uses VXLAN but {why}")]
    VxlanIncomplete {
        /// The block.
        cidr: IpNetwork,
        /// Its node.
        node: String,
        /// What is missing.
        why: String,
    },
}

/// The desired kernel state; blocks that cannot be routed are left out
/// and reported (the others still work). `local_subnet` is the node's own
/// underlay subnet: with a cross-subnet encapsulation, nodes inside it are
/// reached natively.
pub fn plan(blocks: &[RemoteBlock], local_subnet: Option<IpNetwork>) -> (Desired, Vec<RouteError>) {
    let mut d = Desired::default();
    let mut errors = Vec::new();
    for b in blocks {
        let same_subnet = local_subnet.is_some_and(|s| s.contains(b.node_ip));
        let encap = match b.encap {
            Encapsulation::VxlanCrossSubnet | Encapsulation::IpipCrossSubnet if same_subnet => {
                Encapsulation::None
            }
            e => e,
        };
        match encap {
            Encapsulation::None => {
                d.routes.insert(b.cidr, Via::Native(b.node_ip));
            }
            Encapsulation::Ipip | Encapsulation::IpipCrossSubnet => {
                errors.push(RouteError::IpipUnsupported {
                    cidr: b.cidr,
                    node: b.node.clone(),
                });
            }
            Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet => {
                let incomplete = |why: &str| RouteError::VxlanIncomplete {
                    cidr: b.cidr,
                    node: b.node.clone(),
                    why: why.to_string(),
                };
                let Some(vtep) = b.vtep else {
                    errors.push(incomplete("the node has not published its VTEP"));
                    continue;
                };
                let IpAddr::V4(under) = b.node_ip else {
                    errors.push(incomplete("the node's address is not IPv4"));
                    continue;
                };
                if !b.cidr.is_ipv4() {
                    errors.push(incomplete("VXLAN carries IPv4 blocks only here"));
                    continue;
                }
                d.routes.insert(b.cidr, Via::Vxlan(vtep.tunnel_ip));
                d.neigh.insert(vtep.tunnel_ip, vtep.mac);
                d.fdb.insert(vtep.mac, under);
            }
        }
    }
    (d, errors)
}

/// Pod MTU for `encap` on an underlay of `underlay` bytes.
pub fn pod_mtu(underlay: u32, encap: Encapsulation) -> u32 {
    match encap {
        Encapsulation::None => underlay,
        Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet => underlay - VXLAN_OVERHEAD,
        Encapsulation::Ipip | Encapsulation::IpipCrossSubnet => underlay - IPIP_OVERHEAD,
    }
}

/// (to add or change, to remove) between two maps.
pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let set = want
        .iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let del = have
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    (set, del)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(
        cidr: &str,
        node: &str,
        ip: &str,
        encap: Encapsulation,
        vtep: Option<Vtep>,
    ) -> RemoteBlock {
        RemoteBlock {
            cidr: cidr.parse().unwrap(),
            node: node.into(),
            node_ip: ip.parse().unwrap(),
            encap,
            vtep,
        }
    }

    #[test]
    fn plans_each_encapsulation_and_explains_what_it_cannot_do() {
        let v = Vtep {
            mac: [0x66, 0, 0, 0, 0, 2],
            tunnel_ip: "10.244.1.0".parse().unwrap(),
        };
        let (d, errors) = plan(
            &[
                block("10.244.2.0/26", "b", "10.99.0.2", Encapsulation::None, None),
                block(
                    "10.244.1.0/26",
                    "b",
                    "10.99.0.2",
                    Encapsulation::Vxlan,
                    Some(v),
                ),
                block(
                    "10.244.1.64/26",
                    "b",
                    "10.99.0.2",
                    Encapsulation::Vxlan,
                    Some(v),
                ),
                block("10.244.3.0/26", "c", "10.99.0.3", Encapsulation::Ipip, None),
                block(
                    "10.244.4.0/26",
                    "d",
                    "10.99.0.4",
                    Encapsulation::Vxlan,
                    None,
                ),
                block(
                    "10.244.5.0/26",
                    "e",
                    "10.99.0.5",
                    Encapsulation::VxlanCrossSubnet,
                    None,
                ),
            ],
            Some("10.99.0.0/24".parse().unwrap()),
        );
        assert_eq!(d.routes.len(), 4);
        // Cross-subnet inside the node's subnet: native.
        assert_eq!(
            d.routes[&"10.244.5.0/26".parse().unwrap()],
            Via::Native("10.99.0.5".parse().unwrap())
        );
        assert_eq!(
            d.routes[&"10.244.2.0/26".parse().unwrap()],
            Via::Native("10.99.0.2".parse().unwrap())
        );
        assert_eq!(
            d.routes[&"10.244.1.64/26".parse().unwrap()],
            Via::Vxlan(v.tunnel_ip)
        );
        assert_eq!(d.neigh.len(), 1);
        assert_eq!(d.fdb[&v.mac], "10.99.0.2".parse::<Ipv4Addr>().unwrap());
        assert!(d.needs_vxlan());
        assert_eq!(errors.len(), 2);
        let ipip = errors[0].to_string();
        assert!(
            ipip.contains("10.244.3.0/26")
                && ipip.contains("IPIP")
                && ipip.contains("VXLAN or None"),
            "{ipip}"
        );
        assert!(errors[1].to_string().contains("has not published its VTEP"));
    }

    #[test]
    fn mtu_and_diff() {
        assert_eq!(pod_mtu(1500, Encapsulation::Vxlan), 1450);
        assert_eq!(pod_mtu(1500, Encapsulation::Ipip), 1480);
        assert_eq!(pod_mtu(9000, Encapsulation::None), 9000);
        let want: BTreeMap<u8, u8> = [(1, 1), (2, 2)].into_iter().collect();
        let have: BTreeMap<u8, u8> = [(2, 3), (4, 4)].into_iter().collect();
        assert_eq!(diff(&want, &have), (vec![(1, 1), (2, 2)], vec![4]));
    }
}
