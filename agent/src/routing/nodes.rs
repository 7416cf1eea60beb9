//! Nodes as the routing plan sees them (pure): what each node's agent
//! publishes, as its `MargayNode` ([`wanted_identity`]) and in its Node's
//! annotations ([`identity_annotations`], for operators and agents of
//! earlier versions), what the others read back ([`NodeInfo::from_identity`];
//! this node's own Node through [`NodeInfo::from_node`]), the addresses a
//! node's tunnel packets may come from ([`tunnel_sources`]), this node's
//! VTEP MAC, and the choice of this node's BGP address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use margay_api::identity::{MargayNode, MargayNodeSpec, Wanted};
use margay_api::node::{
    ANN_ADDRESS, ANN_ASN, ANN_IPIP_ADDRESS, ANN_RR_CLUSTER_ID, ANN_VXLAN_ADDRESS, ANN_VXLAN_MAC,
};
use margay_api::stable::{fnv1a, mac_string, parse_mac};

use super::encap::Vtep;

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
    /// Its `tunl0` address, once it takes IPIP.
    pub ipip: Option<Ipv4Addr>,
    /// Its agent renewed its heartbeat Lease recently (of two nodes
    /// announcing one address, the one with a live agent is real; looked
    /// up only for such nodes).
    pub alive: bool,
}

/// A stable, locally administered unicast MAC for a node's VXLAN device.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let b = fnv1a(node.as_bytes()).to_be_bytes();
    [0x66, b[0], b[1], b[2], b[3], b[4]]
}

impl NodeInfo {
    /// From this node's own Node object: its name, labels and reflector
    /// role (the operator's annotation), and what its annotations last said
    /// (unparsable ones count as absent).
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
            ipip: get(ANN_IPIP_ADDRESS).and_then(|s| s.parse().ok()),
            alive: false,
        }
    }

    /// From a node's `MargayNode` (unparsable values count as absent;
    /// `alive` is the caller's to set).
    pub fn from_identity(m: &MargayNode) -> Self {
        let s = &m.spec;
        fn parse<T: std::str::FromStr>(v: &Option<String>) -> Option<T> {
            v.as_deref().and_then(|v| v.trim().parse().ok())
        }
        let vtep = match (
            parse(&s.vxlan_tunnel_address),
            s.vxlan_tunnel_mac
                .as_deref()
                .and_then(|m| parse_mac(m.trim())),
        ) {
            (Some(tunnel_ip), Some(mac)) => Some(Vtep { mac, tunnel_ip }),
            _ => None,
        };
        Self {
            name: m.metadata.name.clone().unwrap_or_default(),
            labels: m.metadata.labels.clone().unwrap_or_default(),
            address: parse(&s.bgp_address),
            asn: s.as_number,
            rr_cluster_id: parse(&s.route_reflector_cluster_id),
            vtep,
            ipip: parse(&s.ipip_tunnel_address),
            alive: false,
        }
    }
}

/// The names of nodes that share their BGP address with another node
/// (this node's `me` left out): the only ones whose liveness matters.
/// Each node as its name and BGP address.
pub fn sharing_an_address<'a>(
    nodes: impl IntoIterator<Item = (&'a str, Option<IpAddr>)>,
    me: &str,
) -> BTreeSet<String> {
    let mut by_addr: std::collections::HashMap<IpAddr, Vec<&str>> = Default::default();
    for (name, address) in nodes.into_iter().filter(|(n, _)| *n != me) {
        if let Some(a) = address {
            by_addr.entry(a).or_default().push(name);
        }
    }
    by_addr
        .into_values()
        .filter(|v| v.len() > 1)
        .flatten()
        .map(str::to_string)
        .collect()
}

/// A MargayNode's name and BGP address, read without converting the rest
/// of it (the routing loop asks this of every node on every pass).
pub fn name_and_address(m: &MargayNode) -> (&str, Option<IpAddr>) {
    let address = m.spec.bgp_address.as_deref().and_then(|v| {
        v.trim()
            .parse::<ipnetwork::IpNetwork>()
            .ok()
            .map(|n| n.ip())
    });
    (m.metadata.name.as_deref().unwrap_or_default(), address)
}

