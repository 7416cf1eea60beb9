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
    _dir: tempfile::TempDir,
}

impl Margay {
    fn start(node: &Node, conf: &str) -> Margay {
        let dir = names::temp_dir("mbgp").unwrap();
        let sock = dir.path().join("ctl.sock");
        let conf_path = dir.path().join("bgp.toml");
        std::fs::write(
            &conf_path,
            format!("control_socket = \"{}\"\n{conf}", sock.display()),
        )
        .unwrap();
        let mut cmd = node.ns.cmd(env!("CARGO_BIN_EXE_margay-bgp"));
        cmd.arg("--config").arg(&conf_path).env("RUST_LOG", "debug");
        let mut daemon = Daemon::spawn("margay-bgp", cmd, &dir.path().join("log")).unwrap();
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
        Margay {
            daemon,
            sock,
            _dir: dir,
        }
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
    let margay = Margay::start(
        &a,
        r#"asn = 64512
router_id = "10.99.0.1"
[[neighbor]]
address = "10.99.0.2"
asn = 64512
hold_time = 9
[[originate]]
prefix = "10.244.1.0/26"
"#,
    );
    let bird = Bird::start(
        &b.ns,
        r#"log stderr all;
router id 10.99.0.2;
protocol device {}
protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }
protocol static blocks { ipv4; route 10.244.2.0/26 blackhole; }
protocol bgp m {
  local 10.99.0.2 as 64512; neighbor 10.99.0.1 as 64512; direct;
  hold time 9; keepalive time 3; graceful restart on;
  ipv4 { import all; export where proto = "blocks"; next hop self; };
}
"#,
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
