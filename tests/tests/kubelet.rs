//! Margay on real Kubernetes nodes, as a cluster operator would try it:
//! kubelets (v1.20) with containerd run Margay's DaemonSet from its image,
//! installed with `kubectl apply` or `helm install` as docs/install.md
//! says (`margay_lab::kubernetes`), and call the plugin for every pod.
//!
//! - the manifest: the DaemonSet ready on every node, its init container's
//!   plugin and conflist in each node's own filesystem (not the host's); a
//!   30-replica Deployment spread over the nodes, every Pod a unique
//!   address from its node's block, the full ping matrix, the addresses in
//!   `kubectl get pods -o wide`; scaled down, the kubelets' DELs release
//!   the addresses; `rollout restart` and an image upgrade while pods ping
//!   across nodes every 20 ms: no gap over a second, no pod loses its
//!   address, every node routes to every other's blocks again after;
//!   `pod add` with a namespace, labels and a listener, closed by a
//!   NetworkPolicy and opened to one namespace (the agents' RBAC and
//!   watches under the DaemonSet);
//! - Helm: `helm upgrade` of a value rolls the agents out with it; a node
//!   drained, shut down and deleted has its blocks freed; uninstalled as
//!   docs/install.md says, the nodes are left clean.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::Api;
use margay_harness::wait;
use margay_lab::cluster::{Cluster, Options, PodOpts};
use margay_lab::kubernetes::{self, NAMESPACE};
use margay_lab::{Install, Tor};
use margay_tests::{Pinger, allocations, until_none_wrong_async};

const T: Duration = Duration::from_secs(180);

async fn lab(install: Install) -> Cluster {
    Cluster::start(Options {
        nodes: 3,
        tor: Tor::Bird,
        kubernetes: Some(install),
        ..Default::default()
    })
    .await
    .expect("a Kubernetes lab")
}

