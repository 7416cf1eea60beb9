//! The pod dataplane: veth pairs, addresses and /32 routes, Calico-style.
//!
//! Host side `cali<11 hex>` with MAC ee:ee:ee:ee:ee:ee, proxy ARP on and no
//! proxy delay; pod side `eth0` (CNI_IFNAME) created directly in the pod's
//! namespace with the /32 (/128), `169.254.1.1` (IPv6: the host side's
//! link-local address) as an on-link gateway and the default route via it;
//! on the host a /32 (/128) route to the pod with protocol
//! [`RTPROT_MARGAY_POD`]. The [`Dataplane`] trait keeps the service logic
//! testable with [`FakeDataplane`]; [`Netlink`] is the real one.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// Route protocol number of the agent's pod routes and block blackholes
/// (BGP routes use 77).
pub const RTPROT_MARGAY_POD: u8 = 78;
/// The host side's MAC (Calico's), so pods' neighbour entries never change.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pods' IPv4 gateway, answered by proxy ARP.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 gateway: the link-local address EUI-64 gives [`HOST_MAC`].
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// Dataplane errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pod's network namespace cannot be opened.
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    /// Something else went wrong.
    #[error("{0}")]
    Other(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// The host-side interface name for a pod: `cali` and 11 hex digits of a
/// hash of `namespace.name` (or the container id when the caller gave no
/// pod), stable across ADD, DEL and agent restarts.
pub fn host_ifname(key: &str) -> String {
    // FNV-1a, 64 bits: stable, no dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("cali{:011x}", h & 0xfff_ffff_ffff)
}

/// What to build for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's network namespace (a path).
    pub netns: PathBuf,
    /// The pod-side name (CNI_IFNAME).
    pub ifname: String,
    /// The host-side name ([`host_ifname`]).
    pub host_if: String,
    /// The pod's addresses (host prefixes).
    pub addrs: Vec<IpNetwork>,
    /// MTU of both ends.
    pub mtu: u32,
    /// Written on the host side as its alias (`ip link` shows it): the
    /// durable record of whose interface this is (see `reconcile`).
    pub alias: String,
}

/// A pod host interface found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPod {
    /// Its name.
    pub host_if: String,
    /// Its alias (empty when it has none).
    pub alias: String,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWiring {
    /// The pod side's MAC, `aa:bb:...`.
    pub pod_mac: String,
}

/// The operations the CNI service needs from the kernel.
pub trait Dataplane: Send + Sync + 'static {
    /// Builds the pod's interfaces, addresses and routes; on failure
    /// nothing is left behind.
    fn add_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<PodWiring>> + Send;
    /// Removes the pod's host side (its peer and routes go with it);
    /// success when it is already gone.
    fn del_pod(&self, host_if: &str) -> impl Future<Output = Result<()>> + Send;
    /// Verifies the pod's wiring; `Err` says what is wrong.
    fn check_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<()>> + Send;
    /// The pod host interfaces (`cali…` veths) that exist.
    fn list_pods(&self) -> impl Future<Output = Result<Vec<HostPod>>> + Send;
    /// Puts back missing host routes of pods (from the host interfaces'
    /// aliases) and removes pod routes no interface backs; returns how many
    /// routes it changed.
    fn resync_pod_routes(&self) -> impl Future<Output = Result<usize>> + Send;
    /// Blackhole routes with Margay's protocol, both families.
    fn list_blackholes(&self) -> impl Future<Output = Result<Vec<IpNetwork>>> + Send;
    /// Adds (`true`) or removes a blackhole route for `net`; idempotent.
    fn set_blackhole(
        &self,
        net: IpNetwork,
        present: bool,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The host's route to a pod address through its host interface.
fn host_route(ip: IpAddr, idx: u32) -> RouteMessage {
    match ip {
        IpAddr::V4(ip) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Other(RTPROT_MARGAY_POD))
            .build(),
        IpAddr::V6(ip) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(ip, 128)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Other(RTPROT_MARGAY_POD))
            .build(),
    }
}

