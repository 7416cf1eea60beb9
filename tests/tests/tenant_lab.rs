//! A tenant can neither slip past NetworkPolicy nor break a node with it:
//! acceptance tests through the real plugin, agent and kernel
//! (`margay_lab::cluster`: a real apiserver, a real `margay-agent`, pods
//! wired by libcni through the real `margay` plugin). Each test starts one
//! single-node lab: everything here happens between the pods of one node
//! (where IPv6 is routed; between nodes it is not yet), and a node is
//! quicker to start than two.
//!
//! - `a_pod_cannot_send_as_its_neighbour`: dual-stack pods; an attacker
//!   that adds its neighbour's addresses to its own interface and sends
//!   from them reaches nobody, with or without a policy, on either family,
//!   and so does not pass an ingress rule that admits only that neighbour,
//!   while the neighbour itself does. Seen at the receiver, since replies
//!   to a forged source go to its owner; a counter on the node shows the
//!   forged datagrams did reach it.
//! - `each_attachment_of_a_pod_is_enforced_and_deleted_alone`: a Pod with
//!   two sandboxes (two CNI ADDs, container IDs of their own, as when a
//!   runtime recreates a sandbox): the Pod's policy holds on both, from
//!   the moment the second ADD returns, and deleting one leaves the other
//!   enforced.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod as KubePod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, PostParams};
use margay_harness::netcheck::Outcome;
use margay_harness::paths;
use margay_lab::Tor;
use margay_lab::cluster::{Cluster, Options, POOL6_CIDR, PodOpts};
use margay_tests::datagrams::{self, Receiver, sent};

/// How long a condition may take to hold (a policy to be enforced, a new
/// pod's IPv6 to finish duplicate address detection).
const T: Duration = Duration::from_secs(60);

fn lab() -> PathBuf {
    paths::workspace_bin("margay-lab").expect("margay-lab built")
}

fn pod<'a>(c: &'a Cluster, name: &str) -> &'a margay_lab::cluster::Pod {
    c.pods
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

/// Pod `name` with label `role`, on the lab's node.
async fn add(c: &mut Cluster, name: &str, role: &str, ns: &str, serve: &[&str]) {
    let o = PodOpts {
        namespace: Some(ns.into()),
        labels: [("role".to_string(), role.to_string())].into(),
        serve: serve.iter().map(ToString::to_string).collect(),
        ..Default::default()
    };
    c.add_pod_with("node1", name, &o).await.unwrap();
}

/// Creates NetworkPolicy `ns/name`: ingress to `role=to` only from
/// `role=from` (on TCP `port`, or every port).
async fn allow_only(c: &Cluster, ns: &str, name: &str, to: &str, from: &str, port: Option<u16>) {
    let mut rule = serde_json::json!({"from": [{"podSelector": {"matchLabels": {"role": from}}}]});
    if let Some(p) = port {
        rule["ports"] = serde_json::json!([{"protocol": "TCP", "port": p}]);
    }
    let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": {"role": to}}, "ingress": [rule]}
    }))
    .unwrap();
    Api::<NetworkPolicy>::namespaced(c.client.clone(), ns)
        .create(&PostParams::default(), &p)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------
// Forged sources.

/// The port the receiver listens on.
const RECV_PORT: u16 = 9000;

/// Starts sending `payload` from pod `from`, from its address `src`, to
/// `dst`:[`RECV_PORT`].
fn send(c: &Cluster, from: &str, src: &str, dst: &str, payload: &str) -> Child {
    let to = SocketAddr::new(dst.parse().unwrap(), RECV_PORT);
    datagrams::send(&pod(c, from).ns, src, to, payload)
}

/// The forged datagrams (IPv4, IPv6) that have come in on the attacker's
/// interface so far, counted by the test's own table ahead of Margay's
/// `source` chain.
fn forged_at_node(c: &Cluster) -> (u64, u64) {
    let out = c.nodes[0]
        .node
        .ns
        .exec("nft", &["list", "chain", "inet", "tenant_watch", "pre"])
        .unwrap();
    let packets = |fam: &str| {
        out.lines()
            .find(|l| l.contains(&format!("{fam} saddr")))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {fam} counter in {out}"))
    };
    (packets("ip"), packets("ip6"))
}

