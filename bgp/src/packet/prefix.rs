//! NLRI prefixes: the `<length, prefix>` encoding of RFC 4271 §4.3 and
//! RFC 4760 §5, with host bits cleared on decode.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 prefix with its host bits zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// Builds a prefix, clearing host bits; `None` when `len` is too long.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                Some(Self {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)),
                    len,
                })
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                Some(Self {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
                    len,
                })
            }
            _ => None,
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for IPv4.
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Never empty; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True when `other` lies inside (or equals) `self`.
    pub fn contains(&self, other: &Prefix) -> bool {
        if other.len < self.len || self.is_v4() != other.is_v4() {
            return false;
        }
        Prefix::new(other.addr, self.len) == Some(*self)
    }

    /// Appends the wire encoding (length octet + minimal address octets).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.len);
        let n = (self.len as usize).div_ceil(8);
        match self.addr {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
        }
    }

    /// Bytes [`Prefix::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        1 + (self.len as usize).div_ceil(8)
    }
}

/// Decodes a run of prefixes of one family; `None` on any syntax error
/// (length beyond the family's maximum, or a prefix running past the end).
pub fn decode_prefixes(mut buf: &[u8], v6: bool) -> Option<Vec<Prefix>> {
    let max = if v6 { 128 } else { 32 };
    let mut out = Vec::with_capacity(buf.len() / 4);
    while let Some((&len, rest)) = buf.split_first() {
        if len > max {
            return None;
        }
        let n = (len as usize).div_ceil(8);
        if rest.len() < n {
            return None;
        }
        let addr = if v6 {
            let mut o = [0u8; 16];
            o[..n].copy_from_slice(&rest[..n]);
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            let mut o = [0u8; 4];
            o[..n].copy_from_slice(&rest[..n]);
            IpAddr::V4(Ipv4Addr::from(o))
        };
        out.push(Prefix::new(addr, len)?);
        buf = &rest[n..];
    }
    Some(out)
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a prefix from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid prefix {0:?}: expected ADDRESS/LENGTH")]
pub struct PrefixParseError(pub String);

impl FromStr for Prefix {
    type Err = PrefixParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PrefixParseError(s.to_owned());
        let (a, l) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let len: u8 = l.parse().map_err(|_| err())?;
        Prefix::new(addr, len).ok_or_else(err)
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_minimal_octets_and_clears_host_bits() {
        let p: Prefix = "10.244.1.77/26".parse().unwrap();
        assert_eq!(p.to_string(), "10.244.1.64/26");
        let mut b = Vec::new();
        p.encode(&mut b);
        assert_eq!(b, [26, 10, 244, 1, 64]);
        let d: Prefix = "0.0.0.0/0".parse().unwrap();
        b.clear();
        d.encode(&mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn decodes_runs_and_rejects_overruns() {
        let v = decode_prefixes(&[24, 10, 0, 1, 32, 1, 2, 3, 4, 0], false).unwrap();
        assert_eq!(
            v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.0.1.0/24", "1.2.3.4/32", "0.0.0.0/0"]
        );
        assert!(decode_prefixes(&[33, 1, 2, 3, 4, 5], false).is_none());
        assert!(decode_prefixes(&[24, 10, 0], false).is_none());
        let v6 = decode_prefixes(&[64, 0xfd, 0, 0, 0x99, 0, 0, 0, 1], true).unwrap();
        assert_eq!(v6[0].to_string(), "fd00:99:0:1::/64");
    }

    #[test]
    fn containment() {
        let pool: Prefix = "10.244.0.0/16".parse().unwrap();
        assert!(pool.contains(&"10.244.3.0/26".parse().unwrap()));
        assert!(!pool.contains(&"10.245.0.0/26".parse().unwrap()));
        assert!(!pool.contains(&"10.0.0.0/8".parse().unwrap()));
        assert!(!pool.contains(&"fd00::/64".parse().unwrap()));
    }
}