fn kubectl(c: &Cluster, args: &[&str]) -> String {
    let out = c.api.kubectl().unwrap().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lab pod name → address, from the API.
async fn addresses(c: &mut Cluster) -> BTreeMap<String, String> {
    kubernetes::refresh_pods(c).await.unwrap();
    c.pods
        .iter()
        .map(|p| (p.name.clone(), p.ip.clone()))
        .collect()
}

/// Pings every 20 ms between pods on different nodes (one per node pair).
fn pingers(c: &Cluster) -> Vec<Pinger> {
    let mut v = Vec::new();
    let mut pairs = std::collections::BTreeSet::new();
    for a in &c.pods {
        for b in &c.pods {
            if a.node != b.node && pairs.insert((a.node.clone(), b.node.clone())) {
                v.push(Pinger::start(
                    a.ns.name(),
                    &b.ip,
                    format!("{} -> {}", a.name, b.name),
                ));
            }
        }
    }
    v
}

/// Stops the pingers; if any lost traffic, prints what each node had
/// then (routes, the agents' last lines) before failing.
fn stop_all(c: &Cluster, p: Vec<Pinger>, what: &str) {
    let reports: Vec<_> = p.into_iter().map(Pinger::stop).collect();
    if reports.iter().any(|r| !r.kept(50)) {
        diagnose(c);
    }
    for r in reports {
        r.assert_kept(what, 50);
    }
}

/// Each node's routes and its agent's last log lines, for a failure.
fn diagnose(c: &Cluster) {
    for n in &c.nodes {
        let routes = n
            .node
            .ns
            .exec("ip", &["route"])
            .unwrap_or_else(|e| e.to_string());
        let status = n
            .node
            .ns
            .exec("curl", &["-s", "http://127.0.0.1:9099/status"])
            .unwrap_or_else(|e| e.to_string());
        println!(
            "== {} ({}) routes:\n{routes}\nstatus: {status}",
            n.name, n.node.v4
        );
    }
    for pod in agent_pods(c) {
        let out = c
            .api
            .kubectl()
            .unwrap()
            .args([
                "-n",
                NAMESPACE,
                "logs",
                &pod,
                "-c",
                "margay-agent",
                "--tail",
                "80",
            ])
            .output()
            .unwrap();
        println!("== {pod} log:\n{}", margay_tests::output_text(&out));
    }
}

/// `kubectl -n NAMESPACE ARGS` (a change of the agents' DaemonSet) while
/// pods ping across nodes: every agent replaced, traffic kept through it
/// (`what`), and the pods still have the addresses `before`.
async fn roll_under_traffic(
    c: &mut Cluster,
    before: &BTreeMap<String, String>,
    what: &str,
    args: &[&str],
) {
    let pings = pingers(c);
    // Not a wait: a second of traffic before the change, to compare with.
    std::thread::sleep(Duration::from_secs(1));
    let agents = agent_pods(c);
    kubectl(c, &[&["-n", NAMESPACE][..], args].concat());
    rolled(c, &agents).await;
    // Not a wait: traffic must go on for 2 s after the change too.
    std::thread::sleep(Duration::from_secs(2));
    stop_all(c, pings, what);
    assert_eq!(addresses(c).await, *before, "pods kept their addresses");
    // Every node routes to every other's blocks itself again (traffic
    // alone would not show a gap: the router's default route covers it).
    if let Err(e) = c.wait_converged(T).await {
        diagnose(c);
        panic!("{what}: {e}");
    }
}

/// Every agent pod replaced by `change` and ready again.
async fn rolled(c: &Cluster, before: &[String]) {
    let api: Api<DaemonSet> = Api::namespaced(c.client.clone(), NAMESPACE);
    let what = format!("rollout (before {before:?})");
    wait::until_async(&what, T, Duration::from_millis(500), || {
        let now = agent_pods(c);
        let api = api.clone();
        async move {
            if now.iter().all(|p| !before.contains(p)) && now.len() == c.nodes.len() {
                let ds = api.get("margay-agent").await.unwrap();
                let st = ds.status.unwrap_or_default();
                if st.number_ready == 3 && st.updated_number_scheduled == Some(3) {
                    return Ok(Some(()));
                }
            }
            Err(format!("{now:?}").into())
        }
    })
    .await
    .unwrap();
}

/// `jsonpath` over the agent pods.
fn of_agent_pods(c: &Cluster, jsonpath: &str) -> String {
    let selector = "app.kubernetes.io/name=margay";
    let jsonpath = format!("jsonpath={jsonpath}");
    kubectl(
        c,
        &[
            "-n", NAMESPACE, "get", "pods", "-l", selector, "-o", &jsonpath,
        ],
    )
}

fn agent_pods(c: &Cluster) -> Vec<String> {
    of_agent_pods(c, "{.items[*].metadata.name}")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_install_deployment_restart_and_upgrade() {
    let mut c = lab(Install::Manifest).await;
    // The init container wrote into each node's filesystem, not the host's.
    for n in &c.nodes {
        let k = n.kubelet.as_ref().unwrap();
        for f in ["/opt/cni/bin/margay", "/etc/cni/net.d/10-margay.conflist"] {
            assert!(k.host_path(f).unwrap().exists(), "{}: {f}", n.name);
        }
    }
    assert!(!std::path::Path::new("/etc/cni/net.d/10-margay.conflist").exists());

    // 30 replicas, spread, unique addresses from their nodes' blocks.
    let t = Instant::now();
    kubernetes::deploy(&mut c, 30).await.unwrap();
    println!("30 pods running with addresses after {:.1?}", t.elapsed());
    let blocks = c.blocks().await.unwrap();
    let mut per_node = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in &c.pods {
        *per_node.entry(p.node.clone()).or_insert(0) += 1;
        assert!(seen.insert(p.ip.clone()), "{} twice", p.ip);
        let ip: std::net::IpAddr = p.ip.parse().unwrap();
        assert!(
            blocks.iter().any(|(cidr, node)| *node == p.node
                && cidr.parse::<ipnetwork::IpNetwork>().unwrap().contains(ip)),
            "{} ({}) outside {}'s blocks: {blocks:?}",
            p.name,
            p.ip,
            p.node
        );
    }
    assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [10, 10, 10]);
    let wide = kubectl(&c, &["get", "pods", "-o", "wide"]);
    for p in &c.pods {
        assert!(wide.contains(&p.ip), "{wide}");
    }
    c.wait_connected(T).await.unwrap();

    // Scaled down: the kubelets' DELs give the addresses back.
    let before = addresses(&mut c).await;
    kubectl(
        &c,
        &[
            "scale",
            "deployment",
            kubernetes::DEPLOYMENT,
            "--replicas=24",
        ],
    );
    let mut p = wait::Poller::new("24 pods", T, Duration::from_millis(500));
    let gone = loop {
        let now = addresses(&mut c).await;
        if now.len() == 24 {
            break before
                .iter()
                .filter(|(n, _)| !now.contains_key(*n))
                .map(|(_, ip)| ip.clone())
                .collect::<Vec<_>>();
        }
        p.saw(format!("{} pods", now.len()));
        p.next().await.unwrap();
    };
    assert_eq!(gone.len(), 6);
    let every = Duration::from_millis(500);
    until_none_wrong_async("the addresses given back", T, every, || async {
        let held = allocations(&c.client).await.into_iter().map(|(ip, _)| ip);
        held.filter(|ip| gone.contains(ip)).collect()
    })
    .await
    .unwrap();

    // The agents restarted, then upgraded, while pods ping across nodes.
    let before = addresses(&mut c).await;
    let restart = ["rollout", "restart", "daemonset/margay-agent"];
    roll_under_traffic(&mut c, &before, "rollout restart", &restart).await;

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("margay-next.tar");
    let next = "ghcr.io/margay-dev/margay:0.1.1";
    let bin = margay_harness::paths::workspace_bin("margay-agent").unwrap();
    margay_lab::image::margay(bin.parent().unwrap(), next, &archive).unwrap();
    for n in &c.nodes {
        n.kubelet.as_ref().unwrap().import(&archive).unwrap();
    }
    let (agent, cni) = (
        format!("margay-agent={next}"),
        format!("install-cni={next}"),
    );
    let upgrade = ["set", "image", "daemonset/margay-agent", &agent, &cni];
    roll_under_traffic(&mut c, &before, "image upgrade", &upgrade).await;
    let images = of_agent_pods(&c, "{.items[*].spec.containers[0].image}");
    assert_eq!(
        images.split_whitespace().filter(|i| *i == next).count(),
        3,
        "{images}"
    );
    c.wait_connected(T).await.unwrap();

    // NetworkPolicy from the DaemonSet's agents (the manifest's RBAC
    // watches Namespaces and NetworkPolicies): `pod add` with a namespace,
    // labels and a listener makes a real Pod; a policy closes it, then
    // opens it to the default namespace only.
    let o = PodOpts {
        namespace: Some("team".into()),
        labels: [("app".to_string(), "web".to_string())].into(),
        serve: vec!["tcp:80".into()],
        ..Default::default()
    };
    c.add_pod_with("node1", "web", &o).await.unwrap();
    let labels = kubectl(&c, &["-n", "team", "get", "pod", "web", "--show-labels"]);
    assert!(labels.contains("app=web"), "{labels}");
    let web = c.pods.iter().find(|p| p.name == "web").unwrap().ip.clone();
    let from = c
        .pods
        .iter()
        .find(|p| p.node == "node2" && p.namespace == "default")
        .unwrap()
        .name
        .clone();
    let o = PodOpts {
        namespace: Some("other".into()),
        ..Default::default()
    };
    c.add_pod_with("node3", "intruder", &o).await.unwrap();
    until_reach(&c, &[(&from, &web, true), ("intruder", &web, true)]).await;
    let policy = |from_ns: Option<&str>| {
        let ingress = match from_ns {
            None => serde_json::json!([]),
            Some(ns) => serde_json::json!([{"from": [{"namespaceSelector":
                {"matchLabels": {"kubernetes.io/metadata.name": ns}}}]}]),
        };
        serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "team"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": ingress}})
        .to_string()
    };
    kubectl_apply(&c, &policy(None));
    until_reach(&c, &[(&from, &web, false), ("intruder", &web, false)]).await;
    kubectl_apply(&c, &policy(Some("default")));
    until_reach(&c, &[(&from, &web, true), ("intruder", &web, false)]).await;
    c.del_pod("web").await.unwrap();
    assert!(!c.pods.iter().any(|p| p.name == "web"));
}

/// `kubectl apply` of one object.
fn kubectl_apply(c: &Cluster, obj: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("obj.json");
    std::fs::write(&f, obj).unwrap();
    kubectl(c, &["apply", "-f", f.to_str().unwrap()]);
}

/// Waits until each (lab pod, address, reached on 80/tcp) holds.
async fn until_reach(c: &Cluster, want: &[(&str, &str, bool)]) {
    margay_tests::until_none_wrong(
        "the reachability wanted",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            want.iter()
                .filter(|(from, to, ok)| {
                    let src = c.pods.iter().find(|p| p.name == *from).unwrap();
                    let got = margay_tests::probe(&src.ns, &format!("{to}:80/tcp"))
                        .stdout(std::process::Stdio::null())
                        .status()
                        .unwrap()
                        .success();
                    got != *ok
                })
                .collect()
        },
    )
    .await
    .unwrap();
}