/// One round: the attacker sends from its own addresses and from its
/// neighbour's (forged), then the neighbour from its own; what the target
/// received, by payload, and how many forged datagrams reached the node
/// in the round.
fn round(c: &Cluster) -> (Vec<String>, (u64, u64)) {
    let ips = |name: &str| {
        let p = pod(c, name);
        (p.ip.as_str(), p.ip6.as_deref().unwrap())
    };
    let ((db, db6), (api, api6), (evil, evil6)) = (ips("db"), ips("api"), ips("evil"));
    let before = forged_at_node(c);
    let r = Receiver::start(&pod(c, "db").ns, RECV_PORT, Duration::from_millis(1000));
    // The attacker's own first: its neighbour entry for the gateway is
    // resolved from its own address (a solicitation from a forged one
    // would be dropped, and the forged datagrams never leave the pod).
    sent(vec![
        send(c, "evil", evil, db, "evil-own-4"),
        send(c, "evil", evil6, db6, "evil-own-6"),
    ]);
    sent(vec![
        send(c, "evil", api, db, "forged-4"),
        send(c, "evil", api6, db6, "forged-6"),
    ]);
    // The genuine ones last: when they are in, the forged ones, sent
    // before over the same node, had their chance.
    sent(vec![
        send(c, "api", api, db, "api-4"),
        send(c, "api", api6, db6, "api-6"),
    ]);
    let got = r.finish();
    let after = forged_at_node(c);
    // Whatever arrived came from the address it claims.
    for (src, payload) in &got {
        let want = match payload.as_str() {
            "evil-own-4" => evil,
            "evil-own-6" => evil6,
            "forged-4" | "api-4" => api,
            "forged-6" | "api-6" => api6,
            other => panic!("unexpected datagram {other:?} from {src}"),
        };
        assert_eq!(src.to_string(), want, "{payload}");
    }
    let mut payloads: Vec<String> = got.into_iter().map(|(_, p)| p).collect();
    payloads.sort();
    payloads.dedup();
    (payloads, (after.0 - before.0, after.1 - before.1))
}

/// Rounds until the target receives exactly `want` (sorted); the last
/// round's forged datagrams at the node.
fn until_received(c: &Cluster, want: &[&str], what: &str) -> (u64, u64) {
    let t = Instant::now();
    loop {
        let (got, forged) = round(c);
        if got == want {
            return forged;
        }
        assert!(
            !got.iter().any(|p| p.starts_with("forged")),
            "{what}: a forged datagram got through: {got:?}\n{}",
            c.nodes[0]
                .node
                .ns
                .exec("nft", &["list", "table", "inet", "margay_policy"])
                .unwrap_or_default()
        );
        assert!(
            t.elapsed() < T,
            "{what}: received {got:?}, want {want:?}\nagent log:\n{}",
            c.agent_log(0)
        );
    }
}

