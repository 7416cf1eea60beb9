//! NetworkPolicy changes handed to the kernel over netlink
//! (`NETLINK_NETFILTER`), without `nft`: a [`Batch`] (sets, chains,
//! rules, set and map elements) as one batch, one transaction, all of it
//! or nothing. `nft -f` reads back the definition of every set and chain
//! of the table before it runs a script, and costs a process; a policy
//! created or a pod added is a few messages here (BENCHMARKS.md). The
//! whole table (start-up, resync, recovery) still goes through
//! [`super::nft_script`], as does a batch too large for one write
//! ([`MAX_BATCH`]).
//!
//! [`encode`] is pure (a batch of messages from a [`Batch`]; rule lines
//! become expressions in [`rule`]); [`Socket::apply`] sends it and reads
//! the kernel's answer, or says it is too large for one write.
//!
//! Netlink's limits, and what happens at them:
//! - An attribute's length is 16 bits (at most 65,535 bytes, header
//!   included). An element change is as many messages as its elements
//!   need, each list one attribute within that limit, all in the same
//!   batch (one transaction, as `nft` splits them); a message says which
//!   command, and which of its elements, it carries. Anything else that
//!   does not fit (a rule whose expressions pass 64 KiB) is refused
//!   before anything is sent ([`Error::Unencodable`]): a length is never
//!   truncated (one was, and the kernel read the first 4,095 of 5,000
//!   addresses of a set and the rest as padding, without an error).
//! - The kernel refuses a write longer than the socket's send buffer
//!   (less 32 bytes). The socket raises it to [`MAX_BATCH`]
//!   (`SO_SNDBUFFORCE`, as `nft` does for large batches; it needs
//!   `CAP_NET_ADMIN`, which the agent has), so a batch of a few MiB is
//!   still one write, one transaction.

mod rule;

use std::net::IpAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::Duration;

use margay_policy::ruleset::{Batch, Element, ElementOp, Op, SetKind};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, getsockopt, recv,
    sendto, setsockopt, socket, sockopt,
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

/// The longest netlink attribute, header included (its length field is
/// 16 bits).
pub const MAX_ATTR: usize = u16::MAX as usize;

/// Batches larger than this go through `nft` (one netlink write must hold
/// the whole batch; the socket's send buffer is raised to hold this much).
pub const MAX_BATCH: usize = 4 * 1024 * 1024;

/// What the kernel keeps of a socket's send buffer for itself: a write
/// may be at most the buffer less this (`netlink_sendmsg`).
const SNDBUF_RESERVED: usize = 32;

/// Netlink attributes being written. One too long for its 16-bit length
/// is not written, and spoils the whole: [`Attrs::finish`] then refuses
/// it, so that no length is ever truncated.
#[derive(Debug, Default)]
pub(super) struct Attrs {
    bytes: Vec<u8>,
    /// The length of the first attribute that did not fit.
    too_long: Option<usize>,
}

/// An attribute longer than [`MAX_ATTR`] (its length), or a message
/// longer than a 32-bit length says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooLong(usize);

