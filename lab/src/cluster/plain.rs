//! The plain lab's bootstrap: an apiserver with Margay's CRDs and the
//! lab's settings (IPAM configuration, pools, BGP configuration and
//! peers), a node namespace per lab node with its Node object, an
//! apiserver relay and a conflist, and a `margay-agent` run by the lab on
//! each (`agents.rs`).

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node as KubeNode, ServiceAccount};
use kube::api::{Api, PostParams};
use margay_api::bgp::{BGPConfiguration, BGPConfigurationSpec, BGPPeer, BGPPeerSpec};
use margay_api::ipam::{
    CONFIG_NAME, IPAMConfiguration, IPAMConfigurationSpec, IPPool, IPPoolSpec, LabelSelector,
};
use margay_harness::kube::ApiServer;

use super::{Cluster, Ground, LabNode, Options, RR_LABEL, create_unless_there, json, tor};
use crate::Tor;

/// Creates the agents' Lease namespace ([`margay_api::node::LEASE_NAMESPACE`])
/// as the manifest does: agents started with their default flags write
/// their leader and heartbeat Leases there, and without it none leads.
pub async fn create_lease_namespace(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = json(serde_json::json!({"metadata": {"name": margay_api::node::LEASE_NAMESPACE}}))?;
    create_unless_there(&api, &ns)
        .await
        .context("creating the Lease namespace")
}

/// Builds the plain lab and starts every agent.
pub(super) async fn start(opts: Options) -> anyhow::Result<Cluster> {
    let api = ApiServer::start().await.context("kube-apiserver")?;
    let client = api.client().await?;
    margay_harness::kube::crds::install(&client)
        .await
        .context("CRDs")?;
    create_lease_namespace(&client).await?;
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sa.create(
        &PostParams::default(),
        &json(serde_json::json!({"metadata": {"name": "default"}}))?,
    )
    .await?;
    let cfgs: Api<IPAMConfiguration> = Api::all(client.clone());
    let ipam = IPAMConfigurationSpec {
        leak_grace_seconds: opts.leak_grace,
        ..Default::default()
    };
    cfgs.create(
        &PostParams::default(),
        &IPAMConfiguration::new(CONFIG_NAME, ipam),
    )
    .await?;
    let mut pool = IPPoolSpec::with_cidr(&opts.pool_cidr, Some(opts.block_size));
    pool.encapsulation = opts.encap.pool();
    let pools: Api<IPPool> = Api::all(client.clone());
    pools
        .create(&PostParams::default(), &IPPool::new("default", pool))
        .await?;
    if let Some(cidr) = &opts.pool6_cidr {
        pools
            .create(
                &PostParams::default(),
                &IPPool::new("default-v6", IPPoolSpec::with_cidr(cidr, None)),
            )
            .await?;
    }
    let bgp: Api<BGPConfiguration> = Api::all(client.clone());
    bgp.create(
        &PostParams::default(),
        &BGPConfiguration::new(
            "default",
            BGPConfigurationSpec {
                as_number: Some(64512),
                node_to_node_mesh_enabled: Some(opts.route_reflectors == 0),
                ..Default::default()
            },
        ),
    )
    .await?;
    let peers: Api<BGPPeer> = Api::all(client.clone());
    if opts.tor != Tor::None {
        peers
            .create(&PostParams::default(), &tor::peer(Some(9)))
            .await?;
    }
    if opts.route_reflectors > 0 {
        let mut sel = LabelSelector::default();
        sel.match_labels.insert(RR_LABEL.into(), "true".into());
        peers
            .create(
                &PostParams::default(),
                &BGPPeer::new(
                    "route-reflectors",
                    BGPPeerSpec {
                        peer_selector: Some(sel),
                        ..Default::default()
                    },
                ),
            )
            .await?;
    }
    let ground = Ground::new(&opts)?;
    let kube_nodes: Api<KubeNode> = Api::all(client.clone());
    let mut nodes = Vec::new();
    for i in 1..=opts.nodes {
        let name = format!("node{i}");
        let node = ground.fabric.add_node_in(&name, opts.subnet_of(i))?;
        let rr = i <= opts.route_reflectors;
        let mut meta =
            serde_json::json!({"name": name, "labels": {"kubernetes.io/hostname": name}});
        if rr {
            meta["labels"][RR_LABEL] = "true".into();
            meta["annotations"] = serde_json::json!({
                margay_api::node::ANN_RR_CLUSTER_ID: "244.0.0.1"
            });
        }
        kube_nodes
            .create(
                &PostParams::default(),
                &json(serde_json::json!({
                    "metadata": meta,
                    "status": {"addresses": [{"type": "InternalIP", "address": node.v4.to_string()}]}
                }))?,
            )
            .await?;
        let relay = api.expose_in(&node.ns)?;
        let socket = ground.work.path().join(format!("{name}.sock"));
        let conflist = ground.work.path().join(format!("{name}.conflist"));
        std::fs::write(
            &conflist,
            serde_json::json!({"cniVersion": "1.0.0", "name": "margay",
                "plugins": [{"type": "margay", "socket": socket}]})
            .to_string(),
        )?;
        nodes.push(LabNode {
            _relay: Some(relay),
            ..LabNode::new(name, node, socket, conflist)
        });
    }
    let mut c = Cluster::new(ground, api, client, nodes, opts);
    for i in 0..c.nodes.len() {
        c.start_agent(i)?;
    }
    Ok(c)
}
