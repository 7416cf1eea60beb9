//! Update groups: the peers that are exported the same routes with the
//! same attributes (same kind of session, same local address, same
//! export options, same families) share one Adj-RIB-Out, so a route
//! reflector's memory grows with its routes, not with clients × routes,
//! and each route is exported (its attributes computed) once per group,
//! not once per peer.
//!
//! A member is told the group's table except where it differs from it:
//! the routes it is the source of (never sent back to it) and routes whose
//! UPDATE could not be encoded for its session. Those are its `held`
//! prefixes, at most its own routes, kept per member. Everything here is
//! pure: the RIB task asks [`Group::apply`] what changed for the group and
//! [`Member::fan_out`] what that means for one member, encodes each
//! distinct UPDATE once per export into one buffer ([`Encoded`]) and
//! queues each member one [`Wire`] of its picks of that buffer.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use margay_delta::Change;

use crate::packet::{Attrs, Ctx, Prefix, UpdateBuilder};
use crate::peer::Wire;
use crate::prefix_map::PrefixMap;
use crate::rib::{PeerId, PeerInfo};

/// What makes two peers' exports identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// iBGP (same AS) or eBGP.
    pub ibgp: bool,
    /// A route reflector client.
    pub rr_client: bool,
    /// Our address on the session (the next hop we set).
    pub local: IpAddr,
    /// Next hop set to ourselves for reflected routes too.
    pub next_hop_self: bool,
    /// Only our own routes are exported.
    pub export_local_only: bool,
    /// The families negotiated, sorted.
    pub families: Vec<(u16, u8)>,
}

/// One prefix's outcome for a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The prefix.
    pub prefix: Prefix,
    /// The group's table held it before.
    pub had: bool,
    /// What the group's table holds now.
    pub now: Option<Arc<Attrs>>,
    /// Its attributes changed (a member that had it hears them again).
    pub changed: bool,
    /// The peer its best path came from (never told it back).
    pub source: Option<PeerId>,
}

/// The peers of one group and what they were told.
#[derive(Debug)]
pub struct Group {
    /// A member's session as the export sees it (kind, reflector client).
    pub info: PeerInfo,
    /// Adj-RIB-Out: what the members were told (less each one's held).
    /// Prefixes announced together share one `Arc`.
    pub adj_out: PrefixMap<Arc<Attrs>>,
    /// Its members.
    pub members: BTreeSet<PeerId>,
}

impl Group {
    /// An empty group for sessions like `info`'s.
    pub fn new(info: PeerInfo) -> Self {
        Self {
            info,
            adj_out: PrefixMap::default(),
            members: BTreeSet::new(),
        }
    }

    /// Takes what the group should be told now for each prefix (the
    /// export's attributes, `None` to withdraw, and the best path's
    /// source), updates the table, and says what changed.
    pub fn apply(
        &mut self,
        wants: impl IntoIterator<Item = (Prefix, Option<Attrs>, Option<PeerId>)>,
    ) -> Vec<Decided> {
        let mut interned: HashMap<Attrs, Arc<Attrs>> = HashMap::new();
        let mut out = Vec::new();
        for (prefix, want, source) in wants {
            let had = self.adj_out.get(&prefix).is_some();
            let (now, changed) =
                match margay_delta::change(want, self.adj_out.get(&prefix).map(|a| &**a)) {
                    Change::Keep => (self.adj_out.get(&prefix).cloned(), false),
                    Change::Set(a) => {
                        let shared = interned
                            .entry(a.clone())
                            .or_insert_with(|| Arc::new(a.clone()))
                            .clone();
                        self.adj_out.insert(prefix, shared.clone());
                        (Some(shared), true)
                    }
                    Change::Remove => {
                        self.adj_out.remove(&prefix);
                        (None, had)
                    }
                };
            if !had && now.is_none() {
                continue;
            }
            out.push(Decided {
                prefix,
                had,
                now,
                changed,
                source,
            });
        }
        out
    }

    /// The whole table as decisions, for a member that was told nothing
    /// (it joined, or asked for a refresh); `source_of` says whose each
    /// prefix's best path is.
    pub fn dump(&self, source_of: impl Fn(&Prefix) -> Option<PeerId>) -> Vec<Decided> {
        self.adj_out
            .iter()
            .map(|(prefix, a)| Decided {
                prefix,
                had: false,
                now: Some(a.clone()),
                changed: true,
                source: source_of(&prefix),
            })
            .collect()
    }
}

