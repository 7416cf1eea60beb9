//! Polling with a deadline: the only way tests wait for real daemons.

use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout`
/// with a message naming `what` and the last observation.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> std::result::Result<Option<T>, String>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if start.elapsed() > timeout {
            return Err(timed_out(what, timeout, &last));
        }
        std::thread::sleep(every);
    }
}

/// Async twin of [`until`] for use inside tokio tests.
pub async fn until_async<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Option<T>, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if start.elapsed() > timeout {
            return Err(timed_out(what, timeout, &last));
        }
        tokio::time::sleep(every).await;
    }
}

fn timed_out(what: &str, timeout: Duration, last: &str) -> Error {
    Error::Timeout {
        what: what.to_owned(),
        secs: timeout.as_secs_f64(),
        detail: if last.is_empty() {
            String::new()
        } else {
            format!(" (last: {last})")
        },
    }
}
