//! Byte-vector tests of the wire codec, and RFC 7606 behaviour.

use std::net::{IpAddr, Ipv4Addr};

use margay_bgp::packet::consts::{AFI_IPV4, AFI_IPV6, SAFI_UNICAST, err};
use margay_bgp::packet::{
    AsPath, Attrs, Capability, Ctx, GracefulRestartCap, Message, Notification, Open, Origin,
    Prefix, Update, UpdateBuilder, frame_len,
};

const IBGP: Ctx = Ctx {
    four_octet_as: true,
    ibgp: true,
};
const EBGP: Ctx = Ctx {
    four_octet_as: true,
    ibgp: false,
};

fn hdr(len: u16, typ: u8) -> Vec<u8> {
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&len.to_be_bytes());
    v.push(typ);
    v
}

fn update_bytes(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let len = 19 + 2 + withdrawn.len() + 2 + attrs.len() + nlri.len();
    let mut v = hdr(len as u16, 2);
    v.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    v.extend_from_slice(withdrawn);
    v.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    v.extend_from_slice(attrs);
    v.extend_from_slice(nlri);
    v
}

fn decode_update(b: &[u8], ctx: &Ctx) -> Update {
    match Message::decode(b, ctx).expect("decodes") {
        Message::Update(u) => u,
        m => panic!("not an update: {m:?}"),
    }
}

// ORIGIN IGP, AS_PATH [65001], NEXT_HOP 10.0.0.1
/// The prefixes UPDATEs `msgs` carry, `count` of each decoded.
fn carried(msgs: &[Vec<u8>], count: impl Fn(&Update) -> usize) -> usize {
    msgs.iter().map(|m| count(&decode_update(m, &IBGP))).sum()
}

const BASIC_ATTRS: &[u8] = &[
    0x40, 1, 1, 0, //
    0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9, //
    0x40, 3, 4, 10, 0, 0, 1,
];

#[test]
fn keepalive_is_19_octets() {
    let b = Message::Keepalive.encode(&IBGP);
    assert_eq!(b, hdr(19, 4));
    assert_eq!(Message::decode(&b, &IBGP).unwrap(), Message::Keepalive);
}

#[test]
fn open_round_trips_byte_for_byte() {
    let open = Open {
        asn: 4_200_000_000,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 99, 0, 1),
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(4_200_000_000),
            Capability::GracefulRestart(GracefulRestartCap {
                restarting: true,
                notification: false,
                restart_time: 120,
                families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
            }),
        ],
    };
    let b = Message::Open(open.clone()).encode(&IBGP);
    let mut want = hdr(0, 1);
    want.extend_from_slice(&[4, 0x5b, 0xa0, 0, 90, 10, 99, 0, 1]); // AS_TRANS 23456
    let params: Vec<u8> = [
        vec![2, 6, 1, 4, 0, 1, 0, 1],
        vec![2, 2, 2, 0],
        vec![2, 6, 65, 4, 0xfa, 0x56, 0xea, 0x00],
        vec![2, 8, 64, 6, 0x80, 120, 0, 1, 1, 0x80],
    ]
    .concat();
    want.push(params.len() as u8);
    want.extend_from_slice(&params);
    let l = want.len() as u16;
    want[16..18].copy_from_slice(&l.to_be_bytes());
    assert_eq!(b, want);
    assert_eq!(Message::decode(&b, &IBGP).unwrap(), Message::Open(open));
}

#[test]
fn unknown_capabilities_are_tolerated() {
    // FRR's extended message (6), add-path (69), hostname (73), LLGR (71).
    let params: Vec<u8> = [
        vec![2, 2, 6, 0],
        vec![2, 6, 69, 4, 0, 1, 1, 1],
        vec![2, 7, 73, 5, 3, b'f', b'r', b'r', 0],
        vec![2, 2, 71, 0],
        vec![2, 6, 65, 4, 0, 0, 0xfd, 0xe8],
    ]
    .concat();
    let mut b = hdr(0, 1);
    b.extend_from_slice(&[4, 0xfd, 0xe8, 0, 9, 1, 1, 1, 1, params.len() as u8]);
    b.extend_from_slice(&params);
    let l = b.len() as u16;
    b[16..18].copy_from_slice(&l.to_be_bytes());
    let Message::Open(o) = Message::decode(&b, &IBGP).unwrap() else {
        panic!()
    };
    assert_eq!(o.asn, 65000);
    assert_eq!(o.capabilities.len(), 5);
    assert!(matches!(
        o.capabilities[2],
        Capability::Unknown { code: 73, .. }
    ));
}

