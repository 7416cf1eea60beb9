//! A policy rule line ([`Line`]) as nftables expressions for netlink
//! (pure): the bytecode `nft` generates for the same text (`meta`,
//! `payload`, `cmp`, `bitwise`, `lookup`, `ct`, `immediate`), so that
//! `nft list` prints a rule made here exactly as one `nft -f` made (the
//! kernel test compares both). Registers: `1` (16 bytes) for a match;
//! a named port's `address . protocol . port` in consecutive 32-bit
//! registers from `1`, as nft lays out a concatenation.

use ipnetwork::IpNetwork;
use margay_policy::Proto;
use margay_policy::model::Direction;
use margay_policy::ruleset::{ALLOW_MARK, Field, L4Match, Line, PeerMatch};

use crate::attrs::{Attrs, addr_bytes, attr, cstr, nested, verdict};
use crate::sys::{NF_DROP, NFT_GOTO, NFT_JUMP, NFTA_DATA_VALUE, NFTA_LIST_ELEM};

const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
/// The first 32-bit register (the same storage as [`REG_1`]'s first word).
const REG32_00: u32 = 8;

const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;

const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;

const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;

const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;

const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
/// `ct state invalid`'s bit.
const NF_CT_STATE_INVALID_BIT: u32 = 1;

const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_RETURN: i32 = -5;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The protocol's number.
pub(crate) fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

/// A rule's expression list, built one expression at a time.
#[derive(Default)]
struct Exprs(Attrs);

