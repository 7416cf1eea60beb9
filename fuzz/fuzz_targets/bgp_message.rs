//! Any bytes through `Message::decode`, under every session context: it
//! must return a message or a NOTIFICATION-mapped error, never panic; and
//! what decodes must re-encode and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use margay_bgp::packet::{Ctx, Message};

fuzz_target!(|data: &[u8]| {
    for four_octet_as in [true, false] {
        for ibgp in [true, false] {
            let ctx = Ctx {
                four_octet_as,
                ibgp,
            };
            if let Ok(m) = Message::decode(data, &ctx) {
                let again = m.encode(&ctx);
                if again.len() <= 4096 {
                    let m2 = Message::decode(&again, &ctx).expect("our own encoding decodes");
                    if let (Message::Update(a), Message::Update(b)) = (&m, &m2) {
                        // Treat-as-withdraw already applied: the result is
                        // stable, except that unknown attributes we pass on
                        // carry the partial bit (RFC 4271 §5) and NEXT_HOP is
                        // only sent with IPv4 NLRI (RFC 4760 §3).
                        let partial = |u: &margay_bgp::packet::Update| {
                            u.attrs.clone().map(|mut a| {
                                for x in &mut a.unknown {
                                    x.flags |= 0x20;
                                }
                                if u.nlri.is_empty() {
                                    a.next_hop = None;
                                }
                                a
                            })
                        };
                        assert_eq!(a.nlri, b.nlri);
                        assert_eq!(partial(a), partial(b));
                    }
                }
            }
        }
    }
});