#[test]
fn open_errors_map_to_open_notifications() {
    let mut b = hdr(29, 1);
    b.extend_from_slice(&[3, 0xfd, 0xe8, 0, 90, 1, 1, 1, 1, 0]);
    let e = Message::decode(&b, &IBGP).unwrap_err();
    assert_eq!(
        (e.code, e.subcode, e.data.clone()),
        (err::OPEN, err::OPEN_BAD_VERSION, vec![0, 4])
    );
    b[19] = 4;
    b[22..24].copy_from_slice(&[0, 2]); // hold time 2
    let e = Message::decode(&b, &IBGP).unwrap_err();
    assert_eq!((e.code, e.subcode), (err::OPEN, err::OPEN_BAD_HOLD_TIME));
}

#[test]
fn header_errors() {
    let mut b = hdr(19, 4);
    b[3] = 0;
    assert_eq!(frame_len(&b).unwrap_err().subcode, err::HEADER_NOT_SYNC);
    let e = frame_len(&hdr(20, 4)).unwrap_err();
    assert_eq!(
        (e.subcode, e.data.clone()),
        (err::HEADER_BAD_LENGTH, vec![0, 20])
    );
    assert_eq!(
        frame_len(&hdr(19, 9)).unwrap_err().subcode,
        err::HEADER_BAD_TYPE
    );
    assert_eq!(
        frame_len(&hdr(4097, 2)).unwrap_err().subcode,
        err::HEADER_BAD_LENGTH
    );
    assert_eq!(frame_len(&hdr(19, 4)[..10]).unwrap(), None);
}

#[test]
fn update_decodes_and_reencodes() {
    let b = update_bytes(
        &[24, 10, 1, 2],
        BASIC_ATTRS,
        &[26, 10, 244, 1, 64, 32, 10, 244, 1, 1],
    );
    let u = decode_update(&b, &EBGP);
    assert_eq!(u.withdrawn, vec!["10.1.2.0/24".parse::<Prefix>().unwrap()]);
    assert_eq!(u.nlri.len(), 2);
    let a = u.attrs.as_ref().unwrap();
    assert_eq!(a.as_path, AsPath::sequence(vec![65001]));
    assert_eq!(a.next_hop, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    assert_eq!(Message::Update(u).encode(&EBGP), b);
}

#[test]
fn end_of_rib_markers() {
    let v4 = Message::Update(Update::end_of_rib(AFI_IPV4, SAFI_UNICAST)).encode(&IBGP);
    assert_eq!(v4, update_bytes(&[], &[], &[]));
    let v6 = Message::Update(Update::end_of_rib(AFI_IPV6, SAFI_UNICAST)).encode(&IBGP);
    assert_eq!(v6, update_bytes(&[], &[0x80, 15, 3, 0, 2, 1], &[]));
    assert_eq!(decode_update(&v4, &IBGP).is_end_of_rib(), Some((1, 1)));
    assert_eq!(decode_update(&v6, &IBGP).is_end_of_rib(), Some((2, 1)));
}

#[test]
fn malformed_origin_is_treat_as_withdraw() {
    let mut a = BASIC_ATTRS.to_vec();
    a[3] = 7;
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    assert!(u.treat_as_withdraw.is_some());
    assert!(u.nlri.is_empty() && u.attrs.is_none());
    assert_eq!(u.withdrawn, vec!["10.0.0.0/24".parse::<Prefix>().unwrap()]);
}

#[test]
fn missing_next_hop_is_treat_as_withdraw() {
    let u = decode_update(
        &update_bytes(&[], &BASIC_ATTRS[..13], &[24, 10, 0, 0]),
        &EBGP,
    );
    assert!(u.treat_as_withdraw.unwrap().contains("NEXT_HOP"));
}

#[test]
fn missing_local_pref_on_ibgp_is_treat_as_withdraw() {
    let u = decode_update(&update_bytes(&[], BASIC_ATTRS, &[24, 10, 0, 0]), &IBGP);
    assert!(u.treat_as_withdraw.unwrap().contains("LOCAL_PREF"));
}

#[test]
fn bad_attribute_flags_are_treat_as_withdraw() {
    let mut a = BASIC_ATTRS.to_vec();
    a[0] = 0xc0; // ORIGIN marked optional
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    assert!(u.treat_as_withdraw.unwrap().contains("flags"));
}

#[test]
fn attribute_overrun_is_treat_as_withdraw() {
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&[0x80, 4, 9, 0, 0]); // MED claiming 9 octets
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    assert!(u.treat_as_withdraw.unwrap().contains("overruns"));
}

