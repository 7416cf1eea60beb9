//! "A tenant can neither slip past NetworkPolicy nor break a node with
//! it": what a tenant may legally write, at the limits the API server
//! allows, through the real plugin, agents and kernel of a lab cluster
//! (`margay_lab::cluster`: a real apiserver, a `margay-agent` per node
//! namespace, pods wired by libcni through the real `margay` plugin).
//!
//! One cluster of two nodes serves every check (a start-up costs more
//! than the checks), each a function below, run in order:
//!
//! 1. [`long_names_survive_a_restart`]: a pod with a 63-character
//!    namespace, a 253-character name and a 64-hex-digit container ID
//!    (too long together for the interface alias that records whose an
//!    interface is) under a deny-all policy stays denied when its node's
//!    agent crashes and starts again; deleting the policy opens it.
//! 2. [`a_long_policy_name_is_enforced`]: a policy with a 253-character
//!    name is enforced, and an ADD on that node afterwards succeeds.
//! 3. [`large_rules_neither_break_a_node_nor_open_pods`]: a rule of 1,000
//!    /32 ipBlocks and 1,000 ports is enforced as written while the
//!    agent's memory stays under 128 MiB, other policies stay enforced and
//!    ADDs succeed; a policy over `MAX_POLICY_COST` is reported as not
//!    enforced as written in all four places (`margayctl policy show`,
//!    `/status`, the metric, an Event on it) and enforced fail closed.
//!
//! A namespace label change that brings thousands of pods into a peer set
//! at once (a delta of 10,000 set elements) is the kernel test
//! `a_delta_of_10000_set_elements_arrives_whole` in agent/tests/nftnl.rs.
//!
//! Reachability is probed (`margay-lab netcheck probe`, TCP) and polled
//! until it matches or a deadline passes: a verdict is never read once
//! right after a change.

use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use margay_api::status::{AgentStatus, PolicyStatus, UnenforcedReason};
use margay_harness::wait;
use margay_lab::cluster::{Cluster, PodOpts};
use serde_json::{Value, json};

/// How long a verdict may take to become what it should.
const T: Duration = Duration::from_secs(60);
/// The memory an agent may use with the largest legal rule loaded.
const MAX_RSS_KIB: u64 = 128 * 1024;

/// A legal DNS subdomain of exactly `len` characters starting with
/// `prefix` (labels of 63 characters joined by dots; one label when `len`
/// is at most 63, as a namespace's name must be).
fn long_name(prefix: &str, len: usize) -> String {
    let s: String = (0..len)
        .map(|i| match prefix.as_bytes().get(i) {
            Some(b) => char::from(*b),
            None if i % 64 == 63 => '.',
            None => 'a',
        })
        .collect();
    assert!(!s.ends_with('.'), "{s}");
    s
}

fn opts(ns: &str, pod: &str) -> PodOpts {
    PodOpts {
        namespace: Some(ns.into()),
        labels: [("pod".to_string(), pod.to_string())].into(),
        serve: vec!["tcp:80".into(), "tcp:81".into()],
        ..Default::default()
    }
}

fn pod<'a>(c: &'a Cluster, name: &str) -> &'a margay_lab::cluster::Pod {
    c.pods
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

