//! NetworkPolicy set element changes over netlink (`dataplane::nftnl`) in
//! the real kernel: random worlds compiled and loaded with `nft`, then pod
//! changes one after another, those that are set elements only handed to
//! the kernel over netlink and the others loaded with `nft`; after each the
//! table the kernel lists equals a fresh full load of the compiler's table
//! in another namespace. A change the kernel refuses (deleting an element
//! that is not there) fails as a whole and leaves the table as it was.

use margay_agent::dataplane::nftnl;
use margay_harness::netns::Netns;
use margay_policy::nft::{Compiler, Element, ElementDelta, ElementOp, TABLE, TABLE_NAME};
use margay_policy::random::{self, Rng};
use margay_policy::{PodKey, World};

fn nft(ns: &Netns, script: &str) {
    margay_harness::nft::load(ns, script).unwrap();
}

fn listing(ns: &Netns) -> Vec<String> {
    let (family, name) = TABLE.split_once(' ').unwrap();
    margay_harness::nft::listing(ns, family, name).unwrap()
}

/// Runs `f` with this thread in `ns` (the agent runs in its node's).
fn in_ns<T>(ns: &Netns, f: impl FnOnce() -> T) -> T {
    use nix::sched::{CloneFlags, setns};
    let home = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    setns(ns.open().unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
    let r = f();
    setns(home, CloneFlags::CLONE_NEWNET).unwrap();
    r
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

#[test]
fn element_changes_over_netlink_are_what_nft_would_load() {
    let mut over_netlink = 0;
    let mut map_entries = 0;
    for seed in 0..8 {
        let mut rng = Rng::new(seed);
        let w = random::world(&mut rng, 0, 16, 8);
        let l = local(&w);
        let mut c = Compiler::full(w, l);
        let ns = Netns::create("nftnl").unwrap();
        nft(&ns, &c.table().script());
        // One socket for the whole run, as the agent keeps it (bound to
        // the namespace it was opened in).
        let mut sock = in_ns(&ns, nftnl::Socket::open).unwrap();
        for step in 0..40 {
            let keys: Vec<PodKey> = c.world().pods.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            let d = match rng.below(4) {
                // A pod wired here (shares an endpoint chain when others
                // are isolated alike: map entries only), or gone.
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
            let mut e = ElementDelta::default();
            if e.extend(&d) {
                if !e.is_empty() {
                    over_netlink += 1;
                    map_entries += e
                        .ops
                        .iter()
                        .filter(|(_, set, _)| set == "ingress" || set == "egress")
                        .count();
                    sock.apply(TABLE_NAME, &e).unwrap_or_else(|err| {
                        panic!("seed {seed} step {step}: {err}\n{}", e.script())
                    });
                }
            } else {
                nft(&ns, &d.script());
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
            let add = (
                ElementOp::Add,
                set.clone(),
                vec![Element::Addr("10.0.9.9".parse().unwrap())],
            );
            let del = (
                ElementOp::Delete,
                set,
                vec![Element::Addr("10.0.9.8".parse().unwrap())],
            );
            // The refused message last (the one asking for an answer),
            // then first (its error comes ahead of that answer).
            for ops in [vec![add.clone(), del.clone()], vec![del, add.clone()]] {
                let bad = ElementDelta { ops };
                let err = in_ns(&ns, || nftnl::apply(TABLE_NAME, &bad)).unwrap_err();
                assert!(err.to_string().contains("refused"), "{err}");
                assert_eq!(
                    listing(&ns),
                    before,
                    "seed {seed}: a refused batch changed the table"
                );
            }
            // Refused on the kept socket, whose next batch still reads
            // its own answer.
            // (Its error comes first, the last message's answer after it.)
            let bad = ElementDelta {
                ops: vec![
                    (ElementOp::Delete, add.1.clone(), add.2.clone()),
                    add.clone(),
                ],
            };
            assert!(sock.apply(TABLE_NAME, &bad).is_err());
            sock.apply(TABLE_NAME, &ElementDelta { ops: vec![add] })
                .unwrap();
            assert_ne!(listing(&ns), before, "the element went in");
        }
    }
    assert!(over_netlink > 50, "{over_netlink} changes over netlink");
    assert!(map_entries > 10, "{map_entries} map entries over netlink");
}
