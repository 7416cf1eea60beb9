//! The install artifacts: `deploy/margay.yaml`, the Helm chart, the
//! Dockerfile. The manifest and the chart agree in substance; both pass
//! `kubernetes-validate --strict`, `helm lint` and a server-side dry run on
//! the real apiserver; and the agent running with exactly the manifest's
//! RBAC (as its ServiceAccount) does its whole job and is denied the rest.

// A test's own helper tasks, ended with the test (clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node as KubeNode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use margay_api::ipam::IPPool;
use margay_harness::kube::ApiServer;
use margay_harness::topo::Fabric;
use margay_harness::{names, paths, wait};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn helm_template(extra: &[&str]) -> String {
    let (ok, out) = run(Command::new(paths::helm().unwrap())
        .current_dir(root())
        .args([
            "template",
            "margay",
            "charts/margay",
            "--namespace",
            "kube-system",
            "--include-crds",
        ])
        .args(extra));
    assert!(ok, "{out}");
    out
}

/// (kind, namespace, name) -> object, comments and document order ignored.
fn objects(yaml: &str) -> BTreeMap<(String, String, String), Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("YAML");
    docs.into_iter()
        .filter(|d| !d.is_null())
        .map(|d| {
            let key = (
                d["kind"].as_str().unwrap_or_default().to_string(),
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            (key, d)
        })
        .collect()
}

/// Non-default values (a values file: `--set` on a list replaces it).
const CUSTOM_VALUES: &str = "ipPools:
  - name: default-ipv4
    cidr: 10.244.0.0/16
    blockSize: 26
    encapsulation: VXLAN
    natOutgoing: false
bgp:
  asNumber: 64512
  nodeToNodeMesh: false
  peers:
    - name: tor
      peerIP: 10.0.0.254
      asNumber: 65000
mtu: 9000
";

fn custom_values() -> (tempfile::TempDir, String) {
    let dir = names::temp_dir("values").unwrap();
    let f = dir.path().join("values.yaml");
    std::fs::write(&f, CUSTOM_VALUES).unwrap();
    let f = f.display().to_string();
    (dir, f)
}

#[test]
fn manifest_equals_the_chart_with_default_values() {
    let manifest = std::fs::read_to_string(root().join("deploy/margay.yaml")).unwrap();
    let m = objects(&manifest);
    let c = objects(&helm_template(&[]));
    assert_eq!(
        m.keys().collect::<Vec<_>>(),
        c.keys().collect::<Vec<_>>(),
        "different objects: run scripts/render-manifest.sh"
    );
    for (k, v) in &m {
        assert_eq!(v, &c[k], "{k:?} differs: run scripts/render-manifest.sh");
    }
    // What the manifest must hold.
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "IPPool",
        "BGPConfiguration",
    ] {
        assert!(m.keys().any(|(k, _, _)| k == kind), "no {kind}");
    }
    // The Lease namespace, its Role, and the agents told where it is.
    assert!(m.contains_key(&("Namespace".into(), String::new(), LEASE_NS.into())));
    for kind in ["Role", "RoleBinding"] {
        assert!(
            m.contains_key(&(kind.into(), LEASE_NS.into(), "margay-agent-leases".into())),
            "no {kind} margay-agent-leases in {LEASE_NS}"
        );
    }
    let ds = &m[&(
        "DaemonSet".into(),
        "kube-system".into(),
        "margay-agent".into(),
    )];
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["initContainers"][0]["command"][1], "install-cni");
    let agent = &spec["containers"][0];
    let env = agent["env"].as_array().unwrap();
    assert!(
        env.contains(&json!({"name": "MARGAY_LEASE_NAMESPACE", "value": LEASE_NS})),
        "{env:?}"
    );
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    let mounts: Vec<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["hostPath"]["path"].as_str().unwrap())
        .collect();
    for p in [
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/run/margay",
        "/var/run/netns",
    ] {
        assert!(mounts.contains(&p), "{p} not mounted: {mounts:?}");
    }
    // Custom values change what they should.
    let (_d, values) = custom_values();
    let custom = objects(&helm_template(&["-f", &values]));
    let pool = &custom[&("IPPool".into(), String::new(), "default-ipv4".into())];
    assert_eq!(pool["spec"]["encapsulation"], "VXLAN");
    let peer = &custom[&("BGPPeer".into(), String::new(), "tor".into())];
    assert_eq!(
        peer["spec"],
        json!({"peerIP": "10.0.0.254", "asNumber": 65000})
    );
    let cfg = &custom[&(
        "ConfigMap".into(),
        "kube-system".into(),
        "margay-config".into(),
    )];
    assert_eq!(cfg["data"]["mtu"], "9000");
    // A Lease namespace holding others' Leases is refused: the agents may
    // write every Lease of theirs.
    for ns in ["kube-system", "kube-node-lease", "default"] {
        let (ok, out) = run(Command::new(paths::helm().unwrap())
            .current_dir(root())
            .args(["template", "margay", "charts/margay", "-n", "kube-system"])
            .args(["--set", &format!("leaseNamespace.name={ns}")]));
        assert!(
            !ok && out.contains("holds other components' Leases"),
            "{ns}: {out}"
        );
    }
}

