//! `margay-bgp` against real BGP daemons, in namespaces.

use std::process::Command;
use std::time::Duration;

use margay_harness::bgpd::{Bird, Gobgp};
use margay_harness::{Daemon, Fabric, Node, names, wait};

const T: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(200);

/// A `margay-bgp` process in a node namespace.
struct Margay {
    daemon: Daemon,
    sock: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Margay {
    fn start(node: &Node, conf: &str) -> Margay {
        let dir = names::temp_dir("mbgp").unwrap();
        let (daemon, sock) = Self::spawn(node, dir.path(), conf);
        Margay { daemon, sock, dir }
    }

    fn spawn(node: &Node, dir: &std::path::Path, conf: &str) -> (Daemon, std::path::PathBuf) {
        let sock = dir.join("ctl.sock");
        let conf_path = dir.join("bgp.toml");
        let text = format!("control_socket = \"{}\"\n{conf}", sock.display());
        std::fs::write(&conf_path, text).unwrap();
        let _ = std::fs::remove_file(&sock);
        let mut cmd = node.ns.cmd(env!("CARGO_BIN_EXE_margay-bgp"));
        cmd.arg("--config").arg(&conf_path).env("RUST_LOG", "debug");
        let mut daemon = Daemon::spawn("margay-bgp", cmd, &dir.join("log")).unwrap();
        wait::until(
            "margay-bgp control socket",
            T,
            Duration::from_millis(20),
            || {
                daemon.ensure_running().map_err(|e| e.to_string())?;
                Ok(sock.exists().then_some(()))
            },
        )
        .unwrap();
        (daemon, sock)
    }

    /// kill -9, then start again with `conf` (same directory and log).
    fn crash_and_restart(&mut self, node: &Node, conf: &str) {
        self.daemon.kill9();
        let (d, s) = Self::spawn(node, self.dir.path(), conf);
        self.daemon = d;
        self.sock = s;
    }

    fn show(&self, what: &str) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_margay-bgp"))
            .arg("--socket")
            .arg(&self.sock)
            .args(["show", what])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn established(&self, addr: &str) -> bool {
        self.show("neighbors")
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["address"] == addr && n["state"] == "Established")
    }
}

fn kernel_route(node: &Node, prefix: &str) -> margay_harness::Result<String> {
    wait::until(
        &format!("{prefix} in the kernel of {}", node.ns.name()),
        T,
        POLL,
        || {
            let r = node
                .ns
                .ip(&["route", "show", prefix])
                .map_err(|e| e.to_string())?;
            Ok((!r.trim().is_empty()).then(|| r.trim().to_owned()))
        },
    )
}

#[test]
fn ibgp_with_bird_both_directions_into_both_kernels() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let margay = Margay::start(&a, &margay_conf("", &["10.244.1.0/26"]));
    let bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "graceful restart on;",
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    wait::until("session up on both sides", T, POLL, || {
        Ok((bird.established("m") && margay.established("10.99.0.2")).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nbird: {:?}\nmargay log:\n{}",
            bird.birdc("show protocols all m"),
            margay.daemon.log_tail(40)
        )
    });
    let r = kernel_route(&a, "10.244.2.0/26").unwrap();
    assert!(r.contains("via 10.99.0.2") && r.contains("proto 77"), "{r}");
    let r = kernel_route(&b, "10.244.1.0/26").unwrap();
    assert!(
        r.contains("via 10.99.0.1") && r.contains("proto bird"),
        "{r}"
    );
    let routes = margay.show("routes");
    let metrics = Command::new(env!("CARGO_BIN_EXE_margay-bgp"))
        .arg("--socket")
        .arg(&margay.sock)
        .args(["show", "metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("margay_bgp_sessions_established 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("margay_bgp_prefixes_received{peer=\"10.99.0.2\",peer_asn=\"64512\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE margay_bgp_updates_received_total counter"));
    let learned = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == "10.244.2.0/26")
        .expect("learned route listed");
    assert_eq!(learned["from"], "10.99.0.2");
    assert_eq!(learned["local_pref"], 100);

    // BIRD withdraws its block: the route leaves margay's kernel.
    bird.birdc("disable blocks").unwrap();
    wait::until("withdrawal reaches the kernel", T, POLL, || {
        let r =
            a.ns.ip(&["route", "show", "10.244.2.0/26"])
                .map_err(|e| e.to_string())?;
        Ok(r.trim().is_empty().then_some(()))
    })
    .unwrap();
}

