//! The node's kernel state, behind one trait.
//!
//! - [`Dataplane`]: every kernel operation the agent performs (pod veths,
//!   their host routes, block blackholes, routes to remote blocks, the
//!   VXLAN device and its neighbour and FDB entries, `tunl0`), each one small and
//!   idempotent; [`Netlink`] is the real kernel, [`FakeDataplane`] an
//!   in-memory one with failure injection for unit tests.
//! - [`sync`]: the desired-versus-actual reconciliation of each kernel table
//!   over the trait (through `margay-delta`): one refused write never stops
//!   the others, and a table computed from an Unknown input removes nothing.
//! - [`ownership`]: the only place that names what Margay owns in the
//!   kernel (route protocols, interface prefix, alias tag, device names).
//! - [`nat`]: natOutgoing in Margay's nftables table.
//! - [`tunnel_filter`]: the tunnels take encapsulated packets from the
//!   cluster's nodes only (Margay's `inet margay_tunnel` table).
//! - [`nft_script`] loads nftables scripts (NetworkPolicy deltas go to
//!   the kernel over netlink through the `margay-nftnl` crate).
//! - [`routed`]: what the node routes for (its blocks, its pods'
//!   addresses), as `routing::local` publishes it.
//! - `netns`: which paths a pod may be wired into (a network namespace,
//!   not the node's own).
//!
//! Wiring a pod, Calico-style: host side `cali<11 hex>` with MAC
//! ee:ee:ee:ee:ee:ee, proxy ARP on and no proxy delay; pod side (CNI_IFNAME)
//! created directly in the pod's namespace with the /32 (/128),
//! `169.254.1.1` (IPv6: the host side's link-local address) as an on-link
//! gateway and the default route via it; on the host a /32 (/128) route to
//! the pod with protocol [`ownership::RTPROT_POD`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use margay_api::ipam::Encapsulation;

pub mod fake;
mod ipip;
pub mod nat;
mod netlink;
mod netns;
pub mod nft_script;
pub mod ownership;
mod pods;
pub mod routed;
mod routes;
pub mod sync;
pub mod tunnel_filter;
mod vxlan;

pub use fake::{FakeDataplane, Fault};
pub use netlink::Netlink;
pub use tunnel_filter::{FilterPlan, TunnelFilter};

/// The host side's MAC (Calico's), so pods' neighbour entries never change.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pods' IPv4 gateway, answered by proxy ARP.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 gateway: the link-local address EUI-64 gives [`HOST_MAC`].
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// Bytes VXLAN adds to a packet (outer IPv4 + UDP + VXLAN + inner Ethernet).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes IPIP adds.
pub const IPIP_OVERHEAD: u32 = 20;

/// Pod MTU for `encap` on an underlay of `underlay` bytes.
pub fn pod_mtu(underlay: u32, encap: Encapsulation) -> u32 {
    match encap {
        Encapsulation::None => underlay,
        Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet => underlay - VXLAN_OVERHEAD,
        Encapsulation::Ipip | Encapsulation::IpipCrossSubnet => underlay - IPIP_OVERHEAD,
    }
}

/// Dataplane errors: variants of the agent's one error enum.
pub use crate::error::Error;

/// Dataplane results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to build for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's network namespace (a path).
    pub netns: PathBuf,
    /// The pod-side name (CNI_IFNAME).
    pub ifname: String,
    /// The host-side name ([`ownership::host_ifname`]).
    pub host_if: String,
    /// The pod's addresses (host prefixes).
    pub addrs: Vec<IpNetwork>,
    /// MTU of both ends.
    pub mtu: u32,
    /// Written on the host side as its alias (`ip link` shows it): the
    /// durable record of whose interface this is (see `cni::alias`).
    pub alias: String,
    /// The attachment's handle the alias records: an interface of this
    /// name recording another is never replaced.
    pub owner: String,
}

/// A pod host interface found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPod {
    /// Its name.
    pub host_if: String,
    /// Its index.
    pub index: u32,
    /// Its alias (empty when it has none).
    pub alias: String,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWiring {
    /// The pod side's MAC, `aa:bb:...`.
    pub pod_mac: String,
}

