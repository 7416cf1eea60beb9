//! The kernel's side: a netlink socket for nftables kept open, a batch
//! sent in one write and the kernel's answer read (the first refusal,
//! named), or the batch said to be too large for one write.

use std::os::fd::AsRawFd;
use std::time::Duration;

use margay_policy::ruleset::Batch;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, getsockopt, recv,
    sendto, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use crate::encode::encode;
use crate::sys::{HEADER, NLMSG_ERROR, SNDBUF_RESERVED};
use crate::{Error, MAX_BATCH};

/// What [`Socket::apply`] did with a batch.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// In the kernel (or nothing to do).
    Applied,
    /// Not sent: larger than one netlink write ([`MAX_BATCH`], or less
    /// when the socket's send buffer could not be raised); the caller
    /// hands it to `nft` instead.
    TooLarge,
}

/// The kernel's answers in `buf`: acknowledgements counted, the first
/// error returned (errno, the message's sequence number). An error
/// answer echoes the refused message after its code, and may have been
/// cut short by a smaller `buf`: its code and sequence number still
/// count.
pub(crate) fn answers(buf: &[u8], acks: &mut usize) -> Option<(i32, u32)> {
    let mut off = 0;
    while off + HEADER <= buf.len() {
        let word = |i: usize| -> [u8; 4] {
            let mut w = [0; 4];
            w.copy_from_slice(&buf[i..i + 4]);
            w
        };
        let len = u32::from_ne_bytes(word(off)) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = u32::from_ne_bytes(word(off + 8));
        if len < 16 {
            break;
        }
        if kind == NLMSG_ERROR && len >= HEADER {
            let err = i32::from_ne_bytes(word(off + 16));
            if err != 0 {
                return Some((-err, seq));
            }
            *acks += 1;
        }
        off += len.next_multiple_of(4);
    }
    None
}

/// A netlink socket for nftables, kept open: closing one that changed the
/// ruleset costs the kernel tens of milliseconds (an RCU grace period),
/// which a per-batch socket would add to every pod's ADD.
#[derive(Debug)]
pub struct Socket {
    fd: std::os::fd::OwnedFd,
    seq: u32,
    /// The longest write the kernel takes on it (at most [`MAX_BATCH`]).
    max_batch: usize,
}

impl Socket {
    /// A socket in this network namespace, its send buffer raised to hold
    /// [`MAX_BATCH`] when the process may (`CAP_NET_ADMIN`).
    pub fn open() -> crate::Result<Self> {
        let e = |what: &'static str| move |err: nix::Error| netlink_error(what, err);
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(e("socket"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(e("bind"))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::from(libc_timeval(Duration::from_secs(2))),
        )
        .map_err(e("timeout"))?;
        // Past `wmem_max` only with CAP_NET_ADMIN; without it the buffer
        // stays as it is and larger batches go to nft. The kernel doubles
        // what it is given.
        let _ = setsockopt(&fd, sockopt::SndBufForce, &MAX_BATCH);
        let sndbuf = getsockopt(&fd, sockopt::SndBuf).map_err(e("send buffer"))?;
        let max_batch = sndbuf.saturating_sub(SNDBUF_RESERVED).min(MAX_BATCH);
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Self { fd, seq, max_batch })
    }

    /// The longest batch (bytes) one write carries on this socket.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Applies `b` to Margay's table `table`, in one transaction, unless
    /// it is too large for one write; an error (naming the command the
    /// kernel refused, or the one netlink cannot carry) leaves the table
    /// as it was (and after a refusal the socket should be dropped:
    /// answers may be left in it).
    pub fn apply(&mut self, table: &str, b: &Batch) -> crate::Result<Sent> {
        let e = |what: &'static str| move |err: nix::Error| netlink_error(what, err);
        let seq = self.seq;
        let enc = encode(table, b, seq)?;
        let messages = enc.ops.len();
        if messages == 0 {
            return Ok(Sent::Applied);
        }
        if enc.bytes.len() > self.max_batch {
            return Ok(Sent::TooLarge);
        }
        // At most `max_batch` bytes: fewer messages than a u32 counts.
        self.seq = seq.wrapping_add(messages as u32 + 2);
        // Nothing from an earlier batch may be read as this one's answer.
        let mut buf = vec![0u8; 64 * 1024];
        while recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
        sendto(
            self.fd.as_raw_fd(),
            &enc.bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(e("send"))?;
        let mut acks = 0;
        while acks < 1 {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                // Errors for many refused messages overran the receive
                // buffer: the first is still queued, read on.
                Err(nix::errno::Errno::ENOBUFS) => continue,
                Err(err) => return Err(netlink_error("waiting for the kernel's answer", err)),
            };
            if let Some((errno, at)) = answers(&buf[..n], &mut acks) {
                // The batch's own header: the kernel could not take it.
                let what = match at.wrapping_sub(seq).checked_sub(1) {
                    None => "the batch".to_string(),
                    Some(m) => enc
                        .describe(b, m as usize)
                        .unwrap_or_else(|| format!("message {}", m + 1)),
                };
                let which = at.wrapping_sub(seq);
                return Err(Error::Refused {
                    what,
                    which,
                    messages,
                    errno: nix::errno::Errno::from_raw(errno),
                });
            }
        }
        Ok(Sent::Applied)
    }
}

fn netlink_error(what: &'static str, source: nix::Error) -> Error {
    Error::Netlink { what, source }
}

/// Applies `b` to Margay's table `table` in this network namespace, in one
/// transaction, through a socket of its own; an error leaves the table as
/// it was.
pub fn apply(table: &str, b: &Batch) -> crate::Result<Sent> {
    Socket::open()?.apply(table, b)
}

fn libc_timeval(d: Duration) -> nix::libc::timeval {
    nix::libc::timeval {
        tv_sec: nix::libc::time_t::try_from(d.as_secs()).unwrap_or(1),
        tv_usec: nix::libc::suseconds_t::from(d.subsec_micros()),
    }
}
