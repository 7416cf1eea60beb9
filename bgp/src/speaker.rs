//! The speaker: listener, one task per peer ([`crate::peer`]), one RIB task.
//!
//! ```text
//!  listener ──TcpStream──▶ peer task (Session FSM per link, socket, timers)
//!                            │  PeerEvent::{Up, Update, Down, Refresh}    ▲ encoded UPDATEs
//!                            ▼                                            │
//!                          RIB task (Rib, Adj-RIB-Out per update group, Fib) ┘──▶ kernel
//! control socket ──Show──▶ RIB task
//! ```
//! Peer tasks own their connections and carry out the FSM's actions; the
//! RIB task is the only owner of routing state. Tasks end when the
//! speaker's shutdown signal fires; peers then send Cease.
//!
//! Graceful restart as the restarting speaker: kernel routes survive a stop
//! or crash. On start, routes with our protocol found in the kernel are
//! kept and marked stale; they are replaced as routes are relearned, and
//! the rest are removed once every configured peer has sent End-of-RIB, or
//! after the restart time, whichever comes first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use margay_api::status::{NeighborView, RouteView};
use margay_delta::Change;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::{Config, Neighbor};
use crate::fsm::{SessionConfig, State};
use crate::group::{Decided, Encoded, Group, GroupKey, Member, Span};
use crate::kernel::{Fib, FibOp, FibWriter};
use crate::net::canonical;
use crate::packet::consts::{AFI_IPV4, AFI_IPV6, SAFI_UNICAST, err};
use crate::packet::{Attrs, Ctx, GracefulRestartCap, Message, Prefix, Update};
use crate::peer::{PeerCmd, PeerEvent, PeerStatus, PeerTask, Stop, Transport};
use crate::prefix_map::PrefixMap;
use crate::rib::{Best, ImportFilter, LOCAL, NextHops, PeerId, PeerInfo, Rib};
use crate::state::Shared;
use crate::task::Owned;
use crate::{Error, Result};

/// The peer a group's export is computed for: none (no path's source),
/// so each member's own routes are left to [`Member::fan_out`].
const GROUP_EXPORT: PeerId = PeerId::MAX;

/// The most peer events handled before their routes are exported.
const BATCH: usize = 1024;

/// First reconnect delay; it doubles per failure up to 30 s. Short, because
/// the usual failure is a peer (a node) not listening yet.
const RETRY_BASE: Duration = Duration::from_millis(250);

enum ToRib {
    StaleTimeout { id: PeerId },
    RefreshDue { id: PeerId },
    RestartTimeout,
    Incoming(TcpStream, SocketAddr),
    Routes(oneshot::Sender<Vec<RouteView>>),
    SetNeighbors(Vec<Neighbor>, oneshot::Sender<()>),
    SetOriginate(Vec<Prefix>),
    SetImport(Vec<Prefix>),
    SetCommunities(Vec<u32>),
    SetRestartTime(u16),
}

/// Best routes learned from peers (locally originated ones left out):
/// prefix → next hops. What an embedding program (the agent) programs
/// into the kernel itself when `fib` is off.
pub type LearnedRoutes = BTreeMap<Prefix, NextHops>;

/// How a peer is configured, whether from `[[neighbor]]` or a listen range.
#[derive(Debug, Clone)]
struct PeerParams {
    addr: IpAddr,
    port: u16,
    asn: u32,
    rr_client: bool,
    next_hop_self: bool,
    max_prefixes: Option<usize>,
    password: Option<String>,
    gtsm_hops: Option<u8>,
    dynamic: bool,
    export_local_only: bool,
    session: SessionConfig,
}

impl PeerParams {
    fn configured(cfg: &Config, n: &Neighbor, restarting: bool) -> Self {
        let session = SessionConfig {
            local_as: cfg.asn,
            peer_as: n.asn,
            router_id: cfg.router_id,
            hold_time: n.hold_time,
            keepalive: n.keepalive,
            passive: n.passive,
            families: families_for(n.address),
            graceful_restart: n.graceful_restart.then(|| {
                let mut cap = gr_cap(cfg, restarting);
                if let Some(t) = n.restart_time {
                    cap.restart_time = t;
                }
                cap
            }),
            retry_base: RETRY_BASE,
            retry_max: Duration::from_secs(30),
        };
        Self {
            addr: n.address,
            port: n.port,
            asn: n.asn,
            rr_client: n.route_reflector_client,
            next_hop_self: n.next_hop_self,
            max_prefixes: n.max_prefixes,
            password: n.password.clone(),
            gtsm_hops: n.ttl_security,
            dynamic: false,
            export_local_only: n.export_local_only,
            session,
        }
    }
}

