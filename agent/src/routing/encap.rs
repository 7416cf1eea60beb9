//! Routes to other nodes' blocks, per the pool's encapsulation (pure):
//! which node holds which block (from BGP) becomes the desired kernel state
//! [`Remote`]:
//! - `None` (native): `block via <node address>`;
//! - `VXLAN`: per remote node a permanent neighbour entry (its tunnel
//!   address → its VTEP MAC) and an FDB entry (that MAC → its node
//!   address), and `block via <tunnel address> dev margay.vxlan onlink`;
//! - the `CrossSubnet` variants: native inside this node's subnet;
//! - `IPIP`: refused with a clear error (this kernel has no `ipip` module;
//!   the agent reports it as a Node condition).
//!
//! The kernel side (`dataplane::sync::remote`) diffs it against what is
//! there and changes only what differs.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use margay_api::ipam::Encapsulation;

use crate::dataplane::{Remote, Via};

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
pub fn plan(blocks: &[RemoteBlock], local_subnet: Option<IpNetwork>) -> (Remote, Vec<RouteError>) {
    let mut d = Remote::default();
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
}
