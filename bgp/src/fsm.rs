//! The BGP session state machine (RFC 4271 §8), as pure logic.
//!
//! One [`Session`] drives one TCP connection's worth of protocol: the driver
//! feeds it [`Event`]s (connection up/down, decoded messages, timer expiry)
//! and carries out the [`Action`]s it returns (connect, send, arm a timer,
//! hand an UPDATE to the RIB, report the session up or down). It never
//! touches a socket or a clock, so tests read like the RFC.
//!
//! Deviations, chosen for a node agent: after a failure the session goes
//! straight back to Active with an exponentially growing ConnectRetry delay
//! (automatic restart with damping, §8.1.1 options 2 and 5 combined). The
//! ConnectRetry timer runs only while waiting in Active: a connection
//! attempt in Connect is never abandoned for a new one; it ends in
//! `TcpUp` or `TcpDown` (the driver bounds it with a connect timeout).
//! Otherwise short retry delays would restart slow connects forever. Passive
//! sessions run no ConnectRetry timer at all. DelayOpen is not implemented. Connection collisions (§6.8) are decided by
//! [`resolve_collision`], which the driver calls when it holds two
//! connections to one peer.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::packet::consts::{AFI_IPV4, SAFI_UNICAST, err};
use crate::packet::{
    Capability, Ctx, DecodeError, GracefulRestartCap, Message, Notification, Open, Update,
};

/// Session states (RFC 4271 §8.2.2): the type the speaker's views show.
pub use margay_api::status::SessionState as State;

/// Timers the session asks the driver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// ConnectRetryTimer.
    ConnectRetry,
    /// HoldTimer.
    Hold,
    /// KeepaliveTimer.
    Keepalive,
}

/// Inputs to the state machine.
#[allow(clippy::large_enum_variant)] // carries a Message by value, see there
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// ManualStart / AutomaticStart.
    Start,
    /// ManualStop: close with Cease.
    Stop(u8),
    /// A timer fired.
    Timer(Timer),
    /// A TCP connection is up (outgoing completed, or incoming accepted).
    TcpUp,
    /// The TCP connection failed or closed.
    TcpDown,
    /// A decoded message.
    Message(Message),
    /// A message that failed to decode: NOTIFICATION it and drop.
    BadMessage(DecodeError),
}

/// Why a session went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    /// We sent a NOTIFICATION.
    Sent(Notification),
    /// The peer sent one.
    Received(Notification),
    /// The connection closed without a NOTIFICATION.
    ConnectionLost,
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sent(n) => write!(f, "sent NOTIFICATION {}", n.describe()),
            Self::Received(n) => write!(f, "received NOTIFICATION {}", n.describe()),
            Self::ConnectionLost => f.write_str("connection lost"),
        }
    }
}

/// What the session negotiated, known once both OPENs are in.
#[derive(Debug, Clone, PartialEq)]
pub struct Negotiated {
    /// The peer's OPEN.
    pub peer_open: Open,
    /// Hold time in use (0: none).
    pub hold_time: u16,
    /// Keepalive interval in use (0: none).
    pub keepalive: u16,
    /// Codec context.
    pub ctx: Ctx,
    /// Families both sides announced.
    pub families: Vec<(u16, u8)>,
    /// The peer's graceful restart capability, when both sides have GR.
    pub peer_gr: Option<GracefulRestartCap>,
    /// The peer supports ROUTE-REFRESH.
    pub route_refresh: bool,
}

/// Outputs of the state machine, carried out by the driver in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open an outgoing TCP connection.
    Connect,
    /// Close the TCP connection.
    Disconnect,
    /// Send a message.
    Send(Message),
    /// (Re)arm a timer.
    SetTimer(Timer, Duration),
    /// Cancel a timer.
    StopTimer(Timer),
    /// The session reached Established.
    Up(Box<Negotiated>),
    /// The session left Established (or failed before it).
    Down(DownReason),
    /// An UPDATE for the RIB.
    Update(Update),
    /// The peer asked for our routes again.
    RouteRefresh(u16, u8),
}

