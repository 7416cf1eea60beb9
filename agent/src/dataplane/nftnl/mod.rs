//! NetworkPolicy changes handed to the kernel over netlink
//! (`NETLINK_NETFILTER`), without `nft`: a [`Batch`] (sets, chains,
//! rules, set and map elements) as one batch, one transaction, all of it
//! or nothing. `nft -f` reads back the definition of every set and chain
//! of the table before it runs a script, and costs a process; a policy
//! created or a pod added is a few messages here (BENCHMARKS.md). The
//! whole table (start-up, resync, recovery) still goes through
//! [`super::nft`], as does a batch too large for one write.
//!
//! [`encode`] is pure (a batch of messages from a [`Batch`]; rule lines
//! become expressions in [`rule`]); [`Socket::apply`] sends it and reads
//! the kernel's answer, or says it is too large for one write.

mod rule;

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use margay_policy::nft::{Batch, Element, ElementOp, Op, SetKind};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use super::Error;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
/// nft's note on a set of how its keys are laid out (libnftnl's
/// `NFTNL_UDATA_SET_KEYBYTEORDER`, nft's `BYTEORDER_HOST_ENDIAN`): without
/// it, nft reads a name's bytes as a big-endian number and prints `""`.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_HOST_ENDIAN: u32 = 1;
/// nft's type numbers (its `datatypes.h`), and how it names a
/// concatenation of them: each type shifted in by 6 bits.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const TYPE_BITS: u32 = 6;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
/// `type ifname` keys: the name, zero-padded to IFNAMSIZ.
const IFNAMSIZ: usize = 16;
const NLA_F_NESTED: u16 = 0x8000;

/// Batches larger than this go through `nft` (one netlink write must hold
/// the whole batch).
pub const MAX_BATCH: usize = 128 * 1024;

/// Appends a netlink attribute (padded to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let mut b = Vec::new();
    inner(&mut b);
    attr(buf, kind | NLA_F_NESTED, &b);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// An element's key as the kernel stores it: the address; for
/// `address . protocol . port` each field padded to 4 bytes, the port in
/// network order; an interface name zero-padded to 16 bytes.
fn key(e: &Element) -> Vec<u8> {
    match e {
        Element::Iface(name) => {
            let mut k = name.as_bytes().to_vec();
            k.resize(IFNAMSIZ, 0);
            k
        }
        Element::IfaceAddr { ifname, addr } => {
            let mut k = ifname.as_bytes().to_vec();
            k.resize(IFNAMSIZ, 0);
            k.extend_from_slice(&addr_bytes(addr));
            k
        }
        Element::Addr(a) => addr_bytes(a),
        Element::Port { addr, proto, port } => {
            let mut k = addr_bytes(addr);
            k.extend_from_slice(&[rule::proto_number(*proto), 0, 0, 0]);
            k.extend_from_slice(&port.to_be_bytes());
            k.extend_from_slice(&[0, 0]);
            k
        }
    }
}

/// One netlink message: header, nfgenmsg, attributes.
fn message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, res_id: u16, body: &[u8]) {
    let len = 16 + 4 + body.len();
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    let family = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
        0
    } else {
        NFPROTO_INET
    };
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(body);
}

/// A verdict (`NFTA_DATA_VERDICT`'s contents).
fn verdict(b: &mut Vec<u8>, code: i32, chain: Option<&str>) {
    nested(b, NFTA_DATA_VERDICT, |b| {
        attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            attr(b, NFTA_VERDICT_CHAIN, &cstr(c));
        }
    });
}

