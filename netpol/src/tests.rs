//! The engine against watch events and attachments: what it loads and
//! when, what it answers a waiting ADD.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use margay_api::slice::MargayEndpointSlice;
use margay_policy::PodKey;
use margay_policy::model::Key;

use super::*;

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: Option<&str>) -> core::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
        "status": ip.map_or(serde_json::json!({"phase": "Pending"}), |ip| serde_json::json!({"phase": "Running", "podIP": ip}))
    }))
    .unwrap()
}

/// An engine that has listed namespaces x and y, no pods and a deny-all
/// policy in `ns`, and loaded what that made.
fn loaded_with_deny_all_in(policy_ns: &str) -> Engine {
    let mut e = Engine::new();
    list_all(
        &mut e,
        vec![],
        vec![ns("x"), ns("y")],
        vec![deny_all(policy_ns)],
    );
    e.take_script();
    e.loaded(true);
    e
}

/// A running pod labelled app=`app`, at `ip`.
fn running_app(ns: &str, name: &str, app: &str, ip: &str) -> core::Pod {
    pod(ns, name, &[("app", app)], Some(ip))
}

fn ns(name: &str) -> core::Namespace {
    serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
}

fn deny_all(ns: &str) -> net::NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": "deny"},
        "spec": {"podSelector": {}}
    }))
    .unwrap()
}

fn list_all(
    e: &mut Engine,
    pods: Vec<core::Pod>,
    nss: Vec<core::Namespace>,
    pols: Vec<net::NetworkPolicy>,
) {
    e.pod_event(Event::Init);
    for p in pods {
        e.pod_event(Event::InitApply(p));
    }
    e.pod_event(Event::InitDone);
    e.namespace_event(Event::Init);
    for n in nss {
        e.namespace_event(Event::InitApply(n));
    }
    e.namespace_event(Event::InitDone);
    e.policy_event(Event::Init);
    for p in pols {
        e.policy_event(Event::InitApply(p));
    }
    e.policy_event(Event::InitDone);
}

/// Everything listed: pod x/a (10.0.0.1) in namespace x under a
/// deny-all.
fn a_denied() -> Engine {
    let mut e = Engine::new();
    list_all(
        &mut e,
        vec![pod("x", "a", &[], Some("10.0.0.1"))],
        vec![ns("x")],
        vec![deny_all("x")],
    );
    e
}

#[test]
fn nothing_is_written_until_every_kind_is_listed_then_the_whole_table() {
    let mut e = Engine::new();
    e.pod_event(Event::Init);
    e.pod_event(Event::InitApply(pod("x", "a", &[], Some("10.0.0.1"))));
    e.pod_event(Event::InitDone);
    e.namespace_event(Event::Init);
    e.namespace_event(Event::InitDone);
    assert_eq!(e.take_script(), None, "NetworkPolicies not listed");
    assert_eq!(e.waiting_for(), ["NetworkPolicies"]);
    e.policy_event(Event::Init);
    e.policy_event(Event::InitApply(deny_all("x")));
    e.policy_event(Event::InitDone);
    take_whole_table(&mut e);
    e.loaded(true);
    assert_eq!(e.take_script(), None);
}

/// The ADD of x/a on cali1 (10.0.0.1).
/// Whether `script` adds or deletes (`verb`) interface cali1 in a set
/// whose name starts with `set`.
fn dispatched(script: &str, verb: &str, set: &str) -> bool {
    dispatched_if(script, verb, set, "cali1")
}

/// Whether `script` adds or deletes (`verb`) interface `i` in a set
/// whose name starts with `set`.
fn dispatched_if(script: &str, verb: &str, set: &str, i: &str) -> bool {
    script.lines().any(|l| {
        l.starts_with(&format!("{verb} element inet margay_policy {set}"))
            && l.ends_with(&format!("{{ \"{i}\" }}"))
    })
}

fn add_cali1(e: &mut Engine) -> PodKey {
    let key = Key::new("x", "a");
    e.endpoint_added(ep(Some(&key), "cali1", "10.0.0.1"));
    key
}