#[test]
fn lint_and_strict_schema_validation() {
    let helm = paths::helm().unwrap();
    let (ok, out) =
        run(Command::new(&helm)
            .current_dir(root())
            .args(["lint", "--strict", "charts/margay"]));
    assert!(ok, "{out}");
    let (_d, values) = custom_values();
    let (ok, out) = run(Command::new(&helm).current_dir(root()).args([
        "lint",
        "--strict",
        "charts/margay",
        "-f",
        &values,
    ]));
    assert!(ok, "{out}");
    let dir = names::temp_dir("validate").unwrap();
    let custom = dir.path().join("custom.yaml");
    std::fs::write(&custom, helm_template(&["-f", &values])).unwrap();
    // The newest releases kubernetes-validate knows (1.20 is the lab's
    // real apiserver, which takes the manifest in the other tests).
    for f in [root().join("deploy/margay.yaml"), custom] {
        for k in ["1.37.0", "1.36.0", "1.35.0"] {
            let (ok, out) = run(Command::new(paths::kubernetes_validate().unwrap())
                .args(["--strict", "-k", k])
                .arg(&f));
            assert!(
                ok && !out.contains("ERROR") && out.contains("daemonset/margay-agent"),
                "{} against {k}: {out}",
                f.display()
            );
        }
    }
}

#[test]
fn dockerfile_builds_the_binaries_and_ships_nft() {
    let d = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(d.contains("cargo build --release --locked"), "{d}");
    for bin in ["margay-agent", "margayctl", "margay "] {
        assert!(d.contains(&format!("/release/{bin}")), "{bin} not copied");
    }
    assert!(d.contains("nftables"), "natOutgoing needs nft in the image");
}

/// The image `margay-lab image` builds offline holds what the Dockerfile
/// puts in its image: each `COPY --from=build ... DEST` at DEST, the `nft`
/// of the nftables package it installs, and the same ENTRYPOINT and CMD.
#[test]
fn the_offline_image_has_the_dockerfiles_files() {
    let d = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let dir = names::temp_dir("image").unwrap();
    let archive = dir.path().join("margay.tar");
    let bin = margay_harness::paths::workspace_bin("margay-agent").unwrap();
    margay_lab::image::margay(bin.parent().unwrap(), "margay-test:1", &archive).unwrap();
    let files = margay_lab::image::files(&archive).unwrap();
    let mut wanted: Vec<String> = d
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    assert_eq!(wanted.len(), 3, "{d}");
    if d.contains("nftables") {
        wanted.push("usr/sbin/nft".into());
    }
    for w in &wanted {
        assert!(files.contains(w), "{w} missing from {files:?}");
    }
    // Every binary finds its libraries and loader inside the image.
    assert!(
        files.iter().any(|f| f.ends_with("ld-linux-x86-64.so.2")),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f.contains("libnftables")), "{files:?}");
    let cfg = margay_lab::image::config(&archive).unwrap();
    let json_list = |key: &str| -> serde_json::Value {
        let line = d.lines().find(|l| l.starts_with(key)).unwrap();
        serde_json::from_str(line.trim_start_matches(key).trim()).unwrap()
    };
    assert_eq!(cfg["Entrypoint"], json_list("ENTRYPOINT"));
    assert_eq!(cfg["Cmd"], json_list("CMD"));
}

