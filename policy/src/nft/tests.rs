use super::*;
use crate::model::Key;
use crate::random::{self, Rng};
use crate::selector::Selector;

fn local(c: &World, n: usize) -> BTreeMap<PodKey, String> {
    c.pods
        .keys()
        .take(n)
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("cali{i:011}")))
        .collect()
}

#[test]
fn a_small_world_compiles_as_documented() {
    let mut w = World::default();
    for (ns, name, app, ip) in [("x", "a", "a", "10.0.0.1"), ("x", "b", "b", "10.0.0.2")] {
        w.pods.insert(
            Key::new(ns, name),
            Pod {
                labels: [("app".to_string(), app.to_string())].into(),
                ips: vec![ip.parse().unwrap()],
                node: None,
                ports: vec![],
            },
        );
    }
    w.policies.insert(
        Key::new("x", "web"),
        Policy {
            selector: Selector::labels([("app", "a")]),
            ingress: Some(vec![Rule {
                peers: vec![
                    Peer::Pods {
                        namespaces: None,
                        pods: Selector::labels([("app", "b")]),
                    },
                    Peer::Block {
                        cidr: "192.0.2.0/24".parse().unwrap(),
                        except: vec!["192.0.2.128/25".parse().unwrap()],
                    },
                ],
                ports: vec![PortMatch::Range {
                    proto: Proto::Tcp,
                    first: 80,
                    last: 80,
                }],
            }]),
            egress: None,
        },
    );
    let l = [(Key::new("x", "a"), "cali1".to_string())].into();
    let c = Compiler::full(w, l);
    let t = c.table();
    assert_eq!(
        t.ingress,
        [("cali1".into(), "jump ep-in/cali1".into())].into()
    );
    assert!(t.egress.is_empty());
    assert_eq!(
        t.chains["in/x/web"],
        [
            "ip saddr @in/x/web/0.p4 meta l4proto tcp th dport 80 meta mark set meta mark | 0x00010000 return",
            "ip6 saddr @in/x/web/0.p6 meta l4proto tcp th dport 80 meta mark set meta mark | 0x00010000 return",
            "ip saddr 192.0.2.0/24 ip saddr != 192.0.2.128/25 meta l4proto tcp th dport 80 meta mark set meta mark | 0x00010000 return",
        ]
    );
    assert_eq!(
        t.chains["ep-in/cali1"],
        [
            "ct state invalid drop",
            "meta mark set meta mark & 0xfffeffff",
            "jump in/x/web",
            "meta mark & 0x00010000 == 0 drop",
            "meta mark set meta mark & 0xfffeffff",
        ]
    );
    assert_eq!(
        t.sets["in/x/web/0.p4"].elements,
        ["10.0.0.2".to_string()].into()
    );
    // No interval sets (nft would read them all back on every update).
    assert!(
        !t.sets
            .keys()
            .any(|n| n.ends_with(".b4") || n.ends_with(".b6"))
    );
    assert!(t.sets["in/x/web/0.p6"].elements.is_empty());
    let s = t.script();
    assert!(s.starts_with("table inet margay_policy\ndelete table inet margay_policy\n"));
}

#[test]
fn a_label_or_a_pod_is_set_elements_and_a_policy_its_own_chain() {
    let mut rng = Rng::new(7);
    let w = random::world(&mut rng, 0, 40, 20);
    let l = local(&w, 10);
    let mut c = Compiler::full(w, l);
    // A remote pod (not a local endpoint) gets new labels or goes: at most
    // set elements change.
    let remote: Vec<PodKey> = c
        .world()
        .pods
        .keys()
        .filter(|k| !c.local().contains_key(*k))
        .cloned()
        .collect();
    for k in remote.iter().take(10) {
        let mut p = c.world().pods[k].clone();
        p.labels.insert("app".into(), "b".into());
        let d = c.set_pod(k, Some(p));
        assert!(d.new_chains.is_empty() && d.rewrite.is_empty() && d.del_chains.is_empty());
        assert!(d.new_sets.is_empty() && d.del_sets.is_empty());
        assert!(d.add_map.is_empty() && d.del_map.is_empty());
        let d = c.set_pod(k, None);
        assert!(d.rewrite.is_empty() && d.add_map.is_empty(), "{d:?}");
    }
    // A policy change touches its own chains and sets (and endpoint chains
    // only where the selection changed).
    let (k, p) = c
        .world()
        .policies
        .iter()
        .find(|(k, _)| {
            c.table()
                .chains
                .contains_key(&policy_chain(Direction::Ingress, k))
        })
        .map(|(k, p)| (k.clone(), p.clone()))
        .expect("a compiled policy with ingress");
    let mut q = p.clone();
    q.ingress = Some(vec![]);
    let d = c.set_policy(&k, Some(q));
    for (chain, _) in &d.rewrite {
        assert!(
            chain.contains(&format!("/{}/{}", k.namespace, k.name)) || chain.starts_with("ep-"),
            "{chain}"
        );
    }
}

