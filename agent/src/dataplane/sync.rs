//! Reconciliation of each kernel table over [`Dataplane`]: list what the
//! kernel holds, diff it against what is desired with `margay-delta`, carry
//! out the difference item by item. One refused item is reported and the
//! others go on (it is retried on the next pass, when it still differs);
//! a listing that fails changes nothing; a desired table computed from an
//! Unknown input comes with [`Removals::Forbidden`] and removes nothing.
//!
//! The tunnel filter ([`tunnel_filter`]) is one nftables table, loaded
//! whole when it differs; its node set follows the same rule (added from
//! any known input, removed only from a current one).
//!
//! This is the whole of the logic between "what the agent wants" and "what
//! the kernel has", shared by the real kernel and the fake, so unit tests
//! with [`super::FakeDataplane`] exercise exactly what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use margay_delta::{Delta, Op, Removals};

use super::ownership::{IPIP_DEV, VXLAN_DEV};
use super::{
    Dataplane, DevicePlan, Devices, Error, FilterPlan, Holds, PerTunnel, Remote, Result, Tunnel,
    TunnelFilter, Via,
};

/// One kernel object a sync works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A block's blackhole route.
    Blackhole(IpNetwork),
    /// A pod's host route.
    PodRoute(IpAddr),
    /// The route to a remote block.
    RemoteRoute(IpNetwork),
    /// A neighbour entry on the VXLAN device.
    Neighbour(Ipv4Addr),
    /// An FDB entry on the VXLAN device.
    Fdb([u8; 6]),
    /// A tunnel device.
    Device(Tunnel),
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Blackhole(n) => write!(f, "blackhole {n}"),
            Item::PodRoute(ip) => write!(f, "pod route {ip}"),
            Item::RemoteRoute(n) => write!(f, "route to {n}"),
            Item::Neighbour(ip) => write!(f, "VXLAN neighbour {ip}"),
            Item::Fdb(m) => write!(f, "VXLAN FDB entry {}", margay_api::stable::mac_string(m)),
            Item::Device(Tunnel::Vxlan) => write!(f, "the VXLAN device {VXLAN_DEV}"),
            Item::Device(Tunnel::Ipip) => write!(f, "the IPIP device {IPIP_DEV}"),
        }
    }
}

/// One item that could not be carried out.
#[derive(Debug)]
pub struct Failed {
    /// What.
    pub item: Item,
    /// Being installed or removed.
    pub op: Op,
    /// The kernel's answer.
    pub error: Error,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Set => "installing",
            Op::Remove => "removing",
        };
        write!(f, "{op} {}: {}", self.item, self.error)
    }
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct Report {
    /// Objects installed, changed or removed.
    pub changed: usize,
    /// Objects that could not be (tried again next time).
    pub failed: Vec<Failed>,
    /// The tunnel devices this sync wanted and made sure of (up, with
    /// their addresses): what this node may tell the others.
    pub ready: PerTunnel<bool>,
    /// The tunnel devices this sync retired (or found gone).
    pub retired: PerTunnel<bool>,
}

impl Report {
    fn absorb<K>(&mut self, r: margay_delta::Report<K, Error>, item: impl Fn(K) -> Item) {
        self.changed += r.changed();
        self.failed.extend(r.failed.into_iter().map(|f| Failed {
            item: item(f.key),
            op: f.op,
            error: f.error,
        }));
    }

    fn fail(&mut self, item: Item, op: Op, error: Error) {
        self.failed.push(Failed { item, op, error });
    }

    /// Carries out `d` (see [`Delta::apply`]) and adds what it did.
    async fn carry<K, V, S, SF, R, RF>(
        &mut self,
        d: Delta<K, V>,
        set: S,
        remove: R,
        item: impl Fn(K) -> Item,
    ) where
        K: Clone,
        S: FnMut(K, V) -> SF,
        SF: std::future::Future<Output = Result<()>>,
        R: FnMut(K) -> RF,
        RF: std::future::Future<Output = Result<()>>,
    {
        let r = d.apply(set, remove).await;
        self.absorb(r, item);
    }
}