/// A tunnel Margay can carry pod traffic in between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tunnel {
    /// VXLAN over [`ownership::VXLAN_DEV`].
    Vxlan,
    /// IP-in-IP over [`ownership::IPIP_DEV`] (`tunl0`).
    Ipip,
}

impl Tunnel {
    /// Both kinds.
    pub const ALL: [Tunnel; 2] = [Tunnel::Vxlan, Tunnel::Ipip];

    /// The IPAM handle of node `node`'s tunnel address of this kind.
    pub fn handle(self, node: &str) -> String {
        match self {
            Tunnel::Vxlan => format!("tunnel.vxlan.{node}"),
            Tunnel::Ipip => format!("tunnel.ipip.{node}"),
        }
    }

    /// Whether a pool of this encapsulation uses this tunnel (to some node).
    pub fn used_by(self, encap: Encapsulation) -> bool {
        match self {
            Tunnel::Vxlan => matches!(
                encap,
                Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
            ),
            Tunnel::Ipip => matches!(encap, Encapsulation::Ipip | Encapsulation::IpipCrossSubnet),
        }
    }
}

impl std::fmt::Display for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tunnel::Vxlan => "VXLAN",
            Tunnel::Ipip => "IPIP",
        })
    }
}

/// One value per tunnel kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerTunnel<T> {
    /// VXLAN's.
    pub vxlan: T,
    /// IPIP's.
    pub ipip: T,
}

impl<T> PerTunnel<T> {
    /// The value of kind `t`.
    pub fn get(&self, t: Tunnel) -> &T {
        match t {
            Tunnel::Vxlan => &self.vxlan,
            Tunnel::Ipip => &self.ipip,
        }
    }

    /// The value of kind `t`, to change.
    pub fn get_mut(&mut self, t: Tunnel) -> &mut T {
        match t {
            Tunnel::Vxlan => &mut self.vxlan,
            Tunnel::Ipip => &mut self.ipip,
        }
    }

    /// Both values through `f`.
    pub fn map<U>(&self, mut f: impl FnMut(Tunnel, &T) -> U) -> PerTunnel<U> {
        PerTunnel {
            vxlan: f(Tunnel::Vxlan, &self.vxlan),
            ipip: f(Tunnel::Ipip, &self.ipip),
        }
    }
}

/// How a remote block is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    /// Straight to the node.
    Native(IpAddr),
    /// Through the VXLAN device, to this tunnel address (on-link).
    Vxlan(Ipv4Addr),
    /// Through `tunl0`, encapsulated to this node address (on-link).
    Ipip(Ipv4Addr),
}

impl Via {
    /// The tunnel this route goes through, if any.
    pub fn tunnel(&self) -> Option<Tunnel> {
        match self {
            Via::Native(_) => None,
            Via::Vxlan(_) => Some(Tunnel::Vxlan),
            Via::Ipip(_) => Some(Tunnel::Ipip),
        }
    }
}

/// The kernel state for the remote blocks: routes and, for VXLAN, the
/// device's neighbour and FDB entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remote {
    /// Block → next hop.
    pub routes: BTreeMap<IpNetwork, Via>,
    /// Tunnel address → VTEP MAC (neighbour entries on the device).
    pub neigh: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// VTEP MAC → node address (FDB entries on the device).
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
}

impl Remote {
    /// Whether some route (or, for VXLAN, some entry) needs tunnel `t`.
    pub fn needs(&self, t: Tunnel) -> bool {
        (t == Tunnel::Vxlan && !self.fdb.is_empty())
            || self.routes.values().any(|v| v.tunnel() == Some(t))
    }
}

/// What the kernel holds of [`Remote`]: Margay's remote-block routes (and
/// those of its protocol it cannot read back, to be removed), and the VXLAN
/// device's entries when the device exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteActual {
    /// The state, as [`Remote`].
    pub state: Remote,
    /// Routes of Margay's protocol without a usable next hop.
    pub odd: BTreeSet<IpNetwork>,
    /// The tunnel devices that exist (`tunl0`: exists and is up).
    pub devices: PerTunnel<bool>,
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

