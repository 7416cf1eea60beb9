//! The BGP custom resources in `margay.dev/v1`: the cluster-wide
//! [`BGPConfiguration`] (singleton `default`) and [`BGPPeer`]s, as Rust
//! types (the CRD YAML in `deploy/crds/` is generated from them), and
//! their validation (what OpenAPI cannot say), reported by the agent as a
//! status condition on the object.

#![allow(clippy::duplicated_attributes)] // repeated `type_ = ...` in printcolumn(...) lists

use std::net::IpAddr;

use crate::condition::Condition;
use crate::ipam::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Name of the singleton [`BGPConfiguration`].
pub const BGP_CONFIG_NAME: &str = "default";
/// The cluster AS when none is configured (Calico's).
pub const DEFAULT_ASN: u32 = 64512;

/// Cluster-wide BGP settings.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "BGPConfiguration",
    plural = "bgpconfigurations",
    status = "BGPStatus",
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(
        name = "Mesh",
        type_ = "boolean",
        json_path = ".spec.nodeToNodeMeshEnabled"
    ),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BGPConfigurationSpec {
    /// The nodes' AS number (default 64512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub as_number: Option<u32>,
    /// Every node peers with every other node (default true). Turn it off
    /// when route reflectors are configured with [`BGPPeer`]s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    /// TCP port the nodes listen on and connect to each other on (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: Option<u16>,
    /// Further prefixes every node advertises (e.g. the service cluster IP
    /// range), as CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_advertisements: Vec<String>,
    /// Communities (`ASN:VALUE`) added to every route the nodes advertise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// Graceful restart time the nodes announce, in seconds (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4095))]
    pub restart_time_seconds: Option<u16>,
}

/// What the agent found wrong with a BGP object (`Valid` condition).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPStatus {
    /// `Valid`: `True`, or `False` with the reason in the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A BGP peering: an external router for some nodes, or (with
/// `peerSelector`) node-to-node sessions, e.g. to route reflectors.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "BGPPeer",
    plural = "bgppeers",
    status = "BGPStatus",
    printcolumn(name = "Peer", type_ = "string", json_path = ".spec.peerIP"),
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    /// The peer's address (an external router). Exactly one of `peerIP`
    /// and `peerSelector`.
    #[serde(default, rename = "peerIP", skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    /// The peer's AS (required with `peerIP`; node peers use the cluster AS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub as_number: Option<u32>,
    /// Only this node peers (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes with these labels peer (all nodes when neither `node`
    /// nor `nodeSelector` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Node-to-node peering: the selected nodes peer with the nodes these
    /// labels select (in both directions). Nodes with the annotation
    /// `margay.dev/route-reflector-cluster-id` reflect for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<LabelSelector>,
    /// TCP MD5 password, from a Secret in the agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretKeyRef>,
    /// Keepalive interval in seconds (default hold/3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time_seconds: Option<u16>,
    /// Hold time in seconds (default 90; 0 or at least 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_seconds: Option<u16>,
    /// Graceful restart time announced to this peer, in seconds (default:
    /// the BGPConfiguration's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4095))]
    pub restart_time_seconds: Option<u16>,
    /// Announce graceful restart to this peer (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart: Option<bool>,
    /// Close the session (Cease, retried 30 s later) when the peer sends
    /// more prefixes inside the pools than this. Default for a router
    /// (`peerIP`): 100000; for node-to-node peerings: no limit. 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<u32>,
    /// TCP port of the peer (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// GTSM: the peer is at most this many hops away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 254))]
    pub ttl_security_hops: Option<u8>,
    /// BFD with this peer (RFC 5880/5881, single hop, asynchronous mode):
    /// a peer that stops answering is found within `minRxIntervalMs` ×
    /// `detectMultiplier` (default 300 ms × 3), its BGP session closed
    /// (Cease, BFD down) and its routes withdrawn, instead of after the
    /// hold time. Only for peers on a directly connected link. `{}`: on,
    /// with the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<PeerBfd>,
}

/// A [`BGPPeer`]'s BFD settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerBfd {
    /// How often to send once the session is Up, in milliseconds
    /// (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub min_tx_interval_ms: Option<u32>,
    /// How often the peer may send, in milliseconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub min_rx_interval_ms: Option<u32>,
    /// Packets missed before the peer is down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub detect_multiplier: Option<u8>,
}

/// A key of a Secret (in the agent's namespace).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key in its data.
    pub key: String,
}

/// Why a [`BGPPeer`] cannot be used (shown in its `Valid` condition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerInvalid {
    /// Both kinds of peer at once.
    #[error("set either peerIP or peerSelector, not both")]
    PeerIpAndSelector,
    /// Neither kind of peer.
    #[error("set peerIP (an external router) or peerSelector (nodes)")]
    NoPeer,
    /// `peerIP` does not parse.
    #[error("peerIP {0:?} is not an IP address")]
    PeerIp(String),
    /// An external router needs its AS.
    #[error("asNumber is required with peerIP")]
    AsNumberMissing,
    /// AS 0 is reserved.
    #[error("asNumber must not be 0")]
    AsNumberZero,
    /// Both ways of choosing nodes at once.
    #[error("set either node or nodeSelector, not both")]
    NodeAndSelector,
    /// A hold time of 1 or 2 s (RFC 4271 §4.2).
    #[error("holdTimeSeconds must be 0 or at least 3")]
    HoldTime,
    /// A keepalive interval longer than a third of the hold time.
    #[error("keepaliveTimeSeconds {keepalive} is more than a third of the hold time {hold}")]
    Keepalive {
        /// The keepalive asked for.
        keepalive: u16,
        /// The hold time it is compared with.
        hold: u16,
    },
    /// The password reference lacks a name or key.
    #[error("password needs a Secret name and key")]
    PasswordRef,
    /// BFD intervals outside 10 ms to 60 s, or a multiplier of 0.
    #[error(
        "bfd: minTxIntervalMs and minRxIntervalMs must be 10 to 60000, detectMultiplier 1 to 255"
    )]
    Bfd,
}

