//! The RIB: Adj-RIB-In, the decision process (RFC 4271 §9.1), Loc-RIB with
//! equal-cost multipath, route reflection (RFC 4456) and export policy.
//!
//! Pure data structure: the speaker feeds it what peers announced and
//! withdrew and receives the prefixes whose best path set changed; it then
//! asks [`Rib::export`] what (if anything) each peer should be told. Paths
//! share their attributes through `Arc`, so a 100k-prefix UPDATE stream
//! costs one attribute set per distinct path, not per prefix.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::packet::{Attrs, Origin, Prefix, Update};
use crate::prefix_map::PrefixMap;

/// Index of a peer in the speaker; [`LOCAL`] is the speaker itself.
pub type PeerId = u32;
/// The speaker's own (originated) routes.
pub const LOCAL: PeerId = 0;
/// LOCAL_PREF assumed when none is present.
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// What the RIB needs to know about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Peer address (tie-breaker, RFC 4271 §9.1.2.2 g).
    pub addr: IpAddr,
    /// Peer AS.
    pub asn: u32,
    /// Peer BGP identifier.
    pub router_id: Ipv4Addr,
    /// Same AS as ours.
    pub ibgp: bool,
    /// We reflect routes for it (RFC 4456).
    pub rr_client: bool,
}

/// One path to a prefix (16 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Its attributes.
    pub attrs: Arc<Attrs>,
    /// Who announced it.
    pub peer: PeerId,
    /// Kept across the peer's restart, waiting for refresh (RFC 4724).
    pub stale: bool,
}

/// Best routes learned from peers (locally originated ones left out):
/// prefix → next hops. What an embedding program (the agent) programs
/// into the kernel itself when `fib` is off.
pub type LearnedRoutes = std::collections::BTreeMap<Prefix, NextHops>;

/// Next hops of an equal-cost set; one or two fit inline.
pub type NextHops = SmallVec<[IpAddr; 2]>;

/// The equal-cost set of a destination, as last reported.
type BestSet = SmallVec<[Path; 2]>;

/// All paths to one prefix; `paths[0]` is the best when non-empty. The
/// common case, one path, needs no allocation beyond the map slot.
/// (24 bytes: at 100k+ prefixes the RIB is mostly these.)
#[derive(Debug, Clone, Default)]
struct Dest {
    paths: SmallVec<[Path; 1]>,
}

impl Dest {
    /// Number of leading paths equal-cost with the best (derived, not
    /// stored: it depends only on the sorted paths and the peers).
    fn multipath(&self, peers: &HashMap<PeerId, PeerInfo>) -> usize {
        match self.paths.first() {
            Some(best) => self
                .paths
                .iter()
                .take_while(|p| equal_cost(peers, best, p))
                .count()
                .max(1),
            None => 0,
        }
    }

    fn best_set(&self, peers: &HashMap<PeerId, PeerInfo>) -> BestSet {
        self.paths[..self.multipath(peers)]
            .iter()
            .cloned()
            .collect()
    }
}

/// The best path and its equal-cost siblings, as changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Best {
    /// The best path.
    pub best: Path,
    /// Next hops of all equal-cost paths (best first), for the kernel.
    pub next_hops: NextHops,
}

/// Import policy applied to everything peers announce.
#[derive(Debug, Clone, Default)]
pub struct ImportFilter {
    /// Accept only prefixes inside one of these (empty: accept all).
    pub allowed: Vec<Prefix>,
}

impl ImportFilter {
    fn accepts(&self, p: &Prefix) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|a| a.contains(p))
    }
}

/// The RIB.
#[derive(Debug)]
pub struct Rib {
    local_as: u32,
    router_id: Ipv4Addr,
    cluster_id: Ipv4Addr,
    peers: HashMap<PeerId, PeerInfo>,
    table: PrefixMap<Dest>,
    counts: HashMap<PeerId, usize>,
    import: ImportFilter,
}

/// Result of feeding announcements or withdrawals.
pub type Changes = Vec<(Prefix, Option<Best>)>;

