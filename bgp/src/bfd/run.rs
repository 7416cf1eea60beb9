//! The BFD runtime: the UDP sockets of single-hop BFD (RFC 5881) and one
//! task that runs every [`Session`], sending on their timers, matching
//! what arrives to them and telling its owner when one changes state.
//!
//! Packets are sent with TTL (hop limit) 255 from a port in
//! [`SOURCE_PORTS`], one per session, and accepted only with TTL 255
//! (GTSM: a packet from off the link cannot reach a session), from the
//! session's own peer address, on [`PORT`].

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Instant;

use margay_task::Owned;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::packet::{Control, PORT, Reject, SOURCE_PORTS, State};
use super::session::{Change, Params, Session};

/// A session's change of state, for the session's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The peer the session runs with.
    pub peer: IpAddr,
    /// What changed.
    pub change: Change,
}

/// What the runtime shows of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Its state.
    pub state: State,
    /// Its settings.
    pub params: Params,
    /// Why it last went down.
    pub diag: super::packet::Diag,
}

/// The handle: the sessions wanted, and their states. Dropping it ends
/// the task, each session saying AdminDown first.
#[derive(Debug)]
pub struct Bfd {
    want: watch::Sender<BTreeMap<IpAddr, Params>>,
    views: watch::Receiver<BTreeMap<IpAddr, View>>,
    _task: Owned,
}

impl Bfd {
    /// Binds [`PORT`] on IPv4 and IPv6 and starts the task; changes of
    /// state go to `events`.
    pub fn start(events: mpsc::UnboundedSender<Event>) -> std::io::Result<Self> {
        Self::start_on(PORT, events)
    }

    /// [`Bfd::start`] on another port (tests; peers send to [`PORT`]).
    pub fn start_on(port: u16, events: mpsc::UnboundedSender<Event>) -> std::io::Result<Self> {
        let v4 = listener(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?;
        let v6 = listener(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)).ok();
        let (want, want_rx) = watch::channel(BTreeMap::new());
        let (views_tx, views) = watch::channel(BTreeMap::new());
        let task = Task {
            v4,
            v6,
            want: want_rx,
            views: views_tx,
            events,
            sessions: BTreeMap::new(),
            next_discr: seed() as u32 | 1,
            rng: seed() | 1,
        };
        Ok(Self {
            want,
            views,
            _task: Owned::spawn(task.run()),
        })
    }

    /// The sessions to run, by peer: new ones start Down, ones left out
    /// say AdminDown three times and end, ones with new settings take them
    /// in place (a Poll Sequence, RFC 5880 §6.8.3).
    pub fn set(&self, peers: BTreeMap<IpAddr, Params>) {
        self.want.send_replace(peers);
    }

