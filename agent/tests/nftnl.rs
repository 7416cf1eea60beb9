//! NetworkPolicy changes over netlink (`dataplane::nftnl`) in the real
//! kernel: random worlds compiled and loaded with `nft`, then pod,
//! endpoint, namespace and policy changes one after another, every delta
//! (set elements (addresses, interfaces), sets, chains and their rules) handed to
//! the kernel over netlink; after each the table the kernel lists equals
//! a fresh full load of the compiler's table with `nft` in another
//! namespace: rules encoded here read back as the text nft was given. A
//! batch the kernel refuses fails as a whole, names the command, and
//! leaves the table as it was.

use margay_agent::dataplane::nftnl;
use margay_harness::netns::Netns;
use margay_policy::model::{Key, Peer, Policy, PortMatch, Rule};
use margay_policy::nft::{Batch, Compiler, Element, ElementOp, Line, Op, TABLE, TABLE_NAME};
use margay_policy::random::{self, Rng};
use margay_policy::{PodKey, Proto, Selector, World};

fn nft(ns: &Netns, script: &str) {
    margay_harness::nft::load(ns, script).unwrap();
}

fn listing(ns: &Netns) -> Vec<String> {
    let (family, name) = TABLE.split_once(' ').unwrap();
    margay_harness::nft::listing(ns, family, name).unwrap()
}

/// Every pod of `w` local, on `caliN`.
fn local(w: &World) -> std::collections::BTreeMap<PodKey, String> {
    w.pods
        .keys()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, k)| (k.clone(), format!("cali{i:011}")))
        .collect()
}

/// A policy with every rule shape the compiler emits that the random
/// ones may miss: IPv6 blocks, /0, a prefix ending inside a byte, SCTP,
/// a range, every port of a protocol, a named port.
fn every_shape() -> Policy {
    let cidr = |s: &str| s.parse().unwrap();
    let rule = |peers, ports| Rule { peers, ports };
    Policy {
        selector: Selector::everything(),
        ingress: Some(vec![
            rule(
                vec![
                    Peer::Block {
                        cidr: cidr("fd00::/8"),
                        except: vec![cidr("fd00:1::/32"), cidr("fd00:2::/47")],
                    },
                    Peer::Block {
                        cidr: cidr("0.0.0.0/0"),
                        except: vec![cidr("172.16.0.0/12"), cidr("10.9.9.9/32")],
                    },
                ],
                vec![
                    PortMatch::All { proto: Proto::Sctp },
                    PortMatch::Range {
                        proto: Proto::Udp,
                        first: 1000,
                        last: 2000,
                    },
                    PortMatch::Named {
                        proto: Proto::Tcp,
                        name: "serve-80-tcp".into(),
                    },
                ],
            ),
            rule(vec![], vec![]),
        ]),
        egress: Some(vec![rule(
            vec![Peer::Block {
                cidr: cidr("::/0"),
                except: vec![],
            }],
            vec![PortMatch::Range {
                proto: Proto::Tcp,
                first: 443,
                last: 443,
            }],
        )]),
    }
}

