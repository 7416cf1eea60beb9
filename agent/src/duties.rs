//! The cluster-wide writes, done by the elected agent only
//! ([`crate::kube::lease::elect`]): each IPPool's status and in-use
//! finalizer, and garbage collection (addresses of deleted pods, blocks of
//! deleted nodes, `MargayNode`s and endpoint slices of deleted nodes).
//!
//! While this agent leads, it watches every pool, block, Node (metadata)
//! and Pod (metadata) through a cluster-wide store whose reads are current
//! or fail ([`KubeStore::cluster_watched`]): the pool status is recomputed
//! when any of them changes and written only where it differs; collection
//! runs every `gc_every` on the watched contents and reads the API only to
//! confirm a candidate right before releasing it. Losing the lease drops
//! the watches and stops both at once; a write already sent is a
//! compare-and-swap, so a former leader's late write cannot undo a newer
//! one.

use std::sync::Arc;
use std::time::Duration;

use margay_ipam::gc::Janitor;
use margay_ipam::k8s::KubeStore;
use margay_task::Owned;
use tokio::sync::{Notify, watch};

/// How often the pool status is recomputed when nothing pokes it (from the
/// watches: costs no request unless something differs).
const POOL_EVERY: Duration = Duration::from_secs(60);
/// Changes are gathered this long into one pool status pass.
const SETTLE: Duration = Duration::from_secs(1);

/// Runs the duties whenever `leader` is true; never ends.
pub async fn run(client: kube::Client, gc_every: Option<Duration>, leader: watch::Receiver<bool>) {
    let mut leader = leader;
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            // The election ended (the agent is stopping).
            return std::future::pending().await;
        }
        tracing::info!("leader: pool status and garbage collection run on this agent");
        tokio::select! {
            () = lead(client.clone(), gc_every) => {}
            _ = leader.wait_for(|l| !*l) => {}
        }
        tracing::info!("leader: pool status and garbage collection stopped on this agent");
    }
}

/// The duties of one term as leader (until dropped).
async fn lead(client: kube::Client, gc_every: Option<Duration>) {
    let poke = Arc::new(Notify::new());
    let (store, watches) = KubeStore::cluster_watched(client.clone(), poke.clone());
    let _watches = Owned::spawn(watches);
    // The MargayNodes, for their collection: watched while leading, so a
    // tick at rest reads no list.
    let (identities_seen, watch) = crate::kube::watch(
        kube::Api::all(client.clone()),
        "MargayNodes",
        Arc::new(Notify::new()),
    );
    let _identity_watch = Owned::spawn(watch);
    let store = Arc::new(store);
    let mut janitor = Janitor::new(store.clone());
    let mut gc = tokio::time::interval(gc_every.unwrap_or(Duration::from_secs(3600)));
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is immediate: collection starts one
    // period into the term, once the watches have listed.
    gc.tick().await;
    loop {
        tokio::select! {
            _ = poke.notified() => {
                tokio::time::sleep(SETTLE).await;
                pools(&store).await;
            }
            _ = tokio::time::sleep(POOL_EVERY) => pools(&store).await,
            _ = gc.tick(), if gc_every.is_some() => {
                match janitor.run_once().await {
                    Ok(r) if !r.released.is_empty() || !r.blocks_deleted.is_empty() => {
                        tracing::info!(
                            released = r.released.len(),
                            blocks = r.blocks_deleted.len(),
                            "garbage collection"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("garbage collection: {e}"),
                }
                match identities(&client, &store, &identities_seen).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "MargayNodes of deleted Nodes"),
                    Err(e) => tracing::warn!("MargayNode collection: {e}"),
                }
            }
        }
    }
}

async fn pools(store: &KubeStore) {
    if let Err(e) = margay_ipam::k8s::pools::reconcile_with(store).await {
        tracing::debug!("pool status: {e}");
    }
}

/// Writes the `MargayNode`s of nodes whose agent is of an earlier version
/// (annotations only); deletes those whose Node is gone, and their
/// endpoint slices: how many nodes' worth were deleted. Their owner
/// reference has the garbage collector do it where kube-controller-manager
/// runs; this covers clusters (and the lab) without it. A candidate is
/// confirmed by a live read of its Node right before, and deleted only as
/// the object that was watched (its UID as precondition). Nothing is done
/// while the MargayNodes' watch is not current; every request gives up
/// after [`crate::kube::DEADLINE`] (a frozen API server must not hold the
/// leader's duties).
async fn identities(
    client: &kube::Client,
    store: &KubeStore,
    seen: &crate::kube::Watched<margay_api::identity::MargayNode>,
) -> crate::Result<usize> {
    use crate::kube::{Known, deadline};
    use kube::ResourceExt;
    use kube::api::{Api, DeleteParams, ListParams, Preconditions};
    use margay_api::identity::MargayNode;
    use margay_ipam::store::Cluster;
    let api: Api<MargayNode> = Api::all(client.clone());
    let listed = match seen.read() {
        Known::Fresh(l) => l,
        Known::Stale(_, why) | Known::Unknown(why) => {
            tracing::debug!("MargayNode collection waits: {why}");
            return Ok(0);
        }
    };
    let nodes = store.nodes().await?;
    tracing::debug!(
        identities = listed.len(),
        nodes = nodes.len(),
        "MargayNode collection"
    );
    let slices: Api<margay_api::slice::MargayEndpointSlice> = Api::all(client.clone());
    let mut deleted = 0;
    // Nodes without one whose agent (of an earlier version) publishes its
    // identity in annotations only: written for it, as that agent would,
    // so upgraded agents keep peering with it; its own agent, once
    // upgraded, writes over it (the same field manager).
    let have: std::collections::BTreeSet<String> = listed.iter().map(|m| m.name_any()).collect();
    let whole: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for name in nodes.iter().filter(|n| !have.contains(*n)) {
        let what = || format!("reading Node {name}");
        let got = deadline(what, async {
            whole
                .get_opt(name)
                .await
                .map_err(|e| crate::Error::kube(what(), e))
        });
        let Some(n) = got.await? else {
            continue;
        };
        if let Some(w) = crate::routing::nodes::identity_from_annotations(&n) {
            deadline(
                || format!("writing MargayNode {name}"),
                crate::kube::node::write_identity(client, name, &w),
            )
            .await?;
            tracing::info!(node = %name, "wrote the MargayNode of a node whose agent publishes annotations only");
        }
    }
    for m in listed.iter().filter(|m| !nodes.contains(&m.name_any())) {
        let name = m.name_any();
        if store.node_exists(&name).await? {
            continue;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: m.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        let what = || format!("deleting MargayNode {name}");
        let gone = deadline(what, async {
            match api.delete(&name, &dp).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
                Err(e) => Err(crate::Error::kube(what(), e)),
            }
        });
        deleted += usize::from(gone.await?);
        // Its endpoint slices with it (found by their node label).
        let lp = ListParams::default().labels(&format!(
            "{}={}",
            margay_api::slice::SLICE_NODE_LABEL,
            margay_api::slice::node_label(&name)
        ));
        let what = || format!("deleting node {name}'s endpoint slices");
        deadline(what, async {
            slices
                .delete_collection(&DeleteParams::default(), &lp)
                .await
                .map_err(|e| crate::Error::kube(what(), e))
        })
        .await?;
    }
    Ok(deleted)
}
