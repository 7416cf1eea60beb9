//! Which BGP sessions this node has, what it advertises, and how the
//! routes it learns become kernel routes: pure functions from the cluster's
//! objects (Nodes, [`BGPConfiguration`], [`BGPPeer`]s, IPPools) to the
//! speaker's settings and the remote-block plan. The loop that feeds them
//! and applies the results is in [`crate::bgp`].
//!
//! - Node identity lives in Node annotations ([`ANN_ADDRESS`] ...), written
//!   by each node's agent ([`identity_annotations`]) and read back by the
//!   others ([`NodeInfo::from_node`]).
//! - Node-to-node sessions: the full mesh (unless turned off) plus every
//!   `peerSelector` peering, in both directions; of each pair the node with
//!   the lower address only listens, so a restarting node is always the
//!   one that reconnects and graceful restart holds on the other side.
//!   A node annotated with [`ANN_RR_CLUSTER_ID`] reflects for the nodes
//!   that are not.
//! - External peers (`peerIP`) hear only this node's own prefixes.
//! - Learned routes are used only inside IPPools (the speaker's import
//!   filter drops the rest), and a route's next hop names the node, whose
//!   annotations give its VXLAN endpoint.
//!
//! [`BGPConfiguration`]: crate::bgp_crd::BGPConfiguration
//! [`BGPPeer`]: crate::bgp_crd::BGPPeer

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use margay_bgp::config::Neighbor;
use margay_bgp::speaker::LearnedRoutes;
use margay_ipam::crd::LabelSelector;
use margay_ipam::model::Pool;

use crate::bgp_crd::{
    BGPConfigurationSpec, BGPPeerSpec, DEFAULT_ASN, validate_config, validate_peer,
};
use crate::remote::{RemoteBlock, Vtep};

/// The node's BGP address with its subnet length, e.g. `10.0.0.5/24`.
pub const ANN_ADDRESS: &str = "margay.dev/bgp-address";
/// The node's AS number.
pub const ANN_ASN: &str = "margay.dev/bgp-asn";
/// Its VXLAN device's address.
pub const ANN_VXLAN_ADDRESS: &str = "margay.dev/vxlan-tunnel-address";
/// Its VXLAN device's MAC.
pub const ANN_VXLAN_MAC: &str = "margay.dev/vxlan-tunnel-mac";
/// Set by the operator: this node is a route reflector with this cluster ID.
pub const ANN_RR_CLUSTER_ID: &str = "margay.dev/route-reflector-cluster-id";

/// The cluster-wide settings with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The nodes' AS.
    pub asn: u32,
    /// Full mesh between nodes.
    pub mesh: bool,
    /// TCP port.
    pub port: u16,
    /// Graceful restart time.
    pub restart_time: u16,
    /// Communities added to exports.
    pub communities: Vec<String>,
    /// Extra prefixes every node advertises.
    pub prefixes: Vec<IpNetwork>,
}

impl Settings {
    /// From the `default` BGPConfiguration (absent or invalid: defaults,
    /// and the reason it was ignored).
    pub fn from_spec(spec: Option<&BGPConfigurationSpec>) -> (Self, Option<String>) {
        let invalid = spec.and_then(|s| validate_config(s).err());
        let spec = spec.filter(|_| invalid.is_none());
        let d = BGPConfigurationSpec::default();
        let s = spec.unwrap_or(&d);
        (
            Self {
                asn: s.as_number.unwrap_or(DEFAULT_ASN),
                mesh: s.node_to_node_mesh_enabled.unwrap_or(true),
                port: s.listen_port.unwrap_or(179),
                restart_time: s.restart_time_seconds.unwrap_or(120),
                communities: s.communities.clone(),
                prefixes: s
                    .prefix_advertisements
                    .iter()
                    .filter_map(|p| p.parse().ok())
                    .collect(),
            },
            invalid,
        )
    }
}

/// What this agent knows about a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its BGP address and subnet.
    pub address: Option<IpNetwork>,
    /// Its AS (the cluster's when not published).
    pub asn: Option<u32>,
    /// Its route reflector cluster ID, when it is one.
    pub rr_cluster_id: Option<Ipv4Addr>,
    /// Its VXLAN endpoint.
    pub vtep: Option<Vtep>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &[u8; 6]) -> String {
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

/// A stable, locally administered unicast MAC for a node's VXLAN device.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x66, b[0], b[1], b[2], b[3], b[4]]
}

