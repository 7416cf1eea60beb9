//! Passive neighbors as a large full mesh has them (every node with a
//! higher address dials): waiting without a task each, and a session all
//! the same when one connects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use margay_api::status::SessionState;
use margay_bgp::config::{Config, Neighbor};
use margay_bgp::packet::{Ctx, Message, Open, frame_len};
use margay_bgp::speaker::Speaker;
use margay_harness::wait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ASN: u32 = 64512;
const CTX: Ctx = Ctx {
    four_octet_as: true,
    ibgp: true,
};
/// Only a hang guard.
const GUARD: Duration = Duration::from_secs(60);
const PEERS: u32 = 500;

fn peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 3, 0, 0)) + i + 1)
}

#[tokio::test]
async fn passive_neighbors_cost_no_task_until_they_connect() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = Config::from_toml(&format!(
        "asn = {ASN}\nrouter_id = \"127.0.0.1\"\nfib = false\nlisten = \"127.0.0.1:{port}\"\n"
    ))
    .unwrap();
    let speaker = Speaker::start(cfg).await.unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let list: Vec<Neighbor> = (0..PEERS)
        .map(|i| Neighbor {
            passive: true,
            ..Neighbor::new(IpAddr::V4(peer(i)), ASN)
        })
        .collect();
    speaker.set_neighbors(list).await.unwrap();
    let views = speaker.neighbors();
    assert_eq!(views.len(), PEERS as usize);
    assert!(
        views.iter().all(|v| v.state == SessionState::Active),
        "waiting, as their FSM would"
    );
    let grown = metrics.num_alive_tasks().saturating_sub(before);
    assert!(
        grown < 10,
        "{grown} tasks for {PEERS} passive neighbors nobody dialled"
    );

    // One of them dials: its session comes up like any other.
    let src = peer(7);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).unwrap();
    let mut s = tokio::time::timeout(
        GUARD,
        sock.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .unwrap()
    .unwrap();
    let open = Message::Open(Open::ipv4_unicast(ASN, 90, src));
    s.write_all(&open.encode(&CTX)).await.unwrap();
    let mut buf = Vec::new();
    let mut up = false;
    while !up {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(GUARD, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the speaker closed the session");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = frame_len(&buf).unwrap()
            && buf.len() >= len
        {
            match Message::decode(&buf[..len], &CTX).unwrap() {
                Message::Open(_) => s.write_all(&Message::Keepalive.encode(&CTX)).await.unwrap(),
                Message::Keepalive => up = true,
                m => panic!("before Established: {m:?}"),
            }
            buf.drain(..len);
        }
    }
    let every = Duration::from_millis(20);
    wait::until_async("the dialing neighbor Established", GUARD, every, || async {
        let v = speaker.neighbors();
        let me = v.iter().find(|v| v.address == IpAddr::V4(src)).unwrap();
        if me.state == SessionState::Established {
            return Ok(Some(()));
        }
        Err(format!("{me:?}").into())
    })
    .await
    .unwrap();
    let others = speaker.neighbors();
    assert_eq!(
        others
            .iter()
            .filter(|v| v.state == SessionState::Active)
            .count(),
        PEERS as usize - 1
    );
}
