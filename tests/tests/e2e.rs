//! End to end: whole clusters of real `margay-agent`s (one per node
//! namespace) on a real kube-apiserver, pods wired through the real
//! `margay` plugin by libcni, BGP between the agents and with a real BIRD
//! top-of-rack router, traffic through the real kernel.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use margay_api::bgp::BGPPeer;
use margay_api::ctl::{IpamCheck, IpamShow, LeakReason};
use margay_api::ipam::{IPAMBlock, IPPool};
use margay_api::status::{AgentStatus, SessionState};
use margay_harness::wait;
use margay_lab::cluster::{Cluster, Options};
use margay_lab::{Encap, Tor};

const T: Duration = Duration::from_secs(90);

/// The default lab without a router, one pod on each node.
async fn no_router_one_pod_each() -> Cluster {
    let opts = Options {
        tor: Tor::None,
        ..Default::default()
    };
    cluster(opts, 1).await
}

async fn cluster(opts: Options, pods_per_node: usize) -> Cluster {
    let mut c = Cluster::start(opts).await.expect("cluster");
    for i in 0..c.nodes.len() {
        let node = c.nodes[i].name.clone();
        for k in 1..=pods_per_node {
            c.add_pod(&node, &format!("{node}-p{k}"))
                .await
                .expect("pod");
        }
    }
    if let Err(e) = c.wait_connected(T).await {
        panic!("{e:#}\nnode1 log:\n{}", tail(&c.agent_log(0), 30));
    }
    c
}

/// `margayctl node status -o json` on node `i`, typed.
fn status(c: &Cluster, i: usize) -> AgentStatus {
    let (_, out, err) = c.margayctl(i, &["node", "status", "-o", "json"]).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"))
}

/// The blocks affine to `node`.
async fn blocks_of(c: &Cluster, node: &str) -> Vec<String> {
    c.blocks()
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, n)| n == node)
        .map(|(b, _)| b)
        .collect()
}

