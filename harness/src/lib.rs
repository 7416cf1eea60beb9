//! Margay's real-component test harness.
//!
//! Every integration test and the `margay-lab` binary build their world from
//! these parts, all real: network namespaces joined by veth pairs and a
//! bridged fabric ([`netns`], [`topo`]), etcd + kube-apiserver on loopback
//! ([`kube`]), BIRD / FRR / GoBGP / ExaBGP inside a namespace ([`bgpd`]).
//!
//! Ownership is the cleanup strategy: each part is a value whose `Drop` stops
//! its processes by PID and removes its namespaces and files, so a panicking
//! test leaves nothing behind. Names carry the owning PID
//! ([`names::unique`]); [`names::sweep_stale`] removes what a SIGKILLed test
//! process could not clean up itself.

pub mod bgpd;
pub use kube::broker;
pub mod error;
pub mod kube;
pub mod kubelet;
pub mod names;
pub mod netcheck;
pub mod netns;
pub mod nft_ns;
pub mod paths;
pub mod process;
pub mod topo;
pub mod wait;

pub use error::{Error, Result};
pub use netns::Netns;
pub use process::Daemon;
pub use topo::{Fabric, Node};

/// True when the process runs as root, which every real-kernel test needs.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
