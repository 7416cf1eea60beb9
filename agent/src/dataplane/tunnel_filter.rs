//! Which addresses this node's tunnels take encapsulated packets from.
//!
//! `tunl0` (the ipip module's fallback device) takes every IPIP packet, and
//! [`VXLAN_DEV`] every VXLAN packet to UDP [`VXLAN_PORT`], whatever the
//! outer source: anyone who can send IP protocol 4 or UDP 4789 to a node
//! would hand its pods packets with any inner source, past NetworkPolicy
//! (which sees only the inner packet). As in Calico, a node takes them
//! from the cluster's nodes only: the table [`NFT_TUNNEL_TABLE`] holds the
//! known nodes' addresses (sets `nodes4`, `nodes6`) and, in a chain on the
//! input hook at priority -300 (before every filter chain; a drop there is
//! final whatever later chains accept), for each tunnel this node uses,
//! a rule dropping that tunnel's packets from any other source (IPv4 and
//! IPv6 forms).
//!
//! [`TunnelFilter`] is the table's content; [`render`] (pure) makes the nft
//! script that replaces the whole table in one transaction (loaded only
//! when it changes: nodes join and leave rarely), [`parse`] reads
//! `nft -j list table` back. [`FilterPlan::against`] (pure) merges what a
//! routing pass wants with what the kernel has: node addresses are added
//! from any Node list (current or stale) and removed only when it is
//! current ("could not read" never empties the set), and a tunnel's rules
//! stay as they are while whether it is used is unknown.
//!
//! IP protocol 4 is written as a number: nft's `ipip` keyword is protocol
//! 94 (`/etc/protocols`), not IP-in-IP.

use std::collections::BTreeSet;
use std::net::IpAddr;

use margay_delta::{Delta, Removals};

use super::nft_script::set;
use super::ownership::{NFT_TUNNEL_TABLE, TUNNEL_TABLE_NAME, VXLAN_DEV, VXLAN_PORT};
use super::{Error, PerTunnel, Result, Tunnel};

/// The input chain's priority (nft's `raw`).
pub const PRIORITY: i32 = -300;
/// The chain's name.
const CHAIN: &str = "input";

/// What the table holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelFilter {
    /// Addresses encapsulated packets are taken from (both families).
    pub nodes: BTreeSet<IpAddr>,
    /// The tunnels whose packets from any other address are dropped.
    pub guard: PerTunnel<bool>,
    /// The kernel's table is exactly what [`render`] makes of `nodes` and
    /// `guard` (read back: false when something else is there, and the
    /// table is to be loaded again).
    pub intact: bool,
}

impl TunnelFilter {
    /// A table of `nodes`, dropping the `guard`ed tunnels' packets from
    /// other addresses.
    pub fn new(nodes: BTreeSet<IpAddr>, guard: PerTunnel<bool>) -> Self {
        Self {
            nodes,
            guard,
            intact: true,
        }
    }
}

/// What a routing pass wants of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterPlan {
    /// The known Nodes' addresses (from a stale list too).
    pub nodes: BTreeSet<IpAddr>,
    /// Whether addresses the kernel's set has beyond `nodes` may go
    /// (`Allowed` only when the Node list is current).
    pub removals: Removals,
    /// Per tunnel: guarded (`Some(true)`: this node uses it), not guarded
    /// (`Some(false)`: it is retired), or as the kernel has it (`None`).
    pub guard: PerTunnel<Option<bool>>,
}

impl FilterPlan {
    /// The table to have, given the kernel's (`None`: no table); `None`
    /// when there is no table and none is needed (no tunnel guarded).
    pub fn against(&self, have: Option<&TunnelFilter>) -> Option<TunnelFilter> {
        let mut nodes = have.map(|h| h.nodes.clone()).unwrap_or_default();
        let d = Delta::between_sets(&self.nodes, &nodes, self.removals);
        for k in d.remove {
            nodes.remove(&k);
        }
        nodes.extend(d.set.into_iter().map(|(k, ())| k));
        let guard = self
            .guard
            .map(|t, want| want.unwrap_or_else(|| have.is_some_and(|h| *h.guard.get(t))));
        if have.is_none() && !guard.vxlan && !guard.ipip {
            return None;
        }
        Some(TunnelFilter::new(nodes, guard))
    }
}

