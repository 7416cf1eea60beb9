//! The speaker as a route reflector, in-process over loopback: what a
//! burst from one client becomes at another that reads slowly (the
//! per-member queue, the shared UPDATE buffers and the vectored writer
//! between them); how its sessions end when it is stopped or dropped.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use margay_bgp::config::Config;
use margay_bgp::packet::{Attrs, Ctx, Message, Open, Prefix, UpdateBuilder, frame_len};
use margay_bgp::speaker::Speaker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ASN: u32 = 64512;
const CTX: Ctx = Ctx {
    four_octet_as: true,
    ibgp: true,
};
/// Only a hang guard: the test fails by its assertions, long before this.
const GUARD: Duration = Duration::from_secs(120);

fn prefix(i: u32) -> Prefix {
    Prefix::new(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)), 32).unwrap()
}

/// A client session: connected from `src`, OPEN sent, Established.
async fn client(src: Ipv4Addr, rr: SocketAddr, rcvbuf: Option<u32>) -> (TcpStream, Vec<u8>) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).unwrap();
    let mut s = sock.connect(rr).await.unwrap();
    let open = Message::Open(Open::ipv4_unicast(ASN, 240, src));
    s.write_all(&open.encode(&CTX)).await.unwrap();
    let mut buf = Vec::new();
    loop {
        match next(&mut s, &mut buf).await {
            Message::Open(_) => s.write_all(&Message::Keepalive.encode(&CTX)).await.unwrap(),
            Message::Keepalive => return (s, buf),
            m => panic!("before Established: {m:?}"),
        }
    }
}

/// A speaker on a free loopback port accepting any 127/8 client (with
/// `range`'s further settings); where it listens.
async fn reflector(range: &str) -> (Speaker, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = Config::from_toml(&format!(
        "asn = {ASN}\nrouter_id = \"127.0.0.1\"\nfib = false\nlisten = \"127.0.0.1:{port}\"\n\
         [[listen_range]]\nprefix = \"127.0.0.0/8\"\nasn = {ASN}\n{range}"
    ))
    .unwrap();
    let speaker = Speaker::start(cfg).await.unwrap();
    (speaker, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The next message on `s`, read a few bytes at a time (a slow reader).
async fn next(s: &mut TcpStream, buf: &mut Vec<u8>) -> Message {
    loop {
        if let Some(n) = frame_len(buf).unwrap()
            && buf.len() >= n
        {
            let m = Message::decode(&buf[..n], &CTX).unwrap();
            buf.drain(..n);
            return m;
        }
        let mut chunk = [0u8; 61];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the reflector closed the session");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn announce(src: Ipv4Addr, med: u32, ps: &[Prefix]) -> Vec<u8> {
    let a = Attrs {
        next_hop: Some(IpAddr::V4(src)),
        local_pref: Some(100),
        med: Some(med),
        ..Attrs::default()
    };
    UpdateBuilder::announce(&a, ps, None, &CTX)
        .unwrap()
        .concat()
}

/// One client announces and withdraws the same prefixes over and over in
/// a burst while another reads nothing; then it reads slowly. Every
/// prefix's announcements reach it in the order sent (its MED never goes
/// back), the withdrawals after them stay after them, nothing is lost:
/// it ends with exactly the sender's final table, and a route announced
/// after the burst comes after all of it.
#[tokio::test]
async fn a_burst_of_announcements_and_withdrawals_reaches_a_slow_client_in_order() {
    let (speaker, rr) = reflector("route_reflector_client = true\nhold_time = 240\n").await;
    let (sender, reader) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let (mut tx, _) = client(sender, rr, None).await;
    // A small receive window: what the reflector sends waits on its side.
    let (mut rx, mut rbuf) = client(reader, rr, Some(4096)).await;

    const ROUNDS: u32 = 400;
    const N: u32 = 40;
    let all: Vec<Prefix> = (0..N).map(prefix).collect();
    for round in 1..=ROUNDS {
        // Every prefix announced with MED = round, then half withdrawn.
        let mut burst = announce(sender, round, &all);
        let gone = if round.is_multiple_of(2) {
            &all[..N as usize / 2]
        } else {
            &all[N as usize / 2..]
        };
        burst.extend(UpdateBuilder::withdraw(gone, &CTX).concat());
        tx.write_all(&burst).await.unwrap();
    }
    // The sender's final table: the half not withdrawn in the last round
    // (an even one: the first half went).
    const { assert!(ROUNDS.is_multiple_of(2)) };
    let want: BTreeMap<Prefix, u32> = all[N as usize / 2..].iter().map(|p| (*p, ROUNDS)).collect();

    let deadline = tokio::time::Instant::now() + GUARD;
    let mut have: BTreeMap<Prefix, u32> = BTreeMap::new();
    let mut last_med: BTreeMap<Prefix, u32> = BTreeMap::new();
    let mut marker_sent = false;
    let marker = prefix(10_000);
    let seen_marker = loop {
        let m = tokio::time::timeout_at(deadline, next(&mut rx, &mut rbuf))
            .await
            .unwrap_or_else(|_| panic!("hang guard: the reader holds {have:?}"));
        let Message::Update(u) = m else { continue };
        for p in &u.withdrawn {
            have.remove(p);
        }
        for p in &u.nlri {
            let med = u.attrs.as_ref().and_then(|a| a.med).unwrap();
            if *p == marker {
                assert_eq!(have, want, "everything before the marker, in order");
                continue;
            }
            let last = last_med.entry(*p).or_insert(0);
            assert!(med >= *last, "{p}: MED {med} after {last}: reordered");
            *last = med;
            have.insert(*p, med);
        }
        if u.nlri.contains(&marker) {
            break true;
        }
        if have == want && !marker_sent {
            // Announced after the burst was reflected in full: it must
            // come after everything else.
            tx.write_all(&announce(sender, 1, &[marker])).await.unwrap();
            marker_sent = true;
        }
    };
    assert!(seen_marker);
    speaker.shutdown().await;
}

/// Every message the speaker sends on `s` until it closes the connection.
async fn until_closed(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        while let Some(n) = frame_len(buf).unwrap()
            && buf.len() >= n
        {
            got.push(Message::decode(&buf[..n], &CTX).unwrap());
            buf.drain(..n);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A speaker dropped (its program exiting, say for an upgrade) closes its
/// sessions without a NOTIFICATION, so peers keep its routes under graceful
/// restart; one stopped says Cease. Each a few times over: the drop races
/// the tasks it aborts.
#[tokio::test]
async fn a_dropped_speaker_closes_its_sessions_without_cease() {
    for round in 0..10u8 {
        for stop_first in [false, true] {
            let (speaker, rr) = reflector("").await;
            let src = Ipv4Addr::new(127, 0, 4, 1 + round);
            let (mut s, mut buf) = tokio::time::timeout(GUARD, client(src, rr, None))
                .await
                .unwrap();
            if stop_first {
                speaker.stop();
                speaker.stopped().await;
            }
            drop(speaker);
            let got = tokio::time::timeout(GUARD, until_closed(&mut s, &mut buf))
                .await
                .unwrap();
            let ceased = got.iter().any(|m| matches!(m, Message::Notification(_)));
            assert_eq!(
                ceased, stop_first,
                "round {round}, stopped first: {stop_first}: {got:?}"
            );
        }
    }
}