#[test]
fn ebgp_with_gobgp_and_four_octet_asns() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("gobgp").unwrap();
    let margay = Margay::start(
        &a,
        r#"asn = 4200000001
router_id = "10.99.0.1"
[[neighbor]]
address = "10.99.0.2"
asn = 4200000002
hold_time = 9
[[originate]]
prefix = "10.244.1.0/26"
"#,
    );
    let gobgp = Gobgp::start(
        &b.ns,
        r#"[global.config]
  as = 4200000002
  router-id = "10.99.0.2"
  local-address-list = ["10.99.0.2"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.99.0.1"
    peer-as = 4200000001
  [neighbors.timers.config]
    hold-time = 9
    keepalive-interval = 3
"#,
    )
    .unwrap();
    gobgp
        .gobgp(&["global", "rib", "add", "10.244.3.0/26", "-a", "ipv4"])
        .unwrap();
    wait::until("session up", T, POLL, || {
        Ok(gobgp.established("10.99.0.1").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\nmargay log:\n{}", margay.daemon.log_tail(40)));
    let r = kernel_route(&a, "10.244.3.0/26").unwrap();
    assert!(r.contains("via 10.99.0.2"), "{r}");
    let rib = wait::until("margay's block at GoBGP", T, POLL, || {
        let rib = gobgp
            .gobgp(&["global", "rib", "-j"])
            .map_err(|e| e.to_string())?;
        Ok(rib.contains("10.244.1.0/26").then_some(rib))
    })
    .unwrap();
    // The AS path is our 4-octet AS, and the next hop is us.
    assert!(rib.contains("4200000001"), "{rib}");
    assert!(rib.contains("10.99.0.1"), "{rib}");
}

#[test]
fn bad_config_exits_with_a_clear_message() {
    let dir = names::temp_dir("badcfg").unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "asn = 64512\nrouter_id = \"10.0.0.1\"\n[[neighbor]]\naddress = \"10.0.0.2\"\nasn = 1\nhold_time = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_margay-bgp"))
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neighbor[0]") && err.contains("hold_time"),
        "{err}"
    );
}

fn bird_conf(
    me: &str,
    peer: &str,
    peer_as: u32,
    my_as: u32,
    extra_bgp: &str,
    blocks: &[&str],
) -> String {
    let routes: String = blocks
        .iter()
        .map(|b| format!("route {b} blackhole; "))
        .collect();
    format!(
        r#"log stderr all;
router id {me};
protocol device {{}}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}
protocol static blocks {{ ipv4; {routes} }}
protocol bgp m {{
  local {me} as {my_as}; neighbor {peer} as {peer_as}; direct;
  hold time 9; keepalive time 3; {extra_bgp}
  ipv4 {{ import all; export where proto = "blocks"; next hop self; }};
}}
"#
    )
}

fn margay_conf(peer_extra: &str, originate: &[&str]) -> String {
    let mut c = format!(
        "asn = 64512\nrouter_id = \"10.99.0.1\"\nrestart_time = 30\n[[neighbor]]\naddress = \"10.99.0.2\"\nasn = 64512\nhold_time = 9\n{peer_extra}\n"
    );
    for p in originate {
        c.push_str(&format!("[[originate]]\nprefix = \"{p}\"\n"));
    }
    c
}

