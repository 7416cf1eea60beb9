//! Endpoint slices: each node's pods as the other nodes' NetworkPolicy
//! needs them (Cilium's `CiliumEndpointSlice` is the model), so that no
//! agent watches the other nodes' Pods.
//!
//! Each agent writes the slices of its own node from the Pods it watches
//! anyway (its own, by `spec.nodeName`): for each pod with an address,
//! its namespace, name, labels, addresses and named ports, and nothing
//! else. Up to [`SLICE_MAX`] pods a slice, a pod kept in its slice while
//! it lives (a change rewrites one slice), a slice written only when what
//! it holds changes and at most once per [`SLICE_EVERY`]. Agents with a
//! policy that names pods by label watch every slice instead of every
//! Pod: one small event per change of a pod's policy-relevant state, not
//! every Pod status write of the cluster. Owned by the node's Node (gone
//! with it; the leader also deletes those of deleted nodes).

use std::collections::BTreeMap;
use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most pods one slice holds: a pod's change rewrites its slice, so
/// small slices keep each write (and what every reader receives) small;
/// a node with the kubelet's default 110 pods has two.
pub const SLICE_MAX: usize = 64;

/// A slice is written at most this often: changes meanwhile are gathered
/// into one write.
pub const SLICE_EVERY: Duration = Duration::from_millis(500);

/// The label every slice carries with its node (its name, or a hash of
/// it when the name is no valid label value): the writer lists its own.
pub const SLICE_NODE_LABEL: &str = "margay.dev/slice-node";

/// Some of one node's pods.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "MargayEndpointSlice",
    plural = "margayendpointslices",
    shortname = "mes",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MargayEndpointSliceSpec {
    /// The node whose pods these are.
    pub node: String,
    /// The pods, by namespace and name. Atomic: always written whole.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub endpoints: Vec<SliceEndpoint>,
}

/// One pod as policy on other nodes sees it.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Its addresses.
    pub addresses: Vec<String>,
    /// Its containers' named ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<SlicePort>,
}

/// A named container port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub struct SlicePort {
    /// The port's name.
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// Its number.
    pub port: u16,
}

/// The value of [`SLICE_NODE_LABEL`] for node `node`: its name when that
/// is a valid label value (at most 63 characters), else `h-` and a hash.
pub fn node_label(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        format!("h-{:016x}", crate::stable::fnv1a(node.as_bytes()))
    }
}

/// The name of node `node`'s slice number `i`: `NODE.i`, shortened with
/// a hash when that would exceed an object name's 253 characters.
pub fn slice_name(node: &str, i: usize) -> String {
    crate::stable::bounded_name("", node, &format!(".{i}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_valid_and_distinct() {
        assert_eq!(slice_name("node1", 0), "node1.0");
        assert_eq!(node_label("node1"), "node1");
        let (a, b) = (
            format!("{}a", "x".repeat(252)),
            format!("{}b", "x".repeat(252)),
        );
        for i in [0, 1, 12345] {
            let (na, nb) = (slice_name(&a, i), slice_name(&b, i));
            assert!(na.len() <= 253 && nb.len() <= 253);
            assert_ne!(na, nb);
            assert!(na.ends_with(&format!(".{i}")));
        }
        assert_ne!(node_label(&a), node_label(&b));
        assert!(node_label(&a).len() <= 63);
    }
}
