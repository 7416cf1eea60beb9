//! Unique, owner-tagged names, and the sweep of what dead owners left behind.
//!
//! Every namespace and temp dir the harness makes is called
//! `mg<owner pid>-<hint><n>`. Parallel tests never collide (one process, one
//! counter; two processes, two PIDs), and when an owner dies without running
//! its destructors (SIGKILL, OOM), the next harness user finds its leftovers
//! by the dead PID and removes them.

use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "mg";
static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A name unique to this process and call: `mg<pid>-<hint><n>`.
pub fn unique(hint: &str) -> String {
    SWEEP.call_once(sweep_stale);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{hint}{n}", std::process::id())
}

/// The owner PID encoded in a harness name, if it is one.
pub fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces (and the processes in them) and temp dirs whose owner
/// process is gone. Runs once per process, on first use of [`unique`].
pub fn sweep_stale() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = owner_of(&name)
                && !alive(pid)
            {
                tracing::warn!(netns = %name, "removing namespace left by dead process {pid}");
                crate::process::destroy_netns(&name);
            }
        }
    }
    for dir in [std::env::temp_dir(), "/dev/shm".into()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_of(&name)
                    && !alive(pid)
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// A temp dir named after this process so a sweep can find it if we die.
pub fn temp_dir(hint: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{}-", unique(hint)))
        .tempdir()
}

/// Like [`temp_dir`] but on tmpfs (`/dev/shm`), for etcd's fsync-heavy data.
pub fn shm_dir(hint: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{}-", unique(hint)))
        .tempdir_in("/dev/shm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_carry_the_owner() {
        let a = unique("n");
        let b = unique("n");
        assert_ne!(a, b);
        assert_eq!(owner_of(&a), Some(std::process::id()));
        assert_eq!(owner_of("eth0"), None);
        assert_eq!(owner_of("mgx-1"), None);
    }
}