fn blackhole_msg(net: IpNetwork) -> rtnetlink::packet_route::route::RouteMessage {
    match net {
        IpNetwork::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix())
            .kind(RouteType::BlackHole)
            .protocol(RouteProtocol::Other(RTPROT_MARGAY_POD))
            .build(),
        IpNetwork::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix())
            .kind(RouteType::BlackHole)
            .protocol(RouteProtocol::Other(RTPROT_MARGAY_POD))
            .build(),
    }
}

fn mac_str(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The kernel, through rtnetlink.
#[derive(Debug, Clone)]
pub struct Netlink {
    host: Handle,
}

impl Netlink {
    /// A dataplane in the calling process's network namespace (must be
    /// called inside a tokio runtime). Turns on IPv4 forwarding there.
    pub fn new() -> Result<Self> {
        let (conn, host, _) =
            rtnetlink::new_connection().map_err(|e| Error::Other(format!("netlink: {e}")))?;
        tokio::spawn(conn);
        sysctl("net/ipv4/ip_forward", "1")?;
        Ok(Self { host })
    }

    /// A netlink handle whose socket lives in the namespace at `path`:
    /// made on a short-lived thread that entered that namespace (a socket
    /// belongs to the namespace of the thread that created it; tokio's own
    /// threads never change namespace).
    async fn handle_in(path: &Path) -> Result<Handle> {
        let file = std::fs::File::open(path).map_err(|source| Error::Netns {
            path: path.display().to_string(),
            source,
        })?;
        let rt = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let res = (|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::Other(format!("setns: {e}")))?;
                let _guard = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| Error::Other(format!("netlink in pod namespace: {e}")))?;
                rt.spawn(conn);
                Ok(handle)
            })();
            let _ = tx.send(res);
        });
        rx.await
            .map_err(|_| Error::Other("netns thread died".into()))?
    }

    async fn link_index(handle: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>)>> {
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => {
                let mac = msg
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::Address(m) => Some(m.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                Ok(Some((msg.header.index, mac)))
            }
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("look up {name}"))(e)),
        }
    }

    /// The host side: sysctls, up, and the alias (from here on the kernel
    /// records whose interface, and addresses, this is); its index.
    async fn wire_host(&self, spec: &PodSpec) -> Result<u32> {
        let (host_idx, _) = Self::link_index(&self.host, &spec.host_if)
            .await?
            .ok_or_else(|| Error::Other(format!("{} vanished after creation", spec.host_if)))?;
        let v6 = spec.addrs.iter().any(IpNetwork::is_ipv6);
        sysctl(&format!("net/ipv4/conf/{}/proxy_arp", spec.host_if), "1")?;
        sysctl(&format!("net/ipv4/neigh/{}/proxy_delay", spec.host_if), "0")?;
        if v6 {
            sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", spec.host_if), "0")?;
            // Only once IPv6 pods exist: forwarding makes the kernel ignore
            // router advertisements unless accept_ra=2 (as with Calico).
            if std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
                .is_ok_and(|v| v.trim() != "1")
            {
                tracing::info!("turning on IPv6 forwarding for IPv6 pods");
                sysctl("net/ipv6/conf/all/forwarding", "1")?;
            }
        }
        let mut up = LinkUnspec::new_with_index(host_idx).up().build();
        up.attributes
            .push(LinkAttribute::IfAlias(spec.alias.clone()));
        self.host
            .link()
            .set(up)
            .execute()
            .await
            .map_err(nl(format!("bring up {}", spec.host_if)))?;
        Ok(host_idx)
    }

    /// The pod side: up, addresses, gateway and default routes; its index
    /// and MAC.
    async fn wire_pod(spec: &PodSpec) -> Result<(u32, Vec<u8>)> {
        let pod = Self::handle_in(&spec.netns).await?;
        let (pod_idx, pod_mac) = Self::link_index(&pod, &spec.ifname)
            .await?
            .ok_or_else(|| Error::Other(format!("{} missing in the pod namespace", spec.ifname)))?;
        pod.link()
            .set(LinkUnspec::new_with_index(pod_idx).up().build())
            .execute()
            .await
            .map_err(nl("bring up the pod interface"))?;
        for a in &spec.addrs {
            pod.address()
                .add(pod_idx, a.ip(), a.prefix())
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add {a} in the pod")))?;
            match a.ip() {
                IpAddr::V4(_) => {
                    let gw = RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(GATEWAY_V4, 32)
                        .output_interface(pod_idx)
                        .scope(RouteScope::Link)
                        .protocol(RouteProtocol::Boot)
                        .build();
                    pod.route()
                        .add(gw)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl("gateway route in the pod"))?;
                    let default = RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                        .gateway(GATEWAY_V4)
                        .output_interface(pod_idx)
                        .protocol(RouteProtocol::Boot)
                        .build();
                    pod.route()
                        .add(default)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl("default route in the pod"))?;
                }
                IpAddr::V6(_) => {
                    let default = RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                        .gateway(GATEWAY_V6)
                        .output_interface(pod_idx)
                        .protocol(RouteProtocol::Boot)
                        .build();
                    pod.route()
                        .add(default)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl("IPv6 default route in the pod"))?;
                }
            }
        }
        Ok((pod_idx, pod_mac))
    }

    async fn build(&self, spec: &PodSpec, netns: &std::fs::File) -> Result<PodWiring> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.ifname.clone())
            .mtu(spec.mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(
            rtnetlink::packet_route::link::InfoKind::Veth,
        )
        .name(spec.host_if.clone())
        .mtu(spec.mtu)
        .address(HOST_MAC.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
        self.host
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(nl(format!(
                "create veth {} / {}",
                spec.host_if, spec.ifname
            )))?;
        // The two sides are independent from here: wire them concurrently
        // (each step is a netlink round trip; the kernel serialises what it
        // must).
        let (host_idx, (_, pod_mac)) =
            futures::try_join!(self.wire_host(spec), Self::wire_pod(spec))?;
        // Host routes to the pod.
        for a in &spec.addrs {
            let msg = host_route(a.ip(), host_idx);
            self.host
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("host route to {a}")))?;
        }
        Ok(PodWiring {
            pod_mac: mac_str(&pod_mac),
        })
    }
}