/// The rules of tunnel `t`: (comment, what the rule matches), IPv4 first.
fn rules(t: Tunnel) -> [(String, String); 2] {
    match t {
        Tunnel::Ipip => [
            (
                "ipip v4".into(),
                "meta l4proto 4 ip saddr != @nodes4".into(),
            ),
            (
                "ipip v6".into(),
                "meta l4proto 4 ip6 saddr != @nodes6".into(),
            ),
        ],
        Tunnel::Vxlan => [
            (
                format!("vxlan v4 port {VXLAN_PORT}"),
                format!("udp dport {VXLAN_PORT} ip saddr != @nodes4"),
            ),
            (
                format!("vxlan v6 port {VXLAN_PORT}"),
                format!("udp dport {VXLAN_PORT} ip6 saddr != @nodes6"),
            ),
        ],
    }
}

/// The comments of the rules `guard` asks for, in table order.
fn expected(guard: &PerTunnel<bool>) -> Vec<String> {
    Tunnel::ALL
        .into_iter()
        .filter(|t| *guard.get(*t))
        .flat_map(|t| rules(t).map(|(c, _)| c))
        .collect()
}

/// The nft script that makes the table `f`, in one transaction (creating
/// the table first makes the delete succeed whether or not it existed).
pub fn render(f: &TunnelFilter) -> String {
    let t = NFT_TUNNEL_TABLE;
    let mut s = format!("table {t}\ndelete table {t}\ntable {t} {{\n");
    for (name, kind, v4) in [
        ("nodes4", "ipv4_addr", true),
        ("nodes6", "ipv6_addr", false),
    ] {
        let of_family = f.nodes.iter().filter(|a| a.is_ipv4() == v4);
        s.push_str(&set(name, kind, None, of_family));
    }
    if f.guard.vxlan || f.guard.ipip {
        s.push_str(&format!(
            "  chain {CHAIN} {{\n    type filter hook input priority {PRIORITY}; policy accept;\n"
        ));
        for t in Tunnel::ALL.into_iter().filter(|t| *f.guard.get(*t)) {
            for (comment, matches) in rules(t) {
                s.push_str(&format!(
                    "    {matches} counter drop comment \"{comment}\"\n"
                ));
            }
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

fn not_understood(why: impl std::fmt::Display) -> Error {
    Error::Nft(format!("the {NFT_TUNNEL_TABLE} listing: {why}"))
}

/// Whether `nft -j list tables` lists the table.
pub fn lists_table(json: &str) -> Result<bool> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(not_understood)?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["table"]["family"] == "inet" && o["table"]["name"] == TUNNEL_TABLE_NAME))
}

/// The table as `nft -j list table` shows it. Anything [`render`] would
/// not have made (another chain, a missing or changed rule, an element
/// that is not a plain address) makes it not [`intact`](TunnelFilter::intact).
pub fn parse(json: &str) -> Result<TunnelFilter> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(not_understood)?;
    let objects = v["nftables"]
        .as_array()
        .ok_or_else(|| not_understood("no \"nftables\" array"))?;
    let mut nodes = BTreeSet::new();
    let mut intact = true;
    let mut sets = BTreeSet::new();
    let mut chain = false;
    let mut comments = Vec::new();
    for o in objects {
        if let Some(s) = o.get("set") {
            let name = s["name"].as_str().unwrap_or_default();
            intact &= sets.insert(name.to_string());
            intact &= matches!(name, "nodes4" | "nodes6");
            let elems = match &s["elem"] {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(a) => a.clone(),
                one => vec![one.clone()],
            };
            for e in elems {
                match e.as_str().and_then(|a| a.parse::<IpAddr>().ok()) {
                    Some(a) => {
                        intact &= a.is_ipv4() == (name == "nodes4");
                        nodes.insert(a);
                    }
                    None => intact = false,
                }
            }
        } else if let Some(c) = o.get("chain") {
            intact &= !chain
                && c["name"] == CHAIN
                && c["hook"] == "input"
                && c["prio"] == PRIORITY
                && c["policy"] == "accept";
            chain = true;
        } else if let Some(r) = o.get("rule") {
            intact &= r["chain"] == CHAIN;
            comments.push(r["comment"].as_str().unwrap_or_default().to_string());
        } else if o.get("metainfo").is_none() && o.get("table").is_none() {
            intact = false;
        }
    }
    let guard = PerTunnel::default().map(|t, _: &bool| {
        rules(t)
            .iter()
            .all(|(c, _)| comments.iter().any(|have| have == c))
    });
    intact &=
        sets.len() == 2 && chain == (guard.vxlan || guard.ipip) && comments == expected(&guard);
    Ok(TunnelFilter {
        nodes,
        guard,
        intact,
    })
}

