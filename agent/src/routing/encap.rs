//! Routes to other nodes' blocks, per the pool's encapsulation (pure):
//! which node holds which block (from BGP) becomes the desired kernel state
//! [`Remote`]:
//! - `None` (native): `block via <node address>`;
//! - `VXLAN`: per remote node a permanent neighbour entry (its tunnel
//!   address → its VTEP MAC) and an FDB entry (that MAC → its node
//!   address), and `block via <tunnel address> dev margay.vxlan onlink`;
//! - `IPIP`: `block via <node address> dev tunl0 onlink`;
//! - the `CrossSubnet` variants: native inside this node's subnet, the
//!   tunnel across.
//!
//! A node is sent a tunnel's packets only once it has published that it
//! receives them (its VTEP for VXLAN, its `tunl0` address for IPIP), so a
//! pool switched from one encapsulation to another never sends packets a
//! node cannot take yet. Until then, and for any block that cannot be
//! routed as its pool says, the block is *kept*: whatever route the kernel
//! has for it now stays (make before break).
//!
//! The kernel side (`dataplane::sync::remote`) diffs it against what is
//! there and changes only what differs.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use margay_api::ipam::Encapsulation;

use crate::dataplane::{Holds, Remote, Via};

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
    /// The node's `tunl0` address, published once it takes IPIP (needed
    /// for IPIP).
    pub ipip: Option<Ipv4Addr>,
    /// Its pool is being deleted.
    pub pool_deleting: bool,
}

/// Why a block cannot be routed (a reason the plan reports as a
/// [`super::problem::Problem`], not an error: the other blocks still are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// The tunnel cannot reach the node (yet).
    #[error("block {cidr} (node {node}) uses {tunnel} but {why}")]
    Incomplete {
        /// The block.
        cidr: IpNetwork,
        /// Its node.
        node: String,
        /// `VXLAN` or `IPIP`.
        tunnel: &'static str,
        /// What is missing.
        why: &'static str,
    },
}

/// What the kernel should route, and what it should leave as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
    /// The desired kernel state.
    pub want: Remote,
    /// Blocks kept as they are, and blocks of pools being deleted.
    pub holds: Holds,
    /// Why each kept block cannot be routed.
    pub errors: Vec<Unroutable>,
}

/// The desired kernel state; blocks that cannot be routed are kept as they
/// are and reported (the others still work). `local_subnet` is the node's
/// own underlay subnet: with a cross-subnet encapsulation, nodes inside it
/// are reached natively.
pub fn plan(blocks: &[RemoteBlock], local_subnet: Option<IpNetwork>) -> Routed {
    let mut out = Routed::default();
    for b in blocks {
        match route(b, local_subnet) {
            Ok((via, vtep)) => {
                out.want.routes.insert(b.cidr, via);
                if let (Some(v), IpAddr::V4(under)) = (vtep, b.node_ip) {
                    out.want.neigh.insert(v.tunnel_ip, v.mac);
                    out.want.fdb.insert(v.mac, under);
                }
            }
            Err(why) => {
                out.holds.keep.insert(b.cidr);
                out.errors.push(why);
            }
        }
        if b.pool_deleting {
            out.holds.expendable.insert(b.cidr);
        }
    }
    out
}