impl Exprs {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Attrs)) {
        nested(&mut self.0, NFTA_LIST_ELEM, |b| {
            attr(b, NFTA_EXPR_NAME, &cstr(name));
            nested(b, NFTA_EXPR_DATA, body);
        });
    }

    fn meta_load(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            attr(b, NFTA_META_KEY, &key.to_be_bytes());
            attr(b, NFTA_META_DREG, &dreg.to_be_bytes());
        });
    }

    fn meta_set(&mut self, key: u32) {
        self.expr("meta", |b| {
            attr(b, NFTA_META_KEY, &key.to_be_bytes());
            attr(b, NFTA_META_SREG, &REG_1.to_be_bytes());
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: usize, dreg: u32) {
        self.expr("payload", |b| {
            attr(b, NFTA_PAYLOAD_DREG, &dreg.to_be_bytes());
            attr(b, NFTA_PAYLOAD_BASE, &base.to_be_bytes());
            attr(b, NFTA_PAYLOAD_OFFSET, &offset.to_be_bytes());
            attr(b, NFTA_PAYLOAD_LEN, &(len as u32).to_be_bytes());
        });
    }

    /// Register 1 compared with `data` (as long as `data`).
    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            attr(b, NFTA_CMP_SREG, &REG_1.to_be_bytes());
            attr(b, NFTA_CMP_OP, &op.to_be_bytes());
            nested(b, NFTA_CMP_DATA, |b| attr(b, NFTA_DATA_VALUE, data));
        });
    }

    /// Register 1 = (register 1 & mask) ^ xor.
    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |b| {
            attr(b, NFTA_BITWISE_SREG, &REG_1.to_be_bytes());
            attr(b, NFTA_BITWISE_DREG, &REG_1.to_be_bytes());
            attr(b, NFTA_BITWISE_LEN, &(mask.len() as u32).to_be_bytes());
            nested(b, NFTA_BITWISE_MASK, |b| attr(b, NFTA_DATA_VALUE, mask));
            nested(b, NFTA_BITWISE_XOR, |b| attr(b, NFTA_DATA_VALUE, xor));
        });
    }

    fn lookup(&mut self, set: &str) {
        self.expr("lookup", |b| {
            attr(b, NFTA_LOOKUP_SET, &cstr(set));
            attr(b, NFTA_LOOKUP_SREG, &REG_1.to_be_bytes());
        });
    }

    fn verdict(&mut self, code: i32, chain: Option<&str>) {
        self.expr("immediate", |b| {
            attr(b, NFTA_IMMEDIATE_DREG, &REG_VERDICT.to_be_bytes());
            nested(b, NFTA_IMMEDIATE_DATA, |b| verdict(b, code, chain));
        });
    }

    /// The packet's mark, its `ALLOW_MARK` bit cleared, `xor` added.
    fn mark_set(&mut self, xor: u32) {
        self.meta_load(NFT_META_MARK, REG_1);
        self.bitwise(&(!ALLOW_MARK).to_ne_bytes(), &xor.to_ne_bytes());
        self.meta_set(NFT_META_MARK);
    }

    /// `ip saddr CIDR` (`==`) or `ip saddr != CIDR`, as nft makes it: a
    /// prefix on a byte boundary loads and compares only the bytes it
    /// covers; any other (a /0 too) loads the whole address and masks it.
    fn prefix(&mut self, field: Field, cidr: &IpNetwork, op: u32) {
        let net = addr_bytes(&cidr.network());
        let plen = usize::from(cidr.prefix());
        let off = offset(field, cidr.is_ipv6());
        if plen % 8 == 0 && plen > 0 {
            let n = plen / 8;
            self.payload(NFT_PAYLOAD_NETWORK_HEADER, off, n, REG_1);
            self.cmp(op, &net[..n]);
            return;
        }
        self.payload(NFT_PAYLOAD_NETWORK_HEADER, off, net.len(), REG_1);
        let mask: Vec<u8> = (0..net.len())
            .map(|i| match plen.saturating_sub(8 * i) {
                0 => 0,
                b if b >= 8 => 0xff,
                b => 0xffu8 << (8 - b),
            })
            .collect();
        let data: Vec<u8> = net.iter().zip(&mask).map(|(d, m)| d & m).collect();
        self.bitwise(&mask, &vec![0; net.len()]);
        self.cmp(op, &data);
    }

    /// `oifname @SET` (ingress) or `iifname @SET` (egress).
    fn iface(&mut self, dir: Direction, set: &str) {
        let key = match dir {
            Direction::Ingress => NFT_META_OIFNAME,
            Direction::Egress => NFT_META_IIFNAME,
        };
        self.meta_load(key, REG_1);
        self.lookup(set);
    }

    /// `meta l4proto P`.
    fn l4proto(&mut self, p: Proto) {
        self.meta_load(NFT_META_L4PROTO, REG_1);
        self.cmp(NFT_CMP_EQ, &[proto_number(p)]);
    }

    /// A line's matches: the family its matches need (`ip`/`ip6`
    /// implies one check), its peer, its port.
    fn matches(&mut self, v6: Option<bool>, peer: Option<&PeerMatch>, port: Option<&L4Match>) {
        // One family check for the line (what `ip`/`ip6` implies).
        if let Some(v6) = v6 {
            self.meta_load(NFT_META_NFPROTO, REG_1);
            self.cmp(NFT_CMP_EQ, &[if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]);
        }
        match peer {
            None => {}
            Some(PeerMatch::Set { v6, field, set }) => {
                let off = offset(*field, *v6);
                self.payload(NFT_PAYLOAD_NETWORK_HEADER, off, addr_len(*v6), REG_1);
                self.lookup(set);
            }
            Some(PeerMatch::Block {
                field,
                cidr,
                except,
            }) => {
                self.prefix(*field, cidr, NFT_CMP_EQ);
                for x in except {
                    self.prefix(*field, x, NFT_CMP_NEQ);
                }
            }
        }
        match port {
            None => {}
            Some(L4Match::Proto(p)) => self.l4proto(*p),
            Some(L4Match::Ports { proto, first, last }) => {
                self.l4proto(*proto);
                self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, REG_1);
                if first == last {
                    self.cmp(NFT_CMP_EQ, &first.to_be_bytes());
                } else {
                    self.cmp(NFT_CMP_GTE, &first.to_be_bytes());
                    self.cmp(NFT_CMP_LTE, &last.to_be_bytes());
                }
            }
            Some(L4Match::Named { v6, set }) => {
                // address . protocol . port, each in its own 32-bit
                // register(s), from register 1.
                let words = (addr_len(*v6) / 4) as u32;
                let off = offset(Field::Daddr, *v6);
                self.payload(NFT_PAYLOAD_NETWORK_HEADER, off, addr_len(*v6), REG_1);
                self.meta_load(NFT_META_L4PROTO, REG32_00 + words);
                self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, REG32_00 + words + 1);
                self.lookup(set);
            }
        }
    }
}