/// Writes `/proc/sys/<key>` (in the calling thread's namespace).
fn sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value)
        .map_err(|e| Error::Other(format!("sysctl {key}={value}: {e}")))
}

/// A route as listed from the kernel.
struct Listed {
    dst: IpNetwork,
    gw: Option<IpAddr>,
    oif: Option<u32>,
    msg: RouteMessage,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

impl Netlink {
    /// The main table's routes of `kind` and protocol `proto`, both
    /// families.
    async fn routes_of(&self, kind: RouteType, proto: u8) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for probe in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.host.route().get(probe).execute();
            while let Some(msg) = routes.try_next().await.map_err(nl("list routes"))? {
                if msg.header.kind != kind || msg.header.protocol != RouteProtocol::Other(proto) {
                    continue;
                }
                let (mut dst, mut gw, mut oif) = (None, None, None);
                for a in &msg.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d),
                        RouteAttribute::Gateway(g) => gw = route_addr(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                // A default route carries no destination attribute.
                let unspecified = match msg.header.address_family {
                    AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                    _ => None,
                };
                let Some(dst) = dst
                    .or(unspecified)
                    .and_then(|d| IpNetwork::new(d, msg.header.destination_prefix_length).ok())
                else {
                    continue;
                };
                out.push(Listed { dst, gw, oif, msg });
            }
        }
        Ok(out)
    }
}

