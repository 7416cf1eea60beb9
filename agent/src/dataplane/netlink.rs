//! The real kernel: [`Netlink`], one rtnetlink connection in the node's
//! namespace (and short-lived ones in pods' namespaces), implementing
//! [`Dataplane`]. The operations live beside it by what they touch:
//! [`super::pods`] (veths), [`super::routes`] (host routes, blackholes,
//! remote-block routes), [`super::vxlan`] (the device and its entries),
//! [`super::ipip`] (`tunl0`); the tunnel filter is an nftables table
//! ([`super::tunnel_filter`], through `nft`).
//!
//! Every listing filters by [`super::ownership`]; every route written
//! carries one of Margay's protocols.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use margay_task::Owned;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::ownership;
use super::{
    Dataplane, Error, HostPod, LocalIpip, LocalVtep, PodSpec, PodWiring, RemoteActual, Result,
    TunnelFilter, Via,
};

/// A netlink error with what was being done.
pub(super) fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// Whether a netlink error is this errno.
pub(super) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Writes `/proc/sys/<key>` (in the calling thread's namespace).
pub(super) fn sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value).map_err(|source| Error::Sysctl {
        key: key.to_string(),
        value: value.to_string(),
        source,
    })
}

/// The kernel, through rtnetlink.
///
/// One socket serves every task of the agent; the kernel runs one dump at a
/// time per socket (a second one answers EBUSY), so dumps take turns
/// ([`Netlink::dumping`]) while other requests go in parallel.
#[derive(Debug, Clone)]
pub struct Netlink {
    pub(super) host: Handle,
    dump: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The tunnel filter as last read or loaded, and when: a routing pass
    /// (one per watch event) reads the kernel's table (an `nft` run) only
    /// when this is older than [`FILTER_REREAD`].
    filter: FilterCache,
    /// The connection's driver, ended with the last clone of this handle.
    _driver: std::sync::Arc<Owned>,
}

/// The tunnel filter as last seen (shared by clones of the handle).
type FilterCache =
    std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, Option<TunnelFilter>)>>>;

/// How long the tunnel filter read from or loaded into the kernel is
/// trusted before it is read again (so a table changed by hand is
/// repaired within this).
pub const FILTER_REREAD: std::time::Duration = std::time::Duration::from_secs(30);

/// A route as listed from the kernel.
pub(super) struct Listed {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    /// Its route protocol.
    pub proto: u8,
}

/// A route message's destination prefix (a default route carries no
/// destination attribute: the family's unspecified address).
pub(super) fn route_dst(msg: &rtnetlink::packet_route::route::RouteMessage) -> Option<IpNetwork> {
    let unspecified = match msg.header.address_family {
        AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    };
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => route_addr(d),
            _ => None,
        })
        .or(unspecified)
        .and_then(|d| IpNetwork::new(d, msg.header.destination_prefix_length).ok())
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// An rtnetlink connection in the calling thread's namespace (inside a
/// tokio runtime): its handle, and its driver, which owns the socket (the
/// handle's requests fail once it is dropped).
fn connect() -> Result<(Handle, Owned)> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
    Ok((handle, Owned::spawn(conn)))
}

impl Netlink {
    /// A dataplane in the calling process's network namespace (must be
    /// called inside a tokio runtime). Turns on IPv4 forwarding there.
    pub fn new() -> Result<Self> {
        let (host, driver) = connect()?;
        sysctl("net/ipv4/ip_forward", "1")?;
        Ok(Self {
            host,
            dump: Default::default(),
            filter: FilterCache::default(),
            _driver: std::sync::Arc::new(driver),
        })
    }

    /// Held while a dump on the node's socket is read.
    pub(super) async fn dumping(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.dump.lock().await
    }