#[test]
fn an_add_is_programmed_once_its_pod_is_known_and_the_delta_loaded() {
    let mut e = Engine::new();
    list_all(&mut e, vec![], vec![ns("x")], vec![deny_all("x")]);
    assert!(e.take_script().is_some());
    e.loaded(true);
    // The ADD comes before the watch shows the Pod with its labels.
    let key = add_cali1(&mut e);
    assert!(!e.programmed("cali1"));
    assert!(e.why_not(&key).contains("not seen"), "{}", e.why_not(&key));
    // The Pod, without an address yet (the kubelet writes it later).
    e.pod_event(Event::Apply(pod("x", "a", &[("app", "a")], None)));
    assert!(!e.programmed("cali1"));
    let s = e.take_script().unwrap();
    assert!(dispatched(&s, "add", "if-in/"), "{s}");
    e.loaded(true);
    assert!(e.programmed("cali1"));
    // Its address from the ADD is in the world.
    assert_eq!(
        e.compiler().world().pods[&key].ips,
        vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
    );
    // Deleted: out of the map.
    e.endpoint_deleted("cali1");
    let s = e.take_script().unwrap();
    assert!(
        dispatched(&s, "delete", "if-in/") || s.contains("delete set inet margay_policy if-in/"),
        "{s}"
    );
}

/// A Pod the API schedules here has its rules ready before its ADD:
/// the ADD is set elements only (netlink, not nft).
#[test]
fn a_pod_scheduled_here_makes_its_add_elements_only() {
    let mut e = Engine::on_node("node1");
    list_all(&mut e, vec![], vec![ns("x")], vec![deny_all("x")]);
    assert!(e.take_load().is_some());
    e.loaded(true);
    // Scheduled (nodeName node1), no address yet: chains made now.
    e.pod_event(Event::Apply(pod("x", "a", &[("app", "a")], None)));
    let Some(Load::Batch(b)) = e.take_load() else {
        panic!("the policy and endpoint chains are a delta");
    };
    let s = b.script();
    assert!(!b.elements_only());
    assert!(s.contains("add chain inet margay_policy ep-in/"), "{s}");
    assert!(!s.contains("cali"), "no interface yet: {s}");
    e.loaded(true);
    add_cali1(&mut e);
    let Some(Load::Batch(d)) = e.take_load() else {
        panic!("the ADD is a delta");
    };
    assert!(d.elements_only(), "the ADD is elements only: {d:?}");
    assert!(dispatched(&d.script(), "add", "if-in/"), "{}", d.script());
    e.loaded(true);
    assert!(e.programmed("cali1"));
    // Another node's Pod prepares nothing.
    let mut other = pod("x", "b", &[("app", "a")], None);
    other.spec.as_mut().unwrap().node_name = Some("node2".into());
    e.pod_event(Event::Apply(other));
    assert_eq!(e.take_load(), None);
}

#[test]
fn an_unknown_pod_in_a_namespace_without_policies_needs_no_read() {
    let mut e = loaded_with_deny_all_in("x");
    let (kx, ky) = (Key::new("x", "a"), Key::new("y", "a"));
    assert!(!e.namespace_has_no_policy(&kx));
    assert!(e.namespace_has_no_policy(&ky));
    e.endpoint_added(ep(Some(&ky), "cali2", "10.0.0.2"));
    e.unresolved(&ky);
    let s = e.take_script().unwrap();
    assert!(!s.contains("if-in/drop"), "open: {s}");
    assert!(
        s.contains("src/4 { \"cali2\" . 10.0.0.2 }"),
        "its sources: {s}"
    );
    e.loaded(true);
    assert!(e.programmed("cali2"));
    // A policy comes to its namespace while its Pod is still unknown:
    // quarantined, not open.
    e.policy_event(Event::Apply(deny_all("y")));
    let s = e.take_script().unwrap();
    assert!(dispatched_if(&s, "add", "if-in/drop", "cali2"), "{s}");
    e.loaded(true);
    // The Pod shows up later with labels: handled like any change.
    e.pod_event(Event::Apply(running_app("y", "a", "a", "10.0.0.2")));
    assert!(e.knows_pod(&ky));
    let s = e.take_script().unwrap();
    assert!(dispatched_if(&s, "delete", "if-in/drop", "cali2"), "{s}");
}