fn absent(node: &Node, prefix: &str) -> bool {
    node.ns
        .ip(&["route", "show", prefix])
        .map(|r| r.trim().is_empty())
        .unwrap_or(false)
}

#[test]
fn md5_with_bird_right_password_establishes_wrong_never() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let margay = Margay::start(
        &a,
        &margay_conf("password = \"s3cret\"", &["10.244.1.0/26"]),
    );
    let mut bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "password \"wrong\";",
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    // For a while, in both directions (each side connects), nothing comes up.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        !bird.established("m"),
        "{:?}",
        bird.birdc("show protocols all m")
    );
    assert!(!margay.established("10.99.0.2"));
    assert!(absent(&a, "10.244.2.0/26"));
    drop(bird);
    bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "password \"s3cret\";",
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    wait::until("MD5 session up", T, POLL, || {
        Ok((bird.established("m") && margay.established("10.99.0.2")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", margay.daemon.log_tail(30)));
    kernel_route(&a, "10.244.2.0/26").unwrap();
}

#[test]
fn md5_with_frr() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("frr").unwrap();
    let margay = Margay::start(
        &a,
        &margay_conf("password = \"frrkey\"", &["10.244.1.0/26"]),
    );
    let frr = margay_harness::bgpd::Frr::start(
        &b.ns,
        r#"frr defaults traditional
hostname frrB
router bgp 64512
 bgp router-id 10.99.0.2
 no bgp network import-check
 neighbor 10.99.0.1 remote-as 64512
 neighbor 10.99.0.1 password frrkey
 neighbor 10.99.0.1 timers 3 9
 address-family ipv4 unicast
  network 10.244.2.0/26
 exit-address-family
!
"#,
        true,
    )
    .unwrap();
    wait::until("MD5 session with FRR", T, POLL, || {
        Ok(margay.established("10.99.0.2").then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{:?}\n{}",
            frr.vtysh("show bgp summary"),
            margay.daemon.log_tail(30)
        )
    });
    kernel_route(&a, "10.244.2.0/26").unwrap();
    let r = kernel_route(&b, "10.244.1.0/26").unwrap();
    assert!(r.contains("via 10.99.0.1"), "{r}");
}

#[test]
fn two_active_margay_speakers_resolve_the_collision() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m1").unwrap();
    let b = fabric.add_node("m2").unwrap();
    let conf = |me: &str, peer: &str, block: &str| {
        format!(
            "asn = 64512\nrouter_id = \"{me}\"\n[[neighbor]]\naddress = \"{peer}\"\nasn = 64512\nhold_time = 9\n[[originate]]\nprefix = \"{block}\"\n"
        )
    };
    let m1 = Margay::start(&a, &conf("10.99.0.1", "10.99.0.2", "10.244.1.0/26"));
    let m2 = Margay::start(&b, &conf("10.99.0.2", "10.99.0.1", "10.244.2.0/26"));
    wait::until("both up", T, POLL, || {
        Ok((m1.established("10.99.0.2") && m2.established("10.99.0.1")).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            m1.daemon.log_tail(30),
            m2.daemon.log_tail(30)
        )
    });
    kernel_route(&a, "10.244.2.0/26").unwrap();
    kernel_route(&b, "10.244.1.0/26").unwrap();
    // One session survives and stays up: exactly one TCP connection on 179.
    std::thread::sleep(Duration::from_secs(3));
    assert!(m1.established("10.99.0.2") && m2.established("10.99.0.1"));
    let ss =
        a.ns.exec(
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                "( sport = :179 or dport = :179 )",
            ],
        )
        .unwrap();
    assert_eq!(ss.lines().count(), 1, "{ss}");
}