    /// A netlink handle whose socket lives in the namespace `netns` (opened
    /// and checked by `netns::pod_netns` from `path`), and its connection's
    /// driver (keep it while the handle is used: dropping it ends the
    /// connection): made on a short-lived thread that entered that
    /// namespace (a socket belongs to the namespace of the thread that
    /// created it; tokio's own threads never change namespace).
    pub(super) async fn handle_in(netns: &std::fs::File, path: &Path) -> Result<(Handle, Owned)> {
        let file = netns.try_clone().map_err(|source| Error::Netns {
            path: path.display().to_string(),
            source,
        })?;
        let rt = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let res = (|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(Error::Setns)?;
                let _guard = rt.enter();
                connect()
            })();
            let _ = tx.send(res);
        });
        rx.await
            .map_err(|_| Error::Missing("the namespace thread's answer".into()))?
    }

    /// A link by name (`None` when there is none).
    async fn link_named(
        handle: &Handle,
        name: &str,
    ) -> Result<Option<rtnetlink::packet_route::link::LinkMessage>> {
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("look up {name}"))(e)),
        }
    }

    /// A link's index and MAC by name.
    pub(super) async fn link_index(handle: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>)>> {
        Ok(Self::link_named(handle, name).await?.map(|msg| {
            let mac = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(m) => Some(m.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            (msg.header.index, mac)
        }))
    }

    /// The main table's routes of `kind` and protocol `proto`, both
    /// families.
    pub(super) async fn routes_of(&self, kind: RouteType, proto: u8) -> Result<Vec<Listed>> {
        let families = [true, true];
        self.routes_where(families, |m| {
            m.header.kind == kind && m.header.protocol == RouteProtocol::Other(proto)
        })
        .await
    }

    /// The routes of the main table to exactly `net`, whoever made them.
    pub(super) async fn routes_to(&self, net: IpNetwork) -> Result<Vec<Listed>> {
        let families = [net.is_ipv4(), net.is_ipv6()];
        let all = self
            .routes_where(families, |m| {
                m.header.destination_prefix_length == net.prefix()
                    && m.header.table == rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN
            })
            .await?;
        Ok(all.into_iter().filter(|r| r.dst == net).collect())
    }

    /// The routes `keep` accepts, of the families asked (IPv4, IPv6).
    async fn routes_where(
        &self,
        families: [bool; 2],
        keep: impl Fn(&rtnetlink::packet_route::route::RouteMessage) -> bool,
    ) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let _dump = self.dumping().await;
        let probes = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for (probe, _) in probes.into_iter().zip(families).filter(|(_, f)| *f) {
            let mut routes = self.host.route().get(probe).execute();
            while let Some(msg) = routes.try_next().await.map_err(nl("list routes"))? {
                if !keep(&msg) {
                    continue;
                }
                let (mut gw, mut oif) = (None, None);
                for a in &msg.attributes {
                    match a {
                        RouteAttribute::Gateway(g) => gw = route_addr(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let Some(dst) = route_dst(&msg) else {
                    continue;
                };
                out.push(Listed {
                    dst,
                    gw,
                    oif,
                    proto: u8::from(msg.header.protocol),
                });
            }
        }
        Ok(out)
    }

    /// Every link: index → (name, alias, is a veth). One dump.
    pub(super) async fn links(&self) -> Result<BTreeMap<u32, (String, String, bool)>> {
        let mut out = BTreeMap::new();
        let _dump = self.dumping().await;
        let mut links = self.host.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
            out.insert(msg.header.index, link_facts(&msg));
        }
        Ok(out)
    }

    /// Tunnel device `dev` (index `idx`) up, with MTU `mtu` when given,
    /// and this node's tunnel address `ip` on it as a /32 (the source of
    /// what the node itself sends through it): IPIP and VXLAN alike.
    pub(super) async fn tunnel_up(
        &self,
        dev: &str,
        idx: u32,
        mtu: Option<u32>,
        ip: Ipv4Addr,
    ) -> Result<()> {
        let mut link = rtnetlink::LinkUnspec::new_with_index(idx);
        let what = match mtu {
            Some(m) => {
                link = link.mtu(m);
                format!("bring up {dev} (MTU {m})")
            }
            None => format!("bring up {dev}"),
        };
        self.host
            .link()
            .set(link.up().build())
            .execute()
            .await
            .map_err(nl(what))?;
        self.host
            .address()
            .add(idx, IpAddr::V4(ip), 32)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("address {ip} on {dev}")))
    }

    /// The pod host interface `name` (a `cali…` veth), when it exists.
    pub(super) async fn host_pod(&self, name: &str) -> Result<Option<HostPod>> {
        let Some(msg) = Self::link_named(&self.host, name).await? else {
            return Ok(None);
        };
        let (host_if, alias, veth) = link_facts(&msg);
        Ok(ownership::is_pod_link(&host_if, veth).then_some(HostPod {
            host_if,
            index: msg.header.index,
            alias,
        }))
    }
}

