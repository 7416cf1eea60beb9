//! The planner against hand-made views: claims, group commit, borrowing,
//! releases.

use super::*;
use crate::crd::{Encapsulation, IPAMConfigurationSpec};

fn pool(name: &str, cidr: &str, size: u8) -> Pool {
    Pool {
        name: name.into(),
        cidr: cidr.parse().unwrap(),
        block_size: size,
        disabled: false,
        deleting: false,
        selector: None,
        uses: vec![AllowedUse::Workload, AllowedUse::Tunnel],
        encapsulation: Encapsulation::None,
        nat_outgoing: false,
    }
}

fn assign(h: &str) -> Op {
    Op::Assign(Assign {
        handle: h.into(),
        pod: None,
        use_: AllowedUse::Workload,
    })
}

fn run(ctx: Context<'_>, view: &View, ops: &[Op]) -> Plan {
    let refs: Vec<(usize, &Op)> = ops.iter().enumerate().collect();
    plan(ctx, view, &refs)
}

fn ctx<'a>(
    labels: &'a BTreeMap<String, String>,
    pools: &'a [Pool],
    config: &'a IPAMConfigurationSpec,
) -> Context<'a> {
    Context {
        node: "n1",
        labels,
        pools,
        config,
        now: "t",
    }
}

/// What a plan reads besides the view: the node's labels, the pools and
/// the configuration.
struct Inputs {
    labels: BTreeMap<String, String>,
    pools: Vec<Pool>,
    config: IPAMConfigurationSpec,
}

impl Inputs {
    /// `pools`, the default configuration, a node without labels.
    fn new(pools: impl Into<Vec<Pool>>) -> Self {
        Self {
            labels: BTreeMap::new(),
            pools: pools.into(),
            config: IPAMConfigurationSpec::default(),
        }
    }

    fn ctx(&self) -> Context<'_> {
        ctx(&self.labels, &self.pools, &self.config)
    }
}

/// Applies a plan's claim and writes to the view as a store would.
fn apply(view: &mut View, p: &Plan) {
    if let Some(Claim::Create(b) | Claim::Adopt(b)) = &p.claim {
        view.insert(b.clone());
    }
    for b in p.writes.values() {
        view.insert(b.clone());
    }
}

#[test]
fn first_request_claims_then_assigns_in_one_write() {
    let inputs = Inputs::new([pool("p", "10.0.0.0/24", 26)]);
    let ctx = inputs.ctx();
    let mut view = View::default();
    let ops: Vec<Op> = (0..10).map(|i| assign(&format!("h{i}"))).collect();
    let p = run(ctx, &view, &ops);
    assert!(matches!(p.claim, Some(Claim::Create(_))));
    assert_eq!(p.waiting.len(), 10);
    apply(&mut view, &p);
    let p = run(ctx, &view, &ops);
    assert!(p.claim.is_none());
    assert_eq!(p.writes.len(), 1, "group commit: one block write for ten");
    assert_eq!(p.done.len(), 10);
    let ips: HashSet<_> = p
        .done
        .iter()
        .map(|(_, o)| match o {
            Ok(Outcome::Assigned(v)) => v[0],
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ips.len(), 10);
    apply(&mut view, &p);
    // Asking again returns the same address and writes nothing.
    let again = run(ctx, &view, &ops[3..4]);
    assert!(again.writes.is_empty());
    let prev = p.done.iter().find(|(i, _)| *i == 3).unwrap().1.clone();
    assert_eq!(again.done[0].1, prev);
}

#[test]
fn an_edited_pool_claims_no_block_over_its_old_ones() {
    // Pool p had /26 blocks; n2 holds one with an address. Then its
    // blockSize is edited to 28: a /28 claim could land inside it.
    let mut view = View::default();
    let mut old = Block::new("10.0.0.0/26".parse().unwrap(), "p", "n2");
    old.allocations.insert(
        "10.0.0.5".parse().unwrap(),
        AllocationRecord {
            handle: "h-old".into(),
            node: "n2".into(),
            use_: AllowedUse::Workload,
            pod: None,
            since: String::new(),
        },
    );
    view.insert(old);
    let inputs = Inputs::new([pool("p", "10.0.0.0/26", 28)]);
    let p = run(inputs.ctx(), &view, &[assign("h")]);
    assert!(p.claim.is_none(), "{:?}", p.claim);
    match &p.done[0].1 {
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("blockSize was changed") && e.contains("10.0.0.0/26"),
                "{e}"
            );
            assert!(e.contains("create a new pool"), "{e}");
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn a_claim_never_overlaps_a_block_of_any_pool() {
    // A block left by a deleted pool of another shape sits inside p.
    let mut view = View::default();
    view.insert(Block::new("10.0.0.0/26".parse().unwrap(), "gone", "n9"));
    let pools = [pool("p", "10.0.0.0/25", 28)];
    let cfg = IPAMConfigurationSpec {
        strict_affinity: true,
        ..Default::default()
    };
    let labels = BTreeMap::new();
    let names: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
    let mut claimed = 0;
    for n in &names {
        let c = Context {
            node: n,
            ..ctx(&labels, &pools, &cfg)
        };
        let p = run(c, &view, &[assign(&format!("h-{n}"))]);
        match &p.claim {
            Some(Claim::Create(b)) => {
                claimed += 1;
                view.insert(b.clone());
            }
            None => assert!(
                format!("{:?}", p.done).contains("is claimed"),
                "{:?}",
                p.done
            ),
            other => panic!("{other:?}"),
        }
    }
    // The upper half's four /28s, and nothing inside the old /26.
    assert_eq!(claimed, 4);
    let all: Vec<&Block> = view.blocks().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert!(!overlaps(&a.cidr, &b.cidr), "{} and {}", a.cidr, b.cidr);
        }
    }
}