const SA_USER: &str = "system:serviceaccount:kube-system:margay-agent";
/// The manifest's Lease namespace (the agent's default).
const LEASE_NS: &str = margay_api::node::LEASE_NAMESPACE;

/// What `kubectl auth can-i` answers.
const DENIED: &str = "no";
const ALLOWED: &str = "yes";

/// Asserts that `kubectl auth can-i` answered `want` to `asked`.
fn must_be(got: &str, want: &str, asked: &str) {
    let what = if want == ALLOWED { "allowed" } else { "denied" };
    assert_eq!(got, want, "{asked} must be {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dry_run_and_the_agent_with_least_privilege() {
    let token = "margay-agent-token-0123456789";
    let api = ApiServer::start_with_tokens(&[(
        token,
        SA_USER,
        "system:serviceaccounts,system:serviceaccounts:kube-system",
    )])
    .await
    .unwrap();
    let admin = api.client().await.unwrap();
    margay_harness::kube::crds::install(&admin).await.unwrap();
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        let mut c = api.kubectl().unwrap();
        c.args(args);
        if let Some(text) = stdin {
            let dir = names::temp_dir("kubectl").unwrap();
            let f = dir.path().join("in.yaml");
            std::fs::write(&f, text).unwrap();
            c.arg("-f").arg(&f);
            let r = run(&mut c);
            drop(dir);
            return r;
        }
        run(&mut c)
    };
    // Server-side dry runs of the manifest and of a customised chart. A dry
    // run creates nothing, so the Roles in the Lease namespace need that
    // namespace already (the real apply creates it first, in file order).
    let (ok, out) = kubectl(&["create", "namespace", LEASE_NS], None);
    assert!(ok, "{out}");
    let manifest = std::fs::read_to_string(root().join("deploy/margay.yaml")).unwrap();
    let (ok, out) = kubectl(&["apply", "--dry-run=server"], Some(&manifest));
    assert!(ok, "{out}");
    assert!(
        out.contains("daemonset.apps/margay-agent created (server dry run)"),
        "{out}"
    );
    let (_d, values) = custom_values();
    let (ok, out) = kubectl(
        &["apply", "--dry-run=server"],
        Some(&helm_template(&["-f", &values])),
    );
    assert!(ok, "{out}");
    // Bad input is refused by the CRD schema, not half-applied.
    let bad = "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: bad}\nspec: {cidr: 10.9.0.0/16, encapsulation: GRE}\n";
    let (ok, out) = kubectl(&["apply", "--dry-run=server"], Some(bad));
    assert!(!ok && out.contains("encapsulation"), "{out}");

    // Install for real, then run the agent as its ServiceAccount.
    let (ok, out) = kubectl(&["apply"], Some(&manifest));
    assert!(ok, "{out}");
    // One node's token writes no Lease but Margay's own: `kubectl auth
    // can-i VERB RESOURCE[/NAME] -n NS` as the agent.
    let can_in = |verb: &str, what: &str, ns: &str| {
        let mut c = api.kubectl().unwrap();
        c.args(["auth", "can-i", verb, what, "-n", ns, "--as", SA_USER]);
        run(&mut c).1.trim().to_string()
    };
    for (verb, lease, ns, want) in [
        // Not kube-system's (the scheduler's, the controller-manager's),
        // not the kubelets', not default's; none deleted anywhere.
        ("update", "leases/kube-scheduler", "kube-system", DENIED),
        (
            "update",
            "leases/kube-controller-manager",
            "kube-system",
            DENIED,
        ),
        ("get", "leases/kube-scheduler", "kube-system", DENIED),
        (
            "update",
            "leases/margay-agent-leader",
            "kube-system",
            DENIED,
        ),
        ("update", "leases/n1", "kube-node-lease", DENIED),
        ("create", "leases", "kube-system", DENIED),
        ("update", "leases", "kube-system", DENIED),
        ("watch", "leases", "kube-system", DENIED),
        ("delete", "leases", "kube-system", DENIED),
        ("create", "leases", "default", DENIED),
        ("update", "leases", "default", DENIED),
        ("create", "leases", "kube-node-lease", DENIED),
        ("delete", "leases", LEASE_NS, DENIED),
        // The older agents' leader Lease: read, by name only.
        ("get", "leases/margay-agent-leader", "kube-system", ALLOWED),
        (
            "watch",
            "leases/margay-agent-leader",
            "kube-system",
            ALLOWED,
        ),
        // Its own, in the Lease namespace: any name (the heartbeats follow
        // the nodes).
        ("create", "leases", LEASE_NS, ALLOWED),
        ("watch", "leases", LEASE_NS, ALLOWED),
        ("update", "leases/margay-agent-leader", LEASE_NS, ALLOWED),
        ("update", "leases/margay-node-n1", LEASE_NS, ALLOWED),
        ("update", "leases/margay-node-n2", LEASE_NS, ALLOWED),
    ] {
        must_be(
            &can_in(verb, lease, ns),
            want,
            &format!("{verb} {lease} -n {ns}"),
        );
    }
    let nodes: Api<KubeNode> = Api::all(admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
        )
        .await
        .unwrap();
    // An agent of the version before the Lease namespace leads: its leader
    // Lease in kube-system, renewed every second (a short duration, so the
    // new agent may take over soon after it stops).
    let legacy: Api<Lease> = Api::namespaced(admin.clone(), "kube-system");
    let old_leader = |renewed: jiff::Timestamp| -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "margay-agent-leader", "namespace": "kube-system"},
            "spec": {"holderIdentity": "old-agent", "leaseDurationSeconds": 5,
                     "renewTime": MicroTime(renewed)}
        }))
        .unwrap()
    };
    legacy
        .create(&PostParams::default(), &old_leader(jiff::Timestamp::now()))
        .await
        .unwrap();
    let renewing = {
        let legacy = legacy.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let patch = json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
                let _ = legacy
                    .patch(
                        "margay-agent-leader",
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
        })
    };
    let fabric = Fabric::new().unwrap();
    let node = fabric.add_node("n1").unwrap();
    let _relay = api.expose_in(&node.ns).unwrap();
    let dir = names::temp_dir("rbac").unwrap();
    let socket = dir.path().join("agent.sock");
    let kubeconfig = api.kubeconfig_for("margay-agent", token).unwrap();
    let mut cmd = node.ns.cmd(paths::workspace_bin("margay-agent").unwrap());
    cmd.args([
        "run",
        "--node-name",
        "n1",
        "--namespace",
        "kube-system",
        "--gc-interval",
        "2",
        "--kubeconfig",
    ])
    .arg(&kubeconfig)
    .arg("--socket")
    .arg(&socket);
    cmd.env("MARGAY_LOG_FORMAT", "json");
    let agent = margay_tests::start_agent(cmd, &socket, &dir.path().join("agent.log")).unwrap();

    // Its Leases are in the Lease namespace (the manifest's), not in
    // kube-system: the heartbeat at once; the leader Lease only once the
    // older agent's stops being renewed (read under the manifest's RBAC,
    // by name), never while it is.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), LEASE_NS);
    let holder = |l: &Lease| {
        l.spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default()
    };
    wait::until_async(
        "the heartbeat Lease, and the older leader seen",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let (leases, log) = (leases.clone(), agent.log_path().to_path_buf());
            async move {
                let hb = leases
                    .get_opt("margay-node-n1")
                    .await
                    .map_err(|e| e.to_string())?;
                let log = std::fs::read_to_string(log).unwrap_or_default();
                let deferred = log.contains(
                    "an agent of an older version leads through kube-system/margay-agent-leader",
                );
                Ok((hb.is_some_and(|l| holder(&l) == "n1") && deferred).then_some(()))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(30)));
    assert!(
        leases
            .get_opt("margay-agent-leader")
            .await
            .unwrap()
            .is_none(),
        "leads beside the older agent\n{}",
        agent.log_tail(30)
    );
    renewing.abort();
    let _ = renewing.await;
    let stopped = std::time::Instant::now();
    let l = wait::until_async(
        "the leader Lease once the older one is not renewed",
        Duration::from_secs(40),
        Duration::from_millis(200),
        || {
            let leases = leases.clone();
            async move {
                let l = leases
                    .get_opt("margay-agent-leader")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(l)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(30)));
    assert_eq!(holder(&l), "n1");
    // Not before the old record sat unchanged for its 5 s duration.
    assert!(
        stopped.elapsed() >= Duration::from_secs(4),
        "{:?}",
        stopped.elapsed()
    );
    let old = legacy.get("margay-agent-leader").await.unwrap();
    assert_eq!(holder(&old), "old-agent", "the old Lease is only read");

    // A pod: IPAM (blocks created, written) and the dataplane.
    let conflist = dir.path().join("margay.conflist");
    std::fs::write(
        &conflist,
        json!({"cniVersion": "1.0.0", "name": "margay", "plugins": [{"type": "margay", "socket": socket}]}).to_string(),
    )
    .unwrap();
    let pod = margay_harness::netns::Netns::create("rbac-pod").unwrap();
    let (ok, out) = run(margay_lab::cluster::cnitool_cmd(
        &node.ns,
        "add",
        &conflist,
        "c1",
        &pod.path(),
        &dir.path().join("cache"),
    )
    .unwrap()
    .env(
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=u1",
    ));
    assert!(ok, "{out}\n{}", agent.log_tail(30));
    assert!(out.contains("10.244."), "{out}");

    // The routing loop (node annotations and condition) and pool status.
    let pools: Api<IPPool> = Api::all(admin.clone());
    wait::until_async(
        "identity, condition and pool status",
        Duration::from_secs(40),
        Duration::from_millis(300),
        || {
            let (nodes, pools) = (nodes.clone(), pools.clone());
            async move {
                let n = nodes.get("n1").await.map_err(|e| e.to_string())?;
                let cond = margay_api::node::condition(&n, "MargayReady").is_some();
                let annotated = n
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key("margay.dev/bgp-address");
                let p = pools.get("default-ipv4").await.map_err(|e| e.to_string())?;
                let status = p.status.is_some_and(|s| !s.conditions.is_empty());
                let fin = p
                    .metadata
                    .finalizers
                    .unwrap_or_default()
                    .iter()
                    .any(|f| f == "margay.dev/ipam");
                Ok((annotated && cond && status && fin).then_some(()))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    // Leak collection ran (it lists pods) and nothing was forbidden. Not
    // a wait: a run that finds nothing logs nothing, so the window (one
    // and a half --gc-interval) is what makes it have run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(!log.to_lowercase().contains("forbidden"), "{log}");
    // Structured logs: every line is a JSON object with a level and message.
    let mut lines = 0;
    for l in log.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
        lines += 1;
    }
    assert!(lines > 3, "{log}");
    assert!(log.contains("\"start-up reconciliation done\""), "{log}");

    // What the agent does not need, it cannot do.
    let sa = margay_harness::kube::client_from(&kubeconfig)
        .await
        .unwrap();
    let can = |verb: &str, res: &str, ns: Option<&str>| {
        let mut c = api.kubectl().unwrap();
        match res.split_once('/') {
            Some((r, sub)) => c.args(["auth", "can-i", verb, r, &format!("--subresource={sub}")]),
            None => c.args(["auth", "can-i", verb, res]),
        };
        c.args(["--as", SA_USER]);
        match ns {
            Some(n) => c.args(["-n", n]),
            None => c.arg("--all-namespaces"),
        };
        run(&mut c).1.trim().to_string()
    };
    for (verb, res, ns, want) in [
        ("create", "pods", Some("default"), DENIED),
        ("delete", "nodes", None, DENIED),
        ("get", "secrets", Some("default"), DENIED),
        ("list", "secrets", Some("kube-system"), DENIED),
        ("get", "configmaps", Some("kube-system"), DENIED),
        ("create", "ippools.margay.dev", None, DENIED),
        ("delete", "ippools.margay.dev", None, DENIED),
        ("update", "ippools.margay.dev", None, DENIED),
        ("update", "bgppeers.margay.dev", None, DENIED),
        ("update", "nodes/status", None, DENIED),
        ("delete", "ipamconfigurations.margay.dev", None, DENIED),
        ("create", "clusterrolebindings", None, DENIED),
        ("patch", "nodes", None, ALLOWED),
        ("create", "ipamblocks.margay.dev", None, ALLOWED),
        ("get", "secrets", Some("kube-system"), DENIED),
        ("patch", "bgppeers.margay.dev/status", None, ALLOWED),
        ("patch", "nodes/status", None, ALLOWED),
        ("create", "leases.coordination.k8s.io", None, DENIED),
        ("watch", "secrets", Some("kube-system"), DENIED),
    ] {
        must_be(&can(verb, res, ns), want, &format!("{verb} {res} {ns:?}"));
    }
    // And for real, with its own token.
    let napi: Api<KubeNode> = Api::all(sa.clone());
    let e = napi.delete("n1", &Default::default()).await.unwrap_err();
    assert!(e.to_string().contains("forbidden"), "{e}");
    let stolen: Api<Lease> = Api::namespaced(sa.clone(), "kube-system");
    let mut scheduler = old_leader(jiff::Timestamp::now());
    scheduler.metadata.name = Some("kube-scheduler".into());
    let e = stolen
        .create(&PostParams::default(), &scheduler)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("forbidden"), "{e}");
    let e = stolen
        .replace("margay-agent-leader", &PostParams::default(), &old)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("forbidden"), "{e}");

    // A password Secret the chart does not name (it is not in
    // bgp.passwordSecrets) cannot be read at all: the peering is left out
    // and the Node says how to fix it. Granted `get` by name only (no
    // watch), it is read by name every resync period and used.
    margay_tests::create_password_peer(&admin, "pw-peer", "10.99.0.250", 65010, "bgp-pw").await;
    // Waits until n1's MargayReady message satisfies `ok`.
    let message = |what: &'static str, ok: fn(&str) -> bool| {
        let nodes = nodes.clone();
        let log = dir.path().join("agent.log");
        async move {
            wait::until_async(
                what,
                Duration::from_secs(60),
                Duration::from_millis(300),
                || {
                    let nodes = nodes.clone();
                    async move {
                        let n = nodes.get("n1").await.map_err(|e| e.to_string())?;
                        let m = margay_api::node::condition(&n, "MargayReady")
                            .and_then(|c| c.message.clone())
                            .unwrap_or_default();
                        Ok(ok(&m).then_some(()))
                    }
                },
            )
            .await
            .unwrap_or_else(|e| {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                panic!(
                    "{e}\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                )
            });
        }
    };
    message("the unreadable password Secret on the Node", |m| {
        m.contains("RBAC forbids reading Secret kube-system/bgp-pw")
            && m.contains("bgp.passwordSecrets")
    })
    .await;
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("reading it by name every"), "{log}");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), "kube-system");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "bgp-pw"}, "stringData": {"pw": "s3cret"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let grant = json!([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "bgp-pw-reader", "namespace": "kube-system"},
         "rules": [{"apiGroups": [""], "resources": ["secrets"],
                    "resourceNames": ["bgp-pw"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "bgp-pw-reader", "namespace": "kube-system"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bgp-pw-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "margay-agent", "namespace": "kube-system"}]}
    ]);
    let grant_file = dir.path().join("grant.json");
    std::fs::write(
        &grant_file,
        json!({"apiVersion": "v1", "kind": "List", "items": grant}).to_string(),
    )
    .unwrap();
    let mut apply = api.kubectl().unwrap();
    apply.args(["apply", "-f"]).arg(&grant_file);
    assert!(run(&mut apply).0, "granting get on bgp-pw");
    assert_eq!(
        can("get", "secrets", Some("kube-system")),
        DENIED,
        "only by name"
    );
    message("the password found (one resync period)", |m| {
        !m.contains("bgp-pw")
    })
    .await;
}
