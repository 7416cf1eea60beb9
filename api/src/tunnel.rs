//! The tunnels' kernel objects as Margay names them on every node: what
//! operators' tooling and the tests find (the agent's
//! `dataplane::ownership` says what else it owns).

/// The VXLAN device.
pub const VXLAN_DEV: &str = "margay.vxlan";
/// Its VNI (Calico's).
pub const VXLAN_VNI: u32 = 4096;
/// Its UDP port (IANA's).
pub const VXLAN_PORT: u16 = 4789;
/// The tunnel filter's nftables table (family and name): encapsulated
/// packets are taken from the cluster's nodes only.
pub const NFT_TUNNEL_TABLE: &str = "inet margay_tunnel";
/// [`NFT_TUNNEL_TABLE`]'s name within its family (`inet`).
pub const TUNNEL_TABLE_NAME: &str = "margay_tunnel";