#[test]
fn changes_over_netlink_are_what_nft_would_load() {
    let mut over_netlink = 0;
    let mut dispatched = 0;
    let mut rules = 0;
    for seed in 0..8 {
        let mut rng = Rng::new(seed);
        let w = random::world(&mut rng, 0, 16, 8);
        let l = local(&w);
        let mut c = Compiler::full(w, l);
        let ns = Netns::create("nftnl").unwrap();
        nft(&ns, &c.table().script());
        // One socket for the whole run, as the agent keeps it (bound to
        // the namespace it was opened in).
        let mut sock = ns.enter(nftnl::Socket::open).unwrap().unwrap();
        for step in 0..40 {
            let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            let d = match if step == 0 { 9 } else { rng.below(6) } {
                // Every rule shape, over every pod of x.
                9 => c.set_policy(&Key::new("x", "every-shape"), Some(every_shape())),
                // A policy created, changed or deleted.
                4 => {
                    let name = format!("np-{}", rng.below(4));
                    let ns = random::NAMESPACES[rng.below(random::NAMESPACES.len())];
                    let k = Key::new(ns, &name);
                    let p = rng.chance(70).then(|| random::policy(&mut rng, 0));
                    c.set_policy(&k, p)
                }
                // A pod wired here (shares an endpoint chain when others
                // are isolated alike: interface set elements only), or gone.
                0 => {
                    let ifname = format!("calin{step:010}");
                    c.set_endpoint(&k, Some(ifname))
                }
                1 => c.set_endpoint(&k, None),
                // An interface whose Pod cannot be read: dropped, then
                // lifted.
                2 if step % 3 == 0 => c.set_quarantine(&format!("caliq{seed}"), step % 2 == 0),
                _ => {
                    let host = u8::try_from(1 + rng.below(40)).unwrap();
                    let mut p = random::pod(&mut rng, 0, host);
                    if rng.chance(50) {
                        p.ips = c.world().pods[&k].ips.clone();
                    }
                    c.set_pod(&k, Some(p))
                }
            };
            let mut e = Batch::default();
            e.extend(&d);
            if !e.is_empty() {
                over_netlink += 1;
                for op in &e.ops {
                    match op {
                        Op::Elements { set, .. } if set.starts_with("if-") => {
                            dispatched += 1;
                        }
                        Op::AddRule { .. } => rules += 1,
                        _ => {}
                    }
                }
                let sent = sock
                    .apply(TABLE_NAME, &e)
                    .unwrap_or_else(|err| panic!("seed {seed} step {step}: {err}\n{}", e.script()));
                assert_eq!(sent, nftnl::Sent::Applied, "seed {seed} step {step}");
            }
            let fresh = Netns::create("nftnl-full").unwrap();
            nft(&fresh, &c.table().script());
            assert_eq!(
                listing(&ns),
                listing(&fresh),
                "seed {seed} step {step}: after\n{}",
                d.script()
            );
        }
        // Refused as a whole: the first element would be added, the
        // delete of one that is not there fails, and nothing changed.
        let set = c
            .table()
            .sets
            .iter()
            .find(|(n, _)| n.ends_with(".p4"))
            .map(|(n, _)| n.clone());
        if let Some(set) = set {
            let before = listing(&ns);
            let el = |op, addr: &str| Op::Elements {
                op,
                set: set.clone(),
                elements: vec![Element::Addr(addr.parse().unwrap())],
            };
            let add = el(ElementOp::Add, "10.0.9.9");
            let del = el(ElementOp::Delete, "10.0.9.8");
            // A rule for a chain that is not there, after a chain made.
            let orphan = vec![
                Op::AddChain("made-then-undone".into()),
                Op::AddRule {
                    chain: "no-such-chain".into(),
                    line: Line::DropUnmarked,
                },
            ];
            // The refused message last (the one asking for an answer),
            // then first (its error comes ahead of that answer).
            for (ops, refused) in [
                (vec![add.clone(), del.clone()], "delete element"),
                (vec![del.clone(), add.clone()], "delete element"),
                (orphan, "add rule inet margay_policy no-such-chain"),
            ] {
                let bad = Batch { ops };
                let err = ns
                    .enter(|| nftnl::apply(TABLE_NAME, &bad))
                    .unwrap()
                    .unwrap_err();
                let err = err.to_string();
                assert!(err.contains("refused") && err.contains(refused), "{err}");
                assert_eq!(
                    listing(&ns),
                    before,
                    "seed {seed}: a refused batch changed the table"
                );
            }
            // Refused on the kept socket, whose next batch still reads
            // its own answer.
            // (Its error comes first, the last message's answer after it.)
            let bad = Batch {
                ops: vec![el(ElementOp::Delete, "10.0.9.9"), add.clone()],
            };
            assert!(sock.apply(TABLE_NAME, &bad).is_err());
            let sent = sock.apply(TABLE_NAME, &Batch { ops: vec![add] }).unwrap();
            assert_eq!(sent, nftnl::Sent::Applied);
            // Too large for one write: not sent (the agent hands it to nft).
            let now = listing(&ns);
            let huge = Batch {
                ops: vec![Op::Elements {
                    op: ElementOp::Add,
                    set: set.clone(),
                    elements: (0..u32::try_from(nftnl::MAX_BATCH / 16 + 1).unwrap())
                        .map(|i| Element::Addr(std::net::Ipv4Addr::from(0x0B00_0000 + i).into()))
                        .collect(),
                }],
            };
            assert_eq!(
                sock.apply(TABLE_NAME, &huge).unwrap(),
                nftnl::Sent::TooLarge
            );
            assert_eq!(listing(&ns), now, "nothing of a batch not sent");
            assert_ne!(listing(&ns), before, "the element went in");
        }
    }
    assert!(over_netlink > 50, "{over_netlink} changes over netlink");
    assert!(
        dispatched > 10,
        "{dispatched} interface changes over netlink"
    );
    assert!(rules > 100, "{rules} rules over netlink");
}
