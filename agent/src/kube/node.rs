//! This node's Node object and its `MargayNode`: the identity the agent
//! publishes (the `MargayNode`, and the annotations `margay.dev/bgp-address`
//! ... for operators and earlier agents) and its `MargayReady` condition with the
//! `NetworkUnavailable=False` that tells the scheduler the network is up.
//! The patch builders are pure; writing is one merge or strategic patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use margay_api::condition::{now_rfc3339, transition};
use margay_api::node::{
    CONDITION, HEARTBEAT, REASON_INCOMPLETE, REASON_UP, condition, heartbeat_within,
};

/// Annotations to set (`None`: remove).
pub type Annotations = BTreeMap<String, Option<String>>;

/// Whether `node` already carries `want`.
pub fn has_annotations(node: &Node, want: &Annotations) -> bool {
    let have = node.annotations();
    want.iter().all(|(k, v)| have.get(k) == v.as_ref())
}

/// Sets (and removes) annotations on Node `name`.
pub async fn annotate(client: &Client, name: &str, want: &Annotations) -> crate::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({"metadata": {"annotations": want}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| crate::Error::kube(format!("annotating Node {name}"), e))?;
    Ok(())
}

/// Writes node `name`'s `MargayNode` (server-side apply: created when
/// missing, the agent's fields replaced).
pub async fn write_identity(
    client: &Client,
    name: &str,
    want: &margay_api::identity::Wanted,
) -> crate::Result<()> {
    use margay_api::identity::MargayNode;
    let api: Api<MargayNode> = Api::all(client.clone());
    api.patch(
        name,
        &PatchParams::apply("margay-agent").force(),
        &Patch::Apply(&want.object(name)),
    )
    .await
    .map_err(|e| crate::Error::kube(format!("writing MargayNode {name}"), e))?;
    Ok(())
}

/// The status patch that makes `node`'s condition say `problems` (none:
/// routing is complete), or `None` when it already does and its heartbeat
/// is recent.
pub fn condition_patch(node: &Node, problems: &[String]) -> Option<serde_json::Value> {
    let (status, reason, message) = if problems.is_empty() {
        ("True", REASON_UP, "routing is complete".to_string())
    } else {
        ("False", REASON_INCOMPLETE, problems.join("; "))
    };
    let cur = condition(node, CONDITION);
    let net = condition(node, "NetworkUnavailable");
    if cur.is_some_and(|c| {
        c.status == status
            && c.reason.as_deref() == Some(reason)
            && c.message.as_deref() == Some(message.as_str())
            && heartbeat_within(c, HEARTBEAT)
    }) && net.is_some_and(|c| c.status == "False")
    {
        return None;
    }
    let now = now_rfc3339();
    let since = transition(
        cur.map(|c| c.status.as_str()),
        cur.and_then(|c| c.last_transition_time.as_ref().map(|t| t.0.to_string())),
        status,
        || now.clone(),
    );
    Some(serde_json::json!({"status": {"conditions": [
        {"type": CONDITION, "status": status, "reason": reason, "message": message,
         "lastHeartbeatTime": now, "lastTransitionTime": since},
        {"type": "NetworkUnavailable", "status": "False", "reason": REASON_UP,
         "message": "margay-agent is running on this node",
         "lastHeartbeatTime": now, "lastTransitionTime": now},
    ]}}))
}

/// Writes a status patch from [`condition_patch`].
pub async fn patch_status(
    client: &Client,
    name: &str,
    patch: &serde_json::Value,
) -> crate::Result<()> {
    let what = format!("the condition of Node {name}");
    super::patch_status::<Node>(client, name, &Patch::Strategic(patch), &what).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_is_written_only_when_it_changes_or_its_heartbeat_is_due() {
        let mut n: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).unwrap();
        let p = condition_patch(&n, &[]).expect("no condition yet");
        let conds: Vec<k8s_openapi::api::core::v1::NodeCondition> =
            serde_json::from_value(p["status"]["conditions"].clone()).unwrap();
        n.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            conditions: Some(conds.clone()),
            ..Default::default()
        });
        assert!(condition_patch(&n, &[]).is_none(), "same and fresh");
        let p = condition_patch(&n, &["IPIP unsupported".into()]).unwrap();
        assert_eq!(p["status"]["conditions"][0]["status"], "False");
        assert_eq!(p["status"]["conditions"][0]["message"], "IPIP unsupported");
        assert_eq!(p["status"]["conditions"][0]["reason"], REASON_INCOMPLETE);
    }
}