fn on(p: core::Pod, node: &str) -> core::Pod {
    let mut p = p;
    p.spec.as_mut().unwrap().node_name = Some(node.into());
    p
}

/// Other nodes' Pods count only while a policy has pod peers: their
/// watch is wanted then, nothing is loaded until it has listed, and
/// they are forgotten when it stops. This node's watch speaks for
/// its own Pods whatever the other says.
fn slice(name: &str, node: &str, eps: &[(&str, &str, &str)]) -> MargayEndpointSlice {
    MargayEndpointSlice::new(
        name,
        margay_api::slice::MargayEndpointSliceSpec {
            node: node.into(),
            endpoints: eps
                .iter()
                .map(|(n, app, ip)| margay_api::slice::SliceEndpoint {
                    namespace: "x".into(),
                    name: (*n).into(),
                    labels: [("app".to_string(), (*app).to_string())].into(),
                    addresses: vec![(*ip).into()],
                    ports: vec![],
                })
                .collect(),
        },
    )
}

/// Node1's engine, everything listed: its pod `x/a`, and a policy of
/// `x` allowing pods labelled `app=b` in (a pod peer: remote pods
/// needed).
fn with_a_policy_from_b() -> Engine {
    let mut e = Engine::on_node("node1");
    list_all(
        &mut e,
        vec![pod("x", "a", &[], Some("10.0.0.1"))],
        vec![ns("x")],
        vec![],
    );
    let from_b: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "from-b"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}
    }))
    .unwrap();
    e.policy_event(Event::Apply(from_b));
    e
}

#[test]
fn remote_pods_come_from_the_other_nodes_slices() {
    let mut e = with_a_policy_from_b();
    let _ = e.take_load();
    e.loaded(true);
    assert!(e.needs_remote_pods());
    e.remote_pods(true);
    assert_eq!(e.take_load(), None, "no peer set loaded half full");
    e.slice_event(Event::Init);
    e.slice_event(Event::InitApply(slice(
        "node2.0",
        "node2",
        &[("r", "b", "10.0.0.9"), ("s", "b", "10.0.0.10")],
    )));
    // This node's own slice: its Pod watch speaks for those.
    e.slice_event(Event::InitApply(slice(
        "node1.0",
        "node1",
        &[("a", "b", "10.0.0.1")],
    )));
    e.slice_event(Event::InitDone);
    assert!(e.listed());
    let world = e.compiler().world();
    assert_eq!(
        world.pods[&Key::new("x", "r")].node.as_deref(),
        Some("node2")
    );
    assert!(world.pods.contains_key(&Key::new("x", "s")));
    assert!(
        world.pods[&Key::new("x", "a")].labels.is_empty(),
        "local labels kept"
    );
    let script = e.take_load().unwrap().script();
    assert!(
        script.contains("10.0.0.9") && script.contains("10.0.0.10"),
        "{script}"
    );
    e.loaded(true);
    // s moves to another slice of node2, then its old slice drops it:
    // it stays; r leaves: it goes.
    e.slice_event(Event::Apply(slice(
        "node2.1",
        "node2",
        &[("s", "b", "10.0.0.10")],
    )));
    e.slice_event(Event::Apply(slice("node2.0", "node2", &[])));
    let world = e.compiler().world();
    assert!(!world.pods.contains_key(&Key::new("x", "r")));
    assert!(world.pods.contains_key(&Key::new("x", "s")));
    // A relabel is one element change.
    e.slice_event(Event::Apply(slice(
        "node2.1",
        "node2",
        &[("s", "c", "10.0.0.10")],
    )));
    let Some(Load::Batch(b)) = e.take_load() else {
        panic!("a delta")
    };
    assert!(b.script().contains("10.0.0.10"));
    e.loaded(true);
    // The slice is deleted (its node went): its pods go.
    e.slice_event(Event::Delete(slice("node2.1", "node2", &[])));
    assert!(!e.compiler().world().pods.contains_key(&Key::new("x", "s")));
    // A relist without a slice seen before drops its pods, not before.
    e.slice_event(Event::Apply(slice(
        "node3.0",
        "node3",
        &[("t", "b", "10.0.0.11")],
    )));
    e.slice_event(Event::Init);
    assert!(e.compiler().world().pods.contains_key(&Key::new("x", "t")));
    e.slice_event(Event::InitDone);
    assert!(!e.compiler().world().pods.contains_key(&Key::new("x", "t")));
}