#[test]
fn atomic_aggregate_with_data_is_discarded() {
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&[0x40, 6, 1, 0]);
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    assert!(u.treat_as_withdraw.is_none());
    assert_eq!(u.discarded, vec![6]);
    assert!(!u.attrs.unwrap().atomic_aggregate);
}

#[test]
fn local_pref_from_ebgp_is_discarded() {
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&[0x40, 5, 4, 0, 0, 0, 200]);
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    assert_eq!(u.attrs.unwrap().local_pref, None);
    assert_eq!(u.discarded, vec![5]);
}

#[test]
fn duplicate_attribute_keeps_the_first() {
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&[0x40, 1, 1, 2]);
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    assert_eq!(u.attrs.unwrap().origin, Origin::Igp);
}

#[test]
fn duplicate_mp_reach_resets_the_session() {
    let mp = [0x80, 14, 9, 0, 1, 1, 4, 10, 0, 0, 1, 0];
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&mp);
    a.extend_from_slice(&mp);
    let e = Message::decode(&update_bytes(&[], &a, &[]), &EBGP).unwrap_err();
    assert_eq!(
        (e.code, e.subcode),
        (err::UPDATE, err::UPDATE_MALFORMED_ATTR_LIST)
    );
}

#[test]
fn unknown_well_known_attribute_is_an_error_with_the_attribute_as_data() {
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&[0x40, 99, 1, 5]);
    let e = Message::decode(&update_bytes(&[], &a, &[]), &EBGP).unwrap_err();
    assert_eq!(
        (e.code, e.subcode),
        (err::UPDATE, err::UPDATE_UNRECOGNIZED_WELL_KNOWN)
    );
    assert_eq!(e.data, vec![0x40, 99, 1, 5]);
}

#[test]
fn unknown_optional_transitive_is_passed_on_with_partial() {
    let mut a = BASIC_ATTRS.to_vec();
    a.extend_from_slice(&[0xc0, 99, 2, 7, 7]);
    let u = decode_update(&update_bytes(&[], &a, &[24, 10, 0, 0]), &EBGP);
    let attrs = u.attrs.clone().unwrap();
    assert_eq!(attrs.unknown.len(), 1);
    let out = Message::Update(u).encode(&EBGP);
    assert!(out.windows(5).any(|w| w == [0xe0, 99, 2, 7, 7]));
    // Optional non-transitive unknowns are dropped.
    let mut b = BASIC_ATTRS.to_vec();
    b.extend_from_slice(&[0x80, 98, 1, 1]);
    let u = decode_update(&update_bytes(&[], &b, &[24, 10, 0, 0]), &EBGP);
    assert!(u.attrs.unwrap().unknown.is_empty());
}

#[test]
fn bad_nlri_is_invalid_network_field() {
    let e =
        Message::decode(&update_bytes(&[], BASIC_ATTRS, &[33, 1, 2, 3, 4, 5]), &EBGP).unwrap_err();
    assert_eq!(
        (e.code, e.subcode),
        (err::UPDATE, err::UPDATE_INVALID_NETWORK)
    );
}

