//! `margayctl`'s commands: reading the agent's `/status` (BGP sessions,
//! routes), the IPAM objects (show, check, release) and the NetworkPolicy
//! world (`policy show|check`, decided by `margay_policy::explain`).
//! Everything is typed (`margay_api::status`, `margay_api::ctl`,
//! `margay_policy::explain`); rendering is pure (a report in, table text
//! out) so the tables are tested without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use margay_api::ctl::{BlockUsage, Duplicate, IpamCheck, IpamShow, NodeUsage, Orphan, PoolUsage};
use margay_api::status::AgentStatus;
use margay_ipam::gc::{find_leaks, orphaned_blocks};
use margay_ipam::k8s::KubeStore;
use margay_ipam::model::{Block, validate_pools};
use margay_ipam::reserve::is_spare;
use margay_ipam::{Allocator, Cluster as _, Options, Store};
use margay_policy::World;
use margay_policy::explain::{Check, PodPolicies};
use margay_policy::spec::Side;

use crate::{Error, Result};

/// GET `/status` from the agent's HTTP endpoint at `addr` (`host:port`).
pub fn agent_status(addr: &str) -> Result<AgentStatus> {
    let io = |what: &str| {
        let what = format!("{what} margay-agent at {addr}");
        move |e| Error::io(what, e)
    };
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| {
        Error::io(
            format!("cannot reach margay-agent at {addr} (is it running on this node? --agent sets the address)"),
            e,
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("asking"))?;
    s.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(io("asking"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(io("reading from"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| Error::Config("malformed reply from the agent".into()))?;
    serde_json::from_str(body).map_err(|e| {
        Error::Config(format!(
            "the agent's /status is not what margayctl reads: {e}"
        ))
    })
}

/// A text table: `head`, then one row of `cells` per item, columns padded.
fn table<T>(head: &[&str], items: &[T], cells: impl Fn(&T) -> Vec<String>) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(cells).collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
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
    for r in &rows {
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

/// The NetworkPolicy lines of `node status`.
pub fn render_policy_status(p: &margay_api::status::PolicyStatus) -> String {
    let what = if p.enforcing {
        format!(
            "{} policies, {} workload interfaces, {} pods known ({})",
            p.policies,
            p.endpoints,
            p.pods,
            if p.remote_pods {
                "this node's and others': a policy has pod peers"
            } else {
                "this node's only: no policy has pod peers"
            }
        )
    } else {
        format!(
            "not enforced (--disable-policy); sources of {} workload interfaces checked",
            p.endpoints
        )
    };
    let mut o = if p.current {
        format!("  NetworkPolicy: table current; {what}\n")
    } else if !p.waiting_for.is_empty() {
        format!(
            "  NetworkPolicy: table NOT current ({} not listed yet); {what}\n",
            p.waiting_for.join(", ")
        )
    } else {
        format!(
            "  NetworkPolicy: table NOT current ({}); {what}\n",
            p.last_error.as_deref().unwrap_or("not loaded yet")
        )
    };
    for u in &p.unenforced {
        o.push_str(&format!(
            "  NetworkPolicy {}/{} NOT ENFORCED AS WRITTEN ({}): its pods isolated by it, nothing allowed\n",
            u.namespace, u.name, u.message
        ));
    }
    o
}

/// `node status` as text, from the agent's `/status`.
pub fn render_node_status(st: &AgentStatus) -> String {
    let r = &st.routing;
    let mut o = format!(
        "margay-agent is running on {} (address {}, AS {}): {}\n",
        st.node,
        r.address.as_deref().unwrap_or("unknown"),
        r.asn,
        if st.ready { "ready" } else { "NOT ready" }
    );
    for why in &st.not_ready {
        o.push_str(&format!("  not ready: {why}\n"));
    }
    for p in &r.problems {
        o.push_str(&format!("  problem: {p}\n"));
    }
    for t in &r.tunnels {
        o.push_str(&format!("  tunnel: {t}\n"));
    }
    let api = &st.api;
    match (api.answering, &api.last_error, api.answered_seconds_ago) {
        (true, None, _) => o.push_str("  Kubernetes API: answering"),
        (true, Some(e), _) => o.push_str(&format!(
            "  Kubernetes API: answering, but it refused the heartbeat Lease ({e})"
        )),
        (false, Some(e), Some(ago)) => o.push_str(&format!(
            "  Kubernetes API: NOT answering ({e}; last answer {} ago)",
            since(ago)
        )),
        (false, Some(e), None) => o.push_str(&format!("  Kubernetes API: NOT answering ({e})")),
        (false, None, _) => o.push_str("  Kubernetes API: not asked yet"),
    }
    o.push_str(if api.leader {
        "; this agent is the leader (pool status, garbage collection)\n"
    } else {
        "\n"
    });
    if let Some(p) = &st.policy {
        o.push_str(&render_policy_status(p));
    }
    o.push_str("\nBGP sessions\n");
    let head = [
        "PEER",
        "ASN",
        "TYPE",
        "STATE",
        "SINCE",
        "RECEIVED",
        "SENT",
        "BFD",
        "LAST ERROR",
    ];
    o.push_str(&table(&head, &st.peers, |p| {
        let kind = match (p.dynamic, p.asn == r.asn) {
            (true, _) => "dynamic",
            (false, true) => "node-to-node",
            (false, false) => "external",
        };
        vec![
            p.address.to_string(),
            p.asn.to_string(),
            kind.to_string(),
            format!("{:?}", p.state),
            since(p.since_seconds.unwrap_or(0)),
            p.prefixes_received.to_string(),
            p.prefixes_sent.to_string(),
            p.bfd.map_or("-".to_string(), |b| format!("{b:?}")),
            p.last_error.clone().unwrap_or_default(),
        ]
    }));
    o
}

/// `routes` as text: the BGP best routes.
pub fn render_routes(st: &AgentStatus) -> String {
    let dash = |v: Vec<String>, sep: &str| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(sep)
        }
    };
    table(
        &["PREFIX", "NEXT HOPS", "FROM", "AS PATH"],
        &st.routes,
        |r| {
            vec![
                r.prefix.clone(),
                dash(r.next_hops.iter().map(ToString::to_string).collect(), ","),
                r.from.clone(),
                dash(r.as_path.iter().map(ToString::to_string).collect(), " "),
            ]
        },
    )
}

fn size(net: &ipnetwork::IpNetwork) -> String {
    let bits = if net.is_ipv4() { 32 } else { 128 };
    (1u128 << (bits - net.prefix()).min(127)).to_string()
}

/// Builds `ipam show` from the pools and blocks.
pub fn ipam_show(pools: &[margay_api::ipam::IPPool], blocks: &[Block]) -> IpamShow {
    let (valid, _) = validate_pools(pools);
    let spares = |b: &Block| b.allocations.values().filter(|a| is_spare(a)).count();
    let mut out = IpamShow::default();
    for p in &valid {
        let mine: Vec<&Block> = blocks.iter().filter(|b| b.pool == p.name).collect();
        out.pools.push(PoolUsage {
            name: p.name.clone(),
            cidr: p.cidr.to_string(),
            encapsulation: p.encapsulation,
            used: mine.iter().map(|b| b.allocations.len()).sum(),
            spares: mine.iter().map(|b| spares(b)).sum(),
            capacity: size(&p.cidr),
            blocks: mine.len(),
        });
    }
    let mut per_node: BTreeMap<String, NodeUsage> = BTreeMap::new();
    for b in blocks {
        let node = b.node.clone().unwrap_or_else(|| "-".into());
        out.blocks.push(BlockUsage {
            name: b.name.clone(),
            cidr: b.cidr.to_string(),
            pool: b.pool.clone(),
            node: node.clone(),
            used: b.allocations.len(),
            spares: spares(b),
            size: size(&b.cidr),
        });
        let e = per_node.entry(node.clone()).or_insert_with(|| NodeUsage {
            node,
            blocks: 0,
            addresses: 0,
            spares: 0,
        });
        e.blocks += 1;
        e.addresses += b.allocations.len();
        e.spares += spares(b);
    }
    out.nodes = per_node.into_values().collect();
    out
}

/// `ipam show` as text: IN USE counts addresses held by pods (and tunnel
/// devices), SPARES those pre-assigned to a node for its next pods.
pub fn render_ipam_show(s: &IpamShow) -> String {
    let mut o = String::from("IP pools\n");
    let head = [
        "NAME",
        "CIDR",
        "ENCAPSULATION",
        "IN USE",
        "SPARES",
        "CAPACITY",
        "BLOCKS",
    ];
    o.push_str(&table(&head, &s.pools, |p| {
        vec![
            p.name.clone(),
            p.cidr.clone(),
            serde_json::to_value(p.encapsulation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            (p.used - p.spares).to_string(),
            p.spares.to_string(),
            p.capacity.clone(),
            p.blocks.to_string(),
        ]
    }));
    o.push_str("\nNodes\n");
    o.push_str(&table(
        &["NODE", "BLOCKS", "IN USE", "SPARES"],
        &s.nodes,
        |n| {
            vec![
                n.node.clone(),
                n.blocks.to_string(),
                (n.addresses - n.spares).to_string(),
                n.spares.to_string(),
            ]
        },
    ));
    o.push_str("\nBlocks\n");
    let head = ["BLOCK", "POOL", "NODE", "IN USE", "SPARES", "SIZE"];
    o.push_str(&table(&head, &s.blocks, |b| {
        vec![
            b.cidr.clone(),
            b.pool.clone(),
            b.node.clone(),
            (b.used - b.spares).to_string(),
            b.spares.to_string(),
            b.size.clone(),
        ]
    }));
    o
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
    let mut seen: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for b in blocks {
        for ip in b.allocations.keys() {
            seen.entry(*ip).or_default().push(b.name.clone());
        }
    }
    c.duplicates = seen
        .into_iter()
        .filter(|(_, bs)| bs.len() > 1)
        .map(|(address, blocks)| Duplicate { address, blocks })
        .collect();
    c.orphans = orphaned_blocks(blocks, nodes)
        .into_iter()
        .map(|(b, n)| Orphan {
            block: b,
            why: format!("node {n} no longer exists"),
        })
        .collect();
    for b in blocks.iter().filter(|b| !pool_names.contains(&b.pool)) {
        c.orphans.push(Orphan {
            block: b.name.clone(),
            why: format!("pool {} no longer exists", b.pool),
        });
    }
    c.corrupt = blocks
        .iter()
        .filter_map(|b| {
            Some(Orphan {
                block: b.name.clone(),
                why: b.corrupt.clone()?,
            })
        })
        .collect();
    c.ok = c.leaks.is_empty()
        && c.duplicates.is_empty()
        && c.orphans.is_empty()
        && c.corrupt.is_empty();
    c
}

/// `ipam check` as text.
pub fn render_ipam_check(c: &IpamCheck) -> String {
    let mut o = String::new();
    o.push_str(&format!("Leaked addresses: {}\n", c.leaks.len()));
    if !c.leaks.is_empty() {
        let head = ["ADDRESS", "NODE", "POD", "REASON", "HANDLE"];
        o.push_str(&table(&head, &c.leaks, |l| {
            vec![
                l.address.to_string(),
                l.node.clone(),
                l.pod
                    .as_ref()
                    .map_or("-".into(), |p| format!("{}/{}", p.namespace, p.name)),
                format!("{:?}", l.reason),
                l.handle.clone(),
            ]
        }));
    }
    o.push_str(&format!("Duplicate addresses: {}\n", c.duplicates.len()));
    for d in &c.duplicates {
        o.push_str(&format!("  {} in {}\n", d.address, d.blocks.join(", ")));
    }
    o.push_str(&format!("Orphaned blocks: {}\n", c.orphans.len()));
    for b in &c.orphans {
        o.push_str(&format!("  {}: {}\n", b.block, b.why));
    }
    if !c.corrupt.is_empty() {
        o.push_str(&format!(
            "Blocks that do not parse: {} (their addresses are neither handed out nor released; fix or delete them with kubectl)\n",
            c.corrupt.len()
        ));
        for b in &c.corrupt {
            o.push_str(&format!("  {}: {}\n", b.block, b.why));
        }
    }
    o.push_str(if c.ok {
        "IPAM is consistent.\n"
    } else {
        "Problems found (release leaks with `margayctl ipam release --from-report`).\n"
    });
    o
}

/// Reads everything `ipam check` needs.
pub async fn collect_check(store: &KubeStore) -> Result<IpamCheck> {
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

/// Whether node `name`'s agent looks alive. Its heartbeat Lease is looked
/// for in `namespaces` in order: the Lease namespace first (what it says
/// there is the answer), then the agents' namespace, where agents before
/// the Lease namespace renewed theirs (alive there is alive; an expired one
/// is what an upgrade leaves behind and says nothing). Without a Lease
/// that answers, its `MargayReady` heartbeat is recent.
pub async fn agent_live(client: &kube::Client, namespaces: &[String], name: &str) -> Result<bool> {
    use k8s_openapi::api::coordination::v1::Lease;
    let lease = margay_api::node::heartbeat_lease(name);
    for (i, ns) in namespaces.iter().enumerate() {
        let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), ns);
        if let Ok(Some(l)) = leases.get_opt(&lease).await {
            let alive = margay_api::node::lease_alive(&l, std::time::Duration::from_secs(30));
            if alive || i == 0 {
                return Ok(alive);
            }
        }
    }
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let n = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube(format!("reading Node {name}"), e))?;
    Ok(n.as_ref().is_some_and(margay_api::node::agent_alive))
}

/// Releases the handles holding `addresses` (each on behalf of its node).
/// Refused, without changing anything, for an address whose node's agent is
/// live unless `force` (heartbeat Leases looked for in `lease_namespaces`,
/// as [`agent_live`] does).
pub async fn release(
    client: &kube::Client,
    lease_namespaces: &[String],
    store: std::sync::Arc<KubeStore>,
    addresses: &[IpAddr],
    force: bool,
) -> Result<Vec<String>> {
    let blocks = store.list_blocks().await?;
    let mut todo: Vec<(String, String, IpAddr)> = Vec::new();
    for ip in addresses {
        let Some(a) = blocks.iter().find_map(|b| b.allocations.get(ip)) else {
            return Err(Error::Config(format!("{ip} is not allocated")));
        };
        if !force && agent_live(client, lease_namespaces, &a.node).await? {
            return Err(Error::Config(format!(
                "{ip} belongs to node {}, whose agent is running: it releases leaks itself; use --force to release anyway",
                a.node
            )));
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

/// Every Namespace, Pod and NetworkPolicy, as the world policy decisions
/// are made over, and the policies that could not be read (with why).
pub async fn policy_world(
    client: &kube::Client,
) -> Result<(
    World,
    Vec<(margay_policy::PolicyKey, margay_policy::enforce::Unenforced)>,
)> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{Api, ListParams};
    use margay_ipam::k8s::list_items;
    let lp = ListParams::default();
    let ns = list_items(&Api::<Namespace>::all(client.clone()), &lp)
        .await
        .map_err(|e| Error::kube("listing Namespaces", e))?;
    let pods = list_items(&Api::<Pod>::all(client.clone()), &lp)
        .await
        .map_err(|e| Error::kube("listing Pods", e))?;
    let pols = list_items(&Api::<NetworkPolicy>::all(client.clone()), &lp)
        .await
        .map_err(|e| Error::kube("listing NetworkPolicies", e))?;
    Ok(margay_policy::explain::world_from_k8s(&ns, &pods, &pols))
}

fn ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `margayctl policy show`'s text.
pub fn render_policy_show(s: &PodPolicies) -> String {
    use std::fmt::Write as _;
    let mut o = format!(
        "POD {}  {}  node {}\n",
        s.pod,
        ips(&s.ips),
        s.node.as_deref().unwrap_or("-")
    );
    for (name, d, verb) in [("INGRESS", &s.ingress, "from"), ("EGRESS", &s.egress, "to")] {
        if !d.isolated {
            let _ = writeln!(o, "{name}: not isolated (everything allowed)");
            continue;
        }
        let _ = writeln!(
            o,
            "{name}: isolated by {} {} (allowed: what any of their rules allows)",
            d.policies.len(),
            if d.policies.len() == 1 {
                "policy"
            } else {
                "policies"
            }
        );
        for p in &d.policies {
            let _ = writeln!(o, "  {}", p.policy);
            if let Some(why) = &p.unenforced {
                let _ = writeln!(
                    o,
                    "    NOT ENFORCED AS WRITTEN ({why}): enforced fail closed"
                );
            }
            if p.rules.is_empty() {
                let _ = writeln!(o, "    no rules: allows nothing");
            }
            for (i, r) in p.rules.iter().enumerate() {
                let peers = if r.any_peer {
                    "anyone".to_string()
                } else {
                    r.peers
                        .iter()
                        .map(|pv| {
                            let now = if pv.pods.is_empty() {
                                "no pods now".to_string()
                            } else {
                                pv.pods
                                    .iter()
                                    .map(|p| format!("{} {}", p.pod, ips(&p.ips)))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            };
                            format!("{} [{now}]", pv.peer)
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                let ports = if r.ports.is_empty() {
                    "every port".to_string()
                } else {
                    r.ports
                        .iter()
                        .map(|p| match p.resolved {
                            Some(n) => format!("{} ({n})", p.port),
                            None => p.port.clone(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(o, "    rule {i}: {verb} {peers}; ports {ports}");
            }
        }
    }
    o
}

/// `margayctl policy check`'s text.
pub fn render_policy_check(c: &Check) -> String {
    let end = |k: &Option<margay_policy::PodKey>, ip: IpAddr| match k {
        Some(k) => format!("{k} ({ip})"),
        None => ip.to_string(),
    };
    let (src, dst) = (end(&c.from, c.connection.src), end(&c.to, c.connection.dst));
    let side = |what: &str, who: &str, s: &Side| -> String {
        match s {
            Side::NotAPod => format!("  {what}: {who} is not a pod: no policy applies\n"),
            Side::NotIsolated => {
                format!("  {what} of {who}: no policy isolates it: allowed\n")
            }
            Side::Allowed { by } => {
                let by: Vec<String> = by
                    .iter()
                    .map(|r| format!("{} rule {}", r.policy, r.rule))
                    .collect();
                format!("  {what} of {who}: allowed by {}\n", by.join(", "))
            }
            Side::Denied { isolated_by } => {
                let p: Vec<String> = isolated_by.iter().map(ToString::to_string).collect();
                format!(
                    "  {what} of {who}: DENIED: isolated by {} and no rule of theirs allows it\n",
                    p.join(", ")
                )
            }
        }
    };
    format!(
        "{src} -> {dst} {}/{}: {}\n{}{}",
        c.connection.proto,
        c.connection.port,
        if c.allowed { "ALLOWED" } else { "DENIED" },
        side("egress", &src, &c.verdict.egress),
        side("ingress", &dst, &c.verdict.ingress),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_world() -> World {
        let v = |v: serde_json::Value| v;
        let ns: Vec<k8s_openapi::api::core::v1::Namespace> = ["x", "y"]
            .iter()
            .map(|n| {
                serde_json::from_value(v(serde_json::json!({"metadata": {"name": n}}))).unwrap()
            })
            .collect();
        let pods: Vec<k8s_openapi::api::core::v1::Pod> =
            [("x", "a", 1), ("x", "b", 2), ("y", "c", 3)]
                .iter()
                .map(|(ns, n, i)| {
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"namespace": ns, "name": n, "labels": {"app": n}},
                        "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [
                            {"name": "web", "containerPort": 8080}]}]},
                        "status": {"podIP": format!("10.0.0.{i}")}
                    }))
                    .unwrap()
                })
                .collect();
        let pol: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "x", "name": "a-from-b"},
                "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                         "policyTypes": ["Ingress", "Egress"],
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                                      "ports": [{"port": "web"}]}]}
            }))
            .unwrap();
        margay_policy::explain::world_from_k8s(&ns, &pods, &[pol]).0
    }

    #[test]
    fn policy_show_names_policies_peers_and_ports() {
        let w = policy_world();
        let s = margay_policy::explain::show(&w, &"x/a".parse().unwrap()).unwrap();
        let t = render_policy_show(&s);
        assert!(t.starts_with("POD x/a  10.0.0.1  node node1\n"), "{t}");
        assert!(t.contains("INGRESS: isolated by 1 policy"), "{t}");
        assert!(t.contains("  x/a-from-b\n"), "{t}");
        assert!(
            t.contains(
                "rule 0: from pods app=b (own namespace) [x/b 10.0.0.2]; ports tcp/web (8080)"
            ),
            "{t}"
        );
        assert!(t.contains("EGRESS: isolated by 1 policy"), "{t}");
        assert!(t.contains("no rules: allows nothing"), "{t}");
        let s = margay_policy::explain::show(&w, &"y/c".parse().unwrap()).unwrap();
        assert!(render_policy_show(&s).contains("INGRESS: not isolated"));
    }

    #[test]
    fn policy_check_says_why() {
        use margay_policy::Proto;
        use margay_policy::explain::check;
        let w = policy_world();
        let a = "x/a".parse().unwrap();
        let c = check(&w, &"x/b".parse().unwrap(), &a, 8080, Proto::Tcp).unwrap();
        let t = render_policy_check(&c);
        assert!(
            t.starts_with("x/b (10.0.0.2) -> x/a (10.0.0.1) tcp/8080: ALLOWED\n"),
            "{t}"
        );
        assert!(
            t.contains("egress of x/b (10.0.0.2): no policy isolates it"),
            "{t}"
        );
        assert!(
            t.contains("ingress of x/a (10.0.0.1): allowed by x/a-from-b rule 0"),
            "{t}"
        );
        let c = check(&w, &"192.0.2.9".parse().unwrap(), &a, 8080, Proto::Tcp).unwrap();
        let t = render_policy_check(&c);
        assert!(t.contains(": DENIED\n"), "{t}");
        assert!(t.contains("egress: 192.0.2.9 is not a pod"), "{t}");
        assert!(t.contains("DENIED: isolated by x/a-from-b"), "{t}");
    }

    #[test]
    fn node_status_names_what_policy_cannot_enforce() {
        let p: margay_api::status::PolicyStatus = serde_json::from_value(serde_json::json!({
            "enforcing": true, "policies": 3, "endpoints": 7, "current": false,
            "last_error": "nft refused the policy table: boom",
            "unenforced": [{"namespace": "x", "name": "big", "reason": "TooLarge",
                            "message": "too large: its rules cost 12001 (at most 10000)"}]
        }))
        .unwrap();
        let t = render_policy_status(&p);
        assert!(t.contains("table NOT current (nft refused the policy table: boom); 3 policies, 7 workload interfaces"), "{t}");
        assert!(
            t.contains("NetworkPolicy x/big NOT ENFORCED AS WRITTEN (too large"),
            "{t}"
        );
    }

    #[test]
    fn node_status_table() {
        let st: AgentStatus = serde_json::from_value(serde_json::json!({
            "node": "node1", "ready": true, "not_ready": [], "routes": [],
            "routing": {"asn": 64512, "address": "10.0.0.1/24", "problems": [],
                        "datastore_ok": true, "bgp_synced": true, "neighbors": 2,
                        "advertised": [], "remote_routes": 0},
            "peers": [
                {"address": "10.0.0.2", "asn": 64512, "state": "Established", "since_seconds": 75,
                 "prefixes_received": 1, "prefixes_sent": 1, "updates_in": 3, "updates_out": 2,
                 "dynamic": false, "last_error": null},
                {"address": "10.0.0.254", "asn": 65000, "state": "Active", "since_seconds": 4000,
                 "updates_in": 0, "updates_out": 0, "prefixes_received": 0, "prefixes_sent": 0, "dynamic": false, "last_error": "hold timer expired"},
                {"address": "10.0.0.253", "asn": 65000, "state": "Active", "since_seconds": 1,
                 "updates_in": 0, "updates_out": 0, "prefixes_received": 0, "prefixes_sent": 0, "dynamic": false,
                 "last_error": "cease: BFD down (6/10)", "bfd": "Down"}
            ]
        }))
        .unwrap();
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
        let bfd = lines.iter().find(|l| l.starts_with("10.0.0.253")).unwrap();
        assert!(bfd.contains("Down  cease: BFD down"), "{t}");
        assert!(ext.contains(" -     hold timer"), "no BFD: -\n{t}");
    }

    #[test]
    fn check_finds_duplicates_and_orphans() {
        let mut a = Block::new("10.0.0.0/26".parse().unwrap(), "p", "n1");
        let mut b = Block::new("10.0.0.0/27".parse().unwrap(), "gone", "n9");
        let rec = |node: &str| margay_api::ipam::AllocationRecord {
            handle: "h".into(),
            node: node.into(),
            use_: margay_api::ipam::AllowedUse::Tunnel,
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

    #[test]
    fn show_tells_pod_addresses_from_spares() {
        let mut a = Block::new("10.0.0.0/26".parse().unwrap(), "p", "n1");
        let rec = |handle: &str, pod: bool| margay_api::ipam::AllocationRecord {
            handle: handle.into(),
            node: "n1".into(),
            use_: margay_api::ipam::AllowedUse::Workload,
            pod: pod.then(|| margay_api::ipam::PodRef {
                namespace: "default".into(),
                name: "web".into(),
                uid: String::new(),
            }),
            since: String::new(),
        };
        a.allocations
            .insert("10.0.0.1".parse().unwrap(), rec("c1.eth0", true));
        a.allocations
            .insert("10.0.0.2".parse().unwrap(), rec("spare.n1.1", false));
        a.allocations
            .insert("10.0.0.3".parse().unwrap(), rec("spare.n1.2", false));
        // Named like a spare of another node: not a spare of n1.
        a.allocations
            .insert("10.0.0.4".parse().unwrap(), rec("spare.n2.1", false));
        let s = ipam_show(&[], &[a]);
        assert_eq!((s.nodes[0].addresses, s.nodes[0].spares), (4, 2));
        assert_eq!((s.blocks[0].used, s.blocks[0].spares), (4, 2));
        let t = render_ipam_show(&s);
        let node = t.lines().find(|l| l.starts_with("n1 ")).unwrap();
        let cells: Vec<&str> = node.split_whitespace().collect();
        assert_eq!(cells, ["n1", "1", "2", "2"], "{t}");
    }
}
