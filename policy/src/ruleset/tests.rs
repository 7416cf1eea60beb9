use std::collections::BTreeMap;

use super::names::{dir_prefix, except_chain, rule_chain};
use super::*;
use crate::model::Key;
use crate::model::{Direction, Namespace, Peer, Pod, PodKey, Policy, PolicyKey, PortMatch, Rule};
use crate::random::{self, Rng};
use crate::selector::Labels;
use crate::selector::Selector;
use crate::{Proto, World};

fn local(c: &World, n: usize) -> BTreeMap<PodKey, String> {
    c.pods
        .keys()
        .take(n)
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("cali{i:011}")))
        .collect()
}

/// A full compile of the random world of `seed` (four of its pods
/// local), and the generator, to go on drawing changes from.
fn random_compiler(seed: u64) -> (Rng, Compiler) {
    let mut rng = Rng::new(seed);
    let w = random::world(&mut rng, 0, 12, 6);
    let l = local(&w, 4);
    (rng, Compiler::full(w, l))
}

#[test]
fn a_small_world_compiles_as_documented() {
    let mut w = World::default();
    for (ns, name, app, ip) in [("x", "a", "a", "10.0.0.1"), ("x", "b", "b", "10.0.0.2")] {
        w.pods.insert(Key::new(ns, name), app_pod(app, ip));
    }
    w.policies.insert(
        Key::new("x", "web"),
        Policy {
            selector: Selector::labels([("app", "a")]),
            ingress: Some(vec![Rule {
                peers: vec![
                    app_peer("b"),
                    block("192.0.2.0/24", &["192.0.2.128/25".into()]),
                ],
                ports: vec![tcp(80)],
            }]),
            egress: None,
        },
    );
    let l = [(Key::new("x", "a"), "cali1".to_string())].into();
    let c = Compiler::full(w, l);
    let t = c.table();
    let ep = endpoint_chain(Direction::Ingress, &[Key::new("x", "web")]);
    assert!(
        ep.starts_with("ep-in/") && ep.len() == "ep-in/".len() + 16,
        "{ep}"
    );
    assert_eq!(
        t.ingress,
        [("cali1".into(), Verdict::Jump(ep.clone()))].into()
    );
    assert!(t.egress.is_empty());
    let named = |suffix: &str| {
        let v: Vec<&String> = t.sets.keys().filter(|n| n.ends_with(suffix)).collect();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("peer/"), "{v:?}");
        v[0].clone()
    };
    let (p4, p6) = (named(".p4"), named(".p6"));
    let text = |c: &str| t.chains[c].iter().map(Line::to_string).collect::<Vec<_>>();
    assert_eq!(
        text("in/x/web"),
        [
            format!("ip saddr @{p4} meta l4proto tcp th dport 80 meta mark set meta mark | 0x00010000 return"),
            format!("ip6 saddr @{p6} meta l4proto tcp th dport 80 meta mark set meta mark | 0x00010000 return"),
            "ip saddr 192.0.2.0/24 ip saddr != 192.0.2.128/25 meta l4proto tcp th dport 80 meta mark set meta mark | 0x00010000 return".to_string(),
        ]
    );
    assert_eq!(
        text(&ep),
        [
            "ct state invalid drop",
            "meta mark set meta mark & 0xfffeffff",
            "jump in/x/web",
            "meta mark & 0x00010000 == 0 drop",
            "meta mark set meta mark & 0xfffeffff",
        ]
    );
    assert_eq!(
        t.sets[&p4].elements,
        [Element::Addr("10.0.0.2".parse().unwrap())].into()
    );
    // No interval sets (nft would read them all back on every update).
    assert!(
        !t.sets
            .keys()
            .any(|n| n.ends_with(".b4") || n.ends_with(".b6"))
    );
    assert!(t.sets[&p6].elements.is_empty());
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
        std::sync::Arc::make_mut(&mut p.labels).insert("app".into(), "b".into());
        let d = c.set_pod(k, Some(p));
        assert!(d.new_chains.is_empty() && d.rewrite.is_empty() && d.del_chains.is_empty());
        assert!(d.new_sets.is_empty() && d.del_sets.is_empty());
        let dispatch = |d: &Delta| {
            d.add_elements
                .iter()
                .chain(&d.del_elements)
                .any(|(n, _)| n.starts_with("if-"))
        };
        assert!(!dispatch(&d), "{d:?}");
        let d = c.set_pod(k, None);
        assert!(d.rewrite.is_empty() && !dispatch(&d), "{d:?}");
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
        let (mut rng, mut c) = random_compiler(seed);
        for step in 0..60 {
            let before = c.table().clone();
            let what = rng.below(9);
            let d = match what {
                7 => {
                    // A pod scheduled here (labels from the API, not wired
                    // yet), or no longer.
                    let ns = *rng.pick(&random::NAMESPACES);
                    let k = Key::new(ns, &format!("s{}", rng.below(6)));
                    let labels = rng.chance(70).then(|| random::pod(&mut rng, 0, 1).labels);
                    c.set_scheduled(&k, labels.map(|l| (*l).clone()))
                }
                6 => {
                    // Quarantined and lifted again (a full compile knows
                    // no quarantine): each delta exactly the table's change.
                    let ifname = match c.endpoints().keys().next() {
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
                8 => {
                    // A workload interface with its addresses, or gone.
                    let ifname = format!("cali{:011}", rng.below(12));
                    let addrs = rng.chance(70).then(|| {
                        let host = u8::try_from(1 + rng.below(20)).unwrap();
                        random::pod(&mut rng, 0, host).ips
                    });
                    c.set_workload(&ifname, addrs)
                }
                _ => {
                    // An interface of a pod (several per pod: one per
                    // attachment), or of none.
                    let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let k = rng.pick(&keys).clone();
                    let ifname = format!("cali{:011}", rng.below(12));
                    let pod = rng.chance(70).then_some(k);
                    c.set_endpoint(&ifname, pod)
                }
            };
            let full = c.rebuilt();
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
    let ep = w.pods.keys().find(|k| &*k.namespace == "x").cloned();
    let Some(ep) = ep else { return };
    let mut c = Compiler::full(w, [(ep, "cali1".to_string())].into());
    assert!(c.table().chains.contains_key("in/x/all"));
    let ep = endpoint_chain(Direction::Ingress, std::slice::from_ref(&k));
    let s = c.set_policy(&k, None).script();
    let pos = |needle: &str| {
        s.find(needle)
            .unwrap_or_else(|| panic!("{needle} not in\n{s}"))
    };
    // The dispatch chain no longer goes to it, then it goes, then the
    // set of its interfaces.
    assert!(
        pos("flush chain inet margay_policy dispatch-in")
            < pos(&format!("delete chain inet margay_policy {ep}"))
    );
    assert!(
        pos(&format!("delete chain inet margay_policy {ep}"))
            < pos("delete set inet margay_policy if-in/")
    );
    assert!(
        pos(&format!("flush chain inet margay_policy {ep}"))
            < pos("delete chain inet margay_policy in/x/all")
    );
    assert!(
        pos("delete chain inet margay_policy in/x/all")
            < pos("delete set inet margay_policy peer/")
    );
    nothing_of_the_policy_left(&c);
}

/// A pod's change is set elements only, typed, and renders as the same
/// script; a policy's is not.
#[test]
fn element_only_deltas_are_typed() {
    use crate::ruleset::{Batch, Op};
    assert_eq!(
        Element::Port {
            addr: "fd00::1".parse().unwrap(),
            proto: Proto::Udp,
            port: 53
        }
        .to_string(),
        "fd00::1 . udp . 53"
    );
    for seed in 0..20 {
        let (mut rng, mut c) = random_compiler(seed);
        for _ in 0..30 {
            let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            let mut p = c.world().pods[&k].clone();
            p.labels = random::pod(&mut rng, 0, 1).labels;
            let d = c.set_pod(&k, Some(p));
            let mut e = Batch::default();
            e.extend(&d);
            assert_eq!(e.script(), d.script(), "seed {seed}");
            if e.elements_only() {
                assert!(e.ops.iter().all(|op| match op {
                    Op::Elements { elements, .. } => !elements.is_empty(),
                    _ => false,
                }));
            }
        }
        let k = Key::new("x", "np-new");
        let d = c.set_policy(&k, Some(random::policy(&mut rng, 0)));
        if !d.is_empty() {
            let mut b = Batch::default();
            b.extend(&d);
            assert!(!b.elements_only());
        }
    }
}

/// Endpoints that the same policies isolate share one endpoint chain: a
/// new pod is a map element (and set elements), no chain; the chain goes
/// with its last endpoint.
#[test]
fn endpoints_isolated_alike_share_their_chain() {
    let mut w = World::default();
    for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        w.pods.insert(Key::new("x", name), app_pod("web", ip));
    }
    let k = Key::new("x", "web");
    w.policies.insert(
        k.clone(),
        Policy {
            selector: Selector::labels([("app", "web")]),
            ingress: Some(vec![Rule {
                peers: vec![app_peer("web")],
                ports: vec![],
            }]),
            egress: None,
        },
    );
    let mut c = Compiler::full(w, [(Key::new("x", "a"), "cali1".to_string())].into());
    let ep = endpoint_chain(Direction::Ingress, std::slice::from_ref(&k));
    let d = c.set_endpoint("cali2", Some(Key::new("x", "b")));
    let ops = d.element_ops().expect("a new pod is elements only");
    assert!(ops.contains(&(
        ElementOp::Add,
        "if-in/".to_string() + &ep["ep-in/".len()..],
        vec![Element::Iface("cali2".into())]
    )));
    assert_eq!(
        c.table()
            .chains
            .keys()
            .filter(|n| n.starts_with("ep-"))
            .count(),
        1
    );
    // Another label: another list, another chain; the shared one stays.
    let mut p = c.world().pods[&Key::new("x", "b")].clone();
    std::sync::Arc::make_mut(&mut p.labels).insert("app".into(), "db".into());
    let d = c.set_pod(&Key::new("x", "b"), Some(p));
    assert!(d.del_chains.is_empty(), "{d:?}");
    assert!(!c.table().ingress.contains_key("cali2"));
    assert!(c.table().chains.contains_key(&ep));
    // Its last user gone, the chain goes (and the policy, which selects
    // no local pod any more).
    let d = c.set_endpoint("cali1", None);
    assert_eq!(d.del_chains, [ep.clone(), "in/x/web".into()]);
    assert!(!c.table().chains.contains_key(&ep));
    let full = c.rebuilt();
    assert_eq!(full.table(), c.table());
}

/// A pod scheduled here gets its policies and endpoint chain before its
/// ADD; the ADD (its address, its endpoint) is then elements only, and
/// what was prepared lets nothing through (no interface is in its set).
#[test]
fn a_scheduled_pods_chains_are_ready_before_its_add() {
    let mut w = World::default();
    let k = Key::new("x", "web");
    w.policies
        .insert(k.clone(), deny_ingress(Selector::labels([("app", "web")])));
    let mut c = Compiler::full(w, BTreeMap::new());
    assert_eq!(c.table(), &Table::new(), "no local pod selected");
    let pod = Key::new("x", "a");
    let labels: Labels = [("app".to_string(), "web".to_string())].into();
    let d = c.set_scheduled(&pod, Some(labels.clone()));
    let ep = endpoint_chain(Direction::Ingress, std::slice::from_ref(&k));
    assert!(d.new_chains.contains(&ep) && d.new_chains.contains(&"in/x/web".to_string()));
    assert!(c.table().ingress.is_empty(), "no interface jumps to it yet");
    // The ADD: its address, its endpoint, then no longer scheduled.
    let p = Pod {
        labels: labels.into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        node: None,
        ports: [].into(),
    };
    for d in [
        c.set_pod(&pod, Some(p)),
        c.set_endpoint("cali1", Some(pod.clone())),
        c.set_scheduled(&pod, None),
    ] {
        assert!(d.element_ops().is_some(), "{d:?}");
    }
    assert_eq!(c.table().ingress["cali1"], Verdict::Jump(ep.clone()));
    // Scheduled, never wired, then gone: everything prepared goes.
    let other = Key::new("x", "b");
    let mut c = Compiler::full(World::default(), BTreeMap::new());
    c.set_policy(&k, c_policy(&k));
    let _ = c.set_scheduled(
        &other,
        Some([("app".to_string(), "web".to_string())].into()),
    );
    assert!(!c.table().chains.is_empty());
    let _ = c.set_scheduled(&other, None);
    assert_eq!(c.table(), &Table::new());
}

/// A pod wired while still scheduled (the engine's order: its endpoint,
/// then no longer scheduled) counts once for a policy created meanwhile:
/// once it is gone, nothing here is selected and the policy's chains go.
#[test]
fn a_pod_wired_while_scheduled_counts_once() {
    let k = Key::new("x", "web");
    let pod = Key::new("x", "a");
    let labels: Labels = [("app".to_string(), "web".to_string())].into();
    let mut c = Compiler::full(World::default(), BTreeMap::new());
    let _ = c.set_scheduled(&pod, Some(labels.clone()));
    let p = Pod {
        labels: labels.into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        node: None,
        ports: [].into(),
    };
    let _ = c.set_pod(&pod, Some(p));
    let _ = c.set_endpoint("cali1", Some(pod.clone()));
    // Both wired and scheduled when the policy comes.
    let _ = c.set_policy(&k, c_policy(&k));
    assert!(c.table().chains.contains_key("in/x/web"));
    let _ = c.set_scheduled(&pod, None);
    let _ = c.set_endpoint("cali1", None);
    assert_eq!(
        c.table(),
        &Table::new(),
        "nothing here is selected: {:?}",
        c.table().chains.keys().collect::<Vec<_>>()
    );
}

fn c_policy(_k: &PolicyKey) -> Option<Policy> {
    Some(deny_ingress(Selector::labels([("app", "web")])))
}

/// Rules that select the same peers share one set: a pod's change is one
/// element per distinct selector, and the set goes with its last policy.
#[test]
fn rules_with_the_same_peer_share_its_set() {
    let mut w = World::default();
    for (name, app, ip) in [("a", "web", "10.0.0.1"), ("b", "db", "10.0.0.2")] {
        w.pods.insert(Key::new("x", name), app_pod(app, ip));
    }
    let from_web = |port: u16| Policy {
        selector: Selector::everything(),
        ingress: Some(vec![Rule {
            peers: vec![app_peer("web")],
            ports: vec![tcp(port)],
        }]),
        egress: None,
    };
    for (n, port) in [("p1", 80), ("p2", 81), ("p3", 82)] {
        w.policies.insert(Key::new("x", n), from_web(port));
    }
    let l = [(Key::new("x", "b"), "cali1".to_string())].into();
    let mut c = Compiler::full(w, l);
    assert_eq!(
        c.table()
            .sets
            .keys()
            .filter(|n| n.starts_with("peer/"))
            .count(),
        2,
        "one p4 and one p6 set for the three"
    );
    // b becomes web: one element added, in the one shared set.
    let mut p = c.world().pods[&Key::new("x", "b")].clone();
    std::sync::Arc::make_mut(&mut p.labels).insert("app".into(), "web".into());
    let d = c.set_pod(&Key::new("x", "b"), Some(p));
    let ops = d.element_ops().expect("elements only");
    assert_eq!(
        ops.iter().map(|(_, _, e)| e.len()).sum::<usize>(),
        1,
        "{ops:?}"
    );
    // A fourth policy with the same peer adds only its chain (and the
    // endpoint's chain for its new list, with the set of its interfaces).
    let pod_sets = |v: &[String]| v.iter().filter(|n| n.starts_with("peer/")).count();
    let d = c.set_policy(&Key::new("x", "p4"), Some(from_web(83)));
    let new: Vec<String> = d.new_sets.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(pod_sets(&new), 0, "{d:?}");
    // The set goes with the last policy using it.
    for n in ["p1", "p2", "p3"] {
        let d = c.set_policy(&Key::new("x", n), None);
        assert_eq!(pod_sets(&d.del_sets), 0, "{d:?}");
    }
    let d = c.set_policy(&Key::new("x", "p4"), None);
    assert_eq!(pod_sets(&d.del_sets), 2, "{d:?}");
    nothing_of_the_policy_left(&c);
}

/// A legal policy name of 253 characters in a namespace of 63 gives
/// chain names the kernel takes (at most 255 bytes, with the rule
/// chains' suffixes), distinct for distinct policies.
#[test]
fn every_legal_name_makes_a_name_the_kernel_takes() {
    let ns = "n".repeat(63);
    let a = Key::new(&ns, &"a".repeat(253));
    let b = Key::new(&ns, &format!("{}b", "a".repeat(252)));
    for dir in [Direction::Ingress, Direction::Egress] {
        let (ca, cb) = (policy_chain(dir, &a), policy_chain(dir, &b));
        assert!(ca.len() <= MAX_CHAIN_NAME, "{ca}");
        assert_ne!(ca, cb);
        assert!(ca.starts_with(&format!("{}/{ns}/aaaa", dir_prefix(dir))));
        assert!(except_chain(&rule_chain(&ca, 99_999), 99_999).len() <= 255);
        // Short names are kept as they are.
        assert_eq!(
            policy_chain(dir, &Key::new("x", "p")),
            format!("{}/x/p", dir_prefix(dir))
        );
    }
}

/// A policy isolating the pods `selector` picks for ingress, allowing none.
fn deny_ingress(selector: Selector) -> Policy {
    Policy {
        selector,
        ingress: Some(vec![]),
        egress: None,
    }
}

/// The pods labelled app=`app` in the policy's namespace.
fn app_peer(app: &str) -> Peer {
    Peer::Pods {
        namespaces: None,
        pods: Selector::labels([("app", app)]),
    }
}

/// TCP to `port` alone.
fn tcp(port: u16) -> PortMatch {
    PortMatch::Range {
        proto: Proto::Tcp,
        first: port,
        last: port,
    }
}

fn block(cidr: &str, except: &[String]) -> Peer {
    Peer::Block {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

/// One rule with 1,000 ipBlocks and 1,000 ports: lines grow with their
/// sum, not their product; an ipBlock with many excepts goes to a chain
/// of its own.
#[test]
fn a_rule_costs_its_peers_plus_its_ports() {
    let mut w = World::default();
    let k = Key::new("x", "a");
    w.pods.insert(k.clone(), unlabelled_pod(&["10.0.0.1"]));
    let mut peers: Vec<Peer> = (0..1000u32)
        .map(|i| block(&format!("192.168.{}.{}/32", i / 256, i % 256), &[]))
        .collect();
    let excepts: Vec<String> = (0..50).map(|i| format!("172.16.0.{i}/32")).collect();
    peers.push(block("172.16.0.0/16", &excepts));
    let ports = (0..1000u16).map(|i| tcp(1000 + i)).collect();
    let p = Policy {
        selector: Selector::everything(),
        ingress: Some(vec![Rule { peers, ports }]),
        egress: None,
    };
    assert!(cost(&p) < MAX_POLICY_COST, "{}", cost(&p));
    let pk = Key::new("x", "big");
    w.policies.insert(pk.clone(), p);
    let c = Compiler::full(w, [(k, "cali1".to_string())].into());
    let t = c.table();
    let lines: usize = t.chains.values().map(Vec::len).sum();
    assert!(lines < 2_200, "{lines} lines");
    let chain = policy_chain(Direction::Ingress, &pk);
    assert_eq!(t.chains[&chain].len(), 1000, "one line per port");
    let rc = rule_chain(&chain, 0);
    assert_eq!(t.chains[&rc].len(), 1001, "one line per peer");
    let xc = except_chain(&rc, 1000);
    assert_eq!(t.chains[&xc].len(), 51, "each except, then the allow");
    assert!(matches!(&t.chains[&rc][1000], Line::JumpIf { chain, .. } if *chain == xc));
    // No line holds more than a few matches (the kernel's limit is
    // 128 expressions a rule).
    assert!(
        t.chains
            .values()
            .flatten()
            .all(|l| l.matches() <= 2 + INLINE_EXCEPTS)
    );
    // Gone with the policy, all of them.
    let mut c = c;
    let d = c.set_policy(&pk, None);
    assert!(
        d.del_chains.contains(&rc) && d.del_chains.contains(&xc),
        "{d:?}"
    );
    assert!(!c.table().chains.keys().any(|n| n.starts_with("in/x/")));
}

/// Two attachments of one pod are each dispatched to its policies;
/// taking one away leaves the other enforced; every workload interface
/// carries its own sources.
#[test]
fn each_attachment_of_a_pod_is_enforced_on_its_own() {
    let mut w = World::default();
    let k = Key::new("x", "a");
    w.pods
        .insert(k.clone(), unlabelled_pod(&["10.0.0.1", "10.1.0.1"]));
    w.policies
        .insert(Key::new("x", "deny"), deny_ingress(Selector::everything()));
    let mut c = Compiler::full(w, BTreeMap::new());
    let _ = c.set_workload("cali1", Some(vec!["10.0.0.1".parse().unwrap()]));
    let _ = c.set_workload("cali2", Some(vec!["10.1.0.1".parse().unwrap()]));
    let _ = c.set_endpoint("cali1", Some(k.clone()));
    let d = c.set_endpoint("cali2", Some(k.clone()));
    assert!(
        d.element_ops().is_some(),
        "the second is elements only: {d:?}"
    );
    let t = c.table();
    assert!(t.ingress.contains_key("cali1") && t.ingress.contains_key("cali2"));
    assert_eq!(t.sets[IFACES_SET].elements.len(), 2);
    assert!(t.sets["src/4"].elements.contains(&Element::IfaceAddr {
        ifname: "cali2".into(),
        addr: "10.1.0.1".parse().unwrap()
    }));
    // The first goes: the second stays enforced.
    let _ = c.set_endpoint("cali1", None);
    let _ = c.set_workload("cali1", None);
    let t = c.table();
    assert!(!t.ingress.contains_key("cali1") && t.ingress.contains_key("cali2"));
    assert_eq!(t.sets[IFACES_SET].elements.len(), 1);
    assert_eq!(t.sets["src/4"].elements.len(), 1);
    assert_eq!(c.table(), c.rebuilt().table());
}

/// The table has only its fixed parts: every chain and set of a policy
/// gone with it.
fn nothing_of_the_policy_left(c: &Compiler) {
    assert_eq!(
        c.table().chains,
        Table::new().chains,
        "nothing of the policy left"
    );
    assert!(c.table().sets.keys().eq(Table::new().sets.keys()));
}

/// A pod labelled `app=APP` with address `ip`, on no node, no named ports.
fn app_pod(app: &str, ip: &str) -> Pod {
    let labels: Labels = [("app".to_string(), app.to_string())].into();
    Pod {
        labels: labels.into(),
        ..unlabelled_pod(&[ip])
    }
}

/// A pod without labels with addresses `ips`, on no node, no named ports.
fn unlabelled_pod(ips: &[&str]) -> Pod {
    Pod {
        labels: Default::default(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        node: None,
        ports: [].into(),
    }
}
