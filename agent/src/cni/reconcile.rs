//! Start-up reconciliation of the pods' kernel state with IPAM.
//!
//! The kernel is the node's durable journal of attributions (every pod host
//! interface carries its alias, see [`super::alias`]). IPAM's writes of
//! attributions and releases happen
//! behind the ADD/DEL answers (see `margay_ipam::reserve`), so after a
//! crash the two may disagree; before serving anything the agent settles
//! them:
//! - an interface whose addresses IPAM holds for its handle: kept;
//! - an interface whose addresses a spare of this node holds: the rename
//!   that was not written is written now;
//! - an interface whose addresses are free or held by someone else (an
//!   operator forced a release): removed, the pod has to be re-added;
//! - an address of this node IPAM holds for a pod handle that has no
//!   interface (a release not written, or an ADD that died before wiring):
//!   released.
//!
//! Interfaces without Margay's alias are never touched, nor is one with an
//! address in a block whose content does not parse (who holds it is
//! unknown: the pod keeps its network). [`plan`] is pure; [`apply`] does
//! the I/O.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use margay_api::ipam::{AllowedUse, PodRef};
use margay_ipam::reserve::spare_prefix;
use margay_ipam::{Allocator, Block};

use super::alias::parse;
use crate::dataplane::{Dataplane, HostPod};

/// One reconciliation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the attribution that was lost.
    Rename {
        /// The spare handle holding the addresses.
        from: String,
        /// The pod's handle.
        to: String,
        /// The addresses.
        addrs: Vec<IpAddr>,
        /// The pod.
        pod: Option<PodRef>,
    },
    /// Remove a pod interface IPAM does not back.
    RemoveLink {
        /// The host interface.
        host_if: String,
        /// Why.
        why: String,
    },
    /// Release a handle no interface backs.
    Release {
        /// The handle.
        handle: String,
    },
}

/// What to do so the kernel (`pods`) and IPAM (`blocks`) agree for `node`.
pub fn plan(node: &str, pods: &[HostPod], blocks: &[Block]) -> Vec<Action> {
    let spare = spare_prefix(node);
    let mut holder: HashMap<IpAddr, (&str, &str)> = HashMap::new();
    let mut handles: BTreeMap<&str, ()> = BTreeMap::new();
    for b in blocks {
        for (ip, a) in &b.allocations {
            holder.insert(*ip, (a.handle.as_str(), a.node.as_str()));
            if a.node == node && a.use_ == AllowedUse::Workload && !a.handle.starts_with(&spare) {
                handles.insert(a.handle.as_str(), ());
            }
        }
    }
    let unknown = |ip: &IpAddr| {
        blocks
            .iter()
            .any(|b| b.corrupt.is_some() && b.cidr.contains(*ip))
    };
    let mut out = Vec::new();
    let mut backed: BTreeMap<String, ()> = BTreeMap::new();
    for at in pods.iter().filter_map(parse) {
        if at.addrs.iter().any(unknown) {
            tracing::warn!(handle = %at.handle, addrs = ?at.addrs, "an address of this pod is in a block that does not parse: left alone");
            backed.insert(at.handle.clone(), ());
            continue;
        }
        let holders: Vec<Option<(&str, &str)>> =
            at.addrs.iter().map(|ip| holder.get(ip).copied()).collect();
        if holders
            .iter()
            .all(|h| h.map(|(h, _)| h) == Some(at.handle.as_str()))
        {
            backed.insert(at.handle.clone(), ());
            continue;
        }
        let first = holders[0];
        let one_spare = matches!(first, Some((h, n)) if h.starts_with(&spare) && n == node)
            && holders.iter().all(|h| *h == first);
        if one_spare {
            backed.insert(at.handle.clone(), ());
            out.push(Action::Rename {
                from: first.expect("checked").0.to_string(),
                to: at.handle.clone(),
                addrs: at.addrs.clone(),
                pod: at.pod.clone(),
            });
            continue;
        }
        let why = at
            .addrs
            .iter()
            .zip(&holders)
            .find_map(|(ip, h)| match h {
                None => Some(format!("{ip} is not allocated")),
                Some((h, _)) if *h != at.handle => Some(format!("{ip} is held by {h}")),
                _ => None,
            })
            .unwrap_or_else(|| "its addresses are split between handles".into());
        out.push(Action::RemoveLink {
            host_if: at.host_if.clone(),
            why: format!("{} ({why})", at.handle),
        });
    }
    for h in handles.keys() {
        if !backed.contains_key(*h) {
            out.push(Action::Release {
                handle: h.to_string(),
            });
        }
    }
    out
}

/// Counts of what [`apply`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Attributions written.
    pub renamed: usize,
    /// Interfaces removed.
    pub removed: usize,
    /// Handles released.
    pub released: usize,
}

/// The pod each handle of this node's blocks was recorded for.
pub type Attributions = std::collections::HashMap<String, margay_api::ipam::PodRef>;