impl Dataplane for Netlink {
    async fn resync_pod_routes(&self) -> Result<usize> {
        // Routes first, interfaces second: an interface gets its alias
        // before its route, so every route listed here that belongs to a
        // pod being added has its interface listed below.
        let mut have: BTreeMap<IpAddr, (u32, RouteMessage)> = BTreeMap::new();
        for r in self
            .routes_of(RouteType::Unicast, RTPROT_MARGAY_POD)
            .await?
        {
            have.insert(r.dst.ip(), (r.oif.unwrap_or(0), r.msg));
        }
        // What the interfaces say.
        let mut want: BTreeMap<IpAddr, (u32, String)> = BTreeMap::new();
        for (p, idx) in self.list().await? {
            let Some(at) = crate::reconcile::parse(&p) else {
                continue;
            };
            for ip in at.addrs {
                want.insert(ip, (idx, p.host_if.clone()));
            }
        }
        let mut changed = 0;
        for (ip, (oif, m)) in &have {
            if want.get(ip).map(|(i, _)| i) != Some(oif) {
                tracing::info!(%ip, "removing a pod route no interface backs");
                match self.host.route().del(m.clone()).execute().await {
                    Ok(()) => changed += 1,
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                    Err(e) => return Err(nl(format!("delete pod route {ip}"))(e)),
                }
            }
        }
        for (ip, (idx, host_if)) in &want {
            if have.get(ip).map(|(o, _)| o) == Some(idx) {
                continue;
            }
            tracing::info!(%ip, %host_if, "putting back a missing pod route");
            self.host
                .route()
                .add(host_route(*ip, *idx))
                .replace()
                .execute()
                .await
                .map_err(nl(format!("host route to {ip}")))?;
            changed += 1;
        }
        Ok(changed)
    }

    async fn list_pods(&self) -> Result<Vec<HostPod>> {
        Ok(self.list().await?.into_iter().map(|(p, _)| p).collect())
    }

    async fn list_blackholes(&self) -> Result<Vec<IpNetwork>> {
        Ok(self
            .routes_of(RouteType::BlackHole, RTPROT_MARGAY_POD)
            .await?
            .into_iter()
            .map(|r| r.dst)
            .collect())
    }

    async fn set_blackhole(&self, net: IpNetwork, present: bool) -> Result<()> {
        let msg = blackhole_msg(net);
        let r = if present {
            self.host.route().add(msg).replace().execute().await
        } else {
            self.host.route().del(msg).execute().await
        };
        match r {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if !present && e.raw_code() == -libc::ESRCH => {
                Ok(())
            }
            Err(e) => Err(nl(format!("blackhole {net}"))(e)),
        }
    }

    async fn add_pod(&self, spec: &PodSpec) -> Result<PodWiring> {
        let netns = std::fs::File::open(&spec.netns).map_err(|source| Error::Netns {
            path: spec.netns.display().to_string(),
            source,
        })?;
        // A retried ADD starts from scratch: an old pair in the way (the
        // create says it exists) goes first, then the create is retried.
        let first = self.build(spec, &netns).await;
        let res = match first {
            Err(Error::Netlink {
                source: rtnetlink::Error::NetlinkError(ref e),
                ..
            }) if e.raw_code() == -libc::EEXIST => {
                self.del_pod(&spec.host_if).await?;
                self.build(spec, &netns).await
            }
            r => r,
        };
        match res {
            Ok(w) => Ok(w),
            Err(e) => {
                // Roll back: deleting the host side deletes the peer and
                // every route through it.
                if let Err(e2) = self.del_pod(&spec.host_if).await {
                    tracing::warn!(host_if = %spec.host_if, "rollback failed: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn del_pod(&self, host_if: &str) -> Result<()> {
        let Some((idx, _)) = Self::link_index(&self.host, host_if).await? else {
            return Ok(());
        };
        match self.host.link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(nl(format!("delete {host_if}"))(e)),
        }
    }

    async fn check_pod(&self, spec: &PodSpec) -> Result<()> {
        if Self::link_index(&self.host, &spec.host_if).await?.is_none() {
            return Err(Error::Other(format!(
                "host interface {} is missing",
                spec.host_if
            )));
        }
        let pod = Self::handle_in(&spec.netns).await?;
        let Some((idx, _)) = Self::link_index(&pod, &spec.ifname).await? else {
            return Err(Error::Other(format!(
                "{} is missing in {}",
                spec.ifname,
                spec.netns.display()
            )));
        };
        let mut have = Vec::new();
        let mut addrs = pod.address().get().set_link_index_filter(idx).execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl("list pod addresses"))? {
            for a in msg.attributes {
                if let rtnetlink::packet_route::address::AddressAttribute::Address(ip) = a {
                    have.push(ip);
                }
            }
        }
        for a in &spec.addrs {
            if !have.contains(&a.ip()) {
                return Err(Error::Other(format!("{} lacks {a}", spec.ifname)));
            }
        }
        Ok(())
    }
}

impl Netlink {
    /// The pod host interfaces with their indexes (one link dump).
    async fn list(&self) -> Result<Vec<(HostPod, u32)>> {
        let mut out = Vec::new();
        let mut links = self.host.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
            let mut name = String::new();
            let mut alias = String::new();
            let mut veth = false;
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::IfAlias(s) => alias = s.clone(),
                    LinkAttribute::LinkInfo(info) => {
                        veth |= info.iter().any(|i| {
                            matches!(
                                i,
                                rtnetlink::packet_route::link::LinkInfo::Kind(
                                    rtnetlink::packet_route::link::InfoKind::Veth
                                )
                            )
                        });
                    }
                    _ => {}
                }
            }
            if veth && name.starts_with("cali") {
                out.push((
                    HostPod {
                        host_if: name,
                        alias,
                    },
                    msg.header.index,
                ));
            }
        }
        Ok(out)
    }
}

