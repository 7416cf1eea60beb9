//! Address ranges: an ipBlock's CIDR minus its excepts, and unions of
//! blocks, as disjoint, sorted inclusive ranges (what an nftables interval
//! set holds without overlaps).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// Inclusive ranges of one family, as integers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges {
    v6: bool,
    spans: Vec<(u128, u128)>,
}

fn span(n: &IpNetwork) -> (u128, u128) {
    match n {
        IpNetwork::V4(n) => {
            let lo = u32::from(n.network());
            let hi = u32::from(n.broadcast());
            (u128::from(lo), u128::from(hi))
        }
        IpNetwork::V6(n) => {
            let lo = u128::from(n.network());
            let bits = 128 - u32::from(n.prefix());
            let hi = if bits == 128 {
                u128::MAX
            } else {
                lo | ((1u128 << bits) - 1)
            };
            (lo, hi)
        }
    }
}

impl Ranges {
    /// Nothing, of the family `v6`.
    pub fn new(v6: bool) -> Self {
        Self {
            v6,
            spans: Vec::new(),
        }
    }

    /// Adds `cidr` minus `except` (of this family; others are ignored).
    pub fn add_block(&mut self, cidr: &IpNetwork, except: &[IpNetwork]) {
        if cidr.is_ipv6() != self.v6 {
            return;
        }
        let mut parts = vec![span(cidr)];
        for e in except.iter().filter(|e| e.is_ipv6() == self.v6) {
            let (elo, ehi) = span(e);
            let mut next = Vec::new();
            for (lo, hi) in parts {
                if ehi < lo || elo > hi {
                    next.push((lo, hi));
                    continue;
                }
                if elo > lo {
                    next.push((lo, elo - 1));
                }
                if ehi < hi {
                    next.push((ehi + 1, hi));
                }
            }
            parts = next;
        }
        self.spans.extend(parts);
        self.normalise();
    }

    fn normalise(&mut self) {
        self.spans.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(self.spans.len());
        for (lo, hi) in self.spans.drain(..) {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        self.spans = out;
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let x = match ip {
            IpAddr::V4(a) if !self.v6 => u128::from(u32::from(a)),
            IpAddr::V6(a) if self.v6 => u128::from(a),
            _ => return false,
        };
        self.spans.iter().any(|(lo, hi)| (*lo..=*hi).contains(&x))
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The ranges as nftables interval elements (`a-b`, or `a` alone).
    pub fn elements(&self) -> Vec<String> {
        let ip = |x: u128| -> IpAddr {
            if self.v6 {
                IpAddr::V6(Ipv6Addr::from(x))
            } else {
                IpAddr::V4(Ipv4Addr::from(u32::try_from(x).unwrap_or(u32::MAX)))
            }
        };
        self.spans
            .iter()
            .map(|(lo, hi)| {
                if lo == hi {
                    ip(*lo).to_string()
                } else {
                    format!("{}-{}", ip(*lo), ip(*hi))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn a_block_minus_its_excepts() {
        let mut r = Ranges::new(false);
        r.add_block(
            &net("10.0.0.0/24"),
            &[net("10.0.0.0/26"), net("10.0.0.128/32"), net("fd00::/64")],
        );
        assert_eq!(
            r.elements(),
            ["10.0.0.64-10.0.0.127", "10.0.0.129-10.0.0.255"]
        );
        assert!(r.contains("10.0.0.200".parse().unwrap()));
        assert!(!r.contains("10.0.0.128".parse().unwrap()));
        assert!(!r.contains("10.0.0.5".parse().unwrap()));
        // Overlapping and adjacent blocks merge; what one block excepts
        // another may include.
        r.add_block(&net("10.0.0.0/25"), &[]);
        r.add_block(&net("10.0.1.0/24"), &[]);
        assert_eq!(
            r.elements(),
            ["10.0.0.0-10.0.0.127", "10.0.0.129-10.0.1.255"]
        );
        r.add_block(&net("10.0.0.128/32"), &[]);
        assert_eq!(r.elements(), ["10.0.0.0-10.0.1.255"]);
        let mut all = Ranges::new(true);
        all.add_block(&net("::/0"), &[net("fd00::/8")]);
        assert_eq!(
            all.elements(),
            [
                "::-fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "fe00::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            ]
        );
        let mut host = Ranges::new(false);
        host.add_block(&net("10.9.9.9/32"), &[]);
        assert_eq!(host.elements(), ["10.9.9.9"]);
    }
}