/// The Node's InternalIP and ExternalIP addresses that parse.
fn listed_addresses(n: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
}

/// This node's `MargayNode` as its agent wants it: `address`, `asn`, each
/// tunnel as [`identity_annotations`] takes it (`None`: as `have` says),
/// the reflector role, addresses and labels from its Node `me`.
pub fn wanted_identity(
    me: &Node,
    have: Option<&MargayNode>,
    address: IpNetwork,
    asn: u32,
    vtep: Option<Option<Vtep>>,
    ipip: Option<Option<Ipv4Addr>>,
) -> Wanted {
    let had = have.map(|h| h.spec.clone()).unwrap_or_default();
    let (vxlan_tunnel_address, vxlan_tunnel_mac) = match vtep {
        Some(v) => (
            v.map(|v| v.tunnel_ip.to_string()),
            v.map(|v| mac_string(&v.mac)),
        ),
        None => (had.vxlan_tunnel_address, had.vxlan_tunnel_mac),
    };
    let ipip_tunnel_address = match ipip {
        Some(a) => a.map(|a| a.to_string()),
        None => had.ipip_tunnel_address,
    };
    let mut addresses: Vec<String> = listed_addresses(me).map(|a| a.to_string()).collect();
    addresses.sort();
    addresses.dedup();
    Wanted {
        spec: MargayNodeSpec {
            bgp_address: Some(address.to_string()),
            as_number: Some(asn),
            vxlan_tunnel_address,
            vxlan_tunnel_mac,
            ipip_tunnel_address,
            route_reflector_cluster_id: NodeInfo::from_node(me)
                .rr_cluster_id
                .map(|c| c.to_string()),
            addresses,
        },
        labels: me.metadata.labels.clone().unwrap_or_default(),
        node_uid: me.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The `MargayNode` an agent of an earlier version would have written for
/// Node `n`, from the identity annotations it publishes (`None` without
/// a BGP address there): the leader writes it for such nodes during an
/// upgrade, so upgraded agents keep peering with them.
pub fn identity_from_annotations(n: &Node) -> Option<Wanted> {
    let said = NodeInfo::from_node(n);
    let address = said.address?;
    Some(wanted_identity(
        n,
        None,
        address,
        said.asn.unwrap_or(margay_api::bgp::DEFAULT_ASN),
        Some(said.vtep),
        Some(said.ipip),
    ))
}

/// The addresses node `n`'s encapsulated packets may leave from: the
/// address its agent announces (the VXLAN device's outer source) and its
/// Node's InternalIP and ExternalIP addresses as its agent copied them
/// (where `tunl0`'s packets take the address of the interface towards the
/// peer, and what another node's `--node-ip` or InternalIP chooses).
/// Unparsable ones are left out.
pub fn tunnel_sources(n: &MargayNode) -> BTreeSet<IpAddr> {
    let announced = n
        .spec
        .bgp_address
        .as_deref()
        .and_then(|a| a.trim().parse::<IpNetwork>().ok())
        .map(|a| a.ip());
    let listed = n
        .spec
        .addresses
        .iter()
        .filter_map(|a| a.trim().parse::<IpAddr>().ok());
    announced.into_iter().chain(listed).collect()
}

/// The annotations this node publishes (what [`NodeInfo::from_node`]
/// reads). Each tunnel is `None` when it is not known whether the node
/// uses it (its annotations are left as they are), `Some(None)` when it
/// does not (they are removed), `Some(Some(..))` when it takes that
/// tunnel's packets.
pub fn identity_annotations(
    address: IpNetwork,
    asn: u32,
    vtep: Option<Option<Vtep>>,
    ipip: Option<Option<Ipv4Addr>>,
) -> BTreeMap<String, Option<String>> {
    let mut m = BTreeMap::new();
    m.insert(ANN_ADDRESS.to_string(), Some(address.to_string()));
    m.insert(ANN_ASN.to_string(), Some(asn.to_string()));
    if let Some(vtep) = vtep {
        m.insert(
            ANN_VXLAN_ADDRESS.to_string(),
            vtep.map(|v| v.tunnel_ip.to_string()),
        );
        m.insert(ANN_VXLAN_MAC.to_string(), vtep.map(|v| mac_string(&v.mac)));
    }
    if let Some(ipip) = ipip {
        m.insert(ANN_IPIP_ADDRESS.to_string(), ipip.map(|a| a.to_string()));
    }
    m
}

/// Why this node's address cannot be chosen (a reason the plan reports as
/// a [`super::problem::Problem`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoNodeAddress {
    /// `--node-ip` is not an address.
    #[error("--node-ip {0:?} is neither an address nor autodetect")]
    Flag(String),
    /// Nothing to autodetect.
    #[error("no global IPv4 address on this host; set --node-ip")]
    NoneFound,
}

/// The node's BGP address: `--node-ip` (with or without a prefix length),
/// else the Node's InternalIP, else the first global IPv4 address; the
/// prefix length is taken from the interface holding the address.
pub fn choose_address(
    flag: &str,
    node: Option<&Node>,
    host: &[(String, IpNetwork)],
) -> Result<IpNetwork, NoNodeAddress> {
    let on_host = |ip: IpAddr| host.iter().find(|(_, n)| n.ip() == ip).map(|(_, n)| *n);
    if flag != "autodetect" && !flag.is_empty() {
        if let Ok(n) = flag.parse::<IpNetwork>()
            && flag.contains('/')
        {
            return Ok(n);
        }
        let ip: IpAddr = flag
            .parse()
            .map_err(|_| NoNodeAddress::Flag(flag.to_string()))?;
        return Ok(on_host(ip).unwrap_or_else(|| IpNetwork::from(ip)));
    }
    let internal = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find_map(on_host);
    if let Some(n) = internal {
        return Ok(n);
    }
    host.iter()
        .map(|(_, n)| *n)
        .find(IpNetwork::is_ipv4)
        .ok_or(NoNodeAddress::NoneFound)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A node named `name` at `addr` (`10.0.0.1/24`), nothing else known.
    pub(crate) fn node(name: &str, addr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            address: Some(addr.parse().unwrap()),
            ..Default::default()
        }
    }

    fn host() -> Vec<(String, IpNetwork)> {
        vec![
            ("eth0".into(), "10.0.0.5/24".parse().unwrap()),
            ("eth1".into(), "192.168.1.5/16".parse().unwrap()),
        ]
    }

    #[test]
    fn address_from_flag_node_or_host() {
        assert_eq!(
            choose_address("autodetect", None, &host()),
            Ok("10.0.0.5/24".parse().unwrap())
        );
        assert_eq!(
            choose_address("192.168.1.5", None, &host()),
            Ok("192.168.1.5/16".parse().unwrap())
        );
        assert_eq!(
            choose_address("172.16.0.1/20", None, &host()),
            Ok("172.16.0.1/20".parse().unwrap())
        );
        assert!(
            choose_address("nonsense", None, &host())
                .unwrap_err()
                .to_string()
                .contains("--node-ip")
        );
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.5"}]}
        }))
        .unwrap();
        assert_eq!(
            choose_address("autodetect", Some(&n), &host()),
            Ok("192.168.1.5/16".parse().unwrap())
        );
        assert!(choose_address("autodetect", None, &[]).is_err());
    }

    #[test]
    fn tunnel_sources_are_the_announced_internal_and_external_addresses() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "uid": "u", "labels": {"rack": "r1"},
                         "annotations": {ANN_RR_CLUSTER_ID: "244.0.0.1"}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.1.5"},
                {"type": "InternalIP", "address": "fd00::5"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "Hostname", "address": "n"},
                {"type": "InternalDNS", "address": "10.9.9.9"},
                {"type": "ExternalIP", "address": "not an address"},
            ]}
        }))
        .unwrap();
        let w = wanted_identity(&n, None, "10.0.0.7/24".parse().unwrap(), 64512, None, None);
        assert_eq!(
            w.spec.route_reflector_cluster_id.as_deref(),
            Some("244.0.0.1")
        );
        assert_eq!(w.labels["rack"], "r1");
        assert_eq!(w.node_uid, "u");
        let mut m = w.object("n");
        let want: BTreeSet<IpAddr> = ["10.0.0.7", "192.168.1.5", "fd00::5", "203.0.113.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(tunnel_sources(&m), want);
        m.spec.addresses.push("not an address".into());
        assert_eq!(tunnel_sources(&m), want);
        assert!(tunnel_sources(&MargayNode::new("x", Default::default())).is_empty());
    }

    #[test]
    fn an_earlier_agents_annotations_make_its_margaynode() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "old", "uid": "u", "annotations": {
                ANN_ADDRESS: "10.0.0.9/24", ANN_ASN: "64513",
                ANN_IPIP_ADDRESS: "10.244.3.1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.9"}]}
        }))
        .unwrap();
        let w = identity_from_annotations(&n).unwrap();
        let info = NodeInfo::from_identity(&w.object("old"));
        assert_eq!(info.address, Some("10.0.0.9/24".parse().unwrap()));
        let m = w.object("old");
        assert_eq!(
            name_and_address(&m),
            ("old", Some("10.0.0.9".parse().unwrap())),
            "the loop's quick read agrees with the whole conversion"
        );
        assert_eq!(info.asn, Some(64513));
        assert_eq!(info.ipip, Some("10.244.3.1".parse().unwrap()));
        assert_eq!(info.vtep, None);
        assert_eq!(w.node_uid, "u");
        assert!(identity_from_annotations(&Node::default()).is_none());
    }

    #[test]
    fn only_nodes_sharing_an_address_are_looked_up() {
        let nodes = [
            node("me", "10.0.0.1/24"),
            node("a", "10.0.0.2/24"),
            node("a-old", "10.0.0.2/24"),
            node("b", "10.0.0.3/24"),
            node("c", "10.0.0.1/24"),
        ];
        let got = sharing_an_address(
            nodes
                .iter()
                .map(|n| (n.name.as_str(), n.address.map(|a| a.ip()))),
            "me",
        );
        assert_eq!(got, ["a".to_string(), "a-old".to_string()].into());
    }

    #[test]
    fn identity_round_trips_through_annotations() {
        let vtep = Vtep {
            mac: vtep_mac("node1"),
            tunnel_ip: "10.244.0.0".parse().unwrap(),
        };
        assert_eq!(vtep.mac[0] & 0x03, 0x02, "locally administered unicast");
        let tunl0: Ipv4Addr = "10.244.0.1".parse().unwrap();
        let ann = identity_annotations(
            "10.0.0.1/24".parse().unwrap(),
            64512,
            Some(Some(vtep)),
            Some(Some(tunl0)),
        );
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
        assert_eq!(info.ipip, Some(tunl0));
        // The same through the MargayNode; a tunnel left unknown keeps what
        // the object had.
        let w = wanted_identity(
            &n,
            None,
            "10.0.0.1/24".parse().unwrap(),
            64512,
            Some(Some(vtep)),
            Some(Some(tunl0)),
        );
        let m = w.object("node1");
        assert_eq!(
            NodeInfo {
                labels: Default::default(),
                ..NodeInfo::from_identity(&m)
            },
            info
        );
        let again = wanted_identity(
            &n,
            Some(&m),
            "10.0.0.1/24".parse().unwrap(),
            64512,
            None,
            Some(None),
        );
        assert_eq!(again.spec.vxlan_tunnel_address, m.spec.vxlan_tunnel_address);
        assert_eq!(again.spec.ipip_tunnel_address, None);
        // Unknown tunnels are left out of the patch; unused ones removed.
        let ann = identity_annotations("10.0.0.1/24".parse().unwrap(), 64512, None, Some(None));
        assert!(!ann.contains_key(ANN_VXLAN_ADDRESS));
        assert_eq!(ann[ANN_IPIP_ADDRESS], None);
    }
}
