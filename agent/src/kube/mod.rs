//! The agent's side of the Kubernetes API, as plain functions over a
//! client: watched inputs that know whether they are current ([`Known`],
//! and if not [`Why`], from `margay_api::known` through
//! `margay_ipam::k8s::reflect`), [`node`] (this node's identity annotations and its
//! `MargayReady` condition), [`valid`] (the `Valid` condition of BGP
//! objects), [`secrets`] (BGP passwords, watched by name), [`lease`] (the
//! leader election and this agent's heartbeat). What to write is decided
//! elsewhere (the routing plan); this module only reads and writes.

pub mod lease;
pub mod node;
pub mod secrets;
pub mod valid;

pub use margay_ipam::k8s::reflect::{Known, Op, Watched, Why, watch, watch_with, why_of};

/// How long the agent waits for one API write before it gives up on it
/// (it is retried on the next pass): a frozen apiserver must not hold a
/// loop that also keeps the data plane.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `fut`, or [`crate::Error::NoAnswer`] after [`DEADLINE`].
pub(crate) async fn deadline<T>(
    what: impl FnOnce() -> String,
    fut: impl std::future::Future<Output = crate::Result<T>>,
) -> crate::Result<T> {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(r) => r,
        Err(_) => Err(crate::Error::NoAnswer {
            what: what(),
            secs: DEADLINE.as_secs(),
        }),
    }
}

/// Patches the status of cluster-scoped object `name` (`what` names it in
/// the error).
pub(crate) async fn patch_status<K>(
    client: &::kube::Client,
    name: &str,
    patch: &::kube::api::Patch<&serde_json::Value>,
    what: &str,
) -> crate::Result<()>
where
    K: ::kube::Resource<Scope = ::kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let api: ::kube::Api<K> = ::kube::Api::all(client.clone());
    api.patch_status(name, &::kube::api::PatchParams::default(), patch)
        .await
        .map_err(|e| crate::Error::kube(what.to_string(), e))?;
    Ok(())
}