#[test]
fn graceful_restart_of_bird_keeps_routes_stale_then_refreshes() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let margay = Margay::start(&a, &margay_conf("", &["10.244.1.0/26"]));
    let gr = "graceful restart on; graceful restart time 30;";
    let mut bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            gr,
            &["10.244.2.0/26", "10.244.3.0/26"],
        ),
    )
    .unwrap();
    kernel_route(&a, "10.244.2.0/26").unwrap();
    kernel_route(&a, "10.244.3.0/26").unwrap();
    bird.daemon().kill9();
    // The routes stay in margay's kernel while BIRD is away.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!absent(&a, "10.244.2.0/26") && !absent(&a, "10.244.3.0/26"));
    let routes = margay.show("routes");
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["prefix"] == "10.244.2.0/26" && r["stale"] == true),
        "{routes}"
    );
    // BIRD comes back announcing only one of the two: after its End-of-RIB
    // the other is gone, the kept one never left.
    let bird2 = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            gr,
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    wait::until("stale route flushed after End-of-RIB", T, POLL, || {
        Ok(absent(&a, "10.244.3.0/26").then_some(()))
    })
    .unwrap();
    assert!(!absent(&a, "10.244.2.0/26"));
    assert!(bird2.established("m"));
    let routes = margay.show("routes");
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["stale"] == false),
        "{routes}"
    );
}

#[test]
fn graceful_restart_of_margay_keeps_forwarding_both_ways() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let mut margay = Margay::start(&a, &margay_conf("", &["10.244.1.0/26", "10.244.4.0/26"]));
    let bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "graceful restart on;",
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    kernel_route(&a, "10.244.2.0/26").unwrap();
    kernel_route(&b, "10.244.1.0/26").unwrap();
    kernel_route(&b, "10.244.4.0/26").unwrap();
    // kill -9 and restart without 10.244.4.0/26: while it is down and
    // while it comes back, neither kernel loses a route it still needs.
    let watch_a = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut gaps = 0;
            for _ in 0..40 {
                if absent(&a, "10.244.2.0/26") || absent(&b, "10.244.1.0/26") {
                    gaps += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            gaps
        });
        margay.crash_and_restart(&a, &margay_conf("", &["10.244.1.0/26"]));
        h.join().unwrap()
    });
    assert_eq!(watch_a, 0, "a route disappeared during the restart");
    wait::until("session back", T, POLL, || {
        Ok(margay.established("10.99.0.2").then_some(()))
    })
    .unwrap();
    // The prefix no longer originated is withdrawn once margay is back.
    wait::until("old block withdrawn at BIRD", T, POLL, || {
        Ok(absent(&b, "10.244.4.0/26").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{:?}", bird.birdc("show route all")));
    assert!(!absent(&a, "10.244.2.0/26"));
    let r = a.ns.ip(&["route", "show", "proto", "77"]).unwrap();
    assert_eq!(
        r.lines().filter(|l| l.starts_with("10.244.2.0/26")).count(),
        1,
        "{r}"
    );
}

fn client_conf(me: &str, rr: &str, block: &str) -> String {
    format!(
        "asn = 64512\nrouter_id = \"{me}\"\nimport_prefixes = [\"10.244.0.0/16\"]\n[[neighbor]]\naddress = \"{rr}\"\nasn = 64512\nhold_time = 9\n[[originate]]\nprefix = \"{block}\"\n"
    )
}

enum Rr {
    Bird,
    Frr,
    Gobgp,
}

/// Two margay nodes as route-reflector clients of a real reflector in the
/// fabric namespace: each learns the other's block with the originator's
/// next hop.
fn margay_as_rr_client(kind: Rr) {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("c1").unwrap();
    let b = fabric.add_node("c2").unwrap();
    let ns = fabric.ns();
    let _rr: Box<dyn std::any::Any> = match kind {
        Rr::Bird => Box::new(
            Bird::start(
                ns,
                r#"log stderr all;
router id 10.99.0.254;
protocol device {}
protocol bgp nodes {
  local 10.99.0.254 as 64512;
  neighbor range 10.99.0.0/24 internal;
  rr client; rr cluster id 10.99.0.254; direct;
  hold time 9; keepalive time 3;
  ipv4 { import all; export all; };
}
"#,
            )
            .unwrap(),
        ),
        Rr::Frr => Box::new(
            margay_harness::bgpd::Frr::start(
                ns,
                r#"frr defaults traditional
hostname frrRR
router bgp 64512
 bgp router-id 10.99.0.254
 bgp cluster-id 10.99.0.254
 neighbor nodes peer-group
 neighbor nodes remote-as 64512
 neighbor nodes timers 3 9
 bgp listen range 10.99.0.0/24 peer-group nodes
 address-family ipv4 unicast
  neighbor nodes route-reflector-client
 exit-address-family
!
"#,
                false,
            )
            .unwrap(),
        ),
        Rr::Gobgp => Box::new(
            Gobgp::start(
                ns,
                r#"[global.config]
  as = 64512
  router-id = "10.99.0.254"
  local-address-list = ["10.99.0.254"]
[[peer-groups]]
  [peer-groups.config]
    peer-group-name = "nodes"
    peer-as = 64512
  [peer-groups.timers.config]
    hold-time = 9
    keepalive-interval = 3
  [peer-groups.route-reflector.config]
    route-reflector-client = true
    route-reflector-cluster-id = "10.99.0.254"
  [[peer-groups.afi-safis]]
    [peer-groups.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
[[dynamic-neighbors]]
  [dynamic-neighbors.config]
    prefix = "10.99.0.0/24"
    peer-group = "nodes"
"#,
            )
            .unwrap(),
        ),
    };
    let m1 = Margay::start(
        &a,
        &client_conf("10.99.0.1", "10.99.0.254", "10.244.1.0/26"),
    );
    let m2 = Margay::start(
        &b,
        &client_conf("10.99.0.2", "10.99.0.254", "10.244.2.0/26"),
    );
    let r = kernel_route(&a, "10.244.2.0/26").unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            m1.daemon.log_tail(20),
            m2.daemon.log_tail(20)
        )
    });
    assert!(
        r.contains("via 10.99.0.2"),
        "next hop kept by the reflector: {r}"
    );
    let r = kernel_route(&b, "10.244.1.0/26").unwrap();
    assert!(r.contains("via 10.99.0.1"), "{r}");
    // Our own block reflected back (if the reflector does) is not imported.
    let routes = m1.show("routes");
    let own: Vec<_> = routes
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["prefix"] == "10.244.1.0/26")
        .collect();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0]["from"], "local");
}

