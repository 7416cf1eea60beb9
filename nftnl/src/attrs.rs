//! Netlink attributes being written (pure): one too long for its 16-bit
//! length spoils the whole, which is then refused, never truncated.

use std::net::IpAddr;

use crate::sys::{NFTA_DATA_VERDICT, NFTA_VERDICT_CHAIN, NFTA_VERDICT_CODE, NLA_F_NESTED};

/// Netlink attributes being written. One too long for its 16-bit length
/// is not written, and spoils the whole: [`Attrs::finish`] then refuses
/// it, so that no length is ever truncated.
#[derive(Debug, Default)]
pub(crate) struct Attrs {
    pub(crate) bytes: Vec<u8>,
    /// The length of the first attribute that did not fit.
    too_long: Option<usize>,
}

/// An attribute longer than [`MAX_ATTR`](crate::MAX_ATTR) (its length), or a message
/// longer than a 32-bit length says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLong(pub(crate) usize);

impl Attrs {
    /// The bytes, unless an attribute did not fit.
    pub(crate) fn finish(self) -> Result<Vec<u8>, TooLong> {
        match self.too_long {
            Some(len) => Err(TooLong(len)),
            None => Ok(self.bytes),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn spoil(&mut self, len: usize) {
        self.too_long.get_or_insert(len);
    }
}

/// Appends a netlink attribute (padded to 4 bytes); one longer than
/// [`MAX_ATTR`](crate::MAX_ATTR) spoils `buf` instead.
pub(crate) fn attr(buf: &mut Attrs, kind: u16, payload: &[u8]) {
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
pub(crate) fn nest(buf: &mut Attrs, kind: u16, inner: Attrs) {
    match inner.finish() {
        Ok(b) => attr(buf, kind | NLA_F_NESTED, &b),
        Err(TooLong(len)) => buf.spoil(len),
    }
}

/// Appends a nested attribute, its contents written by `inner`.
pub(crate) fn nested(buf: &mut Attrs, kind: u16, inner: impl FnOnce(&mut Attrs)) {
    let mut b = Attrs::default();
    inner(&mut b);
    nest(buf, kind, b);
}

pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub(crate) fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A verdict (`NFTA_DATA_VERDICT`'s contents).
pub(crate) fn verdict(b: &mut Attrs, code: i32, chain: Option<&str>) {
    nested(b, NFTA_DATA_VERDICT, |b| {
        attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            attr(b, NFTA_VERDICT_CHAIN, &cstr(c));
        }
    });
}