/// This node's `tunl0`, as IPIP needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalIpip {
    /// Its address (from one of this node's blocks; the source of what
    /// the node itself sends through the tunnel).
    pub tunnel_ip: Ipv4Addr,
    /// Its MTU (underlay MTU minus the IPIP overhead).
    pub mtu: u32,
}

/// What to do with one tunnel device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePlan<L> {
    /// Leave it as it is (what it depends on is unknown, or it lingers
    /// after its last use so that packets still in flight arrive).
    #[default]
    Keep,
    /// Have it, up, as `L` says (before any route uses it).
    Want(L),
    /// Remove what Margay made of it (the VXLAN device; `tunl0`'s address
    /// given here, and `tunl0` down when no address is left), once no
    /// route uses it.
    Retire(Option<Ipv4Addr>),
}

/// Remote blocks whose routes [`sync::remote`] treats apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    /// Blocks that exist but cannot be routed as wanted now: whatever
    /// route the kernel has for them stays.
    pub keep: BTreeSet<IpNetwork>,
    /// Blocks of pools being deleted (drained first, as for any pool
    /// deletion): their routes do not keep a tunnel device from being
    /// retired, so the tunnel addresses in them can be released and the
    /// pool can go.
    pub expendable: BTreeSet<IpNetwork>,
}

/// The tunnel devices, as a pass wants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Devices {
    /// The VXLAN device.
    pub vxlan: DevicePlan<LocalVtep>,
    /// `tunl0`.
    pub ipip: DevicePlan<LocalIpip>,
}

impl Devices {
    /// Whether tunnel `t` is to be retired.
    pub fn retires(&self, t: Tunnel) -> bool {
        match t {
            Tunnel::Vxlan => matches!(self.vxlan, DevicePlan::Retire(_)),
            Tunnel::Ipip => matches!(self.ipip, DevicePlan::Retire(_)),
        }
    }
}