/// What one member is sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Out {
    /// Announcements, prefixes sharing attributes together.
    pub announce: Vec<(Arc<Attrs>, Vec<Prefix>)>,
    /// Withdrawals.
    pub withdraw: Vec<Prefix>,
}

/// A member's own state: the group's prefixes it was not told.
#[derive(Debug, Default)]
pub struct Member {
    /// Held back: it is their source, or their UPDATE could not be
    /// encoded for its session.
    pub held: PrefixMap<()>,
}

impl Member {
    /// What member `id` is sent for the group's `decided` (a member that
    /// `fresh`ly joined was told nothing before), its held prefixes kept
    /// in step.
    pub fn fan_out(&mut self, id: PeerId, decided: &[Decided], fresh: bool) -> Out {
        let mut announce: HashMap<*const Attrs, (Arc<Attrs>, Vec<Prefix>)> = HashMap::new();
        let mut out = Out::default();
        for d in decided {
            let had = !fresh && d.had && self.held.get(&d.prefix).is_none();
            let own = d.source == Some(id);
            let should = d.now.is_some() && !own;
            match &d.now {
                Some(a) if should && (d.changed || !had) => {
                    announce
                        .entry(Arc::as_ptr(a))
                        .or_insert_with(|| (a.clone(), Vec::new()))
                        .1
                        .push(d.prefix);
                }
                _ if !should && had => out.withdraw.push(d.prefix),
                _ => {}
            }
            if d.now.is_some() && own {
                self.held.insert(d.prefix, ());
            } else {
                self.held.remove(&d.prefix);
            }
        }
        out.announce = announce.into_values().collect();
        out
    }

    /// Its UPDATE for `prefixes` could not be encoded: they are held back
    /// (the caller withdraws them from the peer).
    pub fn hold(&mut self, prefixes: &[Prefix]) {
        for p in prefixes {
            self.held.insert(*p, ());
        }
    }

    /// How many of the group's `table` prefixes it was told.
    pub fn sent(&self, table: usize) -> usize {
        table.saturating_sub(self.held.len())
    }
}

/// The UPDATEs of one export, encoded once per distinct (attributes,
/// prefixes, session encoding) into one buffer shared by every member:
/// each member is queued its picks of it ([`Span`]s, then
/// [`Encoded::wire`]), so a reflector's clients queue one entry per
/// export pointing into one copy, not a copy (or a pointer per UPDATE)
/// each.
#[derive(Debug, Default)]
pub struct Encoded {
    buf: Vec<u8>,
    announce: HashMap<(*const Attrs, Encoding), Vec<Announced>>,
    withdraw: HashMap<Encoding, Vec<Withdrawn>>,
}

/// UPDATEs encoded back to back in an export's buffer: bytes
/// `start..end`, `count` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// Past the last byte.
    pub end: usize,
    /// UPDATE messages in it.
    pub count: usize,
}

/// Prefixes withdrawn together and their UPDATEs.
type Withdrawn = (Vec<Prefix>, Span);

/// What of a session's negotiation the encoding depends on (4-octet AS
/// numbers, iBGP).
type Encoding = (bool, bool);

/// Prefixes announced together and their UPDATEs (or the size that did
/// not fit).
type Announced = (Vec<Prefix>, Result<Span, usize>);

impl Encoded {
    fn append(&mut self, msgs: Vec<Vec<u8>>) -> Span {
        let start = self.buf.len();
        for m in &msgs {
            self.buf.extend_from_slice(m);
        }
        Span {
            start,
            end: self.buf.len(),
            count: msgs.len(),
        }
    }

    /// UPDATEs announcing `prefixes` (one family) with `attrs` for a
    /// session encoding as `ctx` (`Err`: too big, see
    /// [`UpdateBuilder::announce`]).
    pub fn announce(
        &mut self,
        attrs: &Arc<Attrs>,
        prefixes: &[Prefix],
        ctx: &Ctx,
    ) -> Result<Span, usize> {
        let key = (Arc::as_ptr(attrs), (ctx.four_octet_as, ctx.ibgp));
        if let Some((_, w)) = self
            .announce
            .get(&key)
            .and_then(|slot| slot.iter().find(|(ps, _)| ps == prefixes))
        {
            return *w;
        }
        let w = UpdateBuilder::announce(attrs, prefixes, None, ctx).map(|m| self.append(m));
        self.announce
            .entry(key)
            .or_default()
            .push((prefixes.to_vec(), w));
        w
    }

