//! Which paths a pod may be wired into: a network namespace (nsfs), and
//! not the node's own. Checked before anything is made, on the file that
//! is then used (no second open to race with).

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use super::{Error, Result};

/// Opens `path` as a pod's network namespace: it must be a network
/// namespace (a bind mount of one, or `/proc/PID/ns/net`), and not the one
/// the agent runs in (the node's) nor that of PID 1.
pub(super) fn pod_netns(path: &std::path::Path) -> Result<std::fs::File> {
    let shown = || path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| Error::Netns {
        path: shown(),
        source,
    })?;
    let not = |why: String| Error::NotPodNetns { path: shown(), why };
    // A namespace file lives on nsfs (a bind mount of one too); anything
    // else (a regular file, a directory) is refused before anything is made.
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| not(format!("statfs: {e}")))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(not("not a namespace file".into()));
    }
    // Opened through /proc/PID/ns/*, it reads back as "KIND:[INODE]": a
    // namespace of another kind is refused too (one bind-mounted elsewhere
    // is refused by setns).
    let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    if let Ok(target) = std::fs::read_link(&fd)
        && let Some(kind) = target
            .to_string_lossy()
            .split_once(":[")
            .map(|(k, _)| k.to_string())
        && kind != "net"
    {
        return Err(not(format!("a {kind} namespace, not a network namespace")));
    }
    let meta = file.metadata().map_err(|e| not(format!("stat: {e}")))?;
    for own in ["/proc/self/ns/net", "/proc/1/ns/net"] {
        if let Ok(m) = std::fs::metadata(own)
            && (m.dev(), m.ino()) == (meta.dev(), meta.ino())
        {
            return Err(not(format!(
                "it is the node's own network namespace ({own})"
            )));
        }
    }
    Ok(file)
}
