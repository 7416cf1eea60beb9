//! Polling with a deadline: the only way tests wait for real daemons.
//! [`until`] waits for something to happen; [`holds_for`] checks that
//! something never happens during a window (it fails at the first
//! observation that breaks it, instead of sleeping and looking once).
//! A poll that cannot answer yet says why with a [`Seen`], which the
//! deadline's error reports. A poll whose look cannot be a closure (it
//! needs `&mut` state, or supervises daemons between looks) is a loop
//! around a [`Poller`], which keeps the same deadline and message.

use std::fmt;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What one poll observed instead of its answer: why [`until`] is not
/// done yet, or what broke a [`holds_for`]. Not an error by itself: the
/// wait turns the last one into [`Error::Timeout`] or [`Error::Broke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen(pub String);

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Seen {
    fn from(s: String) -> Self {
        Seen(s)
    }
}

impl From<&str> for Seen {
    fn from(s: &str) -> Self {
        Seen(s.to_owned())
    }
}

impl From<Error> for Seen {
    fn from(e: Error) -> Self {
        Seen(e.to_string())
    }
}

impl From<std::io::Error> for Seen {
    fn from(e: std::io::Error) -> Self {
        Seen(e.to_string())
    }
}

impl From<::kube::Error> for Seen {
    fn from(e: ::kube::Error) -> Self {
        Seen(e.to_string())
    }
}

/// A poll's answer: `Ok(Some(v))` done, `Ok(None)` not yet, `Err` not yet
/// and why.
pub type Poll<T> = std::result::Result<Option<T>, Seen>;

/// A [`holds_for`] look: `Ok(true)` still holds, `Ok(false)` or `Err` broke.
pub type Look = std::result::Result<bool, Seen>;

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout`
/// with a message naming `what` and the last observation.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Poll<T>,
) -> Result<T> {
    let mut p = Poller::new(what, timeout, every);
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => p.saw(e),
        }
        p.next_blocking()?;
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
    Fut: std::future::Future<Output = Poll<T>>,
{
    let mut p = Poller::new(what, timeout, every);
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => p.saw(e),
        }
        p.next().await?;
    }
}

/// The deadline and pace of a poll written as a loop: look, then
/// [`Poller::next`] (or [`Poller::next_blocking`]), which waits `every`
/// or fails as [`until`] does once `timeout` has passed, with what the
/// last look [`Poller::saw`].
#[derive(Debug)]
pub struct Poller {
    what: String,
    timeout: Duration,
    every: Duration,
    start: Instant,
    last: String,
}

impl Poller {
    /// A poll for `what`, from now.
    pub fn new(what: impl Into<String>, timeout: Duration, every: Duration) -> Self {
        Self {
            what: what.into(),
            timeout,
            every,
            start: Instant::now(),
            last: String::new(),
        }
    }

    /// Records what the last look saw (the timeout's error says it).
    pub fn saw(&mut self, seen: impl Into<Seen>) {
        self.last = seen.into().0;
    }

    /// What the last look saw.
    pub fn last(&self) -> &str {
        &self.last
    }

    /// How long the poll has gone on.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Before the next look: `Err` once the deadline has passed, else
    /// waits `every`.
    pub async fn next(&mut self) -> Result<()> {
        self.check()?;
        tokio::time::sleep(self.every).await;
        Ok(())
    }

    /// Blocking twin of [`Poller::next`].
    pub fn next_blocking(&mut self) -> Result<()> {
        self.check()?;
        std::thread::sleep(self.every);
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.start.elapsed() > self.timeout {
            return Err(timed_out(&self.what, self.timeout, &self.last));
        }
        Ok(())
    }
}

/// Polls `ok` every `every` for `window`; fails at the first observation
/// that is not true (`Err` carries what was seen), naming `what`.
pub fn holds_for(
    what: &str,
    window: Duration,
    every: Duration,
    mut ok: impl FnMut() -> Look,
) -> Result<()> {
    let start = Instant::now();
    loop {
        match ok() {
            Ok(true) => {}
            Ok(false) => return Err(broke(what, start, "")),
            Err(e) => return Err(broke(what, start, &e.0)),
        }
        if start.elapsed() >= window {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}

/// Async twin of [`holds_for`].
pub async fn holds_for_async<F, Fut>(
    what: &str,
    window: Duration,
    every: Duration,
    mut ok: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Look>,
{
    let start = Instant::now();
    loop {
        match ok().await {
            Ok(true) => {}
            Ok(false) => return Err(broke(what, start, "")),
            Err(e) => return Err(broke(what, start, &e.0)),
        }
        if start.elapsed() >= window {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

fn broke(what: &str, start: Instant, seen: &str) -> Error {
    Error::Broke {
        what: what.to_owned(),
        secs: start.elapsed().as_secs_f64(),
        detail: if seen.is_empty() {
            String::new()
        } else {
            format!(" (seen: {seen})")
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poller_paces_looks_and_times_out_with_the_last_seen() {
        let mut p = Poller::new(
            "the thing",
            Duration::from_millis(30),
            Duration::from_millis(5),
        );
        let mut looks = 0;
        let e = loop {
            looks += 1;
            p.saw(format!("look {looks}"));
            if let Err(e) = p.next_blocking() {
                break e;
            }
        };
        assert!((2..=10).contains(&looks), "{looks} looks");
        let e = e.to_string();
        assert!(
            e.contains("the thing") && e.contains(&format!("look {looks}")),
            "{e}"
        );
        assert!(p.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn holds_for_fails_at_the_first_break() {
        let ms = Duration::from_millis(1);
        holds_for("always", Duration::from_millis(20), ms, || Ok(true)).unwrap();
        let mut n = 0;
        let e = holds_for("third look", Duration::from_secs(5), ms, || {
            n += 1;
            Ok(n < 3)
        })
        .unwrap_err();
        assert_eq!(n, 3);
        assert!(e.to_string().contains("third look"), "{e}");
        let e = holds_for("seen", Duration::from_secs(5), ms, || Err("x".into())).unwrap_err();
        assert!(e.to_string().contains("seen: x"), "{e}");
    }
}