/// Whether lab pod `from` reaches `to` on TCP `port`.
fn reach(c: &Cluster, from: &str, to: &str, port: u16) -> bool {
    margay_tests::probe(&pod(c, from).ns, &format!("{}:{port}/tcp", pod(c, to).ip))
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Waits until every (from, to, port, reachable) holds.
async fn until_table(c: &Cluster, want: &[(&str, &str, u16, bool)], what: &str) {
    let every = Duration::from_millis(300);
    margay_tests::until_none_wrong(what, T, every, || {
        want.iter()
            .filter(|(f, to, p, ok)| reach(c, f, to, *p) != *ok)
            .map(|(f, to, p, ok)| {
                let (f, to) = (&f[..f.len().min(20)], &to[..to.len().min(20)]);
                format!(
                    "{f} -> {to}:{p} should be {}",
                    if *ok { "open" } else { "denied" }
                )
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nnode1 log:\n{}", tail(&c.agent_log(0), 30)));
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Node `i`'s agent's `/status` (through `margayctl node status`).
fn status(c: &Cluster, i: usize) -> Result<AgentStatus, String> {
    let (_, out, err) = c
        .margayctl(i, &["node", "status", "-o", "json"])
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}{err}"))
}

/// Node `i`'s policy status once its table is current.
async fn current_policy(c: &Cluster, i: usize) -> PolicyStatus {
    policy_until(c, i, |_| true).await
}

/// Node `i`'s policy status once its table is current and `ok` holds
/// (the status is published at most once a second).
async fn policy_until(c: &Cluster, i: usize, ok: impl Fn(&PolicyStatus) -> bool) -> PolicyStatus {
    let what = format!("node{}'s policy table current and as wanted", i + 1);
    wait::until_async(&what, T, Duration::from_millis(300), || {
        let got = match status(c, i) {
            Ok(AgentStatus {
                policy: Some(p), ..
            }) if p.current && ok(&p) => Ok(Some(p)),
            st => Err(format!("{st:?}").into()),
        };
        async move { got }
    })
    .await
    .unwrap()
}

/// Node `i`'s agent's (VmRSS, VmHWM) in KiB.
fn rss(c: &Cluster, i: usize) -> (u64, u64) {
    let pid = c.nodes[i].agent.as_ref().expect("agent running").pid();
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Node `i`'s agent's metrics.
fn metrics(c: &Cluster, i: usize) -> String {
    c.nodes[i]
        .node
        .ns
        .exec("curl", &["-s", "http://127.0.0.1:9099/metrics"])
        .unwrap_or_default()
}

async fn create(c: &Cluster, ns: &str, p: Value) {
    let p: NetworkPolicy = serde_json::from_value(p).unwrap();
    Api::<NetworkPolicy>::namespaced(c.client.clone(), ns)
        .create(&PostParams::default(), &p)
        .await
        .unwrap_or_else(|e| panic!("creating a policy in {ns}: {e}"));
}

/// Ingress into every pod of its namespace from `n` /32 ipBlocks (`admit`
/// and others no pod has) on `n` TCP ports (80 and others from `first`).
fn wide_policy(name: &str, n: usize, admit: &str, first: usize) -> Value {
    let from: Vec<Value> = std::iter::once(format!("{admit}/32"))
        .chain((1..n).map(|i| format!("172.16.{}.{}/32", i / 256, i % 256)))
        .map(|cidr| json!({"ipBlock": {"cidr": cidr}}))
        .collect();
    let ports: Vec<Value> = std::iter::once(80)
        .chain(first..first + n - 1)
        .map(|p| json!({"port": p, "protocol": "TCP"}))
        .collect();
    json!({
        "metadata": {"name": name},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": from, "ports": ports}]}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_legal_policy_lets_a_tenant_past_it_or_breaks_a_node() {
    // Two nodes, no router: pods on node1 are probed from node2, across
    // the nodes' own BGP mesh. node1 holds every pod the policies select.
    let mut c = margay_tests::two_node_lab().await;
    for (node, name, ns) in [
        ("node1", "a", "x"),
        ("node2", "b", "x"),
        ("node2", "c", "y"),
        ("node1", "d", "z"),
        ("node1", "e", "w"),
    ] {
        c.add_pod_with(node, name, &opts(ns, name)).await.unwrap();
    }
    // Check 0 (issue 27): while no policy names pods, a node watches only
    // its own Pods: node1 knows a, d and e, not node2's b and c.
    let p = policy_until(&c, 0, |p| p.endpoints == 3).await;
    assert!(
        !p.remote_pods && p.pods == 3,
        "{p:?}\nnode1 log:\n{}",
        tail(&c.agent_log(0), 40)
    );
    let started = Instant::now();
    long_names_survive_a_restart(&mut c).await;
    println!("check 1 took {:.0?}", started.elapsed());
    let t = Instant::now();
    let policy = a_long_policy_name_is_enforced(&mut c).await;
    println!("check 2 took {:.0?}", t.elapsed());
    // Its peer is pod b on node2: node1 watches the other nodes' Pods now
    // (b's address is in the peer set: check 2 saw b let in).
    let p = policy_until(&c, 0, |p| p.remote_pods).await;
    assert!(p.pods >= 6, "{p:?}");
    let t = Instant::now();
    large_rules_neither_break_a_node_nor_open_pods(&mut c, &policy).await;
    println!("check 3 took {:.0?}", t.elapsed());
    // Check 4. All of it loads whole: node1's agent restarted loads its
    // table in one `nft -f` (the 253-character policy's chains, the
    // 1,000 x 1,000 rule, the policy over the bound); before, a cut name
    // nft's parser refused failed every full load from then on.
    let t = Instant::now();
    let p = restart_node1(&mut c, |_| {}).await;
    assert!(p.last_error.is_none() && p.unenforced.len() == 1, "{p:?}");
    until_table(
        &c,
        &[("b", "a", 80, true), ("c", "a", 80, false)],
        "after a full load",
    )
    .await;
    println!("check 4 took {:.0?}", t.elapsed());
}

/// Check 1. The alias of a pod's host interface, `margay1 <handle>
/// <addrs> <ns>/<name>/<uid>`, holds 255 bytes: with a 64-digit container
/// ID in the handle, a 63-character namespace and a 253-character name do
/// not fit, and after a restart the agent must learn the pod elsewhere
/// (IPAM's record of the handle). Before, it restored only pods the alias
/// named: the restarted agent's table left the pod open to everyone.
async fn long_names_survive_a_restart(c: &mut Cluster) {
    let ns = long_name("tenant-", 63);
    let name = long_name("web-", 253);
    let mut o = opts(&ns, "long");
    o.runtime_id = true;
    c.add_pod_with("node1", &name, &o).await.unwrap();
    // The lab's ADD used a container ID as runtimes make them, and the
    // alias could not hold the pod.
    let id = pod(c, &name).id.clone();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let links = c.nodes[0].node.ns.ip(&["-o", "link", "show"]).unwrap();
    let line = links
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("no interface records {id}:\n{links}"));
    assert!(!line.contains(&name), "the alias holds the pod: {line}");
    until_table(
        c,
        &[("c", &name, 80, true), ("c", "a", 80, true)],
        "before any policy",
    )
    .await;

    create(
        c,
        &ns,
        json!({"metadata": {"name": "deny-all"},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    )
    .await;
    until_table(c, &[("c", &name, 80, false)], "deny-all").await;
    // node1's a, d, e and this one (the status is published at most once
    // a second: waited for).
    let before = policy_until(c, 0, |p| p.endpoints == 4).await;

    // node1's agent crashes; the lab starts it again as a kubelet would
    // (after a 1 s back-off). The kernel keeps the table meanwhile.
    let after = restart_node1(c, |c| {
        assert!(!reach(c, "c", &name, 80), "open while the agent was down");
    })
    .await;
    // Every attachment came back as an endpoint.
    assert_eq!(after.endpoints, before.endpoints, "{after:?}");
    // The restarted agent's table is loaded: the pod beside it (no
    // policy) is reached again through node1, the long-named one is not.
    until_table(c, &[("c", "a", 80, true)], "after the restart").await;
    assert!(
        !reach(c, "c", &name, 80),
        "the long-named pod is open after its agent's restart"
    );
    let c2: &Cluster = c;
    wait::holds_for(
        "the long-named pod closed after the restart",
        Duration::from_secs(3),
        Duration::ZERO,
        || Ok(!reach(c2, "c", &name, 80)),
    )
    .unwrap();

    // The probe sees both ways: the policy deleted, the pod is open.
    Api::<NetworkPolicy>::namespaced(c.client.clone(), &ns)
        .delete("deny-all", &DeleteParams::default())
        .await
        .unwrap();
    until_table(c, &[("c", &name, 80, true)], "deny-all deleted").await;
}

/// Crashes node1's agent (`while_down` runs then), lets the lab start it
/// again as a kubelet would, and waits until its whole table is loaded:
/// the restarted agent's NetworkPolicy status.
async fn restart_node1(c: &mut Cluster, while_down: impl FnOnce(&Cluster)) -> PolicyStatus {
    let restarts = c.nodes[0].restarts.count;
    c.crash_agent(0).unwrap();
    while_down(c);
    let what = "node1's agent back with a current policy table";
    let mut p = wait::Poller::new(what, Duration::from_secs(90), Duration::from_millis(300));
    loop {
        c.supervise();
        if c.nodes[0].restarts.count > restarts
            && let Ok(AgentStatus {
                policy: Some(p), ..
            }) = status(c, 0)
            && p.current
        {
            return p;
        }
        p.saw(format!(
            "restarts {:?}, {:?}",
            c.nodes[0].restarts,
            status(c, 0)
        ));
        if let Err(e) = p.next().await {
            panic!("{e}\n{}", tail(&c.agent_log(0), 30));
        }
    }
}

/// What check 2's policy admits into a: b, not c.
const LONG_NAMED_HOLDS: [(&str, &str, u16, bool); 2] =
    [("b", "a", 80, true), ("c", "a", 80, false)];

/// Check 2. A policy named with 253 characters (the most the API allows)
/// admitting only b into a. Before, its chain's name was longer than nft
/// allows (258 bytes, 256 at most): every load of node1's table failed,
/// c reached a, and an ADD there failed after 20 s waiting for its rules.
/// Returns its name.
async fn a_long_policy_name_is_enforced(c: &mut Cluster) -> String {
    let name = long_name("a-from-b-", 253);
    create(
        c,
        "x",
        json!({"metadata": {"name": name},
               "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}}),
    )
    .await;
    until_table(c, &LONG_NAMED_HOLDS, "the long-named policy").await;
    current_policy(c, 0).await;
    let (code, out, err) = c.margayctl(0, &["policy", "show", "x/a"]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("  x/{name}\n")), "{out}");
    // An ADD on node1 afterwards: the new pod gets its address and the
    // policy, from the moment the ADD returns.
    c.add_pod_with("node1", "a2", &opts("x", "a"))
        .await
        .expect("ADD after the long-named policy");
    assert!(!reach(c, "c", "a2", 80), "a2 open after its ADD");
    until_table(
        c,
        &[("b", "a2", 80, true), ("c", "a2", 80, false)],
        "a2 under the long-named policy",
    )
    .await;
    name
}

/// What check 3's 1,000 x 1,000 rule admits into d: c on 80, not on 81,
/// nor b.
const WIDE_RULE_HOLDS: [(&str, &str, u16, bool); 3] = [
    ("c", "d", 80, true),
    ("c", "d", 81, false),
    ("b", "d", 80, false),
];

/// Check 3. A rule's lines are its peers plus its ports: 1,000 ipBlocks
/// and 1,000 ports are ~2,000 lines, not the million of their product
/// (before, node1's agent grew to ~790 MB and had not enforced it a
/// minute later). A policy costing more than `MAX_POLICY_COST` isolates
/// its pods with nothing allowed (before, it was compiled as written and
/// not enforced a minute later either), and says so everywhere an
/// operator looks.
async fn large_rules_neither_break_a_node_nor_open_pods(c: &mut Cluster, long: &str) {
    // Into z's pods: from c's /32 and 999 others, on 80 and 999 others.
    let c_ip = pod(c, "c").ip.clone();
    let wide = wide_policy("wide", 1000, &c_ip, 1000);
    let size = wide.to_string().len();
    assert!(size > 45_000, "{size} bytes");
    create(c, "z", wide).await;
    // The long-named policy still holds.
    let want = [&WIDE_RULE_HOLDS[..], &LONG_NAMED_HOLDS].concat();
    until_table(c, &want, "the 1,000 x 1,000 rule").await;
    for i in 0..2 {
        let p = current_policy(c, i).await;
        assert!(p.unenforced.is_empty(), "node{}: {p:?}", i + 1);
        assert!(p.last_error.is_none(), "node{}: {p:?}", i + 1);
    }
    // In the kernel too: node1's whole table is a few thousand lines.
    let table = c.nodes[0]
        .node
        .ns
        .exec("nft", &["list", "table", "inet", "margay_policy"])
        .unwrap();
    let lines = table.lines().count();
    assert!((2_000..10_000).contains(&lines), "{lines} lines");
    let (rss1, hwm1) = rss(c, 0);
    println!(
        "{size}-byte policy loaded ({lines} table lines): node1 agent VmRSS {rss1} KiB, VmHWM {hwm1} KiB; node2 {:?}",
        rss(c, 1)
    );
    assert!(hwm1 < MAX_RSS_KIB, "node1's agent peaked at {hwm1} KiB");
    c.add_pod_with("node1", "a3", &opts("x", "a"))
        .await
        .expect("ADD after the 1,000 x 1,000 rule");
    until_table(
        c,
        &[("b", "a3", 80, true), ("c", "a3", 80, false)],
        "a3 beside the 1,000 x 1,000 rule",
    )
    .await;

    // Into w's pods: from b's /32 and 2,999 others, on 80 and 2,999
    // others. Cost 12,001: not enforced as written, but fail closed, so
    // even b (which it admits as written, and which another policy admits
    // into a) reaches nothing there.
    until_table(c, &[("b", "e", 80, true)], "e before its policy").await;
    let b_ip = pod(c, "b").ip.clone();
    create(c, "w", wide_policy("too-large", 3000, &b_ip, 2000)).await;
    until_table(
        c,
        &[("b", "e", 80, false), ("c", "e", 80, false)],
        "the too-large policy, fail closed",
    )
    .await;
    // Reported in all four places. /status, on both nodes:
    for i in 0..2 {
        let p = current_policy(c, i).await;
        let u: Vec<_> = p
            .unenforced
            .iter()
            .map(|u| (u.namespace.as_str(), u.name.as_str(), u.reason))
            .collect();
        assert_eq!(
            u,
            [("w", "too-large", UnenforcedReason::TooLarge)],
            "node{}: {p:?}",
            i + 1
        );
    }
    // The metric:
    let m = metrics(c, 0);
    assert!(m.contains("\nmargay_policy_unenforced 1\n"), "{m}");
    assert!(m.contains("\nmargay_policy_table_current 1\n"), "{m}");
    // margayctl:
    let (code, out, err) = c.margayctl(0, &["policy", "show", "w/e"]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let at = out
        .find("  w/too-large\n")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(out[at..].contains("NOT ENFORCED AS WRITTEN ("), "{out}");
    // A Warning Event on the policy, from the leader:
    let events: Api<Event> = Api::namespaced(c.client.clone(), "w");
    let every = Duration::from_millis(300);
    wait::until_async("a NotEnforcedAsWritten Event", T, every, || async {
        let list = events.list(&ListParams::default()).await?.items;
        if list.iter().any(|e| {
            e.reason.as_deref() == Some("NotEnforcedAsWritten")
                && e.type_.as_deref() == Some("Warning")
                && e.involved_object.kind.as_deref() == Some("NetworkPolicy")
                && e.involved_object.name.as_deref() == Some("too-large")
        }) {
            return Ok(Some(()));
        }
        Err(format!("{list:?}").into())
    })
    .await
    .unwrap();

    // An ADD into w afterwards succeeds, and that pod is closed too; the
    // other policies hold.
    c.add_pod_with("node1", "e2", &opts("w", "e"))
        .await
        .expect("ADD beside the too-large policy");
    assert!(!reach(c, "b", "e2", 80), "e2 open after its ADD");
    let closed_and_wide = [
        ("b", "e2", 80, false),
        ("c", "d", 80, true),
        ("b", "d", 80, false),
    ];
    let want = [&closed_and_wide[..], &LONG_NAMED_HOLDS].concat();
    until_table(c, &want, "after the too-large policy").await;
    let (code, out, _) = c.margayctl(0, &["policy", "show", "x/a"]).unwrap();
    assert_eq!(code, 0);
    assert!(out.contains(long), "{out}");
    let (rss1, hwm1) = rss(c, 0);
    let (rss2, hwm2) = rss(c, 1);
    println!(
        "at the end: node1 agent VmRSS {rss1} KiB, VmHWM {hwm1} KiB; node2 VmRSS {rss2} KiB, VmHWM {hwm2} KiB"
    );
    assert!(hwm1 < MAX_RSS_KIB, "node1's agent peaked at {hwm1} KiB");
    assert!(hwm2 < MAX_RSS_KIB, "node2's agent peaked at {hwm2} KiB");
}