/// A link's name, alias (empty when none) and whether it is a veth.
fn link_facts(msg: &rtnetlink::packet_route::link::LinkMessage) -> (String, String, bool) {
    let (mut name, mut alias, mut veth) = (String::new(), String::new(), false);
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::IfAlias(s) => alias = s.clone(),
            LinkAttribute::LinkInfo(info) => {
                veth |= info
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    (name, alias, veth)
}

impl Dataplane for Netlink {
    type Netns = std::fs::File;

    async fn add_pod_in(&self, spec: &PodSpec, netns: &std::fs::File) -> Result<PodWiring> {
        self.add_pod_links(spec, netns).await
    }

    async fn forward_ipv6(&self) -> Result<()> {
        if std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
            .is_ok_and(|v| v.trim() != "1")
        {
            tracing::info!("turning on IPv6 forwarding for IPv6 pods");
            sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        Ok(())
    }

    async fn del_pod(&self, host_if: &str) -> Result<()> {
        self.del_link(host_if).await
    }

    async fn check_pod(&self, spec: &PodSpec) -> Result<()> {
        self.check_pod_links(spec).await
    }

    async fn list_pods(&self) -> Result<Vec<HostPod>> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|(_, (name, _, veth))| ownership::is_pod_link(name, *veth))
            .map(|(index, (host_if, alias, _))| HostPod {
                host_if,
                index,
                alias,
            })
            .collect())
    }

    async fn pod_link(&self, host_if: &str) -> Result<Option<HostPod>> {
        self.host_pod(host_if).await
    }

    async fn pod_netns(&self, path: &std::path::Path) -> Result<std::fs::File> {
        super::netns::pod_netns(path)
    }

    async fn list_pod_routes(&self) -> Result<BTreeMap<IpAddr, u32>> {
        self.pod_routes().await
    }

    async fn set_pod_route(&self, ip: IpAddr, index: u32) -> Result<()> {
        self.put_pod_route(ip, index).await
    }

    async fn del_pod_route(&self, ip: IpAddr) -> Result<()> {
        self.delete_pod_route(ip).await
    }

    async fn list_blackholes(&self) -> Result<BTreeSet<IpNetwork>> {
        self.blackholes().await
    }

    async fn set_blackhole(&self, net: IpNetwork, present: bool) -> Result<()> {
        self.put_blackhole(net, present).await
    }

    async fn list_remote(&self) -> Result<RemoteActual> {
        self.remote().await
    }

    async fn set_remote_route(&self, net: IpNetwork, via: Via) -> Result<()> {
        self.put_remote_route(net, via).await
    }

    async fn del_remote_route(&self, net: IpNetwork) -> Result<()> {
        self.delete_remote_route(net).await
    }

    async fn ensure_vxlan(&self, local: &LocalVtep) -> Result<()> {
        self.vxlan_device(local).await.map(|_| ())
    }

    async fn del_vxlan(&self) -> Result<()> {
        self.del_link(ownership::VXLAN_DEV).await
    }

    async fn ensure_ipip(&self, local: &LocalIpip) -> Result<()> {
        self.ipip_device(local).await
    }

    async fn retire_ipip(&self, ip: Option<Ipv4Addr>) -> Result<()> {
        self.retire_tunl0(ip).await
    }

    async fn set_neigh(&self, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        self.put_neigh(ip, mac).await
    }

    async fn del_neigh(&self, ip: Ipv4Addr) -> Result<()> {
        self.delete_neigh(ip).await
    }

    async fn set_fdb(&self, mac: [u8; 6], node: Ipv4Addr) -> Result<()> {
        self.put_fdb(mac, node).await
    }

    async fn del_fdb(&self, mac: [u8; 6]) -> Result<()> {
        self.delete_fdb(mac).await
    }

    async fn tunnel_filter(&self) -> Result<Option<TunnelFilter>> {
        if let Some((at, f)) = self.filter.lock().expect("filter").as_ref()
            && at.elapsed() < FILTER_REREAD
        {
            return Ok(f.clone());
        }
        let f = super::tunnel_filter::read().await?;
        *self.filter.lock().expect("filter") = Some((std::time::Instant::now(), f.clone()));
        Ok(f)
    }

    async fn load_tunnel_filter(&self, f: &TunnelFilter) -> Result<()> {
        // Whatever happens, the next pass reads the kernel's table again.
        *self.filter.lock().expect("filter") = None;
        super::tunnel_filter::load(f).await?;
        *self.filter.lock().expect("filter") = Some((std::time::Instant::now(), Some(f.clone())));
        Ok(())
    }

    async fn host_addresses(&self) -> Result<Vec<(String, IpNetwork)>> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
        let names = self.links().await?;
        let mut out = Vec::new();
        let _dump = self.dumping().await;
        let mut addrs = self.host.address().get().execute();
        while let Some(m) = addrs.try_next().await.map_err(nl("list addresses"))? {
            if m.header.scope != AddressScope::Universe {
                continue;
            }
            let Some((name, _, _)) = names.get(&m.header.index) else {
                continue;
            };
            if name == "lo" || ownership::is_margay_link(name) {
                continue;
            }
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip
                && let Ok(net) = IpNetwork::new(ip, m.header.prefix_len)
            {
                out.push((name.clone(), net));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handle_whose_driver_is_dropped_fails_rather_than_hangs() {
        let (handle, driver) = connect().unwrap();
        let lo = Netlink::link_index(&handle, "lo").await.unwrap();
        assert!(lo.is_some(), "no lo");
        drop(driver);
        tokio::task::yield_now().await;
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            Netlink::link_index(&handle, "lo"),
        )
        .await
        .expect("an answer, not a hang");
        assert!(r.is_err(), "the connection outlived its driver: {r:?}");
    }
}
