//! NetworkPolicy in the real kernel: `margay-policy`'s table loaded into a
//! node namespace whose pods are wired the Calico way (a `caliN` veth,
//! a /32, 169.254.1.1 answered by proxy ARP; a /128 too, fe80::1 as the
//! IPv6 gateway), with an external host behind the node's uplink. Every
//! pod and the external host serve tcp:80, tcp:81 and udp:80 on both
//! families; every host probes every other on each, over IPv4 and IPv6
//! (the random policies' ipBlocks are of either family).
//!
//! - `kernel_verdicts_match_the_specification`: random namespaces, labels
//!   and policies (`margay_policy::random`), one world after another, each
//!   reached from the last by the compiler's incremental deltas in one
//!   transaction over netlink, as the agent loads them
//!   (`margay-nftnl`); the table then listed equal to a full load of
//!   the same world, and every connection's fate equal to what the
//!   reference semantics (`margay_policy::spec`, written from the API
//!   documentation) decide. A disagreement is shrunk to a minimal world
//!   before the test fails.
//! - `forged_sources_are_dropped`: a pod sending from another pod's
//!   addresses (added to its own interface) reaches nobody once the table
//!   is in, on either family; without it, it does (the node does no
//!   reverse-path filtering here).
//! - `the_agents_enforce_networkpolicy_in_the_lab`: a NetworkPolicy from
//!   the API, enforced by real agents in the lab (see its own comment).
//!
//! SCTP is not probed: this host's kernel has no SCTP (CONFIG_IP_SCTP).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use margay_harness::netcheck::Outcome;
use margay_harness::netns::{Netns, veth};
use margay_harness::nft_ns::canonical;
use margay_harness::paths;
use margay_harness::process::Daemon;
use margay_policy::random::{self, Rng};
use margay_policy::ruleset::{Batch, Compiler, TABLE, TABLE_NAME};
use margay_policy::spec::{self, Connection};
use margay_policy::{PodKey, Proto, World};

const PODS: u8 = 6;
const EXT: &str = "10.0.0.100";
/// The external host's IPv6 address: where [`EXT`] is in the IPv4 blocks,
/// `fd00::64` is in the IPv6 ones (`random::ip6`).
const EXT6: &str = "fd00::64";
/// What every host serves, and is probed on.
const PORTS: [(Proto, u16); 3] = [(Proto::Tcp, 80), (Proto::Tcp, 81), (Proto::Udp, 80)];

struct Bed {
    /// First: stopped before their namespaces go.
    _servers: Vec<Daemon>,
    node: Netns,
    /// Pod i (1-based) at 10.0.0.i behind cali{i}.
    pods: Vec<Netns>,
    ext: Netns,
    lab: PathBuf,
    _logs: tempfile::TempDir,
}

fn ifname(i: u8) -> String {
    format!("cali{i}")
}

fn pod_ip(i: u8) -> IpAddr {
    format!("10.0.0.{i}").parse().unwrap()
}

fn pod_ip6(i: u8) -> IpAddr {
    IpAddr::V6(random::ip6(0, usize::from(i)))
}

/// Every probed host's addresses, both families: the pods, then the
/// external host.
fn hosts() -> Vec<IpAddr> {
    (1..=PODS)
        .flat_map(|i| [pod_ip(i), pod_ip6(i)])
        .chain([EXT.parse().unwrap(), EXT6.parse().unwrap()])
        .collect()
}

