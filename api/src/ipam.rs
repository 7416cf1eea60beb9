//! The IPAM custom resources in `margay.dev/v1` (IPPool, IPAMBlock,
//! IPAMConfiguration), as Rust types, with the label selector they share
//! with the BGP resources.
//!
//! These types are the source of truth for the CRD YAML in `deploy/crds/`
//! (`margay-agent crds --out deploy/crds` writes it; a test fails when the
//! files are stale). Schemas are plain OpenAPI v3 (no CEL) so they load on
//! every apiserver from 1.20 on; validation that OpenAPI cannot express
//! (overlapping pools, block size per family) is done by the agent and
//! reported as a status condition on the pool.

#![allow(clippy::duplicated_attributes)] // repeated `type_ = ...` in printcolumn(...) lists

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::GROUP;
pub use crate::condition::Condition;
/// The finalizer the agent puts on pools so a pool in use is not deleted
/// until its addresses are released.
pub const POOL_FINALIZER: &str = "margay.dev/ipam";
/// Name of the singleton [`IPAMConfiguration`].
pub const CONFIG_NAME: &str = "default";

/// A range of addresses pods (and node tunnels) get their addresses from.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "IPPool",
    plural = "ippools",
    status = "IPPoolStatus",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Block", type_ = "integer", json_path = ".spec.blockSize"),
    printcolumn(name = "Encap", type_ = "string", json_path = ".spec.encapsulation"),
    printcolumn(name = "NAT", type_ = "boolean", json_path = ".spec.natOutgoing"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Used", type_ = "integer", json_path = ".status.allocated"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// The pool's range, e.g. `10.244.0.0/16` or `fd00:244::/56`.
    pub cidr: String,
    /// Prefix length of the blocks nodes claim: 26 (IPv4) or 122 (IPv6) by
    /// default; 20..=32 for IPv4, 116..=128 for IPv6, and not shorter than
    /// the pool's own prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 128))]
    pub block_size: Option<u8>,
    /// How traffic to this pool's addresses on other nodes is carried.
    #[serde(default)]
    pub encapsulation: Encapsulation,
    /// Masquerade traffic from this pool leaving for addresses outside all
    /// pools.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// A disabled pool hands out no new addresses; existing ones stay.
    #[serde(default)]
    pub disabled: bool,
    /// Which nodes may claim blocks from this pool (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// What addresses from this pool are for (default: both).
    #[serde(default = "default_uses")]
    pub allowed_uses: Vec<AllowedUse>,
}

impl IPPoolSpec {
    /// A pool of `cidr` with every other field at its default.
    pub fn with_cidr(cidr: &str, block_size: Option<u8>) -> Self {
        Self {
            cidr: cidr.to_string(),
            block_size,
            encapsulation: Encapsulation::None,
            nat_outgoing: false,
            disabled: false,
            node_selector: None,
            allowed_uses: default_uses(),
        }
    }
}

fn default_uses() -> Vec<AllowedUse> {
    vec![AllowedUse::Workload, AllowedUse::Tunnel]
}

/// How traffic to a pool's addresses on another node is carried.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Encapsulation {
    /// Plain routing: the next hop is the other node's address.
    #[default]
    None,
    /// VXLAN to every other node.
    #[serde(rename = "VXLAN")]
    Vxlan,
    /// VXLAN only to nodes in another subnet; plain routing within it.
    #[serde(rename = "VXLANCrossSubnet")]
    VxlanCrossSubnet,
    /// IP-in-IP to every other node.
    #[serde(rename = "IPIP")]
    Ipip,
    /// IP-in-IP only to nodes in another subnet.
    #[serde(rename = "IPIPCrossSubnet")]
    IpipCrossSubnet,
}

/// What an address is handed out for.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum AllowedUse {
    /// A pod's interface.
    Workload,
    /// A node's tunnel device (VXLAN/IPIP).
    Tunnel,
}

