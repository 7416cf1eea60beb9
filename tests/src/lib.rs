//! Helpers shared by the integration tests in `tests/` (the tests
//! themselves live there); the `ipam-sim` binary is in `src/bin/`.

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use margay_harness::kube::ApiServer;
use margay_ipam::crd::{CONFIG_NAME, IPAMConfiguration, IPAMConfigurationSpec, IPPool, IPPoolSpec};

/// A real apiserver with Margay's CRDs, the `default` ServiceAccount, the
/// given Node objects, a pool `default` and the IPAM configuration.
pub async fn cluster(
    nodes: &[&str],
    pool_cidr: &str,
    block: u8,
    cfg: IPAMConfigurationSpec,
) -> (ApiServer, kube::Client) {
    let api = ApiServer::start().await.expect("apiserver");
    let client = api.client().await.expect("client");
    margay_agent::crds::install(&client).await.expect("CRDs");
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sa.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap(),
    )
    .await
    .expect("service account");
    let napi: Api<Node> = Api::all(client.clone());
    for n in nodes {
        napi.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).unwrap(),
        )
        .await
        .expect("node");
    }
    add_pool(&client, "default", pool_cidr, Some(block)).await;
    let cfgs: Api<IPAMConfiguration> = Api::all(client.clone());
    cfgs.create(
        &PostParams::default(),
        &IPAMConfiguration::new(CONFIG_NAME, cfg),
    )
    .await
    .expect("config");
    (api, client)
}

/// Creates a pool.
pub async fn add_pool(client: &kube::Client, name: &str, cidr: &str, block: Option<u8>) {
    let pools: Api<IPPool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &IPPool::new(name, IPPoolSpec::with_cidr(cidr, block)),
        )
        .await
        .expect("pool");
}

/// A CRI client for the sandbox calls (generated from
/// `tests/proto/cri_subset.proto`).
pub mod cri {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("runtime.v1");
}
