//! BFD Control packets (RFC 5880 §4.1): decoding with the reception
//! checks of §6.8.6 that need no session, and encoding. Pure.
//!
//! Authentication (the A bit) is not implemented: a packet that asks for
//! it is refused, as §6.8.6 says for a session without authentication.

use std::fmt;

/// The protocol version this codec speaks.
pub const VERSION: u8 = 1;
/// The mandatory section's length, and so a packet's without
/// authentication.
pub const LEN: usize = 24;
/// UDP port of single-hop control packets (RFC 5881 §4).
pub const PORT: u16 = 3784;
/// The source ports a session may send from (RFC 5881 §4).
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// A session's state, as carried in the Sta field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Held down by its operator.
    AdminDown,
    /// Down.
    Down,
    /// Heard the remote system, which has not heard us yet.
    Init,
    /// Up: both sides hear each other.
    Up,
}

impl State {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            State::AdminDown => 0,
            State::Down => 1,
            State::Init => 2,
            State::Up => 3,
        }
    }
}

impl State {
    /// As `/status` shows it.
    pub fn view(self) -> margay_api::status::BfdState {
        use margay_api::status::BfdState;
        match self {
            State::AdminDown => BfdState::AdminDown,
            State::Down => BfdState::Down,
            State::Init => BfdState::Init,
            State::Up => BfdState::Up,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        })
    }
}

/// Why a session last left Up (the Diag field, RFC 5880 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Diag {
    /// No diagnostic.
    None,
    /// Control Detection Time Expired: the remote system went silent.
    DetectionExpired,
    /// Echo Function Failed.
    EchoFailed,
    /// Neighbor Signaled Session Down.
    NeighborDown,
    /// Forwarding Plane Reset.
    ForwardingReset,
    /// Path Down.
    PathDown,
    /// Concatenated Path Down.
    ConcatenatedPathDown,
    /// Administratively Down.
    AdminDown,
    /// Reverse Concatenated Path Down.
    ReverseConcatenatedPathDown,
    /// A value RFC 5880 reserves (9 to 31), kept as received.
    Reserved(u8),
}

impl Diag {
    fn from_bits(b: u8) -> Self {
        match b & 0x1f {
            0 => Diag::None,
            1 => Diag::DetectionExpired,
            2 => Diag::EchoFailed,
            3 => Diag::NeighborDown,
            4 => Diag::ForwardingReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdminDown,
            8 => Diag::ReverseConcatenatedPathDown,
            n => Diag::Reserved(n),
        }
    }

    fn bits(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::DetectionExpired => 1,
            Diag::EchoFailed => 2,
            Diag::NeighborDown => 3,
            Diag::ForwardingReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdminDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Reserved(n) => n & 0x1f,
        }
    }
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diag::None => f.write_str("none"),
            Diag::DetectionExpired => f.write_str("control detection time expired"),
            Diag::EchoFailed => f.write_str("echo function failed"),
            Diag::NeighborDown => f.write_str("neighbor signaled session down"),
            Diag::ForwardingReset => f.write_str("forwarding plane reset"),
            Diag::PathDown => f.write_str("path down"),
            Diag::ConcatenatedPathDown => f.write_str("concatenated path down"),
            Diag::AdminDown => f.write_str("administratively down"),
            Diag::ReverseConcatenatedPathDown => f.write_str("reverse concatenated path down"),
            Diag::Reserved(n) => write!(f, "reserved diagnostic {n}"),
        }
    }
}

/// One BFD Control packet, without authentication. Intervals are in
/// microseconds, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Diagnostic.
    pub diag: Diag,
    /// The sender's state.
    pub state: State,
    /// Poll (P): the sender asks for a Final.
    pub poll: bool,
    /// Final (F): the answer to a Poll.
    pub fin: bool,
    /// Control Plane Independent (C).
    pub cpi: bool,
    /// Demand (D): the sender wants demand mode.
    pub demand: bool,
    /// Detect Mult.
    pub detect_mult: u8,
    /// My Discriminator: the sender's, never zero.
    pub my_discr: u32,
    /// Your Discriminator: ours as the sender knows it, or zero.
    pub your_discr: u32,
    /// Desired Min TX Interval.
    pub desired_min_tx: u32,
    /// Required Min RX Interval (zero: send me nothing periodic).
    pub required_min_rx: u32,
    /// Required Min Echo RX Interval (zero: no echo).
    pub required_min_echo_rx: u32,
}

/// Why a received packet is discarded (RFC 5880 §6.8.6, the checks that
/// need no session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Fewer bytes than the mandatory section.
    #[error("{0} bytes, shorter than a BFD control packet")]
    Short(usize),
    /// A version other than 1.
    #[error("version {0}, not 1")]
    Version(u8),
    /// The Length field is below the minimum or past the datagram.
    #[error("length field {said} with {got} bytes received")]
    Length {
        /// The Length field.
        said: u8,
        /// The datagram's size.
        got: usize,
    },
    /// Detect Mult is zero.
    #[error("detect multiplier 0")]
    DetectMultZero,
    /// The Multipoint (M) bit is set.
    #[error("multipoint bit set")]
    Multipoint,
    /// My Discriminator is zero.
    #[error("sender's discriminator 0")]
    MyDiscrZero,
    /// Your Discriminator is zero although the sender is Init or Up.
    #[error("no receiver's discriminator in state {0}")]
    YourDiscrZero(State),
    /// Poll and Final in one packet (RFC 5880 §6.5 forbids it).
    #[error("poll and final bits both set")]
    PollAndFinal,
    /// The Authentication Present (A) bit: no session here authenticates.
    #[error("authentication asked for, none configured")]
    Authenticated,
}