impl NodeInfo {
    /// From a Node object's name, labels and Margay annotations (unparsable
    /// annotations count as absent).
    pub fn from_node(n: &Node) -> Self {
        let ann = n.metadata.annotations.clone().unwrap_or_default();
        let get = |k: &str| ann.get(k).map(|s| s.trim().to_string());
        let vtep = match (
            get(ANN_VXLAN_ADDRESS).and_then(|s| s.parse().ok()),
            get(ANN_VXLAN_MAC).and_then(|s| parse_mac(&s)),
        ) {
            (Some(tunnel_ip), Some(mac)) => Some(Vtep { mac, tunnel_ip }),
            _ => None,
        };
        Self {
            name: n.metadata.name.clone().unwrap_or_default(),
            labels: n.metadata.labels.clone().unwrap_or_default(),
            address: get(ANN_ADDRESS).and_then(|s| s.parse().ok()),
            asn: get(ANN_ASN).and_then(|s| s.parse().ok()),
            rr_cluster_id: get(ANN_RR_CLUSTER_ID).and_then(|s| s.parse().ok()),
            vtep,
        }
    }
}

/// The annotations this node publishes (what [`NodeInfo::from_node`] reads).
pub fn identity_annotations(
    address: IpNetwork,
    asn: u32,
    vtep: Option<Vtep>,
) -> BTreeMap<String, Option<String>> {
    let mut m = BTreeMap::new();
    m.insert(ANN_ADDRESS.to_string(), Some(address.to_string()));
    m.insert(ANN_ASN.to_string(), Some(asn.to_string()));
    m.insert(
        ANN_VXLAN_ADDRESS.to_string(),
        vtep.map(|v| v.tunnel_ip.to_string()),
    );
    m.insert(ANN_VXLAN_MAC.to_string(), vtep.map(|v| mac_string(&v.mac)));
    m
}

fn selects(sel: &Option<LabelSelector>, n: &NodeInfo) -> bool {
    sel.as_ref().is_none_or(|s| s.matches(&n.labels))
}

/// Whether peering `p` applies to node `n` on its node side.
fn node_side(p: &BGPPeerSpec, n: &NodeInfo) -> bool {
    match (&p.node, &p.node_selector) {
        (Some(name), _) => *name == n.name,
        (None, sel) => selects(sel, n),
    }
}

/// A BGPPeer by name with its spec.
pub type NamedPeer = (String, BGPPeerSpec);

/// What [`neighbors`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sessions {
    /// The speaker's neighbors.
    pub neighbors: Vec<Neighbor>,
    /// Peerings that could not be set up, and why.
    pub problems: Vec<String>,
}

fn apply_timers(n: &mut Neighbor, p: &BGPPeerSpec) {
    if let Some(h) = p.hold_time_seconds {
        n.hold_time = h;
    }
    n.keepalive = p.keepalive_time_seconds;
    if let Some(gr) = p.graceful_restart {
        n.graceful_restart = gr;
    }
    n.restart_time = p.restart_time_seconds;
    n.max_prefixes = p.max_prefixes.map(|m| m as usize);
    n.ttl_security = p.ttl_security_hops;
}