/// A set's key: nft's type number and its length in the kernel (each
/// field of a concatenation padded to 4 bytes).
fn set_key(kind: SetKind) -> (u32, u32) {
    let concat =
        |addr: u32| (((addr << TYPE_BITS) | TYPE_INET_PROTOCOL) << TYPE_BITS) | TYPE_INET_SERVICE;
    match kind {
        SetKind::Addr4 => (TYPE_IPADDR, 4),
        SetKind::Addr6 => (TYPE_IP6ADDR, 16),
        SetKind::Named4 => (concat(TYPE_IPADDR), 12),
        SetKind::Named6 => (concat(TYPE_IP6ADDR), 24),
        SetKind::Iface => (TYPE_IFNAME, IFNAMSIZ as u32),
        SetKind::IfaceAddr4 => (
            (TYPE_IFNAME << TYPE_BITS) | TYPE_IPADDR,
            IFNAMSIZ as u32 + 4,
        ),
        SetKind::IfaceAddr6 => (
            (TYPE_IFNAME << TYPE_BITS) | TYPE_IP6ADDR,
            IFNAMSIZ as u32 + 16,
        ),
    }
}

/// One command's message, before its header.
struct Message {
    /// `NFT_MSG_*`.
    kind: u16,
    /// Flags besides `NLM_F_REQUEST` and `NLM_F_ACK`.
    flags: u16,
    /// Its attributes.
    body: Vec<u8>,
}

/// One command's message; `None` for an element change with no elements.
fn op_message(table: &str, op: &Op, set_id: u32) -> Option<Message> {
    let mut body = Vec::new();
    let t = cstr(table);
    let (kind, flags) = match op {
        Op::AddSet { name, kind } => {
            let (key_type, key_len) = set_key(*kind);
            attr(&mut body, NFTA_SET_TABLE, &t);
            attr(&mut body, NFTA_SET_NAME, &cstr(name));
            attr(&mut body, NFTA_SET_KEY_TYPE, &key_type.to_be_bytes());
            attr(&mut body, NFTA_SET_KEY_LEN, &key_len.to_be_bytes());
            attr(&mut body, NFTA_SET_ID, &set_id.to_be_bytes());
            if *kind == SetKind::Iface {
                let mut ud = vec![UDATA_SET_KEYBYTEORDER, 4];
                ud.extend_from_slice(&BYTEORDER_HOST_ENDIAN.to_ne_bytes());
                attr(&mut body, NFTA_SET_USERDATA, &ud);
            }
            (NFT_MSG_NEWSET, NLM_F_CREATE)
        }
        Op::AddChain(name) => {
            attr(&mut body, NFTA_CHAIN_TABLE, &t);
            attr(&mut body, NFTA_CHAIN_NAME, &cstr(name));
            (NFT_MSG_NEWCHAIN, NLM_F_CREATE)
        }
        Op::FlushChain(name) => {
            attr(&mut body, NFTA_RULE_TABLE, &t);
            attr(&mut body, NFTA_RULE_CHAIN, &cstr(name));
            (NFT_MSG_DELRULE, 0)
        }
        Op::AddRule { chain, line } => {
            attr(&mut body, NFTA_RULE_TABLE, &t);
            attr(&mut body, NFTA_RULE_CHAIN, &cstr(chain));
            attr(
                &mut body,
                NFTA_RULE_EXPRESSIONS | NLA_F_NESTED,
                &rule::expressions(line),
            );
            (NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND)
        }
        Op::DeleteChain(name) => {
            attr(&mut body, NFTA_CHAIN_TABLE, &t);
            attr(&mut body, NFTA_CHAIN_NAME, &cstr(name));
            (NFT_MSG_DELCHAIN, 0)
        }
        Op::DeleteSet(name) => {
            attr(&mut body, NFTA_SET_TABLE, &t);
            attr(&mut body, NFTA_SET_NAME, &cstr(name));
            (NFT_MSG_DELSET, 0)
        }
        Op::Elements { elements, .. } if elements.is_empty() => return None,
        Op::Elements { op, set, elements } => {
            attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &t);
            attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
            nested(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                for e in elements {
                    nested(b, NFTA_LIST_ELEM, |b| {
                        nested(b, NFTA_SET_ELEM_KEY, |b| {
                            attr(b, NFTA_DATA_VALUE, &key(e));
                        });
                    });
                }
            });
            match op {
                ElementOp::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE),
                ElementOp::Delete => (NFT_MSG_DELSETELEM, 0),
            }
        }
    };
    Some(Message { kind, flags, body })
}

