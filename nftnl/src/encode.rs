//! A [`Batch`] as one netlink batch (pure): begin, each command's
//! messages (an element change as many as its elements need), end; a
//! command netlink cannot carry is an error naming it.

use std::ops::Range;

use margay_policy::ruleset::{Batch, Element, ElementOp, Op, SetKind};

use crate::attrs::{Attrs, TooLong, addr_bytes, attr, cstr, nest, nested};
use crate::sys::*;
use crate::{Error, MAX_ATTR, rule};

/// An element's key as the kernel stores it: the address; for
/// `address . protocol . port` each field padded to 4 bytes, the port in
/// network order; an interface name zero-padded to 16 bytes.
pub(crate) fn key(e: &Element) -> Vec<u8> {
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
pub(crate) const MAX_ELEMENT_LIST: usize = MAX_ATTR - 4;

/// One element of an element list (`NFTA_LIST_ELEM`).
pub(crate) fn element(e: &Element) -> Attrs {
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
pub fn encode(table: &str, b: &Batch, seq: u32) -> crate::Result<Encoded> {
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
