//! Any bytes through `Control::decode`: a packet or a reason, never a
//! panic; what decodes re-encodes to the same packet; and a stream of
//! datagrams (split on 0xfe) drives one session without panicking,
//! its state always one the machine can reach from what it received.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use margay_bgp::bfd::session::{Params, Session};
use margay_bgp::bfd::{Control, State};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Control::decode(data) {
        assert_eq!(Control::decode(&c.encode()), Ok(c), "round trip");
    }
    let t0 = Instant::now();
    let mut s = Session::new(Params::default(), 1, t0);
    let mut now = t0;
    for (i, d) in data.split(|&b| b == 0xfe).enumerate() {
        now += Duration::from_millis(u64::from(d.first().copied().unwrap_or(0)) * 10);
        if let Ok(c) = Control::decode(d) {
            let before = s.state();
            if let Some(ch) = s.receive(&c, now) {
                assert_eq!(ch.from, before);
                assert_ne!(ch.from, ch.to);
            }
        }
        if let Some(ch) = s.tick(now) {
            assert_eq!(ch.to, State::Down);
        }
        let p = s.packet();
        assert!(!(p.poll && p.fin), "never Poll and Final in one packet");
        assert_eq!(Control::decode(&p.encode()).map(|c| c.my_discr), Ok(1));
        s.sent(now, (i % 10) as f64 / 10.0);
    }
});
