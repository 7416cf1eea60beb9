//! Bidirectional Forwarding Detection (RFC 5880, single hop per RFC 5881,
//! asynchronous mode): how the speaker notices within a second that a
//! directly connected peer stopped forwarding, where BGP's hold timer
//! takes up to 90 s.
//!
//! - [`packet`]: the control packet codec (pure).
//! - [`session`]: one session's state machine and timers (pure: packets
//!   and time in, state changes and packets out).
//! - [`run`]: the sockets and the task that runs the sessions
//!   ([`Bfd`], owned by the RIB task while some peer has BFD on).
//!
//! A session that goes from Up to Down closes its peer's BGP session
//! (Cease, "BFD Down", RFC 9384) so the peer's routes are withdrawn at
//! once; AdminDown from the other side is not a failure (RFC 5882 §3.2).

pub mod packet;
pub mod run;
pub mod session;

pub use packet::{Control, Diag, State};
pub use run::{Bfd, Event, View};
pub use session::{Change, Params};
