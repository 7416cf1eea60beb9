//! The encoder's unit tests: messages, limits, refusals.

use margay_policy::Proto;
use margay_policy::ruleset::{Batch, Element, ElementOp, Op};

use crate::attrs::{Attrs, TooLong, attr, nested};
use crate::encode::encode;
use crate::encode::{MAX_ELEMENT_LIST, element, key};
use crate::socket::answers;
use crate::sys::*;
use crate::{Error, MAX_ATTR};

/// An element change of `set`.
fn el(op: ElementOp, set: &str, elements: Vec<Element>) -> Op {
    Op::Elements {
        op,
        set: set.into(),
        elements,
    }
}

#[test]
fn a_batch_is_begin_messages_end_with_padded_keys() {
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
    let seen: Vec<_> = messages(&b)
        .into_iter()
        .map(|(kind, flags, seq, _)| (kind, seq, flags & NLM_F_ACK != 0))
        .collect();
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
