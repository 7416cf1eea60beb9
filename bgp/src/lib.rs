//! Margay's BGP speaker.
//!
//! - [`packet`]: the wire codec (pure).
//! - [`fsm`]: the session state machine of RFC 4271 §8 (pure: events in,
//!   actions out; timers are actions).
//! - [`rib`]: Adj-RIB-In, the decision process, Loc-RIB, export (pure).
//! - [`config`]: the TOML configuration of `margay-bgp`.
//! - [`speaker`]: the handle a program holds; it owns the tasks below.
//! - `rib_task`: the RIB task (routing state, peers, export).
//! - `peer`, `conn`, `outbox`: a peer's task, its connections, their
//!   writers.
//! - [`kernel`]: best routes into the kernel over rtnetlink, batched.
//! - [`metrics`]: the speaker's Prometheus metrics (a collector).
//! - [`net`]: socket options (TCP MD5, GTSM) and connecting with them.
//! - [`bfd`]: BFD (RFC 5880/5881): codec, session machine, its task.
//!
//! # Tasks
//!
//! Every task is owned: by a [`margay_task::Owned`] (aborted when
//! dropped) or in a `JoinSet` its owner holds, so nothing outlives the
//! [`Speaker`] that started it. `══▶` is ownership, `──▶` a channel.
//!
//! ```text
//!  Speaker (the handle) ══Owned══▶ RIB task: Rib, update groups, Adj-RIB-Out
//!    │ ToRib::{Set*, Routes}, mpsc(1024) ──────────▶ RIB task
//!    │ Stop (Run, Cease, Silent), watch ───────────▶ accept loop, RIB task,
//!    │                                               every peer task
//!    └ Arc<Shared> (neighbor views, counters), read without a round trip
//!
//!  RIB task
//!    ╠══Owned═══▶ accept loop ─ToRib::Incoming(TcpStream)──▶ RIB task
//!    ╠══Owned═══▶ a timer each (stale routes, refresh, restart)
//!    ║              ─ToRib::{StaleTimeout, RefreshDue, RestartTimeout}──▶ RIB task
//!    ╠══JoinSet═▶ peer task × peer: FSM per link, reads its sockets
//!    ║              ◀─PeerCmd::{Incoming, Cease, RestartTime, PathUp}, mpsc(4)
//!    ║              ◀─Wire (an export's UPDATEs), unbounded────────────── RIB task
//!    ║              ─PeerEvent::{Up, Update, Down, Refresh}, mpsc(64)──▶ RIB task
//!    ║  peer task
//!    ║    ╚══JoinSet═▶ writer × connection ──▶ socket
//!    ║                   ◀─Wire, unbounded (bounded in bytes)── peer task
//!    ╠══FibWriter═▶ kernel writer thread (fib on)
//!    ║                ◀─Vec<FibOp>, mpsc(32)── RIB task; ends with the sender
//!    ╚══Owned═══▶ BFD task (once a peer has BFD): UDP 3784, a session each
//!                   ◀─peers and settings, watch───────────────── RIB task
//!                   ─bfd::Event (a state change), unbounded──▶ RIB task
//! ```
//!
//! Ending: [`Speaker::stop`] (or `stop_graceful`, or `shutdown`) fires a
//! watch the accept loop, the RIB task and every peer task select on. The
//! accept loop returns; each peer task says Cease (or, graceful, nothing),
//! waits for its writers to flush (each at most two seconds) and returns;
//! the RIB task waits for its peer tasks (at most a second), then returns,
//! dropping the rest, and [`Speaker::stopped`] resolves. Dropping the
//! [`Speaker`] first fires the watch as `stop_graceful` does (unless a stop
//! came before), then aborts whatever still runs, down the tree: a task
//! that runs a moment longer closes its session without a NOTIFICATION,
//! so a program that exits (an agent being upgraded) leaves its peers
//! keeping its routes under graceful restart.
//!
//! [`Speaker`]: speaker::Speaker
//! [`Speaker::stop`]: speaker::Speaker::stop
//! [`Speaker::stopped`]: speaker::Speaker::stopped

pub mod bfd;
pub mod config;
mod conn;
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
mod rib_task;
pub mod speaker;
mod state;

pub use error::{Error, Result};