impl Bed {
    fn new() -> Self {
        let lab = paths::workspace_bin("margay-lab").expect("margay-lab built");
        let node = Netns::create("polnode").unwrap();
        let ext = Netns::create("polext").unwrap();
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        // No reverse-path filtering, whatever the host's defaults: what
        // holds a pod to its own sources here is the table alone.
        node.sysctl("net.ipv4.conf.all.rp_filter", "0").unwrap();
        node.sysctl("net.ipv4.conf.default.rp_filter", "0").unwrap();
        veth(&node, "eth0", &ext, "eth0").unwrap();
        node.ip(&["addr", "add", "192.168.99.1/24", "dev", "eth0"])
            .unwrap();
        node.ip(&["route", "add", "default", "via", "192.168.99.2"])
            .unwrap();
        ext.ip(&["addr", "add", "192.168.99.2/24", "dev", "eth0"])
            .unwrap();
        ext.ip(&["addr", "add", &format!("{EXT}/32"), "dev", "lo"])
            .unwrap();
        ext.ip(&[
            "route",
            "add",
            "10.0.0.0/24",
            "via",
            "192.168.99.1",
            "src",
            EXT,
        ])
        .unwrap();
        node.ip(&["addr", "add", "fd00:99::1/64", "dev", "eth0", "nodad"])
            .unwrap();
        node.ip(&["-6", "route", "add", "default", "via", "fd00:99::2"])
            .unwrap();
        ext.ip(&["addr", "add", "fd00:99::2/64", "dev", "eth0", "nodad"])
            .unwrap();
        ext.ip(&["addr", "add", &format!("{EXT6}/128"), "dev", "lo"])
            .unwrap();
        ext.ip(&[
            "-6",
            "route",
            "add",
            "fd00::/120",
            "via",
            "fd00:99::1",
            "src",
            EXT6,
        ])
        .unwrap();
        let mut pods = Vec::new();
        for i in 1..=PODS {
            let p = Netns::create("polpod").unwrap();
            veth(&node, &ifname(i), &p, "eth0").unwrap();
            node.sysctl(&format!("net.ipv4.conf.{}.proxy_arp", ifname(i)), "1")
                .unwrap();
            // Answered at once, as the agent sets it (else up to 0.8 s).
            node.sysctl(&format!("net.ipv4.neigh.{}.proxy_delay", ifname(i)), "0")
                .unwrap();
            node.ip(&[
                "route",
                "add",
                &format!("{}/32", pod_ip(i)),
                "dev",
                &ifname(i),
            ])
            .unwrap();
            p.ip(&["addr", "add", &format!("{}/32", pod_ip(i)), "dev", "eth0"])
                .unwrap();
            p.ip(&["route", "add", "169.254.1.1", "dev", "eth0"])
                .unwrap();
            // IPv6: a /128, and fe80::1 on the host side as the gateway.
            let v6 = format!("{}/128", pod_ip6(i));
            p.ip(&["addr", "add", &v6, "dev", "eth0", "nodad"]).unwrap();
            node.ip(&["addr", "add", "fe80::1/64", "dev", &ifname(i), "nodad"])
                .unwrap();
            node.ip(&["-6", "route", "add", &v6, "dev", &ifname(i)])
                .unwrap();
            p.ip(&[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])
            .unwrap();
            p.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])
            .unwrap();
            pods.push(p);
        }
        let logs = margay_harness::names::temp_dir("polsrv").unwrap();
        let mut servers = Vec::new();
        for (i, ns) in pods.iter().chain([&ext]).enumerate() {
            let mut cmd = ns.cmd(&lab);
            cmd.args(["netcheck", "serve", "tcp:80,tcp:81,udp:80"]);
            let log = logs.path().join(format!("{i}.log"));
            servers.push(Daemon::spawn("netcheck", cmd, &log).unwrap());
        }
        Self {
            node,
            pods,
            ext,
            lab,
            _servers: servers,
            _logs: logs,
        }
    }

    fn nft(&self, script: &str) {
        self.node.nft(script);
    }

    /// Which connections get through: (src, dst, proto, port) → ok.
    fn observe(&self, timeout: Duration) -> BTreeMap<(IpAddr, IpAddr, Proto, u16), bool> {
        let pods = self.pods.iter().flat_map(|p| [p, p]);
        let hosts: Vec<(IpAddr, &Netns)> = hosts()
            .into_iter()
            .zip(pods.chain([&self.ext, &self.ext]))
            .collect();
        let mut children = Vec::new();
        for (src, ns) in &hosts {
            let mut targets = Vec::new();
            for (dst, _) in hosts
                .iter()
                .filter(|(d, _)| d != src && d.is_ipv4() == src.is_ipv4())
            {
                for (proto, port) in PORTS {
                    targets.push((*dst, proto, port));
                }
            }
            let args: Vec<String> = targets
                .iter()
                .map(|(d, proto, port)| format!("{}/{proto}", SocketAddr::new(*d, *port)))
                .collect();
            let child = ns
                .cmd(&self.lab)
                .args(["netcheck", "probe", "--timeout-ms"])
                .arg(timeout.as_millis().to_string())
                .args(&args)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            children.push((*src, targets, child));
        }
        let mut out = BTreeMap::new();
        for (src, targets, child) in children {
            let o = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), targets.len(), "{text}");
            for ((dst, proto, port), line) in targets.into_iter().zip(lines) {
                out.insert((src, dst, proto, port), line.ends_with(" ok"));
            }
        }
        out
    }
}