/// A remote pod is kept once: its labels, addresses and ports in the
/// compiler's world only (the engine holds its key and slice), its
/// label set and namespace shared with the pods labelled alike.
#[test]
fn a_remote_pod_is_kept_once_its_labels_shared() {
    let mut e = with_a_policy_from_b();
    e.remote_pods(true);
    e.slice_event(Event::Init);
    e.slice_event(Event::InitApply(slice(
        "node2.0",
        "node2",
        &[("r", "b", "10.0.0.9"), ("s", "b", "10.0.0.10")],
    )));
    e.slice_event(Event::InitDone);
    e.slice_event(Event::Apply(slice(
        "node3.0",
        "node3",
        &[("t", "b", "10.0.0.11")],
    )));
    let (r, s, t) = (Key::new("x", "r"), Key::new("x", "s"), Key::new("x", "t"));
    for k in [&r, &s, &t] {
        assert!(!e.pods.contains_key(k), "{k}: not in this node's Pods");
        assert!(!e.departed.contains_key(k));
        assert!(e.remote_pods.contains_key(k));
    }
    assert_eq!(&*e.remote_pods[&t], "node3.0");
    let world = &e.compiler().world().pods;
    assert!(Arc::ptr_eq(&world[&r].labels, &world[&t].labels));
    // Held by the three pods in the world and the interner: a copy
    // anywhere else (the engine's record of a pod) would count.
    assert_eq!(Arc::strong_count(&world[&r].labels), 4);
    let keys: Vec<&PodKey> = world.keys().filter(|k| k.name != "a".into()).collect();
    assert!(Arc::ptr_eq(&keys[0].namespace, &keys[2].namespace));
    // Forgotten when remote pods are no longer watched.
    e.remote_pods(false);
    assert!(e.remote_pods.is_empty());
    assert_eq!(e.compiler().world().pods.len(), 1);
}

