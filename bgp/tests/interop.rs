//! `margay-bgp` against real BGP daemons, in namespaces.

mod fixtures;

use std::process::Command;
use std::time::Duration;

use fixtures::{
    BirdConf, Lab, Margay, MargayConf, POLL, T, absent, holds, kernel_route, raw_peer, wait_absent,
    wait_for,
};
use margay_harness::bgpd::{Bird, Exabgp, Frr, GOBGP_TIMERS, Gobgp, gobgp_conf_with};
use margay_harness::{Node, names, wait};

const BLOCK: &[&str] = &["10.244.1.0/26"];
/// BIRD's block, in the tests with one.
const BIRDS: &[&str] = &["10.244.2.0/26"];
/// BIRD with graceful restart.
const GR: &str = "graceful restart on;";
/// BIRD with graceful restart, a restart time margay's tests outlast.
const GR_30: &str = "graceful restart on; graceful restart time 30;";

fn bird(node: &Node, conf: &BirdConf) -> Bird {
    Bird::start(&node.ns, &conf.text()).unwrap()
}

/// GoBGP on `node` in AS `asn`, with margay (10.99.0.1, AS `peer_as`) its
/// one neighbor, `extra` in its neighbor section.
fn gobgp_peer(node: &Node, asn: u32, peer_as: u32, extra: &str) -> Gobgp {
    let conf = gobgp_conf_with(asn, &node.v4.to_string(), "10.99.0.1", peer_as, extra);
    Gobgp::start(&node.ns, &conf).unwrap()
}

/// FRR (with zebra) on `node` named `host`, in AS 64512 with margay
/// (10.99.0.1), announcing `network`; `neighbor` more settings for margay.
fn frr_peer(node: &Node, host: &str, neighbor: &str, network: &str) -> Frr {
    Frr::start(&node.ns, &frr_conf(node, host, neighbor, network), true).unwrap()
}

/// [`frr_peer`]'s configuration.
fn frr_conf(node: &Node, host: &str, neighbor: &str, network: &str) -> String {
    let me = node.v4;
    let extra = if neighbor.is_empty() {
        String::new()
    } else {
        format!(" neighbor 10.99.0.1 {neighbor}\n")
    };
    format!(
        r#"frr defaults traditional
hostname {host}
router bgp 64512
 bgp router-id {me}
 no bgp network import-check
 neighbor 10.99.0.1 remote-as 64512
{extra} neighbor 10.99.0.1 timers 3 9
 address-family ipv4 unicast
  network {network}
 exit-address-family
!
"#
    )
}

/// Waits for a route to `prefix` in `node`'s kernel (its `ip route`
/// line); on a timeout, panics with margay's log and BIRD's session.
fn route_or_logs(node: &Node, prefix: &str, margay: &Margay, bird: &Bird) -> String {
    kernel_route(node, prefix).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{:?}",
            margay.log(30),
            bird.birdc("show protocols all m")
        )
    })
}

/// Runs raw peer `name` on node `b` against margay on `a` (its first two
/// arguments: their addresses, then `args`) to its end; it must succeed.
/// Its output.
fn raw_peer_run(margay: &Margay, (a, b): (&Node, &Node), name: &str, args: &[&str]) -> String {
    let (ma, mb) = (a.v4.to_string(), b.v4.to_string());
    let all: Vec<&str> = [ma.as_str(), mb.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let out = raw_peer(b, name, &all).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        margay.log(20)
    );
    text.into_owned()
}

/// margay on node `m` (10.99.0.1) with `conf`, and the node of its peer
/// (10.99.0.2) named `peer`. The fields drop in order: margay, the nodes,
/// the fabric (where more nodes may be added).
struct Pair {
    margay: Margay,
    a: Node,
    b: Node,
    lab: Lab,
}

impl Pair {
    /// margay with `neighbor` settings for its iBGP peer, originating
    /// [`BLOCK`].
    fn ibgp(peer: &str, neighbor: &str) -> Self {
        Self::start(peer, &MargayConf::ibgp(neighbor).originate(BLOCK))
    }

    /// margay (10.99.0.1) in AS `asn`, with one neighbor at `addr` in
    /// AS `peer_as`, originating `blocks`.
    fn ebgp(peer: &str, asn: u32, (addr, peer_as): (&str, u32), blocks: &[&str]) -> Self {
        let conf = MargayConf::new(asn, "10.99.0.1")
            .neighbor(addr, peer_as, "")
            .originate(blocks);
        Self::start(peer, &conf)
    }

    fn start(peer: &str, conf: &MargayConf) -> Self {
        let lab = Lab::new();
        let (a, b) = lab.pair("m", peer);
        let margay = Margay::start(&a, conf);
        Self { margay, a, b, lab }
    }
}

