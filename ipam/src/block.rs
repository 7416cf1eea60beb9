//! Carving a pool into blocks.

use ipnetwork::IpNetwork;

use crate::{Error, Result};

/// Default block prefix length for IPv4 pools (a /26: 64 addresses).
pub const DEFAULT_BLOCK_V4: u8 = 26;
/// Default block prefix length for IPv6 pools (a /122: 64 addresses).
pub const DEFAULT_BLOCK_V6: u8 = 122;

/// Checks `size` against the pool's family and prefix and returns it, or the
/// family default when `None`.
pub fn block_size(pool: IpNetwork, size: Option<u8>) -> Result<u8> {
    let (family, default, min, max) = match pool {
        IpNetwork::V4(_) => ("IPv4", DEFAULT_BLOCK_V4, 20, 32),
        IpNetwork::V6(_) => ("IPv6", DEFAULT_BLOCK_V6, 116, 128),
    };
    let size = size.unwrap_or(default);
    if size < min || size > max || size < pool.prefix() {
        return Err(Error::InvalidBlockSize {
            cidr: pool.to_string(),
            family,
            size,
            min: min.max(pool.prefix()),
            max,
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let v4: IpNetwork = "10.244.0.0/16".parse().unwrap();
        let v6: IpNetwork = "fd00:244::/64".parse().unwrap();
        assert_eq!(block_size(v4, None), Ok(26));
        assert_eq!(block_size(v6, None), Ok(122));
        assert!(block_size(v4, Some(19)).is_err());
        assert!(block_size(v4, Some(33)).is_err());
        assert!(block_size("10.0.0.0/28".parse().unwrap(), Some(26)).is_err());
    }
}
