//! IPIP over `tunl0`, proven on a real kernel: this host's has no ipip
//! module, so the one test here boots a VM with a stock Debian kernel
//! (`scripts/in-vm.sh`, the apiservers on this host) and runs itself
//! inside it, where it drives `margay-lab` as an operator would:
//!
//! 1. `margay-lab up --nodes 3 --encap ipip --tor bird` and `check`; on
//!    every node `tunl0` is up with MTU 1480 and an address that IPAM holds
//!    for `tunnel.ipip.<node>` and the Node announces; every remote block is
//!    routed `via <node> dev tunl0 onlink`; pods have MTU 1480; an IPIP
//!    packet made by hand reaches a pod from a node's address and is
//!    dropped from the router's; an iperf3 stream crosses nodes through
//!    `tunl0`;
//! 2. the pool switched to VXLAN and back while pods ping each other every
//!    20 ms: the routes follow, the unused tunnel is retired (address off
//!    `tunl0`, `tunl0` down, address released, announcement gone; the VXLAN
//!    device deleted), no ping gap over a second;
//! 3. `IPIPCrossSubnet` with the nodes in two subnets: native inside a
//!    subnet, `tunl0` across, every pod reaching every pod.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use margay_harness::{paths, wait};
use margay_tests::Pinger;

#[test]
fn ipip_in_a_vm() {
    if margay_tests::in_vm() {
        return in_vm();
    }
    let text = margay_tests::rerun_in_vm("ipip_in_a_vm");
    assert!(text.contains("test result: ok. 1 passed"), "{text}");
}

fn in_vm() {
    let dir = margay_harness::names::temp_dir("ipiplab").unwrap();
    let lab = Lab {
        dir: dir.path().to_owned(),
    };
    let _down = Down(&lab);
    let t = Instant::now();
    ipip_lab(&lab);
    println!("ipip lab and pool switches: {:.0?}", t.elapsed());
    lab.ok(&["down"]);
    let t = Instant::now();
    cross_subnet(&lab);
    println!("cross-subnet lab: {:.0?}", t.elapsed());
}

/// `margay-lab` with its own state directory.
struct Lab {
    dir: PathBuf,
}

/// Takes the lab down whatever happens.
struct Down<'a>(&'a Lab);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["down"]);
    }
}

