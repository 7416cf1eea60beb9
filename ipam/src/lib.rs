//! Margay IPAM: which node owns which block, and which pod owns which address.
//!
//! Pure logic over a store trait; the Kubernetes store lives in the agent.
//! See `DESIGN.md` beside this crate for the invariants.

pub mod block;

/// Errors of the IPAM crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The block size does not fit the pool's address family.
    #[error("block size /{size} is invalid for {family} pool {cidr} (allowed /{min} to /{max})")]
    InvalidBlockSize {
        cidr: String,
        family: &'static str,
        size: u8,
        min: u8,
        max: u8,
    },
}

/// IPAM result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