/// Every kernel operation the agent performs. Each is small and
/// idempotent; reconciliation over them lives in [`sync`].
pub trait Dataplane: Send + Sync + 'static {
    /// A pod's network namespace, opened and checked
    /// ([`Dataplane::pod_netns`]): what the pod is then wired into, with
    /// no second open to race with.
    type Netns: Send + Sync;

    /// Builds the pod's interfaces, addresses and routes in `netns` (opened
    /// from `spec.netns`); on failure nothing is left behind.
    fn add_pod_in(
        &self,
        spec: &PodSpec,
        netns: &Self::Netns,
    ) -> impl Future<Output = Result<PodWiring>> + Send;
    /// As [`Dataplane::add_pod_in`], the namespace opened from `spec.netns`.
    fn add_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<PodWiring>> + Send {
        async move {
            let netns = self.pod_netns(&spec.netns).await?;
            self.add_pod_in(spec, &netns).await
        }
    }
    /// The node forwards IPv6 (a node-wide setting, turned on once IPv6
    /// pods exist: forwarding makes the kernel ignore router
    /// advertisements unless accept_ra=2); kept as it is when it already
    /// does.
    fn forward_ipv6(&self) -> impl Future<Output = Result<()>> + Send;
    /// Removes the pod's host side (its peer and routes go with it);
    /// success when it is already gone. Callers check whose it is first
    /// ([`Dataplane::pod_link`]).
    fn del_pod(&self, host_if: &str) -> impl Future<Output = Result<()>> + Send;
    /// Verifies the pod's wiring (the host side recording `spec.owner`);
    /// `Err` says what is wrong.
    fn check_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<()>> + Send;
    /// The pod host interfaces (`cali…` veths) that exist.
    fn list_pods(&self) -> impl Future<Output = Result<Vec<HostPod>>> + Send;
    /// The pod host interface of this name, when it exists.
    fn pod_link(&self, host_if: &str) -> impl Future<Output = Result<Option<HostPod>>> + Send;
    /// Opens `path` as a network namespace a pod may be wired into: a
    /// namespace, and not the node's own.
    fn pod_netns(&self, path: &std::path::Path)
    -> impl Future<Output = Result<Self::Netns>> + Send;

    /// Pod host routes with Margay's protocol: address → interface index.
    fn list_pod_routes(&self) -> impl Future<Output = Result<BTreeMap<IpAddr, u32>>> + Send;
    /// Routes `ip` to the interface with index `index` (replacing Margay's
    /// own route for it).
    fn set_pod_route(&self, ip: IpAddr, index: u32) -> impl Future<Output = Result<()>> + Send;
    /// Removes Margay's host route to `ip`; success when it is gone.
    fn del_pod_route(&self, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;

    /// Blackhole routes with Margay's protocol, both families.
    fn list_blackholes(&self) -> impl Future<Output = Result<BTreeSet<IpNetwork>>> + Send;
    /// Adds (`true`) or removes a blackhole route for `net`; idempotent.
    fn set_blackhole(
        &self,
        net: IpNetwork,
        present: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Margay's routes to remote blocks and the VXLAN device's entries.
    fn list_remote(&self) -> impl Future<Output = Result<RemoteActual>> + Send;
    /// Routes `net` via `via` (replacing Margay's own route for it).
    fn set_remote_route(&self, net: IpNetwork, via: Via)
    -> impl Future<Output = Result<()>> + Send;
    /// Removes Margay's route to `net`; success when it is gone.
    fn del_remote_route(&self, net: IpNetwork) -> impl Future<Output = Result<()>> + Send;
    /// Creates (or keeps) the VXLAN device for `local`, up, with its address.
    fn ensure_vxlan(&self, local: &LocalVtep) -> impl Future<Output = Result<()>> + Send;
    /// Removes the VXLAN device (its entries and routes go with it).
    fn del_vxlan(&self) -> impl Future<Output = Result<()>> + Send;
    /// Makes `tunl0` (loading the kernel's ipip module when it can) up,
    /// with `local`'s MTU and address; [`Error::IpipUnavailable`] when the
    /// kernel has no IPIP.
    fn ensure_ipip(&self, local: &LocalIpip) -> impl Future<Output = Result<()>> + Send;
    /// Removes `ip` from `tunl0` and brings it down when no address is left
    /// on it (`tunl0` itself is the kernel's; it stays).
    fn retire_ipip(&self, ip: Option<Ipv4Addr>) -> impl Future<Output = Result<()>> + Send;
    /// A permanent neighbour entry on the device: `ip` is at `mac`.
    fn set_neigh(&self, ip: Ipv4Addr, mac: [u8; 6]) -> impl Future<Output = Result<()>> + Send;
    /// Removes the neighbour entry for `ip` on the device.
    fn del_neigh(&self, ip: Ipv4Addr) -> impl Future<Output = Result<()>> + Send;
    /// An FDB entry on the device: `mac` is behind the node `node`.
    fn set_fdb(&self, mac: [u8; 6], node: Ipv4Addr) -> impl Future<Output = Result<()>> + Send;
    /// Removes the FDB entry for `mac` on the device.
    fn del_fdb(&self, mac: [u8; 6]) -> impl Future<Output = Result<()>> + Send;

    /// The tunnel filter the kernel has ([`tunnel_filter`]; `None`: no
    /// table).
    fn tunnel_filter(&self) -> impl Future<Output = Result<Option<TunnelFilter>>> + Send;
    /// Replaces the tunnel filter with `f`, whole, in one transaction.
    fn load_tunnel_filter(&self, f: &TunnelFilter) -> impl Future<Output = Result<()>> + Send;

    /// Global addresses of the host's interfaces (not Margay's own, not
    /// loopback), with the interface's name, in the kernel's order.
    fn host_addresses(&self) -> impl Future<Output = Result<Vec<(String, IpNetwork)>>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_per_encapsulation() {
        assert_eq!(pod_mtu(1500, Encapsulation::Vxlan), 1450);
        assert_eq!(pod_mtu(1500, Encapsulation::Ipip), 1480);
        assert_eq!(pod_mtu(9000, Encapsulation::None), 9000);
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }
}