/// Static parameters of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    /// Our AS.
    pub local_as: u32,
    /// The peer's AS, as configured.
    pub peer_as: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// Hold time we propose (0 or >= 3).
    pub hold_time: u16,
    /// Keepalive interval we want (capped at hold/3).
    pub keepalive: Option<u16>,
    /// Never initiate connections.
    pub passive: bool,
    /// Families we announce.
    pub families: Vec<(u16, u8)>,
    /// Our graceful restart capability, if enabled.
    pub graceful_restart: Option<GracefulRestartCap>,
    /// First ConnectRetry delay; doubles per failure up to `retry_max`.
    pub retry_base: Duration,
    /// Largest ConnectRetry delay.
    pub retry_max: Duration,
}

impl SessionConfig {
    /// Our OPEN message.
    pub fn open(&self) -> Open {
        let mut capabilities: Vec<Capability> = self
            .families
            .iter()
            .map(|&(afi, safi)| Capability::Multiprotocol { afi, safi })
            .collect();
        capabilities.push(Capability::RouteRefresh);
        capabilities.push(Capability::FourOctetAs(self.local_as));
        if let Some(gr) = &self.graceful_restart {
            capabilities.push(Capability::GracefulRestart(gr.clone()));
        }
        Open {
            asn: self.local_as,
            hold_time: self.hold_time,
            router_id: self.router_id,
            capabilities,
        }
    }
}

/// Hold time while waiting for the peer's OPEN (RFC 4271 §8.2.2: "large").
pub const OPEN_HOLD: Duration = Duration::from_secs(240);

/// One session's state machine.
#[derive(Debug, Clone)]
pub struct Session {
    cfg: SessionConfig,
    state: State,
    failures: u32,
    negotiated: Option<Negotiated>,
}

