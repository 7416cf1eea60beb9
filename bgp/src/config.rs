//! The TOML configuration of `margay-bgp` (also what the agent builds in
//! memory). Unknown keys are errors, and [`Config::validate`] names the
//! offending entry, so a typo never silently disables a peer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::packet::Prefix;
use crate::{Error, Result};

fn yes() -> bool {
    true
}

/// Why a neighbor's settings are refused (its message names the setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NeighborInvalid {
    /// AS 0 is reserved.
    #[error("asn must not be 0")]
    AsnZero,
    /// A hold time of 1 or 2 seconds.
    #[error("hold_time must be 0 or at least 3")]
    HoldTime,
    /// A keepalive over a third of the hold time.
    #[error("keepalive must be at most hold_time/3")]
    Keepalive,
    /// An empty password, or one over 80 bytes.
    #[error("password must be 1 to 80 characters")]
    Password,
    /// A graceful-restart time over 12 bits.
    #[error("restart_time must be at most 4095 seconds")]
    RestartTime,
    /// A GTSM hop count outside 1..=254.
    #[error("ttl_security must be 1 to 254 hops")]
    TtlSecurity,
    /// A route-reflector client in another AS.
    #[error("route_reflector_client needs an iBGP peer")]
    ReflectorClientNotIbgp,
    /// BFD intervals outside 10 ms to 60 s, or a multiplier of 0.
    #[error("bfd: min_tx_ms and min_rx_ms must be 10 to 60000, multiplier 1 to 255")]
    Bfd,
}

/// Checks one neighbor's settings (`local_as`: ours).
pub fn validate_neighbor(n: &Neighbor, local_as: u32) -> std::result::Result<(), NeighborInvalid> {
    if n.asn == 0 {
        return Err(NeighborInvalid::AsnZero);
    }
    if n.hold_time == 1 || n.hold_time == 2 {
        return Err(NeighborInvalid::HoldTime);
    }
    if n.keepalive
        .is_some_and(|k| n.hold_time > 0 && k > n.hold_time / 3)
    {
        return Err(NeighborInvalid::Keepalive);
    }
    if n.password
        .as_ref()
        .is_some_and(|p| p.is_empty() || p.len() > 80)
    {
        return Err(NeighborInvalid::Password);
    }
    if n.restart_time.is_some_and(|t| t > 4095) {
        return Err(NeighborInvalid::RestartTime);
    }
    if n.ttl_security.is_some_and(|h| h == 0 || h > 254) {
        return Err(NeighborInvalid::TtlSecurity);
    }
    if n.route_reflector_client && n.asn != local_as {
        return Err(NeighborInvalid::ReflectorClientNotIbgp);
    }
    if let Some(b) = &n.bfd {
        let ms = 10..=60_000;
        if !ms.contains(&b.min_tx_ms) || !ms.contains(&b.min_rx_ms) || b.multiplier == 0 {
            return Err(NeighborInvalid::Bfd);
        }
    }
    Ok(())
}

/// Top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our AS number.
    pub asn: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// Where to accept connections (default `0.0.0.0:179` and `[::]:179`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Install best routes into the kernel.
    #[serde(default = "yes")]
    pub fib: bool,
    /// Say in the graceful restart capability that forwarding state
    /// survives our restart even though `fib` is off (the program
    /// embedding the speaker keeps the kernel routes itself).
    #[serde(default)]
    pub forwarding_preserved: bool,
    /// Route reflector cluster id (default: the router id).
    #[serde(default)]
    pub cluster_id: Option<Ipv4Addr>,
    /// Accept only prefixes inside these (default: everything).
    #[serde(default)]
    pub import_prefixes: Vec<Prefix>,
    /// Communities (`ASN:VALUE`) added to everything we export.
    #[serde(default)]
    pub communities: Vec<String>,
    /// Restart time announced in our graceful restart capability (seconds).
    #[serde(default = "default_restart_time")]
    pub restart_time: u16,
    /// Control socket for `margay-bgp show` (default /run/margay-bgp.sock).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Configured neighbors.
    #[serde(default, rename = "neighbor")]
    pub neighbors: Vec<Neighbor>,
    /// Ranges from which unknown peers may connect (dynamic neighbors).
    #[serde(default, rename = "listen_range")]
    pub listen_ranges: Vec<ListenRange>,
    /// Prefixes we originate.
    #[serde(default, rename = "originate")]
    pub originate: Vec<Originate>,
}

fn default_restart_time() -> u16 {
    120
}

