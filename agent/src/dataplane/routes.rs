//! Routes on the real kernel, each carrying one of Margay's protocols: pods'
//! host routes and block blackholes ([`RTPROT_POD`]), routes to other
//! nodes' blocks ([`RTPROT_REMOTE`]: via the node, or on-link through the
//! VXLAN device or `tunl0`). Deletes name the protocol too, so the
//! kernel itself refuses to remove a route someone else owns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};

use super::netlink::{Netlink, is_errno, nl, route_dst};
use super::ownership::{RTPROT_POD, RTPROT_REMOTE, VXLAN_DEV};
use super::{Error, PerTunnel, RemoteActual, Result, Via};

/// The host's route to a pod address through its host interface.
pub(super) fn host_route(ip: IpAddr, idx: u32) -> RouteMessage {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
        .expect("a host prefix")
        .output_interface(idx)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(RTPROT_POD))
        .build()
}

/// A route message for `net` of `kind` and protocol `proto`, no next hop
/// (a blackhole, or a delete by key).
fn keyed(net: IpNetwork, kind: RouteType, proto: u8) -> RouteMessage {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.network(), net.prefix())
        .expect("a valid prefix")
        .kind(kind)
        .protocol(RouteProtocol::Other(proto))
        .build()
}

fn host_prefix(ip: IpAddr) -> IpNetwork {
    IpNetwork::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix")
}

/// Margay's route protocols: only routes of these are ever replaced.
const OURS: [u8; 3] = [RTPROT_POD, RTPROT_REMOTE, super::ownership::RTPROT_BGP];

impl Netlink {
    /// Adds the route `msg`, or replaces Margay's own route to the same
    /// destination; a route of another protocol there (static, connected,
    /// another daemon's) is left as it is and reported.
    pub(super) async fn put(&self, msg: RouteMessage, what: String) -> Result<()> {
        match self.host.route().add(msg.clone()).execute().await {
            Ok(()) => return Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(nl(what)(e)),
        }
        let Some(dst) = route_dst(&msg) else {
            return Err(Error::Wrong(format!(
                "{what}: a route without a destination"
            )));
        };
        if let Some(other) = self
            .routes_to(dst)
            .await?
            .into_iter()
            .find(|r| !OURS.contains(&r.proto))
        {
            return Err(Error::Foreign {
                what,
                proto: other.proto,
            });
        }
        self.host
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl(what))
    }

    /// Deletes Margay's route `msg`; success when it is already gone.
    async fn delete(&self, msg: RouteMessage, what: String) -> Result<()> {
        match self.host.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
            Err(e) => Err(nl(what)(e)),
        }
    }

    pub(super) async fn pod_routes(&self) -> Result<BTreeMap<IpAddr, u32>> {
        Ok(self
            .routes_of(RouteType::Unicast, RTPROT_POD)
            .await?
            .into_iter()
            .map(|r| (r.dst.ip(), r.oif.unwrap_or(0)))
            .collect())
    }

    pub(super) async fn put_pod_route(&self, ip: IpAddr, index: u32) -> Result<()> {
        self.put(host_route(ip, index), format!("host route to {ip}"))
            .await
    }

    pub(super) async fn delete_pod_route(&self, ip: IpAddr) -> Result<()> {
        let msg = keyed(host_prefix(ip), RouteType::Unicast, RTPROT_POD);
        self.delete(msg, format!("delete the host route to {ip}"))
            .await
    }

    pub(super) async fn blackholes(&self) -> Result<BTreeSet<IpNetwork>> {
        Ok(self
            .routes_of(RouteType::BlackHole, RTPROT_POD)
            .await?
            .into_iter()
            .map(|r| r.dst)
            .collect())
    }

    pub(super) async fn put_blackhole(&self, net: IpNetwork, present: bool) -> Result<()> {
        let msg = keyed(net, RouteType::BlackHole, RTPROT_POD);
        if present {
            self.put(msg, format!("blackhole {net}")).await
        } else {
            self.delete(msg, format!("delete blackhole {net}")).await
        }
    }

    pub(super) async fn remote(&self) -> Result<RemoteActual> {
        let vx = Self::link_index(&self.host, VXLAN_DEV)
            .await?
            .map(|(i, _)| i);
        let tunl0 = self.tunl0_state().await?;
        let mut out = RemoteActual {
            devices: PerTunnel {
                vxlan: vx.is_some(),
                ipip: tunl0.is_some_and(|(_, up)| up),
            },
            ..Default::default()
        };
        for r in self.routes_of(RouteType::Unicast, RTPROT_REMOTE).await? {
            let via = match (r.gw, r.oif) {
                (Some(IpAddr::V4(g)), Some(o)) if vx == Some(o) => Via::Vxlan(g),
                (Some(IpAddr::V4(g)), Some(o)) if tunl0.is_some_and(|(i, _)| i == o) => {
                    Via::Ipip(g)
                }
                (Some(g), _) => Via::Native(g),
                (None, _) => {
                    out.odd.insert(r.dst);
                    continue;
                }
            };
            out.state.routes.insert(r.dst, via);
        }
        if let Some(vx) = vx {
            let (neigh, fdb) = self.vxlan_entries(vx).await?;
            out.state.neigh = neigh;
            out.state.fdb = fdb;
        }
        Ok(out)
    }

    pub(super) async fn put_remote_route(&self, net: IpNetwork, via: Via) -> Result<()> {
        let proto = RouteProtocol::Other(RTPROT_REMOTE);
        let tunnel = |dev: u32, hop: Ipv4Addr, n: ipnetwork::Ipv4Network| {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix())
                .gateway(hop)
                .output_interface(dev)
                .onlink()
                .protocol(proto)
                .build()
        };
        let msg = match (net, via) {
            (_, Via::Native(gw)) if gw.is_ipv4() == net.is_ipv4() => {
                RouteMessageBuilder::<IpAddr>::new()
                    .destination_prefix(net.network(), net.prefix())
                    .and_then(|b| b.gateway(gw))
                    .expect("a prefix and a gateway of one family")
                    .protocol(proto)
                    .build()
            }
            (IpNetwork::V4(n), Via::Vxlan(tip)) => {
                let Some((vx, _)) = Self::link_index(&self.host, VXLAN_DEV).await? else {
                    return Err(Error::Unroutable(net, "the VXLAN device does not exist"));
                };
                tunnel(vx, tip, n)
            }
            (IpNetwork::V4(n), Via::Ipip(node)) => {
                let Some((t, _)) = self.tunl0_state().await? else {
                    return Err(Error::Unroutable(net, "tunl0 does not exist"));
                };
                tunnel(t, node, n)
            }
            _ => return Err(Error::Unroutable(net, "the next hop is of another family")),
        };
        self.put(msg, format!("route to {net}")).await
    }

    pub(super) async fn delete_remote_route(&self, net: IpNetwork) -> Result<()> {
        let msg = keyed(net, RouteType::Unicast, RTPROT_REMOTE);
        self.delete(msg, format!("delete the route to {net}")).await
    }
}
