//! The BGP-4 wire codec, written for Margay (RFC 4271, 4760, 5492, 6793,
//! 2918, 4724, 4456, 7606).
//!
//! Pure functions over byte slices: no I/O, no allocation beyond the decoded
//! values. Decoders take a [`Ctx`] with what the session negotiated, and
//! return either a message (UPDATEs already carry RFC 7606 treat-as-withdraw
//! or attribute-discard applied) or a [`DecodeError`] naming the
//! NOTIFICATION to send. No input makes them panic (see `fuzz/`).

pub mod attribute;
pub mod consts;
pub mod error;
pub mod message;
pub mod prefix;

pub use attribute::{AsPath, Attrs, MpReach, MpUnreach, Origin, RawAttr, Segment, SegmentKind};
pub use error::DecodeError;
pub use message::{
    Capability, GracefulRestartCap, Message, Notification, Open, RouteRefresh, Update,
    UpdateBuilder, frame_len,
};
pub use prefix::Prefix;

/// What the session negotiated, as far as encoding depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    /// Both sides sent the 4-octet AS capability: AS numbers are 4 octets.
    pub four_octet_as: bool,
    /// The peer is in our AS (iBGP): LOCAL_PREF is expected.
    pub ibgp: bool,
}

impl Default for Ctx {
    fn default() -> Self {
        Self {
            four_octet_as: true,
            ibgp: false,
        }
    }
}