impl Rib {
    /// An empty RIB. `cluster_id` defaults to the router id when reflecting.
    pub fn new(local_as: u32, router_id: Ipv4Addr, cluster_id: Option<Ipv4Addr>) -> Self {
        Self {
            local_as,
            router_id,
            cluster_id: cluster_id.unwrap_or(router_id),
            peers: HashMap::new(),
            table: PrefixMap::default(),
            counts: HashMap::new(),
            import: ImportFilter::default(),
        }
    }

    /// Sets the import policy (applies to later announcements).
    pub fn set_import_filter(&mut self, p: ImportFilter) {
        self.import = p;
    }

    /// Registers (or updates) a peer once its session is up.
    pub fn add_peer(&mut self, id: PeerId, info: PeerInfo) {
        self.peers.insert(id, info);
    }

    /// Number of prefixes the peer has in the Adj-RIB-In.
    pub fn prefix_count(&self, id: PeerId) -> usize {
        self.counts.get(&id).copied().unwrap_or(0)
    }

    /// Number of prefixes with at least one path.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when the RIB has no prefixes.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Why an announcement is rejected on import, if it is.
    fn reject(&self, peer: PeerId, prefix: &Prefix, a: &Attrs) -> bool {
        if peer == LOCAL {
            return false;
        }
        let Some(info) = self.peers.get(&peer) else {
            return true;
        };
        !self.import.accepts(prefix)
            || (!info.ibgp && a.as_path.contains(self.local_as))
            || a.originator_id == Some(self.router_id)
            || a.cluster_list.contains(&self.cluster_id)
    }

    /// Applies one UPDATE from peer `id` (AS `peer_as`, iBGP or not): its
    /// classic and multiprotocol announcements and withdrawals. From an
    /// eBGP peer the AS path must start with its AS (RFC 4271 §6.3), or
    /// the routes are treated as withdrawn (RFC 7606), as is an UPDATE
    /// without usable attributes. Returns the prefixes whose best path set
    /// changed.
    pub fn apply_update(&mut self, id: PeerId, u: Update, ibgp: bool, peer_as: u32) -> Changes {
        let attrs = u
            .attrs
            .filter(|a| ibgp || a.as_path.first_as() == Some(peer_as))
            .map(Arc::new);
        let mut changes = Vec::new();
        let (announce, mut withdraw) = match &attrs {
            Some(_) => (u.nlri, u.withdrawn),
            None => (Vec::new(), [u.withdrawn, u.nlri].concat()),
        };
        if let Some(mp) = &u.mp_reach
            && attrs.is_none()
        {
            withdraw.extend(mp.nlri.iter().copied());
        }
        changes.extend(self.update(id, &announce, attrs.clone(), &withdraw));
        if let Some(mp) = u.mp_unreach {
            changes.extend(self.update(id, &[], None, &mp.withdrawn));
        }
        if let (Some(mp), Some(a)) = (u.mp_reach, &attrs) {
            let mut a6 = (**a).clone();
            a6.next_hop = mp.next_hop.first().copied();
            changes.extend(self.update(id, &mp.nlri, Some(Arc::new(a6)), &[]));
        }
        changes
    }

    /// Applies a peer's announcements and withdrawals; returns the prefixes
    /// whose best path set changed.
    pub fn update(
        &mut self,
        peer: PeerId,
        announce: &[Prefix],
        attrs: Option<Arc<Attrs>>,
        withdraw: &[Prefix],
    ) -> Changes {
        let mut changes = Vec::new();
        for p in withdraw {
            if let Some(c) = self.remove_path(peer, p) {
                changes.push(c);
            }
        }
        if let Some(attrs) = attrs {
            for p in announce {
                let c = if self.reject(peer, p, &attrs) {
                    // An update that fails import replaces (so withdraws) the old path.
                    self.remove_path(peer, p)
                } else {
                    self.insert_path(
                        *p,
                        Path {
                            peer,
                            attrs: attrs.clone(),
                            stale: false,
                        },
                    )
                };
                if let Some(c) = c {
                    changes.push(c);
                }
            }
        }
        changes
    }

    /// Originates (or replaces) a local route.
    pub fn originate(&mut self, prefix: Prefix, attrs: Attrs) -> Changes {
        self.update(LOCAL, &[prefix], Some(Arc::new(attrs)), &[])
    }

    /// Withdraws a local route.
    pub fn withdraw_local(&mut self, prefix: Prefix) -> Changes {
        self.update(LOCAL, &[], None, &[prefix])
    }

