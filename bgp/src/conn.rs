//! A peer's connection, as its peer task holds it ([`Conn`]): the read
//! half framed by the peer task itself ([`Reader`], no task and no queue
//! for reading) and a writer task ([`crate::outbox::writer`]) fed through
//! a queue bounded in bytes ([`OUT_LIMIT`]). The writer is spawned into the
//! peer task's `JoinSet`, so it may flush a closed connection's last
//! message yet never outlives the peer task.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::outbox::{Wire, WriteEnd, writer};
use crate::packet::{DecodeError, frame_len};

/// Read buffer per connection.
const READ_BUF: usize = 16 * 1024;

/// Most bytes queued for one connection's writer: beyond it the session
/// ends with Cease/out of resources (RFC 4486) instead of growing without
/// bound. Far above any table Margay exports at once.
pub(crate) const OUT_LIMIT: usize = 32 << 20;

/// Longest wait for one write when no hold time bounds it (hold time 0).
const STALL_WITHOUT_HOLD: Duration = Duration::from_secs(240);

pub(crate) struct Conn {
    /// To the writer task; every queued byte is counted in `queued`.
    out: mpsc::UnboundedSender<Wire>,
    queued: Arc<AtomicUsize>,
    /// The longest one write may take (the hold time, once negotiated).
    stall_ms: Arc<AtomicU64>,
    /// The writer's end, when it stopped on its own.
    pub(crate) ended: Option<oneshot::Receiver<WriteEnd>>,
    /// Told on drop: flush for at most [`crate::outbox::CLOSE_FLUSH`] more.
    closing: Option<oneshot::Sender<()>>,
    reader: Reader,
    pub(crate) local: IpAddr,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The writer goes on alone: what was queued before the close (a
        // NOTIFICATION) still leaves, within CLOSE_FLUSH.
        if let Some(c) = self.closing.take() {
            let _ = c.send(());
        }
    }
}

/// The connection's outgoing queue is over [`OUT_LIMIT`].
#[derive(Debug)]
pub(crate) struct Overflow;

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {} MiB queued for the peer", OUT_LIMIT >> 20)
    }
}

impl Conn {
    /// Queues `bytes` for the writer; never waits.
    pub(crate) fn send(&self, bytes: Wire) -> Result<(), Overflow> {
        let n = bytes.len();
        if n == 0 {
            return Ok(());
        }
        if self.queued.fetch_add(n, Ordering::AcqRel) + n > OUT_LIMIT {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(Overflow);
        }
        if self.out.send(bytes).is_err() {
            // The writer ended; its reason arrives through `ended`.
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Bounds each write by `hold` (0: [`STALL_WITHOUT_HOLD`]).
    pub(crate) fn set_stall(&self, hold: u16) {
        let d = if hold == 0 {
            STALL_WITHOUT_HOLD
        } else {
            Duration::from_secs(hold.into())
        };
        self.stall_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

/// A connection's incoming bytes, framed (RFC 4271 §4.1) by the peer
/// task itself (no task and no queue per connection for reading). The
/// buffer exists only while bytes wait in it: an idle session holds none.
pub(crate) struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
    /// Where the bytes not yet framed start in `buf`.
    start: usize,
    /// The connection ended (closed, failed or sent garbage).
    closed: bool,
}

impl Reader {
    fn new(half: OwnedReadHalf) -> Self {
        Self {
            half,
            buf: Vec::new(),
            start: 0,
            closed: false,
        }
    }

    /// The next message. Cancel safe: what was read stays in the buffer.
    async fn next(&mut self) -> Frame {
        loop {
            if self.closed {
                return Frame::Closed;
            }
            let waiting = &self.buf[self.start..];
            match frame_len(waiting) {
                Ok(Some(n)) if waiting.len() >= n => {
                    let f = waiting[..n].to_vec();
                    self.start += n;
                    if self.start == self.buf.len() {
                        self.buf = Vec::new();
                        self.start = 0;
                    }
                    return Frame::Bytes(f);
                }
                Ok(_) => {}
                Err(e) => {
                    self.closed = true;
                    return Frame::Bad(e);
                }
            }
            if self.half.readable().await.is_err() {
                self.closed = true;
                continue;
            }
            self.buf.drain(..self.start);
            self.start = 0;
            // 16 KiB holds four maximum-size messages; allocated only
            // while there is something to read.
            self.buf
                .reserve(READ_BUF - self.buf.len().min(READ_BUF / 2));
            match self.half.try_read_buf(&mut self.buf) {
                Ok(0) => self.closed = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => self.closed = true,
            }
            if self.buf.is_empty() {
                self.buf = Vec::new();
            }
        }
    }
}

/// Splits a connection: the peer task reads it ([`Reader`]), a writer
/// task, spawned into `writers`, sends what is queued.
pub(crate) fn open_conn(stream: TcpStream, hold: u16, writers: &mut JoinSet<()>) -> Option<Conn> {
    let local = crate::net::canonical(stream.local_addr().ok()?.ip());
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let (out, orx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let stall_ms = Arc::new(AtomicU64::new(0));
    let (etx, ended) = oneshot::channel();
    let (closing, crx) = oneshot::channel();
    writers.spawn(writer(w, orx, queued.clone(), stall_ms.clone(), etx, crx));
    let c = Conn {
        out,
        queued,
        stall_ms,
        ended: Some(ended),
        closing: Some(closing),
        reader: Reader::new(r),
        local,
    };
    c.set_stall(hold);
    Some(c)
}

pub(crate) enum Frame {
    Bytes(Vec<u8>),
    Bad(DecodeError),
    Closed,
}

/// A connection's reader and its writer's end, borrowed apart.
pub(crate) fn halves(
    c: Option<&mut Conn>,
) -> (
    Option<&mut Reader>,
    Option<&mut oneshot::Receiver<WriteEnd>>,
) {
    match c {
        Some(c) => (Some(&mut c.reader), c.ended.as_mut()),
        None => (None, None),
    }
}

pub(crate) async fn recv_frame(reader: Option<&mut Reader>) -> Frame {
    match reader {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn write_ended(ended: Option<&mut oneshot::Receiver<WriteEnd>>) -> WriteEnd {
    match ended {
        Some(e) => match e.await {
            Ok(end) => end,
            // The writer was dropped without a word: it ran to the end.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