trait Nft {
    fn nft(&self, script: &str);
    fn list(&self) -> String;
}

impl Nft for Netns {
    fn nft(&self, script: &str) {
        margay_harness::nft_ns::load(self, script).unwrap();
    }

    fn list(&self) -> String {
        let (family, name) = TABLE.split_once(' ').unwrap();
        self.exec("nft", &["list", "table", family, name]).unwrap()
    }
}

/// What the specification says about every probed connection.
fn expect(w: &World) -> BTreeMap<(IpAddr, IpAddr, Proto, u16), bool> {
    let hosts = hosts();
    let mut out = BTreeMap::new();
    for src in &hosts {
        for dst in hosts
            .iter()
            .filter(|d| *d != src && d.is_ipv4() == src.is_ipv4())
        {
            for (proto, port) in PORTS {
                let c = Connection {
                    src: *src,
                    dst: *dst,
                    proto,
                    port,
                };
                out.insert((*src, *dst, proto, port), spec::decide(w, &c).allowed());
            }
        }
    }
    out
}

/// Every pod of `w` is local, on `caliN` for 10.0.0.N.
fn endpoints(w: &World) -> BTreeMap<PodKey, String> {
    w.pods
        .iter()
        .map(|(k, p)| {
            let IpAddr::V4(a) = p.ips[0] else {
                unreachable!()
            };
            (k.clone(), ifname(a.octets()[3]))
        })
        .collect()
}

/// Every interface of the bed is a workload with its pod's addresses,
/// whether or not a pod of the world is on it.
fn sources() -> BTreeMap<String, Vec<IpAddr>> {
    (1..=PODS)
        .map(|i| (ifname(i), vec![pod_ip(i), pod_ip6(i)]))
        .collect()
}

/// `w` compiled in one go on the bed.
fn compiled(w: &World) -> Compiler {
    let eps = endpoints(w).into_iter().map(|(k, i)| (i, k)).collect();
    Compiler::full_with(w.clone(), sources(), eps, BTreeMap::new())
}

/// The deltas that take `c` to `w`, as one batch.
fn move_to(c: &mut Compiler, w: &World) -> Batch {
    let mut s = Batch::default();
    for (i, ips) in sources() {
        if c.workloads().get(&i) != Some(&ips) {
            s.extend(&c.set_workload(&i, Some(ips)));
        }
    }
    let old = c.world().clone();
    let eps = endpoints(w);
    for k in old.pods.keys().filter(|k| !w.pods.contains_key(*k)) {
        for i in c.local().get(k).cloned().unwrap_or_default() {
            s.extend(&c.set_endpoint(&i, None));
        }
        s.extend(&c.set_pod(k, None));
    }
    for (name, ns) in &w.namespaces {
        s.extend(&c.set_namespace(name, Some(ns.clone())));
    }
    for (k, p) in &w.pods {
        s.extend(&c.set_pod(k, Some(p.clone())));
        let i = &eps[k];
        if c.endpoints().get(i) != Some(k) {
            s.extend(&c.set_endpoint(i, Some(k.clone())));
        }
    }
    for k in old.policies.keys().filter(|k| !w.policies.contains_key(*k)) {
        s.extend(&c.set_policy(k, None));
    }
    for (k, p) in &w.policies {
        s.extend(&c.set_policy(k, Some(p.clone())));
    }
    s
}

