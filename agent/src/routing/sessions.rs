//! Which BGP sessions this node has (pure): from the cluster settings, the
//! Nodes and the BGPPeers to the speaker's neighbor list.
//!
//! - Node-to-node sessions: the full mesh (unless turned off) plus every
//!   `peerSelector` peering, in both directions; of each pair the node with
//!   the lower address only listens, so a restarting node is always the
//!   one that reconnects and graceful restart holds on the other side.
//!   A node annotated with `margay.dev/route-reflector-cluster-id` reflects
//!   for the nodes that are not.
//! - External peers (`peerIP`) hear only this node's own prefixes.
//! - One bad object is contained: an invalid BGPPeer, a password that is
//!   missing, two Nodes claiming one address, a neighbor the speaker would
//!   refuse: each is left out and reported, the rest of the list stands.
//!   A password that could not be read keeps that peering as the speaker
//!   has it now (an unreadable input never removes a session).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use margay_api::bgp::ConfigInvalid;
use margay_api::bgp::{
    BGPConfigurationSpec, BGPPeerSpec, DEFAULT_ASN, validate_config, validate_peer,
};
use margay_api::ipam::LabelSelector;
use margay_bgp::config::{BfdSettings, Neighbor, validate_neighbor};

use super::nodes::NodeInfo;
use super::problem::{Problem, Resolution};
use crate::kube::Known;
use crate::kube::secrets::SecretKey;

/// What of the cluster settings the speaker is started with: a change of
/// either restarts it (gracefully: see `routing::speaker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    /// The nodes' AS.
    pub asn: u32,
    /// TCP port.
    pub port: u16,
}

/// What of the cluster settings a running speaker takes without a
/// restart: communities are re-advertised, a restart time is announced
/// from each session's next OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Graceful restart time.
    pub restart_time: u16,
    /// Communities added to exports.
    pub communities: Vec<String>,
}

/// The cluster-wide settings with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// What the speaker is started with.
    pub global: Global,
    /// What it takes while running.
    pub live: Live,
    /// Full mesh between nodes.
    pub mesh: bool,
    /// Extra prefixes every node advertises.
    pub prefixes: Vec<IpNetwork>,
}