/// After every change the incremental table is the full compile of the
/// same inputs.
#[test]
fn incremental_updates_equal_a_full_compile() {
    for seed in 0..40 {
        let mut rng = Rng::new(seed);
        let w = random::world(&mut rng, 0, 12, 6);
        let l = local(&w, 4);
        let mut c = Compiler::full(w, l);
        for step in 0..60 {
            let before = c.table().clone();
            let what = rng.below(7);
            let d = match what {
                6 => {
                    // Quarantined and lifted again (a full compile knows
                    // no quarantine): each delta exactly the table's change.
                    let ifname = match c.local().values().next() {
                        Some(i) if rng.chance(50) => i.clone(),
                        _ => format!("cali{:011}", rng.below(1000)),
                    };
                    let d = c.set_quarantine(&ifname, true);
                    assert_eq!(
                        before.delta(c.table()),
                        d,
                        "seed {seed} step {step} quarantine"
                    );
                    let mid = c.table().clone();
                    let d = c.set_quarantine(&ifname, false);
                    assert_eq!(mid.delta(c.table()), d, "seed {seed} step {step} lift");
                    before.delta(c.table())
                }
                0 => {
                    let host = u8::try_from(1 + rng.below(20)).unwrap();
                    let ns = *rng.pick(&random::NAMESPACES);
                    let k = Key::new(ns, &format!("p{}", rng.below(20)));
                    let p = random::pod(&mut rng, 0, host);
                    c.set_pod(&k, Some(p))
                }
                1 => {
                    let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let k = rng.pick(&keys).clone();
                    c.set_pod(&k, None)
                }
                2 => {
                    let ns = *rng.pick(&random::NAMESPACES);
                    let k = Key::new(ns, &format!("np{}", rng.below(8)));
                    if rng.chance(30) {
                        c.set_policy(&k, None)
                    } else {
                        let p = random::policy(&mut rng, 0);
                        c.set_policy(&k, Some(p))
                    }
                }
                3 => {
                    let ns = *rng.pick(&random::NAMESPACES);
                    let mut labels = BTreeMap::new();
                    if rng.chance(60) {
                        labels.insert("app".to_string(), rng.pick(&["a", "b"]).to_string());
                    }
                    c.set_namespace(ns, Some(Namespace { labels }))
                }
                _ => {
                    let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let k = rng.pick(&keys).clone();
                    let ifname = rng
                        .chance(70)
                        .then(|| format!("cali{:011}", rng.below(1000)));
                    // One interface per endpoint.
                    if let Some(i) = &ifname
                        && c.local().values().any(|v| v == i)
                    {
                        continue;
                    }
                    c.set_endpoint(&k, ifname)
                }
            };
            let full = Compiler::full(c.world().clone(), c.local().clone());
            assert_eq!(
                c.table(),
                full.table(),
                "seed {seed} step {step} (change {what})"
            );
            assert_eq!(before.delta(c.table()), d, "seed {seed} step {step}");
        }
    }
}

#[test]
fn a_delta_removes_references_before_what_they_reference() {
    let mut rng = Rng::new(3);
    let mut w = random::world(&mut rng, 0, 10, 0);
    let k = Key::new("x", "all");
    w.policies.insert(
        k.clone(),
        Policy {
            selector: Selector::everything(),
            ingress: Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespaces: Some(Selector::everything()),
                    pods: Selector::everything(),
                }],
                ports: vec![],
            }]),
            egress: None,
        },
    );
    let ep = w.pods.keys().find(|k| k.namespace == "x").cloned();
    let Some(ep) = ep else { return };
    let mut c = Compiler::full(w, [(ep, "cali1".to_string())].into());
    assert!(c.table().chains.contains_key("in/x/all"));
    let s = c.set_policy(&k, None).script();
    let pos = |needle: &str| {
        s.find(needle)
            .unwrap_or_else(|| panic!("{needle} not in\n{s}"))
    };
    assert!(
        pos("delete element inet margay_policy ingress { \"cali1\" }")
            < pos("delete chain inet margay_policy ep-in/cali1")
    );
    assert!(
        pos("flush chain inet margay_policy ep-in/cali1")
            < pos("delete chain inet margay_policy in/x/all")
    );
    assert!(
        pos("delete chain inet margay_policy in/x/all")
            < pos("delete set inet margay_policy in/x/all/0.p4")
    );
    assert!(c.table().chains.is_empty() && c.table().sets.is_empty());
}

/// A pod's change is set elements only, typed, and renders as the same
/// script; a policy's is not.
#[test]
fn element_only_deltas_are_typed() {
    use crate::nft::{Element, ElementDelta, ElementOp};
    assert_eq!(
        Element::parse("10.0.0.1"),
        Some(Element::Addr("10.0.0.1".parse().unwrap()))
    );
    assert_eq!(
        Element::parse("fd00::1 . udp . 53"),
        Some(Element::Port {
            addr: "fd00::1".parse().unwrap(),
            proto: Proto::Udp,
            port: 53
        })
    );
    assert_eq!(Element::parse("10.0.0.0-10.0.0.255"), None);
    assert_eq!(Element::parse("10.0.0.1 . tcp"), None);
    for seed in 0..20 {
        let mut rng = Rng::new(seed);
        let w = random::world(&mut rng, 0, 12, 6);
        let l = local(&w, 4);
        let mut c = Compiler::full(w, l);
        for _ in 0..30 {
            let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            let mut p = c.world().pods[&k].clone();
            p.labels = random::pod(&mut rng, 0, 1).labels;
            let d = c.set_pod(&k, Some(p));
            let mut e = ElementDelta::default();
            if e.extend(&d) {
                assert_eq!(e.script(), d.script(), "seed {seed}");
                assert!(
                    e.ops.iter().all(|(op, _, v)| !v.is_empty()
                        && matches!(op, ElementOp::Add | ElementOp::Delete))
                );
            }
        }
        let k = Key::new("x", "np-new");
        let d = c.set_policy(&k, Some(random::policy(&mut rng, 0)));
        if !d.is_empty() {
            assert!(!ElementDelta::default().extend(&d));
        }
    }
}