fn flush_conntrack(ns: &Netns) {
    // Probes of earlier worlds must not pass as replies in this one.
    let _ = ns.cmd("conntrack").arg("-F").stderr(Stdio::null()).status();
}

fn mismatches(bed: &Bed, w: &World) -> Vec<((IpAddr, IpAddr, Proto, u16), bool)> {
    let want = expect(w);
    let mut got = bed.observe(Duration::from_millis(700));
    let mut bad: Vec<_> = want
        .iter()
        .filter(|(k, v)| got[*k] != **v)
        .map(|(k, v)| (*k, *v))
        .collect();
    if !bad.is_empty() {
        // A loaded machine may be slow to answer: look again, patiently.
        got = bed.observe(Duration::from_secs(3));
        bad.retain(|(k, v)| got[k] != *v);
    }
    bad
}

#[test]
fn kernel_verdicts_match_the_specification() {
    let bed = Bed::new();
    let scratch = Netns::create("polscratch").unwrap();
    let mut c = Compiler::new();
    bed.nft(&c.table().script());
    let mut total = 0;
    for seed in 0..16u64 {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.below(4);
        let w = random::world(&mut rng, 0, PODS, n);
        let batch = move_to(&mut c, &w);
        let sent = bed
            .node
            .enter(|| margay_nftnl::apply(TABLE_NAME, &batch))
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", batch.script()));
        assert_eq!(sent, margay_nftnl::Sent::Applied);
        // The kernel holds what a full load of the same world holds.
        let full = compiled(&w);
        assert_eq!(c.table(), full.table(), "seed {seed}");
        scratch.nft(&full.table().script());
        assert_eq!(
            canonical(&bed.node.list()),
            canonical(&scratch.list()),
            "seed {seed}"
        );
        flush_conntrack(&bed.node);
        let bad = mismatches(&bed, &w);
        total += expect(&w).len();
        if !bad.is_empty() {
            let first = bad[0];
            let minimal = random::shrink(w.clone(), |s| {
                let t = compiled(s);
                bed.nft(&t.table().script());
                flush_conntrack(&bed.node);
                mismatches(&bed, s).iter().any(|(k, _)| *k == first.0)
            });
            let t = compiled(&minimal);
            panic!(
                "seed {seed}: {} connections disagree with the specification, e.g. {:?} \
                 (the specification says {}). Minimal world:\n{minimal:#?}\nits table:\n{}",
                bad.len(),
                first.0,
                if first.1 { "allowed" } else { "denied" },
                t.table().script()
            );
        }
    }
    println!("{total} connections as the specification says");
}

