//! Pool status and deletion: writes each IPPool's `status` (conditions
//! `Ready` and `Exhausted`, usage counts) and manages the `margay.dev/ipam`
//! finalizer, so a pool in use is not removed until its last address is
//! released (its deletion is reported as `Ready=False, Terminating` with
//! the number of addresses still allocated).

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use margay_ipam::crd::{IPPool, POOL_FINALIZER};
use margay_ipam::model::pool_statuses;
use margay_ipam::{Store, now_rfc3339};

use crate::kube_store::KubeStore;

/// One pass over every pool. Finalizer changes carry the resourceVersion
/// just read, so a pool changed meanwhile is left for the next pass.
pub async fn reconcile(client: &Client) -> anyhow::Result<()> {
    let api: Api<IPPool> = Api::all(client.clone());
    let pools = api.list(&ListParams::default()).await?.items;
    let store = KubeStore::new(client.clone(), std::time::Duration::ZERO);
    let blocks = store.list_blocks().await?;
    let statuses = pool_statuses(&pools, &blocks);
    let now = now_rfc3339();
    for pool in &pools {
        let name = pool.name_any();
        let Some((_, mut status)) = statuses.iter().find(|(n, _)| *n == name).cloned() else {
            continue;
        };
        for c in &mut status.conditions {
            let old = pool
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|o| o.type_ == c.type_));
            c.last_transition_time = match old {
                Some(o) if o.status == c.status => o.last_transition_time.clone(),
                _ => Some(now.clone()),
            };
        }
        let mut rv = pool.resource_version();
        if pool.status.as_ref() != Some(&status) {
            let updated = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status })),
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
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
            }
        } else if has && status.allocated == 0 {
            for b in blocks
                .iter()
                .filter(|b| b.pool == name && b.allocations.is_empty())
            {
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
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
            tracing::info!(pool = %name, "pool released");
        }
    }
    Ok(())
}
