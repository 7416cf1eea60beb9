//! One task per peer: owns the peer's TCP connection(s), runs the session
//! FSM and carries out its actions.
//!
//! The task never waits on a socket: it frames what each connection has
//! to read itself ([`crate::conn::Reader`], a buffer only while bytes
//! wait), and each connection has a writer task ([`crate::outbox`]) fed
//! through a queue bounded in bytes ([`crate::conn::OUT_LIMIT`]: beyond
//! it, Cease/out of resources), held in the peer task's `JoinSet`. A
//! write that makes no progress for the hold time means the peer reads
//! nothing: the session ends with Cease/out of resources, while timers and
//! reads went on.
//!
//! A peer has a main [`Link`] and, while a connection collision is being
//! resolved (RFC 4271 §6.8), a second one. Each link is a connection with
//! its own [`Session`] and timers. When both have received the peer's OPEN,
//! [`resolve_collision`] picks the survivor and the other is closed with
//! Cease/"connection collision resolution"; a link that reaches Established
//! first wins outright. A new connection from a peer whose session is
//! Established replaces it when graceful restart was negotiated (RFC 4724
//! §4: the peer restarted); otherwise it is refused.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::conn::{Conn, Frame, halves, open_conn, recv_frame, write_ended};
use crate::fsm::{
    Action, DownReason, Event, Keep, Negotiated, Session, State, Timer, resolve_collision,
};
pub(crate) use crate::outbox::Wire;
use crate::outbox::WriteEnd;
use crate::packet::Message;
use crate::packet::Update;
use crate::packet::consts::err;
use crate::rib::PeerId;
use margay_api::status::NeighborView;

/// A peer's state as its task and the RIB task keep it (read for the
/// neighbor view and the metrics).
#[derive(Debug, Clone)]
pub(crate) struct PeerStatus {
    /// Peer address.
    pub address: IpAddr,
    /// Peer AS.
    pub asn: u32,
    /// Session state.
    pub state: State,
    /// When the state last changed.
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
    /// Routes withdrawn instead of announced (attributes too big).
    pub too_big: u64,
    /// Its BFD session's state, while it has one.
    pub bfd: Option<crate::bfd::State>,
}

impl PeerStatus {
    /// The outside view of this peer.
    pub(crate) fn view(&self) -> NeighborView {
        NeighborView {
            address: self.address,
            asn: self.asn,
            state: self.state,
            since_seconds: self.since.map(|t| t.elapsed().as_secs()),
            prefixes_received: self.prefixes_received,
            prefixes_sent: self.prefixes_sent,
            updates_in: self.updates_in,
            updates_out: self.updates_out,
            last_error: self.last_error.clone(),
            dynamic: self.dynamic,
            routes_too_big: self.too_big,
            bfd: self.bfd.map(crate::bfd::State::view),
        }
    }
}

/// What a peer task tells the RIB task.
#[allow(clippy::large_enum_variant)] // UPDATEs by value, the common case
#[derive(Debug)]
pub(crate) enum PeerEvent {
    /// Established; UPDATEs for the peer go into `out`.
    Up {
        id: PeerId,
        neg: Box<Negotiated>,
        local: IpAddr,
        out: mpsc::UnboundedSender<Wire>,
    },
    /// An UPDATE arrived.
    Update { id: PeerId, update: Update },
    /// The session left Established; `keep_stale` is the restart time to
    /// keep the peer's routes for (graceful restart), if any.
    Down { id: PeerId, keep_stale: Option<u16> },
    /// The peer sent ROUTE-REFRESH.
    Refresh { id: PeerId },
}

/// What the RIB task tells a peer task.
#[derive(Debug)]
pub(crate) enum PeerCmd {
    /// A connection the listener accepted from this peer's address.
    Incoming(TcpStream),
    /// Close the session with Cease/`subcode` and stay down for
    /// [`CEASE_RESTART`] (e.g. maximum prefixes exceeded, RFC 4486).
    Cease(u8),
    /// Announce this restart time from the next session on.
    RestartTime(u16),
    /// The path to the peer works again (its BFD session is Up): a
    /// session ceased and waiting out [`CEASE_RESTART`] starts now.
    PathUp,
}

