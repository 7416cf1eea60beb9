//! Margay's node agent as a library: what `margay-agent` and `margayctl`
//! are built from. Each subsystem is a folder whose `mod.rs` says what it
//! owns:
//!
//! - [`cni`]: the CNI service on the agent's unix socket (ADD, DEL, CHECK,
//!   STATUS, GC), the attribution alias, start-up reconciliation;
//! - [`dataplane`]: every kernel operation behind one trait (the real
//!   kernel and a fake), the reconciliation of each kernel table, what
//!   Margay owns in the kernel, natOutgoing;
//! - [`routing`]: the routing loop (snapshot → pure plan → apply), BGP
//!   sessions, remote-block routes per encapsulation, this node's blocks;
//! - [`kube`]: watched inputs that know whether they are current, the
//!   Node's identity and condition, BGP objects' `Valid` condition;
//! - [`duties`]: the cluster-wide writes (pool status, garbage
//!   collection), done by the elected leader only;
//! - [`obs`]: shared state, `/healthz` `/readyz` `/metrics` `/status`;
//! - [`run`]: `margay-agent run`, owning every task; [`install`]:
//!   `install-cni`; [`ctl`]: `margayctl`'s commands;
//! - [`error`]: the agent's error type.
//!
//! The `margay.dev` types, annotation keys, condition names, CNI codes and
//! status views live in `margay-api`; IPAM and its Kubernetes store in
//! `margay-ipam`.

pub mod cni;
pub mod ctl;
pub mod dataplane;
pub mod duties;
pub mod error;
pub mod install;
pub mod kube;
pub mod netpol;
pub mod obs;
pub mod routing;
pub mod run;

pub use error::{Error, Result};