/// Checks a [`BGPPeer`] (what OpenAPI cannot say).
pub fn validate_peer(p: &BGPPeerSpec) -> Result<(), PeerInvalid> {
    match (&p.peer_ip, &p.peer_selector) {
        (Some(_), Some(_)) => return Err(PeerInvalid::PeerIpAndSelector),
        (None, None) => return Err(PeerInvalid::NoPeer),
        (Some(ip), None) => {
            ip.parse::<IpAddr>()
                .map_err(|_| PeerInvalid::PeerIp(ip.clone()))?;
            if p.as_number.is_none() {
                return Err(PeerInvalid::AsNumberMissing);
            }
        }
        (None, Some(_)) => {}
    }
    if p.as_number == Some(0) {
        return Err(PeerInvalid::AsNumberZero);
    }
    if p.node.is_some() && p.node_selector.is_some() {
        return Err(PeerInvalid::NodeAndSelector);
    }
    if let Some(h) = p.hold_time_seconds
        && (h == 1 || h == 2)
    {
        return Err(PeerInvalid::HoldTime);
    }
    if let (Some(k), h) = (p.keepalive_time_seconds, p.hold_time_seconds.unwrap_or(90))
        && h > 0
        && k > h / 3
    {
        return Err(PeerInvalid::Keepalive {
            keepalive: k,
            hold: h,
        });
    }
    if let Some(s) = &p.password
        && (s.name.is_empty() || s.key.is_empty())
    {
        return Err(PeerInvalid::PasswordRef);
    }
    if let Some(b) = &p.bfd {
        let ms = |v: Option<u32>| v.is_none_or(|v| (10..=60_000).contains(&v));
        if !ms(b.min_tx_interval_ms) || !ms(b.min_rx_interval_ms) || b.detect_multiplier == Some(0)
        {
            return Err(PeerInvalid::Bfd);
        }
    }
    Ok(())
}

/// Why a [`BGPConfiguration`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigInvalid {
    /// AS 0 is reserved.
    #[error("asNumber must not be 0")]
    AsNumberZero,
    /// A prefix advertisement that is not a CIDR.
    #[error("prefixAdvertisements: {0:?} is not a CIDR")]
    Prefix(String),
    /// A community that does not parse.
    #[error("communities: {0}")]
    Community(crate::community::CommunityInvalid),
}

/// Checks a [`BGPConfiguration`].
pub fn validate_config(c: &BGPConfigurationSpec) -> Result<(), ConfigInvalid> {
    if c.as_number == Some(0) {
        return Err(ConfigInvalid::AsNumberZero);
    }
    for p in &c.prefix_advertisements {
        p.parse::<ipnetwork::IpNetwork>()
            .map_err(|_| ConfigInvalid::Prefix(p.clone()))?;
    }
    for c in &c.communities {
        crate::community::parse(c).map_err(ConfigInvalid::Community)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_validation_names_the_field() {
        let ok = BGPPeerSpec {
            peer_ip: Some("10.0.0.254".into()),
            as_number: Some(65000),
            ..Default::default()
        };
        assert_eq!(validate_peer(&ok), Ok(()));
        let bad = |f: fn(&mut BGPPeerSpec)| {
            let mut p = ok.clone();
            f(&mut p);
            validate_peer(&p).unwrap_err().to_string()
        };
        assert!(bad(|p| p.peer_ip = Some("nope".into())).contains("peerIP"));
        assert!(bad(|p| p.as_number = None).contains("asNumber"));
        assert!(bad(|p| p.peer_selector = Some(LabelSelector::default())).contains("not both"));
        assert!(bad(|p| p.hold_time_seconds = Some(2)).contains("holdTimeSeconds"));
        assert!(bad(|p| p.keepalive_time_seconds = Some(60)).contains("keepalive"));
        let bfd = |b: PeerBfd| {
            let mut p = ok.clone();
            p.bfd = Some(b);
            validate_peer(&p).map_err(|e| e.to_string())
        };
        assert_eq!(bfd(PeerBfd::default()), Ok(()), "{{}}: on, defaults");
        for b in [
            PeerBfd {
                min_tx_interval_ms: Some(9),
                ..Default::default()
            },
            PeerBfd {
                min_rx_interval_ms: Some(60_001),
                ..Default::default()
            },
            PeerBfd {
                detect_multiplier: Some(0),
                ..Default::default()
            },
        ] {
            assert!(bfd(b.clone()).unwrap_err().contains("bfd"), "{b:?}");
        }
        let nodes = BGPPeerSpec {
            peer_selector: Some(LabelSelector::default()),
            ..Default::default()
        };
        assert_eq!(validate_peer(&nodes), Ok(()));
        assert!(validate_peer(&BGPPeerSpec::default()).is_err());
    }

    #[test]
    fn config_validation() {
        assert_eq!(validate_config(&BGPConfigurationSpec::default()), Ok(()));
        let c = BGPConfigurationSpec {
            prefix_advertisements: vec!["10.96.0.0/12".into(), "bad".into()],
            ..Default::default()
        };
        assert!(validate_config(&c).unwrap_err().to_string().contains("bad"));
        let c = BGPConfigurationSpec {
            communities: vec!["64512:x".into()],
            ..Default::default()
        };
        assert!(
            validate_config(&c)
                .unwrap_err()
                .to_string()
                .contains("communities")
        );
    }
}
