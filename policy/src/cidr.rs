//! CIDR text as the Kubernetes API server reads it in a NetworkPolicy's
//! `ipBlock.cidr` and `ipBlock.except`, and the network it means.
//!
//! The API server validates both fields with `k8s.io/utils/net`'s
//! `ParseCIDRSloppy`: Go 1.16's `net.ParseCIDR`, kept when Go 1.17 made it
//! stricter so that stored objects stay valid. Through Kubernetes 1.32
//! that is all it checks; 1.33's stricter validation (feature gate
//! `StrictIPCIDRValidation`, KEP-4858) refuses leading zeros, IPv4-mapped
//! addresses and bits beyond the prefix in new values only, and an update
//! keeps what an object already holds. So a policy may hold any text that
//! function accepts, and exactly that is accepted here:
//!
//! - IPv4 `d.d.d.d`: four decimal fields, each of any number of digits and
//!   at most 255. Leading zeros are decimal: `010.0.0.0` is 10.0.0.0, not
//!   (as libc reads it) 8.0.0.0.
//! - IPv6 (RFC 4291 text): groups of any number of hex digits (either
//!   case) up to `ffff`, at most one `::` standing for at least one zero
//!   group, and an IPv4 address (read as above) as the last 32 bits, or
//!   anywhere after a `::` where it fits. No zone (`%eth0`), no brackets,
//!   no spaces.
//! - `/N`: decimal digits, leading zeros allowed, at most 32 after IPv4
//!   text and 128 after IPv6 text.
//!
//! What it means, as Go's `net.IPNet` (which Kubernetes' own checks use)
//! and `k8s.io/utils/net/v2.ParsePrefix` read it: the address's bits
//! beyond the prefix are dropped (`10.0.0.1/8` is 10.0.0.0/8), and an
//! IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`, prefix 96 or more) is
//! the IPv4 network (10.0.0.0/8), the form Kubernetes' warnings tell users
//! to write instead. Below /96 the mapping prefix itself is cut and the
//! network is IPv6 (`::ffff:10.0.0.0/80` is `::/80`).
//!
//! An `except` entry must be a strict subset of `cidr` as the API server
//! tests it ([`Cidr::admits_except`]): `cidr` contains the except's network
//! address (same family, as meant above), and the except's prefix length
//! *as written* is longer than the cidr's as written. With IPv4-mapped text
//! on one side only, the meaning and the written lengths part:
//! `10.0.0.0/8` except `::ffff:10.0.0.0/104` is accepted (8 < 104) and
//! excepts all of 10.0.0.0/8, while `::ffff:10.0.0.0/104` except
//! `10.1.0.0/16` is refused (104 >= 16).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// Why CIDR text is not one the API server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No `/`.
    #[error("no /prefix length")]
    NoPrefix,
    /// Before the `/`: neither IPv4 nor IPv6 text.
    #[error("not an IPv4 or IPv6 address")]
    Address,
    /// After the `/`: not only decimal digits, or a number above `max`.
    #[error("the prefix length is not a decimal number up to {max}")]
    Prefix {
        /// 32 after IPv4 text, 128 after IPv6 text.
        max: u8,
    },
}

/// CIDR text the API server accepts, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network it means: bits beyond the prefix cleared, IPv4-mapped
    /// IPv6 as IPv4.
    pub net: IpNetwork,
    /// The prefix length as written: of 32 bits after IPv4 text, of 128
    /// after IPv6 text (IPv4-mapped included). The API server compares
    /// these, not the meanings' ([`Cidr::admits_except`]).
    pub written_len: u8,
}

impl Cidr {
    /// Reads `text` as the API server does (module docs).
    pub fn parse(text: &str) -> Result<Self, CidrError> {
        let (addr, len) = text.split_once('/').ok_or(CidrError::NoPrefix)?;
        let (bytes, max): ([u8; 16], u8) = match ipv4(addr) {
            Some(v4) => (Ipv4Addr::from(v4).to_ipv6_mapped().octets(), 32),
            None => (ipv6(addr).ok_or(CidrError::Address)?, 128),
        };
        let written_len = decimal(len)
            .filter(|n| *n <= u32::from(max))
            .ok_or(CidrError::Prefix { max })? as u8;
        // The written length over the 128 bits (IPv4 text sits in the
        // last 32).
        let bits = written_len + (128 - max);
        let masked =
            u128::from_be_bytes(bytes) & u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
        let masked = Ipv6Addr::from(masked);
        let net = match masked.to_ipv4_mapped() {
            // IPv4 text, or IPv4-mapped text with its mapping kept (the
            // prefix covers the 96 bits of `::ffff:`).
            Some(v4) if bits >= 96 => IpNetwork::new(IpAddr::V4(v4), bits - 96),
            _ => IpNetwork::new(IpAddr::V6(masked), bits),
        }
        .map_err(|_| CidrError::Prefix { max })?;
        Ok(Self { net, written_len })
    }