#[test]
fn remote_pods_are_needed_only_for_pod_peers() {
    let mut e = Engine::on_node("node1");
    list_all(
        &mut e,
        vec![pod("x", "a", &[], Some("10.0.0.1"))],
        vec![ns("x")],
        vec![deny_all("x")],
    );
    assert!(!e.needs_remote_pods(), "deny-all names no pods");
    assert!(e.listed());
    assert!(e.take_load().is_some());
    e.loaded(true);
    // A remote event while none is watched: ignored.
    e.pod_event_in(
        Scope::Remote,
        Event::Apply(on(
            pod("x", "r", &[("app", "b")], Some("10.0.0.9")),
            "node2",
        )),
    );
    assert!(!e.compiler().world().pods.contains_key(&Key::new("x", "r")));
    let from_b: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "from-b"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}
    }))
    .unwrap();
    e.policy_event(Event::Apply(from_b.clone()));
    assert!(e.needs_remote_pods());
    e.remote_pods(true);
    assert!(!e.listed() && e.waiting_for() == ["remote Pods"]);
    assert_eq!(e.take_load(), None, "no peer set loaded half full");
    e.pod_event_in(Scope::Remote, Event::Init);
    e.pod_event_in(
        Scope::Remote,
        Event::InitApply(on(
            pod("x", "r", &[("app", "b")], Some("10.0.0.9")),
            "node2",
        )),
    );
    // Without an address, or of this node: not kept from this watch.
    e.pod_event_in(
        Scope::Remote,
        Event::InitApply(on(pod("x", "p", &[("app", "b")], None), "node2")),
    );
    e.pod_event_in(
        Scope::Remote,
        Event::InitApply(pod("x", "a", &[("app", "b")], Some("10.0.0.1"))),
    );
    e.pod_event_in(Scope::Remote, Event::InitDone);
    assert!(e.listed());
    let world = e.compiler().world();
    assert!(world.pods.contains_key(&Key::new("x", "r")));
    assert!(!world.pods.contains_key(&Key::new("x", "p")));
    assert!(
        world.pods[&Key::new("x", "a")].labels.is_empty(),
        "local labels kept"
    );
    let Some(load) = e.take_load() else {
        panic!("nothing loaded")
    };
    assert!(load.script().contains("10.0.0.9"), "{}", load.script());
    e.loaded(true);
    // The remote watch's delete of a local pod (it was briefly
    // unscheduled) does not remove it.
    e.pod_event_in(
        Scope::Remote,
        Event::Delete(pod("x", "a", &[], Some("10.0.0.1"))),
    );
    assert!(e.compiler().world().pods.contains_key(&Key::new("x", "a")));
    // A local relist does not drop remote pods.
    e.pod_event_in(Scope::Local, Event::Init);
    e.pod_event_in(
        Scope::Local,
        Event::InitApply(pod("x", "a", &[], Some("10.0.0.1"))),
    );
    e.pod_event_in(Scope::Local, Event::InitDone);
    assert!(e.compiler().world().pods.contains_key(&Key::new("x", "r")));
    let _ = e.take_load();
    e.loaded(true);
    // The policy goes, the watch stops: remote pods forgotten, local kept.
    e.policy_event(Event::Delete(from_b));
    assert!(!e.needs_remote_pods());
    e.remote_pods(false);
    assert!(e.listed());
    let world = e.compiler().world();
    assert!(!world.pods.contains_key(&Key::new("x", "r")));
    assert!(world.pods.contains_key(&Key::new("x", "a")));
}

#[test]
fn a_remote_pods_label_is_elements_only_a_policy_is_chains_one_batch() {
    let mut e = Engine::new();
    let from_b: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "from-b"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}
    }))
    .unwrap();
    list_all(
        &mut e,
        vec![
            pod("x", "a", &[], Some("10.0.0.1")),
            pod("x", "r", &[], Some("10.0.0.9")),
        ],
        vec![ns("x")],
        vec![from_b],
    );
    e.endpoint_added(ep(Some(&Key::new("x", "a")), "cali1", "10.0.0.1"));
    assert!(matches!(e.take_load(), Some(Load::Script(_))), "first load");
    e.loaded(true);
    // The remote pod becomes app=b: an element of the peer set.
    e.pod_event(Event::Apply(running_app("x", "r", "b", "10.0.0.9")));
    let Some(Load::Batch(d)) = e.take_load() else {
        panic!("not a delta")
    };
    assert!(d.elements_only());
    let s = d.script();
    assert!(
        s.starts_with("add element inet margay_policy peer/")
            && s.ends_with(".p4 { 10.0.0.9 }\n")
            && s.lines().count() == 1,
        "{s}"
    );
    e.loaded(true);
    // A second policy: chains.
    e.policy_event(Event::Apply(deny_all("x")));
    assert!(matches!(e.take_load(), Some(Load::Batch(b)) if !b.elements_only()));
    e.loaded(true);
    // Elements, then a chain change: one batch, in that order.
    e.pod_event(Event::Apply(pod("x", "r", &[], Some("10.0.0.9"))));
    e.policy_event(Event::Delete(deny_all("x")));
    let Some(Load::Batch(b)) = e.take_load() else {
        panic!("mixed changes not one batch")
    };
    let s = b.script();
    assert!(
        s.contains("delete element inet margay_policy peer/") && s.contains(".p4 { 10.0.0.9 }"),
        "{s}"
    );
    assert_eq!(e.take_load(), None);
}

