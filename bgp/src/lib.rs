//! Margay's BGP speaker.
//!
//! - [`packet`]: the wire codec (pure).
//! - [`fsm`]: the session state machine of RFC 4271 §8 (pure: events in,
//!   actions out; timers are actions).
//! - [`rib`]: Adj-RIB-In, the decision process, Loc-RIB, export (pure).
//! - [`config`]: the TOML configuration of `margay-bgp`.
//! - [`speaker`]: the tokio driver: sockets, timers, peers, the RIB task.
//! - [`kernel`]: best routes into the kernel over rtnetlink, batched.
//! - [`metrics`]: the speaker's Prometheus metrics (a collector).
//! - [`net`]: socket options (TCP MD5, GTSM) and connecting with them.

// Detached tasks in this crate are being owned (issue 29); remove when done.
#![allow(clippy::disallowed_methods)]

pub mod config;
pub mod error;
pub mod fsm;
mod group;
pub mod kernel;
pub mod metrics;
pub mod net;
mod outbox;
pub mod packet;
mod peer;
pub mod prefix_map;
pub mod rib;
pub mod speaker;
mod state;
pub mod task;

pub use error::{Error, Result};
