//! Differential tests against an independent implementation, the
//! `netgauze-bgp-pkt` crate: messages we generate and encode must parse
//! there without error and re-encode byte for byte, and what it re-encodes
//! must decode here to the message we started from.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use margay_bgp::packet::consts::{AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use margay_bgp::packet::{
    AsPath, Attrs, Capability, Ctx, GracefulRestartCap, Message, MpReach, MpUnreach, Notification,
    Open, Origin, Prefix, RouteRefresh, Segment, SegmentKind, Update,
};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_parse_utils::{WritablePdu, reader::SliceReader, traits::ParseFromWithOneInput};

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// A random unicast IPv4 address (netgauze also wants identifiers unicast,
/// stricter than RFC 6286).
fn unicast_v4(r: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::from(((1 + r.below(223) as u32) << 24) | (r.next() as u32 & 0x00ff_ffff))
}

/// A random unicast prefix (netgauze, rightly, refuses multicast networks
/// in unicast NLRI).
fn prefix(r: &mut Rng, v6: bool) -> Prefix {
    if v6 {
        let len = r.below(129) as u8;
        let a = ((r.next() as u128) << 64) | r.next() as u128;
        let a = a & !(0xff << 120) | (0x20 << 120); // 2000::/8, global unicast
        Prefix::new(IpAddr::V6(Ipv6Addr::from(a)), len).unwrap()
    } else {
        let len = 8 + r.below(25) as u8;
        let first = 1 + r.below(223) as u32; // 1.0.0.0 - 223.255.255.255
        let a = (first << 24) | (r.next() as u32 & 0x00ff_ffff);
        Prefix::new(IpAddr::V4(Ipv4Addr::from(a)), len).unwrap()
    }
}

fn prefixes(r: &mut Rng, v6: bool, max: u64) -> Vec<Prefix> {
    let mut v: Vec<Prefix> = (0..r.below(max)).map(|_| prefix(r, v6)).collect();
    v.dedup();
    v
}

fn attrs(r: &mut Rng, ibgp: bool) -> Attrs {
    let mut segments = Vec::new();
    for _ in 0..r.below(3) {
        let kind = if r.chance(80) {
            SegmentKind::Sequence
        } else {
            SegmentKind::Set
        };
        let asns = (0..1 + r.below(6)).map(|_| r.next() as u32).collect();
        segments.push(Segment { kind, asns });
    }
    Attrs {
        origin: [Origin::Igp, Origin::Egp, Origin::Incomplete][r.below(3) as usize],
        as_path: AsPath { segments },
        next_hop: Some(IpAddr::V4(Ipv4Addr::new(10, r.below(250) as u8 + 1, 0, 1))),
        med: r.chance(50).then(|| r.next() as u32),
        local_pref: ibgp.then(|| r.next() as u32),
        atomic_aggregate: r.chance(20),
        aggregator: r.chance(20).then(|| (r.next() as u32, unicast_v4(r))),
        communities: (0..r.below(4)).map(|_| r.next() as u32).collect(),
        originator_id: (ibgp && r.chance(30)).then(|| unicast_v4(r)),
        cluster_list: if ibgp {
            (0..r.below(3)).map(|_| unicast_v4(r)).collect()
        } else {
            Vec::new()
        },
        unknown: Vec::new(),
    }
}

fn update(r: &mut Rng, ctx: &Ctx) -> Update {
    match r.below(4) {
        // IPv4 announce (+ withdrawals)
        0 => {
            let nlri = prefixes(r, false, 40);
            Update {
                withdrawn: prefixes(r, false, 10),
                attrs: (!nlri.is_empty()).then(|| attrs(r, ctx.ibgp)),
                nlri,
                ..Default::default()
            }
        }
        // IPv6 announce
        1 => {
            let mut a = attrs(r, ctx.ibgp);
            a.next_hop = None;
            let mut next_hop = vec![IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1))];
            if r.chance(50) {
                next_hop.push(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)));
            }
            Update {
                attrs: Some(a),
                mp_reach: Some(MpReach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    next_hop,
                    nlri: {
                        let mut p = prefixes(r, true, 30);
                        if p.is_empty() {
                            p.push(prefix(r, true));
                        }
                        p
                    },
                }),
                ..Default::default()
            }
        }
        // IPv6 withdraw / End-of-RIB
        2 => Update {
            mp_unreach: Some(MpUnreach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                withdrawn: prefixes(r, true, 30),
            }),
            ..Default::default()
        },
        // IPv4 withdraw only / End-of-RIB
        _ => Update {
            withdrawn: prefixes(r, false, 50),
            ..Default::default()
        },
    }
}