/// Makes the kernel's blackholes (of Margay's protocol) `want`.
pub async fn blackholes<D: Dataplane>(
    dp: &D,
    want: &BTreeSet<IpNetwork>,
    removals: Removals,
) -> Result<Report> {
    let have = dp.list_blackholes().await?;
    let mut rep = Report::default();
    rep.carry(
        Delta::between_sets(want, &have, removals),
        |n, ()| dp.set_blackhole(n, true),
        |n| dp.set_blackhole(n, false),
        Item::Blackhole,
    )
    .await;
    Ok(rep)
}

/// Makes the kernel's pod host routes (of Margay's protocol) `want`
/// (address → the index of the pod's host interface).
pub async fn pod_routes<D: Dataplane>(
    dp: &D,
    want: &BTreeMap<IpAddr, u32>,
    removals: Removals,
) -> Result<Report> {
    let have = dp.list_pod_routes().await?;
    let mut rep = Report::default();
    rep.carry(
        Delta::between(want, &have, removals),
        |ip, idx| dp.set_pod_route(ip, idx),
        |ip| dp.del_pod_route(ip),
        Item::PodRoute,
    )
    .await;
    Ok(rep)
}

/// Makes the kernel's routes to remote blocks (and the tunnel devices with
/// the VXLAN device's entries) `want`:
/// 1. each device `devices` wants is made (or kept) and brought up first,
///    so the first packet through a new route finds it;
/// 2. the VXLAN device's neighbour and FDB entries to add, then the
///    routes, then the entries to remove, never one a route the kernel
///    keeps goes through; a route through a device that is not up is left
///    for a later pass (what the kernel routes that block through now
///    stays), and the routes to `holds.keep` (blocks that exist but cannot
///    be routed as wanted now) are never removed;
/// 3. a device to retire goes last, and only once no route uses it but
///    those to `holds.expendable` (blocks of pools being deleted).
pub async fn remote<D: Dataplane>(
    dp: &D,
    devices: &Devices,
    want: &Remote,
    holds: &Holds,
    removals: Removals,
) -> Result<Report> {
    let have = dp.list_remote().await?;
    let mut rep = Report::default();
    let mut usable = have.devices;
    for t in Tunnel::ALL {
        let made = match (t, devices) {
            (
                Tunnel::Vxlan,
                Devices {
                    vxlan: DevicePlan::Want(l),
                    ..
                },
            ) => dp.ensure_vxlan(l).await,
            (
                Tunnel::Ipip,
                Devices {
                    ipip: DevicePlan::Want(l),
                    ..
                },
            ) => dp.ensure_ipip(l).await,
            _ => continue,
        };
        match made {
            Ok(()) => {
                rep.changed += usize::from(!have.devices.get(t));
                *usable.get_mut(t) = true;
                *rep.ready.get_mut(t) = true;
            }
            Err(e) => rep.fail(Item::Device(t), Op::Set, e),
        }
    }
    // VXLAN entries are added before the routes that need them and removed
    // after the routes that went through them changed (make before break).
    let (mut neigh, mut fdb) = (Delta::default(), Delta::default());
    if usable.vxlan {
        neigh = Delta::between(&want.neigh, &have.state.neigh, removals);
        fdb = Delta::between(&want.fdb, &have.state.fdb, removals);
        let neigh_adds = Delta {
            set: std::mem::take(&mut neigh.set),
            remove: Vec::new(),
        };
        let fdb_adds = Delta {
            set: std::mem::take(&mut fdb.set),
            remove: Vec::new(),
        };
        carry_vxlan(&mut rep, dp, neigh_adds, fdb_adds).await;
    }
    let mut routes = Delta::between(&want.routes, &have.state.routes, removals);
    routes.remove.retain(|n| !holds.keep.contains(n));
    routes
        .set
        .retain(|(_, via)| via.tunnel().is_none_or(|t| *usable.get(t)));
    if removals == Removals::Allowed {
        routes.remove.extend(
            have.odd
                .iter()
                .filter(|n| !want.routes.contains_key(n))
                .copied(),
        );
    }
    // What the kernel routes once this is carried out (a failed item stays
    // as it was): a device still in use there is not retired.
    let mut after = have.state.routes.clone();
    for (n, via) in &routes.set {
        after.insert(*n, *via);
    }
    for n in &routes.remove {
        after.remove(n);
    }
    let r = routes
        .apply(
            |n, via| dp.set_remote_route(n, via),
            |n| dp.del_remote_route(n),
        )
        .await;
    for f in &r.failed {
        match have.state.routes.get(&f.key) {
            Some(v) => after.insert(f.key, *v),
            None => after.remove(&f.key),
        };
    }
    rep.absorb(r, Item::RemoteRoute);
    if usable.vxlan {
        // Never an entry a route still goes through (a kept block's, one
        // whose change failed): without it the route stays but leads
        // nowhere (a pool switched from VXLAN to IPIP lost ~2 s on every
        // pair, from the moment the other node stopped announcing its VTEP
        // to the moment it announced tunl0).
        let (used_neigh, used_fdb) = vxlan_entries_used(&after, &have.state, want);
        neigh.remove.retain(|ip| !used_neigh.contains(ip));
        fdb.remove.retain(|mac| !used_fdb.contains(mac));
        carry_vxlan(&mut rep, dp, neigh, fdb).await;
    }
    let in_use: Vec<Option<Tunnel>> = after
        .iter()
        .filter(|(n, _)| !holds.expendable.contains(n))
        .map(|(_, v)| v.tunnel())
        .collect();
    for t in Tunnel::ALL {
        if !devices.retires(t) || in_use.contains(&Some(t)) {
            continue;
        }
        let gone = match (t, devices.ipip) {
            (Tunnel::Vxlan, _) if !have.devices.vxlan => Ok(false),
            (Tunnel::Vxlan, _) => dp.del_vxlan().await.map(|()| true),
            (Tunnel::Ipip, DevicePlan::Retire(ip)) => dp.retire_ipip(ip).await.map(|()| true),
            (Tunnel::Ipip, _) => continue,
        };
        match gone {
            Ok(changed) => {
                rep.changed += usize::from(changed);
                *rep.retired.get_mut(t) = true;
            }
            Err(e) => rep.fail(Item::Device(t), Op::Remove, e),
        }
    }
    Ok(rep)
}