#[test]
fn margay_as_route_reflector_client_of_bird() {
    margay_as_rr_client(Rr::Bird);
}

#[test]
fn margay_as_route_reflector_client_of_frr() {
    margay_as_rr_client(Rr::Frr);
}

#[test]
fn margay_as_route_reflector_client_of_gobgp() {
    margay_as_rr_client(Rr::Gobgp);
}

/// margay reflects between a BIRD and an FRR client that connect to it
/// from a listen range (dynamic neighbors).
#[test]
fn margay_as_route_reflector_for_bird_and_frr() {
    let fabric = Fabric::new().unwrap();
    let rr = fabric.add_node("rr").unwrap(); // 10.99.0.1
    let a = fabric.add_node("bird").unwrap(); // 10.99.0.2
    let b = fabric.add_node("frr").unwrap(); // 10.99.0.3
    let margay = Margay::start(
        &rr,
        r#"asn = 64512
router_id = "10.99.0.1"
fib = false
[[listen_range]]
prefix = "10.99.0.0/24"
asn = 64512
route_reflector_client = true
hold_time = 9
"#,
    );
    let bird = Bird::start(
        &a.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "",
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    let frr = margay_harness::bgpd::Frr::start(
        &b.ns,
        r#"frr defaults traditional
hostname frrC
router bgp 64512
 bgp router-id 10.99.0.3
 no bgp network import-check
 neighbor 10.99.0.1 remote-as 64512
 neighbor 10.99.0.1 timers 3 9
 address-family ipv4 unicast
  network 10.244.3.0/26
 exit-address-family
!
"#,
        true,
    )
    .unwrap();
    let r = kernel_route(&a, "10.244.3.0/26").unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{:?}",
            margay.daemon.log_tail(30),
            bird.birdc("show protocols all m")
        )
    });
    assert!(
        r.contains("via 10.99.0.3") && r.contains("proto bird"),
        "{r}"
    );
    let r = kernel_route(&b, "10.244.2.0/26").unwrap();
    assert!(r.contains("via 10.99.0.2"), "{r}");
    // BIRD sees the reflection attributes we added.
    let all = bird.birdc("show route 10.244.3.0/26 all").unwrap();
    assert!(all.contains("originator_id: 10.99.0.3"), "{all}");
    assert!(all.contains("cluster_list: 10.99.0.1"), "{all}");
    let n = margay.show("neighbors");
    assert_eq!(
        n.as_array()
            .unwrap()
            .iter()
            .filter(|p| p["dynamic"] == true)
            .count(),
        2,
        "{n}"
    );
    drop(frr);
}