/// This node's BGP neighbors. `passwords` maps (Secret, key) to the
/// password found there (missing: the peering is left out and reported).
pub fn neighbors(
    me: &NodeInfo,
    nodes: &[NodeInfo],
    s: &Settings,
    peers: &[NamedPeer],
    passwords: &BTreeMap<(String, String), String>,
) -> Sessions {
    let mut out = Sessions::default();
    let Some(my_addr) = me.address.map(|a| a.ip()) else {
        out.problems
            .push("this node has no BGP address yet".to_string());
        return out;
    };
    let mut valid: Vec<&NamedPeer> = Vec::new();
    let mut invalid = Vec::new();
    for np in peers {
        match validate_peer(&np.1) {
            Ok(()) => valid.push(np),
            Err(e) => invalid.push(format!("BGPPeer {} ignored: {e}", np.0)),
        }
    }
    let password =
        |name: &str, p: &BGPPeerSpec, out: &mut Sessions| -> Result<Option<String>, ()> {
            match &p.password {
                None => Ok(None),
                Some(r) => match passwords.get(&(r.name.clone(), r.key.clone())) {
                    Some(pw) => Ok(Some(pw.clone())),
                    None => {
                        out.problems.push(format!(
                            "BGPPeer {name}: password Secret {}/{} not found; peering left out",
                            r.name, r.key
                        ));
                        Err(())
                    }
                },
            }
        };
    let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
    // Node-to-node.
    let mut others: Vec<&NodeInfo> = nodes.iter().filter(|n| n.name != me.name).collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    for other in others {
        let Some(addr) = other.address.map(|a| a.ip()) else {
            continue;
        };
        if addr == my_addr || addr.is_ipv4() != my_addr.is_ipv4() {
            continue;
        }
        // The peering that links the two nodes, if any (mesh first).
        let via_peer = valid.iter().find(|(_, p)| {
            p.peer_selector.is_some()
                && ((node_side(p, me) && selects(&p.peer_selector, other))
                    || (node_side(p, other) && selects(&p.peer_selector, me)))
        });
        if !s.mesh && via_peer.is_none() {
            continue;
        }
        let mut n = Neighbor::new(addr, other.asn.unwrap_or(s.asn));
        n.port = s.port;
        n.passive = my_addr < addr;
        n.route_reflector_client =
            me.rr_cluster_id.is_some() && other.rr_cluster_id.is_none() && n.asn == s.asn;
        if let Some((name, p)) = via_peer {
            apply_timers(&mut n, p);
            match password(name, p, &mut out) {
                Ok(pw) => n.password = pw,
                Err(()) => continue,
            }
        }
        seen.insert(addr);
        out.neighbors.push(n);
    }
    // External routers.
    for (name, p) in &valid {
        let Some(ip) = p.peer_ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok()) else {
            continue;
        };
        if !node_side(p, me) || ip == my_addr || !seen.insert(ip) {
            continue;
        }
        let mut n = Neighbor::new(ip, p.as_number.unwrap_or(s.asn));
        n.port = p.port.unwrap_or(179);
        n.export_local_only = true;
        apply_timers(&mut n, p);
        match password(name, p, &mut out) {
            Ok(pw) => n.password = pw,
            Err(()) => {
                seen.remove(&ip);
                continue;
            }
        }
        out.neighbors.push(n);
    }
    out.problems.extend(invalid);
    out
}

