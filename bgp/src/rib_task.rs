//! The RIB task: the one owner of routing state. It takes the peers'
//! events and the [`crate::speaker::Speaker`] handle's requests, one
//! handler per message, runs the decision process ([`crate::rib`]),
//! writes the kernel ([`crate::kernel::FibWriter`]) and exports to the
//! update groups ([`export`]); it starts, owns and ends the peer tasks
//! ([`peers`]) and the listener's accept loop.
//!
//! Graceful restart as the restarting speaker: kernel routes survive a stop
//! or crash. On start, routes with our protocol found in the kernel are
//! kept and marked stale; they are replaced as routes are relearned, and
//! the rest are removed once every configured peer has sent End-of-RIB, or
//! after the restart time, whichever comes first.

mod export;
mod peers;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use margay_api::status::RouteView;
use margay_task::Owned;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::{Config, Neighbor};
use crate::fsm::Negotiated;
use crate::group::{Group, GroupKey, Member};
use crate::kernel::{Fib, FibOp, FibWriter};
use crate::packet::consts::{AFI_IPV6, err};
use crate::packet::{Attrs, Message, Prefix, Update};
use crate::peer::{PeerCmd, PeerEvent, Stop, Wire};
use crate::prefix_map::PrefixMap;
use crate::rib::{Best, ImportFilter, LearnedRoutes, PeerId, PeerInfo, Rib};
use crate::state::Shared;
use crate::{Error, Result};
use peers::{Established, PeerParams, PeerSlot, REFRESH_GAP, set_listener_md5};

/// The most peer events handled before their routes are exported.
const BATCH: usize = 1024;

/// What the RIB task is asked: by the [`crate::speaker::Speaker`] handle,
/// the accept loop and its own timers.
pub(crate) enum ToRib {
    StaleTimeout {
        id: PeerId,
    },
    RefreshDue {
        id: PeerId,
    },
    RestartTimeout,
    Incoming(TcpStream, SocketAddr),
    Routes(oneshot::Sender<Vec<RouteView>>),
    SetNeighbors(Vec<Neighbor>, oneshot::Sender<()>),
    SetOriginate(Vec<Prefix>),
    SetImport(Vec<Prefix>),
    SetCommunities(Vec<u32>),
    SetRestartTime(u16),
    /// A BFD event again (its peer's command queue was full), or BFD to
    /// start again (its port was taken).
    Bfd(Option<crate::bfd::Event>),
}

/// A started RIB task and what its [`crate::speaker::Speaker`] keeps of it.
pub(crate) struct Started {
    pub tx: mpsc::Sender<ToRib>,
    pub shutdown: watch::Sender<Stop>,
    pub learned: watch::Receiver<LearnedRoutes>,
    pub synced: watch::Receiver<bool>,
    pub shared: Arc<Shared>,
    /// The RIB task; dropping it ends the task and everything it owns.
    pub task: Owned,
}

pub(crate) struct RibTask {
    cfg: Config,
    synced: watch::Sender<bool>,
    listener: Arc<TcpListener>,
    /// The learned routes, when someone reads them (`fib` off).
    learned: Option<watch::Sender<LearnedRoutes>>,
    /// Prefixes we originate.
    originated: HashSet<Prefix>,
    rib: Rib,
    peers: HashMap<PeerId, PeerSlot>,
    /// The update groups of the established peers.
    groups: HashMap<GroupKey, Group>,
    /// Prefixes whose best path changed since the last export.
    pending_export: PrefixMap<()>,
    /// Every peer task; a removed peer's task ends by itself after its
    /// Cease, and the rest are waited for at shutdown.
    peer_tasks: JoinSet<()>,
    /// The listener's accept loop (it ends on the shutdown signal too).
    accept: Option<Owned>,
    fib: Option<FibWriter>,
    tx: mpsc::Sender<ToRib>,
    peer_tx: mpsc::Sender<PeerEvent>,
    shutdown: watch::Receiver<Stop>,
    next_id: PeerId,
    communities: Vec<u32>,
    /// Our routes found in the kernel at start and not yet relearned.
    stale_kernel: HashSet<Prefix>,
    /// Restarting (graceful restart) until stale kernel routes are settled.
    restarting: bool,
    /// Ends the restart after the restart time, if End-of-RIBs do not.
    restart_timer: Option<Owned>,
    shared: Arc<Shared>,
    /// BFD, started with the first peer that has it on.
    bfd: Option<crate::bfd::Bfd>,
    /// Its retries (a start, an event a peer's full queue refused).
    bfd_retry: Option<Owned>,
    bfd_event_retry: HashMap<IpAddr, Owned>,
    bfd_tx: mpsc::UnboundedSender<crate::bfd::Event>,
}