    /// The peer's session went down: drop its paths, or with graceful
    /// restart keep them marked stale.
    pub fn peer_down(&mut self, peer: PeerId, keep_stale: bool) -> Changes {
        if keep_stale {
            for d in self.table.values_mut() {
                for p in d.paths.iter_mut().filter(|p| p.peer == peer) {
                    p.stale = true;
                }
            }
            return Vec::new();
        }
        self.peers.remove(&peer);
        self.remove_where(|_, p| p.peer == peer)
    }

    /// End-of-RIB (or the restart timer): drop the peer's paths still stale
    /// in one family.
    pub fn flush_stale(&mut self, peer: PeerId, v6: bool) -> Changes {
        self.remove_where(|pfx, p| p.peer == peer && p.stale && pfx.is_v4() != v6)
    }

    /// The current best path set of a prefix.
    pub fn best(&self, prefix: &Prefix) -> Option<Best> {
        self.table.get(prefix).and_then(|d| self.best_of(d))
    }

    /// Every prefix with its best path set (for a new peer's initial dump
    /// and for status output).
    pub fn iter_best(&self) -> impl Iterator<Item = (Prefix, Best)> + '_ {
        self.table
            .iter()
            .filter_map(|(p, d)| self.best_of(d).map(|b| (p, b)))
    }

    /// All paths of a prefix, best first.
    pub fn paths(&self, prefix: &Prefix) -> &[Path] {
        self.table.get(prefix).map(|d| &d.paths[..]).unwrap_or(&[])
    }

    fn remove_where(&mut self, f: impl Fn(&Prefix, &Path) -> bool) -> Changes {
        let affected: Vec<Prefix> = self
            .table
            .iter()
            .filter(|(pfx, d)| d.paths.iter().any(|p| f(pfx, p)))
            .map(|(p, _)| p)
            .collect();
        let mut changes = Vec::new();
        for pfx in affected {
            let d = self.table.get_mut(&pfx).expect("present");
            let before = d.best_set(&self.peers);
            let mut removed = Vec::new();
            d.paths.retain(|p| {
                let gone = f(&pfx, p);
                if gone {
                    removed.push(p.peer);
                }
                !gone
            });
            for peer in removed {
                *self.counts.entry(peer).or_default() -= 1;
            }
            changes.extend(self.reselect(pfx, before));
        }
        changes
    }

    fn insert_path(&mut self, prefix: Prefix, path: Path) -> Option<(Prefix, Option<Best>)> {
        let d = self.table.get_or_default(prefix);
        let before = d.best_set(&self.peers);
        match d.paths.iter_mut().find(|p| p.peer == path.peer) {
            Some(old) if *old == path => return None,
            Some(old) => *old = path,
            None => {
                *self.counts.entry(path.peer).or_default() += 1;
                d.paths.push(path);
            }
        }
        self.reselect(prefix, before)
    }

    fn remove_path(&mut self, peer: PeerId, prefix: &Prefix) -> Option<(Prefix, Option<Best>)> {
        let d = self.table.get_mut(prefix)?;
        let i = d.paths.iter().position(|p| p.peer == peer)?;
        let before = d.best_set(&self.peers);
        d.paths.remove(i);
        *self.counts.entry(peer).or_default() -= 1;
        self.reselect(*prefix, before)
    }

    /// Re-sorts a destination; returns the change if its equal-cost set
    /// differs from `before`.
    fn reselect(&mut self, prefix: Prefix, before: BestSet) -> Option<(Prefix, Option<Best>)> {
        let peers = &self.peers;
        let d = self.table.get_mut(&prefix)?;
        if d.paths.len() > 1 {
            d.paths.sort_by(|a, b| compare(peers, a, b));
        }
        if d.paths.is_empty() {
            self.table.remove(&prefix);
            return (!before.is_empty()).then_some((prefix, None));
        }
        if d.paths[..d.multipath(peers)] == before[..] {
            return None;
        }
        let d = self.table.get(&prefix).expect("present");
        Some((prefix, self.best_of(d)))
    }

    fn best_of(&self, d: &Dest) -> Option<Best> {
        let best = d.paths.first()?.clone();
        let mut next_hops = NextHops::new();
        for p in &d.paths[..d.multipath(&self.peers)] {
            if let Some(nh) = p.attrs.next_hop
                && !next_hops.contains(&nh)
            {
                next_hops.push(nh);
            }
        }
        Some(Best { best, next_hops })
    }

    /// What to advertise to `to` for a prefix whose best path is `best`:
    /// the attributes to send, or `None` to withdraw / not advertise.
    /// `next_hop_self` is our address on that session.
    pub fn export(
        &self,
        to: &PeerInfo,
        to_id: PeerId,
        best: Option<&Path>,
        next_hop_self: Option<IpAddr>,
        force_next_hop_self: bool,
        communities: &[u32],
    ) -> Option<Attrs> {
        let best = best?;
        if best.peer == to_id {
            return None; // never back to the source
        }
        let from = self.peers.get(&best.peer);
        let mut a = (*best.attrs).clone();
        match (from, to.ibgp) {
            // Locally originated.
            (None, _) if best.peer == LOCAL => {
                a.next_hop = next_hop_self;
                if to.ibgp {
                    a.local_pref.get_or_insert(DEFAULT_LOCAL_PREF);
                }
            }
            (None, _) => return None,
            // iBGP-learned to an iBGP peer: only as a route reflector.
            (Some(f), true) if f.ibgp => {
                if !(f.rr_client || to.rr_client) {
                    return None;
                }
                a.originator_id.get_or_insert(f.router_id);
                a.cluster_list.insert(0, self.cluster_id);
                if force_next_hop_self {
                    a.next_hop = next_hop_self;
                }
            }
            // eBGP-learned to an iBGP peer.
            (Some(_), true) => {
                a.local_pref.get_or_insert(DEFAULT_LOCAL_PREF);
                if force_next_hop_self {
                    a.next_hop = next_hop_self;
                }
            }
            // Anything to an eBGP peer.
            (Some(_), false) => {}
        }
        if !to.ibgp {
            a.as_path = a.as_path.prepend(self.local_as);
            a.next_hop = next_hop_self;
            a.local_pref = None;
            a.originator_id = None;
            a.cluster_list.clear();
            if best.peer != LOCAL {
                a.med = None; // MED is not passed between neighbouring ASes
            }
        }
        for c in communities {
            if !a.communities.contains(c) {
                a.communities.push(*c);
            }
        }
        Some(a)
    }
}