/// The session most tests start from: margay on node `m` (10.99.0.1) and
/// BIRD on node `bird` (10.99.0.2), iBGP. The fields drop in order: the
/// daemons, the nodes, the fabric.
struct WithBird {
    margay: Margay,
    bird: Bird,
    a: Node,
    b: Node,
    _lab: Lab,
}

impl WithBird {
    /// margay with `neighbor` settings for BIRD, originating `blocks`;
    /// BIRD configured with `bird_conf`.
    fn start(neighbor: &str, blocks: &[&str], bird_conf: &BirdConf) -> Self {
        let conf = MargayConf::ibgp(neighbor).originate(blocks);
        let Pair { margay, a, b, lab } = Pair::start("bird", &conf);
        let bird = bird(&b, bird_conf);
        Self {
            margay,
            bird,
            a,
            b,
            _lab: lab,
        }
    }

    /// Waits until both sides have the session up.
    fn wait_up(&self, what: &str) {
        let (bird, margay) = (&self.bird, &self.margay);
        wait_for(what, || {
            bird.established("m") && margay.established("10.99.0.2")
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nbird: {:?}\nmargay log:\n{}",
                bird.birdc("show protocols all m"),
                margay.log(40)
            )
        });
    }
}

#[test]
fn ibgp_with_bird_both_directions_into_both_kernels() {
    let s = WithBird::start("", BLOCK, &BirdConf::ibgp().with(GR).blocks(BIRDS));
    s.wait_up("session up on both sides");
    let WithBird {
        margay, bird, a, b, ..
    } = &s;
    let r = kernel_route(a, "10.244.2.0/26").unwrap();
    assert!(r.contains("via 10.99.0.2") && r.contains("proto 77"), "{r}");
    let r = kernel_route(b, "10.244.1.0/26").unwrap();
    assert!(
        r.contains("via 10.99.0.1") && r.contains("proto bird"),
        "{r}"
    );
    let metrics = margay.metrics();
    assert!(
        metrics.contains("margay_bgp_sessions_established 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("margay_bgp_prefixes_received{peer=\"10.99.0.2\",peer_asn=\"64512\"} 1"),
        "{metrics}"
    );
    // OpenMetrics text (prometheus-client): the family is named without
    // `_total`, its samples with it.
    assert!(
        metrics.contains("# TYPE margay_bgp_updates_received counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("margay_bgp_updates_received_total{peer=\"10.99.0.2\""),
        "{metrics}"
    );
    let learned = margay.route("10.244.2.0/26").expect("learned route listed");
    assert_eq!(learned.from, "10.99.0.2");
    assert_eq!(learned.local_pref, Some(100));

    // BIRD withdraws its block: the route leaves margay's kernel.
    bird.birdc("disable blocks").unwrap();
    wait_absent(a, "withdrawal reaches the kernel", "10.244.2.0/26").unwrap();
}

#[test]
fn ebgp_with_gobgp_and_four_octet_asns() {
    let s = Pair::ebgp("gobgp", 4_200_000_001, ("10.99.0.2", 4_200_000_002), BLOCK);
    let Pair { margay, a, b, .. } = &s;
    let gobgp = gobgp_peer(b, 4_200_000_002, 4_200_000_001, GOBGP_TIMERS);
    gobgp
        .gobgp(&["global", "rib", "add", "10.244.3.0/26", "-a", "ipv4"])
        .unwrap();
    wait_for("session up", || gobgp.established("10.99.0.1"))
        .unwrap_or_else(|e| panic!("{e}\nmargay log:\n{}", margay.log(40)));
    let r = kernel_route(a, "10.244.3.0/26").unwrap();
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

#[test]
fn md5_with_bird_right_password_establishes_wrong_never() {
    let s = Pair::ibgp("bird", "password = \"s3cret\"");
    let Pair { margay, a, b, .. } = &s;
    let conf = BirdConf::ibgp().blocks(&["10.244.2.0/26"]);
    let wrong = bird(b, &conf.clone().with("password \"wrong\";"));
    // For a while, in both directions (each side connects), nothing comes up.
    holds(
        "no session with a wrong password",
        Duration::from_secs(6),
        || {
            !wrong.established("m")
                && !margay.established("10.99.0.2")
                && absent(a, "10.244.2.0/26")
        },
    );
    drop(wrong);
    let right = bird(b, &conf.with("password \"s3cret\";"));
    wait_for("MD5 session up", || {
        right.established("m") && margay.established("10.99.0.2")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", margay.log(30)));
    kernel_route(a, "10.244.2.0/26").unwrap();
}

#[test]
fn md5_with_frr() {
    let s = Pair::ibgp("frr", "password = \"frrkey\"");
    let Pair { margay, a, b, .. } = &s;
    let frr = frr_peer(b, "frrB", "password frrkey", "10.244.2.0/26");
    wait_for("MD5 session with FRR", || margay.established("10.99.0.2")).unwrap_or_else(|e| {
        panic!(
            "{e}\n{:?}\n{}",
            frr.vtysh("show bgp summary"),
            margay.log(30)
        )
    });
    kernel_route(a, "10.244.2.0/26").unwrap();
    let r = kernel_route(b, "10.244.1.0/26").unwrap();
    assert!(r.contains("via 10.99.0.1"), "{r}");
}

#[test]
fn two_active_margay_speakers_resolve_the_collision() {
    let lab = Lab::new();
    let (a, b) = lab.pair("m1", "m2");
    let conf = |me: &str, peer: &str, block: &str| {
        MargayConf::new(64512, me)
            .neighbor(peer, 64512, "")
            .originate(&[block])
    };
    let m1 = Margay::start(&a, &conf("10.99.0.1", "10.99.0.2", "10.244.1.0/26"));
    let m2 = Margay::start(&b, &conf("10.99.0.2", "10.99.0.1", "10.244.2.0/26"));
    let up = || m1.established("10.99.0.2") && m2.established("10.99.0.1");
    wait_for("both up", up).unwrap_or_else(|e| panic!("{e}\n{}\n{}", m1.log(30), m2.log(30)));
    kernel_route(&a, "10.244.2.0/26").unwrap();
    kernel_route(&b, "10.244.1.0/26").unwrap();
    // One session survives and stays up: exactly one TCP connection on 179.
    holds("the surviving session stays up", Duration::from_secs(3), up);
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
    let conf = BirdConf::ibgp().with(GR_30);
    let both = conf.clone().blocks(&["10.244.2.0/26", "10.244.3.0/26"]);
    let mut s = WithBird::start("", BLOCK, &both);
    kernel_route(&s.a, "10.244.2.0/26").unwrap();
    kernel_route(&s.a, "10.244.3.0/26").unwrap();
    s.bird.daemon().kill9();
    let WithBird { margay, a, b, .. } = &s;
    // The routes stay in margay's kernel while BIRD is away.
    holds(
        "routes kept while BIRD is away",
        Duration::from_secs(3),
        || !absent(a, "10.244.2.0/26") && !absent(a, "10.244.3.0/26"),
    );
    let stale = margay.route("10.244.2.0/26");
    assert!(stale.as_ref().is_some_and(|r| r.stale), "{stale:?}");
    // BIRD comes back announcing only one of the two: after its End-of-RIB
    // the other is gone, the kept one never left.
    let second = bird(b, &conf.blocks(BIRDS));
    wait_absent(a, "stale route flushed after End-of-RIB", "10.244.3.0/26").unwrap();
    assert!(!absent(a, "10.244.2.0/26"));
    assert!(second.established("m"));
    let routes = margay.routes();
    assert!(routes.iter().all(|r| !r.stale), "{routes:?}");
}

#[test]
fn a_connection_without_open_from_an_established_peer_changes_nothing() {
    // RFC 4724 section 4.2: only a valid OPEN with graceful restart on a
    // new connection says the peer restarted; a bare connect from its
    // address (anyone on the path can make one) must not reset the session.
    let s = WithBird::start("", BLOCK, &BirdConf::ibgp().with(GR_30).blocks(BIRDS));
    let WithBird {
        margay,
        bird: peer,
        a,
        b,
        ..
    } = &s;
    kernel_route(a, "10.244.2.0/26").unwrap();
    let addr = b.v4.to_string();
    wait_for("the session up", || margay.established(&addr)).unwrap();
    let script = format!(
        "import socket, time\ns = socket.create_connection(('{}', 179))\ntime.sleep(8)\n",
        a.v4
    );
    let mut raw = b.ns.cmd("python3").args(["-c", &script]).spawn().unwrap();
    holds(
        "the session and its route stay while the new connection says nothing",
        Duration::from_secs(5),
        || margay.established(&addr) && !absent(a, "10.244.2.0/26"),
    );
    let _ = raw.kill();
    let _ = raw.wait();
    let since = margay
        .neighbors()
        .iter()
        .find(|n| n.address.to_string() == addr)
        .and_then(|n| n.since_seconds);
    assert!(
        since.is_some_and(|s| s >= 5),
        "the session flapped: up for {since:?} s"
    );
    assert!(peer.established("m"), "{}", margay.log(30));
}

#[test]
fn a_restarted_peers_open_with_graceful_restart_replaces_its_session() {
    // RFC 4724 section 4.2: a peer that restarted while its old connection
    // never closed (its FIN lost) reconnects with a graceful-restart OPEN;
    // the new session replaces the old one and its route stays in the
    // kernel throughout.
    let s = Pair::ibgp("restart", "");
    let Pair { margay, a, b, .. } = &s;
    let (ma, mb) = (a.v4.to_string(), b.v4.to_string());
    let mut peer = raw_peer(b, "restart_peer", &[&ma, &mb, "10.244.5.0/26", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    kernel_route(a, "10.244.5.0/26").unwrap();
    // From the first route on, the kernel never loses it while the second
    // session takes over.
    holds(
        "the route stays across the restart",
        Duration::from_secs(5),
        || !absent(a, "10.244.5.0/26"),
    );
    let out = {
        use std::io::Read;
        let mut s = String::new();
        peer.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    let status = peer.wait().unwrap();
    assert!(
        status.success() && out.contains("ok"),
        "{out}\n{}",
        margay.log(30)
    );
    assert!(!absent(a, "10.244.5.0/26"));
    let log = margay.log(40);
    assert!(
        log.contains("its new session replaces the old one"),
        "{log}"
    );
    assert_eq!(log.matches("session established").count(), 2, "{log}");
}

#[test]
fn a_route_refresh_flood_costs_one_readvertisement_per_gap() {
    let s = Pair::ibgp("flood", "");
    let Pair { margay, a, b, .. } = &s;
    let text = raw_peer_run(margay, (a, b), "refresh_flood", &["500", "8"]);
    // The first advertisement and its End-of-RIB, the first refresh at
    // once, the other 499 folded into one more 5 s later.
    let updates: u32 = text.trim().parse().unwrap();
    assert!(
        (3..=5).contains(&updates),
        "{updates} UPDATEs for 500 ROUTE-REFRESHes"
    );
}

#[test]
fn a_peer_that_never_reads_is_dropped_after_the_hold_time() {
    // 20000 routes: far more than the peer's receive window and the
    // socket's send buffer together.
    let many: Vec<String> = (0..20_000u32)
        .map(|i| format!("10.{}.{}.{}/32", 100 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let s = Pair::start("deaf", &MargayConf::ibgp("").originate(&many));
    let Pair { margay, a, b, .. } = &s;
    // Its writes blocked, the session is still ended once the hold time
    // (3 s) has gone by without progress: timers and reads went on.
    raw_peer_run(margay, (a, b), "never_reads", &["30"]);
    let why = margay.last_error().unwrap_or_default();
    assert!(why.contains("read nothing"), "{why}");
    // And the speaker goes on: its control socket answers.
    assert!(!margay.established("10.99.0.2"));
}

#[test]
fn a_route_too_big_to_reexport_is_left_out_and_the_session_stays() {
    // margay reflects between two clients: a raw peer announcing a route
    // whose UPDATE is exactly 4096 bytes (an unknown transitive attribute
    // fills it), and BIRD. Reflected, ORIGINATOR_ID and CLUSTER_LIST make
    // it too big: BIRD must not get an oversized message (it would reset
    // the session, again at every retry), only the route that fits.
    let lab = Lab::new();
    let (a, b) = lab.pair("m", "big");
    let c = lab.node("bird");
    let client = "route_reflector_client = true";
    let margay = Margay::start(
        &a,
        &MargayConf::new(64512, "10.99.0.1")
            .set("fib = false")
            .neighbor("10.99.0.2", 64512, client)
            .neighbor("10.99.0.3", 64512, client),
    );
    let bird = bird(&c, &BirdConf::peer("10.99.0.3", "10.99.0.1"));
    wait_for("BIRD up", || bird.established("m")).unwrap();
    let args = [
        "10.99.0.1",
        "10.99.0.2",
        "10.244.7.0/26",
        "10.244.8.0/26",
        "12",
    ];
    let peer = raw_peer(&b, "big_route", &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let bird_has = |p: &str| {
        bird.birdc(&format!("show route {p}"))
            .map(|o| o.contains(p))
            .unwrap_or(false)
    };
    wait_for("the small route reflected to BIRD", || {
        bird_has("10.244.8.0/26")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", margay.log(20)));
    let too_big = |m: &Margay| {
        m.neighbors()
            .iter()
            .find(|n| n.address.to_string() == "10.99.0.3")
            .map_or(0, |n| n.routes_too_big)
    };
    wait_for("the big route counted as too big", || too_big(&margay) >= 1).unwrap();
    // margay itself took the big route (it fits as received).
    assert!(
        margay.route("10.244.7.0/26").is_some(),
        "{}",
        margay.log(20)
    );
    holds(
        "BIRD's session stays, without the big route",
        Duration::from_secs(5),
        || bird.established("m") && !bird_has("10.244.7.0/26") && margay.established("10.99.0.3"),
    );
    let out = peer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn graceful_restart_of_margay_keeps_forwarding_both_ways() {
    let mut s = WithBird::start(
        "",
        &["10.244.1.0/26", "10.244.4.0/26"],
        &BirdConf::ibgp().with(GR).blocks(BIRDS),
    );
    let WithBird {
        margay, bird, a, b, ..
    } = &mut s;
    let (a, b) = (&*a, &*b);
    kernel_route(a, "10.244.2.0/26").unwrap();
    kernel_route(b, "10.244.1.0/26").unwrap();
    kernel_route(b, "10.244.4.0/26").unwrap();
    // kill -9 and restart without 10.244.4.0/26: while it is down and
    // while it comes back, neither kernel loses a route it still needs.
    let watch_a = std::thread::scope(|s| {
        let h = s.spawn(|| {
            wait::holds_for(
                "no route missing during the restart",
                Duration::from_secs(4),
                Duration::from_millis(100),
                || Ok(!absent(a, "10.244.2.0/26") && !absent(b, "10.244.1.0/26")),
            )
        });
        margay.crash_and_restart(a, &MargayConf::ibgp("").originate(BLOCK));
        h.join().unwrap()
    });
    watch_a.expect("a route disappeared during the restart");
    wait_for("session back", || margay.established("10.99.0.2")).unwrap();
    // The prefix no longer originated is withdrawn once margay is back.
    wait_absent(b, "old block withdrawn at BIRD", "10.244.4.0/26")
        .unwrap_or_else(|e| panic!("{e}\n{:?}", bird.birdc("show route all")));
    assert!(!absent(a, "10.244.2.0/26"));
    let r = a.ns.ip(&["route", "show", "proto", "77"]).unwrap();
    assert_eq!(
        r.lines().filter(|l| l.starts_with("10.244.2.0/26")).count(),
        1,
        "{r}"
    );
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
    let lab = Lab::new();
    let (a, b) = lab.pair("c1", "c2");
    let ns = lab.fabric.ns();
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
            Frr::start(
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
    let client = |me: &str, block: &str| {
        MargayConf::new(64512, me)
            .set("import_prefixes = [\"10.244.0.0/16\"]")
            .neighbor("10.99.0.254", 64512, "")
            .originate(&[block])
    };
    let m1 = Margay::start(&a, &client("10.99.0.1", "10.244.1.0/26"));
    let m2 = Margay::start(&b, &client("10.99.0.2", "10.244.2.0/26"));
    let r = kernel_route(&a, "10.244.2.0/26")
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", m1.log(20), m2.log(20)));
    assert!(
        r.contains("via 10.99.0.2"),
        "next hop kept by the reflector: {r}"
    );
    let r = kernel_route(&b, "10.244.1.0/26").unwrap();
    assert!(r.contains("via 10.99.0.1"), "{r}");
    // Our own block reflected back (if the reflector does) is not imported.
    let own: Vec<_> = m1
        .routes()
        .into_iter()
        .filter(|r| r.prefix == "10.244.1.0/26")
        .collect();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].from, "local");
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
    let lab = Lab::new();
    let rr = lab.node("rr"); // 10.99.0.1
    let (a, b) = lab.pair("bird", "frr"); // 10.99.0.2, 10.99.0.3
    let margay = Margay::start(
        &rr,
        &MargayConf::new(64512, "10.99.0.1")
            .set("fib = false")
            .section(
                "[[listen_range]]\nprefix = \"10.99.0.0/24\"\nasn = 64512\nroute_reflector_client = true\nhold_time = 9\n",
            ),
    );
    let bird = bird(&a, &BirdConf::ibgp().blocks(&["10.244.2.0/26"]));
    let frr = frr_peer(&b, "frrC", "", "10.244.3.0/26");
    let r = route_or_logs(&a, "10.244.3.0/26", &margay, &bird);
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
    let n = margay.neighbors();
    assert_eq!(n.iter().filter(|p| p.dynamic).count(), 2, "{n:?}");
    // The two clients share one update group: one Adj-RIB-Out of the two
    // routes, not one per client; each was sent the other's route only.
    let m = margay.metrics();
    assert!(m.contains("margay_bgp_update_groups 1\n"), "{m}");
    assert!(m.contains("margay_bgp_adj_rib_out_entries 2\n"), "{m}");
    assert!(
        n.iter().all(|p| p.prefixes_sent == 1),
        "each client is sent the other's route, not its own: {n:?}"
    );
    drop(frr);
}

#[test]
fn ipv6_session_and_prefixes_with_bird() {
    let s = Pair::ebgp("bird", 64512, ("fd00:99::2", 64513), &["fd00:244:1::/122"]);
    let Pair { margay, a, b, .. } = &s;
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
    let r = route_or_logs(a, "fd00:244:2::/122", margay, &bird);
    assert!(
        r.contains("via fd00:99::2") && r.contains("proto 77"),
        "{r}"
    );
    let r = kernel_route(b, "fd00:244:1::/122").unwrap();
    assert!(r.contains("via fd00:99::1"), "{r}");
}

/// RFC 7606 against a real sender: ExaBGP emits malformed attributes.
#[test]
fn malformed_updates_from_exabgp_are_handled_per_rfc7606() {
    let s = Pair::start(
        "exa",
        &MargayConf::new(64512, "10.99.0.1").neighbor("10.99.0.2", 65010, ""),
    );
    let Pair { margay, a, b, .. } = &s;
    let exa = Exabgp::start(
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
    wait_for("session up", || margay.established("10.99.0.2")).unwrap();
    exa.command("announce route 10.244.7.0/24 next-hop self")
        .unwrap();
    exa.command("announce route 10.244.8.0/24 next-hop self attribute [ 0x99 0xc0 0x0102 ]")
        .unwrap();
    kernel_route(a, "10.244.7.0/24").unwrap();
    // An unknown optional transitive attribute is accepted.
    kernel_route(a, "10.244.8.0/24").unwrap();

    // COMMUNITIES of 3 octets: treat-as-withdraw, the session stays up.
    exa.command("announce route 10.244.7.0/24 next-hop self attribute [ 0x08 0xc0 0x010203 ]")
        .unwrap();
    wait_absent(a, "malformed update withdraws the route", "10.244.7.0/24").unwrap();
    assert!(margay.established("10.99.0.2"));
    assert!(!absent(a, "10.244.8.0/24"), "other routes untouched");
    // ...and never went down: no error recorded, ExaBGP got no NOTIFICATION.
    assert!(margay.last_error().is_none());
    assert!(!exa.received().iter().any(|e| e["type"] == "notification"));

    // An unrecognised well-known attribute: NOTIFICATION 3/2, session reset.
    exa.command("announce route 10.244.9.0/24 next-hop self attribute [ 0x99 0x40 0x01 ]")
        .unwrap();
    wait_for("session reset with UPDATE error", || {
        margay
            .last_error()
            .is_some_and(|e| e.contains("UPDATE message error (3/2)"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", margay.neighbors(), margay.log(20)));
    assert!(absent(a, "10.244.9.0/24"));
    // ExaBGP saw our NOTIFICATION.
    wait_for("ExaBGP reports the notification", || {
        exa.received()
            .iter()
            .any(|e| e["type"] == "notification" || e.to_string().contains("notification"))
    })
    .unwrap();
}

/// A full iBGP mesh of margay speakers, one side of each pair passive (as
/// the agent runs it): every node learns every other node's block.
#[test]
fn full_mesh_of_four_converges() {
    let lab = Lab::new();
    let nodes: Vec<Node> = (0..4).map(|i| lab.node(&format!("n{i}"))).collect();
    let speakers: Vec<Margay> = nodes
        .iter()
        .map(|n| {
            let mut c = MargayConf::new(64512, &n.v4.to_string())
                .originate(&[&format!("10.244.{}.0/26", n.index)]);
            for m in nodes.iter().filter(|m| m.index != n.index) {
                let passive = format!("passive = {}", n.index < m.index);
                c = c.neighbor(&m.v4.to_string(), 64512, &passive);
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
                        .map(|s| s.log(15))
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
    let lab = Lab::new();
    let (a, b) = lab.pair("m", "bird"); // .1, .2
    let c = lab.node("gobgp"); // .3
    let margay = Margay::start(
        &a,
        &MargayConf::new(64512, "10.99.0.1")
            .neighbor("10.99.0.2", 65002, "")
            .neighbor("10.99.0.3", 65003, ""),
    );
    let bird = bird(
        &b,
        &BirdConf::ibgp().local_as(65002).blocks(&["10.250.0.0/24"]),
    );
    let gobgp = gobgp_peer(&c, 65003, 64512, "");
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
    let route = || {
        a.ns.ip(&["route", "show", "10.250.0.0/24"])
            .unwrap_or_default()
    };
    wait_for("ECMP route", || {
        let r = route();
        r.contains("nexthop via 10.99.0.2") && r.contains("nexthop via 10.99.0.3")
    })
    .unwrap_or_else(|e| panic!("{e}\n{:?}", margay.routes()));
    assert!(route().contains("proto 77"), "{}", route());
    bird.birdc("disable blocks").unwrap();
    wait_for("back to one next hop", || {
        let r = route();
        r.contains("via 10.99.0.3") && !r.contains("10.99.0.2")
    })
    .unwrap();
}

/// max_prefixes: the peer gets Cease/1 (RFC 4486), its routes go, and the
/// session stays down for a while instead of flapping.
#[test]
fn max_prefixes_closes_the_session_with_cease_1() {
    let three = ["10.244.2.0/26", "10.244.3.0/26", "10.244.4.0/26"];
    let s = WithBird::start("max_prefixes = 2", BLOCK, &BirdConf::ibgp().blocks(&three));
    let WithBird {
        margay, bird, a, ..
    } = &s;
    wait::until("BIRD reports Cease / max prefixes", T, POLL, || {
        let s = bird
            .birdc("show protocols all m")
            .map_err(|e| e.to_string())?;
        Ok(s.to_lowercase()
            .contains("maximum number of prefixes")
            .then_some(s))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", margay.log(20)));
    let err = margay.last_error();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("maximum number of prefixes")),
        "{err:?}"
    );
    holds("the session stays down", Duration::from_secs(3), || {
        !margay.established("10.99.0.2")
    });
    for p in three {
        assert!(absent(a, p), "{p} still installed");
    }
}

/// GTSM (RFC 5082) against BIRD's `ttl security`: both send TTL 255 and
/// accept only directly connected packets; the session comes up.
#[test]
fn gtsm_with_bird() {
    let bird = BirdConf::ibgp().with("ttl security on;").blocks(BIRDS);
    let s = WithBird::start("ttl_security = 1", BLOCK, &bird);
    s.wait_up("GTSM session up");
    kernel_route(&s.a, "10.244.2.0/26").unwrap();
}

/// margay's BFD at 100 ms × 3.
const MARGAY_BFD: &str = "[neighbor.bfd]\nmin_tx_ms = 100\nmin_rx_ms = 100";
/// BIRD's BFD at 100 ms × 3 (a router of a rack).
const BIRD_BFD: &str = r#"protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }"#;

/// BFD (RFC 5880/5881) against BIRD's: both sessions come Up and run
/// at the 100 ms both sides ask for; BIRD's link cut (a router that dies
/// sends nothing more) is found by BFD, which closes the BGP session
/// (Cease/BFD down, RFC 9384) and withdraws BIRD's routes, where BGP
/// alone waits for its 9 s hold time.
#[test]
fn bfd_with_bird_finds_a_dead_router_before_the_hold_time() {
    let bird = BirdConf::ibgp()
        .protocol(BIRD_BFD)
        .with("bfd on;")
        .blocks(BIRDS);
    let s = WithBird::start(MARGAY_BFD, BLOCK, &bird);
    s.wait_up("session up");
    let bfd_up = || {
        s.margay
            .neighbors()
            .first()
            .is_some_and(|n| n.bfd == Some(margay_api::status::BfdState::Up))
    };
    wait_for("BFD Up at margay", bfd_up).unwrap_or_else(|e| panic!("{e}\n{}", s.margay.log(30)));
    let seen = s.bird.birdc("show bfd sessions").unwrap();
    let line = seen
        .lines()
        .find(|l| l.contains("10.99.0.1"))
        .unwrap_or_else(|| panic!("BIRD has no BFD session with margay:\n{seen}"));
    assert!(line.contains("Up"), "{seen}");
    // BIRD's interval and timeout: 0.100 and 0.300 s, as negotiated.
    assert!(line.contains("0.100") && line.contains("0.300"), "{seen}");
    route_or_logs(&s.a, "10.244.2.0/26", &s.margay, &s.bird);

    // BIRD's node loses its link: no FIN, no NOTIFICATION, nothing.
    s.b.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let t = std::time::Instant::now();
    wait_absent(&s.a, "BIRD's block withdrawn", "10.244.2.0/26").unwrap();
    let took = t.elapsed();
    println!("BIRD's block withdrawn {took:?} after its link went down");
    let why = s.margay.last_error().unwrap_or_default();
    assert!(
        why.contains("BFD down"),
        "closed by BFD, not the hold timer: {why}"
    );
    let n = s.margay.neighbors();
    assert_eq!(n[0].bfd, Some(margay_api::status::BfdState::Down), "{n:?}");

    // The link back: BFD and then BGP come up again by themselves, BGP
    // at once (not after the 30 s a ceased session waits).
    s.b.ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    wait_for("BFD Up again", bfd_up).unwrap_or_else(|e| panic!("{e}\n{}", s.margay.log(30)));
    let up = wait::until("BGP up again", Duration::from_secs(15), POLL, || {
        Ok(s.margay.established("10.99.0.2").then_some(()))
    });
    assert!(up.is_ok(), "{}", s.margay.log(20));
    route_or_logs(&s.a, "10.244.2.0/26", &s.margay, &s.bird);
}

/// margay's first neighbor's BFD state.
fn bfd_state(margay: &Margay) -> Option<margay_api::status::BfdState> {
    margay.neighbors().first().and_then(|n| n.bfd)
}

/// BFD against FRR's bfdd (through zebra, `neighbor … bfd`): Up on both
/// sides at 100 ms; FRR's link cut closes margay's session by BFD and
/// withdraws FRR's route.
#[test]
fn bfd_with_frr_finds_a_dead_router_before_the_hold_time() {
    use margay_api::status::BfdState;
    let lab = Lab::new();
    let (a, b) = lab.pair("m", "frr");
    let margay = Margay::start(&a, &MargayConf::ibgp(MARGAY_BFD).originate(BLOCK));
    let conf = frr_conf(&b, "frr-bfd", "bfd", "10.244.2.0/26");
    let bfd = "bfd\n peer 10.99.0.1\n  receive-interval 100\n  transmit-interval 100\n !\n!\n";
    let frr = Frr::start_with_bfd(&b.ns, &conf, bfd).unwrap();
    let logs = |e: margay_harness::Error| {
        panic!(
            "{e}\nmargay:\n{}\nfrr: {:?}",
            margay.log(30),
            frr.vtysh("show bfd peers")
        )
    };
    wait_for("session and BFD Up at margay", || {
        margay.established("10.99.0.2") && bfd_state(&margay) == Some(BfdState::Up)
    })
    .unwrap_or_else(logs);
    wait_for("BFD up at FRR", || {
        frr.vtysh("show bfd peers")
            .is_ok_and(|o| o.contains("peer 10.99.0.1") && o.contains("Status: up"))
    })
    .unwrap_or_else(logs);
    if let Err(e) = kernel_route(&a, "10.244.2.0/26") {
        logs(e);
    }

    b.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let t = std::time::Instant::now();
    wait_absent(&a, "FRR's route withdrawn", "10.244.2.0/26").unwrap_or_else(logs);
    println!(
        "FRR's route withdrawn {:?} after its link went down",
        t.elapsed()
    );
    let why = margay.last_error().unwrap_or_default();
    assert!(
        why.contains("BFD down"),
        "closed by BFD, not the hold timer: {why}"
    );
}

/// A peer that goes silent (its link cut) under graceful restart: found
/// by the hold timer (9 s), it is dead, not restarting, so its routes go
/// at once instead of staying stale for its restart time (30 s here),
/// as RFC 4724 keeps them only for a connection that closed.
#[test]
fn a_silent_peer_found_by_the_hold_timer_is_not_kept_as_stale() {
    let s = WithBird::start("", BLOCK, &BirdConf::ibgp().with(GR_30).blocks(BIRDS));
    s.wait_up("session up");
    route_or_logs(&s.a, "10.244.2.0/26", &s.margay, &s.bird);
    s.b.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    wait_for("the hold timer expired", || {
        s.margay
            .last_error()
            .is_some_and(|e| e.contains("hold timer expired"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.margay.log(30)));
    // Gone within moments of the session's end, not 30 s later.
    let gone = wait::until("withdrawn", Duration::from_secs(5), POLL, || {
        Ok(absent(&s.a, "10.244.2.0/26").then_some(()))
    });
    assert!(gone.is_ok(), "kept as stale:\n{}", s.margay.log(20));
}

/// BFD over IPv6 (RFC 5881 §4: hop limit 255 both ways) with BIRD on an
/// IPv6 session: Up, then BIRD's link cut closes the session by BFD and
/// withdraws its IPv6 block.
#[test]
fn bfd_over_ipv6_with_bird() {
    let conf = MargayConf::new(64512, "10.99.0.1")
        .neighbor("fd00:99::2", 64513, MARGAY_BFD)
        .originate(&["fd00:244:1::/122"]);
    let Pair { margay, a, b, .. } = &Pair::start("bird", &conf);
    let bird = Bird::start(
        &b.ns,
        &format!(
            r#"log stderr all;
router id 10.99.0.2;
protocol device {{}}
protocol kernel {{ ipv6 {{ import none; export where source = RTS_BGP; }}; }}
protocol static blocks6 {{ ipv6; route fd00:244:2::/122 blackhole; }}
{BIRD_BFD}
protocol bgp m {{
  local fd00:99::2 as 64513; neighbor fd00:99::1 as 64512; direct;
  hold time 9; keepalive time 3; bfd on;
  ipv6 {{ import all; export where proto = "blocks6"; }};
}}
"#
        ),
    )
    .unwrap();
    route_or_logs(a, "fd00:244:2::/122", margay, &bird);
    wait_for("BFD Up over IPv6", || {
        bfd_state(margay) == Some(margay_api::status::BfdState::Up)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{:?}",
            margay.log(30),
            bird.birdc("show bfd sessions")
        )
    });
    b.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    wait_absent(a, "BIRD's IPv6 block withdrawn", "fd00:244:2::/122").unwrap();
    let why = margay.last_error().unwrap_or_default();
    assert!(
        why.contains("BFD down"),
        "closed by BFD, not the hold timer: {why}"
    );
}