/// The table in this process's namespace (`None`: there is none).
pub(super) async fn read() -> Result<Option<TunnelFilter>> {
    let tables = super::nft_script::list_json(&["list", "tables", "inet"]).await?;
    if !lists_table(&tables)? {
        return Ok(None);
    }
    let json = super::nft_script::list_json(&["list", "table", "inet", TUNNEL_TABLE_NAME]).await?;
    parse(&json).map(Some)
}

/// Replaces the table in this process's namespace with `f`.
pub(super) async fn load(f: &TunnelFilter) -> Result<()> {
    super::nft_script::load(&render(f), NFT_TUNNEL_TABLE).await
}

/// What `/status` says of a table: the tunnels it guards and how many
/// node addresses it takes them from.
pub fn describe(f: &TunnelFilter) -> String {
    let guarded: Vec<String> = Tunnel::ALL
        .into_iter()
        .filter(|t| *f.guard.get(*t))
        .map(|t| match t {
            Tunnel::Vxlan => format!("VXLAN ({VXLAN_DEV}, UDP {VXLAN_PORT})"),
            Tunnel::Ipip => "IPIP (tunl0)".to_string(),
        })
        .collect();
    if guarded.is_empty() {
        return format!("no tunnel guarded; {} node addresses kept", f.nodes.len());
    }
    format!(
        "{} taken from {} node addresses only",
        guarded.join(" and "),
        f.nodes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which tunnels are guarded.
    fn guard(vxlan: bool, ipip: bool) -> PerTunnel<bool> {
        PerTunnel { vxlan, ipip }
    }

    fn addrs(a: &[&str]) -> BTreeSet<IpAddr> {
        a.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn plan(nodes: &[&str], removals: Removals, guard: PerTunnel<Option<bool>>) -> FilterPlan {
        FilterPlan {
            nodes: addrs(nodes),
            removals,
            guard,
        }
    }

    const VXLAN: PerTunnel<Option<bool>> = PerTunnel {
        vxlan: Some(true),
        ipip: None,
    };

    #[test]
    fn a_plan_adds_always_removes_when_allowed_and_keeps_unknown_guards() {
        let have = TunnelFilter::new(addrs(&["10.0.0.1", "10.0.0.9"]), guard(false, true));
        // Stale Nodes: 10.0.0.9 (gone from the list) stays, .2 is added;
        // IPIP's rules stay as they are.
        let p = plan(&["10.0.0.1", "10.0.0.2"], Removals::Forbidden, VXLAN);
        let got = p.against(Some(&have)).unwrap();
        assert_eq!(got.nodes, addrs(&["10.0.0.1", "10.0.0.2", "10.0.0.9"]));
        assert_eq!(got.guard, guard(true, true));
        // Current: exactly the list; a retired tunnel's rules go.
        let mut p = plan(&["10.0.0.1", "fd00::1"], Removals::Allowed, VXLAN);
        p.guard.ipip = Some(false);
        let got = p.against(Some(&have)).unwrap();
        assert_eq!(got.nodes, addrs(&["10.0.0.1", "fd00::1"]));
        assert_eq!(got.guard, guard(true, false));
        // No table and nothing to guard: none is made; with a tunnel to
        // guard, one is.
        let idle = plan(&["10.0.0.1"], Removals::Allowed, PerTunnel::default());
        assert_eq!(idle.against(None), None);
        assert!(p.against(None).is_some_and(|f| f.guard.vxlan && f.intact));
        // A table that exists is kept, rules or not.
        let off = TunnelFilter::new(addrs(&["10.0.0.1"]), PerTunnel::default());
        assert_eq!(idle.against(Some(&off)), Some(off));
    }

    #[test]
    fn renders_the_rules_of_guarded_tunnels_only() {
        let f = TunnelFilter::new(
            addrs(&["10.0.0.2", "10.0.0.1", "fd00::1"]),
            guard(true, false),
        );
        let s = render(&f);
        assert!(s.starts_with(
            "table inet margay_tunnel\ndelete table inet margay_tunnel\ntable inet margay_tunnel {\n"
        ));
        assert!(
            s.contains("set nodes4 { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set nodes6 { type ipv6_addr; elements = { fd00::1 }; }"),
            "{s}"
        );
        assert!(s.contains("type filter hook input priority -300; policy accept;"));
        assert!(s.contains(
            "udp dport 4789 ip saddr != @nodes4 counter drop comment \"vxlan v4 port 4789\""
        ));
        assert!(s.contains("udp dport 4789 ip6 saddr != @nodes6 counter drop"));
        assert!(!s.contains("l4proto"), "IPIP is not used: {s}");
        let ipip = render(&TunnelFilter::new(BTreeSet::new(), guard(false, true)));
        assert!(ipip.contains("set nodes4 { type ipv4_addr; }"), "{ipip}");
        assert!(ipip.contains("meta l4proto 4 ip saddr != @nodes4 counter drop"));
        let none = render(&TunnelFilter::new(
            addrs(&["10.0.0.1"]),
            PerTunnel::default(),
        ));
        assert!(!none.contains("chain"), "{none}");
    }

    /// What nft 1.0.6 printed for `nft -j list table inet margay_tunnel`
    /// after loading [`render`]'s script for two IPv4 nodes and IPIP.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "margay_tunnel", "handle": 2}}, {"set": {"family": "inet", "name": "nodes4", "table": "margay_tunnel", "type": "ipv4_addr", "handle": 2, "elem": ["10.99.0.1", "10.99.0.2"]}}, {"set": {"family": "inet", "name": "nodes6", "table": "margay_tunnel", "type": "ipv6_addr", "handle": 3}}, {"chain": {"family": "inet", "table": "margay_tunnel", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": -300, "policy": "accept"}}, {"rule": {"family": "inet", "table": "margay_tunnel", "chain": "input", "handle": 4, "comment": "ipip v4", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipencap"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@nodes4"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "margay_tunnel", "chain": "input", "handle": 5, "comment": "ipip v6", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipencap"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@nodes6"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]}"#;

    /// The same for both tunnels, an IPv4 node and two IPv6 ones.
    const LISTED_BOTH: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "margay_tunnel", "handle": 2}}, {"set": {"family": "inet", "name": "nodes4", "table": "margay_tunnel", "type": "ipv4_addr", "handle": 2, "elem": ["10.0.0.1"]}}, {"set": {"family": "inet", "name": "nodes6", "table": "margay_tunnel", "type": "ipv6_addr", "handle": 3, "elem": ["fd00::1", "fd00::2"]}}, {"chain": {"family": "inet", "table": "margay_tunnel", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": -300, "policy": "accept"}}, {"rule": {"family": "inet", "table": "margay_tunnel", "chain": "input", "handle": 4, "comment": "vxlan v4 port 4789", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 4789}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@nodes4"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "margay_tunnel", "chain": "input", "handle": 5, "comment": "vxlan v6 port 4789", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 4789}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@nodes6"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "margay_tunnel", "chain": "input", "handle": 6, "comment": "ipip v4", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipencap"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@nodes4"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "margay_tunnel", "chain": "input", "handle": 7, "comment": "ipip v6", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipencap"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@nodes6"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]}"#;

    #[test]
    fn parses_what_nft_lists() {
        let both = TunnelFilter::new(
            addrs(&["10.0.0.1", "fd00::1", "fd00::2"]),
            guard(true, true),
        );
        assert_eq!(parse(LISTED_BOTH).unwrap(), both);
        let f = parse(LISTED).unwrap();
        let want = TunnelFilter::new(addrs(&["10.99.0.1", "10.99.0.2"]), guard(false, true));
        assert_eq!(f, want);
        // One rule gone: IPIP no longer counts as guarded, and the table
        // is to be loaded again.
        let mut v: serde_json::Value = serde_json::from_str(LISTED).unwrap();
        v["nftables"].as_array_mut().unwrap().pop();
        let f = parse(&v.to_string()).unwrap();
        assert!(!f.guard.ipip && !f.intact, "{f:?}");
        // A chain of someone else's in the table: not intact.
        let mut v: serde_json::Value = serde_json::from_str(LISTED).unwrap();
        v["nftables"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(
                {"chain": {"name": "extra", "hook": "input", "prio": 0, "policy": "accept"}}
            ));
        assert!(!parse(&v.to_string()).unwrap().intact);
        assert!(parse("not json").is_err());
        let tables = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "margay_tunnel", "handle": 2}}]}"#;
        assert!(lists_table(tables).unwrap());
        assert!(!lists_table(r#"{"nftables": [{"metainfo": {}}]}"#).unwrap());
    }
}