impl Session {
    /// A session in Idle.
    pub fn new(cfg: SessionConfig) -> Self {
        Self {
            cfg,
            state: State::Idle,
            failures: 0,
            negotiated: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Negotiated parameters (from OpenConfirm on).
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The restart time announced in the graceful restart capability from
    /// the next OPEN on (a session already up keeps what it negotiated).
    pub fn set_restart_time(&mut self, secs: u16) {
        if let Some(gr) = &mut self.cfg.graceful_restart {
            gr.restart_time = secs;
        }
    }

    /// The ConnectRetry delay after `failures` consecutive failures.
    pub fn retry_delay(&self) -> Duration {
        let shift = self.failures.min(16);
        (self.cfg.retry_base * (1u32 << shift)).min(self.cfg.retry_max)
    }

    /// Feeds one event; returns what to do.
    pub fn process(&mut self, ev: Event) -> Vec<Action> {
        use State::*;
        let mut out = Vec::new();
        match (self.state, ev) {
            (Idle, Event::Start) => {
                if self.cfg.passive {
                    self.state = Active;
                } else {
                    self.state = Connect;
                    out.push(Action::Connect);
                }
            }
            (Idle, _) => {}
            (_, Event::Stop(sub)) => {
                let n = Notification::new(err::CEASE, sub);
                if matches!(self.state, OpenSent | OpenConfirm | Established) {
                    out.push(Action::Send(Message::Notification(n.clone())));
                }
                self.fail(&mut out, DownReason::Sent(n));
                out.push(Action::StopTimer(Timer::ConnectRetry));
                self.state = Idle;
            }
            (Active, Event::Timer(Timer::ConnectRetry)) => {
                if !self.cfg.passive {
                    self.state = Connect;
                    out.push(Action::Connect);
                }
            }
            (Connect | Active, Event::TcpUp) => {
                out.push(Action::StopTimer(Timer::ConnectRetry));
                out.push(Action::Send(Message::Open(self.cfg.open())));
                out.push(Action::SetTimer(Timer::Hold, OPEN_HOLD));
                self.state = OpenSent;
            }
            (Connect, Event::TcpDown) => {
                self.failures += 1;
                self.state = Active;
                self.arm_retry(&mut out);
            }
            (Connect | Active, _) => {}
            (OpenSent, Event::Message(Message::Open(o))) => match self.check_open(&o) {
                Ok(neg) => {
                    out.push(Action::Send(Message::Keepalive));
                    self.arm_session_timers(&mut out, &neg);
                    self.negotiated = Some(neg);
                    self.state = OpenConfirm;
                }
                Err(n) => self.notify(&mut out, n),
            },
            (OpenConfirm, Event::Message(Message::Keepalive)) => {
                let neg = self.negotiated.clone().expect("negotiated in OpenConfirm");
                self.restart_hold(&mut out, &neg);
                self.failures = 0;
                self.state = Established;
                out.push(Action::Up(Box::new(neg)));
            }
            (Established, Event::Message(Message::Keepalive)) => {
                if let Some(neg) = self.negotiated.clone() {
                    self.restart_hold(&mut out, &neg);
                }
            }
            (Established, Event::Message(Message::Update(u))) => {
                if let Some(neg) = self.negotiated.clone() {
                    self.restart_hold(&mut out, &neg);
                }
                out.push(Action::Update(u));
            }
            (Established, Event::Message(Message::RouteRefresh(r))) => {
                out.push(Action::RouteRefresh(r.afi, r.safi));
            }
            (OpenConfirm | Established, Event::Timer(Timer::Keepalive)) => {
                out.push(Action::Send(Message::Keepalive));
                if let Some(neg) = &self.negotiated
                    && neg.keepalive > 0
                {
                    out.push(Action::SetTimer(
                        Timer::Keepalive,
                        Duration::from_secs(neg.keepalive as u64),
                    ));
                }
            }
            (OpenSent | OpenConfirm | Established, Event::Timer(Timer::Hold)) => {
                self.notify(&mut out, Notification::new(err::HOLD_TIMER_EXPIRED, 0));
            }
            (_, Event::Message(Message::Notification(n))) => {
                self.fail(&mut out, DownReason::Received(n));
            }
            (_, Event::BadMessage(e)) => self.notify(&mut out, e.notification()),
            (_, Event::TcpDown) => self.fail(&mut out, DownReason::ConnectionLost),
            (OpenSent | OpenConfirm | Established, Event::Timer(Timer::ConnectRetry)) => {}
            // Anything else is out of order for the state (§8.2.2 "any other event").
            (_, Event::Message(_))
            | (_, Event::TcpUp)
            | (_, Event::Start)
            | (_, Event::Timer(_)) => {
                self.notify(&mut out, Notification::new(err::FSM, self.fsm_subcode()));
            }
        }
        out
    }

    fn fsm_subcode(&self) -> u8 {
        // RFC 6608 subcodes: unexpected message in OpenSent / OpenConfirm / Established.
        match self.state {
            State::OpenSent => 1,
            State::OpenConfirm => 2,
            State::Established => 3,
            _ => 0,
        }
    }

    fn check_open(&self, o: &Open) -> Result<Negotiated, Notification> {
        if o.asn != self.cfg.peer_as {
            let mut n = Notification::new(err::OPEN, err::OPEN_BAD_PEER_AS);
            n.data = if o.asn > 0xffff {
                crate::packet::consts::AS_TRANS.to_be_bytes().to_vec()
            } else {
                (o.asn as u16).to_be_bytes().to_vec()
            };
            return Err(n);
        }
        let ibgp = self.cfg.peer_as == self.cfg.local_as;
        if ibgp && o.router_id == self.cfg.router_id {
            return Err(Notification::new(err::OPEN, err::OPEN_BAD_ID));
        }
        let hold_time = self.cfg.hold_time.min(o.hold_time);
        let keepalive = match self.cfg.keepalive {
            Some(k) if hold_time > 0 => k.min(hold_time / 3).max(1),
            _ => hold_time / 3,
        };
        let theirs = o.families();
        let mut ours = self.cfg.families.clone();
        if ours.is_empty() {
            ours.push((AFI_IPV4, SAFI_UNICAST));
        }
        let families = ours.into_iter().filter(|f| theirs.contains(f)).collect();
        Ok(Negotiated {
            peer_open: o.clone(),
            hold_time,
            keepalive,
            ctx: Ctx {
                four_octet_as: o.four_octet_as(),
                ibgp,
            },
            families,
            peer_gr: self
                .cfg
                .graceful_restart
                .as_ref()
                .and(o.graceful_restart().cloned()),
            route_refresh: o.route_refresh(),
        })
    }

    fn arm_session_timers(&self, out: &mut Vec<Action>, neg: &Negotiated) {
        self.restart_hold(out, neg);
        if neg.keepalive > 0 {
            out.push(Action::SetTimer(
                Timer::Keepalive,
                Duration::from_secs(neg.keepalive as u64),
            ));
        }
    }

    fn restart_hold(&self, out: &mut Vec<Action>, neg: &Negotiated) {
        if neg.hold_time > 0 {
            out.push(Action::SetTimer(
                Timer::Hold,
                Duration::from_secs(neg.hold_time as u64),
            ));
        } else {
            out.push(Action::StopTimer(Timer::Hold));
        }
    }

    fn notify(&mut self, out: &mut Vec<Action>, n: Notification) {
        out.push(Action::Send(Message::Notification(n.clone())));
        self.fail(out, DownReason::Sent(n));
    }

    /// Common exit: close, stop timers, report, back to Active with backoff.
    fn fail(&mut self, out: &mut Vec<Action>, why: DownReason) {
        out.push(Action::Disconnect);
        out.push(Action::StopTimer(Timer::Hold));
        out.push(Action::StopTimer(Timer::Keepalive));
        out.push(Action::Down(why));
        self.failures += 1;
        self.negotiated = None;
        self.state = State::Active;
        self.arm_retry(out);
    }

    fn arm_retry(&self, out: &mut Vec<Action>) {
        if !self.cfg.passive {
            out.push(Action::SetTimer(Timer::ConnectRetry, self.retry_delay()));
        }
    }
}

/// Which connection survives a collision (RFC 4271 §6.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The connection we initiated.
    Outgoing,
    /// The connection the peer initiated.
    Incoming,
}

/// RFC 4271 §6.8: if our identifier is lower, the connection we initiated is
/// closed; otherwise the one the peer initiated is.
pub fn resolve_collision(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> Keep {
    if u32::from(local_id) < u32::from(remote_id) {
        Keep::Incoming
    } else {
        Keep::Outgoing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::consts::AFI_IPV6;

    fn cfg() -> SessionConfig {
        SessionConfig {
            local_as: 64512,
            peer_as: 64512,
            router_id: Ipv4Addr::new(10, 0, 0, 1),
            hold_time: 90,
            keepalive: None,
            passive: false,
            families: vec![(AFI_IPV4, SAFI_UNICAST), (AFI_IPV6, SAFI_UNICAST)],
            graceful_restart: None,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }

    fn peer_open(hold: u16) -> Open {
        Open {
            asn: 64512,
            hold_time: hold,
            router_id: Ipv4Addr::new(10, 0, 0, 2),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(64512),
            ],
        }
    }

    /// A session with [`cfg`] given the peer's OPEN (hold time 90) as `f`
    /// changes it, and what that OPEN made it do.
    fn opened(f: impl FnOnce(&mut Open)) -> (Session, Vec<Action>) {
        let mut s = Session::new(cfg());
        s.process(Event::Start);
        s.process(Event::TcpUp);
        let mut o = peer_open(90);
        f(&mut o);
        let a = s.process(Event::Message(Message::Open(o)));
        (s, a)
    }

    /// Sending a NOTIFICATION `code`/`subcode`.
    fn notify(code: u8, subcode: u8) -> Action {
        Action::Send(Message::Notification(Notification::new(code, subcode)))
    }

    fn established(c: SessionConfig, hold: u16) -> (Session, Vec<Action>) {
        let mut s = Session::new(c);
        s.process(Event::Start);
        s.process(Event::TcpUp);
        s.process(Event::Message(Message::Open(peer_open(hold))));
        let acts = s.process(Event::Message(Message::Keepalive));
        (s, acts)
    }

    #[test]
    fn start_connects_unless_passive() {
        let mut s = Session::new(cfg());
        let a = s.process(Event::Start);
        assert_eq!(s.state(), State::Connect);
        assert!(a.contains(&Action::Connect));
        let mut p = Session::new(SessionConfig {
            passive: true,
            ..cfg()
        });
        let a = p.process(Event::Start);
        assert_eq!(p.state(), State::Active);
        assert!(!a.contains(&Action::Connect));
    }

    #[test]
    fn open_exchange_reaches_established_with_min_hold_and_a_third_keepalive() {
        let mut s = Session::new(cfg());
        s.process(Event::Start);
        let a = s.process(Event::TcpUp);
        assert!(matches!(a[1], Action::Send(Message::Open(_))));
        assert_eq!(a[0], Action::StopTimer(Timer::ConnectRetry));
        assert!(a.contains(&Action::SetTimer(Timer::Hold, OPEN_HOLD)));
        assert_eq!(s.state(), State::OpenSent);
        let a = s.process(Event::Message(Message::Open(peer_open(60))));
        assert_eq!(s.state(), State::OpenConfirm);
        assert_eq!(a[0], Action::Send(Message::Keepalive));
        assert!(a.contains(&Action::SetTimer(Timer::Hold, Duration::from_secs(60))));
        assert!(a.contains(&Action::SetTimer(Timer::Keepalive, Duration::from_secs(20))));
        let a = s.process(Event::Message(Message::Keepalive));
        assert_eq!(s.state(), State::Established);
        let Some(Action::Up(neg)) = a.last() else {
            panic!("{a:?}")
        };
        assert_eq!((neg.hold_time, neg.keepalive), (60, 20));
        assert!(neg.ctx.ibgp && neg.ctx.four_octet_as);
        // Only IPv4 unicast is common to both.
        assert_eq!(neg.families, vec![(AFI_IPV4, SAFI_UNICAST)]);
    }

    #[test]
    fn wrong_peer_as_is_refused_with_bad_peer_as() {
        let (s, a) = opened(|o| o.asn = 65001);
        let Action::Send(Message::Notification(n)) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!((n.code, n.subcode), (err::OPEN, err::OPEN_BAD_PEER_AS));
        assert!(a.contains(&Action::Disconnect));
        assert_eq!(s.state(), State::Active);
    }

    #[test]
    fn same_router_id_on_ibgp_is_refused() {
        let (_, a) = opened(|o| o.router_id = Ipv4Addr::new(10, 0, 0, 1));
        assert!(
            matches!(&a[0], Action::Send(Message::Notification(n)) if n.subcode == err::OPEN_BAD_ID)
        );
    }

    #[test]
    fn hold_timer_expiry_sends_notification_4_and_goes_down() {
        let (mut s, _) = established(cfg(), 9);
        let a = s.process(Event::Timer(Timer::Hold));
        assert_eq!(a[0], notify(err::HOLD_TIMER_EXPIRED, 0));
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Down(DownReason::Sent(_))))
        );
        assert_eq!(s.state(), State::Active);
    }

