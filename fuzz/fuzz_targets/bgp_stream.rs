//! A byte stream as the peer reader sees it: framing with `frame_len`
//! across arbitrary chunk boundaries, then decoding each frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use margay_bgp::packet::{Ctx, Message, frame_len};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let ctx = Ctx::default();
    while let Ok(Some(n)) = frame_len(rest) {
        if rest.len() < n {
            break;
        }
        let _ = Message::decode(&rest[..n], &ctx);
        rest = &rest[n..];
    }
});
