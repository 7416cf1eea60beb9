//! A node's identity as the other nodes read it: the `MargayNode`
//! resource (Cilium's `CiliumNode` and Calico's own `Node` are the
//! models). Each agent writes its own node's, named as its Node, only when
//! what it says changes (its BGP address, AS, tunnel addresses, reflector
//! role, the Node's addresses and labels); every agent watches them all
//! instead of whole Node objects, whose status the kubelet rewrites every
//! few minutes (at 1,000 nodes that was three Node events a second to
//! every agent, each a few KiB). Owned by its Node, so it goes with it.
//!
//! Values are kept as the API holds them (text); a reader treats one it
//! cannot parse as absent, as it did the annotations before.
#![allow(clippy::duplicated_attributes)] // repeated `type_ = ...` in printcolumn(...) lists

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What one node's agent says about its node.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "MargayNode",
    plural = "margaynodes",
    shortname = "mnode",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.bgpAddress"),
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(
        name = "VXLAN",
        type_ = "string",
        json_path = ".spec.vxlanTunnelAddress"
    ),
    printcolumn(name = "IPIP", type_ = "string", json_path = ".spec.ipipTunnelAddress"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MargayNodeSpec {
    /// The node's BGP address with its subnet length, e.g. `10.0.0.5/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_address: Option<String>,
    /// The node's AS number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Its VXLAN device's address, once the device takes packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_tunnel_address: Option<String>,
    /// Its VXLAN device's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_tunnel_mac: Option<String>,
    /// Its IPIP tunnel address (on `tunl0`), once `tunl0` is up with it:
    /// the other nodes encapsulate to this node only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_tunnel_address: Option<String>,
    /// The route reflector cluster ID, when the node is one (copied from
    /// the Node's `margay.dev/route-reflector-cluster-id` annotation, which
    /// operators set).
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
    /// The Node's InternalIP and ExternalIP addresses (where its
    /// encapsulated packets may come from besides its BGP address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// A `MargayNode` as its agent wants it: the spec, and the Node's labels
/// (BGPPeer selectors match them) and UID (its owner).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The spec.
    pub spec: MargayNodeSpec,
    /// The Node's labels.
    pub labels: BTreeMap<String, String>,
    /// The Node's UID.
    pub node_uid: String,
}

impl Wanted {
    /// Whether `have` already says this (labels, spec and owner).
    pub fn is_written(&self, have: &MargayNode) -> bool {
        have.spec == self.spec
            && have.metadata.labels.clone().unwrap_or_default() == self.labels
            && have
                .metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|o| o.uid == self.node_uid))
    }

    /// The object to apply as node `name`'s.
    pub fn object(&self, name: &str) -> MargayNode {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut m = MargayNode::new(name, self.spec.clone());
        m.metadata.labels = Some(self.labels.clone());
        m.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: name.to_string(),
            uid: self.node_uid.clone(),
            ..Default::default()
        }]);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_means_same_spec_labels_and_owner() {
        let w = Wanted {
            spec: MargayNodeSpec {
                bgp_address: Some("10.0.0.1/24".into()),
                as_number: Some(64512),
                ..Default::default()
            },
            labels: [("a".to_string(), "b".to_string())].into(),
            node_uid: "u1".into(),
        };
        let have = w.object("n");
        assert!(w.is_written(&have));
        let mut other = w.clone();
        other.node_uid = "u2".into();
        assert!(!other.is_written(&have), "a recreated Node owns it anew");
        other = w.clone();
        other.labels.clear();
        assert!(!other.is_written(&have));
        other = w.clone();
        other.spec.ipip_tunnel_address = Some("10.244.0.1".into());
        assert!(!other.is_written(&have));
        let json = serde_json::to_value(&have).unwrap();
        assert_eq!(json["spec"]["bgpAddress"], "10.0.0.1/24");
        assert_eq!(json["spec"]["asNumber"], 64512);
        assert!(json["spec"].get("routeReflectorClusterID").is_none());
    }
}
