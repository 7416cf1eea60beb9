//! This node's own blocks: one blackhole route per block affine to this
//! node (protocol 78), so traffic for an address of the block that no pod
//! holds is dropped here instead of following the default route out (and
//! looping back from the router that learned the block from us); pods' /32
//! routes are more specific and win. The blocks are published (as
//! [`Known`]) for the routing loop, which advertises them.
//!
//! Pods' host routes are kept here too: put back when someone removed one,
//! removed when no Margay interface backs it (the interfaces' aliases say
//! which addresses each carries).
//!
//! What the node routes for is published as one [`Local`]: its blocks and
//! the addresses its pods hold. An address borrowed from another node's
//! block (the pool had no free block) is advertised as a host route, so
//! traffic for it does not follow the lender's block route into the
//! lender's blackhole (Calico does the same).
//!
//! Desired state comes from IPAM: an unreadable block list is no list, so
//! nothing is removed and the last known blocks stay published as stale.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use margay_delta::Removals;
use margay_ipam::{Allocator, Block};
use tokio::sync::{Notify, watch};

use crate::cni::alias;
use crate::dataplane::{Dataplane, sync};
use crate::kube::{Known, Why};

pub use crate::dataplane::routed::Local;

/// The blackholes this node should have: one per block affine to it.
pub fn desired(node: &str, blocks: &[Block]) -> BTreeSet<IpNetwork> {
    blocks
        .iter()
        .filter(|b| b.node.as_deref() == Some(node))
        .map(|b| b.cidr)
        .collect()
}

/// One pass over the blackholes: reads IPAM and the kernel, applies the
/// difference; returns the node's blocks.
pub async fn sync_blackholes<D: Dataplane>(
    node: &str,
    alloc: &Allocator,
    dp: &D,
) -> crate::Result<BTreeSet<IpNetwork>> {
    let want = desired(node, &alloc.blocks().await?);
    let r = sync::blackholes(dp, &want, Removals::Allowed).await?;
    if r.changed > 0 {
        tracing::info!(blocks = ?want, changed = r.changed, "blackhole routes updated");
    }
    for f in &r.failed {
        tracing::warn!("block routes: {f}");
    }
    Ok(want)
}

/// One pass over the pods' host routes: what the interfaces' aliases say,
/// against the kernel's routes of Margay's protocol. Returns the pods'
/// addresses (host networks).
pub async fn sync_pod_routes<D: Dataplane>(dp: &D) -> crate::Result<BTreeSet<IpNetwork>> {
    let mut want: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for p in dp.list_pods().await? {
        if let Some(at) = alias::parse(&p) {
            for ip in at.addrs {
                want.insert(ip, p.index);
            }
        }
    }
    let r = sync::pod_routes(dp, &want, Removals::Allowed).await?;
    if r.changed > 0 {
        tracing::info!(changed = r.changed, "pod host routes put back or removed");
    }
    for f in &r.failed {
        tracing::warn!("pod routes: {f}");
    }
    Ok(want.keys().map(|ip| IpNetwork::from(*ip)).collect())
}

/// The shortest time between two passes woken by pokes: a burst of ADDs
/// makes one pass per this, not one per ADD (each pass dumps the kernel's
/// links and routes, which competes with the ADDs for the RTNL lock).
const POKE_GAP: Duration = Duration::from_millis(500);

