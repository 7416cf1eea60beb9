//! Reconciliation of each kernel table over [`Dataplane`]: list what the
//! kernel holds, diff it against what is desired with `margay-delta`, carry
//! out the difference item by item. One refused item is reported and the
//! others go on (it is retried on the next pass, when it still differs);
//! a listing that fails changes nothing; a desired table computed from an
//! Unknown input comes with [`Removals::Forbidden`] and removes nothing.
//!
//! This is the whole of the logic between "what the agent wants" and "what
//! the kernel has", shared by the real kernel and the fake, so unit tests
//! with [`super::FakeDataplane`] exercise exactly what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use margay_delta::{Delta, Op, Removals};

use super::{Dataplane, Error, LocalVtep, Remote, Result};

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
    /// The VXLAN device itself.
    VxlanDevice,
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Blackhole(n) => write!(f, "blackhole {n}"),
            Item::PodRoute(ip) => write!(f, "pod route {ip}"),
            Item::RemoteRoute(n) => write!(f, "route to {n}"),
            Item::Neighbour(ip) => write!(f, "VXLAN neighbour {ip}"),
            Item::Fdb(m) => write!(f, "VXLAN FDB entry {}", margay_api::stable::mac_string(m)),
            Item::VxlanDevice => f.write_str("the VXLAN device"),
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
    let r = Delta::between(want, &have, removals)
        .apply(
            |ip, idx| dp.set_pod_route(ip, idx),
            |ip| dp.del_pod_route(ip),
        )
        .await;
    rep.absorb(r, Item::PodRoute);
    Ok(rep)
}

/// Makes the kernel's routes to remote blocks (and the VXLAN device with
/// its entries) `want`. `local` is this node's VTEP, needed when `want`
/// uses VXLAN. The device goes only when nothing needs it and removals are
/// allowed.
pub async fn remote<D: Dataplane>(
    dp: &D,
    local: Option<&LocalVtep>,
    want: &Remote,
    removals: Removals,
) -> Result<Report> {
    let have = dp.list_remote().await?;
    let mut rep = Report::default();
    let mut device = have.vxlan;
    if want.needs_vxlan() {
        match local {
            None => rep.fail(
                Item::VxlanDevice,
                Op::Set,
                Error::Missing("this node's VXLAN endpoint (tunnel address)".into()),
            ),
            Some(l) => match dp.ensure_vxlan(l).await {
                Ok(()) => {
                    rep.changed += usize::from(!have.vxlan);
                    device = true;
                }
                Err(e) => rep.fail(Item::VxlanDevice, Op::Set, e),
            },
        }
    }
    // Entries before routes: the first packet through a new route finds its
    // neighbour and FDB entries in place.
    if device {
        rep.carry(
            Delta::between(&want.neigh, &have.state.neigh, removals),
            |ip, mac| dp.set_neigh(ip, mac),
            |ip| dp.del_neigh(ip),
            Item::Neighbour,
        )
        .await;
        rep.carry(
            Delta::between(&want.fdb, &have.state.fdb, removals),
            |mac, ip| dp.set_fdb(mac, ip),
            |mac| dp.del_fdb(mac),
            Item::Fdb,
        )
        .await;
    }
    let mut routes = Delta::between(&want.routes, &have.state.routes, removals);
    if removals == Removals::Allowed {
        routes.remove.extend(
            have.odd
                .iter()
                .filter(|n| !want.routes.contains_key(n))
                .copied(),
        );
    }
    let r = routes
        .apply(
            |n, via| dp.set_remote_route(n, via),
            |n| dp.del_remote_route(n),
        )
        .await;
    rep.absorb(r, Item::RemoteRoute);
    if have.vxlan && !want.needs_vxlan() && removals == Removals::Allowed {
        match dp.del_vxlan().await {
            Ok(()) => rep.changed += 1,
            Err(e) => rep.fail(Item::VxlanDevice, Op::Remove, e),
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FakeDataplane, Via, fake::Fault};

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn native(s: &str) -> Via {
        Via::Native(s.parse().unwrap())
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
        let r = remote(&dp, None, &want, Removals::Allowed).await.unwrap();
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
        let r = remote(&dp, None, &want, Removals::Allowed).await.unwrap();
        assert_eq!((r.changed, r.failed.len()), (1, 0));
        assert_eq!(dp.remote_routes(), want.routes);
    }

    #[tokio::test]
    async fn forbidden_removals_remove_nothing_and_a_failed_listing_changes_nothing() {
        let dp = FakeDataplane::default();
        let mut want = Remote::default();
        want.routes.insert(net("10.244.1.0/26"), native("10.0.0.2"));
        remote(&dp, None, &want, Removals::Allowed).await.unwrap();
        let empty = Remote::default();
        let r = remote(&dp, None, &empty, Removals::Forbidden)
            .await
            .unwrap();
        assert_eq!(r.changed, 0);
        assert_eq!(dp.remote_routes().len(), 1, "kept: removals forbidden");
        dp.inject(Fault::Lists);
        assert!(remote(&dp, None, &empty, Removals::Allowed).await.is_err());
        assert_eq!(dp.remote_routes().len(), 1, "kept: nothing could be read");
        dp.clear();
        remote(&dp, None, &empty, Removals::Allowed).await.unwrap();
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
        // Without this node's VTEP the device cannot be made: reported, and
        // the VXLAN route fails alone.
        let r = remote(&dp, None, &want, Removals::Allowed).await.unwrap();
        assert!(r.failed.iter().any(|f| f.item == Item::VxlanDevice));
        let local = LocalVtep {
            mac: [0x66, 0, 0, 0, 0, 1],
            tunnel_ip: "10.244.0.0".parse().unwrap(),
            underlay: "10.0.0.1".parse().unwrap(),
            mtu: 1450,
        };
        let r = remote(&dp, Some(&local), &want, Removals::Allowed)
            .await
            .unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(dp.remote.lock().unwrap().state, want);
        remote(&dp, Some(&local), &Remote::default(), Removals::Forbidden)
            .await
            .unwrap();
        assert!(dp.remote.lock().unwrap().vxlan.is_some());
        remote(&dp, Some(&local), &Remote::default(), Removals::Allowed)
            .await
            .unwrap();
        let r = dp.remote.lock().unwrap().clone();
        assert!(r.vxlan.is_none() && r.state == Remote::default());
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