    #[test]
    fn updates_and_keepalives_restart_the_hold_timer() {
        let (mut s, _) = established(cfg(), 9);
        let a = s.process(Event::Message(Message::Update(Update::default())));
        assert_eq!(a[0], Action::SetTimer(Timer::Hold, Duration::from_secs(9)));
        assert!(matches!(a[1], Action::Update(_)));
        let a = s.process(Event::Message(Message::Keepalive));
        assert_eq!(
            a,
            vec![Action::SetTimer(Timer::Hold, Duration::from_secs(9))]
        );
    }

    #[test]
    fn zero_hold_time_means_no_timers() {
        let (s, a) = established(
            SessionConfig {
                hold_time: 0,
                ..cfg()
            },
            90,
        );
        assert!(a.contains(&Action::StopTimer(Timer::Hold)));
        assert_eq!(s.negotiated().unwrap().keepalive, 0);
    }

    #[test]
    fn unexpected_message_is_an_fsm_error() {
        let mut s = Session::new(cfg());
        s.process(Event::Start);
        s.process(Event::TcpUp);
        let a = s.process(Event::Message(Message::Update(Update::default())));
        assert_eq!(a[0], notify(err::FSM, 1));
    }

    #[test]
    fn connect_failures_back_off_exponentially_up_to_the_cap() {
        let mut s = Session::new(cfg());
        s.process(Event::Start);
        let mut delays = Vec::new();
        for _ in 0..7 {
            let a = s.process(Event::TcpDown);
            if let Some(Action::SetTimer(Timer::ConnectRetry, d)) = a.last() {
                delays.push(d.as_secs());
            }
            s.process(Event::Timer(Timer::ConnectRetry));
        }
        assert_eq!(delays, vec![2, 4, 8, 16, 30, 30, 30]);
        // Established resets the backoff.
        s.process(Event::TcpUp);
        s.process(Event::Message(Message::Open(peer_open(90))));
        s.process(Event::Message(Message::Keepalive));
        assert_eq!(s.retry_delay(), Duration::from_secs(1));
    }