impl Attrs {
    /// The bytes, unless an attribute did not fit.
    pub(super) fn finish(self) -> Result<Vec<u8>, TooLong> {
        match self.too_long {
            Some(len) => Err(TooLong(len)),
            None => Ok(self.bytes),
        }
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn spoil(&mut self, len: usize) {
        self.too_long.get_or_insert(len);
    }
}

/// Appends a netlink attribute (padded to 4 bytes); one longer than
/// [`MAX_ATTR`] spoils `buf` instead.
fn attr(buf: &mut Attrs, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    let Ok(len16) = u16::try_from(len) else {
        buf.spoil(len);
        return;
    };
    let b = &mut buf.bytes;
    b.extend_from_slice(&len16.to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(b.len().next_multiple_of(4), 0);
}

/// Appends `inner` as a nested attribute (spoiled if it is).
fn nest(buf: &mut Attrs, kind: u16, inner: Attrs) {
    match inner.finish() {
        Ok(b) => attr(buf, kind | NLA_F_NESTED, &b),
        Err(TooLong(len)) => buf.spoil(len),
    }
}

/// Appends a nested attribute, its contents written by `inner`.
fn nested(buf: &mut Attrs, kind: u16, inner: impl FnOnce(&mut Attrs)) {
    let mut b = Attrs::default();
    inner(&mut b);
    nest(buf, kind, b);
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

/// A netlink header and nfgenmsg: twenty bytes.
const HEADER: usize = 16 + 4;

/// One netlink message: header, nfgenmsg, attributes.
fn message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) -> Result<(), TooLong> {
    let len = HEADER + body.len();
    let len32 = u32::try_from(len).map_err(|_| TooLong(len))?;
    header(buf, len32, kind, flags, seq, NFPROTO_INET, 0);
    buf.extend_from_slice(body);
    Ok(())
}

/// A batch's begin or end: a header alone, for the nftables subsystem.
fn control(buf: &mut Vec<u8>, kind: u16, seq: u32) {
    const LEN: u32 = HEADER as u32;
    header(buf, LEN, kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
}

fn header(buf: &mut Vec<u8>, len: u32, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
}

/// A verdict (`NFTA_DATA_VERDICT`'s contents).
fn verdict(b: &mut Attrs, code: i32, chain: Option<&str>) {
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

/// One message of a command, before its header.
struct Message {
    /// `NFT_MSG_*`.
    kind: u16,
    /// Flags besides `NLM_F_REQUEST` and `NLM_F_ACK`.
    flags: u16,
    /// Its attributes.
    body: Vec<u8>,
    /// Which of the command's elements it carries (none for a command
    /// that is not an element change).
    elements: Range<usize>,
}

/// The most one message's element list (`NFTA_SET_ELEM_LIST_ELEMENTS`,
/// one attribute) carries: [`MAX_ATTR`] less its header.
const MAX_ELEMENT_LIST: usize = MAX_ATTR - 4;

/// One element of an element list (`NFTA_LIST_ELEM`).
fn element(e: &Element) -> Attrs {
    let mut b = Attrs::default();
    nested(&mut b, NFTA_LIST_ELEM, |b| {
        nested(b, NFTA_SET_ELEM_KEY, |b| {
            attr(b, NFTA_DATA_VALUE, &key(e));
        });
    });
    b
}

/// An element change's messages: its elements in order, as many to a
/// message as one attribute holds ([`MAX_ELEMENT_LIST`]); none when it
/// has no elements.
fn element_messages(
    table: &str,
    set: &str,
    kind: u16,
    flags: u16,
    elements: &[Element],
) -> Result<Vec<Message>, TooLong> {
    let mut out = Vec::new();
    let mut finish = |list: Attrs, range: Range<usize>| -> Result<(), TooLong> {
        let mut body = Attrs::default();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        nest(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS, list);
        out.push(Message {
            kind,
            flags,
            body: body.finish()?,
            elements: range,
        });
        Ok(())
    };
    let mut list = Attrs::default();
    let mut first = 0;
    for (i, e) in elements.iter().enumerate() {
        // An element alone longer than a list is refused by `nest`.
        let one = element(e).finish()?;
        if !list.is_empty() && list.len() + one.len() > MAX_ELEMENT_LIST {
            finish(std::mem::take(&mut list), first..i)?;
            first = i;
        }
        list.bytes.extend_from_slice(&one);
    }
    if !list.is_empty() {
        finish(list, first..elements.len())?;
    }
    Ok(out)
}

/// One command's messages: one, or for an element change as many as its
/// elements need (none when it has none).
fn op_messages(table: &str, op: &Op, set_id: u32) -> Result<Vec<Message>, TooLong> {
    let mut body = Attrs::default();
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
            nest(&mut body, NFTA_RULE_EXPRESSIONS, rule::expressions(line));
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
        Op::Elements { op, set, elements } => {
            let (kind, flags) = match op {
                ElementOp::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE),
                ElementOp::Delete => (NFT_MSG_DELSETELEM, 0),
            };
            return element_messages(table, set, kind, flags, elements);
        }
    };
    Ok(vec![Message {
        kind,
        flags,
        body: body.finish()?,
        elements: 0..0,
    }])
}

/// An encoded batch.
#[derive(Debug)]
pub struct Encoded {
    /// The bytes to send.
    pub bytes: Vec<u8>,
    /// Which command of the batch each message is (message `i` has
    /// sequence number `seq + 1 + i`); an element change may be several
    /// messages in a row.
    pub ops: Vec<usize>,
    /// Which of its command's elements each message carries (empty for a
    /// command that is not an element change).
    pub elements: Vec<Range<usize>>,
}

impl Encoded {
    /// What message `i` of the batch is, briefly, for an error: its
    /// command's text, with only the first of the elements it carries.
    pub fn describe(&self, b: &Batch, i: usize) -> Option<String> {
        let op = b.ops.get(*self.ops.get(i)?)?;
        let range = self.elements.get(i)?;
        Some(describe(op, range.clone()))
    }
}

/// `op`'s text, briefly: of an element change, the first few of the
/// elements in `range` and which they are; of anything else, its first
/// 200 characters.
fn describe(op: &Op, range: Range<usize>) -> String {
    const SHOWN: usize = 3;
    const SHOWN_CHARS: usize = 200;
    match op {
        Op::Elements { op, set, elements }
            if elements.len() > SHOWN || range.len() < elements.len() =>
        {
            let shown = range.start..range.end.min(range.start + SHOWN);
            let head = Op::Elements {
                op: *op,
                set: set.clone(),
                elements: elements.get(shown.clone()).unwrap_or_default().to_vec(),
            }
            .to_string();
            let more = if shown.len() < range.len() {
                ", …"
            } else {
                ""
            };
            format!(
                "`{}{more} }}` (elements {} to {} of {})",
                head.trim_end_matches(" }"),
                range.start + 1,
                range.end,
                elements.len()
            )
        }
        _ => {
            let text = op.to_string();
            match text.char_indices().nth(SHOWN_CHARS) {
                Some((cut, _)) => format!("`{} …`", &text[..cut]),
                None => format!("`{text}`"),
            }
        }
    }
}

/// The batch for `b` on table `table` (`inet` family, name without the
/// family), its messages numbered from `seq`. Only the last asks for an
/// acknowledgement: the kernel processes the whole batch within the
/// send, and answers a refused message with its error ahead of that
/// acknowledgement (one answer to read, not one per message). A command
/// netlink cannot carry is an error ([`Error::Unencodable`]), naming it.
pub fn encode(table: &str, b: &Batch, seq: u32) -> super::Result<Encoded> {
    let unencodable = |i: usize, TooLong(len)| {
        let op = &b.ops[i];
        let all = match op {
            Op::Elements { elements, .. } => 0..elements.len(),
            _ => 0..0,
        };
        Error::Unencodable {
            command: i + 1,
            op: describe(op, all),
            len,
        }
    };
    let mut messages = Vec::new();
    for (i, op) in b.ops.iter().enumerate() {
        let set_id = u32::try_from(i).unwrap_or(u32::MAX);
        let ms = op_messages(table, op, set_id).map_err(|e| unencodable(i, e))?;
        messages.extend(ms.into_iter().map(|m| (i, m)));
    }
    let mut buf = Vec::new();
    control(&mut buf, NFNL_MSG_BATCH_BEGIN, seq);
    let total = messages.len();
    let mut ops = Vec::with_capacity(total);
    let mut elements = Vec::with_capacity(total);
    for (n, (i, m)) in messages.into_iter().enumerate() {
        let ack = if n + 1 == total { NLM_F_ACK } else { 0 };
        message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | m.kind,
            NLM_F_REQUEST | ack | m.flags,
            seq.wrapping_add(n as u32 + 1),
            &m.body,
        )
        .map_err(|e| unencodable(i, e))?;
        ops.push(i);
        elements.push(m.elements);
    }
    control(
        &mut buf,
        NFNL_MSG_BATCH_END,
        seq.wrapping_add(total as u32 + 1),
    );
    Ok(Encoded {
        bytes: buf,
        ops,
        elements,
    })
}

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
fn answers(buf: &[u8], acks: &mut usize) -> Option<(i32, u32)> {
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
    pub fn apply(&mut self, table: &str, b: &Batch) -> super::Result<Sent> {
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
                return Err(Error::Nft(format!(
                    "netlink: the kernel refused {what} (message {which} of {messages} in the batch): {}",
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
                    line: margay_policy::ruleset::Line::DropUnmarked,
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
        let enc = encode("margay_policy", &d, 100).unwrap();
        // The empty element change is no message; the others say which
        // command they are.
        assert_eq!(enc.ops, [0, 2, 3, 4]);
        assert_eq!(enc.elements, [0..1, 0..0, 0..0, 0..1]);
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

    /// The attributes of `b`, walked to its exact end, nested ones (their
    /// flag) to theirs: every length exact, or this panics. Each as its
    /// kind (without the flag) and payload.
    fn walk(b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < b.len() {
            assert!(off + 4 <= b.len(), "an attribute header past the end");
            let len = usize::from(u16::from_ne_bytes([b[off], b[off + 1]]));
            let kind = u16::from_ne_bytes([b[off + 2], b[off + 3]]);
            assert!(
                len >= 4 && off + len <= b.len(),
                "attribute {kind} past the end"
            );
            let payload = &b[off + 4..off + len];
            if kind & NLA_F_NESTED != 0 {
                walk(payload);
            }
            out.push((kind & !NLA_F_NESTED, payload));
            off += len.next_multiple_of(4);
        }
        assert_eq!(off, b.len(), "attributes end where their container does");
        out
    }

    /// The messages of a batch, walked to its exact end: (type, flags,
    /// sequence number, attributes).
    fn messages(b: &[u8]) -> Vec<(u16, u16, u32, &[u8])> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < b.len() {
            let len = u32::from_ne_bytes(b[off..off + 4].try_into().unwrap()) as usize;
            assert!(
                len >= HEADER && off + len <= b.len(),
                "message past the end"
            );
            assert_eq!(len % 4, 0);
            let kind = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
            let flags = u16::from_ne_bytes([b[off + 6], b[off + 7]]);
            let seq = u32::from_ne_bytes(b[off + 8..off + 12].try_into().unwrap());
            out.push((kind, flags, seq, &b[off + HEADER..off + len]));
            off += len;
        }
        assert_eq!(off, b.len());
        out
    }

    fn addr4(i: u32) -> Element {
        Element::Addr(std::net::Ipv4Addr::from(0x0A40_0000 + i).into())
    }

    fn port6(i: u32) -> Element {
        Element::Port {
            addr: std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i)).into(),
            proto: Proto::Tcp,
            port: 80,
        }
    }

    #[test]
    fn ten_thousand_elements_are_several_messages_within_the_limits() {
        let n = 10_000u32;
        let el = |op, set: &str, elements| Op::Elements {
            op,
            set: set.into(),
            elements,
        };
        let b = Batch {
            ops: vec![
                Op::AddChain("before".into()),
                el(ElementOp::Add, "in/x/p/0.p4", (0..n).map(addr4).collect()),
                Op::AddChain("between".into()),
                el(ElementOp::Delete, "port/1.n6", (0..n).map(port6).collect()),
                el(
                    ElementOp::Add,
                    "if-in/abc",
                    (0..n)
                        .map(|i| Element::Iface(format!("cali{i:011}")))
                        .collect(),
                ),
            ],
        };
        let enc = encode("margay_policy", &b, 7).unwrap();
        let ms = messages(&enc.bytes);
        assert_eq!(ms.len(), enc.ops.len() + 2);
        assert_eq!(enc.ops.len(), enc.elements.len());
        // Begin, the messages numbered on, only the last asking for an
        // answer, end.
        for (i, (kind, flags, seq, _)) in ms.iter().enumerate() {
            assert_eq!(*seq, 7 + i as u32);
            assert_eq!(flags & NLM_F_ACK != 0, i + 2 == ms.len(), "message {i}");
            if i == 0 {
                assert_eq!(*kind, NFNL_MSG_BATCH_BEGIN);
            }
        }
        assert_eq!(ms.last().unwrap().0, NFNL_MSG_BATCH_END);
        // Each element change: its elements, in order, in messages of
        // its own, each list one attribute within the limit, a list
        // only ending early when the next element would not fit.
        for (i, op) in b.ops.iter().enumerate() {
            let parts: Vec<usize> = (0..enc.ops.len()).filter(|&m| enc.ops[m] == i).collect();
            assert!(
                parts.windows(2).all(|w| w[1] == w[0] + 1),
                "op {i}: in a row"
            );
            let Op::Elements { op, elements, .. } = op else {
                assert_eq!(parts.len(), 1, "op {i}: one message");
                assert_eq!(enc.elements[parts[0]], 0..0);
                continue;
            };
            let want_kind = match op {
                ElementOp::Add => NFT_MSG_NEWSETELEM,
                ElementOp::Delete => NFT_MSG_DELSETELEM,
            };
            let per = MAX_ELEMENT_LIST / element(&elements[0]).finish().unwrap().len();
            assert!(parts.len() > 1, "op {i}: split");
            assert_eq!(
                parts.len(),
                elements.len().div_ceil(per),
                "op {i}: as few as fit"
            );
            let mut keys = Vec::new();
            let mut next = 0;
            for &m in &parts {
                let (kind, _, _, body) = ms[m + 1];
                assert_eq!(kind, (NFNL_SUBSYS_NFTABLES << 8) | want_kind);
                assert!(
                    body.len() < MAX_ATTR + 1024,
                    "a message of {} bytes",
                    body.len()
                );
                let attrs = walk(body);
                assert_eq!(
                    attrs[0],
                    (NFTA_SET_ELEM_LIST_TABLE, &b"margay_policy\0"[..])
                );
                let (k, list) = attrs[2];
                assert_eq!(k, NFTA_SET_ELEM_LIST_ELEMENTS);
                assert!(4 + list.len() <= MAX_ATTR);
                let range = enc.elements[m].clone();
                assert_eq!(range.start, next, "op {i}: contiguous");
                next = range.end;
                let items = walk(list);
                assert_eq!(items.len(), range.len());
                if let Some(e) = elements.get(range.end) {
                    let next = element(e).finish().unwrap().len();
                    assert!(list.len() + next > MAX_ELEMENT_LIST, "op {i}: ended early");
                }
                for (kind, item) in items {
                    assert_eq!(kind, NFTA_LIST_ELEM);
                    let [(NFTA_SET_ELEM_KEY, k)] = walk(item)[..] else {
                        panic!("an element is its key")
                    };
                    let [(NFTA_DATA_VALUE, v)] = walk(k)[..] else {
                        panic!("a key is its value")
                    };
                    keys.push(v.to_vec());
                }
            }
            assert_eq!(next, elements.len(), "op {i}: every element");
            let want: Vec<Vec<u8>> = elements.iter().map(key).collect();
            assert_eq!(keys, want, "op {i}: the elements, in order, once each");
        }
        // A refusal of the second message of the first element change
        // names that change and the elements it carried.
        let second = enc.ops.iter().position(|&i| i == 1).unwrap() + 1;
        let what = enc.describe(&b, second).unwrap();
        assert!(
            what.starts_with("`add element inet margay_policy in/x/p/0.p4 { 10.64.15.255, "),
            "{what}"
        );
        assert!(
            what.ends_with(", … }` (elements 4096 to 8190 of 10000)"),
            "{what}"
        );
    }

    #[test]
    fn an_attribute_is_at_most_65535_bytes_never_truncated() {
        let mut b = Attrs::default();
        attr(&mut b, 1, &[0; MAX_ATTR - 4]);
        let ok = b.finish().unwrap();
        assert_eq!(u16::from_ne_bytes([ok[0], ok[1]]), u16::MAX);
        assert_eq!(walk(&ok).len(), 1);
        let mut b = Attrs::default();
        attr(&mut b, 1, &[0; MAX_ATTR - 3]);
        assert_eq!(b.finish().unwrap_err(), TooLong(MAX_ATTR + 1));
        // Nested: the inner attribute fits, the nest does not.
        let mut b = Attrs::default();
        nested(&mut b, 2, |b| attr(b, 1, &[0; MAX_ATTR - 4]));
        // (65,535 bytes, padded to 65,536, and the nest's header.)
        assert_eq!(b.finish().unwrap_err(), TooLong(65_540));
        // Spoiled inside, spoiled outside, whatever follows.
        let mut b = Attrs::default();
        nested(&mut b, 2, |b| attr(b, 1, &[0; 70_000]));
        attr(&mut b, 3, &[1]);
        assert_eq!(b.finish().unwrap_err(), TooLong(70_004));
    }

    #[test]
    fn a_rule_netlink_cannot_carry_is_an_error_naming_it() {
        let except = |k: u32| -> Vec<ipnetwork::IpNetwork> {
            (0..k)
                .map(|i| format!("10.{}.{}.1/32", i / 256, i % 256).parse().unwrap())
                .collect()
        };
        let rule = |k| Op::AddRule {
            chain: "in/x/p".into(),
            line: margay_policy::ruleset::Line::Allow {
                peer: Some(margay_policy::ruleset::PeerMatch::Block {
                    field: margay_policy::ruleset::Field::Saddr,
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: except(k),
                }),
                port: None,
            },
        };
        // Three hundred excepts fit, every length exact.
        let fits = Batch {
            ops: vec![rule(300)],
        };
        let enc = encode("margay_policy", &fits, 1).unwrap();
        for (_, _, _, body) in messages(&enc.bytes) {
            walk(body);
        }
        // Two thousand do not: an error, nothing encoded.
        let b = Batch {
            ops: vec![Op::AddChain("in/x/p".into()), rule(2000)],
        };
        match encode("margay_policy", &b, 1) {
            Err(Error::Unencodable { command, op, len }) => {
                assert_eq!(command, 2);
                assert!(len > MAX_ATTR, "{len}");
                assert!(
                    op.starts_with("`add rule inet margay_policy in/x/p ip saddr 10.0.0.0/8 ip saddr != 10.0.0.1/32"),
                    "{op}"
                );
                assert!(op.ends_with(" …`") && op.len() < 300, "{op}");
            }
            other => panic!("{other:?}"),
        }
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
        // An error echoing a message longer than what was read of it.
        let mut cut = msg(-22, 4);
        cut[..4].copy_from_slice(&70_000u32.to_ne_bytes());
        assert_eq!(answers(&cut, &mut acks), Some((22, 4)));
    }
}
