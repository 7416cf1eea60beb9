//! Pool status and deletion: writes each IPPool's `status` (conditions
//! `Ready` and `Exhausted`, usage counts) and manages the `margay.dev/ipam`
//! finalizer, so a pool in use is not removed until its last address is
//! released (its deletion is reported as `Ready=False, Terminating` with
//! the number of addresses still allocated).

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use margay_api::ipam::{IPPool, POOL_FINALIZER};

use super::KubeStore;
use crate::Store;
use crate::model::pool_statuses;

/// One pass over every pool, read from the API now (one-shot callers).
pub async fn reconcile(client: &Client) -> crate::Result<()> {
    reconcile_with(&KubeStore::new(client.clone(), std::time::Duration::ZERO)).await
}

/// One pass over every pool, reading pools and blocks through `store`
/// (the cluster-wide store serves them from its watches: a pass with
/// nothing to change makes no request). Finalizer changes carry the
/// resourceVersion just read, so a pool changed meanwhile is left for the
/// next pass.
pub async fn reconcile_with(store: &KubeStore) -> crate::Result<()> {
    let api: Api<IPPool> = Api::all(store.client().clone());
    let pools = store.pools().await?;
    let blocks = store.list_blocks().await?;
    let statuses = pool_statuses(&pools, &blocks);
    for pool in &pools {
        let name = pool.name_any();
        let Some((_, mut status)) = statuses.iter().find(|(n, _)| *n == name).cloned() else {
            continue;
        };
        let old = pool.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        status.conditions = status
            .conditions
            .into_iter()
            .map(|c| {
                let prev = margay_api::condition::find(old, &c.type_);
                c.since(prev)
            })
            .collect();
        let mut rv = pool.resource_version();
        if pool.status.as_ref() != Some(&status) {
            let patch = Patch::Merge(serde_json::json!({ "status": status }));
            let pp = PatchParams::default();
            let updated = super::ask(
                &format!("ippool {name} status"),
                api.patch_status(&name, &pp, &patch),
            )
            .await?;
            rv = updated.resource_version();
        }
        let finalizers = pool.finalizers().to_vec();
        let has = finalizers.iter().any(|f| f == POOL_FINALIZER);
        if pool.metadata.deletion_timestamp.is_none() {
            if !has {
                let mut f = finalizers.clone();
                f.push(POOL_FINALIZER.to_string());
                let patch =
                    serde_json::json!({"metadata": {"finalizers": f, "resourceVersion": rv}});
                let (pp, patch) = (PatchParams::default(), Patch::Merge(patch));
                super::ask(&format!("ippool {name}"), api.patch(&name, &pp, &patch)).await?;
            }
        } else if has
            && status.allocated == 0
            && !blocks.iter().any(|b| b.pool == name && b.corrupt.is_some())
        {
            for b in blocks.iter().filter(|b| b.pool == name && b.is_empty()) {
                if let Err(e) = store
                    .delete_block(&b.name, b.version.as_deref().unwrap_or(""))
                    .await
                {
                    tracing::info!(pool = %name, block = %b.name, "block not deleted yet: {e}");
                    return Ok(());
                }
            }
            let f: Vec<&String> = finalizers.iter().filter(|f| *f != POOL_FINALIZER).collect();
            let patch = serde_json::json!({"metadata": {"finalizers": f, "resourceVersion": rv}});
            let (pp, patch) = (PatchParams::default(), Patch::Merge(patch));
            super::ask(&format!("ippool {name}"), api.patch(&name, &pp, &patch)).await?;
            tracing::info!(pool = %name, "pool released");
        }
    }
    Ok(())
}