impl RibTask {
    /// Binds the listener, adopts our kernel routes left by a previous
    /// run, starts every configured peer and the task itself.
    pub(crate) async fn start(cfg: Config) -> Result<Started> {
        let (tx, rx) = mpsc::channel::<ToRib>(1024);
        // Short, so a busy RIB slows peers down (TCP backpressure) instead of
        // buffering their UPDATEs.
        let (peer_tx, peer_rx) = mpsc::channel::<PeerEvent>(64);
        let (shutdown, shut_rx) = watch::channel(Stop::Run);
        let (bfd_tx, bfd_rx) = mpsc::unbounded_channel();
        let listen = cfg
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 179)));
        let listener = Arc::new(
            TcpListener::bind(listen)
                .await
                .map_err(|e| Error::Config(format!("cannot listen on {listen}: {e}")))?,
        );
        for n in cfg.neighbors.iter().filter(|n| n.password.is_some()) {
            set_listener_md5(&listener, n)?;
        }
        let (fib, stale_kernel) = if cfg.fib {
            let fib = Fib::new()?;
            let own = fib.list_own().await?;
            (
                Some(FibWriter::spawn()?),
                own.into_iter().collect::<HashSet<_>>(),
            )
        } else {
            (None, HashSet::new())
        };
        let restarting = !stale_kernel.is_empty();
        if restarting {
            tracing::info!(
                routes = stale_kernel.len(),
                "kept kernel routes from a previous run; restarting gracefully"
            );
        }
        let mut rib = Rib::new(cfg.asn, cfg.router_id, cfg.cluster_id);
        rib.set_import_filter(ImportFilter {
            allowed: cfg.import_prefixes.clone(),
        });
        let (learned_tx, learned) = watch::channel(LearnedRoutes::new());
        let (synced_tx, synced) = watch::channel(cfg.neighbors.is_empty());
        let shared = Arc::new(Shared {
            kernel: fib.as_ref().map(FibWriter::stats_handle),
            ..Default::default()
        });
        let mut task = RibTask {
            synced: synced_tx,
            listener: listener.clone(),
            // Only a program that programs the kernel itself (fib off)
            // reads the learned routes; a copy of every best route costs
            // as much memory as the RIB's own index.
            learned: (!cfg.fib).then_some(learned_tx),
            originated: HashSet::new(),
            rib,
            peers: HashMap::new(),
            peer_tasks: JoinSet::new(),
            accept: None,
            fib,
            tx: tx.clone(),
            peer_tx,
            shutdown: shut_rx.clone(),
            next_id: 1,
            groups: HashMap::new(),
            pending_export: PrefixMap::default(),
            communities: cfg.community_values(),
            stale_kernel,
            restarting,
            restart_timer: None,
            shared: shared.clone(),
            cfg: cfg.clone(),
            bfd: None,
            bfd_retry: None,
            bfd_event_retry: HashMap::new(),
            bfd_tx,
        };
        for n in &cfg.neighbors {
            let params = PeerParams::configured(&cfg, n, restarting);
            task.add_peer(params, Some(n.clone()));
        }
        task.sync_bfd();
        let mut changes = Vec::new();
        for o in &cfg.originate {
            task.originated.insert(o.prefix);
            changes.extend(task.rib.originate(o.prefix, Attrs::default()));
        }
        task.propagate(changes).await;
        if restarting {
            let secs = u64::from(cfg.restart_time.max(1));
            task.restart_timer = Some(task.timer(Duration::from_secs(secs), ToRib::RestartTimeout));
        }
        // The listener and the RIB task end on the shutdown signal (the RIB
        // task after its peers said Cease), or when their owner drops them.
        task.accept = Some(Owned::spawn(accept_loop(listener, tx.clone(), shut_rx)));
        Ok(Started {
            tx,
            shutdown,
            learned,
            synced,
            shared,
            task: Owned::spawn(task.run(rx, peer_rx, bfd_rx)),
        })
    }

    /// A timer owned by the caller: `msg` reaches the RIB task after
    /// `after`, unless the returned handle was dropped first.
    fn timer(&self, after: Duration, msg: ToRib) -> Owned {
        let tx = self.tx.clone();
        Owned::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(msg).await;
        })
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<ToRib>,
        mut peer_rx: mpsc::Receiver<PeerEvent>,
        mut bfd_rx: mpsc::UnboundedReceiver<crate::bfd::Event>,
    ) {
        let mut shut = self.shutdown.clone();
        loop {
            tokio::select! {
                m = peer_rx.recv() => match m {
                    Some(m) => {
                        self.peer_event(m).await;
                        // The peers' events already waiting join this
                        // export.
                        for _ in 0..BATCH {
                            match peer_rx.try_recv() {
                                Ok(m) => self.peer_event(m).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                m = rx.recv() => match m {
                    Some(m) => self.handle(m).await,
                    None => break,
                },
                Some(ev) = bfd_rx.recv() => self.bfd_event(ev),
                Some(done) = self.peer_tasks.join_next() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        tracing::error!("a BGP peer task panicked: {e}");
                    }
                    continue;
                }
                _ = shut.changed() => break,
            }
            self.flush_exports();
            self.shared
                .rib_prefixes
                .store(self.rib.len() as u64, Relaxed);
            self.shared
                .update_groups
                .store(self.groups.len() as u64, Relaxed);
            self.shared.adj_out_entries.store(
                self.groups.values().map(|g| g.adj_out.len() as u64).sum(),
                Relaxed,
            );
            self.publish_sync();
        }
        // Peers saw the same signal and say Cease; give them a moment.
        self.restart_timer = None;
        for p in self.peers.values_mut() {
            p.stale_timer = None;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while self.peer_tasks.join_next().await.is_some() {}
        })
        .await;
        self.peer_tasks.abort_all();
    }

    fn publish_sync(&self) {
        let synced = self.all_eor();
        self.synced
            .send_if_modified(|s| std::mem::replace(s, synced) != synced);
    }

    fn all_eor(&self) -> bool {
        self.peers.values().filter(|p| !p.params.dynamic).all(|p| {
            p.session.as_ref().is_some_and(|s| {
                s.group
                    .families
                    .iter()
                    .all(|(afi, _)| s.eor_received.contains(afi))
            })
        })
    }

    /// Ends the restart once every configured peer sent End-of-RIB for all
    /// its families (or `force`): our kernel routes that were not
    /// relearned are removed.
    async fn finish_restart(&mut self, force: bool) {
        if !self.restarting {
            return;
        }
        let done = force || self.all_eor();
        if !done {
            return;
        }
        self.restarting = false;
        let stale: Vec<FibOp> = self.stale_kernel.drain().map(|p| (p, None)).collect();
        tracing::info!(removed = stale.len(), "graceful restart complete");
        if let Some(fib) = &self.fib {
            fib.submit(stale).await;
        }
    }

    async fn handle(&mut self, msg: ToRib) {
        match msg {
            ToRib::Incoming(stream, from) => self.incoming(stream, from),
            ToRib::StaleTimeout { id } => self.stale_timeout(id).await,
            ToRib::RefreshDue { id } => self.refresh(id),
            ToRib::RestartTimeout => self.finish_restart(true).await,
            ToRib::Routes(reply) => {
                let _ = reply.send(self.routes());
            }
            ToRib::SetNeighbors(list, done) => self.set_neighbors(list, done).await,
            ToRib::SetOriginate(list) => self.set_originate(list).await,
            ToRib::SetImport(allowed) => self.rib.set_import_filter(ImportFilter { allowed }),
            ToRib::SetCommunities(values) => self.set_communities(values),
            ToRib::SetRestartTime(secs) => self.set_restart_time(secs),
            ToRib::Bfd(Some(ev)) => self.bfd_event(ev),
            ToRib::Bfd(None) => self.sync_bfd(),
        }
    }

    /// Peer `id`'s restart time ran out: its stale routes go.
    async fn stale_timeout(&mut self, id: PeerId) {
        let mut c = self.rib.flush_stale(id, false);
        c.extend(self.rib.flush_stale(id, true));
        self.propagate(c).await;
    }

    /// Replaces the configured neighbors; `done` is told once they are
    /// taken.
    async fn set_neighbors(&mut self, list: Vec<Neighbor>, done: oneshot::Sender<()>) {
        let want: HashMap<IpAddr, Neighbor> = list.into_iter().map(|n| (n.address, n)).collect();
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.source
                    .as_ref()
                    .is_some_and(|src| want.get(&src.address).is_none_or(|n| !n.same_session(src)))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut changes = Vec::new();
        for id in gone {
            if let Some(slot) = self.remove_peer(id) {
                tracing::info!(peer = %slot.params.addr, "neighbor removed or changed");
                if slot.params.password.is_some()
                    && let Err(e) = crate::net::set_md5(
                        &*self.listener,
                        slot.params.addr,
                        None,
                        self.listener.local_addr().is_ok_and(|a| a.is_ipv6()),
                    )
                {
                    tracing::warn!(peer = %slot.params.addr, "cannot clear TCP MD5 key: {e}");
                }
                changes.extend(self.rib.peer_down(id, false));
            }
        }
        // A change of BFD alone: the session stays.
        for slot in self.peers.values_mut() {
            if let Some(src) = slot.source.as_mut()
                && let Some(n) = want.get(&src.address)
                && n.bfd != src.bfd
            {
                src.bfd = n.bfd;
                slot.params.bfd = n.bfd.as_ref().map(|b| b.params());
                slot.status.lock().expect("status").bfd =
                    bfd_status(self.bfd.as_ref(), src.address, n.bfd.is_some());
            }
        }
        let have: HashSet<IpAddr> = self.peers.values().map(|p| p.params.addr).collect();
        for n in want.values().filter(|n| !have.contains(&n.address)) {
            if n.password.is_some()
                && let Err(e) = set_listener_md5(&self.listener, n)
            {
                tracing::warn!("{e}");
            }
            tracing::info!(peer = %n.address, asn = n.asn, "neighbor added");
            let params = PeerParams::configured(&self.cfg, n, self.restarting);
            self.add_peer(params, Some(n.clone()));
        }
        self.sync_bfd();
        self.propagate(changes).await;
        self.finish_restart(false).await;
        // Whoever set them reads `synced` next: it must speak of these
        // neighbors already.
        self.publish_sync();
        let _ = done.send(());
    }

    /// Replaces the prefixes we originate.
    async fn set_originate(&mut self, list: Vec<Prefix>) {
        let want: HashSet<Prefix> = list.into_iter().collect();
        let mut changes = Vec::new();
        for p in self.originated.difference(&want) {
            changes.extend(self.rib.withdraw_local(*p));
        }
        for p in want.difference(&self.originated) {
            changes.extend(self.rib.originate(*p, Attrs::default()));
        }
        self.originated = want;
        self.propagate(changes).await;
    }

    /// Replaces the communities added to every export.
    fn set_communities(&mut self, values: Vec<u32>) {
        if self.communities != values {
            self.communities = values;
            // Every established peer hears the routes whose exported
            // attributes changed (its Adj-RIB-Out decides).
            let all: Vec<(Prefix, Option<Best>)> =
                self.rib.iter_best().map(|(p, b)| (p, Some(b))).collect();
            self.export_all(&all);
        }
    }

    /// Replaces the restart time of the peers without their own.
    fn set_restart_time(&mut self, secs: u16) {
        self.cfg.restart_time = secs;
        for p in self.peers.values_mut() {
            let own = p.source.as_ref().and_then(|n| n.restart_time);
            if own.is_some() {
                continue;
            }
            match &p.incoming {
                Some(tx) => {
                    let _ = tx.try_send(PeerCmd::RestartTime(secs));
                }
                // Not started: it starts with the new time.
                None => {
                    if let Some(gr) = &mut p.params.session.graceful_restart {
                        gr.restart_time = secs;
                    }
                }
            }
        }
    }

    async fn peer_event(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Up {
                id,
                neg,
                local,
                out,
            } => self.peer_up(id, &neg, local, out),
            PeerEvent::Update { id, update } => self.update(id, update).await,
            PeerEvent::Down { id, keep_stale } => self.peer_down(id, keep_stale).await,
            PeerEvent::Refresh { id } => self.refresh_asked(id),
        }
    }

    /// Peer `id` is established: it joins its update group and is sent
    /// the group's table, then End-of-RIB per family.
    fn peer_up(
        &mut self,
        id: PeerId,
        neg: &Negotiated,
        local: IpAddr,
        out: mpsc::UnboundedSender<Wire>,
    ) {
        let Some(slot) = self.peers.get_mut(&id) else {
            return;
        };
        let info = PeerInfo {
            addr: slot.params.addr,
            asn: slot.params.asn,
            router_id: neg.peer_open.router_id,
            ibgp: neg.ctx.ibgp,
            rr_client: slot.params.rr_client,
        };
        self.rib.add_peer(id, info.clone());
        let mut families = neg.families.clone();
        families.sort_unstable();
        let group = GroupKey {
            ibgp: info.ibgp,
            rr_client: info.rr_client,
            local,
            next_hop_self: slot.params.next_hop_self,
            export_local_only: slot.params.export_local_only,
            families,
        };
        slot.session = Some(Established {
            out,
            ctx: neg.ctx,
            group: group.clone(),
            member: Member::default(),
            eor_received: HashSet::new(),
            refreshed: None,
            refresh_due: None,
        });
        // Initial advertisement (its group's table; a new group's
        // computed first), then End-of-RIB per family.
        let fresh = !self.groups.contains_key(&group);
        self.groups
            .entry(group.clone())
            .or_insert_with(|| Group::new(info))
            .members
            .insert(id);
        if fresh {
            let all: Vec<(Prefix, Option<Best>)> =
                self.rib.iter_best().map(|(p, b)| (p, Some(b))).collect();
            self.export_group(&group, &all);
        } else {
            self.resend(id);
        }
        if let Some(s) = self.peers.get(&id).and_then(|p| p.session.as_ref()) {
            for (afi, safi) in &s.group.families {
                let eor = Message::Update(Update::end_of_rib(*afi, *safi));
                let _ = s.out.send(eor.encode(&s.ctx).into());
            }
        }
    }

    /// Peer `id`'s session went down: its routes go, or stay stale for
    /// `keep_stale` seconds (graceful restart).
    async fn peer_down(&mut self, id: PeerId, keep_stale: Option<u16>) {
        self.leave_group(id);
        if let Some(slot) = self.peers.get_mut(&id) {
            slot.session = None;
            slot.status.lock().expect("status").prefixes_sent = 0;
        }
        let changes = self.rib.peer_down(id, keep_stale.is_some());
        if let Some(secs) = keep_stale {
            let after = Duration::from_secs(u64::from(secs.max(1)));
            let timer = self.timer(after, ToRib::StaleTimeout { id });
            if let Some(slot) = self.peers.get_mut(&id) {
                slot.stale_timer = Some(timer);
            }
        }
        self.propagate(changes).await;
    }

    /// Peer `id` sent ROUTE-REFRESH: served now, or once [`REFRESH_GAP`]
    /// after the last one (any number asked meanwhile are served once).
    fn refresh_asked(&mut self, id: PeerId) {
        let now = tokio::time::Instant::now();
        let wait = match self.peers.get(&id).and_then(|p| p.session.as_ref()) {
            None => return,
            Some(s) if s.refresh_due.is_some() => return, // folded
            Some(s) => s
                .refreshed
                .map(|t| (t + REFRESH_GAP).saturating_duration_since(now)),
        };
        match wait.filter(|w| !w.is_zero()) {
            Some(w) => {
                let timer = self.timer(w, ToRib::RefreshDue { id });
                if let Some(s) = self.peers.get_mut(&id).and_then(|p| p.session.as_mut()) {
                    s.refresh_due = Some(timer);
                }
            }
            None => self.refresh(id),
        }
    }

    /// Re-advertises everything to `id` (a ROUTE-REFRESH served).
    fn refresh(&mut self, id: PeerId) {
        let Some(s) = self.peers.get_mut(&id).and_then(|p| p.session.as_mut()) else {
            return;
        };
        s.refreshed = Some(tokio::time::Instant::now());
        s.refresh_due = None;
        self.resend(id);
    }

    /// An UPDATE from peer `id`.
    async fn update(&mut self, id: PeerId, u: Update) {
        let Some(slot) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(sess) = slot.session.as_mut() else {
            return;
        };
        if let Some(why) = &u.treat_as_withdraw {
            self.shared.treat_as_withdraw.fetch_add(1, Relaxed);
            tracing::warn!(peer = %slot.params.addr, "UPDATE treated as withdraw (RFC 7606): {why}");
        }
        if let Some((afi, _)) = u.is_end_of_rib() {
            sess.eor_received.insert(afi);
            let c = self.rib.flush_stale(id, afi == AFI_IPV6);
            self.propagate(c).await;
            self.finish_restart(false).await;
            return;
        }
        let changes = self.rib.apply_update(id, u, sess.ctx.ibgp, slot.params.asn);
        let count = self.rib.prefix_count(id);
        if let Some(slot) = self.peers.get(&id) {
            let mut st = slot.status.lock().expect("status");
            st.updates_in += 1;
            st.prefixes_received = count;
            if let Some(max) = slot.params.max_prefixes
                && count > max
            {
                tracing::warn!(peer = %slot.params.addr, count, max, "maximum prefixes exceeded");
                // RFC 4486: Cease / maximum number of prefixes reached.
                if let Some(tx) = &slot.incoming {
                    let _ = tx.try_send(PeerCmd::Cease(err::CEASE_MAX_PREFIX));
                }
            }
        }
        self.propagate(changes).await;
    }
}

