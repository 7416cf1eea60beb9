//! The tokio driver: listener, one task per peer, one RIB task.
//!
//! ```text
//!  listener ──TcpStream──▶ peer task (Session FSM, socket, timers)
//!                            │  ToRib::{Up, Update, Down}      ▲ encoded UPDATEs
//!                            ▼                                 │
//!                          RIB task (Rib, Adj-RIB-Out per peer, Fib) ──▶ kernel
//! control socket ──Show──▶ RIB task
//! ```
//! Peer tasks own their connection and carry out the FSM's actions; the RIB
//! task is the only owner of routing state. Tasks end when the speaker's
//! shutdown signal fires; peers then send Cease.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::fsm::{Action, DownReason, Event, Negotiated, Session, SessionConfig, State, Timer};
use crate::kernel::{Fib, FibOp};
use crate::packet::consts::{AFI_IPV4, AFI_IPV6, SAFI_UNICAST, err};
use crate::packet::{
    Attrs, Ctx, GracefulRestartCap, Message, Prefix, Update, UpdateBuilder, frame_len,
};
use crate::rib::{Best, ImportPolicy, LOCAL, PeerId, PeerInfo, Rib};
use crate::{Error, Result};

/// What a peer looks like from outside (control socket, metrics).
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Peer address.
    pub address: IpAddr,
    /// Peer AS.
    pub asn: u32,
    /// Session state.
    pub state: State,
    /// Seconds since the state last changed.
    #[serde(skip)]
    pub since: Option<Instant>,
    /// Prefixes received and accepted.
    pub prefixes_received: usize,
    /// Prefixes advertised.
    pub prefixes_sent: usize,
    /// UPDATE messages received.
    pub updates_in: u64,
    /// UPDATE messages sent.
    pub updates_out: u64,
    /// Why the session last went down.
    pub last_error: Option<String>,
    /// Dynamic neighbor from a listen range.
    pub dynamic: bool,
}

#[allow(clippy::large_enum_variant)] // UPDATEs by value, the common case
enum ToRib {
    Up {
        id: PeerId,
        neg: Box<Negotiated>,
        local: IpAddr,
        out: mpsc::UnboundedSender<Vec<u8>>,
    },
    Update {
        id: PeerId,
        update: Update,
    },
    Down {
        id: PeerId,
        keep_stale: Option<u16>,
    },
    StaleTimeout {
        id: PeerId,
    },
    Refresh {
        id: PeerId,
    },
    Incoming(TcpStream, SocketAddr),
    Show {
        what: String,
        reply: oneshot::Sender<serde_json::Value>,
    },
}

struct PeerSlot {
    addr: IpAddr,
    asn: u32,
    rr_client: bool,
    next_hop_self: bool,
    max_prefixes: Option<usize>,
    status: Arc<Mutex<PeerStatus>>,
    incoming: mpsc::Sender<TcpStream>,
    session: Option<Established>,
}

struct Established {
    out: mpsc::UnboundedSender<Vec<u8>>,
    ctx: Ctx,
    info: PeerInfo,
    local: IpAddr,
    families: Vec<(u16, u8)>,
    adj_out: HashMap<Prefix, Attrs>,
}

/// A running speaker.
#[derive(Debug)]
pub struct Speaker {
    tx: mpsc::Sender<ToRibWrap>,
    shutdown: watch::Sender<bool>,
}

// Wrapper so `Speaker` can derive Debug without exposing ToRib.
struct ToRibWrap(ToRib);
impl std::fmt::Debug for ToRibWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ToRib")
    }
}

fn jitter(d: Duration) -> Duration {
    // 75-100% of d, so two speakers retrying in lockstep drift apart.
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.75 + (n % 1000) as f64 / 4000.0)
}