/// A Kubernetes label selector (the same shape as `metav1.LabelSelector`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One requirement of a [`LabelSelector`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The operator of a [`LabelSelectorRequirement`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is not in `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a node with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => !got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }
}

/// What the agent observed about a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// `Ready` (usable: valid, not overlapping, not being deleted),
    /// `Exhausted` (every block claimed and full) and `NodeCapacity`
    /// (`False` when fewer than a tenth of its blocks, or fewer than 16,
    /// are unclaimed: nodes beyond those get no block of it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Addresses allocated from this pool.
    #[serde(default)]
    pub allocated: u64,
    /// Blocks claimed from this pool.
    #[serde(default)]
    pub blocks: u64,
    /// Blocks not claimed yet: each node takes one at its first address
    /// from the pool, so this is how many more nodes it can serve (the
    /// `NodeCapacity` condition says when it runs low).
    #[serde(default)]
    pub free_blocks: u64,
}

/// One block of a pool: which node it is affine to and who holds each of
/// its addresses. The block's name is derived from its CIDR
/// ([`block_name`]), so creating the object *is* claiming the block: the
/// apiserver lets only one creator win.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "IPAMBlock",
    plural = "ipamblocks",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMBlockSpec {
    /// The block's range.
    pub cidr: String,
    /// The pool it was carved from.
    pub pool: String,
    /// The node the block is affine to (routes for it point there); absent
    /// when the node was deleted while others still borrow addresses from
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Allocated addresses, keyed by address. Atomic for server-side
    /// field tracking: the allocator always writes the whole block, and a
    /// granular map makes the apiserver track every field of every
    /// allocation on each write (several times the cost of a full block).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-map-type" = "atomic"))]
    pub allocations: BTreeMap<String, AllocationRecord>,
}

/// Who holds one address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    /// The allocation's key: `<container id>.<interface>` for pods,
    /// `tunnel.<kind>.<node>` for tunnel devices. A release names the
    /// handle, so a stale release cannot free an address since reused.
    pub handle: String,
    /// The node the address was handed out on.
    pub node: String,
    /// What the address is for.
    #[serde(rename = "use", default = "default_use")]
    pub use_: AllowedUse,
    /// The pod, when the caller said (K8S_POD_* in CNI_ARGS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// When it was handed out (RFC 3339).
    pub since: String,
}

fn default_use() -> AllowedUse {
    AllowedUse::Workload
}