/// Carries out VXLAN neighbour and FDB deltas, neighbours first.
async fn carry_vxlan<D: Dataplane>(
    rep: &mut Report,
    dp: &D,
    neigh: Delta<Ipv4Addr, [u8; 6]>,
    fdb: Delta<[u8; 6], Ipv4Addr>,
) {
    rep.carry(
        neigh,
        |ip, mac| dp.set_neigh(ip, mac),
        |ip| dp.del_neigh(ip),
        Item::Neighbour,
    )
    .await;
    rep.carry(
        fdb,
        |mac, ip| dp.set_fdb(mac, ip),
        |mac| dp.del_fdb(mac),
        Item::Fdb,
    )
    .await;
}

/// The VXLAN device's entries that `routes` (what the kernel routes once
/// a sync is carried out) go through: their tunnel addresses' neighbour
/// entries, and the FDB entries of those entries' MACs (as the kernel has
/// them, or as wanted).
fn vxlan_entries_used(
    routes: &BTreeMap<IpNetwork, Via>,
    have: &Remote,
    want: &Remote,
) -> (BTreeSet<Ipv4Addr>, BTreeSet<[u8; 6]>) {
    let neigh: BTreeSet<Ipv4Addr> = routes
        .values()
        .filter_map(|v| match v {
            Via::Vxlan(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    let fdb = neigh
        .iter()
        .flat_map(|ip| [have.neigh.get(ip), want.neigh.get(ip)])
        .flatten()
        .copied()
        .collect();
    (neigh, fdb)
}

/// Makes the kernel's tunnel filter what `plan` asks of it (see
/// [`FilterPlan::against`]: node addresses removed only when `plan` allows
/// it, a tunnel's rules as they are where `plan` does not say): the whole
/// table loaded again when it differs, else left alone. What the kernel
/// has afterwards (`None`: no table, none needed).
pub async fn tunnel_filter<D: Dataplane>(
    dp: &D,
    plan: &FilterPlan,
) -> Result<Option<TunnelFilter>> {
    let have = dp.tunnel_filter().await?;
    let want = plan.against(have.as_ref());
    if let Some(w) = &want
        && have.as_ref() != Some(w)
    {
        dp.load_tunnel_filter(w).await?;
        tracing::info!(
            nodes = w.nodes.len(),
            vxlan = w.guard.vxlan,
            ipip = w.guard.ipip,
            "tunnel filter loaded"
        );
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FakeDataplane, LocalIpip, LocalVtep, fake::Fault};

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn native(s: &str) -> Via {
        Via::Native(s.parse().unwrap())
    }

    /// One sync with nothing kept; the listing must succeed.
    async fn go(dp: &FakeDataplane, d: &Devices, want: &Remote, removals: Removals) -> Report {
        remote(dp, d, want, &Holds::default(), removals)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_refused_route_does_not_stop_the_others() {
        let dp = FakeDataplane::default();
        dp.inject(Fault::RemoteRoute(net("10.244.2.0/26")));
        let mut want = Remote::default();
        for (b, n) in [
            ("10.244.1.0/26", "10.0.0.2"),
            ("10.244.2.0/26", "10.0.0.3"),
            ("10.244.3.0/26", "10.0.0.4"),
        ] {
            want.routes.insert(net(b), native(n));
        }
        let r = go(&dp, &Devices::default(), &want, Removals::Allowed).await;
        assert_eq!(r.changed, 2);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].item, Item::RemoteRoute(net("10.244.2.0/26")));
        assert!(
            r.failed[0]
                .to_string()
                .contains("installing route to 10.244.2.0/26")
        );
        let got = dp.remote_routes();
        assert!(got.contains_key(&net("10.244.1.0/26")) && got.contains_key(&net("10.244.3.0/26")));
        // The next pass retries only what still differs.
        dp.clear();
        let r = go(&dp, &Devices::default(), &want, Removals::Allowed).await;
        assert_eq!((r.changed, r.failed.len()), (1, 0));
        assert_eq!(dp.remote_routes(), want.routes);
    }

    #[tokio::test]
    async fn forbidden_removals_remove_nothing_and_a_failed_listing_changes_nothing() {
        let dp = FakeDataplane::default();
        let mut want = Remote::default();
        want.routes.insert(net("10.244.1.0/26"), native("10.0.0.2"));
        go(&dp, &Devices::default(), &want, Removals::Allowed).await;
        let empty = Remote::default();
        let r = go(&dp, &Devices::default(), &empty, Removals::Forbidden).await;
        assert_eq!(r.changed, 0);
        assert_eq!(dp.remote_routes().len(), 1, "kept: removals forbidden");
        dp.inject(Fault::Lists);
        assert!(
            remote(
                &dp,
                &Devices::default(),
                &empty,
                &Holds::default(),
                Removals::Allowed
            )
            .await
            .is_err()
        );
        assert_eq!(dp.remote_routes().len(), 1, "kept: nothing could be read");
        dp.clear();
        go(&dp, &Devices::default(), &empty, Removals::Allowed).await;
        assert!(dp.remote_routes().is_empty());
    }

    #[tokio::test]
    async fn vxlan_device_entries_then_routes_and_the_device_goes_last() {
        let dp = FakeDataplane::default();
        let mac = [0x66, 0, 0, 0, 0, 2];
        let tip: Ipv4Addr = "10.244.1.0".parse().unwrap();
        let mut want = Remote::default();
        want.routes.insert(net("10.244.1.0/26"), Via::Vxlan(tip));
        want.neigh.insert(tip, mac);
        want.fdb.insert(mac, "10.0.0.2".parse().unwrap());
        let local = LocalVtep {
            mac: [0x66, 0, 0, 0, 0, 1],
            tunnel_ip: "10.244.0.0".parse().unwrap(),
            underlay: "10.0.0.1".parse().unwrap(),
            mtu: 1450,
        };
        let with = |d: DevicePlan<LocalVtep>| Devices {
            vxlan: d,
            ..Default::default()
        };
        let (up, retire) = (
            with(DevicePlan::Want(local)),
            with(DevicePlan::Retire(None)),
        );
        // The device cannot be made: reported, and its route waits.
        dp.inject(Fault::Vxlan);
        let r = go(&dp, &up, &want, Removals::Allowed).await;
        assert!(
            r.failed
                .iter()
                .any(|f| f.item == Item::Device(Tunnel::Vxlan))
        );
        assert!(!r.ready.vxlan && dp.remote_routes().is_empty());
        dp.clear();
        let r = go(&dp, &up, &want, Removals::Allowed).await;
        assert!(r.failed.is_empty() && r.ready.vxlan, "{:?}", r.failed);
        assert_eq!(dp.remote.lock().unwrap().state, want);
        // Retiring waits while a route uses it, and for removals.
        go(&dp, &retire, &want, Removals::Allowed).await;
        assert!(dp.remote.lock().unwrap().vxlan.is_some());
        let empty = Remote::default();
        go(&dp, &retire, &empty, Removals::Forbidden).await;
        assert!(dp.remote.lock().unwrap().vxlan.is_some());
        let r = go(&dp, &retire, &empty, Removals::Allowed).await;
        assert!(r.retired.vxlan);
        let r = dp.remote.lock().unwrap().clone();
        assert!(r.vxlan.is_none() && r.state == Remote::default());
    }

    #[tokio::test]
    async fn a_kept_vxlan_route_keeps_its_neighbour_and_fdb_entries() {
        // A pool switched from VXLAN to IPIP: the other node no longer
        // announces its VTEP and not yet tunl0, so its block is kept; the
        // entries its route goes through stay, the others' go.
        let dp = FakeDataplane::default();
        let (kept, gone) = (net("10.244.1.0/26"), net("10.244.2.0/26"));
        let (mac1, mac2) = ([0x66, 0, 0, 0, 0, 1], [0x66, 0, 0, 0, 0, 2]);
        let (tip1, tip2): (Ipv4Addr, Ipv4Addr) =
            ("10.244.1.9".parse().unwrap(), "10.244.2.9".parse().unwrap());
        let mut want = Remote::default();
        want.routes.insert(kept, Via::Vxlan(tip1));
        want.routes.insert(gone, Via::Vxlan(tip2));
        want.neigh.insert(tip1, mac1);
        want.neigh.insert(tip2, mac2);
        want.fdb.insert(mac1, "10.0.0.2".parse().unwrap());
        want.fdb.insert(mac2, "10.0.0.3".parse().unwrap());
        let up = Devices {
            vxlan: DevicePlan::Want(LocalVtep {
                mac: [0x66, 0, 0, 0, 0, 9],
                tunnel_ip: "10.244.0.9".parse().unwrap(),
                underlay: "10.0.0.1".parse().unwrap(),
                mtu: 1450,
            }),
            ..Default::default()
        };
        go(&dp, &up, &want, Removals::Allowed).await;
        let holds = Holds {
            keep: [kept].into(),
            ..Default::default()
        };
        let r = remote(&dp, &up, &Remote::default(), &holds, Removals::Allowed)
            .await
            .unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let have = dp.remote.lock().unwrap().state.clone();
        assert_eq!(have.routes, [(kept, Via::Vxlan(tip1))].into());
        assert_eq!(have.neigh, [(tip1, mac1)].into());
        assert_eq!(have.fdb, [(mac1, "10.0.0.2".parse().unwrap())].into());
        // Switched to IPIP, but the kernel refuses the new route: the old
        // one stays, and so do the entries it goes through.
        let mut ipip = Remote::default();
        let node: Ipv4Addr = "10.0.0.2".parse().unwrap();
        ipip.routes.insert(kept, Via::Ipip(node));
        let both = Devices {
            ipip: DevicePlan::Want(LocalIpip {
                tunnel_ip: "10.244.0.8".parse().unwrap(),
                mtu: 1480,
            }),
            ..up
        };
        dp.inject(Fault::RemoteRoute(kept));
        let r = go(&dp, &both, &ipip, Removals::Allowed).await;
        assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
        assert_eq!(dp.remote.lock().unwrap().state, have);
        // Once it takes the new route, they go.
        dp.clear();
        let r = go(&dp, &both, &ipip, Removals::Allowed).await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(dp.remote.lock().unwrap().state, ipip);
    }

    #[tokio::test]
    async fn ipip_replaces_a_route_only_once_tunl0_is_up_and_retires_when_unused() {
        let dp = FakeDataplane::default();
        let block = net("10.244.1.0/26");
        let node: Ipv4Addr = "10.0.0.2".parse().unwrap();
        dp.set_remote_route(block, Via::Native(node.into()))
            .await
            .unwrap();
        let mut want = Remote::default();
        want.routes.insert(block, Via::Ipip(node));
        let local = LocalIpip {
            tunnel_ip: "10.244.0.1".parse().unwrap(),
            mtu: 1480,
        };
        let with = |d: DevicePlan<LocalIpip>| Devices {
            ipip: d,
            ..Default::default()
        };
        let up = with(DevicePlan::Want(local));
        // A kernel without IPIP: said why, and the block keeps its route.
        dp.inject(Fault::Ipip);
        let r = go(&dp, &up, &want, Removals::Allowed).await;
        let why = r.failed[0].to_string();
        assert!(
            why.contains("IPIP device tunl0") && why.contains("cannot do IPIP"),
            "{why}"
        );
        assert_eq!(dp.remote_routes()[&block], Via::Native(node.into()));
        dp.clear();
        let r = go(&dp, &up, &want, Removals::Allowed).await;
        assert!(r.failed.is_empty() && r.ready.ipip, "{:?}", r.failed);
        assert_eq!(dp.remote_routes()[&block], Via::Ipip(node));
        // The block cannot be routed as wanted now (kept): neither its
        // route nor tunl0 goes.
        let keep = Holds {
            keep: [block].into(),
            ..Default::default()
        };
        let empty = Remote::default();
        let retire = with(DevicePlan::Retire(Some(local.tunnel_ip)));
        let r = remote(&dp, &retire, &empty, &keep, Removals::Allowed)
            .await
            .unwrap();
        assert!(!r.retired.ipip);
        assert_eq!(dp.remote_routes()[&block], Via::Ipip(node));
        // A route to a block of a pool being deleted holds nothing back.
        let expendable = Holds {
            expendable: [block].into(),
            ..Default::default()
        };
        let r = remote(&dp, &retire, &want, &expendable, Removals::Allowed)
            .await
            .unwrap();
        assert!(r.retired.ipip);
        assert!(dp.remote.lock().unwrap().ipip.is_none());
        // tunl0 up again for the rest of this test.
        go(&dp, &up, &want, Removals::Allowed).await;
        let r = go(&dp, &retire, &empty, Removals::Allowed).await;
        assert!(r.retired.ipip && r.failed.is_empty());
        assert!(dp.remote_routes().is_empty());
        assert!(dp.remote.lock().unwrap().ipip.is_none());
    }

    #[tokio::test]
    async fn blackholes_and_pod_routes() {
        let dp = FakeDataplane::default();
        dp.set_blackhole(net("10.9.0.0/26"), true).await.unwrap();
        dp.inject(Fault::Blackhole(net("10.0.0.64/26")));
        let want: BTreeSet<_> = [net("10.0.0.0/26"), net("10.0.0.64/26")].into();
        let r = blackholes(&dp, &want, Removals::Allowed).await.unwrap();
        assert_eq!((r.changed, r.failed.len()), (2, 1));
        assert_eq!(
            *dp.blackholes.lock().unwrap(),
            [net("10.0.0.0/26")].into_iter().collect::<BTreeSet<_>>()
        );
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let want: BTreeMap<IpAddr, u32> = [(ip, 7)].into();
        pod_routes(&dp, &want, Removals::Allowed).await.unwrap();
        assert_eq!(*dp.pod_routes.lock().unwrap(), want);
    }
}