impl Speaker {
    /// Starts the speaker: binds the listener, starts every configured peer.
    pub async fn start(cfg: Config) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<ToRibWrap>(1024);
        let (shutdown, shut_rx) = watch::channel(false);
        let listen = cfg
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 179)));
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {listen}: {e}")))?;
        let fib = if cfg.fib { Some(Fib::new()?) } else { None };
        let mut rib = Rib::new(cfg.asn, cfg.router_id, cfg.cluster_id);
        rib.set_import_policy(ImportPolicy {
            allowed: cfg.import_prefixes.clone(),
        });
        let mut task = RibTask {
            cfg: cfg.clone(),
            rib,
            peers: HashMap::new(),
            fib,
            tx: tx.clone(),
            shutdown: shut_rx.clone(),
            next_id: 1,
            communities: cfg.community_values(),
        };
        for n in &cfg.neighbors {
            let sc = SessionConfig {
                local_as: cfg.asn,
                peer_as: n.asn,
                router_id: cfg.router_id,
                hold_time: n.hold_time,
                keepalive: n.keepalive,
                passive: n.passive,
                families: families_for(n.address),
                graceful_restart: n.graceful_restart.then(|| gr_cap(&cfg, n.address)),
                retry_base: Duration::from_secs(1),
                retry_max: Duration::from_secs(30),
            };
            task.add_peer(
                n.address,
                n.port,
                n.asn,
                n.route_reflector_client,
                n.next_hop_self,
                n.max_prefixes,
                sc,
                false,
            );
        }
        let mut changes = Vec::new();
        for o in &cfg.originate {
            changes.extend(task.rib.originate(o.prefix, Attrs::default()));
        }
        task.propagate(changes).await;
        tokio::spawn(accept_loop(listener, tx.clone(), shut_rx.clone()));
        tokio::spawn(task.run(rx));
        Ok(Self { tx, shutdown })
    }

    /// Asks the RIB task for `neighbors` or `routes` as JSON.
    pub async fn show(&self, what: &str) -> Result<serde_json::Value> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ToRibWrap(ToRib::Show {
                what: what.to_owned(),
                reply,
            }))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Stops every session (Cease) and the tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn families_for(_addr: IpAddr) -> Vec<(u16, u8)> {
    vec![(AFI_IPV4, SAFI_UNICAST), (AFI_IPV6, SAFI_UNICAST)]
}

fn gr_cap(cfg: &Config, addr: IpAddr) -> GracefulRestartCap {
    GracefulRestartCap {
        restarting: false,
        notification: false,
        restart_time: cfg.restart_time,
        families: families_for(addr)
            .into_iter()
            .map(|(a, s)| (a, s, cfg.fib))
            .collect(),
    }
}

