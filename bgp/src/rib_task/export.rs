//! The RIB task's way out: best-path changes into the learned routes and
//! the kernel, and exported once per update group ([`crate::group`]), each
//! member queued its picks of the group's encoded UPDATEs; and the best
//! routes as `/status` shows them.

use margay_api::status::RouteView;
use margay_delta::Change;

use super::RibTask;
use crate::group::{Decided, Encoded, GroupKey, Span};
use crate::kernel::FibOp;
use crate::packet::Prefix;
use crate::packet::consts::{AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use crate::rib::{Best, LOCAL, NextHops, PeerId};

/// The peer a group's export is computed for: none (no path's source),
/// so each member's own routes are left to [`crate::group::Member::fan_out`].
const GROUP_EXPORT: PeerId = PeerId::MAX;

/// The next hops a best path puts in the kernel: none for our own routes
/// or a path without any.
fn learned_hops(b: &Option<Best>) -> Option<&NextHops> {
    b.as_ref()
        .filter(|b| b.best.peer != LOCAL && !b.next_hops.is_empty())
        .map(|b| &b.next_hops)
}

impl RibTask {
    /// Sends peer `id` its group's whole table (less its own routes), as
    /// to a peer told nothing yet.
    pub(super) fn resend(&mut self, id: PeerId) {
        let Some(key) = self.group_of(id) else {
            return;
        };
        let Some(g) = self.groups.get(&key) else {
            return;
        };
        let rib = &self.rib;
        let decided = g.dump(|p| rib.best(p).map(|b| b.best.peer));
        let table = g.adj_out.len();
        let mut encoded = Encoded::default();
        let picks = self.fan_out(id, &decided, true, table, &mut encoded);
        self.send(encoded, vec![(id, picks)]);
    }

    /// Best-path changes: into the learned routes and the kernel now,
    /// exported with the next [`RibTask::flush_exports`].
    pub(super) async fn propagate(&mut self, changes: Vec<(Prefix, Option<Best>)>) {
        if changes.is_empty() {
            return;
        }
        if let Some(learned) = &self.learned {
            learned.send_if_modified(|m| {
                let mut modified = false;
                for (p, b) in &changes {
                    match margay_delta::change(learned_hops(b), m.get(p).as_ref()) {
                        Change::Keep => {}
                        Change::Set(hops) => {
                            m.insert(*p, hops.clone());
                            modified = true;
                        }
                        Change::Remove => {
                            m.remove(p);
                            modified = true;
                        }
                    }
                }
                modified
            });
        }
        if let Some(fib) = &self.fib {
            let ops: Vec<FibOp> = changes
                .iter()
                .map(|(p, b)| (*p, learned_hops(b).cloned()))
                .collect();
            for (p, _) in &ops {
                self.stale_kernel.remove(p);
            }
            fib.submit(ops).await;
        }
        // Exported once the events already waiting are handled too
        // ([`RibTask::flush_exports`]): a burst of UPDATEs from many peers
        // becomes one export per group, packed, not one per UPDATE.
        for (p, _) in changes {
            self.pending_export.insert(p, ());
        }
    }

    /// Exports every prefix changed since the last flush, as the RIB has
    /// it now.
    pub(super) fn flush_exports(&mut self) {
        if self.pending_export.is_empty() {
            return;
        }
        let changes: Vec<(Prefix, Option<Best>)> = self
            .pending_export
            .iter()
            .map(|(p, _)| (p, self.rib.best(&p)))
            .collect();
        self.pending_export.clear();
        self.export_all(&changes);
    }

    /// Exports `changes` to every update group.
    pub(super) fn export_all(&mut self, changes: &[(Prefix, Option<Best>)]) {
        let keys: Vec<GroupKey> = self.groups.keys().cloned().collect();
        for key in keys {
            self.export_group(&key, changes);
        }
    }

    /// Exports `changes` once for group `key` (the attributes its members
    /// are sent), then sends each member what that means for it.
    pub(super) fn export_group(&mut self, key: &GroupKey, changes: &[(Prefix, Option<Best>)]) {
        let Some(g) = self.groups.get_mut(key) else {
            return;
        };
        let mut wants = Vec::with_capacity(changes.len());
        for (p, best) in changes {
            let fam = if p.is_v4() {
                (AFI_IPV4, SAFI_UNICAST)
            } else {
                (AFI_IPV6, SAFI_UNICAST)
            };
            if !key.families.contains(&fam) {
                continue;
            }
            let nh_self = (p.is_v4() == key.local.is_ipv4()).then_some(key.local);
            let best = best
                .as_ref()
                .filter(|b| !key.export_local_only || b.best.peer == LOCAL);
            // Exported as to a peer that is none of the sources: each
            // member's own routes are held back from it by `Member::fan_out`.
            let out = self.rib.export(
                &g.info,
                GROUP_EXPORT,
                best.map(|b| &b.best),
                nh_self,
                key.next_hop_self,
                &self.communities,
            );
            let want = out.filter(|a| a.next_hop.is_some());
            wants.push((*p, want, best.map(|b| b.best.peer)));
        }
        let decided = g.apply(wants);
        let table = g.adj_out.len();
        let members: Vec<PeerId> = g.members.iter().copied().collect();
        let mut encoded = Encoded::default();
        let picks: Vec<(PeerId, Vec<Span>)> = members
            .into_iter()
            .map(|id| (id, self.fan_out(id, &decided, false, table, &mut encoded)))
            .collect();
        self.send(encoded, picks);
    }

    /// Queues each member its picks of the export's `encoded` UPDATEs:
    /// one queue entry per member, every one pointing into the same
    /// buffer.
    fn send(&self, encoded: Encoded, picks: Vec<(PeerId, Vec<Span>)>) {
        let buf = encoded.finish();
        for (id, spans) in picks {
            if spans.is_empty() {
                continue;
            }
            if let Some(s) = self.peers.get(&id).and_then(|p| p.session.as_ref()) {
                let _ = s.out.send(Encoded::wire(&buf, spans));
            }
        }
    }

    /// What member `id` is to be sent for `decided` (`fresh`: it was told
    /// nothing before), as spans of the export's `encoded` UPDATEs (those
    /// the other members are sent already are shared); `table` is its
    /// group's table size. [`RibTask::send`] queues them.
    fn fan_out(
        &mut self,
        id: PeerId,
        decided: &[Decided],
        fresh: bool,
        table: usize,
        encoded: &mut Encoded,
    ) -> Vec<Span> {
        let mut picks = Vec::new();
        let Some(slot) = self.peers.get_mut(&id) else {
            return picks;
        };
        let Some(s) = slot.session.as_mut() else {
            return picks;
        };
        let out = s.member.fan_out(id, decided, fresh);
        let (v4, v6): (Vec<Prefix>, Vec<Prefix>) =
            out.withdraw.into_iter().partition(Prefix::is_v4);
        for w in [v4, v6] {
            if !w.is_empty() {
                picks.push(encoded.withdraw(&w, &s.ctx));
            }
        }
        for (a, ps) in out.announce {
            let (v4, v6): (Vec<Prefix>, Vec<Prefix>) = ps.into_iter().partition(Prefix::is_v4);
            for group in [v4, v6] {
                if group.is_empty() {
                    continue;
                }
                match encoded.announce(&a, &group, &s.ctx) {
                    Ok(span) => picks.push(span),
                    Err(size) => {
                        // Its attributes do not fit one UPDATE: the peer
                        // gets a withdrawal instead (it may hold an older
                        // version), never a message it must reset for.
                        tracing::warn!(
                            peer = %slot.params.addr,
                            prefixes = group.len(),
                            size,
                            "routes not sent: their attributes need an UPDATE of {size} octets (more than 4096); withdrawn from this peer"
                        );
                        s.member.hold(&group);
                        picks.push(encoded.withdraw(&group, &s.ctx));
                        slot.status.lock().expect("status").too_big += group.len() as u64;
                    }
                }
            }
        }
        let mut st = slot.status.lock().expect("status");
        st.updates_out += picks.iter().map(|p| p.count as u64).sum::<u64>();
        st.prefixes_sent = s.member.sent(table);
        picks
    }

    /// The best routes as the outside sees them, by prefix.
    pub(super) fn routes(&self) -> Vec<RouteView> {
        let mut v: Vec<RouteView> = self
            .rib
            .iter_best()
            .map(|(p, b)| {
                let from = self
                    .peers
                    .get(&b.best.peer)
                    .map(|s| s.params.addr.to_string());
                let a = &b.best.attrs;
                RouteView {
                    prefix: p.to_string(),
                    next_hops: b.next_hops.iter().copied().collect(),
                    from: from.unwrap_or_else(|| "local".into()),
                    as_path: a
                        .as_path
                        .segments
                        .iter()
                        .flat_map(|s| s.asns.clone())
                        .collect(),
                    local_pref: a.local_pref,
                    med: a.med,
                    origin: format!("{:?}", a.origin).to_lowercase(),
                    paths: self.rib.paths(&p).len(),
                    stale: b.best.stale,
                }
            })
            .collect();
        v.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        v
    }
}