/// Spoofing, IPv4 and IPv6: pod `evil` adds pod `api`'s addresses to its
/// own eth0 (IPv6 without duplicate address detection, so it is usable at
/// once) and sends UDP from them to pod `db`, whose policy admits
/// only `api`. The target never receives a forged datagram, before or
/// under the policy; `api`'s own datagrams arrive throughout; `evil`'s own
/// arrive until the policy isolates `db`. The node's own table holds each
/// attachment to its addresses.
///
/// Before this session (898ea2a) the forged datagrams arrived: the node
/// had no source check (no `source` chain, no rp_filter on workload
/// interfaces, and IPv6 has no rp_filter at all), and the policy's peer
/// set admits `api`'s addresses from wherever they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cannot_send_as_its_neighbour() {
    let mut c = Cluster::start(Options {
        nodes: 1,
        tor: Tor::None,
        pool6_cidr: Some(POOL6_CIDR.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    for (name, role) in [("db", "db"), ("api", "api"), ("evil", "evil")] {
        add(&mut c, name, role, "shop", &[]).await;
    }
    for p in &c.pods {
        assert!(p.ip6.is_some(), "{} has no IPv6 address", p.name);
    }
    // A pod's IPv6 address is usable (a socket may bind it) once duplicate
    // address detection has passed.
    margay_harness::wait::until(
        "the pods' IPv6 addresses past DAD",
        T,
        Duration::from_millis(100),
        || {
            let tentative = c.pods.iter().any(|p| {
                p.ns.ip(&["-6", "addr", "show", "dev", "eth0", "tentative"])
                    .map_or(true, |o| !o.trim().is_empty())
            });
            Ok((!tentative).then_some(()))
        },
    )
    .unwrap();
    let (api, evil) = (pod(&c, "api"), pod(&c, "evil"));
    let api6 = api.ip6.clone().unwrap();
    let evil_if = evil.host_if.clone().unwrap();
    // The attacker takes its neighbour's addresses.
    evil.ns
        .ip(&["addr", "add", &format!("{}/32", api.ip), "dev", "eth0"])
        .unwrap();
    evil.ns
        .ip(&[
            "addr",
            "add",
            &format!("{api6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    // The test's own counters, ahead of Margay's table (raw is -300):
    // forged datagrams that come in on the attacker's interface.
    margay_harness::nft_ns::load(
        &c.nodes[0].node.ns,
        &format!(
            "table inet tenant_watch {{\n  chain pre {{\n    \
             type filter hook prerouting priority -350; policy accept;\n    \
             iifname \"{evil_if}\" ip saddr {} udp dport {RECV_PORT} counter\n    \
             iifname \"{evil_if}\" ip6 saddr {api6} udp dport {RECV_PORT} counter\n  }}\n}}\n",
            api.ip
        ),
    )
    .unwrap();

    // No policy: everyone's own datagrams arrive (IPv6 too, once the new
    // interfaces' addresses are past DAD), the forged ones do not, though
    // they reach the node.
    let forged = until_received(
        &c,
        &["api-4", "api-6", "evil-own-4", "evil-own-6"],
        "no policy",
    );
    assert!(
        forged.0 > 0 && forged.1 > 0,
        "no forged datagram reached the node: {forged:?}"
    );

    // Into db only from api: evil's own datagrams stop; api's still
    // arrive, the forged ones still do not.
    allow_only(&c, "shop", "db-from-api", "db", "api", None).await;
    let forged = until_received(&c, &["api-4", "api-6"], "db-from-api");
    assert!(
        forged.0 > 0 && forged.1 > 0,
        "no forged datagram reached the node: {forged:?}"
    );

    // The node's own view: the source check, each attachment held to its
    // own addresses.
    let table = c.nodes[0]
        .node
        .ns
        .exec("nft", &["list", "table", "inet", "margay_policy"])
        .unwrap();
    assert!(table.contains("chain source {"), "{table}");
    let evil = pod(&c, "evil");
    for ip in [&evil.ip, evil.ip6.as_ref().unwrap()] {
        assert!(table.contains(&format!("\"{evil_if}\" . {ip}")), "{table}");
    }
    for ip in [&api.ip, &api6] {
        assert!(!table.contains(&format!("\"{evil_if}\" . {ip}")), "{table}");
    }
}

// ---------------------------------------------------------------------
// Two attachments of one Pod.

/// What became of each probe (`from` pod, `IP:PORT/tcp`), all at once.
fn outcomes(c: &Cluster, probes: &[(&str, String)]) -> Vec<Outcome> {
    let children: Vec<Child> = probes
        .iter()
        .map(|(from, target)| {
            pod(c, from)
                .ns
                .cmd(lab())
                .args(["netcheck", "probe", "--timeout-ms", "700", target])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|ch| margay_tests::probe_outcome(&ch.wait_with_output().unwrap()))
        .collect()
}

/// Waits until every (from, target, outcome) holds.
/// What friend and stranger see of app: friend on 80, stranger on 80
/// and 81.
fn app_seen(
    c: &Cluster,
    stranger_80: Outcome,
    stranger_81: Outcome,
) -> [(&str, String, Outcome); 3] {
    [
        ("friend", at(c, "app", 80), Outcome::Ok),
        ("stranger", at(c, "app", 80), stranger_80),
        ("stranger", at(c, "app", 81), stranger_81),
    ]
}

async fn until(c: &Cluster, want: &[(&str, String, Outcome)], what: &str) {
    let probes: Vec<(&str, String)> = want.iter().map(|(f, t, _)| (*f, t.clone())).collect();
    margay_tests::until_none_wrong(what, T, Duration::from_millis(200), || {
        let got = outcomes(c, &probes);
        want.iter()
            .zip(&got)
            .filter(|((_, _, w), g)| w != *g)
            .map(|((f, t, w), g)| format!("{f} -> {t}: {g}, want {w}"))
            .collect()
    })
    .await
    .unwrap();
}

fn at(c: &Cluster, name: &str, port: u16) -> String {
    format!("{}:{port}/tcp", pod(c, name).ip)
}

/// One Pod, two sandboxes: `app` and `app-b`, each its own CNI ADD (a
/// container ID of its own, the same K8S_POD_NAME), its own interface and
/// addresses. Under a policy admitting only `friend` on tcp:80, both are
/// closed to `stranger` and open to `friend`, `app-b` from the moment its
/// ADD returns; a DEL of `app-b` removes its interface and leaves `app`
/// enforced.
///
/// A closed port tells a policy drop from no policy: an isolated pod's
/// kernel never sees the SYN (the probe times out), an open one answers
/// with a RST (refused).
///
/// Before this session (898ea2a) the node kept one endpoint per Pod: the
/// second ADD moved the Pod's rules to the new interface and left the
/// first open to everyone, and the DEL of either took the Pod's rules
/// away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attachment_of_a_pod_is_enforced_and_deleted_alone() {
    use Outcome::{Ok as Open, Refused, Timeout as Dropped};
    let mut c = Cluster::start(Options {
        nodes: 1,
        tor: Tor::None,
        ..Default::default()
    })
    .await
    .unwrap();
    add(&mut c, "app", "app", "shop", &["tcp:80"]).await;
    add(&mut c, "friend", "friend", "shop", &[]).await;
    add(&mut c, "stranger", "stranger", "shop", &[]).await;
    until(&c, &app_seen(&c, Open, Refused), "no policy").await;

    allow_only(&c, "shop", "app-from-friend", "app", "friend", Some(80)).await;
    until(
        &c,
        &[
            ("friend", at(&c, "app", 80), Open),
            ("stranger", at(&c, "app", 80), Dropped),
        ],
        "app-from-friend",
    )
    .await;

    // The second sandbox: isolated as soon as its ADD returns (its
    // listener may not be up yet: the closed port 81 says it).
    c.add_sandbox("app", "app-b", &["tcp:80".into()])
        .await
        .unwrap();
    assert_eq!(
        outcomes(&c, &[("stranger", at(&c, "app-b", 81))]),
        [Dropped],
        "stranger reached app-b as its ADD returned"
    );
    let both = [
        ("friend", at(&c, "app", 80), Open),
        ("friend", at(&c, "app-b", 80), Open),
        ("stranger", at(&c, "app", 80), Dropped),
        ("stranger", at(&c, "app-b", 80), Dropped),
        ("stranger", at(&c, "app-b", 81), Dropped),
        ("stranger", at(&c, "app", 81), Dropped),
    ];
    until(&c, &both, "two sandboxes").await;
    // Both interfaces are the Pod's endpoints on the node.
    let app_if = pod(&c, "app").host_if.clone().unwrap();
    let b_if = pod(&c, "app-b").host_if.clone().unwrap();
    assert_ne!(app_if, b_if);
    let table = c.nodes[0]
        .node
        .ns
        .exec("nft", &["list", "table", "inet", "margay_policy"])
        .unwrap();
    for i in [&app_if, &b_if] {
        assert!(table.contains(&format!("\"{i}\"")), "{i}: {table}");
    }

    // DEL of app-b: its interface goes, app stays enforced (and the Pod,
    // whose first sandbox is still there).
    c.del_pod("app-b").await.unwrap();
    let node = &c.nodes[0].node.ns;
    assert!(
        node.ip(&["link", "show", &b_if]).is_err(),
        "{b_if} is still there"
    );
    let pods: Api<KubePod> = Api::namespaced(c.client.clone(), "shop");
    assert!(pods.get_opt("app").await.unwrap().is_some());
    until(&c, &app_seen(&c, Dropped, Dropped), "app-b deleted").await;
    let table = node
        .exec("nft", &["list", "table", "inet", "margay_policy"])
        .unwrap();
    assert!(table.contains(&format!("\"{app_if}\"")), "{table}");
    assert!(!table.contains(&format!("\"{b_if}\"")), "{table}");
}