#[test]
fn ipv6_session_and_prefixes_with_bird() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let margay = Margay::start(
        &a,
        r#"asn = 64512
router_id = "10.99.0.1"
[[neighbor]]
address = "fd00:99::2"
asn = 64513
hold_time = 9
[[originate]]
prefix = "fd00:244:1::/122"
"#,
    );
    let bird = Bird::start(
        &b.ns,
        r#"log stderr all;
router id 10.99.0.2;
protocol device {}
protocol kernel { ipv6 { import none; export where source = RTS_BGP; }; }
protocol static blocks6 { ipv6; route fd00:244:2::/122 blackhole; }
protocol bgp m {
  local fd00:99::2 as 64513; neighbor fd00:99::1 as 64512; direct;
  hold time 9; keepalive time 3;
  ipv6 { import all; export where proto = "blocks6"; };
}
"#,
    )
    .unwrap();
    let r = wait::until("v6 route in margay's kernel", T, POLL, || {
        let r =
            a.ns.ip(&["-6", "route", "show", "fd00:244:2::/122"])
                .map_err(|e| e.to_string())?;
        Ok((!r.trim().is_empty()).then(|| r.trim().to_owned()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{:?}",
            margay.daemon.log_tail(30),
            bird.birdc("show protocols all m")
        )
    });
    assert!(
        r.contains("via fd00:99::2") && r.contains("proto 77"),
        "{r}"
    );
    let r = wait::until("v6 route in BIRD's kernel", T, POLL, || {
        let r =
            b.ns.ip(&["-6", "route", "show", "fd00:244:1::/122"])
                .map_err(|e| e.to_string())?;
        Ok((!r.trim().is_empty()).then(|| r.trim().to_owned()))
    })
    .unwrap();
    assert!(r.contains("via fd00:99::1"), "{r}");
}