/// An encoded batch.
#[derive(Debug)]
pub struct Encoded {
    /// The bytes to send.
    pub bytes: Vec<u8>,
    /// Which command of the batch each message is (message `i` has
    /// sequence number `seq + 1 + i`).
    pub ops: Vec<usize>,
}

/// The batch for `b` on table `table` (`inet` family, name without the
/// family), its messages numbered from `seq`. Only the last asks for an
/// acknowledgement: the kernel processes the whole batch within the
/// send, and answers a refused message with its error ahead of that
/// acknowledgement (one answer to read, not one per message).
pub fn encode(table: &str, b: &Batch, seq: u32) -> Encoded {
    let messages: Vec<(usize, Message)> = b
        .ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| Some((i, op_message(table, op, i as u32)?)))
        .collect();
    let mut buf = Vec::new();
    message(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let total = messages.len();
    let mut ops = Vec::with_capacity(total);
    for (n, (i, m)) in messages.into_iter().enumerate() {
        let ack = if n + 1 == total { NLM_F_ACK } else { 0 };
        message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | m.kind,
            NLM_F_REQUEST | ack | m.flags,
            seq.wrapping_add(n as u32 + 1),
            0,
            &m.body,
        );
        ops.push(i);
    }
    message(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq.wrapping_add(total as u32 + 1),
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    Encoded { bytes: buf, ops }
}

/// What [`Socket::apply`] did with a batch.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// In the kernel (or nothing to do).
    Applied,
    /// Not sent: larger than one netlink write ([`MAX_BATCH`]); the caller
    /// hands it to `nft` instead.
    TooLarge,
}

/// The kernel's answers in `buf`: acknowledgements counted, the first
/// error returned (errno, the message's sequence number).
fn answers(buf: &[u8], acks: &mut usize) -> Option<(i32, u32)> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let word = |i: usize| -> [u8; 4] {
            let mut w = [0; 4];
            w.copy_from_slice(&buf[i..i + 4]);
            w
        };
        let len = u32::from_ne_bytes(word(off)) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = u32::from_ne_bytes(word(off + 8));
        if len < 16 || off + len > buf.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
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
}

impl Socket {
    /// A socket in this network namespace.
    pub fn open() -> super::Result<Self> {
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
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Self { fd, seq })
    }

    /// Applies `b` to Margay's table `table`, in one transaction, unless
    /// it is too large for one write; an error (naming the command the
    /// kernel refused) leaves the table as it was (and the socket should
    /// be dropped: answers may be left in it).
    pub fn apply(&mut self, table: &str, b: &Batch) -> super::Result<Sent> {
        let e = |what: &'static str| move |err: nix::Error| netlink_error(what, err);
        let seq = self.seq;
        let enc = encode(table, b, seq);
        let messages = enc.ops.len();
        if messages == 0 {
            return Ok(Sent::Applied);
        }
        if enc.bytes.len() > MAX_BATCH {
            return Ok(Sent::TooLarge);
        }
        self.seq = seq.wrapping_add(u32::try_from(messages).unwrap_or(0) + 2);
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
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(e("waiting for the kernel's answer"))?;
            if let Some((errno, at)) = answers(&buf[..n], &mut acks) {
                let which = at.wrapping_sub(seq).wrapping_sub(1) as usize;
                let what = enc
                    .ops
                    .get(which)
                    .and_then(|&i| b.ops.get(i))
                    .map_or_else(|| format!("message {which}"), |op| format!("`{op}`"));
                return Err(Error::Nft(format!(
                    "netlink: the kernel refused {what} ({} of {messages} in the batch): {}",
                    which + 1,
                    nix::errno::Errno::from_raw(errno)
                )));
            }
        }
        Ok(Sent::Applied)
    }
}

