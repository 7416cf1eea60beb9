//! One BFD session in asynchronous mode (RFC 5880 §6): state, timers and
//! the Poll Sequence, as a pure machine. The runtime feeds it received
//! packets and the time, asks it when to send and when the remote system
//! is overdue, and sends what [`Session::packet`] says.
//!
//! Demand mode and the Echo function are not implemented (we never ask
//! for them, and say so: D clear, Required Min Echo RX zero).

use std::time::{Duration, Instant};

use super::packet::{Control, Diag, State};

/// How fast a session runs once Up (BGPPeer `bfd`, `[neighbor.bfd]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    /// Desired Min TX Interval once Up.
    pub min_tx: Duration,
    /// Required Min RX Interval.
    pub min_rx: Duration,
    /// Detect Mult: packets missed before the session goes Down.
    pub multiplier: u8,
}

impl Default for Params {
    /// 300 ms × 3: a silent neighbor is Down within 900 ms.
    fn default() -> Self {
        Self {
            min_tx: Duration::from_millis(300),
            min_rx: Duration::from_millis(300),
            multiplier: 3,
        }
    }
}

/// The slowest a session sends while not Up (RFC 5880 §6.8.3: at least
/// one second).
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// A change of a session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The state before.
    pub from: State,
    /// The state now.
    pub to: State,
    /// Why (the local diagnostic).
    pub diag: Diag,
    /// The remote system's state as last heard: a session it took to
    /// AdminDown is no failure of the path (RFC 5882 §3.2).
    pub remote: State,
}

impl Change {
    /// The path failed: Up to Down, not by anyone's AdminDown.
    pub fn failed(&self) -> bool {
        self.from == State::Up && self.to == State::Down && self.remote != State::AdminDown
    }
}

/// A BFD session.
#[derive(Debug, Clone)]
pub struct Session {
    params: Params,
    state: State,
    diag: Diag,
    local_discr: u32,
    remote_discr: u32,
    remote_state: State,
    /// What the remote system last asked: Required Min RX (zero: send
    /// nothing periodic) and Desired Min TX, and its Detect Mult.
    remote_min_rx: Duration,
    remote_min_tx: Duration,
    remote_mult: u8,
    /// The remote system asks for demand mode: no periodic packets once
    /// both are Up (§6.8.7).
    remote_demand: bool,
    /// Desired Min TX as we advertise it.
    desired_min_tx: Duration,
    /// The Required Min RX the detection time uses: a decrease waits for
    /// the Poll Sequence to end (§6.8.3).
    rx_basis: Duration,
    /// The one our transmit interval follows: an increase waits for the
    /// Poll Sequence to end (§6.8.3).
    tx_basis: Duration,
    /// A Poll Sequence is under way: our packets carry P.
    polling: bool,
    /// The remote system polled: the next packet carries F, at once.
    owe_final: bool,
    next_tx: Instant,
    detect_at: Option<Instant>,
}

fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Session {
    /// A session with discriminator `local_discr` (non-zero, unique among
    /// this system's sessions), Down, its first packet due at `now`.
    pub fn new(params: Params, local_discr: u32, now: Instant) -> Self {
        let slow = params.min_tx.max(SLOW_TX);
        Self {
            params,
            state: State::Down,
            diag: Diag::None,
            local_discr,
            remote_discr: 0,
            remote_state: State::Down,
            // RFC 5880 §6.8.1: initially 1 µs.
            remote_min_rx: Duration::from_micros(1),
            remote_min_tx: Duration::ZERO,
            remote_mult: 0,
            remote_demand: false,
            desired_min_tx: slow,
            rx_basis: params.min_rx,
            tx_basis: slow,
            polling: false,
            owe_final: false,
            next_tx: now,
            detect_at: None,
        }
    }

    /// The session's state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why it last went down.
    pub fn diag(&self) -> Diag {
        self.diag
    }

    /// Our discriminator.
    pub fn local_discr(&self) -> u32 {
        self.local_discr
    }

    /// The remote system's, once heard (zero before, and after it went
    /// silent for a detection time).
    pub fn remote_discr(&self) -> u32 {
        self.remote_discr
    }

    /// Its settings.
    pub fn params(&self) -> Params {
        self.params
    }

    /// The detection time: how long the remote system may be silent
    /// (§6.8.4, asynchronous mode).
    pub fn detection_time(&self) -> Duration {
        self.rx_basis.max(self.remote_min_tx) * u32::from(self.remote_mult)
    }

    /// The transmit interval before jitter (§6.8.7).
    pub fn tx_interval(&self) -> Duration {
        self.tx_basis.max(self.remote_min_rx)
    }

    /// A packet received for this session (its checks of §6.8.6 done by
    /// [`Control::decode`] and by whoever chose the session), at `now`.
    pub fn receive(&mut self, p: &Control, now: Instant) -> Option<Change> {
        self.remote_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_min_rx = Duration::from_micros(p.required_min_rx.into());
        self.remote_min_tx = Duration::from_micros(p.desired_min_tx.into());
        self.remote_mult = p.detect_mult;
        self.remote_demand = p.demand;
        if p.fin && self.polling {
            self.polling = false;
            self.tx_basis = self.desired_min_tx;
            self.rx_basis = self.params.min_rx;
        }
        if p.poll {
            self.owe_final = true;
            self.next_tx = self.next_tx.min(now);
        }
        if self.state == State::AdminDown {
            return None;
        }
        self.detect_at = Some(now + self.detection_time());
        let from = self.state;
        match (self.state, p.state) {
            (State::Down | State::AdminDown, _) if p.state == State::AdminDown => {}
            (_, State::AdminDown) => self.set(State::Down, Diag::NeighborDown),
            (State::Down, State::Down) => self.set(State::Init, Diag::None),
            (State::Down, State::Init) => self.set(State::Up, Diag::None),
            (State::Init, State::Init | State::Up) => self.set(State::Up, Diag::None),
            (State::Up, State::Down) => self.set(State::Down, Diag::NeighborDown),
            _ => {}
        }
        (self.state != from).then_some(Change {
            from,
            to: self.state,
            diag: self.diag,
            remote: p.state,
        })
    }

    /// New settings, taken in place (§6.8.3): announced with a Poll
    /// Sequence; a slower transmit interval or a shorter Required Min RX
    /// used only once it ends, the others at once. The session stays up.
    pub fn set_params(&mut self, params: Params) {
        if params == self.params {
            return;
        }
        let (old_tx, old_rx) = (self.desired_min_tx, self.params.min_rx);
        self.params = params;
        self.desired_min_tx = self.wanted_tx(self.state);
        if self.desired_min_tx < self.tx_basis || self.state != State::Up {
            self.tx_basis = self.desired_min_tx;
        }
        if params.min_rx > self.rx_basis {
            self.rx_basis = params.min_rx;
        }
        if self.desired_min_tx != old_tx || params.min_rx != old_rx {
            self.polling = true;
        }
    }

    /// Desired Min TX in state `s`: at least a second while not Up.
    fn wanted_tx(&self, s: State) -> Duration {
        if s == State::Up {
            self.params.min_tx
        } else {
            self.params.min_tx.max(SLOW_TX)
        }
    }

    /// Time passes: the session goes Down when the remote system has been
    /// silent for the detection time (§6.8.4).
    pub fn tick(&mut self, now: Instant) -> Option<Change> {
        let due = self.detect_at.is_some_and(|t| now >= t);
        if !due {
            return None;
        }
        self.detect_at = None;
        self.remote_discr = 0;
        let from = self.state;
        if matches!(from, State::Init | State::Up) {
            self.set(State::Down, Diag::DetectionExpired);
            return Some(Change {
                from,
                to: State::Down,
                diag: Diag::DetectionExpired,
                remote: self.remote_state,
            });
        }
        None
    }

    /// Held down by the operator (or before the session is removed): it
    /// says AdminDown until [`Session::enable`].
    pub fn admin_down(&mut self) -> Option<Change> {
        let from = self.state;
        if from == State::AdminDown {
            return None;
        }
        self.set(State::AdminDown, Diag::AdminDown);
        self.detect_at = None;
        Some(Change {
            from,
            to: State::AdminDown,
            diag: Diag::AdminDown,
            remote: self.remote_state,
        })
    }

    /// Out of AdminDown: Down, starting again.
    pub fn enable(&mut self) {
        if self.state == State::AdminDown {
            self.set(State::Down, Diag::AdminDown);
        }
    }

    fn set(&mut self, to: State, diag: Diag) {
        if to != State::Up || self.state != State::Up {
            self.diag = diag;
        }
        self.state = to;
        // §6.8.3: at least a second while not Up; the configured interval
        // once Up. A change is announced with a Poll Sequence; a slower
        // interval is used once it ends (while Up), a faster one at once.
        let want = self.wanted_tx(to);
        if want != self.desired_min_tx {
            self.desired_min_tx = want;
            self.polling = true;
            if want < self.tx_basis || to != State::Up {
                self.tx_basis = want;
            }
        }
    }

    /// When the next packet is due (at once when a Final is owed); `None`
    /// when the remote system wants nothing periodic and nothing is owed.
    pub fn next_tx(&self) -> Option<Instant> {
        let demand =
            self.remote_demand && self.state == State::Up && self.remote_state == State::Up;
        let periodic = !self.remote_min_rx.is_zero() && !demand;
        (self.owe_final || periodic).then_some(self.next_tx)
    }

    /// When the remote system is overdue, while a detection timer runs.
    pub fn detect_at(&self) -> Option<Instant> {
        self.detect_at
    }

    /// The packet to send now.
    pub fn packet(&self) -> Control {
        Control {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !self.owe_final,
            fin: self.owe_final,
            cpi: false,
            demand: false,
            detect_mult: self.params.multiplier,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx: us(self.desired_min_tx),
            required_min_rx: us(self.params.min_rx),
            required_min_echo_rx: 0,
        }
    }

    /// [`Session::packet`] went out at `now`; `jitter` in `[0, 1)` places
    /// the next one between 75 % and 100 % of the interval (90 % with a
    /// multiplier of 1), as §6.8.7 asks.
    pub fn sent(&mut self, now: Instant, jitter: f64) {
        self.owe_final = false;
        let top = if self.params.multiplier == 1 {
            0.90
        } else {
            1.0
        };
        let f = 0.75 + (top - 0.75) * jitter.clamp(0.0, 1.0);
        self.next_tx = now + self.tx_interval().mul_f64(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(now: Instant) -> (Session, Session) {
        let p = Params::default();
        (Session::new(p, 1, now), Session::new(p, 2, now))
    }

    /// `a` sends to `b`; what changed at `b`.
    fn send(a: &mut Session, b: &mut Session, now: Instant) -> Option<Change> {
        let p = Control::decode(&a.packet().encode()).expect("a valid packet");
        a.sent(now, 0.5);
        b.receive(&p, now)
    }

    /// The three-way handshake: A's Down, B's Init, A's Up.
    fn handshake(a: &mut Session, b: &mut Session, t: Instant) {
        send(a, b, t);
        send(b, a, t);
        send(a, b, t);
    }

    /// Two sessions Up, B's first packet as Up heard by A.
    fn up(t: Instant) -> (Session, Session) {
        let (mut a, mut b) = pair(t);
        handshake(&mut a, &mut b, t);
        send(&mut b, &mut a, t);
        (a, b)
    }

    #[test]
    fn two_sessions_come_up_by_the_three_way_handshake() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        assert_eq!(a.packet().your_discr, 0);
        let c = send(&mut a, &mut b, t).unwrap();
        assert_eq!((c.from, c.to), (State::Down, State::Init));
        let c = send(&mut b, &mut a, t).unwrap();
        assert_eq!((c.from, c.to), (State::Down, State::Up), "A heard Init");
        let c = send(&mut a, &mut b, t).unwrap();
        assert_eq!((c.from, c.to), (State::Init, State::Up));
        assert_eq!(a.packet().your_discr, 2);
        assert_eq!(b.packet().your_discr, 1);
    }

    #[test]
    fn slow_until_up_then_the_configured_rate_after_a_poll() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        assert_eq!(a.packet().desired_min_tx, 1_000_000, "1 s while Down");
        handshake(&mut a, &mut b, t);
        // Both Up: each polls to announce 300 ms, which it uses at once
        // (faster); B owes A's poll a Final first (never P and F in one).
        assert!(a.packet().poll);
        assert_eq!(a.packet().desired_min_tx, 300_000);
        let f = b.packet();
        assert!(f.fin && !f.poll, "a Final answers, without Poll");
        assert!(b.next_tx().unwrap() <= t, "at once");
        send(&mut b, &mut a, t);
        assert!(!a.packet().poll, "A's poll ended");
        assert!(b.packet().poll, "B's goes on");
        send(&mut b, &mut a, t);
        assert!(a.packet().fin);
        send(&mut a, &mut b, t);
        assert!(!b.packet().poll, "B's poll ended");
        assert_eq!(a.tx_interval(), Duration::from_millis(300));
        assert_eq!(a.detection_time(), Duration::from_millis(900));
    }

    #[test]
    fn silence_for_the_detection_time_takes_it_down() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        send(&mut a, &mut b, t);
        send(&mut b, &mut a, t);
        assert_eq!(a.state(), State::Up);
        // The last packet came while B (Init) still advertised 1 s × 3.
        let at = a.detect_at().unwrap();
        assert_eq!(at, t + Duration::from_secs(3));
        assert_eq!(a.tick(at - Duration::from_millis(1)), None);
        let c = a.tick(at).unwrap();
        assert_eq!((c.to, c.diag), (State::Down, Diag::DetectionExpired));
        assert_eq!(a.remote_discr(), 0);
        assert_eq!(a.packet().diag, Diag::DetectionExpired);
        assert_eq!(a.packet().desired_min_tx, 1_000_000, "slow again");
        // Once B runs at 300 ms its silence is found in 900 ms.
        let (mut a, mut b) = pair(t);
        for _ in 0..3 {
            send(&mut a, &mut b, t);
            send(&mut b, &mut a, t);
        }
        assert_eq!(a.detect_at(), Some(t + Duration::from_millis(900)));
    }

    #[test]
    fn neighbor_down_and_admin_down() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        handshake(&mut a, &mut b, t);
        let c = b.admin_down().unwrap();
        assert_eq!(c.to, State::AdminDown);
        let c = send(&mut b, &mut a, t).unwrap();
        assert_eq!((c.to, c.diag), (State::Down, Diag::NeighborDown));
        // A Down session stays Down while the other says AdminDown.
        assert_eq!(send(&mut b, &mut a, t), None);
        assert_eq!(b.tick(t + Duration::from_secs(60)), None, "no timer");
        b.enable();
        assert_eq!(b.state(), State::Down);
        let c = send(&mut b, &mut a, t).unwrap();
        assert_eq!(c.to, State::Init);
    }

    #[test]
    fn only_a_path_failure_is_a_failure() {
        let t = Instant::now();
        let (mut a, mut b) = up(t);
        // The other side's AdminDown: Down, but no failure (RFC 5882).
        b.admin_down();
        let c = send(&mut b, &mut a, t).unwrap();
        assert_eq!(
            (c.from, c.to, c.remote),
            (State::Up, State::Down, State::AdminDown)
        );
        assert!(!c.failed());
        // Silence, or the other side saying Down: failures.
        let (mut a, _) = up(t);
        let c = a.tick(a.detect_at().unwrap()).unwrap();
        assert!(c.failed(), "{c:?}");
        let (mut a, mut b) = up(t);
        b.tick(b.detect_at().unwrap());
        let c = send(&mut b, &mut a, t).unwrap();
        assert!(c.failed() && c.diag == Diag::NeighborDown, "{c:?}");
    }

    #[test]
    fn new_settings_are_taken_in_place_by_a_poll() {
        let t = Instant::now();
        let (mut a, mut b) = pair(t);
        for _ in 0..3 {
            handshake(&mut a, &mut b, t);
            send(&mut b, &mut a, t);
        }
        assert!(!a.packet().poll && a.state() == State::Up);
        // Faster: used at once, announced by a poll; the session stays Up.
        let fast = Params {
            min_tx: Duration::from_millis(100),
            min_rx: Duration::from_millis(100),
            multiplier: 3,
        };
        a.set_params(fast);
        assert_eq!(a.state(), State::Up);
        assert!(a.packet().poll);
        assert_eq!(a.packet().desired_min_tx, 100_000);
        assert_eq!(
            a.tx_interval(),
            Duration::from_millis(300),
            "B's RequiredMinRx"
        );
        // The shorter RequiredMinRx waits for the Final before the
        // detection time uses it (B still sends at its old pace).
        assert_eq!(a.detection_time(), Duration::from_millis(900));
        send(&mut a, &mut b, t);
        b.set_params(fast);
        send(&mut b, &mut a, t);
        assert!(!a.packet().poll, "A's poll ended");
        assert_eq!(a.detection_time(), Duration::from_millis(300));
        // Slower: announced, used only once the poll ends.
        a.set_params(Params::default());
        assert_eq!(a.packet().desired_min_tx, 300_000);
        assert_eq!(a.tx_interval(), Duration::from_millis(100));
        send(&mut a, &mut b, t);
        send(&mut b, &mut a, t);
        assert_eq!(a.tx_interval(), Duration::from_millis(300));
    }

    #[test]
    fn a_remote_in_demand_mode_gets_nothing_periodic_once_up() {
        let t = Instant::now();
        let (mut a, b) = up(t);
        let mut p = b.packet();
        p.demand = true;
        (p.fin, p.poll) = (false, false);
        a.sent(t, 0.5);
        a.receive(&p, t);
        assert_eq!(a.next_tx(), None);
    }

    #[test]
    fn jitter_keeps_the_interval_between_three_quarters_and_all() {
        let t = Instant::now();
        let (mut a, _) = pair(t);
        a.sent(t, 0.0);
        assert_eq!(a.next_tx(), Some(t + Duration::from_millis(750)));
        a.sent(t, 0.999_999);
        assert!(a.next_tx().unwrap() <= t + Duration::from_secs(1));
        let mut one = Session::new(
            Params {
                multiplier: 1,
                ..Params::default()
            },
            3,
            t,
        );
        one.sent(t, 1.0);
        assert_eq!(one.next_tx(), Some(t + Duration::from_millis(900)));
    }

    #[test]
    fn a_remote_that_wants_nothing_gets_only_finals() {
        let t = Instant::now();
        let (mut a, _) = pair(t);
        let mut p = Control {
            required_min_rx: 0,
            poll: true,
            ..Session::new(Params::default(), 9, t).packet()
        };
        a.receive(&p, t);
        assert!(a.next_tx().is_some(), "the Final is owed");
        a.sent(t, 0.5);
        assert_eq!(a.next_tx(), None);
        p.poll = false;
        a.receive(&p, t);
        assert_eq!(a.next_tx(), None);
    }
}
