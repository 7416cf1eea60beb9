//! The `Valid` condition of BGP objects (BGPConfiguration, BGPPeer): what
//! the agent found wrong with each, or that it is in use. Written only when
//! it says something new; its transition time moves only with its status.

use kube::Resource;
use kube::api::Patch;
use margay_api::bgp::BGPStatus;
use margay_api::condition::{Condition, find};

/// The condition for a validation result (what is wrong, as its message),
/// with its transition time from the object's current `status`; `None`
/// when the object already says so.
pub fn valid_condition<E: std::fmt::Display>(
    res: Result<(), E>,
    status: Option<&BGPStatus>,
) -> Option<Condition> {
    let old = status.and_then(|s| find(&s.conditions, "Valid"));
    let c = match res {
        Ok(()) => Condition::new("Valid", true, "Valid", "in use"),
        Err(e) => Condition::new("Valid", false, "Invalid", e.to_string()),
    }
    .since(old);
    (!c.same(old)).then_some(c)
}

/// Writes object `name`'s `Valid` condition.
pub async fn write<K>(client: &kube::Client, name: &str, c: &Condition) -> crate::Result<()>
where
    K: Resource<Scope = kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let patch = serde_json::json!({"status": {"conditions": [c]}});
    let what = format!("the Valid condition of {name}");
    super::patch_status::<K>(client, name, &Patch::Merge(&patch), &what).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_condition_keeps_its_transition_time() {
        let first = valid_condition(Err("bad"), None).unwrap();
        assert_eq!(first.status, "False");
        let st = BGPStatus {
            conditions: vec![first.clone()],
        };
        assert!(valid_condition(Err("bad"), Some(&st)).is_none());
        let fixed = valid_condition(Ok::<(), &str>(()), Some(&st)).unwrap();
        assert_eq!(fixed.status, "True");
    }
}