/// Plans and applies the reconciliation (before the CNI service starts);
/// also returns whose each handle IPAM recorded (for interfaces whose
/// alias could not hold their pod).
pub async fn apply<D: Dataplane>(
    node: &str,
    alloc: &Allocator,
    dp: &D,
) -> crate::Result<(Report, Attributions)> {
    let pods = dp.list_pods().await?;
    let blocks = alloc.blocks().await?;
    let mut owners = Attributions::new();
    for b in &blocks {
        for a in b.allocations.values() {
            if let Some(p) = &a.pod {
                owners.insert(a.handle.clone(), p.clone());
            }
        }
    }
    let mut r = Report::default();
    for action in plan(node, &pods, &blocks) {
        tracing::info!(?action, "reconcile");
        match action {
            Action::Rename {
                from,
                to,
                addrs,
                pod,
            } => {
                alloc.rename(&from, &to, addrs, pod).await?;
                r.renamed += 1;
            }
            Action::RemoveLink { host_if, why } => {
                tracing::warn!(%host_if, "removing a pod interface IPAM does not back: {why}");
                dp.del_pod(&host_if).await?;
                r.removed += 1;
            }
            Action::Release { handle } => {
                alloc.release(&handle).await?;
                r.released += 1;
            }
        }
    }
    Ok((r, owners))
}

#[cfg(test)]
mod tests {
    use super::super::alias::alias;
    use super::*;
    use margay_api::ipam::AllocationRecord;

    #[tokio::test]
    async fn without_the_datastore_no_pod_is_touched() {
        // An agent restarting while the API is down must not read "no
        // allocations" and remove every pod's interface.
        let store = std::sync::Arc::new(margay_ipam::MemStore::new());
        let alloc = Allocator::start(store.clone(), "n1", margay_ipam::Options::default());
        let dp = crate::dataplane::FakeDataplane::default();
        let spec = crate::dataplane::PodSpec {
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            host_if: "cali0123456789a".into(),
            addrs: vec!["10.0.0.5/32".parse().unwrap()],
            mtu: 1500,
            alias: "margay1 c1.eth0 10.0.0.5/32 default/web/u1".into(),
            owner: "c1.eth0".into(),
        };
        dp.add_pod(&spec).await.unwrap();
        store.set_reads_unavailable(true);
        assert!(apply("n1", &alloc, &dp).await.is_err());
        assert!(dp.pods.lock().unwrap().contains_key("cali0123456789a"));
    }

    #[test]
    fn a_pod_in_a_corrupt_block_is_left_alone() {
        let pods = [HostPod {
            host_if: "cali0123456789a".into(),
            index: 3,
            alias: alias("net/c1/eth0", &["10.0.0.5/32".parse().unwrap()], None),
        }];
        let mut b = Block::new("10.0.0.0/26".parse().unwrap(), "p", "n1");
        // Fine, its address unallocated: the interface goes.
        assert!(matches!(
            plan("n1", &pods, &[b.clone()])[..],
            [Action::RemoveLink { .. }]
        ));
        // Corrupt: who holds 10.0.0.5 is unknown, nothing is done.
        b.corrupt = Some("allocation key \"x\"".into());
        assert_eq!(plan("n1", &pods, &[b]), vec![]);
    }

    fn block(allocs: &[(&str, &str, &str)]) -> Block {
        let mut b = Block::new("10.0.0.0/26".parse().unwrap(), "p", "n1");
        for (ip, h, node) in allocs {
            b.allocations.insert(
                ip.parse().unwrap(),
                AllocationRecord {
                    handle: h.to_string(),
                    node: node.to_string(),
                    use_: AllowedUse::Workload,
                    pod: None,
                    since: String::new(),
                },
            );
        }
        b
    }

    fn pod(host_if: &str, handle: &str, ip: &str) -> HostPod {
        let p = PodRef {
            namespace: "ns".into(),
            name: host_if.into(),
            uid: "u".into(),
        };
        HostPod {
            index: 0,
            host_if: host_if.into(),
            alias: alias(handle, &[format!("{ip}/32").parse().unwrap()], Some(&p)),
        }
    }

    #[test]
    fn settles_every_disagreement_and_nothing_else() {
        let blocks = vec![block(&[
            ("10.0.0.1", "a.eth0", "n1"),      // backed: kept
            ("10.0.0.2", "spare.n1.7", "n1"),  // lost rename for b
            ("10.0.0.3", "other.eth0", "n2"),  // c's address is someone else's
            ("10.0.0.5", "gone.eth0", "n1"),   // no interface: release
            ("10.0.0.6", "spare.n1.8", "n1"),  // a spare: left alone
            ("10.0.0.7", "remote.eth0", "n2"), // another node's: left alone
        ])];
        let pods = vec![
            pod("cali-a", "a.eth0", "10.0.0.1"),
            pod("cali-b", "b.eth0", "10.0.0.2"),
            pod("cali-c", "c.eth0", "10.0.0.3"),
            pod("cali-d", "d.eth0", "10.0.0.4"),
            HostPod {
                index: 0,
                host_if: "cali-foreign".into(),
                alias: String::new(),
            },
        ];
        let actions = plan("n1", &pods, &blocks);
        assert_eq!(actions.len(), 4, "{actions:#?}");
        assert!(actions.contains(&Action::Rename {
            from: "spare.n1.7".into(),
            to: "b.eth0".into(),
            addrs: vec!["10.0.0.2".parse().unwrap()],
            pod: Some(PodRef {
                namespace: "ns".into(),
                name: "cali-b".into(),
                uid: "u".into()
            }),
        }));
        assert!(actions.iter().any(
            |a| matches!(a, Action::RemoveLink { host_if, why } if host_if == "cali-c" && why.contains("held by other.eth0"))
        ));
        assert!(actions.iter().any(
            |a| matches!(a, Action::RemoveLink { host_if, why } if host_if == "cali-d" && why.contains("not allocated"))
        ));
        assert!(actions.contains(&Action::Release {
            handle: "gone.eth0".into()
        }));
        // Settled state plans nothing.
        assert!(plan("n1", &pods[..1], &[block(&[("10.0.0.1", "a.eth0", "n1")])]).is_empty());
    }
}