/// Whether namespace `ns`'s route to `prefix` mentions `what`
/// (`proto 79`, `blackhole`).
fn route_has(ns: &str, prefix: &str, what: &str) -> Result<bool, wait::Seen> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "route", "show", prefix])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(what))
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn curl(c: &Cluster, i: usize, path: &str) -> String {
    c.nodes[i]
        .node
        .ns
        .exec(
            "curl",
            &[
                "-s",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:9099{path}"),
            ],
        )
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mesh_native_with_bird_tor_and_margayctl() {
    let c = cluster(Options::default(), 2).await;
    // The router's kernel holds every block, learned from its owner only.
    let tor = c
        .fabric
        .ns()
        .ip(&["-4", "route", "show", "proto", "bird"])
        .unwrap();
    for (cidr, owner) in c.blocks().await.unwrap() {
        let idx: usize = owner.trim_start_matches("node").parse().unwrap();
        let want = format!("{cidr} via 10.99.0.{idx} ");
        assert!(tor.contains(&want), "{want:?} not in\n{tor}");
    }
    // Routes in each node's kernel match the blocks exactly.
    let blocks = c.blocks().await.unwrap();
    for (i, n) in c.nodes.iter().enumerate() {
        let routes = n
            .node
            .ns
            .ip(&["-4", "route", "show", "proto", "79"])
            .unwrap();
        assert_eq!(routes.lines().count(), blocks.len() - 1, "{routes}");
        let own = n
            .node
            .ns
            .ip(&["route", "show", "type", "blackhole"])
            .unwrap();
        let mine: Vec<_> = blocks.iter().filter(|(_, o)| *o == n.name).collect();
        assert!(mine.iter().all(|(b, _)| own.contains(b.as_str())), "{own}");
        // Health endpoints.
        assert!(curl(&c, i, "/healthz").ends_with("200"));
        assert!(
            curl(&c, i, "/readyz").ends_with("200"),
            "{}\n{}",
            curl(&c, i, "/readyz"),
            curl(&c, i, "/status")
        );
        let m = curl(&c, i, "/metrics");
        assert!(
            m.contains("margay_cni_request_duration_seconds_count{op=\"ADD\"} 2"),
            "{m}"
        );
        assert!(m.contains("margay_bgp_sessions_established 3"), "{m}");
        assert!(m.contains("margay_ipam_operations_total"), "{m}");
    }
    // At rest (routes learned, nothing changing) the routing loop waits:
    // a few passes at most in 3 s (a resync is every 30 s, and a write
    // queued by the pods' ADDs may still land), not one per wake-up of a
    // watch that always says "changed" (56 in 3 s when it did).
    let passes = |i| {
        let m = curl(&c, i, "/metrics");
        let line = m
            .lines()
            .find(|l| l.starts_with("margay_routing_passes_total "))
            .unwrap_or_else(|| panic!("{m}"))
            .to_string();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let before: Vec<u64> = (0..c.nodes.len()).map(passes).collect();
    // Not a wait: the window the passes are counted over.
    std::thread::sleep(Duration::from_secs(3));
    for (i, b) in before.iter().enumerate() {
        let ran = passes(i) - b;
        assert!(
            ran <= 3,
            "node{}: {ran} routing passes in 3 s at rest",
            i + 1
        );
    }
    // The Node objects carry identity and a healthy condition.
    let nodes: Api<KubeNode> = Api::all(c.client.clone());
    let n1 = nodes.get("node1").await.unwrap();
    let ann = n1.metadata.annotations.unwrap();
    assert_eq!(ann["margay.dev/bgp-address"], "10.99.0.1/24");
    let conds = n1.status.unwrap().conditions.unwrap();
    let ready = conds.iter().find(|c| c.type_ == "MargayReady").unwrap();
    assert_eq!(ready.status, "True", "{ready:?}");
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
    );

    // margayctl, human and JSON.
    let (code, out, err) = c.margayctl(0, &["node", "status"]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("running on node1 (address 10.99.0.1/24, AS 64512): ready"),
        "{out}"
    );
    for peer in ["10.99.0.2", "10.99.0.3"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(peer))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            line.contains("node-to-node") && line.contains("Established"),
            "{line}"
        );
    }
    let line = out.lines().find(|l| l.starts_with("10.99.0.254")).unwrap();
    assert!(
        line.contains("external") && line.contains("Established"),
        "{line}"
    );
    let st = status(&c, 0);
    assert_eq!(st.peers.len(), 3);
    assert_eq!(st.routing.problems.len(), 0, "{:?}", st.routing.problems);
    let (_, out, _) = c.margayctl(0, &["routes"]).unwrap();
    assert_eq!(
        out.lines().filter(|l| l.contains("10.99.0.")).count(),
        2,
        "{out}"
    );
    let (code, out, _) = c.margayctl(0, &["ipam", "show", "-o", "json"]).unwrap();
    assert_eq!(code, 0);
    let v: IpamShow = serde_json::from_str(&out).unwrap();
    assert_eq!(v.blocks.len(), 3);
    assert_eq!(v.pools[0].name, "default");
    let (_, out, _) = c.margayctl(0, &["ipam", "show"]).unwrap();
    assert!(
        out.contains("IP pools") && out.contains("10.244.0.0/16"),
        "{out}"
    );
    let (code, out, _) = c.margayctl(0, &["ipam", "check"]).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("IPAM is consistent."), "{out}");
    // Release is refused for a live node's address.
    let pod_ip = c.pods[0].ip.clone();
    let (code, _, err) = c
        .margayctl(0, &["ipam", "release", "--address", &pod_ip])
        .unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains("agent is running") && err.contains("--force"),
        "{err}"
    );
    // A bad flag is an exit code with a message.
    let (code, _, err) = c
        .margayctl(0, &["ipam", "release", "--address", "nope"])
        .unwrap();
    assert_eq!(code, 2, "{err}");

    // A leak (the Pod object deleted behind the agent's back; its GC runs
    // only every 60 s here): `ipam check` reports it, the report drives
    // `ipam release`, refused while the agent runs unless --force.
    let leaked = c.pods[3].ip.clone();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    pods.delete(&c.pods[3].name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let (code, report, _) = c.margayctl(0, &["ipam", "check", "-o", "json"]).unwrap();
    assert_eq!(code, 1, "{report}");
    let v: IpamCheck = serde_json::from_str(&report).unwrap();
    assert_eq!(v.leaks[0].address.to_string(), leaked, "{report}");
    assert_eq!(v.leaks[0].reason, LeakReason::PodGone);
    let (_, text, _) = c.margayctl(0, &["ipam", "check"]).unwrap();
    assert!(
        text.contains("Leaked addresses: 1") && text.contains(&leaked),
        "{text}"
    );
    let file = c.work_dir().join("report.json");
    std::fs::write(&file, &report).unwrap();
    let file = file.display().to_string();
    let (code, _, err) = c
        .margayctl(0, &["ipam", "release", "--from-report", &file])
        .unwrap();
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = c
        .margayctl(0, &["ipam", "release", "--from-report", &file, "--force"])
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&leaked), "{out}");
    let (code, out, _) = c.margayctl(0, &["ipam", "check"]).unwrap();
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_between_nodes() {
    let c = cluster(
        Options {
            encap: Encap::Vxlan,
            tor: Tor::None,
            ..Default::default()
        },
        1,
    )
    .await;
    for n in &c.nodes {
        let link = n
            .node
            .ns
            .ip(&["-d", "link", "show", "margay.vxlan"])
            .unwrap();
        assert!(
            link.contains("vxlan id 4096") && link.contains("mtu 1450"),
            "{link}"
        );
        let routes = n.node.ns.ip(&["route", "show", "proto", "79"]).unwrap();
        assert_eq!(
            routes.matches("dev margay.vxlan onlink").count(),
            2,
            "{routes}"
        );
    }
    // Pods' MTU follows the encapsulation.
    let mtu = c.pods[0].ns.ip(&["link", "show", "eth0"]).unwrap();
    assert!(mtu.contains("mtu 1450"), "{mtu}");
}