struct PeerSlot {
    params: PeerParams,
    /// The configuration it came from (`None`: a dynamic neighbor).
    source: Option<Neighbor>,
    status: Arc<Mutex<PeerStatus>>,
    /// Commands to the peer task; dropping it ends the task (Cease/peer
    /// de-configured). `None`: a passive neighbor nobody has connected
    /// from yet, whose task starts with the first connection (a full mesh
    /// of many nodes where the other side dials costs no task per node).
    incoming: Option<mpsc::Sender<PeerCmd>>,
    session: Option<Established>,
    /// Graceful restart: when the peer's stale routes are dropped (RFC 4724
    /// restart time); cancelled with the slot.
    stale_timer: Option<Owned>,
}

struct Established {
    out: mpsc::UnboundedSender<crate::peer::Wire>,
    ctx: Ctx,
    /// Its update group (whose Adj-RIB-Out is what it was told, less
    /// what `member` holds back); its families are the session's.
    group: GroupKey,
    member: Member,
    eor_received: HashSet<u16>,
    /// When a ROUTE-REFRESH was last served, and the timer of one asked for
    /// since (any number of them are served once, [`REFRESH_GAP`] after).
    refreshed: Option<tokio::time::Instant>,
    refresh_due: Option<Owned>,
}

/// The shortest time between two full re-advertisements a peer's
/// ROUTE-REFRESH messages cause: a peer that floods them gets one per gap.
const REFRESH_GAP: Duration = Duration::from_secs(5);

/// A running speaker.
///
/// Its tasks (the RIB task, the listener, one task per peer) belong to it:
/// dropping it, [`Speaker::stop`] or [`Speaker::shutdown`] ends them, peers
/// first sending Cease. [`Speaker::stopped`] resolves when the RIB task has
/// ended, whether asked to or not (a panic), so an embedding program can
/// treat an unexpected end as fatal.
pub struct Speaker {
    tx: mpsc::Sender<ToRib>,
    shutdown: watch::Sender<Stop>,
    learned: watch::Receiver<LearnedRoutes>,
    synced: watch::Receiver<bool>,
    asn: u32,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speaker")
            .field("asn", &self.asn)
            .finish_non_exhaustive()
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        // A speaker stopped on purpose keeps its mode; otherwise: Cease.
        self.shutdown.send_if_modified(|s| {
            let run = *s == Stop::Run;
            if run {
                *s = Stop::Cease;
            }
            run
        });
    }
}