/// RFC 7606 against a real sender: ExaBGP emits malformed attributes.
#[test]
fn malformed_updates_from_exabgp_are_handled_per_rfc7606() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("exa").unwrap();
    let margay = Margay::start(
        &a,
        r#"asn = 64512
router_id = "10.99.0.1"
[[neighbor]]
address = "10.99.0.2"
asn = 65010
hold_time = 9
"#,
    );
    let exa = margay_harness::bgpd::Exabgp::start(
        &b.ns,
        r#"process api { run {helper}; encoder json; }
neighbor 10.99.0.1 {
  router-id 10.99.0.2; local-address 10.99.0.2; local-as 65010; peer-as 64512;
  hold-time 9;
  family { ipv4 unicast; }
  api { processes [ api ]; neighbor-changes; receive { parsed; update; notification; } }
}
"#,
    )
    .unwrap();
    wait::until("session up", T, POLL, || {
        Ok(margay.established("10.99.0.2").then_some(()))
    })
    .unwrap();
    exa.command("announce route 10.244.7.0/24 next-hop self")
        .unwrap();
    exa.command("announce route 10.244.8.0/24 next-hop self attribute [ 0x99 0xc0 0x0102 ]")
        .unwrap();
    kernel_route(&a, "10.244.7.0/24").unwrap();
    // An unknown optional transitive attribute is accepted.
    kernel_route(&a, "10.244.8.0/24").unwrap();

    // COMMUNITIES of 3 octets: treat-as-withdraw, the session stays up.
    exa.command("announce route 10.244.7.0/24 next-hop self attribute [ 0x08 0xc0 0x010203 ]")
        .unwrap();
    wait::until("malformed update withdraws the route", T, POLL, || {
        Ok(absent(&a, "10.244.7.0/24").then_some(()))
    })
    .unwrap();
    assert!(margay.established("10.99.0.2"));
    assert!(!absent(&a, "10.244.8.0/24"), "other routes untouched");
    // ...and never went down: no error recorded, ExaBGP got no NOTIFICATION.
    assert!(margay.show("neighbors")[0]["last_error"].is_null());
    assert!(!exa.received().iter().any(|e| e["type"] == "notification"));

    // An unrecognised well-known attribute: NOTIFICATION 3/2, session reset.
    exa.command("announce route 10.244.9.0/24 next-hop self attribute [ 0x99 0x40 0x01 ]")
        .unwrap();
    wait::until("session reset with UPDATE error", T, POLL, || {
        let n = margay.show("neighbors");
        let err = n[0]["last_error"].as_str().unwrap_or("").to_owned();
        Ok(err.contains("UPDATE message error (3/2)").then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            margay.show("neighbors"),
            margay.daemon.log_tail(20)
        )
    });
    assert!(absent(&a, "10.244.9.0/24"));
    // ExaBGP saw our NOTIFICATION.
    wait::until("ExaBGP reports the notification", T, POLL, || {
        Ok(exa
            .received()
            .iter()
            .any(|e| e["type"] == "notification" || e.to_string().contains("notification"))
            .then_some(()))
    })
    .unwrap();
}

/// A full iBGP mesh of margay speakers, one side of each pair passive (as
/// the agent runs it): every node learns every other node's block.
#[test]
fn full_mesh_of_four_converges() {
    let fabric = Fabric::new().unwrap();
    let nodes: Vec<Node> = (0..4)
        .map(|i| fabric.add_node(&format!("n{i}")).unwrap())
        .collect();
    let speakers: Vec<Margay> = nodes
        .iter()
        .map(|n| {
            let mut c = format!(
                "asn = 64512\nrouter_id = \"{}\"\n[[originate]]\nprefix = \"10.244.{}.0/26\"\n",
                n.v4, n.index
            );
            for m in nodes.iter().filter(|m| m.index != n.index) {
                c.push_str(&format!(
                    "[[neighbor]]\naddress = \"{}\"\nasn = 64512\nhold_time = 9\npassive = {}\n",
                    m.v4,
                    n.index < m.index
                ));
            }
            Margay::start(n, &c)
        })
        .collect();
    for n in &nodes {
        for m in nodes.iter().filter(|m| m.index != n.index) {
            let block = format!("10.244.{}.0/26", m.index);
            let r = kernel_route(n, &block).unwrap_or_else(|e| {
                panic!(
                    "{e}\n{}",
                    speakers
                        .iter()
                        .map(|s| s.daemon.log_tail(15))
                        .collect::<Vec<_>>()
                        .join("\n---\n")
                )
            });
            assert!(r.contains(&format!("via {}", m.v4)), "{r}");
        }
    }
}