/// The VXLAN port takes packets from the cluster's nodes only: a VXLAN
/// packet made by hand, carrying a datagram from node1's pod to node2's,
/// arrives when node1 sends it and is dropped when the router (not a node,
/// but on the same segment) sends the very same bytes. Without the filter
/// anyone who reaches UDP 4789 hands a pod packets from any inner source,
/// past NetworkPolicy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_takes_packets_from_nodes_only() {
    use margay_api::tunnel::{TUNNEL_TABLE_NAME, VXLAN_DEV, VXLAN_PORT, VXLAN_VNI};
    use margay_tests::tunnel;
    use std::net::SocketAddrV4;
    let c = cluster(
        Options {
            nodes: 2,
            encap: Encap::Vxlan,
            tor: Tor::None,
            ..Default::default()
        },
        1,
    )
    .await;
    let (from, to) = (&c.pods[0], &c.pods[1]);
    assert_eq!((from.node.as_str(), to.node.as_str()), ("node1", "node2"));
    let mac = |i: usize| {
        let link = c.nodes[i]
            .node
            .ns
            .ip(&["-j", "link", "show", VXLAN_DEV])
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&link).unwrap();
        tunnel::parse_mac(v[0]["address"].as_str().unwrap()).unwrap()
    };
    let (src_mac, dst_mac) = (mac(0), mac(1));
    let port = 7777;
    let packet = |tag: &str| {
        let inner = tunnel::ipv4_udp(
            SocketAddrV4::new(from.ip.parse().unwrap(), 40000),
            SocketAddrV4::new(to.ip.parse().unwrap(), port),
            tag.as_bytes(),
        );
        tunnel::vxlan(VXLAN_VNI, dst_mac, src_mac, &inner)
    };
    let node2 = SocketAddrV4::new(c.nodes[1].node.v4, VXLAN_PORT);
    let router = c.fabric.ns().name();
    let node1 = c.nodes[0].node.ns.name();
    let mut pod = tunnel::Catcher::bind(to.ns.name(), port).unwrap();
    for round in 0..3 {
        // The router's first: on one path, it would arrive first.
        let (bad, good) = (format!("router-{round}"), format!("node1-{round}"));
        tunnel::send_vxlan(router, node2, &packet(&bad)).unwrap();
        let send = || tunnel::send_vxlan(node1, node2, &packet(&good));
        send().unwrap();
        let arrived = pod.wait_for(&good, Duration::from_secs(10), send).unwrap();
        assert!(arrived, "node1's packet did not arrive: {:?}", pod.got);
        assert!(
            !pod.got.iter().any(|g| g.starts_with("router")),
            "a VXLAN packet from the router reached the pod: {:?}",
            pod.got
        );
    }
    // Dropped by Margay's filter, which counted them.
    let table = c.nodes[1]
        .node
        .ns
        .exec("nft", &["list", "table", "inet", TUNNEL_TABLE_NAME])
        .unwrap();
    let dropped: u64 = table
        .lines()
        .filter(|l| l.contains(&format!("udp dport {VXLAN_PORT} ip saddr")))
        .filter_map(|l| l.split("counter packets ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(dropped >= 3, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_borrowed_from_another_nodes_block_is_routed() {
    // Two blocks for three nodes: whichever node gets none borrows from a
    // lender's block. Its pods must reach and be reached from every node
    // and the router (`cluster` waits for the whole matrix, and the route
    // check asks for the borrowed /32 everywhere).
    let c = cluster(
        Options {
            pool_cidr: "10.244.0.0/25".into(),
            block_size: 26,
            ..Default::default()
        },
        2,
    )
    .await;
    let blocks = c.blocks().await.unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    let borrowed: Vec<(String, String)> = c
        .borrowed(&blocks)
        .iter()
        .map(|p| (p.ip.clone(), p.node.clone()))
        .collect();
    assert!(!borrowed.is_empty(), "no pod borrowed: {blocks:?}");
    for (ip, borrower) in &borrowed {
        let addr: std::net::IpAddr = ip.parse().unwrap();
        let (block, lender) = blocks
            .iter()
            .find(|(b, _)| b.parse::<ipnetwork::IpNetwork>().unwrap().contains(addr))
            .unwrap();
        assert_ne!(lender, borrower);
        let i = c.nodes.iter().position(|n| &n.name == lender).unwrap();
        let ns = &c.nodes[i].node.ns;
        // The lender keeps its blackhole for the rest of the block and
        // routes the borrowed address to the borrower.
        let bh = ns.ip(&["route", "show", "type", "blackhole"]).unwrap();
        assert!(bh.contains(block.as_str()), "{lender}: {bh}");
        let r = ns.ip(&["route", "get", ip]).unwrap();
        assert!(!r.contains("blackhole"), "{lender} → {ip}: {r}");
        let m = status(
            &c,
            c.nodes.iter().position(|n| &n.name == borrower).unwrap(),
        );
        assert!(
            m.routing.advertised.contains(&format!("{ip}/32")),
            "{borrower} does not advertise {ip}: {:?}",
            m.routing.advertised
        );
    }
    // Deleted, the borrowed address is withdrawn everywhere.
    let mut c = c;
    let name = c
        .pods
        .iter()
        .find(|p| p.ip == borrowed[0].0)
        .unwrap()
        .name
        .clone();
    c.del_pod(&name).await.unwrap();
    let gone = format!("{} ", borrowed[0].0);
    wait::until(
        "the borrowed /32 withdrawn everywhere",
        T,
        Duration::from_millis(300),
        || {
            let left: Vec<&str> = c
                .nodes
                .iter()
                .filter(|n| {
                    let r = n.node.ns.ip(&["-4", "route", "show", "proto", "79"]);
                    r.map_or(true, |r| r.lines().any(|l| l.starts_with(&gone)))
                })
                .map(|n| n.name.as_str())
                .collect();
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("still routed on {left:?}").into())
            }
        },
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_reflectors_with_the_mesh_off() {
    let c = cluster(
        Options {
            nodes: 4,
            route_reflectors: 2,
            ..Default::default()
        },
        1,
    )
    .await;
    // A client peers with the two reflectors and the router, not with the
    // other client; it still reaches the other client's pods (tested above
    // by the matrix) through reflected routes.
    let mut peers: Vec<String> = status(&c, 2)
        .peers
        .iter()
        .map(|p| p.address.to_string())
        .collect();
    peers.sort();
    assert_eq!(peers, ["10.99.0.1", "10.99.0.2", "10.99.0.254"]);
    assert_eq!(
        status(&c, 0).peers.len(),
        4,
        "a reflector peers with every node and the router"
    );

    // An invalid BGPPeer is answered with Valid=False on the object and a
    // problem on the nodes, and drops no session.
    let since = |c: &Cluster| -> Vec<(String, u64)> {
        status(c, 2)
            .peers
            .iter()
            .map(|p| {
                assert_eq!(p.state, SessionState::Established, "{p:?}");
                (p.address.to_string(), p.since_seconds.unwrap())
            })
            .collect()
    };
    let before = since(&c);
    // A second passes with every session up (so `since` moves on).
    wait::holds_for(
        "every session stays up",
        Duration::from_secs(1),
        Duration::from_millis(200),
        || {
            Ok(status(&c, 2)
                .peers
                .iter()
                .all(|p| p.state == SessionState::Established))
        },
    )
    .unwrap();
    let peers: Api<BGPPeer> = Api::all(c.client.clone());
    let bad: BGPPeer = serde_json::from_value(serde_json::json!({
        "apiVersion": "margay.dev/v1", "kind": "BGPPeer",
        "metadata": {"name": "typo"},
        "spec": {"peerIP": "10.99.0.300", "asNumber": 65001}
    }))
    .unwrap();
    peers.create(&Default::default(), &bad).await.unwrap();
    let every = Duration::from_millis(300);
    let valid = wait::until_async("a Valid condition on the bad BGPPeer", T, every, || async {
        let p = peers.get("typo").await?;
        Ok(p.status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Valid")))
    })
    .await
    .unwrap();
    assert_eq!(valid.status, "False");
    let msg = valid.message;
    assert!(
        msg.contains("peerIP") && msg.contains("10.99.0.300"),
        "{msg}"
    );
    // Each node sees the bad peer on its own next pass.
    wait::until(
        "the bad BGPPeer in node 2's status",
        T,
        Duration::from_millis(200),
        || {
            let (_, out, _) = c
                .margayctl(2, &["node", "status"])
                .map_err(|e| e.to_string())?;
            if out.contains("BGPPeer typo ignored") {
                Ok(Some(()))
            } else {
                Err(out.into())
            }
        },
    )
    .unwrap();
    let after = since(&c);
    assert_eq!(before.len(), after.len());
    for ((a, s0), (b, s1)) in before.iter().zip(&after) {
        assert_eq!(a, b);
        assert!(
            s1 > s0,
            "session with {a} was reset ({s0}s before, {s1}s after)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_agent_keeps_traffic_and_reconciles() {
    let mut c = no_router_one_pod_each().await;
    let n1_block = blocks_of(&c, "node1").await.remove(0);
    // Watch node2's route to node1's block while node1's agent dies.
    let stop = Arc::new(AtomicBool::new(false));
    let missing = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, missing) = (stop.clone(), missing.clone());
        let ns = c.nodes[1].node.ns.name().to_string();
        let block = n1_block.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !route_has(&ns, &block, "proto 79").unwrap() {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
                // Not a wait: the sampler's pace.
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // 100 pings, 50 ms apart, from node2's pod to node1's pod.
    let ping = c.pods[1]
        .ns
        .cmd("ping")
        .args(["-q", "-i", "0.05", "-c", "100", "-W", "1", &c.pods[0].ip])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // node2's route to node1's block stays while the pings start, while
    // node1's agent is dead, and (the sampler) while it comes back.
    let ns2 = c.nodes[1].node.ns.name().to_string();
    let route_there = || route_has(&ns2, &n1_block, "proto 79");
    let route_holds = |what: &str, window: Duration| {
        wait::holds_for(what, window, Duration::from_millis(50), route_there).unwrap()
    };
    route_holds("the route before the kill", Duration::from_millis(800));
    c.kill_agent(0);
    route_holds("the route while the agent is dead", Duration::from_secs(2));
    let restarted = Instant::now();
    c.start_agent(0).unwrap();
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: usize = text
        .split(", ")
        .find(|s| s.ends_with("received"))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(received >= 80, "lost more than a second of pings: {text}");
    c.wait_connected(T).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(
        missing.load(Ordering::Relaxed),
        0,
        "node2's route to node1's block went away"
    );
    // Reconciled: the pod kept its address, a new pod gets a fresh one,
    // and IPAM has no duplicates, leaks or orphans.
    let ip = c.add_pod("node1", "after-restart").await.unwrap();
    assert!(c.pods.iter().filter(|p| p.ip == ip).count() == 1);
    c.wait_connected(T).await.unwrap();
    let (code, out, _) = c.margayctl(1, &["ipam", "check"]).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(restarted.elapsed() < T);
    let log = c.agent_log(0);
    assert!(
        log.contains("start-up reconciliation done"),
        "{}",
        tail(&log, 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_keeps_its_pods_routes_and_range() {
    let mut c = no_router_one_pod_each().await;
    let block = blocks_of(&c, "node1").await.remove(0);
    let cidr: ipnetwork::IpNetwork = block.parse().unwrap();
    let name = margay_api::ipam::block_name(&cidr);
    let blocks: Api<IPAMBlock> = Api::all(c.client.clone());
    let corrupt = |cidr: &str| {
        let patch = serde_json::json!({"spec": {"cidr": cidr}});
        let blocks = blocks.clone();
        let name = name.clone();
        async move {
            blocks
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    corrupt("not-a-cidr").await;
    // The agent restarts on it: its start-up reconciliation reads the
    // block, its routing pass decides blackholes and advertisements.
    c.kill_agent(0);
    c.start_agent(0).unwrap();
    // The pod in it keeps its interface and address, reachable from all.
    c.wait_connected(T).await.unwrap();
    let ns1 = c.nodes[0].node.ns.name().to_string();
    let ns2 = c.nodes[1].node.ns.name().to_string();
    let every = Duration::from_millis(100);
    // Its blackhole and advertisement stay.
    wait::holds_for("node1's blackhole", Duration::from_secs(3), every, || {
        route_has(&ns1, &block, "blackhole")
    })
    .unwrap();
    wait::holds_for("node2's route to it", Duration::from_secs(1), every, || {
        route_has(&ns2, &block, "proto 79")
    })
    .unwrap();
    // Reported: margayctl and the pool's Ready condition name it.
    let (code, out, _) = c.margayctl(1, &["ipam", "check"]).unwrap();
    assert!(code != 0 && out.contains(&name), "{code}: {out}");
    let pools: Api<IPPool> = Api::all(c.client.clone());
    wait::until_async("the pool reports the block", T, every, || {
        let (pools, name) = (pools.clone(), name.clone());
        async move {
            let p = pools.get("default").await.map_err(|e| e.to_string())?;
            let ready = p
                .status
                .iter()
                .flat_map(|s| s.conditions.clone())
                .find(|c| c.type_ == "Ready");
            match ready {
                Some(r) if r.reason == "CorruptBlock" && r.message.contains(&name) => Ok(Some(())),
                other => Err(format!("{other:?}").into()),
            }
        }
    })
    .await
    .unwrap();
    // New addresses come from elsewhere, from a block that overlaps it not.
    let ip: std::net::IpAddr = c.add_pod("node1", "after").await.unwrap().parse().unwrap();
    assert!(!cidr.contains(ip), "{ip} handed out of the corrupt {block}");
    for (b, _) in c.blocks().await.unwrap() {
        let b: ipnetwork::IpNetwork = b.parse().unwrap();
        assert!(
            b == cidr || !(b.contains(cidr.ip()) || cidr.contains(b.ip())),
            "{b} overlaps {cidr}"
        );
    }
    // Fixed: consistent again.
    corrupt(&block).await;
    wait::until("ipam check passes", T, every, || {
        let (code, out, _) = c
            .margayctl(1, &["ipam", "check"])
            .map_err(|e| e.to_string())?;
        if code == 0 {
            Ok(Some(()))
        } else {
            Err(out.into())
        }
    })
    .unwrap();
    c.wait_connected(T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_pod_and_removed_node_are_cleaned_up() {
    let mut c = cluster(
        Options {
            tor: Tor::None,
            gc_interval: 2,
            leak_grace: 1,
            ..Default::default()
        },
        1,
    )
    .await;
    let allocated = |ip: String| {
        let client = c.client.clone();
        async move {
            margay_tests::allocations(&client)
                .await
                .iter()
                .any(|(a, _)| *a == ip)
        }
    };
    // Leak: the Pod object goes behind the agent's back.
    let leaked = c.pods[1].ip.clone();
    assert!(allocated(leaked.clone()).await);
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    // Forced (grace 0), as there is no kubelet to finish a graceful delete.
    pods.delete(&c.pods[1].name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let every = Duration::from_millis(500);
    let what = format!("leak collection to free {leaked}");
    wait::until_async(&what, T, every, || async {
        Ok((!allocated(leaked.clone()).await).then_some(()))
    })
    .await
    .unwrap();
    // A node whose agent is of an earlier version (its identity in
    // annotations only): the leader writes its MargayNode.
    let nodes: Api<KubeNode> = Api::all(c.client.clone());
    let identities: Api<margay_api::identity::MargayNode> = Api::all(c.client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "node-old",
                "annotations": {margay_api::node::ANN_ADDRESS: "10.99.0.77/24"}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let m = wait::until_async("a MargayNode written for node-old", T, every, || async {
        Ok(identities.get_opt("node-old").await?)
    })
    .await
    .unwrap();
    assert_eq!(m.spec.bgp_address.as_deref(), Some("10.99.0.77/24"));
    nodes
        .delete("node-old", &DeleteParams::default())
        .await
        .unwrap();
    // Remove a node: its routes go everywhere, its blocks are freed, its
    // MargayNode and endpoint slices deleted (no controller-manager here:
    // the leader's collection), node-old's too.
    let n3_blocks = blocks_of(&c, "node3").await;
    let slices: Api<margay_api::slice::MargayEndpointSlice> = Api::all(c.client.clone());
    assert!(
        slices.get_opt("node3.0").await.unwrap().is_some(),
        "node3 publishes its pods"
    );
    assert!(!n3_blocks.is_empty());
    c.kill_agent(2);
    let nodes: Api<KubeNode> = Api::all(c.client.clone());
    nodes
        .delete("node3", &DeleteParams::default())
        .await
        .unwrap();
    wait::until_async("node3 gone everywhere", T, every, || async {
        let mut left = Vec::new();
        for n in &c.nodes[..2] {
            let r = n.node.ns.ip(&["route", "show", "proto", "79"]).unwrap();
            left.extend(n3_blocks.iter().filter(|b| r.contains(b.as_str())).cloned());
        }
        let still = blocks_of(&c, "node3").await;
        let identity = identities.get_opt("node3").await.unwrap().is_some()
            || identities.get_opt("node-old").await.unwrap().is_some()
            || slices.get_opt("node3.0").await.unwrap().is_some();
        if left.is_empty() && still.is_empty() && !identity {
            return Ok(Some(()));
        }
        Err(format!(
            "routes {left:?} / blocks {still:?} of node3 remain (MargayNode or slices: {identity})"
        )
        .into())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipip_is_reported_on_the_node() {
    let c = Cluster::start(Options {
        nodes: 2,
        encap: Encap::Ipip,
        tor: Tor::None,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = c;
    c.add_pod("node1", "a").await.unwrap();
    c.add_pod("node2", "b").await.unwrap();
    let nodes: Api<KubeNode> = Api::all(c.client.clone());
    let every = Duration::from_millis(300);
    let cond = wait::until_async("a MargayReady=False condition", T, every, || async {
        let n = nodes.get("node1").await?;
        Ok(margay_api::node::condition(&n, "MargayReady")
            .filter(|c| c.status == "False")
            .cloned())
    })
    .await
    .unwrap();
    let msg = cond.message.clone().unwrap_or_default();
    assert!(msg.contains("IPIP") && msg.contains("VXLAN"), "{msg}");
    // Where the module is missing: this kernel, /lib/modules.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        msg.contains(&format!("kernel {}", release.trim())) && msg.contains("/lib/modules/"),
        "{msg}"
    );
    assert_eq!(cond.reason.as_deref(), Some("RoutingIncomplete"));
    // margayctl says it too, with the tunnel that is not up; and once BGP
    // has brought node2's block, that node2 cannot take IPIP either (so
    // nothing is sent where it cannot arrive).
    let every = Duration::from_millis(500);
    wait::until("margayctl to say so", T, every, || {
        let (_, out, _) = c.margayctl(0, &["node", "status"]).unwrap();
        if out.contains("cannot do IPIP")
            && out.contains("tunnel: IPIP tunl0")
            && out.contains("not up")
            && out.contains("problem: block")
            && out
                .contains("(node node2) uses IPIP but the node has not published its tunl0 address")
        {
            return Ok(Some(()));
        }
        Err(out.into())
    })
    .unwrap();
    let routes = c.nodes[0]
        .node
        .ns
        .ip(&["route", "show", "proto", "79"])
        .unwrap();
    assert!(routes.trim().is_empty(), "{routes}");
}

/// BFD with the top-of-rack router (BIRD, 100 ms × 3), turned on at run
/// time by a change of the BGPPeer `tor`: every node's session with the
/// router shows BFD Up without the BGP session being reset; the router
/// frozen (a router that dies sends nothing more), every node closes its
/// session by BFD ("BFD down"), not by the 9 s hold time; thawed, BFD and
/// the sessions come back by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bfd_with_the_router_finds_it_dead_and_back() {
    use margay_api::status::BfdState;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut c = cluster(Options::default(), 1).await;
    let tor: std::net::IpAddr = "10.99.0.254".parse().unwrap();
    // Node i's session with the router (none yet while its agent starts).
    let router = |c: &Cluster, i: usize| status(c, i).peers.into_iter().find(|p| p.address == tor);
    let established_before: Vec<Option<u64>> = (0..c.nodes.len())
        .map(|i| router(&c, i).and_then(|p| p.since_seconds))
        .collect();
    let peers: Api<BGPPeer> = Api::all(c.client.clone());
    let bfd =
        serde_json::json!({"spec": {"bfd": {"minTxIntervalMs": 100, "minRxIntervalMs": 100}}});
    peers
        .patch("tor", &PatchParams::default(), &Patch::Merge(&bfd))
        .await
        .unwrap();
    let all = |c: &Cluster, what: &str, ok: &dyn Fn(&margay_api::status::NeighborView) -> bool| {
        wait::until(what, T, Duration::from_millis(200), || {
            let views: Vec<_> = (0..c.nodes.len()).map(|i| router(c, i)).collect();
            if views.iter().all(|v| v.as_ref().is_some_and(ok)) {
                Ok(Some(()))
            } else {
                Err(format!("{views:?}").into())
            }
        })
        .unwrap_or_else(|e| panic!("{e}\nnode1 log:\n{}", tail(&c.agent_log(0), 30)));
    };
    all(&c, "BFD Up with the router on every node", &|p| {
        p.bfd == Some(BfdState::Up) && p.state == SessionState::Established
    });
    for (i, before) in established_before.iter().enumerate() {
        let now = router(&c, i).and_then(|p| p.since_seconds);
        assert!(
            now >= *before,
            "node{}: the session was reset to turn BFD on ({before:?} -> {now:?})",
            i + 1
        );
    }

    // node1's agent restarted as for an upgrade (SIGTERM): it says
    // AdminDown before it goes, so the router keeps node1's routes under
    // graceful restart instead of taking BFD's silence for a failure.
    let block = blocks_of(&c, "node1").await.remove(0);
    let fabric = c.fabric.ns().name().to_string();
    let (stop, missing) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let sampler = {
        let (stop, missing, block) = (stop.clone(), missing.clone(), block.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !route_has(&fabric, &block, "10.99.0.1").unwrap() {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
                // Not a wait: the sampler's pace.
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    if let Some(mut a) = c.nodes[0].agent.take() {
        a.stop(Duration::from_secs(20));
    }
    c.start_agent(0).unwrap();
    all(
        &c,
        "BFD and the sessions back after node1's restart",
        &|p| p.bfd == Some(BfdState::Up) && p.state == SessionState::Established,
    );
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let bird_log = match c.tor.as_mut() {
        Some(margay_lab::cluster::Router::Bird(b)) => b.daemon().log_tail(40),
        _ => String::new(),
    };
    assert_eq!(
        missing.load(Ordering::Relaxed),
        0,
        "the router lost its route to node1's {block} during node1's restart:\n{bird_log}\nnode1:\n{}",
        tail(&c.agent_log(0), 30)
    );

    let pid = match c.tor.as_mut() {
        Some(margay_lab::cluster::Router::Bird(b)) => b.daemon().pid(),
        other => panic!("not BIRD: {other:?}"),
    };
    let pid = Pid::from_raw(pid as i32);
    /// Thaws the router whatever happens.
    struct Thaw(Pid);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    kill(pid, Signal::SIGSTOP).unwrap();
    let thaw = Thaw(pid);
    let t = Instant::now();
    all(&c, "every node closed its session by BFD", &|p| {
        p.bfd == Some(BfdState::Down)
            && p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("BFD down"))
    });
    println!(
        "the frozen router found dead by every node in {:?}",
        t.elapsed()
    );
    drop(thaw);
    all(&c, "BFD and the sessions back", &|p| {
        p.bfd == Some(BfdState::Up) && p.state == SessionState::Established
    });
}