impl Settings {
    /// From the `default` BGPConfiguration (absent or invalid: defaults,
    /// and the reason it was ignored).
    pub fn from_spec(spec: Option<&BGPConfigurationSpec>) -> (Self, Option<ConfigInvalid>) {
        let invalid = spec.and_then(|s| validate_config(s).err());
        let spec = spec.filter(|_| invalid.is_none());
        let d = BGPConfigurationSpec::default();
        let s = spec.unwrap_or(&d);
        (
            Self {
                global: Global {
                    asn: s.as_number.unwrap_or(DEFAULT_ASN),
                    port: s.listen_port.unwrap_or(179),
                },
                live: Live {
                    restart_time: s.restart_time_seconds.unwrap_or(120),
                    communities: s.communities.clone(),
                },
                mesh: s.node_to_node_mesh_enabled.unwrap_or(true),
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
    pub problems: Vec<Problem>,
}

/// The most prefixes an external router may send (accepted inside the
/// pools: the rest is filtered and never stored) when its BGPPeer sets no
/// `maxPrefixes`: five times the blocks of a 5000-node cluster, so only a
/// router that floods the pools' space with more specifics hits it. The
/// session then ends with Cease/maximum prefixes (RFC 4486) and is retried
/// 30 s later, reported on the Node.
pub const DEFAULT_EXTERNAL_MAX_PREFIXES: usize = 100_000;

fn apply_timers(n: &mut Neighbor, p: &BGPPeerSpec) {
    if let Some(h) = p.hold_time_seconds {
        n.hold_time = h;
    }
    n.keepalive = p.keepalive_time_seconds;
    if let Some(gr) = p.graceful_restart {
        n.graceful_restart = gr;
    }
    n.restart_time = p.restart_time_seconds;
    // 0: no limit.
    n.max_prefixes = p.max_prefixes.filter(|m| *m > 0).map(|m| m as usize);
    n.ttl_security = p.ttl_security_hops;
    n.bfd = p.bfd.as_ref().map(|b| {
        let d = BfdSettings::default();
        BfdSettings {
            min_tx_ms: b.min_tx_interval_ms.unwrap_or(d.min_tx_ms),
            min_rx_ms: b.min_rx_interval_ms.unwrap_or(d.min_rx_ms),
            multiplier: b.detect_multiplier.unwrap_or(d.multiplier),
        }
    });
}

/// The password a peering needs.
enum Password {
    /// Use this (or none).
    Use(Option<String>),
    /// Leave the peering out.
    Skip,
    /// Keep what the speaker has for this address.
    Keep,
}

/// The Secrets the BGPPeers name.
pub fn password_refs(peers: &[NamedPeer]) -> BTreeSet<SecretKey> {
    peers
        .iter()
        .filter_map(|(_, p)| p.password.as_ref())
        .map(|r| (r.name.clone(), r.key.clone()))
        .collect()
}

/// This node's BGP neighbors. `passwords` holds what each (Secret, key)
/// read gave; `previous` is what the speaker has now (a peering whose
/// password could not be read keeps its entry from there).
pub fn neighbors(
    me: &NodeInfo,
    nodes: &[NodeInfo],
    s: &Settings,
    peers: &[NamedPeer],
    passwords: &BTreeMap<SecretKey, Known<Option<String>>>,
    previous: &[Neighbor],
) -> Sessions {
    let mut out = Sessions::default();
    let Some(my_addr) = me.address.map(|a| a.ip()) else {
        out.problems.push(Problem::NoBgpAddress);
        return out;
    };
    let mut valid: Vec<&NamedPeer> = Vec::new();
    let mut invalid = Vec::new();
    for np in peers {
        match validate_peer(&np.1) {
            Ok(()) => valid.push(np),
            Err(why) => invalid.push(Problem::PeerIgnored {
                name: np.0.clone(),
                why,
            }),
        }
    }
    let password = |name: &str, p: &BGPPeerSpec, out: &mut Sessions| -> Password {
        let Some(r) = &p.password else {
            return Password::Use(None);
        };
        match passwords.get(&(r.name.clone(), r.key.clone())) {
            Some(Known::Fresh(Some(pw))) | Some(Known::Stale(Some(pw), _)) => {
                Password::Use(Some(pw.clone()))
            }
            Some(Known::Fresh(None)) => {
                out.problems.push(Problem::PasswordMissing {
                    peer: name.to_string(),
                    secret: r.name.clone(),
                    key: r.key.clone(),
                });
                Password::Skip
            }
            Some(Known::Stale(None, why)) | Some(Known::Unknown(why)) => {
                out.problems.push(Problem::PasswordUnknown {
                    peer: name.to_string(),
                    why: why.clone(),
                });
                Password::Keep
            }
            None => {
                out.problems.push(Problem::PasswordNotRead {
                    peer: name.to_string(),
                    secret: r.name.clone(),
                    key: r.key.clone(),
                });
                Password::Keep
            }
        }
    };
    // What the speaker would refuse is left out here, so the rest applies.
    let add = |mut n: Neighbor, pw: Password, origin: String, out: &mut Sessions| match pw {
        Password::Use(p) => {
            n.password = p;
            match validate_neighbor(&n, s.global.asn) {
                Ok(()) => out.neighbors.push(n),
                Err(why) => out.problems.push(Problem::NeighborInvalid {
                    address: n.address,
                    origin,
                    why,
                }),
            }
        }
        Password::Skip => {}
        Password::Keep => {
            if let Some(prev) = previous.iter().find(|p| p.address == n.address) {
                out.neighbors.push(prev.clone());
            } else {
                tracing::debug!(%origin, "peering waits for its password");
            }
        }
    };
    // Two Nodes announcing one address (a stale Node after IP reuse): the
    // one with a live agent is the real one; when that cannot be told, a
    // session to the address that exists is kept and none is made.
    let mut by_addr: BTreeMap<IpAddr, Vec<&NodeInfo>> = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.name != me.name) {
        if let Some(a) = n.address {
            by_addr.entry(a.ip()).or_default().push(n);
        }
    }
    // The node that stands for each ambiguous address (`None`: none).
    let mut chosen: BTreeMap<IpAddr, Option<&str>> = BTreeMap::new();
    let mut kept: Vec<Neighbor> = Vec::new();
    for (address, all) in &by_addr {
        if all.len() < 2 {
            continue;
        }
        let mut names: Vec<&str> = all.iter().map(|n| n.name.as_str()).collect();
        names.sort();
        let alive: Vec<&&NodeInfo> = all.iter().filter(|n| n.alive).collect();
        let resolution = match (
            alive.as_slice(),
            previous.iter().find(|p| p.address == *address),
        ) {
            ([one], _) => {
                chosen.insert(*address, Some(one.name.as_str()));
                Resolution::Alive(one.name.clone())
            }
            (_, Some(prev)) => {
                chosen.insert(*address, None);
                kept.push(prev.clone());
                Resolution::Kept
            }
            (_, None) => {
                chosen.insert(*address, None);
                Resolution::Neither
            }
        };
        out.problems.push(Problem::DuplicateAddress {
            address: *address,
            first: names[0].to_string(),
            second: names[1].to_string(),
            resolution,
        });
    }
    let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
    // Node-to-node.
    let mut others: Vec<&NodeInfo> = nodes.iter().filter(|n| n.name != me.name).collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    for other in others {
        let Some(addr) = other.address.map(|a| a.ip()) else {
            continue;
        };
        if addr == my_addr
            || addr.is_ipv4() != my_addr.is_ipv4()
            || chosen
                .get(&addr)
                .is_some_and(|c| *c != Some(other.name.as_str()))
        {
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
        let mut n = Neighbor::new(addr, other.asn.unwrap_or(s.global.asn));
        n.port = s.global.port;
        n.passive = my_addr < addr;
        n.route_reflector_client =
            me.rr_cluster_id.is_some() && other.rr_cluster_id.is_none() && n.asn == s.global.asn;
        let pw = match via_peer {
            Some((name, p)) => {
                apply_timers(&mut n, p);
                password(name, p, &mut out)
            }
            None => Password::Use(None),
        };
        seen.insert(addr);
        add(n, pw, format!("Node {}", other.name), &mut out);
    }
    // Sessions kept to ambiguous addresses.
    for n in kept {
        if seen.insert(n.address) {
            out.neighbors.push(n);
        }
    }
    // External routers.
    for (name, p) in &valid {
        let Some(ip) = p.peer_ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok()) else {
            continue;
        };
        if !node_side(p, me) || ip == my_addr || !seen.insert(ip) {
            continue;
        }
        let mut n = Neighbor::new(ip, p.as_number.unwrap_or(s.global.asn));
        n.port = p.port.unwrap_or(179);
        n.export_local_only = true;
        apply_timers(&mut n, p);
        if p.max_prefixes.is_none() {
            n.max_prefixes = Some(DEFAULT_EXTERNAL_MAX_PREFIXES);
        }
        let pw = password(name, p, &mut out);
        add(n, pw, format!("BGPPeer {name}"), &mut out);
    }
    out.problems.extend(invalid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::Why;
    use crate::routing::nodes::tests::node;
    use margay_api::bgp::SecretKeyRef;

    fn settings() -> Settings {
        Settings::from_spec(None).0
    }

    fn addrs(s: &Sessions) -> Vec<String> {
        s.neighbors.iter().map(|n| n.address.to_string()).collect()
    }

    fn none() -> BTreeMap<SecretKey, Known<Option<String>>> {
        BTreeMap::new()
    }

    #[test]
    fn full_mesh_with_one_passive_side_per_pair() {
        let nodes = [
            node("a", "10.0.0.1/24"),
            node("b", "10.0.0.2/24"),
            node("c", "10.0.0.3/24"),
        ];
        let s = neighbors(&nodes[1], &nodes, &settings(), &[], &none(), &[]);
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
                &none(),
                &[]
            )),
            ["10.0.0.2"]
        );
    }