#[test]
fn a_relist_deletes_what_it_no_longer_has_and_a_failure_reloads_everything() {
    let mut e = a_denied();
    e.endpoint_added(ep(Some(&Key::new("x", "a")), "cali1", "10.0.0.1"));
    e.take_script();
    e.loaded(true);
    assert!(!e.compiler().table().chains.is_empty());
    // The watch broke and lists again: the policy is gone.
    e.policy_event(Event::Init);
    assert!(
        !e.compiler().table().chains.is_empty(),
        "kept until the list completes"
    );
    e.policy_event(Event::InitDone);
    let s = e.take_script().unwrap();
    assert!(
        s.contains("delete chain inet margay_policy in/x/deny"),
        "{s}"
    );
    e.loaded(false);
    take_whole_table(&mut e);
}

#[test]
fn an_unreadable_pod_is_quarantined_until_its_labels_are_known() {
    let mut e = loaded_with_deny_all_in("y");
    // In a namespace without policies, an unreadable pod is open.
    let free = Key::new("x", "free");
    e.endpoint_added(ep(Some(&free), "cali9", "10.0.0.9"));
    e.unresolved(&free);
    let s = e.take_script().unwrap();
    assert!(!s.contains("drop"), "open: {s}");
    e.loaded(true);
    assert!(e.programmed("cali9"));
    let key = Key::new("y", "a");
    e.endpoint_added(ep(Some(&key), "cali1", "10.0.0.1"));
    assert!(!e.programmed("cali1"));
    e.unresolved(&key);
    let s = e.take_script().unwrap();
    assert!(dispatched(&s, "add", "if-in/drop"), "{s}");
    assert!(dispatched(&s, "add", "if-out/drop"), "{s}");
    e.loaded(true);
    assert!(e.programmed("cali1"));
    // Known, with labels the deny-all selects: its endpoint rules.
    e.pod_event(Event::Apply(pod("y", "a", &[], None)));
    let s = e.take_script().unwrap();
    assert!(dispatched(&s, "add", "if-in/"), "{s}");
    assert!(dispatched(&s, "delete", "if-in/drop"), "{s}");
    assert!(dispatched(&s, "delete", "if-out/drop"), "{s}");
    e.loaded(true);
    assert!(
        e.compiler().table().egress.is_empty(),
        "deny-all is ingress only"
    );
    // A Pod the API does not have, in a namespace with a policy:
    // quarantined (it may be a force-deleted Pod's sandbox).
    let other = Key::new("y", "nope");
    e.endpoint_added(ep(Some(&other), "cali2", "10.0.0.2"));
    assert!(!e.programmed("cali2"));
    e.unresolved(&other);
    let s = e.take_script().unwrap();
    assert!(dispatched_if(&s, "add", "if-in/drop", "cali2"), "{s}");
    e.loaded(true);
    assert!(e.programmed("cali2"));
    // A container that is no Pod: its sources only, answered.
    e.endpoint_added(ep(None, "cali3", "10.0.0.3"));
    let s = e.take_script().unwrap();
    assert!(!s.contains("drop"), "{s}");
    e.loaded(true);
    assert!(e.programmed("cali3"));
}