fn open(r: &mut Rng) -> Open {
    let asn = r.next() as u32 | 1;
    let mut capabilities = vec![Capability::Multiprotocol {
        afi: AFI_IPV4,
        safi: SAFI_UNICAST,
    }];
    if r.chance(50) {
        capabilities.push(Capability::Multiprotocol {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
        });
    }
    if r.chance(70) {
        capabilities.push(Capability::RouteRefresh);
    }
    capabilities.push(Capability::FourOctetAs(asn));
    if r.chance(60) {
        capabilities.push(Capability::GracefulRestart(GracefulRestartCap {
            restarting: r.chance(50),
            notification: false,
            restart_time: r.below(4096) as u16,
            families: vec![(AFI_IPV4, SAFI_UNICAST, r.chance(50))],
        }));
    }
    Open {
        asn,
        hold_time: [0, 3, 9, 90, 180, 65535][r.below(6) as usize],
        router_id: unicast_v4(r),
        capabilities,
    }
}

fn message(r: &mut Rng, ctx: &Ctx) -> Message {
    match r.below(10) {
        0 => Message::Open(open(r)),
        1 => Message::Keepalive,
        2 => Message::Notification({
            // Defined code/subcode pairs (netgauze refuses unknown ones).
            const PAIRS: &[(u8, u8)] = &[
                (1, 1),
                (1, 2),
                (1, 3),
                (2, 1),
                (2, 2),
                (2, 3),
                (2, 4),
                (2, 6),
                (2, 7),
                (3, 1),
                (3, 2),
                (3, 3),
                (3, 4),
                (3, 5),
                (3, 6),
                (3, 8),
                (3, 9),
                (3, 10),
                (3, 11),
                (4, 0),
                (5, 0),
                (6, 1),
                (6, 2),
                (6, 3),
                (6, 4),
                (6, 5),
                (6, 6),
                (6, 7),
                (6, 8),
            ];
            let (code, subcode) = PAIRS[r.below(PAIRS.len() as u64) as usize];
            Notification {
                code,
                subcode,
                data: (0..r.below(8)).map(|_| r.next() as u8).collect(),
            }
        }),
        3 => Message::RouteRefresh(RouteRefresh {
            afi: if r.chance(50) { AFI_IPV4 } else { AFI_IPV6 },
            safi: SAFI_UNICAST,
        }),
        _ => Message::Update(update(r, ctx)),
    }
}

fn netgauze_round_trip(bytes: &[u8]) -> Vec<u8> {
    let mut ctx = BgpParsingContext::default();
    let mut reader = SliceReader::new(bytes);
    let parsed = BgpMessage::parse(&mut reader, &mut ctx)
        .unwrap_or_else(|e| panic!("netgauze rejects our encoding: {e}\n{bytes:02x?}"));
    let errors = ctx.reset_parsing_errors();
    assert!(
        errors.path_attr_errors().is_empty(),
        "netgauze found attribute errors: {errors:?}\n{bytes:02x?}"
    );
    let mut out = Vec::new();
    parsed.write(&mut out).expect("netgauze writes");
    out
}

#[test]
fn our_encoding_is_accepted_and_reproduced_by_netgauze() {
    for seed in 1..=3000u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let ctx = Ctx {
            four_octet_as: true,
            ibgp: r.chance(50),
        };
        let msg = message(&mut r, &ctx);
        let ours = msg.encode(&ctx);
        assert!(ours.len() <= 4096, "seed {seed}: {} octets", ours.len());
        let theirs = netgauze_round_trip(&ours);
        assert_eq!(theirs, ours, "seed {seed}: {msg:?}");
        let back = Message::decode(&theirs, &ctx).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let mut want = msg.clone();
        if let Message::Update(u) = &mut want {
            // We never keep empty segments or duplicates; nothing else changes.
            u.discarded.clear();
        }
        assert_eq!(back, want, "seed {seed}");
    }
}