/// How one block is reached (with the VTEP its VXLAN route needs).
fn route(
    b: &RemoteBlock,
    local_subnet: Option<IpNetwork>,
) -> Result<(Via, Option<Vtep>), Unroutable> {
    let same_subnet = local_subnet.is_some_and(|s| s.contains(b.node_ip));
    let encap = match b.encap {
        Encapsulation::VxlanCrossSubnet | Encapsulation::IpipCrossSubnet if same_subnet => {
            Encapsulation::None
        }
        e => e,
    };
    let tunnel = match encap {
        Encapsulation::None => return Ok((Via::Native(b.node_ip), None)),
        Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet => "VXLAN",
        Encapsulation::Ipip | Encapsulation::IpipCrossSubnet => "IPIP",
    };
    let incomplete = |why| Unroutable::Incomplete {
        cidr: b.cidr,
        node: b.node.clone(),
        tunnel,
        why,
    };
    let IpAddr::V4(under) = b.node_ip else {
        return Err(incomplete("the node's address is not IPv4"));
    };
    if !b.cidr.is_ipv4() {
        return Err(incomplete("the tunnel carries IPv4 blocks only"));
    }
    if tunnel == "VXLAN" {
        let vtep = b
            .vtep
            .ok_or_else(|| incomplete("the node has not published its VTEP"))?;
        Ok((Via::Vxlan(vtep.tunnel_ip), Some(vtep)))
    } else {
        b.ipip.ok_or_else(|| {
            incomplete("the node has not published its tunl0 address (IPIP not up there)")
        })?;
        Ok((Via::Ipip(under), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(cidr: &str, node: &str, ip: &str, encap: Encapsulation) -> RemoteBlock {
        RemoteBlock {
            cidr: cidr.parse().unwrap(),
            node: node.into(),
            node_ip: ip.parse().unwrap(),
            encap,
            vtep: None,
            ipip: None,
            pool_deleting: false,
        }
    }

    #[test]
    fn plans_each_encapsulation_and_keeps_what_it_cannot_route() {
        let v = Vtep {
            mac: [0x66, 0, 0, 0, 0, 2],
            tunnel_ip: "10.244.1.0".parse().unwrap(),
        };
        let with_vtep = |mut b: RemoteBlock| {
            b.vtep = Some(v);
            b
        };
        let with_ipip = |mut b: RemoteBlock| {
            b.ipip = Some("10.244.3.1".parse().unwrap());
            b
        };
        let r = plan(
            &[
                block("10.244.2.0/26", "b", "10.99.0.2", Encapsulation::None),
                with_vtep(block(
                    "10.244.1.0/26",
                    "b",
                    "10.99.0.2",
                    Encapsulation::Vxlan,
                )),
                with_vtep(block(
                    "10.244.1.64/26",
                    "b",
                    "10.99.0.2",
                    Encapsulation::Vxlan,
                )),
                with_ipip(block(
                    "10.244.3.0/26",
                    "c",
                    "10.99.0.3",
                    Encapsulation::Ipip,
                )),
                // Across subnets: the tunnel; inside: native.
                with_ipip(block(
                    "10.244.6.0/26",
                    "f",
                    "10.98.0.6",
                    Encapsulation::IpipCrossSubnet,
                )),
                block(
                    "10.244.5.0/26",
                    "e",
                    "10.99.0.5",
                    Encapsulation::VxlanCrossSubnet,
                ),
                block(
                    "10.244.7.0/26",
                    "g",
                    "10.99.0.7",
                    Encapsulation::IpipCrossSubnet,
                ),
                // Not ready for their tunnel yet: kept.
                block("10.244.4.0/26", "d", "10.99.0.4", Encapsulation::Vxlan),
                block("10.244.8.0/26", "h", "10.99.0.8", Encapsulation::Ipip),
            ],
            Some("10.99.0.0/24".parse().unwrap()),
        );
        let via = |c: &str| r.want.routes[&c.parse::<IpNetwork>().unwrap()];
        assert_eq!(r.want.routes.len(), 7);
        let want = [
            ("10.244.2.0/26", Via::Native("10.99.0.2".parse().unwrap())),
            ("10.244.1.64/26", Via::Vxlan(v.tunnel_ip)),
            ("10.244.3.0/26", Via::Ipip("10.99.0.3".parse().unwrap())),
            ("10.244.6.0/26", Via::Ipip("10.98.0.6".parse().unwrap())),
            ("10.244.5.0/26", Via::Native("10.99.0.5".parse().unwrap())),
            ("10.244.7.0/26", Via::Native("10.99.0.7".parse().unwrap())),
        ];
        for (cidr, want) in want {
            assert_eq!(via(cidr), want, "{cidr}");
        }
        assert_eq!(r.want.neigh.len(), 1);
        assert_eq!(r.want.fdb[&v.mac], "10.99.0.2".parse::<Ipv4Addr>().unwrap());
        assert!(r.want.needs(crate::dataplane::Tunnel::Vxlan));
        let kept: Vec<String> = r.holds.keep.iter().map(ToString::to_string).collect();
        assert_eq!(kept, ["10.244.4.0/26", "10.244.8.0/26"]);
        let why: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        assert!(why[0].contains("VXLAN") && why[0].contains("has not published its VTEP"));
        assert!(
            why[1].contains("10.244.8.0/26") && why[1].contains("IPIP") && why[1].contains("tunl0")
        );
    }

    #[test]
    fn tunnels_carry_ipv4_over_ipv4_only() {
        let mut b = block("fd00:244::/122", "b", "10.99.0.2", Encapsulation::Ipip);
        b.ipip = Some("10.244.3.1".parse().unwrap());
        let r = plan(&[b], None);
        assert!(r.want.routes.is_empty() && r.holds.keep.len() == 1);
        assert!(r.errors[0].to_string().contains("IPv4 blocks only"));
    }
}