fn local_pref(p: &Path) -> u32 {
    if p.peer == LOCAL {
        return u32::MAX;
    }
    p.attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)
}

fn origin_rank(o: Origin) -> u8 {
    match o {
        Origin::Igp => 0,
        Origin::Egp => 1,
        Origin::Incomplete => 2,
    }
}

/// Steps a-d of §9.1.2.2 plus eBGP over iBGP: the part that decides
/// equal cost for multipath.
fn compare_cost(peers: &HashMap<PeerId, PeerInfo>, a: &Path, b: &Path) -> Ordering {
    let ebgp = |p: &Path| peers.get(&p.peer).map(|i| !i.ibgp).unwrap_or(true);
    local_pref(b)
        .cmp(&local_pref(a))
        .then(
            a.attrs
                .as_path
                .hop_count()
                .cmp(&b.attrs.as_path.hop_count()),
        )
        .then(origin_rank(a.attrs.origin).cmp(&origin_rank(b.attrs.origin)))
        .then_with(|| {
            // MED only between paths from the same neighbouring AS.
            if a.attrs.as_path.first_as() == b.attrs.as_path.first_as() {
                a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
            } else {
                Ordering::Equal
            }
        })
        .then(ebgp(b).cmp(&ebgp(a)))
        // Fresh paths over stale ones (RFC 4724 keeps stale ones as a fallback).
        .then(a.stale.cmp(&b.stale))
}

/// The full decision process (RFC 4271 §9.1.2.2, with RFC 4456 §9).
fn compare(peers: &HashMap<PeerId, PeerInfo>, a: &Path, b: &Path) -> Ordering {
    let id = |p: &Path| {
        p.attrs
            .originator_id
            .or_else(|| peers.get(&p.peer).map(|i| i.router_id))
            .map(u32::from)
            .unwrap_or(0)
    };
    let addr = |p: &Path| peers.get(&p.peer).map(|i| i.addr);
    compare_cost(peers, a, b)
        .then(id(a).cmp(&id(b)))
        .then(a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()))
        .then(addr(a).cmp(&addr(b)))
}

