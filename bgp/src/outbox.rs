//! What a connection sends: the messages queued for its socket and the
//! writer task that sends them, many per system call.
//!
//! A queued [`Wire`] is a run of messages: byte ranges of one shared
//! buffer. The peer task's own messages (OPEN, KEEPALIVE, NOTIFICATION)
//! are one range each; an export's UPDATEs are encoded once for a whole
//! update group into one buffer ([`crate::group::Encoded`]) and each
//! member is queued one `Wire` with its picks of it. So a burst costs each
//! member one queue entry per export, not one per UPDATE, and a reflector
//! with N clients holds each UPDATE once however many members still have
//! it queued.
//!
//! The writer ([`writer`]) gathers what is queued into one vectored write
//! (up to [`MAX_SLICES`] ranges), in queue order: what the RIB task queued
//! first leaves first, so a withdrawal queued after an announcement of the
//! same prefix reaches the peer after it.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Encoded messages queued for a peer's socket: byte ranges of one shared
/// buffer, sent in order. 32 bytes, so a queue's blocks stay small.
#[derive(Debug, Clone)]
pub(crate) struct Wire {
    bytes: Arc<[u8]>,
    /// `(start, end)` into `bytes`, none empty, adjacent ones merged;
    /// `None`: all of it.
    ranges: Option<Box<[(usize, usize)]>>,
}

impl From<Vec<u8>> for Wire {
    /// One message (or several back to back) of its own.
    fn from(v: Vec<u8>) -> Self {
        Self {
            bytes: v.into(),
            ranges: None,
        }
    }
}

impl Wire {
    /// The `ranges` of `bytes`, in this order (adjacent ones merged, empty
    /// ones dropped).
    pub(crate) fn picks(
        bytes: Arc<[u8]>,
        ranges: impl IntoIterator<Item = (usize, usize)>,
    ) -> Self {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (s, e) in ranges {
            assert!(s <= e && e <= bytes.len(), "a range of the buffer");
            if s == e {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        let ranges = match out[..] {
            [(0, e)] if e == bytes.len() => None,
            _ => Some(out.into_boxed_slice()),
        };
        Self { bytes, ranges }
    }

    /// How many ranges.
    fn count(&self) -> usize {
        match &self.ranges {
            Some(r) => r.len(),
            None => usize::from(!self.bytes.is_empty()),
        }
    }

    fn range(&self, i: usize) -> (usize, usize) {
        match &self.ranges {
            Some(r) => r[i],
            None => (0, self.bytes.len()),
        }
    }

    /// Bytes to send.
    pub(crate) fn len(&self) -> usize {
        self.slices().map(<[u8]>::len).sum()
    }

    /// Nothing to send.
    pub(crate) fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The bytes to send, range by range.
    pub(crate) fn slices(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.count()).map(|i| {
            let (s, e) = self.range(i);
            &self.bytes[s..e]
        })
    }
}

/// Most ranges given to one vectored write.
pub(crate) const MAX_SLICES: usize = 128;

/// What a writer has to send: the queued [`Wire`]s, the first one perhaps
/// partly sent. Pure, so its order is tested without a socket.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Wire>,
    /// Into the front Wire: which range, and how far into it.
    range: usize,
    offset: usize,
}

impl Outbox {
    /// Queues `w` behind what is queued.
    pub(crate) fn push(&mut self, w: Wire) {
        if !w.is_empty() {
            self.queue.push_back(w);
        }
    }

    /// Nothing left to send.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many Wires are queued.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The next bytes to send, in order: at most `max` slices.
    pub(crate) fn slices(&self, max: usize) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(max.min(MAX_SLICES));
        for (i, w) in self.queue.iter().enumerate() {
            for (j, s) in w.slices().enumerate() {
                if v.len() == max {
                    return v;
                }
                if i == 0 && j < self.range {
                    continue;
                }
                let s = if i == 0 && j == self.range {
                    &s[self.offset..]
                } else {
                    s
                };
                v.push(IoSlice::new(s));
            }
        }
        v
    }

    /// `n` more bytes were sent (of what [`Outbox::slices`] gave).
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.queue.front().expect("sent bytes were queued");
            let (s, e) = front.range(self.range);
            let left = e - s - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.range += 1;
            self.offset = 0;
            if self.range == front.count() {
                self.queue.pop_front();
                self.range = 0;
            }
        }
    }
}