/// A policy that cannot be enforced as written is enforced fail
/// closed (its pods isolated by it, nothing allowed), whatever this
/// agent saw before, so every node agrees; and reported.
#[test]
fn an_unenforceable_policy_isolates_its_pods_with_nothing_allowed() {
    let mut e = Engine::new();
    let allow_all: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "deny"},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{}]}
    }))
    .unwrap();
    list_all(&mut e, vec![], vec![ns("x")], vec![allow_all.clone()]);
    let k = Key::new("x", "deny");
    let ingress_rules = |e: &Engine| {
        e.compiler().world().policies[&k]
            .ingress
            .as_ref()
            .unwrap()
            .len()
    };
    assert_eq!(ingress_rules(&e), 1);
    let mut bad = allow_all.clone();
    bad.spec.as_mut().unwrap().policy_types = Some(vec!["Sideways".into()]);
    e.policy_event(Event::Apply(bad.clone()));
    let p = &e.compiler().world().policies[&k];
    assert_eq!(p.ingress, Some(vec![]), "nothing allowed in");
    assert_eq!(p.egress, Some(vec![]), "nor out");
    assert!(
        p.selector
            .matches(&[("app".to_string(), "a".to_string())].into())
    );
    assert!(!p.selector.matches(&BTreeMap::new()), "its own selector");
    assert!(
        matches!(&e.invalid()[&k].0, Unenforced::Refused(m) if m.to_string().contains("Sideways"))
    );
    // Too large: the same, with its cost.
    let mut big = allow_all.clone();
    big.spec.as_mut().unwrap().ingress = Some(vec![serde_json::from_value(serde_json::json!({
        "from": (0..3000).map(|i| serde_json::json!({"ipBlock": {"cidr": format!("192.168.{}.{}/32", i / 256, i % 256)}})).collect::<Vec<_>>(),
        "ports": (0..3000).map(|i| serde_json::json!({"port": 1000 + i})).collect::<Vec<_>>(),
    }))
    .unwrap()]);
    e.policy_event(Event::Apply(big));
    assert_eq!(e.compiler().world().policies[&k].ingress, Some(vec![]));
    assert!(
        matches!(e.invalid()[&k].0, Unenforced::TooLarge { cost, .. } if cost > margay_policy::enforce::MAX_POLICY_COST)
    );
    let st = e.status(true);
    assert_eq!(st.unenforced.len(), 1);
    assert_eq!(
        st.unenforced[0].reason,
        margay_api::status::UnenforcedReason::TooLarge
    );
    // Fixed: enforced as written again.
    e.policy_event(Event::Apply(allow_all.clone()));
    assert!(e.invalid().is_empty());
    assert_eq!(ingress_rules(&e), 1);
    e.policy_event(Event::Delete(bad));
    assert!(e.compiler().world().policies.is_empty());
    assert!(e.invalid().is_empty());
}

fn ep(pod: Option<&PodKey>, host_if: &str, ip: &str) -> Endpoint {
    Endpoint {
        pod: pod.cloned(),
        host_if: host_if.into(),
        ips: vec![ip.parse().unwrap()],
    }
}

/// Two attachments of one pod are each enforced, and each DEL takes
/// only its own interface out.
#[test]
fn each_attachment_is_an_endpoint_and_each_del_its_own() {
    let mut e = a_denied();
    e.take_script();
    e.loaded(true);
    let k = Key::new("x", "a");
    e.endpoint_added(ep(Some(&k), "cali1", "10.0.0.1"));
    e.endpoint_added(ep(Some(&k), "cali2", "10.1.0.1"));
    let t = e.compiler().table();
    assert!(t.ingress.contains_key("cali1") && t.ingress.contains_key("cali2"));
    assert!(e.take_script().is_some());
    e.loaded(true);
    assert!(e.programmed("cali1") && e.programmed("cali2"));
    // Both addresses are the pod's (peers of others see both).
    assert_eq!(e.compiler().world().pods[&k].ips.len(), 2);
    e.endpoint_deleted("cali1");
    let s = e.take_script().unwrap();
    assert!(dispatched_if(&s, "delete", "if-in/", "cali1"), "{s}");
    assert!(!s.contains("cali2"), "the other is left alone: {s}");
    assert!(
        s.contains("delete element inet margay_policy ifaces { \"cali1\" }"),
        "{s}"
    );
    let t = e.compiler().table();
    assert!(t.ingress.contains_key("cali2"));
    let ips = &e.compiler().world().pods[&k].ips;
    assert!(ips.contains(&"10.1.0.1".parse().unwrap()), "{ips:?}");
}

/// A Pod deleted from the API (forced) while its sandbox is wired
/// keeps its last labels, so its rules, until the DEL.
#[test]
fn a_force_deleted_pod_keeps_its_rules_until_its_del() {
    let mut e = Engine::new();
    let a = pod("x", "a", &[("app", "a")], Some("10.0.0.1"));
    list_all(&mut e, vec![a.clone()], vec![ns("x")], vec![deny_all("x")]);
    let k = Key::new("x", "a");
    e.endpoint_added(ep(Some(&k), "cali1", "10.0.0.1"));
    e.take_script();
    e.loaded(true);
    assert!(e.compiler().table().ingress.contains_key("cali1"));
    e.pod_event(Event::Delete(a.clone()));
    assert_eq!(e.take_script(), None, "nothing changes");
    // A relist without it: still kept.
    e.pod_event(Event::Init);
    e.pod_event(Event::InitDone);
    assert_eq!(e.take_script(), None, "nothing changes on a relist");
    assert!(e.compiler().table().ingress.contains_key("cali1"));
    // Its DEL: gone.
    e.endpoint_deleted("cali1");
    assert!(e.take_script().is_some());
    assert!(e.compiler().world().pods.is_empty());
    assert!(e.compiler().table().ingress.is_empty());
}