/// How the speaker's tasks are asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Running.
    Run,
    /// End; peers close their sessions with Cease/administrative shutdown.
    Cease,
    /// End without a NOTIFICATION: connections are just closed, so peers
    /// that negotiated graceful restart keep our routes (RFC 4724) while a
    /// new speaker takes over.
    Silent,
}

/// How long a session closed by [`PeerCmd::Cease`] stays down.
pub(crate) const CEASE_RESTART: Duration = Duration::from_secs(30);

/// Per-peer connection parameters.
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    pub addr: SocketAddr,
    pub password: Option<String>,
    pub gtsm_hops: Option<u8>,
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// A connection with its own session state machine and timers.
struct Link {
    session: Session,
    conn: Option<Conn>,
    connecting: Option<Connecting>,
    timers: HashMap<Timer, tokio::time::Instant>,
    /// What this (alt) link may do to an Established main one.
    over: Over,
}

/// How an alt link relates to the main link's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    /// A collision while the session was being set up: main, once
    /// Established, wins (RFC 4271 section 6.8).
    Collision,
    /// Accepted while main was Established: it replaces the session only
    /// once it has brought a valid OPEN with the graceful-restart
    /// capability (RFC 4724 section 4.2: the peer restarted).
    Restart,
    /// That OPEN came: main is being taken down, then this link takes its
    /// place.
    Replacing,
}

impl Link {
    fn new(session: Session) -> Self {
        Self {
            session,
            conn: None,
            connecting: None,
            timers: HashMap::new(),
            over: Over::Collision,
        }
    }