fn default_hold() -> u16 {
    90
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    /// Peer address.
    pub address: IpAddr,
    /// Peer AS.
    pub asn: u32,
    /// TCP port to connect to.
    #[serde(default = "default_port")]
    pub port: u16,
    /// TCP MD5 password (RFC 2385).
    #[serde(default)]
    pub password: Option<String>,
    /// Never initiate the connection.
    #[serde(default)]
    pub passive: bool,
    /// Reflect routes to this peer (RFC 4456).
    #[serde(default)]
    pub route_reflector_client: bool,
    /// Proposed hold time.
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    /// Keepalive interval (default hold/3).
    #[serde(default)]
    pub keepalive: Option<u16>,
    /// Announce graceful restart.
    #[serde(default = "yes")]
    pub graceful_restart: bool,
    /// Restart time announced to this peer (default: the global one).
    #[serde(default)]
    pub restart_time: Option<u16>,
    /// Close the session when the peer sends more prefixes than this.
    #[serde(default)]
    pub max_prefixes: Option<usize>,
    /// Set ourselves as next hop on iBGP exports.
    #[serde(default)]
    pub next_hop_self: bool,
    /// Advertise to this peer only the prefixes we originate (a node
    /// telling its top-of-rack router about its own blocks, not the ones
    /// it learned from the other nodes).
    #[serde(default)]
    pub export_local_only: bool,
    /// GTSM (RFC 5082): the peer is at most this many hops away; we send
    /// with TTL 255 and drop packets with a lower TTL than 255 - hops.
    #[serde(default)]
    pub ttl_security: Option<u8>,
    /// BFD with this peer (`[neighbor.bfd]`): a peer that stops answering
    /// is down within `min_rx_ms` × `multiplier`, its session closed
    /// (Cease, BFD down) and its routes withdrawn. The peer must be on a
    /// directly connected link (RFC 5881, single hop).
    #[serde(default)]
    pub bfd: Option<BfdSettings>,
}

/// A neighbor's BFD settings (defaults: 300 ms × 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BfdSettings {
    /// Desired Min TX Interval once Up, in milliseconds.
    #[serde(default = "bfd_ms")]
    pub min_tx_ms: u32,
    /// Required Min RX Interval, in milliseconds.
    #[serde(default = "bfd_ms")]
    pub min_rx_ms: u32,
    /// Detect Mult.
    #[serde(default = "bfd_mult")]
    pub multiplier: u8,
}

fn bfd_ms() -> u32 {
    300
}

fn bfd_mult() -> u8 {
    3
}

impl Default for BfdSettings {
    fn default() -> Self {
        Self {
            min_tx_ms: bfd_ms(),
            min_rx_ms: bfd_ms(),
            multiplier: bfd_mult(),
        }
    }
}

impl BfdSettings {
    /// As the BFD session takes them.
    pub fn params(&self) -> crate::bfd::Params {
        crate::bfd::Params {
            min_tx: std::time::Duration::from_millis(self.min_tx_ms.into()),
            min_rx: std::time::Duration::from_millis(self.min_rx_ms.into()),
            multiplier: self.multiplier,
        }
    }
}

fn default_port() -> u16 {
    179
}

impl Neighbor {
    /// A neighbor with every setting at its default (as if only `address`
    /// and `asn` were written in the TOML file).
    pub fn new(address: IpAddr, asn: u32) -> Self {
        Self {
            address,
            asn,
            port: default_port(),
            password: None,
            passive: false,
            route_reflector_client: false,
            hold_time: default_hold(),
            keepalive: None,
            graceful_restart: true,
            restart_time: None,
            max_prefixes: None,
            next_hop_self: false,
            export_local_only: false,
            ttl_security: None,
            bfd: None,
        }
    }

    /// Equal but for BFD: a change of BFD alone keeps the BGP session.
    pub fn same_session(&self, other: &Neighbor) -> bool {
        let strip = |n: &Neighbor| Neighbor {
            bfd: None,
            ..n.clone()
        };
        strip(self) == strip(other)
    }
}

/// A range of addresses allowed to peer without per-peer configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenRange {
    /// The range.
    pub prefix: Prefix,
    /// AS the peers must have.
    pub asn: u32,
    /// Reflect routes to them.
    #[serde(default)]
    pub route_reflector_client: bool,
    /// Proposed hold time.
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    /// Announce graceful restart.
    #[serde(default = "yes")]
    pub graceful_restart: bool,
}

/// A prefix we originate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Originate {
    /// The prefix.
    pub prefix: Prefix,
}