    #[test]
    fn of_two_nodes_with_one_address_the_live_one_or_the_existing_session_stays() {
        let mut nodes = vec![
            node("a", "10.0.0.1/24"),
            node("b", "10.0.0.2/24"),
            node("b-old", "10.0.0.2/24"),
            node("c", "10.0.0.3/24"),
        ];
        let dup = |resolution| Problem::DuplicateAddress {
            address: "10.0.0.2".parse().unwrap(),
            first: "b".into(),
            second: "b-old".into(),
            resolution,
        };
        // Neither looks alive, no session yet: none is made.
        let s = neighbors(&nodes[0], &nodes, &settings(), &[], &none(), &[]);
        assert_eq!(addrs(&s), ["10.0.0.3"]);
        assert_eq!(s.problems, vec![dup(Resolution::Neither)]);
        assert!(s.problems[0].to_string().contains("remove the stale Node"));
        // A session exists (the stale Node came later): it stays as it is.
        let before = neighbors(&nodes[0], &nodes[..2], &settings(), &[], &none(), &[]);
        let s = neighbors(
            &nodes[0],
            &nodes,
            &settings(),
            &[],
            &none(),
            &before.neighbors,
        );
        let mut got = addrs(&s);
        got.sort();
        assert_eq!(got, ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(s.problems, vec![dup(Resolution::Kept)]);
        // Only b's agent is alive: b is peered with, as it would be alone.
        nodes[1].alive = true;
        let s = neighbors(&nodes[0], &nodes, &settings(), &[], &none(), &[]);
        assert_eq!(addrs(&s), ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(s.problems, vec![dup(Resolution::Alive("b".into()))]);
        assert_eq!(s.neighbors[0], before.neighbors[0]);
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
        // A client peers with both reflectors only.
        let c1 = neighbors(&nodes[2], &nodes, &s, &peers, &none(), &[]);
        assert_eq!(addrs(&c1), ["10.0.0.1", "10.0.0.2"]);
        assert!(c1.neighbors.iter().all(|n| !n.route_reflector_client));
        // A reflector peers with everyone (the other RR too: it selects it)
        // and treats the clients as clients.
        let rr = neighbors(&nodes[0], &nodes, &s, &peers, &none(), &[]);
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
        let only_b = vec![("tor".to_string(), tor(Some("b"), false))];
        assert!(
            neighbors(&nodes[0], &nodes, &s, &only_b, &none(), &[])
                .neighbors
                .is_empty()
        );
        let got = neighbors(&nodes[1], &nodes, &s, &only_b, &none(), &[]);
        assert_eq!(addrs(&got), ["10.0.0.254"]);
        let n = &got.neighbors[0];
        assert!(n.export_local_only && n.asn == 65000 && n.hold_time == 9 && !n.passive);
        assert_eq!(n.restart_time, Some(30));
        // A router is bounded by default; its BGPPeer may set another
        // bound, or none (0).
        assert_eq!(n.max_prefixes, Some(DEFAULT_EXTERNAL_MAX_PREFIXES));
        for (set, want) in [(Some(50), Some(50)), (Some(0), None)] {
            let mut p = tor(Some("b"), false);
            p.max_prefixes = set;
            let got = neighbors(&nodes[1], &nodes, &s, &[("tor".into(), p)], &none(), &[]);
            assert_eq!(got.neighbors[0].max_prefixes, want);
        }
        // Password: missing Secret -> left out and reported; present -> used.
        let with_pw = vec![("tor".to_string(), tor(None, true))];
        let key = ("bgp".to_string(), "tor".to_string());
        let missing: BTreeMap<_, _> = [(key.clone(), Known::Fresh(None))].into();
        let got = neighbors(&nodes[0], &nodes, &s, &with_pw, &missing, &[]);
        assert!(got.neighbors.is_empty());
        assert!(
            got.problems[0].to_string().contains("Secret bgp/tor"),
            "{:?}",
            got.problems
        );
        let pw: BTreeMap<_, _> = [(key.clone(), Known::Fresh(Some("s3cret".to_string())))].into();
        let got = neighbors(&nodes[0], &nodes, &s, &with_pw, &pw, &[]);
        assert_eq!(got.neighbors[0].password.as_deref(), Some("s3cret"));
        // Unreadable: the speaker's current entry is kept as it is.
        let unread: BTreeMap<_, _> = [(
            key.clone(),
            Known::Unknown(Why::ApiQuiet("API down".into())),
        )]
        .into();
        let kept = neighbors(&nodes[0], &nodes, &s, &with_pw, &unread, &got.neighbors);
        assert_eq!(kept.neighbors, got.neighbors);
        assert!(kept.problems[0].to_string().contains("API down"));
        // A password the speaker would refuse (over 80 bytes) is contained.
        let long: BTreeMap<_, _> = [(key, Known::Fresh(Some("x".repeat(81))))].into();
        let got = neighbors(&nodes[0], &nodes, &s, &with_pw, &long, &[]);
        assert!(got.neighbors.is_empty());
        assert!(
            got.problems
                .iter()
                .any(|p| p.to_string().contains("password must be 1 to 80")),
            "{:?}",
            got.problems
        );
        // An invalid peer is reported, never used.
        let bad = vec![(
            "bad".to_string(),
            BGPPeerSpec {
                peer_ip: Some("x".into()),
                ..Default::default()
            },
        )];
        let got = neighbors(&nodes[0], &nodes, &s, &bad, &none(), &[]);
        assert!(got.neighbors.is_empty() && got.problems[0].to_string().contains("BGPPeer bad"));
    }

    #[test]
    fn bad_configuration_falls_back_to_defaults_with_a_reason() {
        let spec = BGPConfigurationSpec {
            as_number: Some(0),
            ..Default::default()
        };
        let (s, why) = Settings::from_spec(Some(&spec));
        assert_eq!(s.global.asn, DEFAULT_ASN);
        assert!(why.unwrap().to_string().contains("asNumber"));
        let spec = BGPConfigurationSpec {
            as_number: Some(65001),
            node_to_node_mesh_enabled: Some(false),
            ..Default::default()
        };
        let (s, why) = Settings::from_spec(Some(&spec));
        assert_eq!((s.global.asn, s.mesh, why), (65001, false, None));
    }
}