/// After a restart: an attachment whose Pod the API no longer has is
/// quarantined where a policy could select it; one neither its alias
/// nor IPAM attributes is quarantined anyway.
#[test]
fn restored_attachments_whose_pod_is_unknown_are_closed() {
    let mut e = Engine::new();
    let gone = Key::new("x", "gone");
    let free = Key::new("y", "free");
    e.endpoint_added(ep(Some(&gone), "cali1", "10.0.0.1"));
    e.endpoint_added(ep(Some(&free), "cali2", "10.0.0.2"));
    e.endpoint_unattributed("cali3", vec!["10.0.0.3".parse().unwrap()]);
    list_all(&mut e, vec![], vec![ns("x"), ns("y")], vec![deny_all("x")]);
    let s = e.take_script().unwrap();
    let t = e.compiler().table();
    assert_eq!(
        t.ingress.get("cali1"),
        Some(&margay_policy::ruleset::Verdict::Drop),
        "{s}"
    );
    assert_eq!(t.ingress.get("cali2"), None, "nothing could select it");
    assert_eq!(
        t.ingress.get("cali3"),
        Some(&margay_policy::ruleset::Verdict::Drop)
    );
    for i in ["cali1", "cali2", "cali3"] {
        assert!(
            s.contains(&format!("\"{i}\" . 10.0.0.")),
            "{i}'s sources: {s}"
        );
    }
    e.loaded(true);
    assert!(e.programmed("cali1") && e.programmed("cali2") && e.programmed("cali3"));
}

/// A policy this node's kernel refused is enforced fail closed and
/// reported until it changes (a new generation is tried again); the
/// other policies are left as they are.
#[test]
fn a_policy_the_kernel_refused_is_closed_until_it_changes() {
    let mut e = Engine::new();
    let mut open: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": "open", "generation": 1},
        "spec": {"podSelector": {}, "ingress": [{}]}
    }))
    .unwrap();
    list_all(
        &mut e,
        vec![pod("x", "a", &[], Some("10.0.0.1"))],
        vec![ns("x")],
        vec![open.clone(), deny_all("x")],
    );
    e.endpoint_added(ep(Some(&Key::new("x", "a")), "cali1", "10.0.0.1"));
    let k = Key::new("x", "open");
    assert_eq!(e.load_suspects().len(), 2);
    assert!(
        e.script_closing(std::slice::from_ref(&k))
            .contains("chain in/x/open")
    );
    e.kernel_refused(std::slice::from_ref(&k), "no");
    assert_eq!(e.compiler().world().policies[&k].ingress, Some(vec![]));
    assert!(matches!(e.invalid()[&k].0, Unenforced::LoadFailed(_)));
    assert!(
        matches!(e.take_load(), Some(Load::Script(_))),
        "the whole table next"
    );
    assert_eq!(e.load_suspects(), [Key::new("x", "deny")]);
    // The same generation again (a relist): still closed.
    e.policy_event(Event::Apply(open.clone()));
    assert_eq!(e.compiler().world().policies[&k].ingress, Some(vec![]));
    // A new one: tried as written.
    open.metadata.generation = Some(2);
    e.policy_event(Event::Apply(open));
    assert_eq!(
        e.compiler().world().policies[&k]
            .ingress
            .as_ref()
            .map(Vec::len),
        Some(1)
    );
    assert!(e.invalid().is_empty());
}

/// The next load, which must be the whole table.
fn take_whole_table(e: &mut Engine) {
    let s = e.take_script().unwrap();
    assert!(
        s.starts_with("table inet margay_policy\ndelete table"),
        "{s}"
    );
}