impl Speaker {
    /// Starts the speaker: binds the listener, adopts our kernel routes
    /// left by a previous run, starts every configured peer.
    pub async fn start(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let (tx, rx) = mpsc::channel::<ToRib>(1024);
        // Short, so a busy RIB slows peers down (TCP backpressure) instead of
        // buffering their UPDATEs.
        let (peer_tx, peer_rx) = mpsc::channel::<PeerEvent>(64);
        let (shutdown, shut_rx) = watch::channel(Stop::Run);
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
        };
        for n in &cfg.neighbors {
            let params = PeerParams::configured(&cfg, n, restarting);
            task.add_peer(params, Some(n.clone()));
        }
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
        // task after its peers said Cease); neither is ever left behind.
        tokio::spawn(accept_loop(listener, tx.clone(), shut_rx.clone()));
        tokio::spawn(task.run(rx, peer_rx));
        Ok(Self {
            tx,
            shutdown,
            learned,
            synced,
            asn: cfg.asn,
            shared,
        })
    }

    async fn send(&self, m: ToRib) -> Result<()> {
        self.tx.send(m).await.map_err(|_| Error::Stopped)
    }

    /// Replaces the configured neighbors: peers no longer listed are
    /// closed (Cease/peer de-configured) and their routes withdrawn, new
    /// ones start, changed ones restart; unchanged sessions stay up.
    /// Each neighbor is validated first (nothing changes on an error).
    /// Returns once the RIB task has taken the list, so [`Speaker::synced`]
    /// from then on speaks of these neighbors.
    pub async fn set_neighbors(&self, neighbors: Vec<Neighbor>) -> Result<()> {
        for (i, n) in neighbors.iter().enumerate() {
            crate::config::validate_neighbor(n, self.asn)
                .map_err(|m| Error::Config(format!("neighbor {}: {m}", n.address)))?;
            if neighbors[..i].iter().any(|m| m.address == n.address) {
                return Err(Error::Config(format!("neighbor {}: duplicate", n.address)));
            }
        }
        let (done, rx) = oneshot::channel();
        self.send(ToRib::SetNeighbors(neighbors, done)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Replaces the prefixes we originate (withdrawing the ones dropped).
    pub async fn set_originate(&self, prefixes: Vec<Prefix>) -> Result<()> {
        self.send(ToRib::SetOriginate(prefixes)).await
    }

    /// Replaces the import filter (routes accepted from now on; an empty
    /// list accepts everything).
    pub async fn set_import(&self, allowed: Vec<Prefix>) -> Result<()> {
        self.send(ToRib::SetImport(allowed)).await
    }

    /// True once every configured peer has sent End-of-RIB for each of its
    /// families (the learned routes are complete); false again while a
    /// configured peer is down or has not finished its initial update.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// Best routes learned from peers, kept current (only with `fib` off:
    /// the program embedding the speaker programs them).
    pub fn learned(&self) -> watch::Receiver<LearnedRoutes> {
        self.learned.clone()
    }

    /// The sessions, by address.
    pub fn neighbors(&self) -> Vec<NeighborView> {
        let mut v: Vec<NeighborView> = self
            .shared
            .peers
            .lock()
            .expect("peers")
            .values()
            .map(|st| st.lock().expect("status").view())
            .collect();
        v.sort_by_key(|n| n.address);
        v
    }

    /// The best routes, by prefix.
    pub async fn routes(&self) -> Result<Vec<RouteView>> {
        let (reply, rx) = oneshot::channel();
        self.send(ToRib::Routes(reply)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The speaker's metrics, for a Prometheus registry.
    pub fn metrics(&self) -> crate::metrics::SpeakerMetrics {
        crate::metrics::SpeakerMetrics::new(self.shared.clone())
    }

    /// Resolves when the RIB task has ended (after a stop, or a panic).
    pub async fn stopped(&self) {
        self.tx.closed().await
    }

    /// Asks every task to end (peers send Cease); see [`Speaker::stopped`].
    pub fn stop(&self) {
        let _ = self.shutdown.send(Stop::Cease);
    }

    /// Like [`Speaker::stop`], but sessions are closed without a
    /// NOTIFICATION: peers that negotiated graceful restart keep our routes
    /// (stale) until the speaker that replaces this one has re-advertised
    /// them (RFC 4724), so traffic towards us keeps flowing.
    pub fn stop_graceful(&self) {
        let _ = self.shutdown.send(Stop::Silent);
    }

    /// Replaces the communities added to every export (`ASN:VALUE`): every
    /// established peer is sent the routes whose attributes change; no
    /// session is reset.
    pub async fn set_communities(&self, communities: Vec<String>) -> Result<()> {
        let values = communities
            .iter()
            .map(|c| crate::config::parse_community(c))
            .collect::<Result<Vec<u32>>>()?;
        self.send(ToRib::SetCommunities(values)).await
    }

    /// Replaces the restart time announced in the graceful restart
    /// capability (for neighbors without their own): from each session's
    /// next OPEN on; no session is reset.
    pub async fn set_restart_time(&self, secs: u16) -> Result<()> {
        if secs > 4095 {
            return Err(Error::Config(format!(
                "restart_time {secs} is more than 4095 seconds"
            )));
        }
        self.send(ToRib::SetRestartTime(secs)).await
    }

    /// Stops every session (Cease) and the tasks, and waits for them (at
    /// most a second). Kernel routes stay (forwarding state is preserved for
    /// graceful restart).
    pub async fn shutdown(self) {
        self.stop();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stopped()).await;
    }
}

fn set_listener_md5(listener: &TcpListener, n: &Neighbor) -> Result<()> {
    let v6 = listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    crate::net::set_md5(listener, n.address, n.password.as_deref(), v6).map_err(|e| {
        Error::Config(format!(
            "neighbor {}: cannot set TCP MD5 key: {e}",
            n.address
        ))
    })
}

fn families_for(_addr: IpAddr) -> Vec<(u16, u8)> {
    vec![(AFI_IPV4, SAFI_UNICAST), (AFI_IPV6, SAFI_UNICAST)]
}

fn gr_cap(cfg: &Config, restarting: bool) -> GracefulRestartCap {
    GracefulRestartCap {
        restarting,
        notification: false,
        restart_time: cfg.restart_time,
        families: families_for(IpAddr::from([0, 0, 0, 0]))
            .into_iter()
            .map(|(a, s)| (a, s, cfg.fib || cfg.forwarding_preserved))
            .collect(),
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

struct RibTask {
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
}

impl RibTask {
    fn add_peer(&mut self, params: PeerParams, source: Option<Neighbor>) -> PeerId {
        let id = self.next_id;
        self.next_id += 1;
        // A configured passive neighbor waits for its connection without a
        // task (Active, as its FSM would say).
        let lazy = params.session.passive && source.is_some();
        let status = Arc::new(Mutex::new(PeerStatus {
            address: params.addr,
            asn: params.asn,
            state: if lazy { State::Active } else { State::Idle },
            since: Some(Instant::now()),
            prefixes_received: 0,
            prefixes_sent: 0,
            updates_in: 0,
            updates_out: 0,
            last_error: None,
            dynamic: params.dynamic,
            too_big: 0,
        }));
        self.shared
            .peers
            .lock()
            .expect("peers")
            .insert(id, status.clone());
        self.peers.insert(
            id,
            PeerSlot {
                params,
                source,
                status,
                incoming: None,
                session: None,
                stale_timer: None,
            },
        );
        if !lazy {
            self.start_peer(id);
        }
        id
    }

    /// Peer `id`'s command channel, its task started first if it has none.
    fn start_peer(&mut self, id: PeerId) -> Option<mpsc::Sender<PeerCmd>> {
        let slot = self.peers.get_mut(&id)?;
        if let Some(tx) = &slot.incoming {
            return Some(tx.clone());
        }
        let (itx, irx) = mpsc::channel(4);
        let task = PeerTask {
            id,
            transport: Transport {
                addr: SocketAddr::new(slot.params.addr, slot.params.port),
                password: slot.params.password.clone(),
                gtsm_hops: slot.params.gtsm_hops,
            },
            session: crate::fsm::Session::new(slot.params.session.clone()),
            events: self.peer_tx.clone(),
            status: slot.status.clone(),
            incoming: irx,
            shutdown: self.shutdown.clone(),
        };
        slot.incoming = Some(itx.clone());
        self.peer_tasks.spawn(task.run());
        Some(itx)
    }

    /// Forgets a peer; dropping its command channel ends its task, which
    /// closes the session with Cease/peer de-configured.
    fn remove_peer(&mut self, id: PeerId) -> Option<PeerSlot> {
        self.leave_group(id);
        self.shared.peers.lock().expect("peers").remove(&id);
        self.peers.remove(&id)
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

    async fn run(mut self, mut rx: mpsc::Receiver<ToRib>, mut peer_rx: mpsc::Receiver<PeerEvent>) {
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
            ToRib::StaleTimeout { id } => {
                let mut c = self.rib.flush_stale(id, false);
                c.extend(self.rib.flush_stale(id, true));
                self.propagate(c).await;
            }
            ToRib::RefreshDue { id } => self.refresh(id),
            ToRib::RestartTimeout => self.finish_restart(true).await,
            ToRib::Routes(reply) => {
                let _ = reply.send(self.routes());
            }
            ToRib::SetNeighbors(list, done) => {
                self.set_neighbors(list).await;
                // Whoever set them reads `synced` next: it must speak of
                // these neighbors already.
                self.publish_sync();
                let _ = done.send(());
            }
            ToRib::SetOriginate(list) => {
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
            ToRib::SetImport(allowed) => self.rib.set_import_filter(ImportFilter { allowed }),
            ToRib::SetCommunities(values) => {
                if self.communities != values {
                    self.communities = values;
                    // Every established peer hears the routes whose
                    // exported attributes changed (its Adj-RIB-Out decides).
                    let all: Vec<(Prefix, Option<Best>)> =
                        self.rib.iter_best().map(|(p, b)| (p, Some(b))).collect();
                    self.export_all(&all);
                }
            }
            ToRib::SetRestartTime(secs) => {
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
        }
    }

    async fn set_neighbors(&mut self, list: Vec<Neighbor>) {
        let want: HashMap<IpAddr, Neighbor> = list.into_iter().map(|n| (n.address, n)).collect();
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.source
                    .as_ref()
                    .is_some_and(|src| want.get(&src.address) != Some(src))
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
        self.propagate(changes).await;
        self.finish_restart(false).await;
    }

    async fn peer_event(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Up {
                id,
                neg,
                local,
                out,
            } => {
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
            PeerEvent::Update { id, update } => self.update(id, update).await,
            PeerEvent::Down { id, keep_stale } => {
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
            PeerEvent::Refresh { id } => {
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

    /// The update group of peer `id`, while it is established.
    fn group_of(&self, id: PeerId) -> Option<GroupKey> {
        self.peers
            .get(&id)
            .and_then(|p| p.session.as_ref())
            .map(|s| s.group.clone())
    }

    /// Peer `id` (established) leaves its update group; the last member
    /// out drops the group's table.
    fn leave_group(&mut self, id: PeerId) {
        let Some(key) = self.group_of(id) else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&key) {
            g.members.remove(&id);
            if g.members.is_empty() {
                self.groups.remove(&key);
            }
        }
    }

    /// Sends peer `id` its group's whole table (less its own routes), as
    /// to a peer told nothing yet.
    fn resend(&mut self, id: PeerId) {
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

    fn incoming(&mut self, stream: TcpStream, from: SocketAddr) {
        let ip = canonical(from.ip());
        let known = self
            .peers
            .iter()
            .find(|(_, p)| p.params.addr == ip)
            .map(|(id, _)| *id);
        if let Some(id) = known {
            if let Some(tx) = self.start_peer(id) {
                let _ = tx.try_send(PeerCmd::Incoming(stream));
            }
            return;
        }
        let host = Prefix::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix");
        let Some(r) = self
            .cfg
            .listen_ranges
            .iter()
            .find(|r| r.prefix.contains(&host))
            .cloned()
        else {
            tracing::info!(%from, "connection from an unknown address refused");
            return;
        };
        let session = SessionConfig {
            local_as: self.cfg.asn,
            peer_as: r.asn,
            router_id: self.cfg.router_id,
            hold_time: r.hold_time,
            keepalive: None,
            passive: true,
            families: families_for(ip),
            graceful_restart: r
                .graceful_restart
                .then(|| gr_cap(&self.cfg, self.restarting)),
            retry_base: RETRY_BASE,
            retry_max: Duration::from_secs(30),
        };
        let id = self.add_peer(
            PeerParams {
                addr: ip,
                port: 179,
                asn: r.asn,
                rr_client: r.route_reflector_client,
                next_hop_self: false,
                max_prefixes: None,
                password: None,
                gtsm_hops: None,
                dynamic: true,
                export_local_only: false,
                session,
            },
            None,
        );
        if let Some(tx) = self.start_peer(id) {
            let _ = tx.try_send(PeerCmd::Incoming(stream));
        }
    }

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

    async fn propagate(&mut self, changes: Vec<(Prefix, Option<Best>)>) {
        if changes.is_empty() {
            return;
        }
        if let Some(learned) = &self.learned {
            learned.send_if_modified(|m| {
                let mut modified = false;
                for (p, b) in &changes {
                    let want = b
                        .as_ref()
                        .filter(|b| b.best.peer != LOCAL && !b.next_hops.is_empty())
                        .map(|b| &b.next_hops);
                    match margay_delta::change(want, m.get(p).as_ref()) {
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
                .map(|(p, b)| {
                    let hops = b
                        .as_ref()
                        .filter(|b| b.best.peer != LOCAL && !b.next_hops.is_empty())
                        .map(|b| b.next_hops.clone());
                    (*p, hops)
                })
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
    fn flush_exports(&mut self) {
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
    fn export_all(&mut self, changes: &[(Prefix, Option<Best>)]) {
        let keys: Vec<GroupKey> = self.groups.keys().cloned().collect();
        for key in keys {
            self.export_group(&key, changes);
        }
    }

    /// Exports `changes` once for group `key` (the attributes its members
    /// are sent), then sends each member what that means for it.
    fn export_group(&mut self, key: &GroupKey, changes: &[(Prefix, Option<Best>)]) {
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
    fn routes(&self) -> Vec<RouteView> {
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