async fn accept_loop(
    l: Arc<TcpListener>,
    tx: mpsc::Sender<ToRib>,
    mut shut: watch::Receiver<Stop>,
) {
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((s, a)) => {
                    if tx.send(ToRib::Incoming(s, a)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shut.changed() => return,
        }
    }
}

/// What a peer's status says of its BFD (`on`: it has BFD): the state of
/// its session where one already runs (settings changed in place, or the
/// peer re-added for another setting), Down until one does.
fn bfd_status(bfd: Option<&crate::bfd::Bfd>, addr: IpAddr, on: bool) -> Option<crate::bfd::State> {
    on.then(|| {
        bfd.and_then(|b| b.state(addr))
            .unwrap_or(crate::bfd::State::Down)
    })
}

/// How soon BFD is started again after its port was taken.
const BFD_RETRY: Duration = Duration::from_secs(2);
/// How soon a BFD event a peer's full command queue refused is handed on
/// again.
const BFD_EVENT_RETRY: Duration = Duration::from_millis(20);

impl RibTask {
    /// Runs a BFD session with each peer that has BFD on (none: no BFD
    /// socket is opened).
    fn sync_bfd(&mut self) {
        let want: std::collections::BTreeMap<IpAddr, crate::bfd::Params> = self
            .peers
            .values()
            .filter_map(|p| p.params.bfd.map(|b| (p.params.addr, b)))
            .collect();
        if self.bfd.is_none() && !want.is_empty() {
            match crate::bfd::Bfd::start(self.bfd_tx.clone()) {
                Ok(b) => self.bfd = Some(b),
                Err(e) => {
                    // Say so, and try again (a speaker before us may still
                    // hold the port for a moment).
                    tracing::error!("BFD: cannot listen on UDP port 3784 (again in 2 s): {e}");
                    self.bfd_retry = Some(self.timer(BFD_RETRY, ToRib::Bfd(None)));
                    return;
                }
            }
        }
        if let Some(b) = &self.bfd {
            b.set(want);
        }
    }

    /// A BFD session changed: shown in the peer's status; from Up to Down
    /// (not AdminDown: RFC 5882 §3.2), the BGP session is closed.
    fn bfd_event(&mut self, ev: crate::bfd::Event) {
        self.bfd_event_retry.remove(&ev.peer);
        let Some(slot) = self.peers.values().find(|p| p.params.addr == ev.peer) else {
            return;
        };
        // A peer whose BFD was just turned off: its session's last word
        // (AdminDown) is not its state.
        if slot.params.bfd.is_none() {
            return;
        }
        slot.status.lock().expect("status").bfd = Some(ev.change.to);
        let Some(tx) = &slot.incoming else { return };
        let cmd = if ev.change.failed() {
            tracing::warn!(peer = %ev.peer, "BFD session down ({}): closing the BGP session", ev.change.diag);
            PeerCmd::Cease(err::CEASE_BFD_DOWN)
        } else if ev.change.to == crate::bfd::State::Up {
            PeerCmd::PathUp
        } else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(cmd) {
            // Not lost: the same event again in a moment.
            let t = self.timer(BFD_EVENT_RETRY, ToRib::Bfd(Some(ev)));
            self.bfd_event_retry.insert(ev.peer, t);
        }
    }
}