#[test]
fn two_octet_peer_gets_as_trans_and_as4_path() {
    let ctx = Ctx {
        four_octet_as: false,
        ibgp: false,
    };
    let attrs = Attrs {
        as_path: AsPath::sequence(vec![4_200_000_001, 65001]),
        next_hop: Some("10.0.0.1".parse().unwrap()),
        ..Default::default()
    };
    let u = Update {
        attrs: Some(attrs.clone()),
        nlri: vec!["10.9.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let b = Message::Update(u).encode(&ctx);
    let back = decode_update(&b, &ctx);
    assert_eq!(back.attrs.unwrap().as_path, attrs.as_path);
}

#[test]
fn ipv6_mp_reach_round_trips() {
    let attrs = Attrs {
        next_hop: Some("fd00:99::1".parse().unwrap()),
        origin: Origin::Igp,
        local_pref: Some(100),
        ..Default::default()
    };
    let p: Vec<Prefix> = vec!["fd00:244::/122".parse().unwrap()];
    let msgs = UpdateBuilder::announce(&attrs, &p, None, &IBGP).unwrap();
    assert_eq!(msgs.len(), 1);
    let u = decode_update(&msgs[0], &IBGP);
    let mp = u.mp_reach.unwrap();
    assert_eq!(mp.nlri, p);
    assert_eq!(mp.next_hop, vec!["fd00:99::1".parse::<IpAddr>().unwrap()]);
}

#[test]
fn attributes_too_big_for_one_update_are_refused_and_big_ones_still_fit() {
    let prefixes: Vec<Prefix> = (0..3000u32)
        .map(|i| Prefix::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap())
        .collect();
    let with = |n: u32| Attrs {
        next_hop: Some("10.0.0.1".parse().unwrap()),
        local_pref: Some(100),
        communities: (0..n).collect(),
        ..Default::default()
    };
    // 1020 communities (4080 octets) leave no room for a prefix.
    let e = match UpdateBuilder::announce(&with(1020), &prefixes, None, &IBGP) {
        Err(e) => e,
        Ok(m) => panic!("{} messages, the first of {} octets", m.len(), m[0].len()),
    };
    assert!(e > 4096, "{e}");
    // 1000: one or two prefixes per message, every one within 4096, every
    // prefix carried.
    let msgs = UpdateBuilder::announce(&with(1000), &prefixes, None, &IBGP).unwrap();
    assert!(msgs.iter().all(|m| m.len() <= 4096));
    assert_eq!(carried(&msgs, |u| u.nlri.len()), 3000);
}

#[test]
fn builder_packs_under_4096_octets() {
    let attrs = Attrs {
        next_hop: Some("10.0.0.1".parse().unwrap()),
        local_pref: Some(100),
        ..Default::default()
    };
    let prefixes: Vec<Prefix> = (0..5000u32)
        .map(|i| Prefix::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap())
        .collect();
    let msgs = UpdateBuilder::announce(&attrs, &prefixes, None, &IBGP).unwrap();
    assert!(msgs.iter().all(|m| m.len() <= 4096));
    assert_eq!(carried(&msgs, |u| u.nlri.len()), 5000);
    assert!(msgs.len() <= 5, "{} messages", msgs.len());
    let w = UpdateBuilder::withdraw(&prefixes, &IBGP);
    assert_eq!(carried(&w, |u| u.withdrawn.len()), 5000);
}

#[test]
fn notification_round_trips() {
    let n = Notification {
        code: 6,
        subcode: 2,
        data: vec![1, 2],
    };
    let b = Message::Notification(n.clone()).encode(&IBGP);
    assert_eq!(
        Message::decode(&b, &IBGP).unwrap(),
        Message::Notification(n.clone())
    );
    assert!(n.describe().contains("administrative shutdown"));
}

/// Found by fuzzing: unused flag bits of an unknown attribute must not be
/// passed on (they are zero when sent).
#[test]
fn unused_flag_bits_of_unknown_attributes_are_cleared() {
    let u = decode_update(&update_bytes(&[], &[0xc6, 0, 0], &[]), &IBGP);
    assert_eq!(u.attrs.as_ref().unwrap().unknown[0].flags, 0xc0);
    let out = Message::Update(u).encode(&IBGP);
    assert!(out.ends_with(&[0xe0, 0, 0]), "{out:02x?}");
}

/// A NOTIFICATION whose data echoes a large attribute is cut to fit in
/// 4096 octets (found by the bgp_session fuzz target).
#[test]
fn a_notification_with_large_data_fits_in_4096_octets() {
    use margay_bgp::packet::Ctx;
    use margay_bgp::packet::message::{Message, Notification};
    let n = Notification {
        code: 3,
        subcode: 5,
        data: vec![0xab; 70_000],
    };
    let b = Message::Notification(n).encode(&Ctx::default());
    assert_eq!(b.len(), 4096);
    assert_eq!(u16::from_be_bytes([b[16], b[17]]), 4096);
    assert_eq!((b[18], b[19], b[20], b[4095]), (3, 3, 5, 0xab));
}