/// Why a connection's writer stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteEnd {
    /// The socket failed.
    Failed(String),
    /// No write completed for this long: the peer reads nothing.
    Stalled(Duration),
}

/// How long a closed connection's writer may still try to deliver what
/// was queued before it (the NOTIFICATION, usually).
pub(crate) const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Writes what the peer task queues, in order, as many queued messages
/// per system call as there are (up to [`MAX_SLICES`] ranges), so the
/// peer task never waits on the socket (its timers and reads go on while
/// a peer is slow to read). A write that makes no progress for the stall
/// time ends the writer with [`WriteEnd::Stalled`]; once `closing` fires,
/// only what is queued already is sent, for at most [`CLOSE_FLUSH`].
/// `queued` counts the bytes queued and not yet written.
pub(crate) async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Wire>,
    queued: Arc<AtomicUsize>,
    stall_ms: Arc<AtomicU64>,
    ended: oneshot::Sender<WriteEnd>,
    mut closing: oneshot::Receiver<()>,
) {
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut out = Outbox::default();
    loop {
        if deadline.is_none()
            && !matches!(closing.try_recv(), Err(oneshot::error::TryRecvError::Empty))
        {
            deadline = Some(tokio::time::Instant::now() + CLOSE_FLUSH);
        }
        if out.is_empty() {
            let next = match deadline {
                None => tokio::select! {
                    b = rx.recv() => b,
                    _ = &mut closing => {
                        deadline = Some(tokio::time::Instant::now() + CLOSE_FLUSH);
                        continue;
                    }
                },
                // Closed: only what is already queued, then the end.
                Some(_) => rx.try_recv().ok(),
            };
            let Some(next) = next else { return };
            out.push(next);
        }
        // Whatever else is queued joins this write.
        while out.len() < MAX_SLICES {
            match rx.try_recv() {
                Ok(b) => out.push(b),
                Err(_) => break,
            }
        }
        if out.is_empty() {
            continue;
        }
        let stall = Duration::from_millis(stall_ms.load(Ordering::Relaxed));
        let limit = match deadline {
            Some(d) => d
                .saturating_duration_since(tokio::time::Instant::now())
                .min(stall),
            None => stall,
        };
        let slices = out.slices(MAX_SLICES);
        let r = tokio::time::timeout(limit, w.write_vectored(&slices)).await;
        drop(slices);
        match r {
            Ok(Ok(0)) => {
                let _ = ended.send(WriteEnd::Failed("the socket took no bytes".into()));
                return;
            }
            Ok(Ok(n)) => {
                queued.fetch_sub(n, Ordering::AcqRel);
                out.advance(n);
            }
            Ok(Err(e)) => {
                let _ = ended.send(WriteEnd::Failed(e.to_string()));
                return;
            }
            Err(_) => {
                let _ = ended.send(WriteEnd::Stalled(limit));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Attrs, Ctx, Message, Prefix, UpdateBuilder, frame_len};
    use tokio::io::AsyncReadExt;

    fn p(i: u32) -> Prefix {
        Prefix::new(std::net::Ipv4Addr::from(0x6440_0000 + i).into(), 32).unwrap()
    }

    const CTX: Ctx = Ctx {
        four_octet_as: true,
        ibgp: true,
    };

    fn announce(ps: &[Prefix]) -> Vec<u8> {
        let a = Attrs {
            next_hop: Some("10.0.0.1".parse().unwrap()),
            ..Attrs::default()
        };
        UpdateBuilder::announce(&a, ps, None, &CTX)
            .unwrap()
            .concat()
    }

    fn withdraw(ps: &[Prefix]) -> Vec<u8> {
        UpdateBuilder::withdraw(ps, &CTX).concat()
    }

    /// Splits a byte stream into its messages, decoded.
    fn messages(mut b: &[u8]) -> Vec<Message> {
        let mut v = Vec::new();
        while let Some(n) = frame_len(b).unwrap() {
            v.push(Message::decode(&b[..n], &CTX).unwrap());
            b = &b[n..];
        }
        assert!(b.is_empty(), "whole messages only");
        v
    }

    /// The outbox gives back exactly what was queued, in order, however
    /// the writes split it.
    #[test]
    fn the_outbox_sends_every_byte_in_order_whatever_the_writes_take() {
        let shared: Arc<[u8]> = (0..=255u8).collect::<Vec<u8>>().into();
        let wires = vec![
            Wire::from(vec![1, 2, 3]),
            Wire::picks(shared.clone(), [(0, 10), (10, 20), (50, 60), (60, 60)]),
            Wire::picks(shared.clone(), [(200, 256)]),
            Wire::picks(shared.clone(), []),
            Wire::from(vec![9]),
        ];
        let want: Vec<u8> = wires
            .iter()
            .flat_map(|w| w.slices().flatten().copied())
            .collect();
        assert_eq!(wires[1].slices().count(), 2, "adjacent ranges merged");
        assert_eq!(std::mem::size_of::<Wire>(), 32);
        for step in [1, 3, 7, 64, 1000] {
            let mut out = Outbox::default();
            for w in &wires {
                out.push(w.clone());
            }
            let mut got = Vec::new();
            while !out.is_empty() {
                let slices = out.slices(2);
                let all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
                let n = all.len().min(step);
                got.extend_from_slice(&all[..n]);
                drop(slices);
                out.advance(n);
            }
            assert_eq!(got, want, "step {step}");
        }
    }

    /// A burst through a slow reader: announcements and withdrawals of the
    /// same prefixes, many UPDATEs per queued Wire, all delivered, each in
    /// the order queued (a withdrawal never overtakes the announcement
    /// before it).
    #[tokio::test]
    async fn a_burst_reaches_a_slow_reader_whole_and_in_order() {
        // A pipe that holds 64 bytes: every write is partial.
        let (w, mut r) = tokio::io::duplex(64);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stall = Arc::new(AtomicU64::new(3_600_000));
        let (etx, mut ended) = oneshot::channel();
        let (_closing, crx) = oneshot::channel();
        let write = writer(w, rx, queued.clone(), stall, etx, crx);
        let mut want: Vec<Message> = Vec::new();
        for round in 0..50u32 {
            // One export: a shared buffer of several UPDATEs, this member
            // picking all but one of them.
            let ps: Vec<Prefix> = (0..4).map(|i| p(round % 5 * 4 + i)).collect();
            let parts = [
                announce(&ps[..2]),
                withdraw(&ps[2..3]),
                announce(&ps[3..]),
                announce(&[p(1000 + round)]),
            ];
            let mut bytes = Vec::new();
            let mut spans = Vec::new();
            for m in &parts {
                spans.push((bytes.len(), bytes.len() + m.len()));
                bytes.extend_from_slice(m);
            }
            let skip = (round % 4) as usize;
            let picks: Vec<(usize, usize)> =
                (0..4).filter(|&i| i != skip).map(|i| spans[i]).collect();
            for &(s, e) in &picks {
                want.extend(messages(&bytes[s..e]));
            }
            let wire = Wire::picks(bytes.into(), picks);
            queued.fetch_add(wire.len(), Ordering::AcqRel);
            tx.send(wire).unwrap();
            // Then the same prefixes withdrawn, one Wire of its own.
            let wd = withdraw(&ps);
            want.extend(messages(&wd));
            queued.fetch_add(wd.len(), Ordering::AcqRel);
            tx.send(wd.into()).unwrap();
        }
        drop(tx);
        let read = async {
            let mut got = Vec::new();
            let mut chunk = [0u8; 7];
            loop {
                // Slow: a few bytes at a time, letting the writer run between.
                let n = r.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
        };
        let ((), got) = tokio::join!(write, read);
        assert!(ended.try_recv().is_err(), "the writer ended cleanly");
        assert_eq!(
            queued.load(Ordering::Acquire),
            0,
            "every queued byte written"
        );
        assert_eq!(messages(&got), want);
    }
}