impl Lab {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(paths::workspace_bin("margay-lab").unwrap());
        c.env("MARGAY_LAB_DIR", &self.dir).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs `margay-lab ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "margay-lab {args:?}: {text}{}\nlab log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("lab.log")).unwrap_or_default()
        );
        text
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    fn kubectl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["kubectl"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Node name → its namespace.
    fn nodes(&self) -> BTreeMap<String, String> {
        self.state()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (s(&n["name"]), s(&n["netns"])))
            .collect()
    }

    /// Pod name → (node, namespace, address).
    fn pods(&self) -> BTreeMap<String, (String, String, String)> {
        self.state()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (s(&p["name"]), (s(&p["node"]), s(&p["netns"]), s(&p["ip"]))))
            .collect()
    }

    /// Every allocation: address → handle.
    fn allocations(&self) -> BTreeMap<String, String> {
        let blocks = self.kubectl_json(&["get", "ipamblocks"]);
        let mut out = BTreeMap::new();
        for b in blocks["items"].as_array().unwrap() {
            if let Some(a) = b["spec"]["allocations"].as_object() {
                for (ip, rec) in a {
                    out.insert(ip.clone(), s(&rec["handle"]));
                }
            }
        }
        out
    }

    /// Node name → its annotations.
    fn annotations(&self) -> BTreeMap<String, serde_json::Value> {
        self.kubectl_json(&["get", "nodes"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    s(&n["metadata"]["name"]),
                    n["metadata"]["annotations"].clone(),
                )
            })
            .collect()
    }

    fn set_encap(&self, e: &str) {
        let patch = format!("{{\"spec\":{{\"encapsulation\":\"{e}\"}}}}");
        self.ok(&[
            "kubectl", "patch", "ippool", "default", "--type", "merge", "-p", &patch,
        ]);
    }
}

fn s(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// `ip -n NS ARGS`.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tunl0` of a namespace: (up, MTU, IPv4 addresses, received bytes).
fn tunl0(ns: &str) -> (bool, u64, Vec<String>, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&ip(ns, &["-j", "-s", "addr", "show", "dev", "tunl0"])).unwrap();
    let l = &v[0];
    let up = l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"));
    let addrs = l["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .map(|a| s(&a["local"]))
        .collect();
    let rx = {
        let v: serde_json::Value =
            serde_json::from_str(&ip(ns, &["-j", "-s", "link", "show", "dev", "tunl0"])).unwrap();
        v[0]["stats64"]["rx"]["bytes"].as_u64().unwrap_or(0)
    };
    (up, l["mtu"].as_u64().unwrap_or(0), addrs, rx)
}

/// Polls `f` until it returns `Ok`, for at most `secs`.
fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<T, String>) -> T {
    let every = Duration::from_millis(500);
    wait::until(what, Duration::from_secs(secs), every, || Ok(Some(f()?)))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Every node's routes to the others' blocks go through `dev` (`tunl0`,
/// `margay.vxlan`), on-link.
fn all_routes_via(lab: &Lab, dev: &str) -> Result<(), String> {
    for (node, ns) in lab.nodes() {
        let routes = ip(&ns, &["-4", "route", "show", "proto", "79"]);
        if routes.trim().is_empty() {
            return Err(format!("{node}: no routes"));
        }
        for r in routes.lines() {
            if !r.contains(&format!("dev {dev} ")) || !r.contains("onlink") {
                return Err(format!("{node}: {r}"));
            }
        }
    }
    Ok(())
}

fn ipip_lab(lab: &Lab) {
    // What README says an operator runs.
    let up = lab.ok(&["up", "--nodes", "3", "--encap", "ipip", "--tor", "bird"]);
    assert!(up.contains("all 36 pod pairs reachable"), "{up}");
    lab.ok(&["check"]);
    let nodes = lab.nodes();
    let pods = lab.pods();
    let alloc = lab.allocations();
    let ann = lab.annotations();
    for (node, ns) in &nodes {
        let (up, mtu, addrs, _) = tunl0(ns);
        assert!(up && mtu == 1480, "{node}: tunl0 up {up}, MTU {mtu}");
        assert_eq!(addrs.len(), 1, "{node}: {addrs:?}");
        let a = &addrs[0];
        assert_eq!(
            alloc.get(a),
            Some(&format!("tunnel.ipip.{node}")),
            "{node}: {a} in IPAM"
        );
        assert_eq!(ann[node]["margay.dev/ipip-tunnel-address"], a.as_str());
    }
    all_routes_via(lab, "tunl0").unwrap();
    tunl0_takes_packets_from_nodes_only(lab);
    // Pods leave room for the tunnel.
    for (name, (_, ns, _)) in &pods {
        let l = ip(ns, &["link", "show", "eth0"]);
        assert!(l.contains("mtu 1480"), "{name}: {l}");
    }
    // A stream across nodes goes through tunl0.
    let (_, server_ns, server_ip) = &pods["node2-pod1"];
    let (_, client_ns, _) = &pods["node1-pod1"];
    let before = tunl0(&nodes["node2"]).3;
    let mut server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let client = eventually("iperf3 to connect", 30, || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", "3", "-J",
            ])
            .output()
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| format!("{v}"))
    });
    let _ = server.wait();
    let through = tunl0(&nodes["node2"]).3 - before;
    println!(
        "iperf3 node1 -> node2 through tunl0: {:.0} Mbit/s, {through} bytes",
        client / 1e6
    );
    assert!(
        client > 0.0 && through > 1_000_000,
        "{client} bit/s, {through} bytes"
    );

    // The pool switched to VXLAN and back, under traffic.
    let pingers = |pods: &BTreeMap<String, (String, String, String)>| -> Vec<Pinger> {
        let mut v = Vec::new();
        for (from, (fnode, fns, _)) in pods {
            for (to, (tnode, _, tip)) in pods {
                if fnode != tnode && from.ends_with("pod1") && to.ends_with("pod1") {
                    v.push(Pinger::start(fns, tip, format!("{from} -> {to}")));
                }
            }
        }
        v
    };
    for (to, dev) in [("VXLAN", "margay.vxlan"), ("IPIP", "tunl0")] {
        let ping = pingers(&pods);
        // Not a wait: 2 s of traffic before the switch, to compare with.
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        lab.set_encap(to);
        // What was still missing, each time it changed: how the switch
        // reached the nodes.
        let mut seen: Vec<(Duration, String)> = Vec::new();
        eventually(&format!("routes via {dev}"), 120, || {
            let r = all_routes_via(lab, dev);
            if let Err(e) = &r
                && seen.last().is_none_or(|(_, l)| l != e)
            {
                seen.push((t.elapsed(), e.clone()));
            }
            r
        });
        println!(
            "routes through {dev} on every node after {:.1?}",
            t.elapsed()
        );
        for (at, what) in &seen {
            println!("  {at:.1?}: {what}");
        }
        // The tunnel no pool uses is retired after its linger.
        eventually("the unused tunnel retired", 180, || {
            // The kernel first (cheap), then what the API says.
            for (node, ns) in &nodes {
                let gone = if to == "VXLAN" {
                    let (up, _, addrs, _) = tunl0(ns);
                    !up && addrs.is_empty()
                } else {
                    ip(ns, &["link", "show", "margay.vxlan"]).is_empty()
                };
                if !gone {
                    return Err(format!("{node} still has its old tunnel device"));
                }
            }
            let old = if to == "VXLAN" { "ipip" } else { "vxlan" };
            let alloc = lab.allocations();
            let ann = lab.annotations();
            for node in nodes.keys() {
                if alloc.values().any(|h| *h == format!("tunnel.{old}.{node}")) {
                    return Err(format!("{node} still holds its {old} tunnel address"));
                }
                if ann[node]
                    .get(format!("margay.dev/{old}-tunnel-address"))
                    .is_some()
                {
                    return Err(format!("{node} still announces its {old} tunnel"));
                }
            }
            Ok(())
        });
        println!("old tunnel retired everywhere after {:.1?}", t.elapsed());
        // A pool's encapsulation switched under traffic: under a second
        // lost in a row, watched for the whole switch and the old tunnel's
        // retirement. (Before the VXLAN entries were held for kept routes,
        // every pair lost ~2 s switching to IPIP: the other node had
        // stopped announcing its VTEP and not yet announced tunl0, so its
        // neighbour entry went while the route through it stayed.)
        for p in ping {
            p.stop().assert_outage_under(
                &format!("switching to {to}"),
                100,
                Duration::from_secs(1),
            );
        }
        lab.ok(&["check"]);
    }
}

