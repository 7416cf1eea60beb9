//! Crash points for tests of "a kill at any point loses nothing": with
//! `MARGAY_CRASH_AT=<point>[:<n>]` in its environment, the process kills
//! itself with SIGKILL (nothing unwound, nothing flushed: what a kill -9
//! or an OOM kill does) the n-th time (default the first) any task
//! reaches [`point`] `<point>`. Without the variable a point costs one
//! atomic load. The points are named where they are (`add.taken`,
//! `write.rename`, ...): ARCHITECTURE.md lists them.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable naming the point.
pub const ENV: &str = "MARGAY_CRASH_AT";

struct Armed {
    point: String,
    nth: u32,
    seen: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (point, nth) = match v.split_once(':') {
                Some((p, n)) => (p, n.parse().ok()?),
                None => (v.as_str(), 1),
            };
            Some(Armed {
                point: point.to_string(),
                nth,
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Crash point `name`: kills the process here when armed for it.
pub fn point(name: &str) {
    let Some(a) = armed() else { return };
    if a.point != name {
        return;
    }
    if a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
        eprintln!("{ENV}: killed at {name} (reached {} times)", a.nth);
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