/// The remote blocks to program from what BGP learned: prefixes inside a
/// pool and not one of `own` blocks, reached through the node whose
/// address is the route's (first) next hop; an unknown next hop (a router)
/// is reached natively.
pub fn remote_blocks(
    learned: &LearnedRoutes,
    nodes: &[NodeInfo],
    pools: &[Pool],
    own: &BTreeSet<IpNetwork>,
) -> Vec<RemoteBlock> {
    let mut out = Vec::new();
    for (prefix, hops) in learned {
        let Ok(cidr) = IpNetwork::new(prefix.addr(), prefix.len()) else {
            continue;
        };
        if own.iter().any(|o| o.contains(cidr.network())) {
            continue;
        }
        let Some(pool) = pools.iter().find(|p| {
            p.cidr.is_ipv4() == cidr.is_ipv4()
                && p.cidr.contains(cidr.network())
                && p.cidr.prefix() <= cidr.prefix()
        }) else {
            continue;
        };
        let Some(&hop) = hops.first() else {
            continue;
        };
        let node = nodes
            .iter()
            .find(|n| n.address.is_some_and(|a| a.ip() == hop));
        out.push(RemoteBlock {
            cidr,
            node: node.map_or_else(|| hop.to_string(), |n| n.name.clone()),
            node_ip: hop,
            encap: if node.is_some() {
                pool.encapsulation
            } else {
                margay_ipam::crd::Encapsulation::None
            },
            vtep: node.and_then(|n| n.vtep),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp_crd::SecretKeyRef;

    fn node(name: &str, addr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            address: Some(addr.parse().unwrap()),
            ..Default::default()
        }
    }

    fn settings() -> Settings {
        Settings::from_spec(None).0
    }

    fn addrs(s: &Sessions) -> Vec<String> {
        s.neighbors.iter().map(|n| n.address.to_string()).collect()
    }

    #[test]
    fn full_mesh_with_one_passive_side_per_pair() {
        let nodes = [
            node("a", "10.0.0.1/24"),
            node("b", "10.0.0.2/24"),
            node("c", "10.0.0.3/24"),
        ];
        let s = neighbors(&nodes[1], &nodes, &settings(), &[], &BTreeMap::new());
        assert_eq!(addrs(&s), ["10.0.0.1", "10.0.0.3"]);
        assert!(!s.neighbors[0].passive, "b connects to the lower a");
        assert!(s.neighbors[1].passive, "b waits for the higher c");
        assert!(
            s.neighbors
                .iter()
                .all(|n| n.asn == 64512 && !n.export_local_only)
        );
        assert!(s.problems.is_empty());
        // A node without a published address is skipped.
        let mut nodes2 = nodes.to_vec();
        nodes2[2].address = None;
        assert_eq!(
            addrs(&neighbors(
                &nodes2[0],
                &nodes2,
                &settings(),
                &[],
                &BTreeMap::new()
            )),
            ["10.0.0.2"]
        );
    }

    #[test]
    fn route_reflectors_with_mesh_off() {
        let mut nodes = vec![
            node("rr1", "10.0.0.1/24"),
            node("rr2", "10.0.0.2/24"),
            node("c1", "10.0.0.3/24"),
            node("c2", "10.0.0.4/24"),
        ];
        for n in &mut nodes[..2] {
            n.labels.insert("rr".into(), "yes".into());
            n.rr_cluster_id = Some("244.0.0.1".parse().unwrap());
        }
        let mut s = settings();
        s.mesh = false;
        let mut sel = LabelSelector::default();
        sel.match_labels.insert("rr".into(), "yes".into());
        let peers = vec![(
            "to-rrs".to_string(),
            BGPPeerSpec {
                peer_selector: Some(sel),
                ..Default::default()
            },
        )];
        let none = BTreeMap::new();
        // A client peers with both reflectors only.
        let c1 = neighbors(&nodes[2], &nodes, &s, &peers, &none);
        assert_eq!(addrs(&c1), ["10.0.0.1", "10.0.0.2"]);
        assert!(c1.neighbors.iter().all(|n| !n.route_reflector_client));
        // A reflector peers with everyone (the other RR too: it selects it)
        // and treats the clients as clients.
        let rr = neighbors(&nodes[0], &nodes, &s, &peers, &none);
        assert_eq!(addrs(&rr), ["10.0.0.3", "10.0.0.4", "10.0.0.2"]);
        let clients: Vec<bool> = rr
            .neighbors
            .iter()
            .map(|n| n.route_reflector_client)
            .collect();
        assert_eq!(clients, [true, true, false]);
    }

    #[test]
    fn external_peers_by_node_with_passwords() {
        let nodes = [node("a", "10.0.0.1/24"), node("b", "10.0.0.2/24")];
        let tor = |node: Option<&str>, pw: bool| BGPPeerSpec {
            peer_ip: Some("10.0.0.254".into()),
            as_number: Some(65000),
            node: node.map(Into::into),
            password: pw.then(|| SecretKeyRef {
                name: "bgp".into(),
                key: "tor".into(),
            }),
            hold_time_seconds: Some(9),
            restart_time_seconds: Some(30),
            ..Default::default()
        };
        let mut s = settings();
        s.mesh = false;
        let none = BTreeMap::new();
        let only_b = vec![("tor".to_string(), tor(Some("b"), false))];
        assert!(
            neighbors(&nodes[0], &nodes, &s, &only_b, &none)
                .neighbors
                .is_empty()
        );
        let got = neighbors(&nodes[1], &nodes, &s, &only_b, &none);
        assert_eq!(addrs(&got), ["10.0.0.254"]);
        let n = &got.neighbors[0];
        assert!(n.export_local_only && n.asn == 65000 && n.hold_time == 9 && !n.passive);
        assert_eq!(n.restart_time, Some(30));
        // Password: missing Secret -> left out and reported; present -> used.
        let with_pw = vec![("tor".to_string(), tor(None, true))];
        let got = neighbors(&nodes[0], &nodes, &s, &with_pw, &none);
        assert!(got.neighbors.is_empty());
        assert!(
            got.problems[0].contains("Secret bgp/tor"),
            "{:?}",
            got.problems
        );
        let pw: BTreeMap<_, _> =
            [(("bgp".to_string(), "tor".to_string()), "s3cret".to_string())].into();
        let got = neighbors(&nodes[0], &nodes, &s, &with_pw, &pw);
        assert_eq!(got.neighbors[0].password.as_deref(), Some("s3cret"));
        // An invalid peer is reported, never used.
        let bad = vec![(
            "bad".to_string(),
            BGPPeerSpec {
                peer_ip: Some("x".into()),
                ..Default::default()
            },
        )];
        let got = neighbors(&nodes[0], &nodes, &s, &bad, &none);
        assert!(got.neighbors.is_empty() && got.problems[0].contains("BGPPeer bad"));
    }

    #[test]
    fn learned_routes_become_remote_blocks_inside_pools_only() {
        use margay_bgp::packet::Prefix;
        let mut b = node("b", "10.0.0.2/24");
        b.vtep = Some(Vtep {
            mac: vtep_mac("b"),
            tunnel_ip: "10.244.1.0".parse().unwrap(),
        });
        let nodes = [node("a", "10.0.0.1/24"), b];
        let pool = Pool {
            name: "p".into(),
            cidr: "10.244.0.0/16".parse().unwrap(),
            block_size: 26,
            disabled: false,
            deleting: false,
            selector: None,
            uses: vec![],
            encapsulation: margay_ipam::crd::Encapsulation::Vxlan,
            nat_outgoing: false,
        };
        let mut learned = LearnedRoutes::new();
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let hops = |s: &str| [s.parse::<IpAddr>().unwrap()].into_iter().collect();
        learned.insert(p("10.244.1.0/26"), hops("10.0.0.2"));
        learned.insert(p("10.244.0.0/26"), hops("10.0.0.2")); // our own block: ignored
        learned.insert(p("10.244.9.0/26"), hops("10.0.0.254")); // via a router
        learned.insert(p("192.168.0.0/24"), hops("10.0.0.2")); // outside pools
        let own: BTreeSet<IpNetwork> = ["10.244.0.0/26".parse().unwrap()].into();
        let r = remote_blocks(&learned, &nodes, &[pool], &own);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].node, "b");
        assert_eq!(r[0].encap, margay_ipam::crd::Encapsulation::Vxlan);
        assert!(r[0].vtep.is_some());
        assert_eq!(r[1].node, "10.0.0.254");
        assert_eq!(r[1].encap, margay_ipam::crd::Encapsulation::None);
    }

    #[test]
    fn identity_round_trips_through_annotations() {
        let vtep = Vtep {
            mac: vtep_mac("node1"),
            tunnel_ip: "10.244.0.0".parse().unwrap(),
        };
        assert_eq!(vtep.mac[0] & 0x03, 0x02, "locally administered unicast");
        let ann = identity_annotations("10.0.0.1/24".parse().unwrap(), 64512, Some(vtep));
        let mut n = Node::default();
        n.metadata.name = Some("node1".into());
        n.metadata.annotations = Some(
            ann.into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect(),
        );
        let info = NodeInfo::from_node(&n);
        assert_eq!(info.address, Some("10.0.0.1/24".parse().unwrap()));
        assert_eq!(info.asn, Some(64512));
        assert_eq!(info.vtep, Some(vtep));
        assert_eq!(parse_mac("zz"), None);
    }

    #[test]
    fn bad_configuration_falls_back_to_defaults_with_a_reason() {
        let spec = BGPConfigurationSpec {
            as_number: Some(0),
            ..Default::default()
        };
        let (s, why) = Settings::from_spec(Some(&spec));
        assert_eq!(s.asn, DEFAULT_ASN);
        assert!(why.unwrap().contains("asNumber"));
        let spec = BGPConfigurationSpec {
            as_number: Some(65001),
            node_to_node_mesh_enabled: Some(false),
            ..Default::default()
        };
        let (s, why) = Settings::from_spec(Some(&spec));
        assert_eq!((s.asn, s.mesh, why), (65001, false, None));
    }
}