/// A pod, by namespace, name and UID.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub struct PodRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID; a pod recreated under the same name has another one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// `namespace/name`, as kubectl names a pod.
impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Cluster-wide IPAM settings; the object named `default` is used.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "margay.dev",
    version = "v1",
    kind = "IPAMConfiguration",
    plural = "ipamconfigurations",
    printcolumn(name = "Strict", type_ = "boolean", json_path = ".spec.strictAffinity"),
    printcolumn(
        name = "MaxBlocks",
        type_ = "integer",
        json_path = ".spec.maxBlocksPerNode"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMConfigurationSpec {
    /// Never hand out an address from a block affine to another node (a
    /// node whose blocks are full and that may claim no more fails instead).
    #[serde(default)]
    pub strict_affinity: bool,
    /// At most this many blocks per node (0: no limit).
    #[serde(default)]
    pub max_blocks_per_node: u32,
    /// An empty block is released after this long (one block per node and
    /// family is always kept).
    #[serde(default = "default_empty_grace")]
    pub empty_block_grace_seconds: u64,
    /// An address whose pod is gone is released after this long.
    #[serde(default = "default_leak_grace")]
    pub leak_grace_seconds: u64,
}

fn default_empty_grace() -> u64 {
    300
}

fn default_leak_grace() -> u64 {
    600
}

impl Default for IPAMConfigurationSpec {
    fn default() -> Self {
        Self {
            strict_affinity: false,
            max_blocks_per_node: 0,
            empty_block_grace_seconds: default_empty_grace(),
            leak_grace_seconds: default_leak_grace(),
        }
    }
}

/// The object name of the block with this CIDR: `10-244-1-64-26`,
/// `fd00-244--40-122`.
pub fn block_name(cidr: &ipnetwork::IpNetwork) -> String {
    let name = format!("{}-{}", cidr.network(), cidr.prefix())
        .replace(['.', ':'], "-")
        .to_ascii_lowercase();
    // A name must start with an alphanumeric ("::/122" would not); "0::"
    // never prints that way, so the result stays unique.
    if name.starts_with('-') {
        format!("0{name}")
    } else {
        name
    }
}

/// The CIDR a block name stands for: the inverse of [`block_name`] (only
/// a name [`block_name`] would give back maps to a CIDR), so a block whose
/// content does not parse still says which range it holds.
pub fn block_cidr_from_name(name: &str) -> Option<ipnetwork::IpNetwork> {
    let (addr, len) = name.rsplit_once('-')?;
    let len: u8 = len.parse().ok()?;
    let v4 = addr.replace('-', ".");
    let v6 = addr.replace('-', ":");
    let v6_lead = v6.strip_prefix('0').unwrap_or(&v6).to_string();
    [v4, v6, v6_lead]
        .iter()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .filter_map(|ip| ipnetwork::IpNetwork::new(ip, len).ok())
        .find(|c| c.network() == c.ip() && block_name(c) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_map_back_to_their_cidr() {
        for c in [
            "10.244.1.64/26",
            "fd00:244::40/122",
            "::/122",
            "0.0.0.0/26",
            "fd00::/128",
        ] {
            let cidr: ipnetwork::IpNetwork = c.parse().unwrap();
            assert_eq!(block_cidr_from_name(&block_name(&cidr)), Some(cidr), "{c}");
        }
        for bad in [
            "",
            "10-244-1-64",
            "10-244-1-65-26",
            "x-26",
            "10-244-1-64-33",
            "10.244.1.64-26",
        ] {
            assert_eq!(block_cidr_from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn block_names_are_dns_labels() {
        let v4: ipnetwork::IpNetwork = "10.244.1.64/26".parse().unwrap();
        assert_eq!(block_name(&v4), "10-244-1-64-26");
        let v6: ipnetwork::IpNetwork = "fd00:244::40/122".parse().unwrap();
        assert_eq!(block_name(&v6), "fd00-244--40-122");
        let v6: ipnetwork::IpNetwork = "::/122".parse().unwrap();
        assert_eq!(block_name(&v6), "0---122");
    }

    #[test]
    fn selector_semantics() {
        let labels: BTreeMap<String, String> =
            [("zone".into(), "a".into()), ("role".into(), "edge".into())].into();
        let mut s = LabelSelector::default();
        assert!(s.matches(&labels));
        s.match_labels.insert("zone".into(), "a".into());
        assert!(s.matches(&labels));
        s.match_expressions.push(LabelSelectorRequirement {
            key: "role".into(),
            operator: SelectorOperator::NotIn,
            values: vec!["edge".into()],
        });
        assert!(!s.matches(&labels));
        s.match_expressions[0].operator = SelectorOperator::In;
        assert!(s.matches(&labels));
        s.match_expressions.push(LabelSelectorRequirement {
            key: "gpu".into(),
            operator: SelectorOperator::DoesNotExist,
            values: vec![],
        });
        assert!(s.matches(&labels));
        s.match_expressions[1].operator = SelectorOperator::Exists;
        assert!(!s.matches(&labels));
    }

    #[test]
    fn spec_defaults_from_minimal_yaml() {
        let spec: IPPoolSpec = serde_json::from_str(r#"{"cidr":"10.0.0.0/16"}"#).unwrap();
        assert_eq!(spec.encapsulation, Encapsulation::None);
        assert_eq!(spec.allowed_uses, default_uses());
        assert!(!spec.disabled);
        let cfg: IPAMConfigurationSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, IPAMConfigurationSpec::default());
    }
}