    fn state(&self) -> State {
        self.session.state()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Main,
    Alt,
}

/// One wake-up of the peer task.
enum Input {
    Shutdown,
    Cmd(PeerCmd),
    Removed,
    Restart,
    Frame(Which, Frame),
    Connected(std::io::Result<TcpStream>),
    Out(Wire),
    WriteEnded(Which, WriteEnd),
    Timer(Which, Timer),
}

fn frame_event(link: &Link, f: Frame) -> Event {
    match f {
        Frame::Closed => Event::TcpDown,
        Frame::Bad(e) => Event::BadMessage(e),
        Frame::Bytes(b) => {
            let ctx = link.session.negotiated().map(|n| n.ctx).unwrap_or_default();
            match Message::decode(&b, &ctx) {
                Ok(m) => Event::Message(m),
                Err(e) => Event::BadMessage(e),
            }
        }
    }
}

async fn timer(timers: Option<&HashMap<Timer, tokio::time::Instant>>) -> Timer {
    match timers.and_then(|t| t.iter().min_by_key(|(_, at)| **at).map(|(k, at)| (*k, *at))) {
        Some((t, at)) => {
            tokio::time::sleep_until(at).await;
            t
        }
        None => std::future::pending().await,
    }
}

async fn connected(connecting: Option<&mut Connecting>) -> std::io::Result<TcpStream> {
    match connecting {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Queues closing the main link, and the alt one if there is one, with
/// Cease/`sub`.
fn stop_links(queue: &mut VecDeque<(Which, Event)>, alt: bool, sub: u8) {
    queue.push_back((Which::Main, Event::Stop(sub)));
    if alt {
        queue.push_back((Which::Alt, Event::Stop(sub)));
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

/// The peer task.
pub(crate) struct PeerTask {
    pub id: PeerId,
    pub transport: Transport,
    pub session: Session,
    pub events: mpsc::Sender<PeerEvent>,
    pub status: Arc<Mutex<PeerStatus>>,
    pub incoming: mpsc::Receiver<PeerCmd>,
    pub shutdown: watch::Receiver<Stop>,
}

/// State of the task outside the links.
struct Shared {
    id: PeerId,
    transport: Transport,
    events: mpsc::Sender<PeerEvent>,
    status: Arc<Mutex<PeerStatus>>,
    out_rx: Option<mpsc::UnboundedReceiver<Wire>>,
    /// What the Established main link negotiated (kept for its Down).
    neg: Option<Negotiated>,
    /// Said with the next Down (why we ended the session).
    note: Option<String>,
    /// When to start again after we ceased the session ourselves.
    restart_at: Option<tokio::time::Instant>,
    /// The connections' writers; a closed connection's goes on until it
    /// has flushed what was queued (at most [`crate::outbox::CLOSE_FLUSH`]).
    writers: JoinSet<()>,
}

impl PeerTask {
    pub(crate) async fn run(self) {
        let PeerTask {
            id,
            transport,
            session,
            events,
            status,
            mut incoming,
            mut shutdown,
        } = self;
        let mut template = session.clone();
        let mut sh = Shared {
            id,
            transport,
            events,
            status,
            out_rx: None,
            neg: None,
            note: None,
            restart_at: None,
            writers: JoinSet::new(),
        };
        let mut main = Link::new(session);
        let mut alt: Option<Link> = None;
        let mut queue: VecDeque<(Which, Event)> = VecDeque::from([(Which::Main, Event::Start)]);
        let mut stopping = false;
        loop {
            while let Some((which, ev)) = queue.pop_front() {
                let link = match which {
                    Which::Main => &mut main,
                    Which::Alt => match alt.as_mut() {
                        Some(a) => a,
                        None => continue,
                    },
                };
                let actions = link.session.process(ev);
                // Boxed: their futures (a PeerEvent being sent) live only
                // while they run, not in every idle peer task's state.
                Box::pin(sh.execute(which, link, actions, &mut queue)).await;
                Box::pin(sh.resolve(&mut main, &mut alt, &mut queue)).await;
            }
            sh.set_state(main.state());
            if stopping {
                break;
            }
            let (main_conn, main_timers, main_connecting) =
                (main.conn.as_mut(), &main.timers, main.connecting.as_mut());
            let (alt_conn, alt_timers) = match alt.as_mut() {
                Some(Link { conn, timers, .. }) => (conn.as_mut(), Some(&*timers)),
                None => (None, None),
            };
            let ((main_frames, main_ended), (alt_frames, alt_ended)) =
                (halves(main_conn), halves(alt_conn));
            let restart_at = sh.restart_at;
            let (out_rx, writers) = (sh.out_rx.as_mut(), &mut sh.writers);
            let input = tokio::select! {
                biased;
                // (The speaker gone, the last word stands: it says
                // Silent unless it was stopped with Cease first.)
                _ = shutdown.changed() => Input::Shutdown,
                // The RIB task dropped the peer: it was de-configured.
                c = incoming.recv() => match c {
                    Some(c) => Input::Cmd(c),
                    None => Input::Removed,
                },
                _ = async {
                    match restart_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Input::Restart,
                f = recv_frame(main_frames) => Input::Frame(Which::Main, f),
                f = recv_frame(alt_frames) => Input::Frame(Which::Alt, f),
                e = write_ended(main_ended) => Input::WriteEnded(Which::Main, e),
                e = write_ended(alt_ended) => Input::WriteEnded(Which::Alt, e),
                r = connected(main_connecting) => Input::Connected(r),
                Some(bytes) = async {
                    match out_rx {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => Input::Out(bytes),
                t = timer(Some(main_timers)) => Input::Timer(Which::Main, t),
                t = timer(alt_timers) => Input::Timer(Which::Alt, t),
                Some(_) = writers.join_next() => continue,
            };
            let ev = match input {
                Input::Shutdown if *shutdown.borrow() == Stop::Silent => break,
                Input::Shutdown => {
                    stopping = true;
                    stop_links(&mut queue, alt.is_some(), err::CEASE_ADMIN_SHUTDOWN);
                    continue;
                }
                Input::Cmd(PeerCmd::Incoming(s)) => {
                    sh.incoming(s, &mut main, &mut alt, &template, &mut queue);
                    continue;
                }
                Input::Removed => {
                    stopping = true;
                    stop_links(&mut queue, alt.is_some(), err::CEASE_PEER_DECONFIGURED);
                    continue;
                }
                Input::Cmd(PeerCmd::RestartTime(secs)) => {
                    main.session.set_restart_time(secs);
                    if let Some(a) = alt.as_mut() {
                        a.session.set_restart_time(secs);
                    }
                    template.set_restart_time(secs);
                    continue;
                }
                Input::Cmd(PeerCmd::PathUp) => {
                    if sh.restart_at.is_none() {
                        continue;
                    }
                    sh.restart_at = Some(tokio::time::Instant::now());
                    continue;
                }
                Input::Cmd(PeerCmd::Cease(sub)) => {
                    stop_links(&mut queue, alt.is_some(), sub);
                    sh.restart_later();
                    continue;
                }
                Input::Restart => {
                    sh.restart_at = None;
                    if main.state() != State::Idle {
                        continue;
                    }
                    (Which::Main, Event::Start)
                }
                Input::Frame(Which::Main, f) => (Which::Main, frame_event(&main, f)),
                Input::Frame(Which::Alt, f) => match alt.as_ref() {
                    Some(a) => (Which::Alt, frame_event(a, f)),
                    None => continue,
                },
                Input::Connected(r) => {
                    main.connecting = None;
                    let hold = main.session.config().hold_time;
                    match r.ok().and_then(|s| open_conn(s, hold, &mut sh.writers)) {
                        Some(c) => {
                            main.conn = Some(c);
                            (Which::Main, Event::TcpUp)
                        }
                        None => (Which::Main, Event::TcpDown),
                    }
                }
                Input::Out(bytes) => {
                    let Some(c) = main.conn.as_ref() else {
                        continue;
                    };
                    match c.send(bytes) {
                        Ok(()) => continue,
                        Err(e) => {
                            sh.ending(e.to_string());
                            (Which::Main, Event::Stop(err::CEASE_OUT_OF_RESOURCES))
                        }
                    }
                }
                Input::WriteEnded(w, end) => {
                    let Some(link) = (match w {
                        Which::Main => Some(&mut main),
                        Which::Alt => alt.as_mut(),
                    }) else {
                        continue;
                    };
                    if let Some(c) = link.conn.as_mut() {
                        c.ended = None;
                    }
                    match end {
                        WriteEnd::Failed(e) => {
                            tracing::info!(peer = %sh.transport.addr.ip(), "write failed: {e}");
                            (w, Event::TcpDown)
                        }
                        WriteEnd::Stalled(d) => {
                            tracing::warn!(peer = %sh.transport.addr.ip(), "the peer reads nothing: no write went through in {d:?}");
                            if w == Which::Main {
                                sh.ending(format!("the peer read nothing for {}s", d.as_secs()));
                            }
                            (w, Event::Stop(err::CEASE_OUT_OF_RESOURCES))
                        }
                    }
                }
                Input::Timer(w, t) => {
                    let link = match w {
                        Which::Main => Some(&mut main),
                        Which::Alt => alt.as_mut(),
                    };
                    match link {
                        Some(l) => {
                            l.timers.remove(&t);
                            (w, Event::Timer(t))
                        }
                        None => continue,
                    }
                }
            };
            queue.push_back(ev);
        }
        // Closed: each writer flushes what its connection queued before
        // the close (a NOTIFICATION), within CLOSE_FLUSH, then ends.
        drop((main, alt));
        while sh.writers.join_next().await.is_some() {}
    }
}

impl Shared {
    /// Start again [`CEASE_RESTART`] from now (we ceased the session).
    fn restart_later(&mut self) {
        self.restart_at = Some(tokio::time::Instant::now() + CEASE_RESTART);
    }

    /// We end the main session for `why`: said with its Down, started
    /// again after [`CEASE_RESTART`].
    fn ending(&mut self, why: String) {
        self.note = Some(why);
        self.restart_later();
    }

    fn set_state(&self, s: State) {
        let mut st = self.status.lock().expect("status");
        if st.state != s {
            st.state = s;
            st.since = Some(Instant::now());
        }
    }

    fn adopt(&mut self, link: &mut Link, s: TcpStream) -> Event {
        if let Some(h) = self.transport.gtsm_hops
            && let Err(e) =
                crate::net::set_gtsm(&s, s.local_addr().map(|a| a.is_ipv6()).unwrap_or(false), h)
        {
            tracing::warn!("cannot set GTSM on an incoming connection: {e}");
        }
        link.connecting = None;
        link.conn = open_conn(s, link.session.config().hold_time, &mut self.writers);
        if link.conn.is_some() {
            Event::TcpUp
        } else {
            Event::TcpDown
        }
    }

    /// A connection the listener accepted from this peer's address.
    fn incoming(
        &mut self,
        s: TcpStream,
        main: &mut Link,
        alt: &mut Option<Link>,
        template: &Session,
        queue: &mut VecDeque<(Which, Event)>,
    ) {
        match main.state() {
            State::Idle => {} // stopped: refuse
            State::Active => queue.push_back((Which::Main, self.adopt(main, s))),
            State::Connect | State::OpenSent | State::OpenConfirm if alt.is_none() => {
                // Both directions proceed; the collision is resolved once
                // the OPENs are in.
                let mut l = Link::new(template.clone());
                l.session.process(Event::Start);
                let ev = self.adopt(&mut l, s);
                *alt = Some(l);
                queue.push_back((Which::Alt, ev));
            }
            State::Established
                if alt.is_none() && self.neg.as_ref().is_some_and(|n| n.peer_gr.is_some()) =>
            {
                // Perhaps the peer restarted; a connection alone proves
                // nothing (anyone may connect from its address): the
                // session stays until this link brings a valid OPEN with
                // graceful restart (see resolve).
                tracing::info!(peer = %self.transport.addr.ip(), "new connection from an established peer: its OPEN decides");
                let mut l = Link::new(template.clone());
                l.over = Over::Restart;
                l.session.process(Event::Start);
                let ev = self.adopt(&mut l, s);
                *alt = Some(l);
                queue.push_back((Which::Alt, ev));
            }
            _ => tracing::info!(peer = %self.transport.addr.ip(), "extra connection refused"),
        }
    }

    /// RFC 4271 §6.8 between the two links, if there are two.
    async fn resolve(
        &mut self,
        main: &mut Link,
        alt: &mut Option<Link>,
        queue: &mut VecDeque<(Which, Event)>,
    ) {
        let Some(a) = alt.as_mut() else { return };
        let (ms, as_) = (main.state(), a.state());
        let close = |l: &mut Link| l.session.process(Event::Stop(err::CEASE_COLLISION));
        // The alt link loses when it failed or main is already up, unless
        // it is a restarted peer's new connection (RFC 4724 section 4.2).
        let restarted = a.state() == State::OpenConfirm
            && a.session.negotiated().is_some_and(|n| n.peer_gr.is_some());
        let loser = if a.conn.is_none() {
            Some(Which::Alt)
        } else if ms == State::Established {
            match a.over {
                Over::Collision => Some(Which::Alt),
                // Waiting for its OPEN (its hold timer bounds the wait).
                Over::Restart
                    if matches!(as_, State::Connect | State::Active | State::OpenSent) =>
                {
                    None
                }
                Over::Restart if restarted => {
                    tracing::info!(peer = %self.transport.addr.ip(), "peer restarted: its new session replaces the old one");
                    a.over = Over::Replacing;
                    main.connecting = None;
                    // Taken down (routes kept stale), then swapped for the
                    // alt link below, once main has no connection.
                    queue.push_back((Which::Main, Event::TcpDown));
                    None
                }
                Over::Replacing => None,
                // An OPEN without graceful restart: the session stays.
                Over::Restart => Some(Which::Alt),
            }
        } else if as_ == State::Established || main.conn.is_none() {
            Some(Which::Main)
        } else if (ms, as_) == (State::OpenConfirm, State::OpenConfirm) {
            let local = a.session.config().router_id;
            let remote = a
                .session
                .negotiated()
                .map(|n| n.peer_open.router_id)
                .unwrap_or(local);
            // The alt link is always the one the peer initiated.
            Some(match resolve_collision(local, remote) {
                Keep::Incoming => Which::Main,
                Keep::Outgoing => Which::Alt,
            })
        } else {
            None
        };
        match loser {
            None => {}
            Some(Which::Alt) => {
                let mut a = alt.take().expect("alt");
                if matches!(a.state(), State::OpenSent | State::OpenConfirm) {
                    let acts = close(&mut a);
                    self.execute(Which::Alt, &mut a, acts, queue).await;
                }
            }
            Some(Which::Main) => {
                if matches!(ms, State::OpenSent | State::OpenConfirm) {
                    let acts = close(main);
                    self.execute(Which::Main, main, acts, queue).await;
                }
                let mut a = alt.take().expect("alt");
                std::mem::swap(main, &mut a);
                // Events queued for the alt link now belong to main.
                for (w, _) in queue.iter_mut() {
                    if *w == Which::Alt {
                        *w = Which::Main;
                    }
                }
            }
        }
    }

    async fn execute(
        &mut self,
        which: Which,
        link: &mut Link,
        actions: Vec<Action>,
        queue: &mut VecDeque<(Which, Event)>,
    ) {
        for a in actions {
            match a {
                Action::Connect => {
                    let t = self.transport.clone();
                    link.connecting = Some(Box::pin(async move {
                        crate::net::connect(
                            t.addr,
                            t.password.as_deref(),
                            t.gtsm_hops,
                            Duration::from_secs(5),
                        )
                        .await
                    }));
                }
                Action::Disconnect => {
                    link.conn = None;
                    link.connecting = None;
                    if which == Which::Main {
                        self.out_rx = None;
                    }
                }
                Action::Send(m) => {
                    let ctx = link.session.negotiated().map(|n| n.ctx).unwrap_or_default();
                    if let Some(c) = link.conn.as_ref()
                        && let Err(e) = c.send(m.encode(&ctx).into())
                    {
                        if which == Which::Main {
                            self.ending(e.to_string());
                        }
                        queue.push_back((which, Event::Stop(err::CEASE_OUT_OF_RESOURCES)));
                    }
                }
                Action::SetTimer(t, d) => {
                    let d = if t == Timer::ConnectRetry {
                        jitter(d)
                    } else {
                        d
                    };
                    link.timers.insert(t, tokio::time::Instant::now() + d);
                }
                Action::StopTimer(t) => {
                    link.timers.remove(&t);
                }
                Action::Up(n) => {
                    // Only the main link is ever Established (see resolve).
                    let (otx, orx) = mpsc::unbounded_channel();
                    self.out_rx = Some(orx);
                    self.neg = Some((*n).clone());
                    if let Some(c) = link.conn.as_ref() {
                        c.set_stall(n.hold_time);
                    }
                    let local = link
                        .conn
                        .as_ref()
                        .map(|c| c.local)
                        .unwrap_or(self.transport.addr.ip());
                    tracing::info!(peer = %self.transport.addr.ip(), "session established");
                    let _ = self
                        .events
                        .send(PeerEvent::Up {
                            id: self.id,
                            neg: n,
                            local,
                            out: otx,
                        })
                        .await;
                }
                Action::Down(why) => {
                    if which == Which::Main {
                        self.down(why).await;
                    }
                }
                Action::Update(u) => {
                    let _ = self
                        .events
                        .send(PeerEvent::Update {
                            id: self.id,
                            update: u,
                        })
                        .await;
                }
                Action::RouteRefresh(..) => {
                    let _ = self.events.send(PeerEvent::Refresh { id: self.id }).await;
                }
            }
        }
    }

    async fn down(&mut self, why: DownReason) {
        tracing::info!(peer = %self.transport.addr.ip(), "session down: {why}");
        let said = match self.note.take() {
            Some(n) => format!("{why} ({n})"),
            None => why.to_string(),
        };
        self.status.lock().expect("status").last_error = Some(said);
        let Some(neg) = self.neg.take() else { return };
        // RFC 4724 §4.2: keep the routes (stale) when the connection ended
        // without a NOTIFICATION (the peer restarting: its TCP closed or
        // reset). A peer silent for the hold time is dead, not restarting:
        // its routes go at once, as BIRD does (RFC 8538 keeps them only
        // with its N bit, which neither side sends here).
        let keep = neg
            .peer_gr
            .as_ref()
            .filter(|_| matches!(why, DownReason::ConnectionLost));
        let _ = self
            .events
            .send(PeerEvent::Down {
                id: self.id,
                keep_stale: keep.map(|g| g.restart_time),
            })
            .await;
    }
}
