//! Self-tests of the harness: each real part works, and nothing is left behind.

use std::time::Duration;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use margay_harness::bgpd::{Bird, Exabgp, Frr, Gobgp, exabgp_conf, gobgp_conf};
use margay_harness::{Fabric, Netns, Node, kube::ApiServer, wait};

const T: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);

fn bird_node_conf(me: &str, peer: &str, block: &str) -> String {
    format!(
        r#"log stderr all;
router id {me};
protocol device {{ scan time 10; }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}
protocol static blocks {{ ipv4; route {block} blackhole; }}
protocol bgp peer {{
  local {me} as 64512; neighbor {peer} as 64512; direct;
  hold time 9; keepalive time 3;
  ipv4 {{ import all; export where proto = "blocks"; next hop self; }};
}}
"#
    )
}

#[tokio::test]
async fn apiserver_answers_and_accepts_a_crd_and_an_object() {
    let api = ApiServer::start().await.expect("apiserver");
    let client = api.client().await.expect("client");
    let ver = client.apiserver_version().await.expect("version");
    assert_eq!((ver.major.as_str(), ver.minor.as_str()), ("1", "20"));

    let crd = r#"{
      "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
      "metadata": {"name": "widgets.selftest.margay.dev"},
      "spec": {"group": "selftest.margay.dev", "scope": "Cluster",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{"name": "v1", "served": true, "storage": true,
          "schema": {"openAPIV3Schema": {"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}}}]}}"#;
    let mut kubectl = api.kubectl().expect("kubectl");
    let dir = api.dir().to_owned();
    std::fs::write(dir.join("crd.json"), crd).unwrap();
    let out = kubectl
        .args(["apply", "-f"])
        .arg(dir.join("crd.json"))
        .output()
        .unwrap();
    margay_tests::assert_ran(&out, "");

    let gvk = GroupVersionKind::gvk("selftest.margay.dev", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "selftest.margay.dev/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 7}
    }))
    .unwrap();
    // The CRD takes a moment to be served after it is created.
    let created = wait::until_async("widget create", T, POLL, || {
        let widgets = widgets.clone();
        let obj = obj.clone();
        async move {
            match widgets.create(&PostParams::default(), &obj).await {
                Ok(o) => Ok(Some(o)),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
    .expect("create widget");
    assert!(created.metadata.resource_version.is_some());
    let got = widgets.get("w1").await.expect("get widget");
    assert_eq!(got.data["spec"]["size"], 7);
}

#[test]
fn two_nodes_ping_each_other_through_the_fabric() {
    let fabric = Fabric::new().expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");
    a.ns.ping_ok(&b.v4.to_string()).expect("v4 a->b");
    b.ns.ping_ok(&a.v4.to_string()).expect("v4 b->a");
    a.ns.ping_ok(&b.v6.to_string()).expect("v6 a->b");
    // The fabric router answers too (nodes use it as default gateway).
    a.ns.ping_ok("10.99.0.254").expect("gateway");
}

/// A fabric of two nodes named `a` and `b` (the fabric is kept for its
/// Drop).
fn two_nodes(a: &str, b: &str) -> (Fabric, Node, Node) {
    let fabric = Fabric::new().expect("fabric");
    let a = fabric.add_node(a).expect("node a");
    let b = fabric.add_node(b).expect("node b");
    (fabric, a, b)
}

/// Waits for `node`'s IPv4 kernel route to `prefix`; its line.
fn kernel_route(node: &Node, what: &str, prefix: &str) -> margay_harness::Result<String> {
    wait::until(what, T, POLL, || {
        Ok(node
            .routes_v4()?
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned))
    })
}

#[test]
fn bird_and_gobgp_exchange_a_route_into_birds_kernel() {
    let (_fabric, a, b) = two_nodes("bird", "gobgp");
    let bird = Bird::start(
        &a.ns,
        &bird_node_conf("10.99.0.1", "10.99.0.2", "10.244.1.0/26"),
    )
    .expect("bird");
    let gobgp =
        Gobgp::start(&b.ns, &gobgp_conf(64512, "10.99.0.2", "10.99.0.1", 64512)).expect("gobgp");
    gobgp
        .gobgp(&["global", "rib", "add", "10.244.3.0/26", "-a", "ipv4"])
        .expect("originate");
    wait::until("BIRD session established", T, POLL, || {
        Ok(bird.established("peer").then_some(()))
    })
    .expect("session");
    let route = kernel_route(&a, "GoBGP's route in BIRD's kernel table", "10.244.3.0/26")
        .expect("kernel route");
    assert!(
        route.contains("via 10.99.0.2") && route.contains("proto bird"),
        "{route}"
    );
    // And BIRD's block reached GoBGP.
    wait::until("BIRD's block in GoBGP's RIB", T, POLL, || {
        let rib = gobgp.gobgp(&["global", "rib"]).map_err(|e| e.to_string())?;
        Ok(rib.contains("10.244.1.0/26").then_some(()))
    })
    .expect("gobgp rib");
}

#[test]
fn frr_with_zebra_installs_a_route_learned_from_exabgp() {
    let (_fabric, a, b) = two_nodes("frr", "exa");
    let frr = Frr::start(
        &a.ns,
        r#"frr defaults traditional
hostname frrA
router bgp 64512
 bgp router-id 10.99.0.1
 no bgp ebgp-requires-policy
 neighbor 10.99.0.2 remote-as 64513
 neighbor 10.99.0.2 timers 3 9
!
"#,
        true,
    )
    .expect("frr");
    let exa =
        Exabgp::start(&b.ns, &exabgp_conf("10.99.0.2", 64513, "10.99.0.1", 64512)).expect("exabgp");
    exa.command("announce route 10.244.7.0/26 next-hop self")
        .expect("announce");
    let route = kernel_route(&a, "ExaBGP's route in FRR's kernel table", "10.244.7.0/26")
        .unwrap_or_else(|e| panic!("{e}\nfrr: {:?}", frr.vtysh("show bgp summary")));
    assert!(
        route.contains("via 10.99.0.2") && route.contains("proto bgp"),
        "{route}"
    );
    assert!(
        exa.received().iter().any(|e| e["type"] == "state"),
        "ExaBGP reported no state event"
    );
}

/// Everything a test builds is gone after it panics: namespaces, the
/// processes inside them and their temp dirs.
#[test]
fn a_failing_test_leaves_nothing_behind() {
    let mut seen = (String::new(), None, std::path::PathBuf::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let fabric = Fabric::new().unwrap();
        let a = fabric.add_node("leak").unwrap();
        let mut bird = Bird::start(
            &a.ns,
            &bird_node_conf("10.99.0.1", "10.99.0.2", "10.244.1.0/26"),
        )
        .unwrap();
        // A stray process the test forgot about, inside the node namespace.
        let stray = a.ns.cmd("sleep").arg("600").spawn().unwrap();
        seen = (a.ns.name().to_owned(), Some(stray), bird.dir().to_owned());
        assert!(bird.daemon().is_running());
        panic!("the test fails here");
    }));
    assert!(result.is_err());
    let (ns, stray, dir) = seen;
    assert!(
        !std::path::Path::new("/run/netns").join(&ns).exists(),
        "{ns} left"
    );
    // The stray was killed by the namespace's teardown: it has already exited.
    let mut stray: std::process::Child = stray.expect("stray started");
    let status = stray.try_wait().expect("try_wait");
    assert!(status.is_some(), "stray process still running");
    assert!(!dir.exists(), "{} left", dir.display());
}

/// What a SIGKILLed owner leaves is swept by the next harness user.
#[test]
fn leftovers_of_a_dead_owner_are_swept() {
    // A short-lived child gives us a PID that is certainly dead afterwards.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let name = format!("mg{dead}-orphan0");
    let out = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    assert!(out.status.success());
    let _keep = Netns::create("x").unwrap(); // our own: must survive the sweep
    margay_harness::names::sweep_stale();
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
    assert!(_keep.path().exists());
}