    /// Whether the API server takes `except` as an `except` entry of this
    /// `cidr`, a strict subset: this network contains the except's
    /// network address (in the family each means), and the except's
    /// prefix length as written is longer than this one's as written.
    pub fn admits_except(&self, except: &Cidr) -> bool {
        let inside = match (self.net, except.net.network()) {
            (IpNetwork::V4(n), IpAddr::V4(a)) => n.contains(a),
            (IpNetwork::V6(n), IpAddr::V6(a)) => n.contains(a),
            _ => false,
        };
        inside && self.written_len < except.written_len
    }

    /// What an admitted `except` excludes from this network: its own
    /// network, or (when written as IPv4-mapped IPv6 with a length that
    /// means a wider IPv4 network, which the API server admits) all of
    /// this one.
    pub fn clamp(&self, except: &Cidr) -> IpNetwork {
        if except.net.prefix() < self.net.prefix() {
            self.net
        } else {
            except.net
        }
    }
}

/// A decimal number of one or more digits, leading zeros allowed
/// (saturating: what is too large for a field fails its bound anyway).
fn decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u32, |n, b| {
        n.saturating_mul(10).saturating_add(u32::from(b - b'0'))
    }))
}

/// `d.d.d.d`, each field decimal (leading zeros allowed) up to 255.
fn ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut fields = s.split('.');
    for o in &mut out {
        *o = u8::try_from(decimal(fields.next()?)?).ok()?;
    }
    fields.next().is_none().then_some(out)
}

/// The leading run of hex digits of `s` (one or more) as a number up to
/// 0xffff, and its length.
fn hex_group(s: &str) -> Option<(u16, usize)> {
    let len = s.bytes().take_while(u8::is_ascii_hexdigit).count();
    if len == 0 {
        return None;
    }
    let n = s[..len].bytes().try_fold(0u32, |n, b| {
        let d = char::from(b).to_digit(16)?;
        Some(n * 16 + d).filter(|n| *n <= 0xffff)
    })?;
    Some((n as u16, len))
}

/// IPv6 text (module docs): groups, one `::`, an IPv4 tail.
fn ipv6(s: &str) -> Option<[u8; 16]> {
    let mut ip = [0u8; 16];
    // Where the `::` stands (the byte index of what follows it).
    let mut gap: Option<usize> = None;
    let mut rest = s;
    if let Some(r) = rest.strip_prefix("::") {
        gap = Some(0);
        rest = r;
        if rest.is_empty() {
            return Some(ip);
        }
    }
    let mut i = 0;
    while i < 16 {
        let (n, len) = hex_group(rest)?;
        if rest[len..].starts_with('.') {
            // An IPv4 tail: the last 32 bits, or after a `::` if it fits.
            if (gap.is_none() && i != 12) || i + 4 > 16 {
                return None;
            }
            ip[i..i + 4].copy_from_slice(&ipv4(rest)?);
            rest = "";
            i += 4;
            break;
        }
        ip[i..i + 2].copy_from_slice(&n.to_be_bytes());
        i += 2;
        rest = &rest[len..];
        if rest.is_empty() {
            break;
        }
        // A `:` and more.
        rest = rest.strip_prefix(':').filter(|r| !r.is_empty())?;
        if let Some(r) = rest.strip_prefix(':') {
            if gap.is_some() {
                return None;
            }
            gap = Some(i);
            rest = r;
            if rest.is_empty() {
                break;
            }
        }
    }
    if !rest.is_empty() {
        return None;
    }
    match gap {
        // Too few groups and no `::`.
        None if i < 16 => None,
        None => Some(ip),
        // A `::` must stand for at least one zero group.
        Some(_) if i == 16 => None,
        Some(g) => {
            let shift = 16 - i;
            ip.copy_within(g..i, g + shift);
            ip[g..g + shift].fill(0);
            Some(ip)
        }
    }
}