    /// The state of the session with `peer`, while one runs.
    pub fn state(&self, peer: IpAddr) -> Option<State> {
        self.views.borrow().get(&peer).map(|v| v.state)
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

fn listener(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let std = std::net::UdpSocket::bind(addr).or_else(|e| {
        // An IPv6 socket also takes IPv4 unless v6only: bind it so.
        if addr.is_ipv6() {
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet6,
                nix::sys::socket::SockType::Datagram,
                nix::sys::socket::SockFlag::empty(),
                None,
            )?;
            setsockopt(&s, sockopt::Ipv6V6Only, &true)?;
            nix::sys::socket::bind(s.as_raw_fd(), &SockaddrStorage::from(addr))?;
            Ok(std::net::UdpSocket::from(s))
        } else {
            Err(e)
        }
    })?;
    if addr.is_ipv6() {
        setsockopt(&std, sockopt::Ipv6RecvHopLimit, &true)?;
    } else {
        setsockopt(&std, sockopt::Ipv4RecvTtl, &true)?;
    }
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

/// A socket to send one session's packets from: TTL 255, a source port
/// of [`SOURCE_PORTS`], connected to the peer's [`PORT`].
fn sender(peer: IpAddr, port: u16, rng: &mut u64) -> std::io::Result<UdpSocket> {
    let any: IpAddr = if peer.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let span = u64::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    let mut last = None;
    for _ in 0..64 {
        let p = SOURCE_PORTS.start() + (next(rng) % span) as u16;
        match std::net::UdpSocket::bind(SocketAddr::new(any, p)) {
            Ok(s) => {
                if peer.is_ipv4() {
                    setsockopt(&s, sockopt::Ipv4Ttl, &255)?;
                } else {
                    setsockopt(&s, sockopt::Ipv6Ttl, &255)?;
                }
                s.connect(SocketAddr::new(peer, port))?;
                s.set_nonblocking(true)?;
                return UdpSocket::from_std(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free BFD source port")))
}

/// xorshift64: jitter and source ports, nothing secret.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// A datagram and the TTL (hop limit) it arrived with.
fn recv_ttl(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, IpAddr, Option<u8>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(libc::c_int);
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let mut ttl = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4Ttl(t) | ControlMessageOwned::Ipv6HopLimit(t) => {
                ttl = u8::try_from(t).ok();
            }
            _ => {}
        }
    }
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .ok_or_else(|| std::io::Error::other("a datagram without a source"))?;
    Ok((msg.bytes, crate::net::canonical(from), ttl))
}

struct Running {
    session: Session,
    sock: UdpSocket,
}

/// Datagrams read per wake at most.
const DRAIN_BATCH: usize = 64;

/// A session ending (removed, or the speaker stopping) says AdminDown,
/// which the peer's clients take as no failure (RFC 5882 §3.2), so a
/// speaker restarting under graceful restart keeps its routes at the
/// peer. Three copies, for loss: there is no later to repeat it in.
fn say_admin_down(r: &Running) {
    let mut p = r.session.packet();
    p.state = State::AdminDown;
    p.diag = super::packet::Diag::AdminDown;
    p.poll = false;
    let bytes = p.encode();
    for _ in 0..3 {
        let _ = r.sock.try_send(&bytes);
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        for r in self.sessions.values() {
            say_admin_down(r);
        }
    }
}

struct Task {
    v4: UdpSocket,
    v6: Option<UdpSocket>,
    want: watch::Receiver<BTreeMap<IpAddr, Params>>,
    views: watch::Sender<BTreeMap<IpAddr, View>>,
    events: mpsc::UnboundedSender<Event>,
    sessions: BTreeMap<IpAddr, Running>,
    next_discr: u32,
    rng: u64,
}

async fn readable(s: Option<&UdpSocket>) -> std::io::Result<()> {
    match s {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run(mut self) {
        let mut buf = [0u8; 128];
        loop {
            let wake = self
                .sessions
                .values()
                .flat_map(|r| [r.session.next_tx(), r.session.detect_at()])
                .flatten()
                .min();
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.want.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let want = self.want.borrow_and_update().clone();
                    self.reconcile(&want);
                }
                r = self.v4.readable() => {
                    if r.is_ok() {
                        self.drain(true, &mut buf);
                    }
                }
                r = readable(self.v6.as_ref()) => {
                    if r.is_ok() {
                        self.drain(false, &mut buf);
                    }
                }
                () = sleep => {}
            }
            self.timers();
        }
    }

    fn reconcile(&mut self, want: &BTreeMap<IpAddr, Params>) {
        let now = Instant::now();
        let gone: Vec<IpAddr> = self
            .sessions
            .keys()
            .filter(|peer| !want.contains_key(peer))
            .copied()
            .collect();
        for peer in gone {
            if let Some(mut r) = self.sessions.remove(&peer) {
                if let Some(change) = r.session.admin_down() {
                    let _ = self.events.send(Event { peer, change });
                }
                say_admin_down(&r);
            }
        }
        for (&peer, &params) in want {
            if let Some(r) = self.sessions.get_mut(&peer) {
                // New settings: in place, by a Poll Sequence (§6.8.3).
                r.session.set_params(params);
                continue;
            }
            match sender(peer, PORT, &mut self.rng) {
                Ok(sock) => {
                    self.next_discr = self.next_discr.wrapping_add(1).max(1);
                    let session = Session::new(params, self.next_discr, now);
                    self.sessions.insert(peer, Running { session, sock });
                }
                Err(e) => tracing::warn!(%peer, "BFD: cannot open a socket towards the peer: {e}"),
            }
        }
        self.publish();
    }

    fn drain(&mut self, v4: bool, buf: &mut [u8]) {
        // A bounded batch: a flood to the port cannot keep the timers (and
        // so our own packets) from running; readiness stays set.
        for _ in 0..DRAIN_BATCH {
            let sock = if v4 { Some(&self.v4) } else { self.v6.as_ref() };
            let Some(sock) = sock else { return };
            let got = sock.try_io(Interest::READABLE, || recv_ttl(sock, buf));
            let (n, from, ttl) = match got {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("BFD: receive failed: {e}");
                    return;
                }
            };
            if let Err(why) = self.accept(&buf[..n], from, ttl) {
                tracing::debug!(%from, "BFD packet discarded: {why}");
            }
        }
    }

    /// A datagram from `from`: to its session, or why not.
    fn accept(&mut self, b: &[u8], from: IpAddr, ttl: Option<u8>) -> Result<(), Discard> {
        if ttl != Some(255) {
            return Err(Discard::Ttl(ttl));
        }
        let p = Control::decode(b).map_err(Discard::Invalid)?;
        let r = self.sessions.get_mut(&from).ok_or(Discard::NoSession)?;
        if p.your_discr != 0 && p.your_discr != r.session.local_discr() {
            return Err(Discard::NotOurs(p.your_discr));
        }
        let now = Instant::now();
        if let Some(change) = r.session.receive(&p, now) {
            tracing::info!(peer = %from, "BFD session {} -> {} ({})", change.from, change.to, change.diag);
            let _ = self.events.send(Event { peer: from, change });
            self.publish();
        }
        Ok(())
    }

    /// Expired detection timers, then packets due.
    fn timers(&mut self) {
        let now = Instant::now();
        let mut changed = false;
        for (&peer, r) in &mut self.sessions {
            if let Some(change) = r.session.tick(now) {
                tracing::info!(%peer, "BFD session {} -> {} ({})", change.from, change.to, change.diag);
                let _ = self.events.send(Event { peer, change });
                changed = true;
            }
            if r.session.next_tx().is_some_and(|t| t <= now) {
                if let Err(e) = r.sock.try_send(&r.session.packet().encode()) {
                    tracing::debug!(%peer, "BFD: send failed: {e}");
                }
                let jitter = (next(&mut self.rng) % 1_000_000) as f64 / 1_000_000.0;
                r.session.sent(now, jitter);
            }
        }
        if changed {
            self.publish();
        }
    }

    fn publish(&self) {
        let views = self
            .sessions
            .iter()
            .map(|(peer, r)| {
                let view = View {
                    state: r.session.state(),
                    params: r.session.params(),
                    diag: r.session.diag(),
                };
                (*peer, view)
            })
            .collect();
        self.views.send_replace(views);
    }
}

/// Why a datagram reached no session.
#[derive(Debug, thiserror::Error)]
enum Discard {
    #[error("TTL {0:?}, not 255: not from a neighbor on the link")]
    Ttl(Option<u8>),
    #[error("{0}")]
    Invalid(Reject),
    #[error("no session with its sender")]
    NoSession,
    #[error("addressed to discriminator {0}, not this session's")]
    NotOurs(u32),
}