/// Two eBGP peers announce the same prefix with equally good paths: the
/// kernel route is multipath over both next hops; when one withdraws, the
/// route falls back to the other.
#[test]
fn equal_paths_from_bird_and_gobgp_become_an_ecmp_kernel_route() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap(); // .1
    let b = fabric.add_node("bird").unwrap(); // .2
    let c = fabric.add_node("gobgp").unwrap(); // .3
    let margay = Margay::start(
        &a,
        r#"asn = 64512
router_id = "10.99.0.1"
[[neighbor]]
address = "10.99.0.2"
asn = 65002
hold_time = 9
[[neighbor]]
address = "10.99.0.3"
asn = 65003
hold_time = 9
"#,
    );
    let bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            65002,
            "",
            &["10.250.0.0/24"],
        ),
    )
    .unwrap();
    let gobgp = Gobgp::start(
        &c.ns,
        r#"[global.config]
  as = 65003
  router-id = "10.99.0.3"
  local-address-list = ["10.99.0.3"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.99.0.1"
    peer-as = 64512
"#,
    )
    .unwrap();
    gobgp
        .gobgp(&[
            "global",
            "rib",
            "add",
            "10.250.0.0/24",
            "origin",
            "igp",
            "-a",
            "ipv4",
        ])
        .unwrap();
    let r = wait::until("ECMP route", T, POLL, || {
        let r =
            a.ns.ip(&["route", "show", "10.250.0.0/24"])
                .map_err(|e| e.to_string())?;
        Ok(
            (r.contains("nexthop via 10.99.0.2") && r.contains("nexthop via 10.99.0.3"))
                .then_some(r),
        )
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", margay.show("routes")));
    assert!(r.contains("proto 77"), "{r}");
    bird.birdc("disable blocks").unwrap();
    wait::until("back to one next hop", T, POLL, || {
        let r =
            a.ns.ip(&["route", "show", "10.250.0.0/24"])
                .map_err(|e| e.to_string())?;
        Ok((r.contains("via 10.99.0.3") && !r.contains("10.99.0.2")).then_some(()))
    })
    .unwrap();
}

/// max_prefixes: the peer gets Cease/1 (RFC 4486), its routes go, and the
/// session stays down for a while instead of flapping.
#[test]
fn max_prefixes_closes_the_session_with_cease_1() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let margay = Margay::start(&a, &margay_conf("max_prefixes = 2", &["10.244.1.0/26"]));
    let bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "",
            &["10.244.2.0/26", "10.244.3.0/26", "10.244.4.0/26"],
        ),
    )
    .unwrap();
    wait::until("BIRD reports Cease / max prefixes", T, POLL, || {
        let s = bird
            .birdc("show protocols all m")
            .map_err(|e| e.to_string())?;
        Ok(s.to_lowercase()
            .contains("maximum number of prefixes")
            .then_some(s))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", margay.daemon.log_tail(20)));
    let n = margay.show("neighbors");
    assert!(
        n[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("maximum number of prefixes"),
        "{n}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!margay.established("10.99.0.2"), "stays down");
    for p in ["10.244.2.0/26", "10.244.3.0/26", "10.244.4.0/26"] {
        assert!(absent(&a, p), "{p} still installed");
    }
}

/// GTSM (RFC 5082) against BIRD's `ttl security`: both send TTL 255 and
/// accept only directly connected packets; the session comes up.
#[test]
fn gtsm_with_bird() {
    let fabric = Fabric::new().unwrap();
    let a = fabric.add_node("m").unwrap();
    let b = fabric.add_node("bird").unwrap();
    let margay = Margay::start(&a, &margay_conf("ttl_security = 1", &["10.244.1.0/26"]));
    let bird = Bird::start(
        &b.ns,
        &bird_conf(
            "10.99.0.2",
            "10.99.0.1",
            64512,
            64512,
            "ttl security on;",
            &["10.244.2.0/26"],
        ),
    )
    .unwrap();
    wait::until("GTSM session up", T, POLL, || {
        Ok((bird.established("m") && margay.established("10.99.0.2")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{:?}", bird.birdc("show protocols all m")));
    kernel_route(&a, "10.244.2.0/26").unwrap();
}
