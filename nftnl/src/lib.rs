//! NetworkPolicy changes handed to the kernel over netlink
//! (`NETLINK_NETFILTER`), without `nft`: a [`Batch`] (sets, chains,
//! rules, set and map elements) as one batch, one transaction, all of it
//! or nothing. `nft -f` reads back the definition of every set and chain
//! of the table before it runs a script, and costs a process; a policy
//! created or a pod added is a few messages here (BENCHMARKS.md). The
//! whole table (start-up, resync, recovery) still goes through
//! the agent's `nft -f`, as does a batch too large for one write
//! ([`MAX_BATCH`]).
//!
//! [`encode`] is pure (a batch of messages from a [`Batch`]; rule lines
//! become expressions in `rule.rs`); [`Socket::apply`] sends it and reads
//! the kernel's answer, or says it is too large for one write.
//!
//! Netlink's limits, and what happens at them:
//! - An attribute's length is 16 bits (at most 65,535 bytes, header
//!   included). An element change is as many messages as its elements
//!   need, each list one attribute within that limit, all in the same
//!   batch (one transaction, as `nft` splits them); a message says which
//!   command, and which of its elements, it carries. Anything else that
//!   does not fit (a rule whose expressions pass 64 KiB) is refused
//!   before anything is sent ([`Error::Unencodable`]): a length is never
//!   truncated (one was, and the kernel read the first 4,095 of 5,000
//!   addresses of a set and the rest as padding, without an error).
//! - The kernel refuses a write longer than the socket's send buffer
//!   (less 32 bytes). The socket raises it to [`MAX_BATCH`]
//!   (`SO_SNDBUFFORCE`, as `nft` does for large batches; it needs
//!   `CAP_NET_ADMIN`, which the agent has), so a batch of a few MiB is
//!   still one write, one transaction.
//!
//! One job per file: `attrs.rs` (netlink attributes, never a truncated
//! length), `encode.rs` (a [`Batch`] as netlink messages), `rule.rs` (a
//! rule line as expressions), `socket.rs` (the kept socket, the kernel's
//! answers), `sys.rs` (the kernel's numbers).

mod attrs;
mod encode;
mod rule;
mod socket;
mod sys;
#[cfg(test)]
mod tests;

pub use encode::{Encoded, encode};
pub use socket::{Sent, Socket, apply};

/// The longest netlink attribute, header included (its length field is
/// 16 bits).
pub const MAX_ATTR: usize = u16::MAX as usize;

/// Batches larger than this go through `nft` (one netlink write must hold
/// the whole batch; the socket's send buffer is raised to hold this much).
pub const MAX_BATCH: usize = 4 * 1024 * 1024;

/// What encoding or sending a batch over netlink failed on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened, written or read.
    #[error("nftables: netlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: nix::Error,
    },
    /// The kernel refused a message of the batch (nothing of it applied).
    #[error(
        "nftables: netlink: the kernel refused {what} (message {which} of {messages} in the batch): {errno}"
    )]
    Refused {
        /// The refused message, briefly (its command's text).
        what: String,
        /// Its place in the batch (the batch's begin is 0).
        which: u32,
        /// How many messages the batch had.
        messages: usize,
        /// The kernel's answer.
        errno: nix::errno::Errno,
    },
    /// A policy command netlink cannot carry: an attribute of it would be
    /// longer than a netlink attribute's 16-bit length allows (e.g. a rule
    /// whose expressions pass 64 KiB). Nothing of its batch was sent.
    #[error(
        "netlink cannot carry command {command} of the batch, {op}: an attribute of {len} bytes (at most {max})",
        max = MAX_ATTR
    )]
    Unencodable {
        /// Its place in the batch (from 1).
        command: usize,
        /// Its text, cut short.
        op: String,
        /// The length the attribute would have had.
        len: usize,
    },
}

/// What this crate's fallible functions return.
pub type Result<T> = std::result::Result<T, Error>;