/// An in-memory dataplane for unit tests, with failure injection.
#[derive(Debug, Clone, Default)]
pub struct FakeDataplane {
    /// host_if -> spec of the pods that exist.
    pub pods: Arc<Mutex<BTreeMap<String, PodSpec>>>,
    /// Fail the next `add_pod` with this message.
    pub fail_next_add: Arc<Mutex<Option<String>>>,
    /// Blackhole routes.
    pub blackholes: Arc<Mutex<std::collections::BTreeSet<IpNetwork>>>,
}

impl Dataplane for FakeDataplane {
    async fn resync_pod_routes(&self) -> Result<usize> {
        Ok(0)
    }

    async fn list_blackholes(&self) -> Result<Vec<IpNetwork>> {
        Ok(self
            .blackholes
            .lock()
            .expect("lock")
            .iter()
            .copied()
            .collect())
    }

    async fn set_blackhole(&self, net: IpNetwork, present: bool) -> Result<()> {
        let mut b = self.blackholes.lock().expect("lock");
        if present {
            b.insert(net);
        } else {
            b.remove(&net);
        }
        Ok(())
    }

    async fn list_pods(&self) -> Result<Vec<HostPod>> {
        Ok(self
            .pods
            .lock()
            .expect("lock")
            .values()
            .map(|s| HostPod {
                host_if: s.host_if.clone(),
                alias: s.alias.clone(),
            })
            .collect())
    }

    async fn add_pod(&self, spec: &PodSpec) -> Result<PodWiring> {
        if let Some(msg) = self.fail_next_add.lock().expect("lock").take() {
            return Err(Error::Other(msg));
        }
        self.pods
            .lock()
            .expect("lock")
            .insert(spec.host_if.clone(), spec.clone());
        Ok(PodWiring {
            pod_mac: "02:00:00:00:00:01".into(),
        })
    }

    async fn del_pod(&self, host_if: &str) -> Result<()> {
        self.pods.lock().expect("lock").remove(host_if);
        Ok(())
    }

    async fn check_pod(&self, spec: &PodSpec) -> Result<()> {
        match self.pods.lock().expect("lock").get(&spec.host_if) {
            Some(s) if s == spec => Ok(()),
            Some(_) => Err(Error::Other("wiring differs".into())),
            None => Err(Error::Other(format!("{} is missing", spec.host_if))),
        }
    }
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
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }
}

/// This node's own VXLAN endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalVtep {
    /// The device's MAC (published for the other nodes).
    pub mac: [u8; 6],
    /// The device's address (from one of this node's blocks).
    pub tunnel_ip: Ipv4Addr,
    /// This node's underlay address (the outer source).
    pub underlay: Ipv4Addr,
    /// The device's MTU (underlay MTU minus the VXLAN overhead).
    pub mtu: u32,
}

