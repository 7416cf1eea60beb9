//! Arbitrary text as a `margay-bgp` configuration: an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = margay_bgp::config::Config::from_toml(text);
    }
});