    /// UPDATEs withdrawing `prefixes` (one family).
    pub fn withdraw(&mut self, prefixes: &[Prefix], ctx: &Ctx) -> Span {
        let key = (ctx.four_octet_as, ctx.ibgp);
        if let Some((_, w)) = self
            .withdraw
            .get(&key)
            .and_then(|slot| slot.iter().find(|(ps, _)| ps == prefixes))
        {
            return *w;
        }
        let w = UpdateBuilder::withdraw(prefixes, ctx);
        let w = self.append(w);
        self.withdraw
            .entry(key)
            .or_default()
            .push((prefixes.to_vec(), w));
        w
    }

    /// The export's buffer, frozen to be shared by the members' Wires.
    pub fn finish(self) -> Arc<[u8]> {
        self.buf.into()
    }

    /// A member's `picks` of the export's `buf` (from [`Encoded::finish`])
    /// as one queue entry: in buffer order, which keeps each member's
    /// messages of one export in the order they were encoded (one export
    /// says each prefix at most once to a member, so any order within it
    /// is right).
    pub fn wire(buf: &Arc<[u8]>, mut picks: Vec<Span>) -> Wire {
        picks.sort_unstable_by_key(|s| s.start);
        picks.dedup();
        Wire::picks(buf.clone(), picks.iter().map(|s| (s.start, s.end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn attrs(nh: &str) -> Attrs {
        Attrs {
            next_hop: Some(nh.parse().unwrap()),
            ..Default::default()
        }
    }

    fn info() -> PeerInfo {
        PeerInfo {
            addr: "10.0.0.2".parse().unwrap(),
            asn: 64512,
            router_id: "10.0.0.2".parse().unwrap(),
            ibgp: true,
            rr_client: true,
        }
    }

    fn announced(o: &Out) -> Vec<Prefix> {
        let mut v: Vec<Prefix> = o.announce.iter().flat_map(|(_, ps)| ps.clone()).collect();
        v.sort();
        v
    }

    /// Three clients of a reflector share one table: each hears every
    /// route but its own, a change once, a withdrawal only if it was told.
    #[test]
    fn members_share_one_table_and_never_hear_their_own_routes() {
        let mut g = Group::new(info());
        let (a, b, c) = (1, 2, 3);
        let mut m: BTreeMap<PeerId, Member> = [a, b, c]
            .into_iter()
            .map(|id| (id, Member::default()))
            .collect();
        let d = g.apply([
            (p("10.244.1.0/26"), Some(attrs("10.0.0.1")), Some(a)),
            (p("10.244.2.0/26"), Some(attrs("10.0.0.2")), Some(b)),
            (p("10.244.3.0/26"), Some(attrs("10.0.0.3")), Some(c)),
        ]);
        assert_eq!(g.adj_out.len(), 3, "one table for the group");
        let out_a = m.get_mut(&a).unwrap().fan_out(a, &d, true);
        assert_eq!(announced(&out_a), [p("10.244.2.0/26"), p("10.244.3.0/26")]);
        for id in [b, c] {
            let o = m.get_mut(&id).unwrap().fan_out(id, &d, true);
            assert_eq!(announced(&o).len(), 2);
        }
        assert!(m.values().all(|x| x.held.len() == 1 && x.sent(3) == 2));
        // b's route changes: a and c hear it again, b nothing.
        let d = g.apply([(
            p("10.244.2.0/26"),
            Some(Attrs {
                med: Some(5),
                ..attrs("10.0.0.2")
            }),
            Some(b),
        )]);
        assert_eq!(
            announced(&m.get_mut(&a).unwrap().fan_out(a, &d, false)),
            [p("10.244.2.0/26")]
        );
        assert_eq!(m.get_mut(&b).unwrap().fan_out(b, &d, false), Out::default());
        // Unchanged export: nobody hears anything.
        let d = g.apply([(p("10.244.3.0/26"), Some(attrs("10.0.0.3")), Some(c))]);
        for (id, x) in &mut m {
            assert_eq!(x.fan_out(*id, &d, false), Out::default());
        }
        // a's route goes: b and c hear the withdrawal, a (never told) not.
        let d = g.apply([(p("10.244.1.0/26"), None, Some(a))]);
        assert_eq!(m.get_mut(&a).unwrap().fan_out(a, &d, false), Out::default());
        assert_eq!(
            m.get_mut(&b).unwrap().fan_out(b, &d, false).withdraw,
            [p("10.244.1.0/26")]
        );
        assert!(m[&a].held.is_empty(), "nothing of a's left to hold");
        // The best path of c's prefix moves to a (same export): a is now
        // its source and is told to forget it; c hears it now.
        let d = g.apply([(p("10.244.3.0/26"), Some(attrs("10.0.0.3")), Some(a))]);
        assert_eq!(
            m.get_mut(&a).unwrap().fan_out(a, &d, false).withdraw,
            [p("10.244.3.0/26")]
        );
        assert_eq!(
            announced(&m.get_mut(&c).unwrap().fan_out(c, &d, false)),
            [p("10.244.3.0/26")]
        );
        assert_eq!(m.get_mut(&b).unwrap().fan_out(b, &d, false), Out::default());
    }

    /// A member joining late is dumped the table less its own routes; one
    /// that could not be sent a route holds it until it changes.
    #[test]
    fn a_late_member_gets_the_table_and_an_unsendable_route_is_held() {
        let mut g = Group::new(info());
        g.apply([
            (p("10.244.1.0/26"), Some(attrs("10.0.0.1")), Some(1)),
            (p("10.244.4.0/26"), Some(attrs("10.0.0.4")), Some(4)),
        ]);
        let mut late = Member::default();
        let d = g.dump(|q| Some(if *q == p("10.244.4.0/26") { 4 } else { 1 }));
        let o = late.fan_out(4, &d, true);
        assert_eq!(announced(&o), [p("10.244.1.0/26")]);
        assert_eq!(late.sent(g.adj_out.len()), 1);
        // Its session could not encode 10.244.1.0/26: held, not counted.
        late.hold(&[p("10.244.1.0/26")]);
        assert_eq!(late.sent(g.adj_out.len()), 0);
        // Withdrawn later: nothing to tell it.
        let d = g.apply([(p("10.244.1.0/26"), None, Some(1))]);
        assert_eq!(late.fan_out(4, &d, false), Out::default());
    }

    use std::collections::BTreeMap;

    /// Members sent the same thing share its encoding: one span of one
    /// buffer, and each member's Wire is its picks of that buffer.
    #[test]
    fn the_same_update_is_encoded_once() {
        let mut e = Encoded::default();
        let a = Arc::new(attrs("10.0.0.1"));
        let ctx = Ctx {
            four_octet_as: true,
            ibgp: true,
        };
        let ps = [p("10.244.1.0/26"), p("10.244.2.0/26")];
        let one = e.announce(&a, &ps, &ctx).unwrap();
        let two = e.announce(&a, &ps, &ctx).unwrap();
        assert_eq!(one, two, "one copy");
        assert_eq!(one.count, 1);
        let other = e.announce(&a, &ps[..1], &ctx).unwrap();
        assert_eq!(other.start, one.end, "encoded after it");
        let w1 = e.withdraw(&ps, &ctx);
        let w2 = e.withdraw(&ps, &ctx);
        assert_eq!(w1, w2);
        let buf = e.finish();
        assert_eq!(buf.len(), w1.end);
        // A member picks the withdrawal and the first announcement, in
        // whatever order it was told them: sent in buffer order, adjacent
        // picks as one range.
        let w = Encoded::wire(&buf, vec![w1, one]);
        let sent: Vec<&[u8]> = w.slices().collect();
        assert_eq!(sent, [&buf[one.start..one.end], &buf[w1.start..w1.end]]);
        let all = Encoded::wire(&buf, vec![w1, other, one]);
        assert_eq!(all.slices().count(), 1, "the whole buffer, one range");
        assert_eq!(all.len(), buf.len());
    }
}