fn remote_route(net: IpNetwork, via: crate::remote::Via, vx: Option<u32>) -> Option<RouteMessage> {
    use crate::remote::{RTPROT_MARGAY_REMOTE, Via};
    let proto = RouteProtocol::Other(RTPROT_MARGAY_REMOTE);
    Some(match (net, via) {
        (IpNetwork::V4(n), Via::Native(IpAddr::V4(gw))) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix())
            .gateway(gw)
            .protocol(proto)
            .build(),
        (IpNetwork::V6(n), Via::Native(IpAddr::V6(gw))) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix())
            .gateway(gw)
            .protocol(proto)
            .build(),
        (IpNetwork::V4(n), Via::Vxlan(tip)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix())
            .gateway(tip)
            .output_interface(vx?)
            .onlink()
            .protocol(proto)
            .build(),
        _ => return None,
    })
}

impl Netlink {
    /// Global-scope addresses of the host's interfaces, with the
    /// interface's name, except Margay's own (`cali*`, [`VXLAN_DEV`]) and
    /// loopback; in the kernel's order.
    ///
    /// [`VXLAN_DEV`]: crate::remote::VXLAN_DEV
    pub async fn host_addresses(&self) -> Result<Vec<(String, IpNetwork)>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        let mut links = self.host.link().get().execute();
        while let Some(m) = links.try_next().await.map_err(nl("list links"))? {
            if let Some(n) = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                names.insert(m.header.index, n);
            }
        }
        let mut out = Vec::new();
        let mut addrs = self.host.address().get().execute();
        while let Some(m) = addrs.try_next().await.map_err(nl("list addresses"))? {
            if m.header.scope != rtnetlink::packet_route::address::AddressScope::Universe {
                continue;
            }
            let Some(name) = names.get(&m.header.index) else {
                continue;
            };
            if name == "lo" || name.starts_with("cali") || name == crate::remote::VXLAN_DEV {
                continue;
            }
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
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

    /// Makes the kernel's routes to remote blocks (and the VXLAN device and
    /// its entries) match `d`; touches only Margay's protocol-79 routes and
    /// its own device. `local` is needed when `d` uses VXLAN. Without
    /// `prune`, only adds and changes: nothing is removed (while BGP is
    /// still relearning after a restart, what is in the kernel keeps
    /// forwarding).
    pub async fn apply_remote(
        &self,
        local: Option<&LocalVtep>,
        d: &crate::remote::Desired,
        prune: bool,
    ) -> Result<()> {
        use crate::remote::{RTPROT_MARGAY_REMOTE, VXLAN_DEV, Via, diff};
        let vx = if d.needs_vxlan() {
            let l = local.ok_or_else(|| {
                Error::Other("VXLAN blocks need this node's own VTEP (tunnel address)".into())
            })?;
            Some(self.ensure_vxlan(l).await?)
        } else if !prune {
            Self::link_index(&self.host, VXLAN_DEV)
                .await?
                .map(|(i, _)| i)
        } else {
            if let Some((idx, _)) = Self::link_index(&self.host, VXLAN_DEV).await? {
                self.host
                    .link()
                    .del(idx)
                    .execute()
                    .await
                    .map_err(nl(format!("delete {VXLAN_DEV}")))?;
            }
            None
        };

        // Neighbour and FDB entries on the device.
        if let Some(vx) = vx {
            let mut neigh: BTreeMap<Ipv4Addr, [u8; 6]> = BTreeMap::new();
            let mut fdb: BTreeMap<[u8; 6], Ipv4Addr> = BTreeMap::new();
            let mut msgs = Vec::new();
            let mut list = self.host.neighbours().get().execute();
            while let Some(m) = list.try_next().await.map_err(nl("list neighbours"))? {
                if m.header.ifindex != vx {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = Some(*v4)
                        }
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            mac = <[u8; 6]>::try_from(l.as_slice()).ok();
                        }
                        _ => {}
                    }
                }
                if let (Some(ip), Some(mac)) = (ip, mac) {
                    if m.header.family == AddressFamily::Bridge {
                        fdb.insert(mac, ip);
                        msgs.push((true, mac, ip, m));
                    } else {
                        neigh.insert(ip, mac);
                        msgs.push((false, mac, ip, m));
                    }
                }
            }
            let (set_n, del_n) = diff(&d.neigh, &neigh);
            let (set_f, del_f) = diff(&d.fdb, &fdb);
            for (is_fdb, mac, ip, m) in msgs.into_iter().filter(|_| prune) {
                let stale = if is_fdb {
                    del_f.contains(&mac)
                } else {
                    del_n.contains(&ip)
                };
                if stale {
                    self.host
                        .neighbours()
                        .del(m)
                        .execute()
                        .await
                        .map_err(nl(format!("delete {VXLAN_DEV} entry for {ip}")))?;
                }
            }
            for (ip, mac) in set_n {
                self.host
                    .neighbours()
                    .add(vx, IpAddr::V4(ip))
                    .link_layer_address(&mac)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(format!("neighbour {ip} on {VXLAN_DEV}")))?;
            }
            for (mac, ip) in set_f {
                self.host
                    .neighbours()
                    .add_bridge(vx, &mac)
                    .destination(IpAddr::V4(ip))
                    .flags(NeighbourFlags::Own)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(format!("fdb {} -> {ip}", mac_str(&mac))))?;
            }
        }

        // Routes of protocol 79.
        let mut have: BTreeMap<IpNetwork, Via> = BTreeMap::new();
        let mut stale_msgs = Vec::new();
        for r in self
            .routes_of(RouteType::Unicast, RTPROT_MARGAY_REMOTE)
            .await?
        {
            let Some(gw) = r.gw else {
                stale_msgs.push((None, r.msg));
                continue;
            };
            let via = match (gw, vx) {
                (IpAddr::V4(g), Some(v)) if r.oif == Some(v) => Via::Vxlan(g),
                (g, _) => Via::Native(g),
            };
            have.insert(r.dst, via);
            stale_msgs.push((Some(r.dst), r.msg));
        }
        let (set, del) = diff(&d.routes, &have);
        for (net, m) in stale_msgs.into_iter().filter(|_| prune) {
            if net.is_none_or(|n| del.contains(&n)) {
                match self.host.route().del(m).execute().await {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                    Err(e) => return Err(nl("delete a remote-block route")(e)),
                }
            }
        }
        for (net, via) in set {
            let Some(msg) = remote_route(net, via, vx) else {
                tracing::warn!(block = %net, ?via, "cannot express this route; skipped");
                continue;
            };
            self.host
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("route to {net}")))?;
        }
        Ok(())
    }

    /// The VXLAN device, made or kept; returns its index.
    async fn ensure_vxlan(&self, l: &LocalVtep) -> Result<u32> {
        use crate::remote::{VXLAN_DEV, VXLAN_PORT, VXLAN_VNI};
        let idx = match Self::link_index(&self.host, VXLAN_DEV).await? {
            Some((idx, _)) => idx,
            None => {
                let msg = rtnetlink::LinkVxlan::new(VXLAN_DEV, VXLAN_VNI)
                    .port(VXLAN_PORT)
                    .local(l.underlay)
                    .learning(false)
                    .mtu(l.mtu)
                    .address(l.mac.to_vec())
                    .build();
                self.host
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("create {VXLAN_DEV}")))?;
                Self::link_index(&self.host, VXLAN_DEV)
                    .await?
                    .ok_or_else(|| Error::Other(format!("{VXLAN_DEV} vanished")))?
                    .0
            }
        };
        self.host
            .link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl(format!("bring up {VXLAN_DEV}")))?;
        self.host
            .address()
            .add(idx, IpAddr::V4(l.tunnel_ip), 32)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("address {} on {VXLAN_DEV}", l.tunnel_ip)))?;
        Ok(idx)
    }
}
