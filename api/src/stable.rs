//! Names and formats that must not change between Margay versions or
//! between nodes: one FNV-1a hash (pod host interface names, VTEP MACs,
//! IPAM's spread of block choices) and the text form of MAC addresses.
//! An agent upgraded in place finds its pods' interfaces by these names,
//! and nodes of different versions read each other's annotations.

/// `head + body + tail` as an object name (at most 253 characters): when
/// longer, `body` is cut (at a character boundary, trailing `.` and `-`
/// dropped) and followed by `-` and its FNV-1a in hex, so two long bodies
/// still give two names.
pub fn bounded_name(head: &str, body: &str, tail: &str) -> String {
    const MAX: usize = 253;
    if head.len() + body.len() + tail.len() <= MAX {
        return format!("{head}{body}{tail}");
    }
    let room = MAX.saturating_sub(head.len() + tail.len() + 17);
    let cut = body
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|i| *i <= room)
        .last()
        .unwrap_or(0);
    format!(
        "{head}{}-{:016x}{tail}",
        body[..cut].trim_end_matches(['.', '-']),
        fnv1a(body.as_bytes())
    )
}

/// 64-bit FNV-1a of `bytes`: stable across builds, platforms and versions.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    <[u8; 6]>::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_values() {
        // Pinned: changing these renames every pod's host interface.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"default.web-0"), fnv1a(b"default.web-0"));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let m = [0xee, 0, 1, 0xab, 0xcd, 0xff];
        assert_eq!(mac_string(&m), "ee:00:01:ab:cd:ff");
        assert_eq!(parse_mac("ee:00:01:ab:cd:ff"), Some(m));
        assert_eq!(parse_mac("zz"), None);
        assert_eq!(parse_mac("ee:00:01:ab:cd"), None);
    }
}