#[test]
fn dual_stack_gets_one_of_each() {
    let inputs = Inputs::new([pool("v4", "10.0.0.0/24", 26), pool("v6", "fd00::/64", 122)]);
    let ctx = inputs.ctx();
    let mut view = View::default();
    let ops = [assign("h")];
    for _ in 0..2 {
        let p = run(ctx, &view, &ops);
        apply(&mut view, &p);
    }
    let p = run(ctx, &view, &ops);
    match &p.done[0].1 {
        Ok(Outcome::Assigned(v)) => {
            assert_eq!(v.len(), 2);
            assert!(v[0].is_ipv4() && v[1].is_ipv6());
            assert_eq!(v[1].prefix(), 128);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(p.writes.len(), 2);
}

#[test]
fn exhaustion_borrows_or_fails_clearly_with_strict_affinity() {
    let pools = [pool("p", "10.0.0.0/26", 27)];
    let cfg = IPAMConfigurationSpec {
        max_blocks_per_node: 1,
        ..Default::default()
    };
    let labels = BTreeMap::new();
    let mut view = View::default();
    // n2 owns one block; n1 claims the other and fills it.
    let mut other = Block::new("10.0.0.0/27".parse().unwrap(), "p", "n2");
    other.version = Some("1".into());
    view.insert(other);
    let ctx = ctx(&labels, &pools, &cfg);
    let ops: Vec<Op> = (0..33).map(|i| assign(&format!("h{i}"))).collect();
    let p = run(ctx, &view, &ops);
    match &p.claim {
        Some(Claim::Create(b)) => assert_eq!(b.cidr.to_string(), "10.0.0.32/27"),
        c => panic!("{c:?}"),
    }
    apply(&mut view, &p);
    let p = run(ctx, &view, &ops);
    // 32 fit in n1's block; the 33rd borrows from n2's.
    assert_eq!(p.writes.len(), 2);
    assert!(p.done.iter().all(|(_, o)| o.is_ok()));
    let strict = IPAMConfigurationSpec {
        strict_affinity: true,
        ..cfg.clone()
    };
    let sctx = Context {
        config: &strict,
        ..ctx
    };
    let p = run(sctx, &view, &ops);
    let err = p.done.iter().find_map(|(_, o)| o.clone().err()).unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("maxBlocksPerNode is 1") && msg.contains("strictAffinity"),
        "{msg}"
    );
}

#[test]
fn disabled_and_unselected_pools_hand_out_nothing() {
    let mut p1 = pool("p", "10.0.0.0/24", 26);
    p1.disabled = true;
    let mut p2 = pool("q", "10.1.0.0/24", 26);
    p2.selector = Some(crate::crd::LabelSelector {
        match_labels: [("zone".to_string(), "b".to_string())].into(),
        match_expressions: vec![],
    });
    let pools = [p1, p2];
    let cfg = IPAMConfigurationSpec::default();
    let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
    let ctx = ctx(&labels, &pools, &cfg);
    let p = run(ctx, &View::default(), &[assign("h")]);
    assert!(
        matches!(p.done[0].1, Err(Error::NoPool { .. })),
        "{:?}",
        p.done
    );
}

#[test]
fn release_is_by_handle_and_idempotent() {
    let inputs = Inputs::new([pool("p", "10.0.0.0/24", 26)]);
    let ctx = inputs.ctx();
    let mut view = View::default();
    let ops = [assign("a"), assign("b")];
    for _ in 0..2 {
        let p = run(ctx, &view, &ops);
        apply(&mut view, &p);
    }
    let rel = [Op::Release { handle: "a".into() }];
    let p = run(ctx, &view, &rel);
    assert_eq!(
        p.done[0].1,
        Ok(Outcome::Released(vec!["10.0.0.0".parse().unwrap()]))
    );
    apply(&mut view, &p);
    let p = run(ctx, &view, &rel);
    assert_eq!(p.done[0].1, Ok(Outcome::Released(vec![])));
    assert!(p.writes.is_empty());
    // The same handle twice in one batch: the second waits a round.
    let p = run(
        ctx,
        &view,
        &[assign("c"), Op::Release { handle: "c".into() }],
    );
    assert_eq!(p.waiting, vec![1]);
}