/// The table's source check in the kernel: pod 1 adds pod 2's addresses
/// to its own interface and sends UDP from them to pod 3. Without
/// Margay's table the forged datagrams arrive (the control: forging works
/// on this bed); with the table of a world without policies, they are
/// dropped on both families, while pod 1's and pod 2's own arrive.
#[test]
fn forged_sources_are_dropped() {
    use margay_tests::datagrams::{Receiver, send, sent};
    const PORT: u16 = 9000;
    let bed = Bed::new();
    let (p1, p2) = (&bed.pods[0], &bed.pods[1]);
    p1.ip(&["addr", "add", &format!("{}/32", pod_ip(2)), "dev", "eth0"])
        .unwrap();
    let forged6 = format!("{}/128", pod_ip6(2));
    p1.ip(&["addr", "add", &forged6, "dev", "eth0", "nodad"])
        .unwrap();
    let to = |ip: IpAddr| SocketAddr::new(ip, PORT);
    let one_round = || {
        let r = Receiver::start(&bed.pods[2], PORT, Duration::from_millis(500));
        // Pod 1's own first: its gateway's neighbour entry is resolved
        // from its own address, not a forged one.
        sent(vec![
            send(p1, &pod_ip(1).to_string(), to(pod_ip(3)), "own1-4"),
            send(p1, &pod_ip6(1).to_string(), to(pod_ip6(3)), "own1-6"),
        ]);
        sent(vec![
            send(p1, &pod_ip(2).to_string(), to(pod_ip(3)), "forged-4"),
            send(p1, &pod_ip6(2).to_string(), to(pod_ip6(3)), "forged-6"),
        ]);
        sent(vec![
            send(p2, &pod_ip(2).to_string(), to(pod_ip(3)), "own2-4"),
            send(p2, &pod_ip6(2).to_string(), to(pod_ip6(3)), "own2-6"),
        ]);
        let mut got: Vec<String> = r.finish().into_iter().map(|(_, p)| p).collect();
        got.sort();
        got.dedup();
        got
    };
    // What pod 3 receives in rounds until everyone's own datagrams arrive
    // in one (a neighbour entry may still be resolving), all rounds told.
    let own = ["own1-4", "own1-6", "own2-4", "own2-6"];
    let rounds = || {
        let t = std::time::Instant::now();
        let mut all = Vec::new();
        loop {
            let got = one_round();
            all.extend(got.iter().cloned());
            if own.iter().all(|o| got.contains(&o.to_string())) {
                all.sort();
                all.dedup();
                return all;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "own datagrams missing: {got:?}"
            );
        }
    };
    assert_eq!(
        rounds(),
        [
            "forged-4", "forged-6", "own1-4", "own1-6", "own2-4", "own2-6"
        ],
        "without the table"
    );
    bed.nft(&compiled(&World::default()).table().script());
    assert_eq!(
        rounds(),
        ["own1-4", "own1-6", "own2-4", "own2-6"],
        "with the table:\n{}",
        bed.node.list()
    );
}

/// What became of lab pod `from`'s probe of `to` on `port` ("80/tcp"):
/// ok, refused (nothing listens, nothing dropped it), timeout (dropped).
fn outcome(c: &margay_lab::cluster::Cluster, from: &str, to: &str, port: &str) -> Outcome {
    let src = c.pods.iter().find(|p| p.name == from).unwrap();
    let dst = c.pods.iter().find(|p| p.name == to).unwrap();
    let (num, proto) = port.split_once('/').unwrap();
    let out = margay_tests::probe(&src.ns, &format!("{}:{num}/{proto}", dst.ip))
        .output()
        .unwrap();
    margay_tests::probe_outcome(&out)
}

/// Whether lab pod `from` reaches `to` on `port` ("80/tcp").
fn reach(c: &margay_lab::cluster::Cluster, from: &str, to: &str, port: &str) -> bool {
    outcome(c, from, to, port) == Outcome::Ok
}

/// Waits until every (from, to, port, reachable) holds.
async fn until_table(
    c: &margay_lab::cluster::Cluster,
    want: &[(&str, &str, &str, bool)],
    what: &str,
) {
    margay_tests::until_none_wrong(
        what,
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            want.iter()
                .filter(|(f, to, p, ok)| reach(c, f, to, p) != *ok)
                .collect()
        },
    )
    .await
    .unwrap();
}

