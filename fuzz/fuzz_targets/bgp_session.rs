//! The speaker's whole input path, as one peer's bytes reach it: framing,
//! decoding under the context the session negotiated, the session FSM
//! (OPEN checks, capabilities, NOTIFICATIONs), each UPDATE into the RIB
//! (`Rib::apply_update`, the speaker's own code: import, loop checks, best
//! path), and the re-export of every change to a route-reflector client
//! and an eBGP peer. Whatever the peer sends: no panic, nothing we send is
//! over 4096 octets, every UPDATE we build decodes, and a route whose
//! attributes cannot fit is refused as too big (to be withdrawn), never
//! sent. The first input byte picks iBGP or eBGP for the fuzzed peer.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use margay_bgp::fsm::{Action, Event, Session, SessionConfig, State};
use margay_bgp::packet::{Ctx, Message, Prefix, UpdateBuilder, frame_len};
use margay_bgp::rib::{Best, PeerId, PeerInfo, Rib};

const LOCAL_AS: u32 = 64512;
const SRC: PeerId = 1;
const CLIENT: PeerId = 2;
const EXTERNAL: PeerId = 3;

fn info(addr: [u8; 4], asn: u32, rr_client: bool) -> PeerInfo {
    PeerInfo {
        addr: IpAddr::V4(addr.into()),
        asn,
        router_id: addr.into(),
        ibgp: asn == LOCAL_AS,
        rr_client,
    }
}

fn export(rib: &Rib, changes: &[(Prefix, Option<Best>)]) {
    for (id, to) in [
        (CLIENT, info([10, 0, 0, 3], LOCAL_AS, true)),
        (EXTERNAL, info([10, 0, 0, 4], 65002, false)),
    ] {
        let ctx = Ctx {
            four_octet_as: true,
            ibgp: to.ibgp,
        };
        for (p, best) in changes {
            let nh = if p.is_v4() {
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
            } else {
                IpAddr::V6("fd00::1".parse().unwrap())
            };
            let out = rib.export(
                &to,
                id,
                best.as_ref().map(|b| &b.best),
                Some(nh),
                false,
                &[],
            );
            let Some(a) = out.filter(|a| a.next_hop.is_some()) else {
                continue;
            };
            match UpdateBuilder::announce(&a, &[*p], None, &ctx) {
                Ok(ms) => {
                    for m in ms {
                        assert!(m.len() <= 4096, "an UPDATE of {} octets", m.len());
                        Message::decode(&m, &ctx).expect("our own UPDATE decodes");
                    }
                }
                Err(size) => assert!(size > 4096, "refused an UPDATE of {size} octets"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let peer_as = if pick & 1 == 0 { LOCAL_AS } else { 65001 };
    let mut s = Session::new(SessionConfig {
        local_as: LOCAL_AS,
        peer_as,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        hold_time: 9,
        keepalive: None,
        passive: false,
        families: vec![(1, 1), (2, 1)],
        graceful_restart: None,
        retry_base: Duration::from_secs(1),
        retry_max: Duration::from_secs(60),
    });
    let mut rib = Rib::new(LOCAL_AS, Ipv4Addr::new(10, 0, 0, 1), None);
    rib.add_peer(CLIENT, info([10, 0, 0, 3], LOCAL_AS, true));
    rib.add_peer(EXTERNAL, info([10, 0, 0, 4], 65002, false));
    s.process(Event::Start);
    let mut events = vec![Event::TcpUp];
    loop {
        for ev in events.drain(..) {
            for a in s.process(ev) {
                let ctx = s.negotiated().map(|n| n.ctx).unwrap_or_default();
                match a {
                    Action::Send(m) => assert!(m.encode(&ctx).len() <= 4096),
                    Action::Up(n) => rib.add_peer(
                        SRC,
                        PeerInfo {
                            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                            asn: peer_as,
                            router_id: n.peer_open.router_id,
                            ibgp: peer_as == LOCAL_AS,
                            rr_client: pick & 2 != 0,
                        },
                    ),
                    Action::Update(u) => {
                        let c = rib.apply_update(SRC, u, ctx.ibgp, peer_as);
                        export(&rib, &c);
                    }
                    Action::Down(_) => {
                        let c = rib.peer_down(SRC, false);
                        export(&rib, &c);
                    }
                    _ => {}
                }
            }
        }
        if s.state() == State::Idle {
            return;
        }
        let ctx = s.negotiated().map(|n| n.ctx).unwrap_or_default();
        match frame_len(rest) {
            Ok(Some(n)) if rest.len() >= n => {
                let ev = match Message::decode(&rest[..n], &ctx) {
                    Ok(m) => Event::Message(m),
                    Err(e) => Event::BadMessage(e),
                };
                rest = &rest[n..];
                events.push(ev);
            }
            Ok(_) => return,
            Err(e) => {
                events.push(Event::BadMessage(e));
                rest = &[];
            }
        }
    }
});