    #[test]
    fn a_slow_connect_is_never_abandoned_for_a_new_one() {
        let mut s = Session::new(cfg());
        let a = s.process(Event::Start);
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::SetTimer(Timer::ConnectRetry, _)))
        );
        // A stray retry timer while connecting changes nothing.
        assert!(s.process(Event::Timer(Timer::ConnectRetry)).is_empty());
        assert_eq!(s.state(), State::Connect);
    }

    #[test]
    fn passive_sessions_never_retry() {
        let mut s = Session::new(SessionConfig {
            passive: true,
            ..cfg()
        });
        s.process(Event::Start);
        s.process(Event::TcpUp);
        let a = s.process(Event::TcpDown);
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::SetTimer(Timer::ConnectRetry, _)))
        );
        assert_eq!(s.state(), State::Active);
    }

    #[test]
    fn peer_notification_takes_the_session_down() {
        let (mut s, _) = established(cfg(), 90);
        let n = Notification::new(err::CEASE, err::CEASE_ADMIN_SHUTDOWN);
        let a = s.process(Event::Message(Message::Notification(n.clone())));
        assert!(a.contains(&Action::Down(DownReason::Received(n))));
        assert!(a.contains(&Action::Disconnect));
    }

    #[test]
    fn stop_sends_cease_and_goes_idle() {
        let (mut s, _) = established(cfg(), 90);
        let a = s.process(Event::Stop(err::CEASE_ADMIN_SHUTDOWN));
        assert_eq!(a[0], notify(err::CEASE, err::CEASE_ADMIN_SHUTDOWN));
        assert_eq!(s.state(), State::Idle);
        assert!(s.process(Event::Timer(Timer::ConnectRetry)).is_empty());
    }

    #[test]
    fn collision_keeps_the_higher_identifiers_connection() {
        let lo = Ipv4Addr::new(10, 0, 0, 1);
        let hi = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(resolve_collision(lo, hi), Keep::Incoming);
        assert_eq!(resolve_collision(hi, lo), Keep::Outgoing);
    }

    #[test]
    fn graceful_restart_is_negotiated_only_when_both_sides_have_it() {
        let gr = GracefulRestartCap {
            restart_time: 120,
            ..Default::default()
        };
        let mut s = Session::new(SessionConfig {
            graceful_restart: Some(gr.clone()),
            ..cfg()
        });
        s.process(Event::Start);
        s.process(Event::TcpUp);
        let mut o = peer_open(90);
        o.capabilities.push(Capability::GracefulRestart(gr.clone()));
        s.process(Event::Message(Message::Open(o)));
        assert_eq!(s.negotiated().unwrap().peer_gr, Some(gr));
        let (s2, _) = established(cfg(), 90);
        assert_eq!(s2.negotiated(), None.or(s2.negotiated()));
        assert!(s2.negotiated().unwrap().peer_gr.is_none());
    }
}