/// The shell blocks of docs/install.md's "Uninstall" section, in order.
fn uninstall_blocks() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/install.md"))
        .unwrap();
    let section = doc.split("## Uninstall").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_node_removal_and_uninstall() {
    let mut c = lab(Install::Helm).await;
    kubernetes::deploy(&mut c, 6).await.unwrap();
    c.wait_connected(T).await.unwrap();

    // A value changed with helm upgrade rolls out.
    let agents = agent_pods(&c);
    let chart = margay_lab::kubernetes::repo().join("charts/margay");
    let out = std::process::Command::new(margay_harness::paths::helm().unwrap())
        .arg("--kubeconfig")
        .arg(c.api.kubeconfig())
        .args(["upgrade", "margay"])
        .arg(&chart)
        .args(["-n", NAMESPACE, "--reuse-values", "--set", "logLevel=debug"])
        .output()
        .unwrap();
    margay_tests::assert_ran(&out, "");
    // The chart stamps the ConfigMap's checksum on the pods: they roll.
    rolled(&c, &agents).await;
    let level = kubectl(
        &c,
        &[
            "-n",
            NAMESPACE,
            "get",
            "configmap",
            "margay-config",
            "-o",
            "jsonpath={.data.log_level}",
        ],
    );
    assert_eq!(level.trim(), "debug");
    c.wait_connected(T).await.unwrap();

    // node3 drained, shut down and deleted: its blocks are freed.
    kubectl(
        &c,
        &[
            "drain",
            "node3",
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
        ],
    );
    let mine: Vec<String> = c
        .blocks()
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, n)| n == "node3")
        .map(|(cidr, _)| cidr)
        .collect();
    assert!(!mine.is_empty());
    c.nodes[2].kubelet.take();
    kubectl(&c, &["delete", "node", "node3"]);
    let (t240, every) = (Duration::from_secs(240), Duration::from_secs(1));
    until_none_wrong_async("node3's blocks freed", t240, every, || async {
        let blocks = c.blocks().await.unwrap().into_iter();
        blocks.filter(|(_, n)| n == "node3").collect()
    })
    .await
    .unwrap();

    // Uninstalled as docs/install.md says: workloads first, then Helm and
    // the CRDs, then every node.
    kubectl(
        &c,
        &[
            "delete",
            "deployment",
            kubernetes::DEPLOYMENT,
            "--wait=true",
        ],
    );
    let mut p = wait::Poller::new("the lab pods gone", T, Duration::from_millis(500));
    while !addresses(&mut c).await.is_empty() {
        p.next().await.unwrap();
    }
    let blocks = uninstall_blocks();
    assert!(blocks[1].contains("helm uninstall"), "{blocks:?}");
    // As written, with kubectl and helm on the PATH and the cluster's
    // kubeconfig, from the repository.
    let helm = margay_harness::paths::helm().unwrap();
    let kubectl = margay_harness::paths::kubectl().unwrap();
    let path = format!(
        "{}:{}:{}",
        helm.parent().unwrap().display(),
        kubectl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("timeout")
        .args(["180", "sh", "-ec", &blocks[1]])
        .env("PATH", path)
        .env("KUBECONFIG", c.api.kubeconfig())
        .current_dir(margay_lab::kubernetes::repo())
        .output()
        .unwrap();
    margay_tests::assert_ran(&out, "docs/install.md's Helm uninstall: ");
    // The agents go with the DaemonSet.
    wait::until_async("the agents gone", T, Duration::from_millis(500), || {
        let running = agent_pods(&c);
        async move { Ok(running.is_empty().then_some(())) }
    })
    .await
    .unwrap();
    for n in c.nodes.iter().filter(|n| n.kubelet.is_some()) {
        let k = n.kubelet.as_ref().unwrap();
        let out = k.enter("sh").args(["-c", &blocks[2]]).output().unwrap();
        println!("{}: {}", n.name, String::from_utf8_lossy(&out.stderr));
        let links = n.node.ns.ip(&["-br", "link"]).unwrap();
        assert!(!links.lines().any(|l| l.starts_with("cali")), "{links}");
        assert!(!links.contains("margay.vxlan"), "{links}");
        for proto in ["78", "79"] {
            let r = n.node.ns.ip(&["route", "show", "proto", proto]).unwrap();
            assert!(r.trim().is_empty(), "{}: proto {proto}: {r}", n.name);
        }
        for f in ["/opt/cni/bin/margay", "/etc/cni/net.d/10-margay.conflist"] {
            assert!(!k.host_path(f).unwrap().exists(), "{}: {f}", n.name);
        }
        let nft = k.enter("nft").args(["list", "tables"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&nft.stdout).contains("margay"));
    }
}