fn netlink_error(what: &str, err: nix::Error) -> Error {
    Error::Nft(format!("netlink: {what}: {err}"))
}

/// Applies `b` to Margay's table `table` in this network namespace, in one
/// transaction, through a socket of its own; an error leaves the table as
/// it was.
pub fn apply(table: &str, b: &Batch) -> super::Result<Sent> {
    Socket::open()?.apply(table, b)
}

fn libc_timeval(d: Duration) -> nix::libc::timeval {
    nix::libc::timeval {
        tv_sec: nix::libc::time_t::try_from(d.as_secs()).unwrap_or(1),
        tv_usec: nix::libc::suseconds_t::from(d.subsec_micros()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_policy::Proto;

    #[test]
    fn a_batch_is_begin_messages_end_with_padded_keys() {
        let el = |op, set: &str, elements| Op::Elements {
            op,
            set: set.into(),
            elements,
        };
        let d = Batch {
            ops: vec![
                el(
                    ElementOp::Add,
                    "in/x/p/0.p4",
                    vec![Element::Addr("10.0.0.1".parse().unwrap())],
                ),
                el(ElementOp::Add, "empty", vec![]),
                Op::AddChain("in/x/p".into()),
                Op::AddRule {
                    chain: "in/x/p".into(),
                    line: margay_policy::nft::Line::DropUnmarked,
                },
                el(
                    ElementOp::Delete,
                    "in/x/p/0.n6.0",
                    vec![Element::Port {
                        addr: "fd00::1".parse().unwrap(),
                        proto: Proto::Udp,
                        port: 53,
                    }],
                ),
            ],
        };
        let enc = encode("margay_policy", &d, 100);
        // The empty element change is no message; the others say which
        // command they are.
        assert_eq!(enc.ops, [0, 2, 3, 4]);
        let b = enc.bytes;
        // Walk the messages: types and sequence numbers.
        let mut off = 0;
        let mut seen = Vec::new();
        while off < b.len() {
            let len = u32::from_ne_bytes(b[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
            let seq = u32::from_ne_bytes(b[off + 8..off + 12].try_into().unwrap());
            let flags = u16::from_ne_bytes([b[off + 6], b[off + 7]]);
            seen.push((kind, seq, flags & NLM_F_ACK != 0));
            assert_eq!(len % 4, 0);
            off += len;
        }
        assert_eq!(
            seen,
            [
                (NFNL_MSG_BATCH_BEGIN, 100, false),
                ((10 << 8) | NFT_MSG_NEWSETELEM, 101, false),
                ((10 << 8) | NFT_MSG_NEWCHAIN, 102, false),
                ((10 << 8) | NFT_MSG_NEWRULE, 103, false),
                // Only the last message asks for an answer.
                ((10 << 8) | NFT_MSG_DELSETELEM, 104, true),
                (NFNL_MSG_BATCH_END, 105, false)
            ]
        );
        assert_eq!(
            key(&Element::Port {
                addr: "10.1.2.3".parse().unwrap(),
                proto: Proto::Tcp,
                port: 8080
            }),
            [10, 1, 2, 3, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]
        );
        let table = b.windows(14).any(|w| w == b"margay_policy\0");
        assert!(table);
    }

    #[test]
    fn answers_count_acks_and_stop_at_an_error() {
        let msg = |err: i32, seq: u32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&err.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        let mut acks = 0;
        let mut b = msg(0, 1);
        b.extend(msg(0, 2));
        assert_eq!(answers(&b, &mut acks), None);
        assert_eq!(acks, 2);
        b.extend(msg(-2, 3));
        let mut acks = 0;
        assert_eq!(answers(&b, &mut acks), Some((2, 3)));
    }
}
