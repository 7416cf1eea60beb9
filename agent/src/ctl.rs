//! `margayctl`'s commands: reading the agent's `/status` (BGP sessions,
//! routes) and the IPAM objects (show, check, release). Rendering is pure
//! (JSON in, table text out) so the tables are tested without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use margay_ipam::gc::{Leak, find_leaks, orphaned_blocks};
use margay_ipam::model::{Block, validate_pools};
use margay_ipam::{Allocator, Cluster as _, Options, Store};
use serde::Serialize;
use serde_json::{Value, json};

use crate::kube_store::KubeStore;

/// GET `path` from the agent's HTTP endpoint at `addr` (`host:port`).
pub fn agent_get(addr: &str, path: &str) -> anyhow::Result<Value> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| {
        format!("cannot reach margay-agent at {addr} (is it running on this node? --agent sets the address)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("malformed reply from the agent")?;
    serde_json::from_str(body).context("the agent's /status is not JSON")
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut o = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ");
        o.truncate(o.trim_end().len());
        o.push('\n');
        o
    };
    let mut o = line(head.to_vec());
    for r in rows {
        o.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    o
}

fn since(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `node status` as text, from the agent's `/status`.
pub fn render_node_status(st: &Value) -> String {
    let r = &st["routing"];
    let asn = r["asn"].as_u64().unwrap_or(0);
    let mut o = format!(
        "margay-agent is running on {} (address {}, AS {asn}): {}\n",
        st["node"].as_str().unwrap_or("?"),
        r["address"].as_str().unwrap_or("unknown"),
        if st["ready"] == true {
            "ready"
        } else {
            "NOT ready"
        }
    );
    for why in st["not_ready"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "  not ready: {}\n",
            why.as_str().unwrap_or_default()
        ));
    }
    for p in r["problems"].as_array().into_iter().flatten() {
        o.push_str(&format!("  problem: {}\n", p.as_str().unwrap_or_default()));
    }
    o.push_str("\nBGP sessions\n");
    let rows: Vec<Vec<String>> = st["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let peer_asn = p["asn"].as_u64().unwrap_or(0);
            let kind = match (p["dynamic"] == true, peer_asn == asn) {
                (true, _) => "dynamic",
                (false, true) => "node-to-node",
                (false, false) => "external",
            };
            vec![
                p["address"].as_str().unwrap_or_default().to_string(),
                peer_asn.to_string(),
                kind.to_string(),
                p["state"].as_str().unwrap_or_default().to_string(),
                since(p["since_seconds"].as_u64().unwrap_or(0)),
                p["prefixes_received"].to_string(),
                p["prefixes_sent"].to_string(),
                p["last_error"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    o.push_str(&table(
        &[
            "PEER",
            "ASN",
            "TYPE",
            "STATE",
            "SINCE",
            "RECEIVED",
            "SENT",
            "LAST ERROR",
        ],
        &rows,
    ));
    o
}

/// `routes` as text: BGP best routes and what was programmed.
pub fn render_routes(st: &Value) -> String {
    let rows: Vec<Vec<String>> = st["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let hops: Vec<String> = r["next_hops"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str().map(str::to_string))
                .collect();
            let path: Vec<String> = r["as_path"]
                .as_array()
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            vec![
                r["prefix"].as_str().unwrap_or_default().to_string(),
                if hops.is_empty() {
                    "-".into()
                } else {
                    hops.join(",")
                },
                r["from"].as_str().unwrap_or_default().to_string(),
                if path.is_empty() {
                    "-".into()
                } else {
                    path.join(" ")
                },
            ]
        })
        .collect();
    table(&["PREFIX", "NEXT HOPS", "FROM", "AS PATH"], &rows)
}

/// What `ipam show` reports.
#[derive(Debug, Clone, Serialize)]
pub struct IpamShow {
    /// Per pool: name, CIDR, encapsulation, addresses used, capacity, blocks.
    pub pools: Vec<Value>,
    /// Per block: name, CIDR, pool, node, used, size.
    pub blocks: Vec<Value>,
    /// Per node: blocks and addresses in use.
    pub nodes: Vec<Value>,
}

/// Builds `ipam show` from the pools and blocks.
pub fn ipam_show(pools: &[margay_ipam::crd::IPPool], blocks: &[Block]) -> IpamShow {
    let (valid, _) = validate_pools(pools);
    let mut out = IpamShow {
        pools: vec![],
        blocks: vec![],
        nodes: vec![],
    };
    for p in &valid {
        let bits = if p.cidr.is_ipv4() { 32 } else { 128 };
        let capacity = 1u128 << (bits - p.cidr.prefix()).min(127);
        let mine: Vec<&Block> = blocks.iter().filter(|b| b.pool == p.name).collect();
        let used: usize = mine.iter().map(|b| b.allocations.len()).sum();
        out.pools
            .push(json!({"name": p.name, "cidr": p.cidr.to_string(),
            "encapsulation": format!("{:?}", p.encapsulation), "used": used,
            "capacity": capacity.to_string(), "blocks": mine.len()}));
    }
    let mut per_node: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for b in blocks {
        let size = 1u128 << ((if b.cidr.is_ipv4() { 32 } else { 128 }) - b.cidr.prefix()).min(127);
        let node = b.node.clone().unwrap_or_else(|| "-".into());
        out.blocks.push(
            json!({"name": b.name, "cidr": b.cidr.to_string(), "pool": b.pool,
            "node": node, "used": b.allocations.len(), "size": size.to_string()}),
        );
        let e = per_node.entry(node).or_default();
        e.0 += 1;
        e.1 += b.allocations.len();
    }
    out.nodes = per_node
        .into_iter()
        .map(|(n, (b, a))| json!({"node": n, "blocks": b, "addresses": a}))
        .collect();
    out
}

/// `ipam show` as text.
pub fn render_ipam_show(s: &IpamShow) -> String {
    let cell = |v: &Value, k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows = |list: &[Value], keys: &[&str]| -> Vec<Vec<String>> {
        list.iter()
            .map(|v| keys.iter().map(|k| cell(v, k)).collect())
            .collect()
    };
    let mut o = String::from("IP pools\n");
    o.push_str(&table(
        &[
            "NAME",
            "CIDR",
            "ENCAPSULATION",
            "IN USE",
            "CAPACITY",
            "BLOCKS",
        ],
        &rows(
            &s.pools,
            &[
                "name",
                "cidr",
                "encapsulation",
                "used",
                "capacity",
                "blocks",
            ],
        ),
    ));
    o.push_str("\nNodes\n");
    o.push_str(&table(
        &["NODE", "BLOCKS", "ADDRESSES"],
        &rows(&s.nodes, &["node", "blocks", "addresses"]),
    ));
    o.push_str("\nBlocks\n");
    o.push_str(&table(
        &["BLOCK", "POOL", "NODE", "IN USE", "SIZE"],
        &rows(&s.blocks, &["cidr", "pool", "node", "used", "size"]),
    ));
    o
}

/// What `ipam check` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IpamCheck {
    /// Addresses whose pod or node is gone.
    pub leaks: Vec<Leak>,
    /// Addresses allocated in more than one block.
    pub duplicates: Vec<Value>,
    /// Blocks whose node is gone, or whose pool is.
    pub orphans: Vec<Value>,
    /// Nothing found.
    pub ok: bool,
}

/// Builds `ipam check` (pure).
pub fn ipam_check(
    blocks: &[Block],
    pool_names: &BTreeSet<String>,
    nodes: &BTreeSet<String>,
    pods: &std::collections::HashMap<(String, String), String>,
) -> IpamCheck {
    let mut c = IpamCheck {
        leaks: find_leaks(blocks, nodes, pods),
        ..Default::default()
    };
    let mut seen: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for b in blocks {
        for ip in b.allocations.keys() {
            seen.entry(*ip).or_default().push(&b.name);
        }
    }
    c.duplicates = seen
        .into_iter()
        .filter(|(_, bs)| bs.len() > 1)
        .map(|(ip, bs)| json!({"address": ip, "blocks": bs}))
        .collect();
    c.orphans = orphaned_blocks(blocks, nodes)
        .into_iter()
        .map(|(b, n)| json!({"block": b, "why": format!("node {n} no longer exists")}))
        .collect();
    for b in blocks.iter().filter(|b| !pool_names.contains(&b.pool)) {
        c.orphans
            .push(json!({"block": b.name, "why": format!("pool {} no longer exists", b.pool)}));
    }
    c.ok = c.leaks.is_empty() && c.duplicates.is_empty() && c.orphans.is_empty();
    c
}

/// `ipam check` as text.
pub fn render_ipam_check(c: &IpamCheck) -> String {
    let mut o = String::new();
    let rows: Vec<Vec<String>> = c
        .leaks
        .iter()
        .map(|l| {
            vec![
                l.address.to_string(),
                l.node.clone(),
                l.pod
                    .as_ref()
                    .map_or("-".into(), |p| format!("{}/{}", p.namespace, p.name)),
                format!("{:?}", l.reason),
                l.handle.clone(),
            ]
        })
        .collect();
    o.push_str(&format!("Leaked addresses: {}\n", c.leaks.len()));
    if !rows.is_empty() {
        o.push_str(&table(
            &["ADDRESS", "NODE", "POD", "REASON", "HANDLE"],
            &rows,
        ));
    }
    o.push_str(&format!("Duplicate addresses: {}\n", c.duplicates.len()));
    for d in &c.duplicates {
        o.push_str(&format!("  {} in {}\n", d["address"], d["blocks"]));
    }
    o.push_str(&format!("Orphaned blocks: {}\n", c.orphans.len()));
    for b in &c.orphans {
        o.push_str(&format!(
            "  {}: {}\n",
            b["block"].as_str().unwrap_or_default(),
            b["why"].as_str().unwrap_or_default()
        ));
    }
    o.push_str(if c.ok {
        "IPAM is consistent.\n"
    } else {
        "Problems found (release leaks with `margayctl ipam release --from-report`).\n"
    });
    o
}

/// Reads everything `ipam check` needs.
pub async fn collect_check(store: &KubeStore) -> anyhow::Result<IpamCheck> {
    let blocks = store.list_blocks().await?;
    let pools: BTreeSet<String> = store
        .pools()
        .await?
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    Ok(ipam_check(
        &blocks,
        &pools,
        &store.nodes().await?,
        &store.pods().await?,
    ))
}

/// Whether node `name`'s agent looks alive: its `MargayReady` heartbeat is
/// recent.
pub async fn agent_live(client: &kube::Client, name: &str) -> anyhow::Result<bool> {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let Some(n) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let within = 2 * crate::bgp::HEARTBEAT + Duration::from_secs(30);
    Ok(n.status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .filter(|c| c.type_ == crate::bgp::CONDITION)
        .any(|c| crate::bgp::heartbeat_within(&c, within)))
}

/// Releases the handles holding `addresses` (each on behalf of its node).
/// Refused, without changing anything, for an address whose node's agent is
/// live unless `force`.
pub async fn release(
    client: &kube::Client,
    store: std::sync::Arc<KubeStore>,
    addresses: &[IpAddr],
    force: bool,
) -> anyhow::Result<Vec<String>> {
    let blocks = store.list_blocks().await?;
    let mut todo: Vec<(String, String, IpAddr)> = Vec::new();
    for ip in addresses {
        let Some(a) = blocks.iter().find_map(|b| b.allocations.get(ip)) else {
            bail!("{ip} is not allocated");
        };
        if !force && agent_live(client, &a.node).await? {
            bail!(
                "{ip} belongs to node {}, whose agent is running: it releases leaks itself; use --force to release anyway",
                a.node
            );
        }
        todo.push((a.node.clone(), a.handle.clone(), *ip));
    }
    let mut done = Vec::new();
    for (node, handle, ip) in todo {
        let alloc = Allocator::start(store.clone(), &node, Options::default());
        let freed = alloc.release(&handle).await?;
        done.push(format!(
            "{ip}: released handle {handle} ({} addresses)",
            freed.len()
        ));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_status_table() {
        let st = json!({
            "node": "node1", "ready": true, "not_ready": [],
            "routing": {"asn": 64512, "address": "10.0.0.1/24", "problems": []},
            "peers": [
                {"address": "10.0.0.2", "asn": 64512, "state": "Established", "since_seconds": 75,
                 "prefixes_received": 1, "prefixes_sent": 1, "dynamic": false, "last_error": null},
                {"address": "10.0.0.254", "asn": 65000, "state": "Active", "since_seconds": 4000,
                 "prefixes_received": 0, "prefixes_sent": 0, "dynamic": false, "last_error": "hold timer expired"}
            ]
        });
        let t = render_node_status(&st);
        assert!(
            t.contains("running on node1 (address 10.0.0.1/24, AS 64512): ready"),
            "{t}"
        );
        let lines: Vec<&str> = t.lines().collect();
        let peer = lines.iter().find(|l| l.starts_with("10.0.0.2 ")).unwrap();
        assert!(
            peer.contains("node-to-node") && peer.contains("Established") && peer.contains("75s"),
            "{t}"
        );
        let ext = lines.iter().find(|l| l.starts_with("10.0.0.254")).unwrap();
        assert!(
            ext.contains("external") && ext.contains("66m") && ext.contains("hold timer expired"),
            "{t}"
        );
    }

    #[test]
    fn check_finds_duplicates_and_orphans() {
        let mut a = Block::new("10.0.0.0/26".parse().unwrap(), "p", "n1");
        let mut b = Block::new("10.0.0.0/27".parse().unwrap(), "gone", "n9");
        let rec = |node: &str| margay_ipam::crd::AllocationRecord {
            handle: "h".into(),
            node: node.into(),
            use_: margay_ipam::crd::AllowedUse::Tunnel,
            pod: None,
            since: String::new(),
        };
        a.allocations.insert("10.0.0.1".parse().unwrap(), rec("n1"));
        b.allocations.insert("10.0.0.1".parse().unwrap(), rec("n9"));
        let pools: BTreeSet<String> = ["p".to_string()].into();
        let nodes: BTreeSet<String> = ["n1".to_string()].into();
        let c = ipam_check(&[a, b], &pools, &nodes, &Default::default());
        assert!(!c.ok);
        assert_eq!(c.duplicates.len(), 1);
        assert_eq!(c.leaks.len(), 1, "n9's address: node gone");
        assert_eq!(c.orphans.len(), 2, "{:?}", c.orphans);
        let t = render_ipam_check(&c);
        assert!(
            t.contains("Duplicate addresses: 1") && t.contains("Orphaned blocks: 2"),
            "{t}"
        );
    }
}