/// `tunl0` takes IPIP packets from the cluster's nodes only: a packet made
/// by hand (protocol 4 around a datagram from node1's pod to node2's)
/// arrives when node1 sends it and is dropped when the router sends the
/// same packet from its own address.
fn tunl0_takes_packets_from_nodes_only(lab: &Lab) {
    use margay_tests::tunnel;
    use std::net::{Ipv4Addr, SocketAddrV4};
    let state = lab.state();
    let addr = |v: &serde_json::Value| s(v).parse::<Ipv4Addr>().unwrap();
    let node = |name: &str| {
        let n = state["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap();
        (s(&n["netns"]), addr(&n["v4"]))
    };
    let ((node1, node1_ip), (_, node2_ip)) = (node("node1"), node("node2"));
    let (router, router_ip) = (s(&state["fabric_netns"]), addr(&state["tor_v4"]));
    let pods = lab.pods();
    let (_, _, from) = &pods["node1-pod1"];
    let (_, to_ns, to) = &pods["node2-pod1"];
    let port = 7777;
    let packet = |tag: &str| {
        tunnel::ipv4_udp(
            SocketAddrV4::new(from.parse().unwrap(), 40000),
            SocketAddrV4::new(to.parse().unwrap(), port),
            tag.as_bytes(),
        )
    };
    let mut pod = tunnel::Catcher::bind(to_ns, port).unwrap();
    tunnel::send_ipip(&router, router_ip, node2_ip, &packet("router")).unwrap();
    let send = || tunnel::send_ipip(&node1, node1_ip, node2_ip, &packet("node1"));
    send().unwrap();
    let arrived = pod
        .wait_for("node1", Duration::from_secs(20), send)
        .unwrap();
    assert!(arrived, "node1's packet did not arrive: {:?}", pod.got);
    assert!(
        !pod.got.iter().any(|g| g == "router"),
        "an IPIP packet from the router reached the pod: {:?}",
        pod.got
    );
}

fn cross_subnet(lab: &Lab) {
    let up = lab.ok(&[
        "up",
        "--nodes",
        "3",
        "--subnets",
        "2",
        "--encap",
        "ipip-cross-subnet",
        "--tor",
        "bird",
        "--pods-per-node",
        "1",
    ]);
    assert!(up.contains("all 9 pod pairs reachable"), "{up}");
    let nodes = lab.nodes();
    let blocks = lab.kubectl_json(&["get", "ipamblocks"]);
    let owner: Vec<(String, String)> = blocks["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (s(&b["spec"]["cidr"]), s(&b["spec"]["node"])))
        .collect();
    // node1 and node3 share 10.99.0.0/24; node2 is in 10.99.1.0/24.
    let routes = ip(&nodes["node1"], &["-4", "route", "show", "proto", "79"]);
    for (cidr, node) in owner.iter().filter(|(_, n)| n != "node1") {
        let line = routes
            .lines()
            .find(|l| l.starts_with(&format!("{cidr} ")))
            .unwrap_or_else(|| panic!("node1 has no route to {cidr}: {routes}"));
        match node.as_str() {
            "node3" => assert!(line.contains("via 10.99.0.3 dev eth0"), "{line}"),
            "node2" => assert!(
                line.contains("via 10.99.1.2 dev tunl0") && line.contains("onlink"),
                "{line}"
            ),
            _ => {}
        }
    }
    let (up, mtu, addrs, _) = tunl0(&nodes["node1"]);
    assert!(up && mtu == 1480 && addrs.len() == 1);
    lab.ok(&["check"]);
}
