//! The harness's one error type.

use std::path::PathBuf;

/// What can go wrong while building or tearing down a test world.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("command `{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("cannot start `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: not installed at {path} (run scripts/install-deps.sh)")]
    Missing { what: &'static str, path: PathBuf },
    #[error("timed out after {secs:.1}s waiting for {what}{detail}")]
    Timeout {
        what: String,
        secs: f64,
        detail: String,
    },
    #[error("{what} stopped holding after {secs:.1}s{detail}")]
    Broke {
        what: String,
        secs: f64,
        detail: String,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("kubernetes: {0}")]
    Kube(#[from] ::kube::Error),
    #[error("kubeconfig: {0}")]
    KubeConfig(String),
    #[error("namespace operation failed: {0}")]
    Nix(#[from] nix::Error),
    #[error("{0}")]
    Other(String),
}

/// Harness result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