/// Keeps the blackholes and the pods' host routes in step: a pass at
/// start, after a poke (an ADD or DEL outside the published blocks, or a
/// block claim; at most one per [`POKE_GAP`]) and every `every` (resync). What
/// the node routes for is published on `own`, [`Known::Fresh`] only when
/// both its blocks and its pods were read.
pub async fn run<D: Dataplane>(
    node: String,
    alloc: Allocator,
    dp: Arc<D>,
    poke: Arc<Notify>,
    every: Duration,
    own: watch::Sender<Known<Local>>,
) -> crate::Result<()> {
    loop {
        let pass = tokio::time::Instant::now();
        let blocks = sync_blackholes(&node, &alloc, dp.as_ref())
            .await
            .map_err(|e| Why::Local {
                what: "read this node's blocks",
                error: e.to_string(),
            });
        let pods = sync_pod_routes(dp.as_ref()).await.map_err(|e| Why::Local {
            what: "list this node's pods",
            error: e.to_string(),
        });
        match (blocks, pods) {
            (Ok(blocks), Ok(pods)) => {
                let now = Known::Fresh(Local { blocks, pods });
                own.send_if_modified(|o| {
                    let changed = *o != now;
                    *o = now;
                    changed
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("local routes: {e}");
                own.send_modify(|o| {
                    *o = std::mem::replace(o, Known::Unknown(Why::NotRead(None))).failed(e);
                });
            }
        }
        tokio::select! {
            // An ADD or DEL outside the published blocks, or a block
            // claimed (a spare refill too: it is advertised at once).
            _ = async {
                tokio::select! {
                    _ = poke.notified() => {}
                    _ = alloc.block_claimed() => {}
                }
            } => {
                // Pokes during the gap are folded into this one.
                tokio::time::sleep_until(pass + POKE_GAP).await;
            }
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::FakeDataplane;
    use margay_ipam::{MemStore, Options};

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn an_unreadable_datastore_changes_no_route() {
        // The allocator cannot list blocks (fresh start, API down): the
        // pass fails; it must not read that as "no blocks" and remove the
        // node's blackholes (nor, through `own`, withdraw them from BGP).
        let store = std::sync::Arc::new(MemStore::new());
        let alloc = Allocator::start(store.clone(), "n1", Options::default());
        let dp = FakeDataplane::default();
        let block = net("10.0.0.0/26");
        dp.set_blackhole(block, true).await.unwrap();
        store.set_reads_unavailable(true);
        assert!(alloc.blocks().await.is_err());
        assert!(sync_blackholes("n1", &alloc, &dp).await.is_err());
        assert!(dp.blackholes.lock().unwrap().contains(&block));
        store.set_reads_unavailable(false);
        assert_eq!(alloc.blocks().await.unwrap(), vec![]);
        // Readable and really empty: the stale blackhole goes.
        assert_eq!(
            sync_blackholes("n1", &alloc, &dp).await.unwrap(),
            BTreeSet::new()
        );
        assert!(dp.blackholes.lock().unwrap().is_empty());
    }

    #[test]
    fn only_own_blocks() {
        let mut other = Block::new(net("10.0.0.64/26"), "p", "n2");
        other.allocations.clear();
        let mut orphan = Block::new(net("10.0.0.128/26"), "p", "n1");
        orphan.node = None;
        let blocks = vec![
            Block::new(net("10.0.0.0/26"), "p", "n1"),
            other,
            orphan,
            Block::new(net("fd00::/122"), "p6", "n1"),
        ];
        let want = desired("n1", &blocks);
        assert_eq!(
            want,
            [net("10.0.0.0/26"), net("fd00::/122")]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn borrowed_addresses_are_advertised_and_others_borrowed_from_us_routed() {
        let own = Local {
            blocks: [net("10.0.0.0/26")].into(),
            pods: [net("10.0.0.5/32"), net("10.0.1.7/32")].into(),
        };
        // 10.0.1.7 is borrowed from another node's block: advertised alone.
        let adv: Vec<_> = own.advertised().copied().collect();
        assert_eq!(adv, vec![net("10.0.0.0/26"), net("10.0.1.7/32")]);
        // Ours, or inside our block: not routed elsewhere...
        assert!(own.shadows(&net("10.0.0.0/26")));
        assert!(own.shadows(&net("10.0.1.7/32")));
        assert!(own.shadows(&net("10.0.0.0/27")));
        assert!(own.shadows(&net("10.0.0.5/32")));
        // ...but the lender's block is (our pod's host route is more
        // specific), and so is an address of our block another node borrowed.
        assert!(!own.shadows(&net("10.0.1.0/26")));
        assert!(!own.shadows(&net("10.0.0.9/32")));
        assert!(!own.shadows(&net("10.0.2.0/26")));
    }

    #[tokio::test]
    async fn pod_routes_follow_the_interfaces_aliases() {
        let dp = FakeDataplane::default();
        let spec = crate::dataplane::PodSpec {
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            host_if: "cali0123456789a".into(),
            addrs: vec![net("10.0.0.5/32")],
            mtu: 1500,
            alias: alias::alias("c1.eth0", &[net("10.0.0.5/32")], None),
            owner: "c1.eth0".into(),
        };
        dp.add_pod(&spec).await.unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        dp.pod_routes.lock().unwrap().clear();
        dp.pod_routes
            .lock()
            .unwrap()
            .insert("10.0.0.9".parse().unwrap(), 7);
        let pods = sync_pod_routes(&dp).await.unwrap();
        assert_eq!(pods, [net("10.0.0.5/32")].into());
        let routes = dp.pod_routes.lock().unwrap().clone();
        assert_eq!(routes.keys().copied().collect::<Vec<_>>(), vec![ip]);
    }
}
