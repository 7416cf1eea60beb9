//! Best routes into the kernel.
//!
//! Routes carry Margay's BGP route protocol number ([`RTPROT_MARGAY_BGP`]),
//! which is how we know which routes are ours: nothing else is ever
//! changed or deleted. [`Fib`] lists ours at start (to keep them through a
//! restart, RFC 4724); [`FibWriter`] writes every change from a thread of
//! its own, up to [`BATCH`] route messages serialised into one netlink
//! `send` with a single acknowledgement, in the RIB's order.

use std::net::IpAddr;
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder, RouteNextHopBuilder};

use crate::packet::Prefix;
use crate::{Error, Result};
use margay_task::Owned;

/// Route protocol number of routes Margay's BGP speaker installs.
pub const RTPROT_MARGAY_BGP: u8 = 77;

/// One desired change: next hops to install (ECMP when several), or `None`
/// to remove the route.
pub type FibOp = (Prefix, Option<crate::rib::NextHops>);

/// A handle on the kernel routing table of the current network namespace.
#[derive(Debug, Clone)]
pub struct Fib {
    handle: Handle,
    /// The connection's driver, ended with the last clone of this handle.
    _driver: Arc<Owned>,
}

impl Fib {
    /// Opens a netlink socket in the calling thread's namespace (inside a
    /// tokio runtime).
    pub fn new() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::Netlink(e.to_string()))?;
        Ok(Self {
            handle,
            _driver: Arc::new(Owned::spawn(conn)),
        })
    }

    fn message(prefix: &Prefix, hops: &[IpAddr]) -> Result<RouteMessage> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(prefix.addr(), prefix.len())
            .map_err(|e| Error::Netlink(e.to_string()))?
            .protocol(RouteProtocol::Other(RTPROT_MARGAY_BGP))
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast);
        match hops {
            [] => {}
            [one] => {
                b = b.gateway(*one).map_err(|e| Error::Netlink(e.to_string()))?;
            }
            many => {
                let mut nhs = Vec::with_capacity(many.len());
                for h in many {
                    let nb = if h.is_ipv4() {
                        RouteNextHopBuilder::new_ipv4()
                    } else {
                        RouteNextHopBuilder::new_ipv6()
                    };
                    nhs.push(
                        nb.via(*h)
                            .map_err(|e| Error::Netlink(e.to_string()))?
                            .build(),
                    );
                }
                b = b.multipath(nhs);
            }
        }
        Ok(b.build())
    }

    /// Prefixes of the routes we own in the main table (both families).
    pub async fn list_own(&self) -> Result<Vec<Prefix>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let mut s = self.handle.route().get(msg).execute();
            while let Some(r) = s
                .try_next()
                .await
                .map_err(|e| Error::Netlink(e.to_string()))?
            {
                if r.header.protocol != RouteProtocol::Other(RTPROT_MARGAY_BGP) {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                if let Some(p) =
                    dst.and_then(|a| Prefix::new(a, r.header.destination_prefix_length))
                {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

/// Counters of a [`FibWriter`].
#[derive(Debug, Default)]
pub struct FibStats {
    /// Route writes attempted.
    pub writes: std::sync::atomic::AtomicU64,
    /// Route writes that failed.
    pub failures: std::sync::atomic::AtomicU64,
}

/// Batches queued for the writer thread before submitters wait.
pub const QUEUE: usize = 32;

/// Largest number of route messages written with one `send`.
pub const BATCH: usize = 2048;

/// A netlink socket that writes routes in batches: many route messages are
/// serialised into one buffer and sent with one system call; the kernel's
/// acknowledgements (capped to the request header) are read back in bulk.
struct Batcher {
    sock: netlink_sys::Socket,
    buf: Vec<u8>,
    rbuf: Vec<u8>,
    seq: u32,
}

impl Batcher {
    fn new() -> std::io::Result<Self> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        sock.set_cap_ack(true)?;
        // Room for a whole batch of acknowledgements and then some.
        let _ = sock.set_rx_buf_sz(4 << 20);
        Ok(Self {
            sock,
            buf: Vec::with_capacity(BATCH * 96),
            rbuf: vec![0; 1 << 16],
            seq: 0,
        })
    }

    /// Writes `ops`; returns how many failed (each is logged).
    fn apply(&mut self, ops: &[FibOp]) -> usize {
        use netlink_packet_core::{
            NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
            NetlinkPayload,
        };
        use rtnetlink::packet_route::RouteNetlinkMessage;
        let mut failed = 0;
        for chunk in ops.chunks(BATCH) {
            self.buf.clear();
            let first_seq = self.seq.wrapping_add(1);
            let last = chunk.len() - 1;
            for (i, (prefix, hops)) in chunk.iter().enumerate() {
                // Only the last message asks for an acknowledgement: the
                // kernel handles a batch in order and reports failures
                // anyway, so that ack marks the whole batch as done.
                let ack = if i == last { NLM_F_ACK } else { 0 };
                self.seq = self.seq.wrapping_add(1);
                let (msg, flags) = match hops {
                    Some(h) => match Fib::message(prefix, h) {
                        Ok(m) => (
                            RouteNetlinkMessage::NewRoute(m),
                            NLM_F_REQUEST | ack | NLM_F_CREATE | NLM_F_REPLACE,
                        ),
                        Err(e) => {
                            tracing::warn!(%prefix, "cannot build route: {e}");
                            failed += 1;
                            continue;
                        }
                    },
                    None => match Fib::message(prefix, &[]) {
                        Ok(m) => (RouteNetlinkMessage::DelRoute(m), NLM_F_REQUEST | ack),
                        Err(_) => continue,
                    },
                };
                let mut header = NetlinkHeader::default();
                header.flags = flags;
                header.sequence_number = self.seq;
                let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
                nl.finalize();
                let at = self.buf.len();
                self.buf.resize(at + nl.buffer_len(), 0);
                nl.serialize(&mut self.buf[at..]);
            }
            if self.buf.is_empty() {
                continue;
            }
            if let Err(e) = self.sock.send(&self.buf, 0) {
                tracing::warn!("netlink send failed: {e}");
                failed += chunk.len();
                continue;
            }
            failed += self.read_acks(chunk, first_seq, self.seq);
        }
        failed
    }

    /// Reads errors and the final acknowledgement of a batch whose
    /// messages carry sequence numbers `first_seq..=last_seq`.
    fn read_acks(&mut self, chunk: &[FibOp], first_seq: u32, last_seq: u32) -> usize {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
        use rtnetlink::packet_route::RouteNetlinkMessage;
        let mut failed = 0;
        loop {
            let n = match self.sock.recv(&mut &mut self.rbuf[..], 0) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("netlink receive failed: {e}");
                    return failed + 1;
                }
            };
            let mut off = 0;
            while off + 16 <= n {
                let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.rbuf[off..n])
                else {
                    break;
                };
                let len = m.header.length as usize;
                let seq = m.header.sequence_number;
                if let NetlinkPayload::Error(e) = &m.payload {
                    if let Some(code) = e.code {
                        let op = chunk.get(seq.wrapping_sub(first_seq) as usize);
                        let gone = code.get() == -libc::ESRCH && op.is_some_and(|o| o.1.is_none());
                        if !gone {
                            failed += 1;
                            tracing::warn!(
                                op = ?op,
                                "kernel route update failed: {}",
                                std::io::Error::from_raw_os_error(-code.get())
                            );
                        }
                    }
                    if seq == last_seq {
                        return failed;
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
}

/// A thread that owns the kernel writes, so the RIB never waits on netlink.
///
/// Batches are written in the order they were submitted; the kernel
/// processes the messages of one `send` in order, so the last operation on
/// a prefix always wins.
///
/// The queue is short ([`QUEUE`] batches): when the kernel is the
/// bottleneck, the RIB waits, the peer stops reading and TCP slows the
/// sender, instead of routes piling up in memory.
#[derive(Debug, Clone)]
pub struct FibWriter {
    tx: tokio::sync::mpsc::Sender<Vec<FibOp>>,
    stats: std::sync::Arc<FibStats>,
}

impl FibWriter {
    /// Opens a batching netlink socket in the calling thread's namespace
    /// and starts the writer thread.
    pub fn spawn() -> Result<Self> {
        let mut batcher = Batcher::new().map_err(|e| Error::Netlink(e.to_string()))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<FibOp>>(QUEUE);
        let stats = std::sync::Arc::new(FibStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("margay-fib".into())
            .spawn(move || {
                use std::sync::atomic::Ordering::Relaxed;
                // Batches are written in arrival order, one `send` at a
                // time, so operations on one prefix are never reordered.
                while let Some(batch) = rx.blocking_recv() {
                    st.writes.fetch_add(batch.len() as u64, Relaxed);
                    let failed = batcher.apply(&batch);
                    if failed > 0 {
                        st.failures.fetch_add(failed as u64, Relaxed);
                    }
                }
            })
            .map_err(Error::Io)?;
        Ok(Self { tx, stats })
    }

    /// Queues operations, waiting while the queue is full.
    pub async fn submit(&self, ops: Vec<FibOp>) {
        if !ops.is_empty() {
            let _ = self.tx.send(ops).await;
        }
    }

    /// Writes and failures so far.
    pub fn stats(&self) -> &FibStats {
        &self.stats
    }

    /// The counters, shared (for metrics read elsewhere).
    pub fn stats_handle(&self) -> std::sync::Arc<FibStats> {
        self.stats.clone()
    }
}
