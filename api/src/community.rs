//! BGP communities as operators write them: `ASN:VALUE`, each half 16 bits
//! (RFC 1997).

/// A community that does not parse (what was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid community {0:?}: expected ASN:VALUE (16 bits each)")]
pub struct CommunityInvalid(pub String);

/// Parses `ASN:VALUE` into the 32-bit community.
pub fn parse(s: &str) -> Result<u32, CommunityInvalid> {
    let err = || CommunityInvalid(s.to_string());
    let (a, v) = s.split_once(':').ok_or_else(err)?;
    let a: u16 = a.parse().map_err(|_| err())?;
    let v: u16 = v.parse().map_err(|_| err())?;
    Ok((u32::from(a) << 16) | u32::from(v))
}

#[cfg(test)]
mod tests {
    #[test]
    fn communities() {
        assert_eq!(super::parse("64512:100"), Ok((64512 << 16) | 100));
        assert!(
            super::parse("64512")
                .unwrap_err()
                .to_string()
                .contains("ASN:VALUE")
        );
        assert!(super::parse("70000:1").is_err());
        assert!(super::parse("1:x").is_err());
    }
}