/// Where the address is in the network header.
fn offset(field: Field, v6: bool) -> u32 {
    match (v6, field) {
        (false, Field::Saddr) => 12,
        (false, Field::Daddr) => 16,
        (true, Field::Saddr) => 8,
        (true, Field::Daddr) => 24,
    }
}

fn addr_len(v6: bool) -> usize {
    if v6 { 16 } else { 4 }
}

/// The contents of `NFTA_RULE_EXPRESSIONS` for `line` (spoiled, if an
/// attribute would be too long: see [`Attrs`]).
pub(crate) fn expressions(line: &Line) -> Attrs {
    let mut e = Exprs::default();
    match line {
        Line::DropInvalid => {
            e.expr("ct", |b| {
                attr(b, NFTA_CT_KEY, &NFT_CT_STATE.to_be_bytes());
                attr(b, NFTA_CT_DREG, &REG_1.to_be_bytes());
            });
            e.bitwise(&NF_CT_STATE_INVALID_BIT.to_ne_bytes(), &[0; 4]);
            e.cmp(NFT_CMP_NEQ, &[0; 4]);
            e.verdict(NF_DROP, None);
        }
        Line::ClearMark => e.mark_set(0),
        Line::Jump(chain) => e.verdict(NFT_JUMP, Some(chain)),
        Line::Dispatch { dir, set, chain } => {
            e.iface(*dir, set);
            e.verdict(NFT_GOTO, Some(chain));
        }
        Line::Quarantine { dir, set } => {
            e.iface(*dir, set);
            e.verdict(NF_DROP, None);
        }
        Line::DropUnmarked => {
            e.meta_load(NFT_META_MARK, REG_1);
            e.bitwise(&ALLOW_MARK.to_ne_bytes(), &[0; 4]);
            e.cmp(NFT_CMP_EQ, &[0; 4]);
            e.verdict(NF_DROP, None);
        }
        Line::Allow { peer, port } => {
            e.matches(line.v6(), peer.as_ref(), port.as_ref());
            e.mark_set(ALLOW_MARK);
            e.verdict(NFT_RETURN, None);
        }
        Line::JumpIf { peer, port, chain } => {
            e.matches(line.v6(), peer.as_ref(), port.as_ref());
            e.verdict(NFT_JUMP, Some(chain));
        }
        Line::ReturnIf { peer } => {
            e.matches(line.v6(), Some(peer), None);
            e.verdict(NFT_RETURN, None);
        }
    }
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expression names, in order.
    fn names(mut b: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            // LIST_ELEM { NAME "..." ...}
            let inner = &b[4..len];
            let nlen = u16::from_ne_bytes([inner[0], inner[1]]) as usize;
            let name = &inner[4..nlen];
            out.push(String::from_utf8_lossy(&name[..name.len() - 1]).into_owned());
            b = &b[len.next_multiple_of(4).min(b.len())..];
        }
        out
    }

    fn bytes(line: &Line) -> Vec<u8> {
        expressions(line).finish().unwrap()
    }

    #[test]
    fn lines_are_the_expressions_nft_makes() {
        assert_eq!(
            names(&bytes(&Line::DropInvalid)),
            ["ct", "bitwise", "cmp", "immediate"]
        );
        assert_eq!(names(&bytes(&Line::ClearMark)), ["meta", "bitwise", "meta"]);
        let named = Line::Allow {
            peer: Some(PeerMatch::Block {
                field: Field::Saddr,
                cidr: "10.0.0.0/12".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()],
            }),
            port: Some(L4Match::Named {
                v6: false,
                set: "port/1.n4".into(),
            }),
        };
        assert_eq!(
            names(&bytes(&named)),
            [
                // meta nfproto ipv4
                "meta",
                "cmp",
                // ip saddr 10.0.0.0/12: the address, masked
                "payload",
                "bitwise",
                "cmp",
                // ip saddr != 10.1.0.0/16: two bytes
                "payload",
                "cmp",
                // ip daddr . meta l4proto . th dport @set
                "payload",
                "meta",
                "payload",
                "lookup",
                // meta mark set meta mark | ALLOW return
                "meta",
                "bitwise",
                "meta",
                "immediate",
            ]
        );
    }
}