impl Config {
    /// A configuration with no peers and every setting at its default.
    pub fn new(asn: u32, router_id: Ipv4Addr) -> Self {
        Self {
            asn,
            router_id,
            listen: None,
            fib: true,
            forwarding_preserved: false,
            cluster_id: None,
            import_prefixes: Vec::new(),
            communities: Vec::new(),
            restart_time: default_restart_time(),
            control_socket: None,
            neighbors: Vec::new(),
            listen_ranges: Vec::new(),
            originate: Vec::new(),
        }
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.asn == 0 {
            return bad("asn must not be 0".into());
        }
        if self.router_id.is_unspecified() {
            return bad("router_id must not be 0.0.0.0".into());
        }
        for (i, n) in self.neighbors.iter().enumerate() {
            let at = format!("neighbor[{i}] ({})", n.address);
            if let Err(m) = validate_neighbor(n, self.asn) {
                return bad(format!("{at}: {m}"));
            }
            if self.neighbors[..i].iter().any(|m| m.address == n.address) {
                return bad(format!("{at}: duplicate neighbor"));
            }
        }
        for (i, r) in self.listen_ranges.iter().enumerate() {
            if r.asn == 0 {
                return bad(format!(
                    "listen_range[{i}] ({}): asn must not be 0",
                    r.prefix
                ));
            }
        }
        for c in &self.communities {
            parse_community(c)?;
        }
        Ok(())
    }

    /// The export communities as 32-bit values.
    pub fn community_values(&self) -> Vec<u32> {
        self.communities
            .iter()
            .filter_map(|c| parse_community(c).ok())
            .collect()
    }
}

/// Parses `ASN:VALUE` (each 16 bits) into a community.
pub fn parse_community(s: &str) -> Result<u32> {
    margay_api::community::parse(s).map_err(|e| Error::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c = Config::from_toml(
            r#"
asn = 64512
router_id = "10.99.0.1"
listen = "10.99.0.1:179"
fib = false
communities = ["64512:100"]
[[neighbor]]
address = "10.99.0.254"
asn = 65000
password = "s3cret"
hold_time = 9
[neighbor.bfd]
min_rx_ms = 100
[[neighbor]]
address = "fd00:99::2"
asn = 64512
passive = true
route_reflector_client = true
[[listen_range]]
prefix = "10.99.0.0/24"
asn = 64512
route_reflector_client = true
[[originate]]
prefix = "10.244.1.0/26"
"#,
        )
        .unwrap();
        assert_eq!(c.neighbors.len(), 2);
        assert!(!c.fib);
        assert_eq!(c.community_values(), vec![(64512 << 16) | 100]);
        assert_eq!(c.originate[0].prefix.to_string(), "10.244.1.0/26");
        assert!(c.neighbors[0].graceful_restart);
        let bfd = BfdSettings {
            min_rx_ms: 100,
            ..BfdSettings::default()
        };
        assert_eq!(c.neighbors[0].bfd, Some(bfd));
        assert_eq!(c.neighbors[1].bfd, None);
        // BFD alone changed: the same BGP session.
        let mut n = c.neighbors[0].clone();
        n.bfd = None;
        assert!(n.same_session(&c.neighbors[0]));
        n.hold_time = 30;
        assert!(!n.same_session(&c.neighbors[0]));
    }

    #[test]
    fn rejects_bad_input_with_a_clear_message() {
        let base = "asn = 64512\nrouter_id = \"10.0.0.1\"\n";
        for (extra, want) in [
            (
                "[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\nhold_time = 2\n",
                "hold_time",
            ),
            (
                "[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\nbogus = 1\n",
                "unknown field",
            ),
            (
                "[[neighbor]]\naddress = \"10.0.0.300\"\nasn = 1\n",
                "address",
            ),
            (
                "[[originate]]\nprefix = \"10.0.0.0/33\"\n",
                "invalid prefix",
            ),
            ("communities = [\"1:2:3\"]\n", "community"),
            (
                "[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\n[neighbor.bfd]\nmultiplier = 0\n",
                "bfd",
            ),
            (
                "[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\n[neighbor.bfd]\nmin_tx_ms = 5\n",
                "bfd",
            ),
            (
                "[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\n[neighbor.bfd]\nmin_tx = 5\n",
                "unknown field",
            ),
            (
                "[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\nroute_reflector_client = true\n",
                "iBGP",
            ),
        ] {
            let e = Config::from_toml(&format!("{base}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra:?} gave {e}");
        }
        assert!(Config::from_toml("asn = 0\nrouter_id = \"1.1.1.1\"").is_err());
    }
}