fn equal_cost(peers: &HashMap<PeerId, PeerInfo>, best: &Path, p: &Path) -> bool {
    compare_cost(peers, best, p) == Ordering::Equal
        && best.peer != LOCAL
        && p.attrs.as_path.hop_count() == best.attrs.as_path.hop_count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::AsPath;

    fn pfx(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn peer(n: u8, asn: u32) -> PeerInfo {
        PeerInfo {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            asn,
            router_id: Ipv4Addr::new(1, 1, 1, n),
            ibgp: asn == 64512,
            rr_client: false,
        }
    }

    fn attrs(nh: u8, path: Vec<u32>) -> Arc<Attrs> {
        Arc::new(Attrs {
            as_path: AsPath::sequence(path),
            next_hop: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, nh))),
            ..Default::default()
        })
    }

    /// [`attrs`], changed by `f`.
    fn attrs_with(nh: u8, path: Vec<u32>, f: impl FnOnce(&mut Attrs)) -> Arc<Attrs> {
        let mut a = (*attrs(nh, path)).clone();
        f(&mut a);
        Arc::new(a)
    }

    fn rib() -> Rib {
        let mut r = Rib::new(64512, Ipv4Addr::new(9, 9, 9, 9), None);
        for n in 1..=4 {
            r.add_peer(
                n as PeerId,
                peer(n, if n <= 2 { 64512 } else { 65000 + n as u32 }),
            );
        }
        r
    }

    /// The best path's peer for `p` once each of `paths` (a peer and its
    /// attributes) has announced it, in order.
    fn best_after(r: &mut Rib, p: Prefix, paths: [(PeerId, Arc<Attrs>); 2]) -> PeerId {
        for (peer, attrs) in paths {
            r.update(peer, &[p], Some(attrs), &[]);
        }
        r.best(&p).unwrap().best.peer
    }

    #[test]
    fn higher_local_pref_wins() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        let a = attrs_with(1, vec![], |a| a.local_pref = Some(200));
        r.update(2, &[p], Some(attrs(2, vec![])), &[]);
        let c = r.update(1, &[p], Some(a), &[]);
        assert_eq!(c[0].1.as_ref().unwrap().best.peer, 1);
    }

    #[test]
    fn shorter_as_path_then_lower_origin_then_med() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        let longer = attrs(3, vec![65003, 1, 2]);
        let shorter = attrs(4, vec![65004, 1]);
        assert_eq!(best_after(&mut r, p, [(3, longer), (4, shorter)]), 4);

        let igp = attrs_with(3, vec![65003, 1], |a| a.origin = Origin::Igp);
        let inc = attrs_with(4, vec![65004, 1], |a| a.origin = Origin::Incomplete);
        assert_eq!(best_after(&mut r, p, [(3, igp), (4, inc)]), 3);
    }

    #[test]
    fn med_compared_only_within_the_same_neighbour_as() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        let a = attrs_with(3, vec![65000, 7], |a| a.med = Some(50));
        let b = attrs_with(4, vec![65000, 8], |a| a.med = Some(10));
        assert_eq!(best_after(&mut r, p, [(3, a), (4, b)]), 4);
    }

    #[test]
    fn ebgp_over_ibgp_then_lowest_router_id() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        let (ibgp, ebgp) = (attrs(1, vec![65010]), attrs(3, vec![65010]));
        assert_eq!(best_after(&mut r, p, [(1, ibgp), (3, ebgp)]), 3);
        let q = pfx("10.244.2.0/26");
        let paths = [(2, attrs(2, vec![])), (1, attrs(1, vec![]))];
        assert_eq!(best_after(&mut r, q, paths), 1, "lower router id");
    }

    #[test]
    fn equal_paths_form_an_ecmp_set() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        r.update(1, &[p], Some(attrs(1, vec![])), &[]);
        let c = r.update(2, &[p], Some(attrs(2, vec![])), &[]);
        let b = c[0].1.as_ref().unwrap();
        assert_eq!(b.next_hops.len(), 2);
        let c = r.update(2, &[], None, &[p]);
        assert_eq!(c[0].1.as_ref().unwrap().next_hops.len(), 1);
        let c = r.update(1, &[], None, &[p]);
        assert_eq!(c, vec![(p, None)]);
        assert!(r.is_empty());
    }

    #[test]
    fn unchanged_announcement_reports_nothing() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        assert_eq!(r.update(1, &[p], Some(attrs(1, vec![])), &[]).len(), 1);
        assert!(r.update(1, &[p], Some(attrs(1, vec![])), &[]).is_empty());
        assert!(r.update(1, &[], None, &[pfx("10.0.0.0/8")]).is_empty());
    }

    #[test]
    fn import_filter_and_loop_detection() {
        let mut r = rib();
        r.set_import_filter(ImportFilter {
            allowed: vec![pfx("10.244.0.0/16")],
        });
        assert!(
            r.update(1, &[pfx("0.0.0.0/0")], Some(attrs(1, vec![])), &[])
                .is_empty()
        );
        assert!(
            r.update(
                3,
                &[pfx("10.244.9.0/26")],
                Some(attrs(3, vec![65003, 64512])),
                &[]
            )
            .is_empty()
        );
        let a = attrs_with(1, vec![], |a| {
            a.originator_id = Some(Ipv4Addr::new(9, 9, 9, 9))
        });
        assert!(
            r.update(1, &[pfx("10.244.9.0/26")], Some(a), &[])
                .is_empty()
        );
        assert_eq!(r.prefix_count(1), 0);
    }

    #[test]
    fn graceful_restart_keeps_stale_paths_until_flushed() {
        let mut r = rib();
        let (p, q) = (pfx("10.244.1.0/26"), pfx("10.244.2.0/26"));
        r.update(1, &[p, q], Some(attrs(1, vec![])), &[]);
        assert!(r.peer_down(1, true).is_empty());
        assert!(r.best(&p).unwrap().best.stale);
        // The peer comes back and re-announces only p.
        r.update(1, &[p], Some(attrs(1, vec![])), &[]);
        let c = r.flush_stale(1, false);
        assert_eq!(c, vec![(q, None)]);
        assert!(!r.best(&p).unwrap().best.stale);
    }

    #[test]
    fn reflection_rules() {
        let mut r = rib();
        let mut client = peer(1, 64512);
        client.rr_client = true;
        r.add_peer(1, client.clone());
        let nonclient = peer(2, 64512);
        let p = pfx("10.244.1.0/26");
        r.update(2, &[p], Some(attrs(2, vec![])), &[]);
        let best = r.best(&p).unwrap().best;
        // Non-client route goes to clients, with originator and cluster list.
        let a = r.export(&client, 1, Some(&best), None, false, &[]).unwrap();
        assert_eq!(a.originator_id, Some(Ipv4Addr::new(1, 1, 1, 2)));
        assert_eq!(a.cluster_list, vec![Ipv4Addr::new(9, 9, 9, 9)]);
        // ...but not to other non-clients, nor back to its source.
        let other = peer(5, 64512);
        assert!(r.export(&other, 5, Some(&best), None, false, &[]).is_none());
        assert!(
            r.export(&nonclient, 2, Some(&best), None, false, &[])
                .is_none()
        );
    }

    #[test]
    fn ebgp_export_prepends_and_sets_next_hop_self() {
        let mut r = rib();
        let p = pfx("10.244.1.0/26");
        r.originate(p, Attrs::default());
        let best = r.best(&p).unwrap().best;
        let me: IpAddr = "10.99.0.1".parse().unwrap();
        let a = r
            .export(&peer(3, 65003), 3, Some(&best), Some(me), false, &[100])
            .unwrap();
        assert_eq!(a.as_path.first_as(), Some(64512));
        assert_eq!(a.next_hop, Some(me));
        assert_eq!(a.local_pref, None);
        assert_eq!(a.communities, vec![100]);
        let i = r
            .export(&peer(1, 64512), 1, Some(&best), Some(me), false, &[])
            .unwrap();
        assert_eq!(i.as_path.hop_count(), 0);
        assert_eq!(i.local_pref, Some(100));
    }
}
