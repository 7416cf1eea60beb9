//! Routes for the node's own blocks: one blackhole route per block affine
//! to this node (protocol [`RTPROT_MARGAY_POD`]), so traffic for an
//! address of the block that no pod holds is dropped here instead of
//! following the default route out (and looping back from the router that
//! learned the block from us). Pods' /32 routes are more specific and win.
//!
//! Desired state comes from IPAM; [`diff`] (pure) compares it with the
//! kernel's blackholes of our protocol; [`sync`] applies the difference.
//! Blackholes of other protocols are never listed, so never touched.
//!
//! [`RTPROT_MARGAY_POD`]: crate::dataplane::RTPROT_MARGAY_POD

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use margay_ipam::{Allocator, Block};
use tokio::sync::Notify;

use crate::dataplane::Dataplane;

/// The blackholes this node should have: one per block affine to it.
pub fn desired(node: &str, blocks: &[Block]) -> BTreeSet<IpNetwork> {
    blocks
        .iter()
        .filter(|b| b.node.as_deref() == Some(node))
        .map(|b| b.cidr)
        .collect()
}

/// (to add, to remove) so that `have` becomes `want`.
pub fn diff(
    want: &BTreeSet<IpNetwork>,
    have: &BTreeSet<IpNetwork>,
) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
    (
        want.difference(have).copied().collect(),
        have.difference(want).copied().collect(),
    )
}

/// One pass: reads IPAM and the kernel, applies the difference; returns
/// the node's blocks.
pub async fn sync<D: Dataplane>(
    node: &str,
    alloc: &Allocator,
    dp: &D,
) -> anyhow::Result<BTreeSet<IpNetwork>> {
    let want = desired(node, &alloc.blocks().await?);
    let have: BTreeSet<IpNetwork> = dp.list_blackholes().await?.into_iter().collect();
    let (add, del) = diff(&want, &have);
    for net in &add {
        dp.set_blackhole(*net, true).await?;
        tracing::info!(block = %net, "blackhole route added");
    }
    for net in &del {
        dp.set_blackhole(*net, false).await?;
        tracing::info!(block = %net, "blackhole route removed (block no longer ours)");
    }
    Ok(want)
}

/// Keeps the blackholes (and the pods' host routes) in step: a pass at
/// start, on every poke (after an ADD, which may have claimed a block) and
/// every `every` (resync). The node's blocks are published on `own` (what
/// BGP advertises).
pub async fn run<D: Dataplane>(
    node: String,
    alloc: Allocator,
    dp: Arc<D>,
    poke: Arc<Notify>,
    every: Duration,
    own: tokio::sync::watch::Sender<BTreeSet<IpNetwork>>,
) {
    loop {
        match sync(&node, &alloc, dp.as_ref()).await {
            Ok(want) => {
                own.send_if_modified(|o| {
                    let changed = *o != want;
                    *o = want;
                    changed
                });
            }
            Err(e) => tracing::warn!("block routes: {e}"),
        }
        // Pods' host routes: put back what someone removed.
        if let Err(e) = dp.resync_pod_routes().await {
            tracing::warn!("pod routes: {e}");
        }
        tokio::select! {
            _ = poke.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::FakeDataplane;
    use margay_ipam::{MemStore, Options};

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
        assert!(sync("n1", &alloc, &dp).await.is_err());
        assert!(dp.blackholes.lock().unwrap().contains(&block));
        store.set_reads_unavailable(false);
        assert_eq!(alloc.blocks().await.unwrap(), vec![]);
        // Readable and really empty: the stale blackhole goes.
        assert_eq!(sync("n1", &alloc, &dp).await.unwrap(), BTreeSet::new());
        assert!(dp.blackholes.lock().unwrap().is_empty());
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn only_own_blocks_and_only_the_difference() {
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
        let have: BTreeSet<_> = [net("10.0.0.0/26"), net("10.9.0.0/26")]
            .into_iter()
            .collect();
        let (add, del) = diff(&want, &have);
        assert_eq!(add, vec![net("fd00::/122")]);
        assert_eq!(del, vec![net("10.9.0.0/26")]);
        assert_eq!(diff(&want, &want), (vec![], vec![]));
    }
}
