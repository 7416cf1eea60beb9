//! The speaker crate's one error type.

/// Errors of the BGP speaker outside the wire codec (which has
/// [`crate::packet::DecodeError`], mapped onto NOTIFICATIONs).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message says where and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Socket or file I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A netlink request failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// The speaker has shut down.
    #[error("speaker stopped")]
    Stopped,
}

/// Crate result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