mod bits {
    pub const POLL: u8 = 0x20;
    pub const FINAL: u8 = 0x10;
    pub const CPI: u8 = 0x08;
    pub const AUTH: u8 = 0x04;
    pub const DEMAND: u8 = 0x02;
    pub const MULTIPOINT: u8 = 0x01;
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Control {
    /// Decodes a datagram's payload, refusing what §6.8.6 discards
    /// before looking for a session.
    pub fn decode(b: &[u8]) -> Result<Self, Reject> {
        if b.len() < LEN {
            return Err(Reject::Short(b.len()));
        }
        let version = b[0] >> 5;
        if version != VERSION {
            return Err(Reject::Version(version));
        }
        let flags = b[1];
        let said = b[3];
        let min = if flags & bits::AUTH != 0 {
            LEN + 2
        } else {
            LEN
        };
        if (said as usize) < min || said as usize > b.len() {
            return Err(Reject::Length { said, got: b.len() });
        }
        if flags & bits::AUTH != 0 {
            return Err(Reject::Authenticated);
        }
        if b[2] == 0 {
            return Err(Reject::DetectMultZero);
        }
        if flags & bits::MULTIPOINT != 0 {
            return Err(Reject::Multipoint);
        }
        if flags & bits::POLL != 0 && flags & bits::FINAL != 0 {
            return Err(Reject::PollAndFinal);
        }
        let c = Control {
            diag: Diag::from_bits(b[0]),
            state: State::from_bits(flags >> 6),
            poll: flags & bits::POLL != 0,
            fin: flags & bits::FINAL != 0,
            cpi: flags & bits::CPI != 0,
            demand: flags & bits::DEMAND != 0,
            detect_mult: b[2],
            my_discr: u32_at(b, 4),
            your_discr: u32_at(b, 8),
            desired_min_tx: u32_at(b, 12),
            required_min_rx: u32_at(b, 16),
            required_min_echo_rx: u32_at(b, 20),
        };
        if c.my_discr == 0 {
            return Err(Reject::MyDiscrZero);
        }
        if c.your_discr == 0 && matches!(c.state, State::Init | State::Up) {
            return Err(Reject::YourDiscrZero(c.state));
        }
        Ok(c)
    }

    /// The packet's 24 bytes.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (VERSION << 5) | self.diag.bits();
        b[1] = (self.state.bits() << 6)
            | if self.poll { bits::POLL } else { 0 }
            | if self.fin { bits::FINAL } else { 0 }
            | if self.cpi { bits::CPI } else { 0 }
            | if self.demand { bits::DEMAND } else { 0 };
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        for (at, v) in [
            (4, self.my_discr),
            (8, self.your_discr),
            (12, self.desired_min_tx),
            (16, self.required_min_rx),
            (20, self.required_min_echo_rx),
        ] {
            b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> Control {
        Control {
            diag: Diag::None,
            state: State::Up,
            poll: true,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: 0x0102_0304,
            your_discr: 7,
            desired_min_tx: 300_000,
            required_min_rx: 300_000,
            required_min_echo_rx: 0,
        }
    }

    #[test]
    fn round_trips_and_matches_the_rfc_layout() {
        let c = up();
        let b = c.encode();
        assert_eq!(b[0], 0x20, "version 1, no diagnostic");
        assert_eq!(b[1], 0xc0 | 0x20, "Up, Poll");
        assert_eq!(&b[2..8], &[3, 24, 1, 2, 3, 4]);
        assert_eq!(Control::decode(&b), Ok(c));
        for d in 0..32 {
            let c = Control {
                diag: Diag::from_bits(d),
                ..up()
            };
            assert_eq!(Control::decode(&c.encode()), Ok(c));
        }
    }

    #[test]
    fn refuses_what_rfc_5880_discards() {
        let good = up().encode();
        let with = |f: &dyn Fn(&mut [u8; LEN])| {
            let mut b = good;
            f(&mut b);
            Control::decode(&b)
        };
        assert_eq!(Control::decode(&good[..23]), Err(Reject::Short(23)));
        assert_eq!(with(&|b| b[0] = 0x40), Err(Reject::Version(2)));
        assert_eq!(
            with(&|b| b[3] = 23),
            Err(Reject::Length { said: 23, got: 24 })
        );
        assert_eq!(
            with(&|b| b[3] = 25),
            Err(Reject::Length { said: 25, got: 24 })
        );
        assert_eq!(with(&|b| b[2] = 0), Err(Reject::DetectMultZero));
        assert_eq!(with(&|b| b[1] |= 1), Err(Reject::Multipoint));
        assert_eq!(with(&|b| b[1] |= 0x10), Err(Reject::PollAndFinal));
        assert_eq!(with(&|b| b[4..8].fill(0)), Err(Reject::MyDiscrZero));
        assert_eq!(
            with(&|b| b[8..12].fill(0)),
            Err(Reject::YourDiscrZero(State::Up))
        );
        // Authentication: a length that leaves room for it, and the bit.
        let mut b = [0u8; 26];
        b[..LEN].copy_from_slice(&good);
        b[1] |= 4;
        b[3] = 26;
        assert_eq!(Control::decode(&b), Err(Reject::Authenticated));
        // Down with no receiver's discriminator is how a session starts.
        let down = Control {
            state: State::Down,
            your_discr: 0,
            ..up()
        };
        assert_eq!(Control::decode(&down.encode()), Ok(down));
        // Trailing bytes past the Length field are ignored.
        let mut long = good.to_vec();
        long.extend_from_slice(&[0xff; 8]);
        assert_eq!(Control::decode(&long), Ok(up()));
    }
}