/// The agents of a lab enforce a NetworkPolicy from the API: its peers
/// and named port across nodes, a pod added under it isolated the moment
/// its ADD returns, and deleting it restores the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_enforce_networkpolicy_in_the_lab() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{Api, DeleteParams, PostParams};
    use margay_lab::cluster::PodOpts;

    let mut c = margay_tests::two_node_lab().await;
    let serve: Vec<String> = ["tcp:80", "tcp:81", "udp:80"].map(String::from).to_vec();
    for (node, name, ns) in [
        ("node1", "a", "x"),
        ("node2", "b", "x"),
        ("node1", "c", "y"),
    ] {
        let o = PodOpts {
            namespace: Some(ns.into()),
            labels: [("pod".to_string(), name.to_string())].into(),
            serve: serve.clone(),
            ..Default::default()
        };
        c.add_pod_with(node, name, &o).await.unwrap();
    }
    let all = [
        ("b", "a", "80/tcp", true),
        ("c", "a", "80/tcp", true),
        ("b", "a", "81/tcp", true),
        ("a", "b", "80/udp", true),
    ];
    until_table(&c, &all, "no policy").await;

    // Into x's pod=a: from pod=b (own namespace) on its port serve-80-tcp.
    let api: Api<NetworkPolicy> = Api::namespaced(c.client.clone(), "x");
    let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "a-from-b"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                         "ports": [{"port": "serve-80-tcp"}]}]
        }
    }))
    .unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
    until_table(
        &c,
        &[
            ("b", "a", "80/tcp", true),
            ("c", "a", "80/tcp", false),
            ("b", "a", "81/tcp", false),
            ("b", "a", "80/udp", false),
            // Not selected: b and c stay open.
            ("a", "b", "80/udp", true),
            ("a", "c", "81/tcp", true),
        ],
        "a-from-b",
    )
    .await;

    // What margayctl says of it, as an operator would ask.
    let (code, out, err) = c.margayctl(0, &["policy", "show", "x/a"]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("INGRESS: isolated by 1 policy"), "{out}");
    assert!(out.contains("  x/a-from-b\n"), "{out}");
    let b_ip = &c.pods.iter().find(|p| p.name == "b").unwrap().ip;
    assert!(
        out.contains(&format!(
            "from pods pod=b (own namespace) [x/b {b_ip}]; ports tcp/serve-80-tcp (80)"
        )),
        "{out}"
    );
    assert!(out.contains("EGRESS: not isolated"), "{out}");
    let (code, out, _) = c
        .margayctl(0, &["policy", "check", "x/b", "x/a", "80"])
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ALLOWED") && out.contains("allowed by x/a-from-b rule 0"),
        "{out}"
    );
    let (code, out, _) = c
        .margayctl(0, &["policy", "check", "y/c", "x/a", "80/tcp"])
        .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DENIED: isolated by x/a-from-b"), "{out}");
    let (code, out, _) = c
        .margayctl(
            0,
            &["policy", "check", "x/b", "x/a", "80/udp", "-o", "json"],
        )
        .unwrap();
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["allowed"], false, "{out}");
    assert_eq!(v["verdict"]["ingress"]["decision"], "denied", "{out}");
    let (code, _, err) = c.margayctl(0, &["policy", "show", "x/nope"]).unwrap();
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = c
        .margayctl(0, &["policy", "check", "x/b", "x/a", "80/icmp"])
        .unwrap();
    assert_eq!(code, 2, "{err}");

    // A new pod=a: isolated from the moment its ADD returns. Its
    // listeners may not be up yet, so a port it never serves (82) tells:
    // a SYN the policy drops times out, one that reaches a2's kernel is
    // refused at once. The control: on a pod of that node no policy
    // isolates, the same port is refused (a2 too, once the policy goes).
    let o = PodOpts {
        namespace: Some("x".into()),
        labels: [("pod".to_string(), "a".to_string())].into(),
        serve: serve.clone(),
        ..Default::default()
    };
    c.add_pod_with("node1", "a2", &o).await.unwrap();
    assert_eq!(
        outcome(&c, "c", "a2", "82/tcp"),
        Outcome::Timeout,
        "c's SYN reached a2 as its ADD returned"
    );
    assert_eq!(outcome(&c, "b", "c", "82/tcp"), Outcome::Refused);
    until_table(&c, &[("b", "a2", "80/tcp", true)], "a2's listener").await;
    assert!(!reach(&c, "c", "a2", "80/tcp"));

    // The table is Margay's own, on both nodes.
    for n in &c.nodes {
        let t = n
            .node
            .ns
            .exec("nft", &["list", "table", "inet", "margay_policy"])
            .unwrap();
        assert!(t.contains("chain forward"), "{}: {t}", n.name);
    }

    api.delete("a-from-b", &DeleteParams::default())
        .await
        .unwrap();
    until_table(&c, &all, "policy deleted").await;
    assert!(reach(&c, "c", "a2", "80/tcp"));
    assert_eq!(outcome(&c, "c", "a2", "82/tcp"), Outcome::Refused);
}