async fn accept_loop(l: TcpListener, tx: mpsc::Sender<ToRibWrap>, mut shut: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((s, a)) => {
                    let _ = s.set_nodelay(true);
                    if tx.send(ToRibWrap(ToRib::Incoming(s, a))).await.is_err() { return; }
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
    rib: Rib,
    peers: HashMap<PeerId, PeerSlot>,
    fib: Option<Fib>,
    tx: mpsc::Sender<ToRibWrap>,
    shutdown: watch::Receiver<bool>,
    next_id: PeerId,
    communities: Vec<u32>,
}

impl RibTask {
    #[allow(clippy::too_many_arguments)]
    fn add_peer(
        &mut self,
        addr: IpAddr,
        port: u16,
        asn: u32,
        rr_client: bool,
        next_hop_self: bool,
        max_prefixes: Option<usize>,
        sc: SessionConfig,
        dynamic: bool,
    ) -> PeerId {
        let id = self.next_id;
        self.next_id += 1;
        let status = Arc::new(Mutex::new(PeerStatus {
            address: addr,
            asn,
            state: State::Idle,
            since: Some(Instant::now()),
            prefixes_received: 0,
            prefixes_sent: 0,
            updates_in: 0,
            updates_out: 0,
            last_error: None,
            dynamic,
        }));
        let (itx, irx) = mpsc::channel(4);
        self.peers.insert(
            id,
            PeerSlot {
                addr,
                asn,
                rr_client,
                next_hop_self,
                max_prefixes,
                status: status.clone(),
                incoming: itx,
                session: None,
            },
        );
        let pt = PeerTask {
            id,
            addr: SocketAddr::new(addr, port),
            session: Session::new(sc),
            tx: self.tx.clone(),
            status,
            incoming: irx,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(pt.run());
        id
    }

    async fn run(mut self, mut rx: mpsc::Receiver<ToRibWrap>) {
        let mut shut = self.shutdown.clone();
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m.0, None => return },
                _ = shut.changed() => return,
            };
            self.handle(msg).await;
        }
    }

    async fn handle(&mut self, msg: ToRib) {
        match msg {
            ToRib::Incoming(stream, from) => self.incoming(stream, from).await,
            ToRib::Up {
                id,
                neg,
                local,
                out,
            } => {
                let Some(slot) = self.peers.get_mut(&id) else {
                    return;
                };
                let info = PeerInfo {
                    addr: slot.addr,
                    asn: slot.asn,
                    router_id: neg.peer_open.router_id,
                    ibgp: neg.ctx.ibgp,
                    rr_client: slot.rr_client,
                };
                self.rib.add_peer(id, info.clone());
                slot.session = Some(Established {
                    out,
                    ctx: neg.ctx,
                    info,
                    local,
                    families: neg.families.clone(),
                    adj_out: HashMap::new(),
                });
                // Initial advertisement, then End-of-RIB per family.
                let all: Vec<(Prefix, Option<Best>)> =
                    self.rib.iter_best().map(|(p, b)| (p, Some(b))).collect();
                self.export_to(id, &all);
                if let Some(s) = self.peers.get(&id).and_then(|p| p.session.as_ref()) {
                    for (afi, safi) in &s.families {
                        let _ = s
                            .out
                            .send(Message::Update(Update::end_of_rib(*afi, *safi)).encode(&s.ctx));
                    }
                }
            }
            ToRib::Update { id, update } => self.update(id, update).await,
            ToRib::Down { id, keep_stale } => {
                if let Some(slot) = self.peers.get_mut(&id) {
                    slot.session = None;
                }
                let changes = self.rib.peer_down(id, keep_stale.is_some());
                if let Some(secs) = keep_stale {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(secs.max(1) as u64)).await;
                        let _ = tx.send(ToRibWrap(ToRib::StaleTimeout { id })).await;
                    });
                }
                self.propagate(changes).await;
            }
            ToRib::StaleTimeout { id } => {
                let mut c = self.rib.flush_stale(id, false);
                c.extend(self.rib.flush_stale(id, true));
                self.propagate(c).await;
            }
            ToRib::Refresh { id } => {
                let all: Vec<(Prefix, Option<Best>)> =
                    self.rib.iter_best().map(|(p, b)| (p, Some(b))).collect();
                if let Some(s) = self.peers.get_mut(&id).and_then(|p| p.session.as_mut()) {
                    s.adj_out.clear();
                }
                self.export_to(id, &all);
            }
            ToRib::Show { what, reply } => {
                let _ = reply.send(self.show(&what));
            }
        }
    }

    async fn incoming(&mut self, stream: TcpStream, from: SocketAddr) {
        let ip = canonical(from.ip());
        if let Some(slot) = self.peers.values().find(|p| p.addr == ip) {
            let _ = slot.incoming.try_send(stream);
            return;
        }
        let Some(r) = self
            .cfg
            .listen_ranges
            .iter()
            .find(|r| {
                r.prefix
                    .contains(&Prefix::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host"))
            })
            .cloned()
        else {
            tracing::info!(%from, "connection from an unknown address refused");
            return;
        };
        let sc = SessionConfig {
            local_as: self.cfg.asn,
            peer_as: r.asn,
            router_id: self.cfg.router_id,
            hold_time: r.hold_time,
            keepalive: None,
            passive: true,
            families: families_for(ip),
            graceful_restart: r.graceful_restart.then(|| gr_cap(&self.cfg, ip)),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        };
        let id = self.add_peer(
            ip,
            179,
            r.asn,
            r.route_reflector_client,
            false,
            None,
            sc,
            true,
        );
        if let Some(slot) = self.peers.get(&id) {
            let _ = slot.incoming.try_send(stream);
        }
    }

    async fn update(&mut self, id: PeerId, u: Update) {
        let Some(slot) = self.peers.get(&id) else {
            return;
        };
        let Some(sess) = &slot.session else { return };
        if let Some(why) = &u.treat_as_withdraw {
            tracing::warn!(peer = %slot.addr, "UPDATE treated as withdraw (RFC 7606): {why}");
        }
        if let Some((afi, _)) = u.is_end_of_rib() {
            let c = self.rib.flush_stale(id, afi == AFI_IPV6);
            self.propagate(c).await;
            return;
        }
        let ebgp_first_as_ok = |a: &Attrs| sess.ctx.ibgp || a.as_path.first_as() == Some(slot.asn);
        let mut changes = Vec::new();
        let attrs = u.attrs.filter(|a| ebgp_first_as_ok(a)).map(Arc::new);
        let v4_nlri = if attrs.is_some() { u.nlri } else { Vec::new() };
        let mut withdraw = u.withdrawn;
        if attrs.is_none() && u.treat_as_withdraw.is_none() {
            withdraw.extend(v4_nlri.iter().copied());
        }
        changes.extend(self.rib.update(id, &v4_nlri, attrs.clone(), &withdraw));
        if let Some(mp) = u.mp_unreach {
            changes.extend(self.rib.update(id, &[], None, &mp.withdrawn));
        }
        if let Some(mp) = u.mp_reach {
            match &attrs {
                Some(a) => {
                    let mut a6 = (**a).clone();
                    a6.next_hop = mp.next_hop.first().copied();
                    changes.extend(self.rib.update(id, &mp.nlri, Some(Arc::new(a6)), &[]));
                }
                None => changes.extend(self.rib.update(id, &[], None, &mp.nlri)),
            }
        }
        let count = self.rib.prefix_count(id);
        if let Some(slot) = self.peers.get(&id) {
            let mut st = slot.status.lock().expect("status");
            st.updates_in += 1;
            st.prefixes_received = count;
            if let Some(max) = slot.max_prefixes
                && count > max
            {
                tracing::warn!(peer = %slot.addr, count, max, "maximum prefixes exceeded");
                if let Some(s) = &slot.session {
                    let n = crate::packet::Notification::new(err::CEASE, err::CEASE_MAX_PREFIX);
                    let _ = s.out.send(Message::Notification(n).encode(&s.ctx));
                }
            }
        }
        self.propagate(changes).await;
    }

    async fn propagate(&mut self, changes: Vec<(Prefix, Option<Best>)>) {
        if changes.is_empty() {
            return;
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
            let failed = fib.apply(ops).await;
            if failed > 0 {
                tracing::warn!(failed, "kernel route updates failed");
            }
        }
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.export_to(id, &changes);
        }
    }

    fn export_to(&mut self, id: PeerId, changes: &[(Prefix, Option<Best>)]) {
        let Some(slot) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(s) = slot.session.as_mut() else {
            return;
        };
        let mut announce: HashMap<Attrs, Vec<Prefix>> = HashMap::new();
        let mut withdraw: [Vec<Prefix>; 2] = [Vec::new(), Vec::new()];
        for (p, best) in changes {
            let fam = if p.is_v4() {
                (AFI_IPV4, SAFI_UNICAST)
            } else {
                (AFI_IPV6, SAFI_UNICAST)
            };
            if !s.families.contains(&fam) {
                continue;
            }
            let nh_self = if p.is_v4() == s.local.is_ipv4() {
                Some(s.local)
            } else {
                None
            };
            let out = self.rib.export(
                &s.info,
                id,
                best.as_ref().map(|b| &b.best),
                nh_self,
                slot.next_hop_self,
                &self.communities,
            );
            match out {
                Some(a) if a.next_hop.is_some() => {
                    if s.adj_out.get(p) != Some(&a) {
                        s.adj_out.insert(*p, a.clone());
                        announce.entry(a).or_default().push(*p);
                    }
                }
                _ => {
                    if s.adj_out.remove(p).is_some() {
                        withdraw[usize::from(!p.is_v4())].push(*p);
                    }
                }
            }
        }
        let mut n = 0u64;
        for w in &withdraw {
            for m in UpdateBuilder::withdraw(w, &s.ctx) {
                let _ = s.out.send(m);
                n += 1;
            }
        }
        for (a, ps) in &announce {
            let mut v4: Vec<Prefix> = Vec::new();
            let mut v6: Vec<Prefix> = Vec::new();
            for p in ps {
                if p.is_v4() { v4.push(*p) } else { v6.push(*p) }
            }
            for group in [v4, v6] {
                for m in UpdateBuilder::announce(a, &group, None, &s.ctx) {
                    let _ = s.out.send(m);
                    n += 1;
                }
            }
        }
        let mut st = slot.status.lock().expect("status");
        st.updates_out += n;
        st.prefixes_sent = s.adj_out.len();
    }

    fn show(&self, what: &str) -> serde_json::Value {
        match what {
            "routes" => {
                let mut v: Vec<serde_json::Value> = self
                    .rib
                    .iter_best()
                    .map(|(p, b)| {
                        let from = self.peers.get(&b.best.peer).map(|s| s.addr.to_string());
                        serde_json::json!({
                            "prefix": p.to_string(),
                            "next_hops": b.next_hops.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "from": from.unwrap_or_else(|| "local".into()),
                            "as_path": b.best.attrs.as_path.segments.iter().flat_map(|s| s.asns.clone()).collect::<Vec<_>>(),
                            "local_pref": b.best.attrs.local_pref,
                            "stale": b.best.stale,
                        })
                    })
                    .collect();
                v.sort_by(|a, b| a["prefix"].as_str().cmp(&b["prefix"].as_str()));
                serde_json::Value::Array(v)
            }
            _ => {
                let mut v: Vec<serde_json::Value> = self
                    .peers
                    .values()
                    .map(|s| {
                        let st = s.status.lock().expect("status").clone();
                        let mut j = serde_json::to_value(&st).unwrap_or_default();
                        j["since_seconds"] = st.since.map(|t| t.elapsed().as_secs()).into();
                        j
                    })
                    .collect();
                v.sort_by(|a, b| a["address"].as_str().cmp(&b["address"].as_str()));
                serde_json::Value::Array(v)
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

struct PeerTask {
    id: PeerId,
    addr: SocketAddr,
    session: Session,
    tx: mpsc::Sender<ToRibWrap>,
    status: Arc<Mutex<PeerStatus>>,
    incoming: mpsc::Receiver<TcpStream>,
    shutdown: watch::Receiver<bool>,
}

struct Conn {
    writer: OwnedWriteHalf,
    frames: mpsc::Receiver<std::result::Result<Vec<u8>, crate::packet::DecodeError>>,
    reader: tokio::task::JoinHandle<()>,
    local: IpAddr,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn open_conn(stream: TcpStream) -> Option<Conn> {
    let local = canonical(stream.local_addr().ok()?.ip());
    let (mut r, writer) = stream.into_split();
    let (ftx, frames) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::with_capacity(65536);
        let mut chunk = vec![0u8; 65536];
        loop {
            loop {
                match frame_len(&buf) {
                    Ok(Some(n)) if buf.len() >= n => {
                        let f: Vec<u8> = buf.drain(..n).collect();
                        if ftx.send(Ok(f)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        let _ = ftx.send(Err(e)).await;
                        return;
                    }
                }
            }
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return, // channel closes: TcpDown
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    Some(Conn {
        writer,
        frames,
        reader,
        local,
    })
}

impl PeerTask {
    fn set_state(&self, s: State) {
        let mut st = self.status.lock().expect("status");
        if st.state != s {
            st.state = s;
            st.since = Some(Instant::now());
        }
    }

    async fn run(mut self) {
        let mut conn: Option<Conn> = None;
        let mut connecting: Option<
            std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>>,
        > = None;
        let mut timers: HashMap<Timer, tokio::time::Instant> = HashMap::new();
        let mut out_rx: Option<mpsc::UnboundedReceiver<Vec<u8>>> = None;
        let mut neg: Option<Negotiated> = None;
        let mut pending = self.session.process(Event::Start);
        let mut stopping = false;
        let mut adopt: Option<TcpStream> = None;
        loop {
            // Carry out actions; some produce follow-up events.
            let mut follow = Vec::new();
            for a in pending.drain(..) {
                match a {
                    Action::Connect => {
                        let addr = self.addr;
                        connecting = Some(Box::pin(async move {
                            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                                .await
                                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                        }));
                    }
                    Action::Disconnect => {
                        conn = None;
                        connecting = None;
                        out_rx = None;
                    }
                    Action::Send(m) => {
                        let ctx = neg.as_ref().map(|n| n.ctx).unwrap_or_default();
                        if let Some(c) = conn.as_mut()
                            && c.writer.write_all(&m.encode(&ctx)).await.is_err()
                        {
                            follow.push(Event::TcpDown);
                        }
                    }
                    Action::SetTimer(t, d) => {
                        let d = if t == Timer::ConnectRetry {
                            jitter(d)
                        } else {
                            d
                        };
                        timers.insert(t, tokio::time::Instant::now() + d);
                    }
                    Action::StopTimer(t) => {
                        timers.remove(&t);
                    }
                    Action::Up(n) => {
                        let (otx, orx) = mpsc::unbounded_channel();
                        out_rx = Some(orx);
                        neg = Some((*n).clone());
                        let local = conn.as_ref().map(|c| c.local).unwrap_or(self.addr.ip());
                        tracing::info!(peer = %self.addr.ip(), "session established");
                        let _ = self
                            .tx
                            .send(ToRibWrap(ToRib::Up {
                                id: self.id,
                                neg: n,
                                local,
                                out: otx,
                            }))
                            .await;
                    }
                    Action::Down(why) => {
                        tracing::info!(peer = %self.addr.ip(), "session down: {why}");
                        let was_up =
                            self.status.lock().expect("status").state == State::Established;
                        self.status.lock().expect("status").last_error = Some(why.to_string());
                        if was_up {
                            // RFC 4724: keep routes stale unless the session ended by NOTIFICATION.
                            let keep = neg.as_ref().and_then(|n| n.peer_gr.as_ref()).filter(|_| {
                                matches!(why, DownReason::ConnectionLost)
                                    || matches!(&why, DownReason::Sent(n) if n.code == err::HOLD_TIMER_EXPIRED)
                            });
                            let keep_stale = keep.map(|g| g.restart_time);
                            let _ = self
                                .tx
                                .send(ToRibWrap(ToRib::Down {
                                    id: self.id,
                                    keep_stale,
                                }))
                                .await;
                        }
                        neg = None;
                    }
                    Action::Update(u) => {
                        let _ = self
                            .tx
                            .send(ToRibWrap(ToRib::Update {
                                id: self.id,
                                update: u,
                            }))
                            .await;
                    }
                    Action::RouteRefresh(..) => {
                        let _ = self
                            .tx
                            .send(ToRibWrap(ToRib::Refresh { id: self.id }))
                            .await;
                    }
                }
            }
            self.set_state(self.session.state());
            if let Some(ev) = follow.pop() {
                pending = self.session.process(ev);
                continue;
            }
            if let Some(s) = adopt.take() {
                connecting = None;
                conn = open_conn(s);
                pending = self.session.process(if conn.is_some() {
                    Event::TcpUp
                } else {
                    Event::TcpDown
                });
                continue;
            }
            if stopping {
                return;
            }
            let next_timer = timers
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, t)| (*k, *t));
            let ev = tokio::select! {
                biased;
                _ = self.shutdown.changed() => {
                    stopping = true;
                    Event::Stop(err::CEASE_ADMIN_SHUTDOWN)
                }
                Some(s) = self.incoming.recv() => {
                    match self.session.state() {
                        State::Idle | State::Connect | State::Active => {
                            connecting = None;
                            conn = open_conn(s);
                            if conn.is_some() { Event::TcpUp } else { Event::TcpDown }
                        }
                        State::Established if neg.as_ref().is_some_and(|n| n.peer_gr.is_some()) => {
                            // RFC 4724 §4: a new connection from a restarting peer ends the old
                            // session (routes kept stale); the new one takes over.
                            tracing::info!(peer = %self.addr.ip(), "peer restarted: new connection replaces the old session");
                            adopt = Some(s);
                            Event::TcpDown
                        }
                        _ => continue, // collision with a session in progress: keep ours
                    }
                }
                f = recv_frame(&mut conn) => match f {
                    Frame::Closed => Event::TcpDown,
                    Frame::Bytes(bytes) => {
                        let ctx = neg.as_ref().map(|n| n.ctx).or_else(|| self.session.negotiated().map(|n| n.ctx)).unwrap_or_default();
                        match Message::decode(&bytes, &ctx) {
                            Ok(m) => Event::Message(m),
                            Err(e) => Event::BadMessage(e),
                        }
                    }
                    Frame::Bad(e) => Event::BadMessage(e),
                },
                r = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match r.ok().and_then(|s| { let _ = s.set_nodelay(true); open_conn(s) }) {
                        Some(c) => { conn = Some(c); Event::TcpUp }
                        None => Event::TcpDown,
                    }
                }
                Some(bytes) = async { match out_rx.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    if let Some(c) = conn.as_mut() && c.writer.write_all(&bytes).await.is_err() {
                        Event::TcpDown
                    } else {
                        continue;
                    }
                }
                _ = async { match next_timer { Some((_, t)) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    let (t, _) = next_timer.expect("timer");
                    timers.remove(&t);
                    Event::Timer(t)
                }
            };
            pending = self.session.process(ev);
        }
    }
}

enum Frame {
    Bytes(Vec<u8>),
    Bad(crate::packet::DecodeError),
    Closed,
}

async fn recv_frame(conn: &mut Option<Conn>) -> Frame {
    match conn.as_mut() {
        Some(c) => match c.frames.recv().await {
            Some(Ok(f)) => Frame::Bytes(f),
            Some(Err(e)) => Frame::Bad(e),
            None => Frame::Closed,
        },
        None => std::future::pending().await,
    }
}
