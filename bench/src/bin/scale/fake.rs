//! The fake cluster (pure): Node objects as a node's agent and kubelet
//! would leave them (an InternalIP, Margay's identity annotations), each
//! node's `MargayNode` as its agent would write it, Pods
//! bound to them with their addresses, and every name and address derived
//! from an index, refused where the ranges end.
//!
//! - Fake node `i` (0-based) is `scale-n00000`... at `10.100.0.0/14` +
//!   `i + 1`: above the lab's 10.99.0.0/16, so in the full mesh the real
//!   agents are the side that only listens (the lower address listens) and
//!   never dial a node that does not exist.
//! - Its pods take a stride of [`Gen::stride`] addresses (pods per node
//!   rounded up to a power of two) in `100.64.0.0/10`, outside the lab's
//!   pool: nothing real routes or allocates them.

use std::net::Ipv4Addr;

use anyhow::bail;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};

/// The label every object of the bench carries (cleanup selects on it).
pub const LABEL: &str = "margay.dev/scale-bench";
/// The label naming a fake pod's node.
pub const NODE_LABEL: &str = "margay.dev/scale-node";
/// Where fake nodes' addresses start (the first is `.1`).
const NODE_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);
/// Their prefix length (10.100.0.0 - 10.103.255.255).
const NODE_PREFIX: u8 = 14;
/// Where fake pods' addresses start.
const POD_BASE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
/// Their prefix length.
const POD_PREFIX: u8 = 10;
/// Apps the pods' `app` labels cycle through.
const APPS: u32 = 10;

/// Generator of the fake cluster's objects.
#[derive(Debug, Clone)]
pub struct Gen {
    /// Pods per fake node.
    pub pods_per_node: u32,
    /// The namespace of the fake pods.
    pub namespace: String,
    /// The cluster's AS, as the agents publish it.
    pub asn: u32,
}

/// How many addresses a range of prefix length `prefix` holds.
fn size(prefix: u8) -> u64 {
    1u64 << (32 - u32::from(prefix))
}

impl Gen {
    /// The most fake nodes this can address: one address each in
    /// `10.100.0.0/14` (network and broadcast left out), and a stride of
    /// pod addresses each in `100.64.0.0/10`.
    pub fn max_nodes(&self) -> u64 {
        let by_node = size(NODE_PREFIX) - 2;
        let by_pods = size(POD_PREFIX) / u64::from(self.stride());
        by_node.min(by_pods)
    }

    /// Pod addresses per node: pods per node rounded up to a power of two.
    pub fn stride(&self) -> u32 {
        self.pods_per_node.max(1).next_power_of_two()
    }

    /// Refuses a cluster of `nodes` fake nodes it cannot address.
    pub fn check(&self, nodes: u32) -> anyhow::Result<()> {
        if u64::from(nodes) > self.max_nodes() {
            bail!(
                "{nodes} fake nodes with {} pods each: at most {} (node addresses in \
                 {NODE_BASE}/{NODE_PREFIX}, {} pod addresses each in {POD_BASE}/{POD_PREFIX})",
                self.pods_per_node,
                self.max_nodes(),
                self.stride()
            );
        }
        Ok(())
    }

    /// Fake node `i`'s name.
    pub fn node_name(i: u32) -> String {
        format!("scale-n{i:05}")
    }

    /// Fake pod `k` of node `i`'s name.
    pub fn pod_name(i: u32, k: u32) -> String {
        format!("scale-n{i:05}-p{k:03}")
    }

    /// Fake node `i`'s address.
    pub fn node_address(&self, i: u32) -> anyhow::Result<Ipv4Addr> {
        self.check(i.saturating_add(1))?;
        Ok(Ipv4Addr::from(u32::from(NODE_BASE) + i + 1))
    }

    /// Fake pod `k` of node `i`'s address.
    pub fn pod_address(&self, i: u32, k: u32) -> anyhow::Result<Ipv4Addr> {
        self.check(i.saturating_add(1))?;
        if k >= self.pods_per_node {
            bail!("pod {k} of a node with {} pods", self.pods_per_node);
        }
        // Fits: i < max_nodes <= 2^22 / stride.
        Ok(Ipv4Addr::from(u32::from(POD_BASE) + i * self.stride() + k))
    }

    /// Fake node `i` as created: labels as a kubelet sets them, Margay's
    /// identity annotations (its BGP address with the subnet, its AS) as
    /// its agent would publish them, and an InternalIP (nodes take status
    /// on create).
    pub fn node(&self, i: u32) -> anyhow::Result<Node> {
        let name = Self::node_name(i);
        let addr = self.node_address(i)?;
        let v = json!({
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    LABEL: "true",
                },
                "annotations": {
                    margay_api::node::ANN_ADDRESS: format!("{addr}/{NODE_PREFIX}"),
                    margay_api::node::ANN_ASN: self.asn.to_string(),
                },
            },
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": addr.to_string()},
                    {"type": "Hostname", "address": name},
                ],
            },
        });
        Ok(serde_json::from_value(v)?)
    }

    /// Fake node `i`'s `MargayNode` as its agent would write it (owned by
    /// the Node of UID `uid`): what [`Gen::node`]'s annotations say, its
    /// InternalIP and labels.
    pub fn identity(&self, i: u32, uid: &str) -> anyhow::Result<margay_api::identity::MargayNode> {
        let node = self.node(i)?;
        let addr = self.node_address(i)?;
        let want = margay_api::identity::Wanted {
            spec: margay_api::identity::MargayNodeSpec {
                bgp_address: Some(format!("{addr}/{NODE_PREFIX}")),
                as_number: Some(self.asn),
                addresses: vec![addr.to_string()],
                ..Default::default()
            },
            labels: node.metadata.labels.unwrap_or_default(),
            node_uid: uid.to_string(),
        };
        Ok(want.object(&Self::node_name(i)))
    }

    /// Fake node `i`'s endpoint slices as its agent would write them
    /// (owned by the Node of UID `uid`): its pods, [`SLICE_MAX`] a slice,
    /// each with its labels, address and named port.
    ///
    /// [`SLICE_MAX`]: margay_api::slice::SLICE_MAX
    pub fn slices(
        &self,
        i: u32,
        uid: &str,
    ) -> anyhow::Result<Vec<margay_api::slice::MargayEndpointSlice>> {
        use margay_api::slice::*;
        let node = Self::node_name(i);
        let mut eps = Vec::new();
        for k in 0..self.pods_per_node {
            let p = self.pod(i, k)?;
            eps.push(SliceEndpoint {
                namespace: self.namespace.clone(),
                name: Self::pod_name(i, k),
                labels: p.metadata.labels.unwrap_or_default(),
                addresses: vec![self.pod_address(i, k)?.to_string()],
                ports: vec![SlicePort {
                    name: "http".into(),
                    protocol: "TCP".into(),
                    port: 80,
                }],
            });
        }
        eps.sort();
        Ok(eps
            .chunks(SLICE_MAX)
            .enumerate()
            .map(|(j, c)| {
                let mut s = MargayEndpointSlice::new(
                    &slice_name(&node, j),
                    MargayEndpointSliceSpec {
                        node: node.clone(),
                        endpoints: c.to_vec(),
                    },
                );
                s.metadata.labels = Some(
                    [
                        (SLICE_NODE_LABEL.to_string(), node_label(&node)),
                        (LABEL.to_string(), "true".to_string()),
                    ]
                    .into(),
                );
                s.metadata.owner_references = self
                    .identity(i, uid)
                    .ok()
                    .and_then(|m| m.metadata.owner_references);
                s
            })
            .collect())
    }

    /// What a kubelet writes into a Node's status at each report: its
    /// Ready condition, heartbeat `now` (RFC 3339). A merge patch.
    pub fn node_status(now: &str) -> Value {
        json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}})
    }

    /// Fake pod `k` of node `i` as created (bound: `spec.nodeName`).
    pub fn pod(&self, i: u32, k: u32) -> anyhow::Result<Pod> {
        self.pod_address(i, k)?;
        let v = json!({
            "metadata": {
                "name": Self::pod_name(i, k),
                "namespace": self.namespace,
                "labels": {
                    "app": format!("app-{}", k % APPS),
                    LABEL: "true",
                    NODE_LABEL: Self::node_name(i),
                },
            },
            "spec": {
                "nodeName": Self::node_name(i),
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "busybox",
                                "ports": [{"name": "http", "containerPort": 80}]}],
            },
        });
        Ok(serde_json::from_value(v)?)
    }

    /// The status a kubelet writes once fake pod `k` of node `i` runs: its
    /// address, its node's, Running and Ready. A merge patch of the status
    /// subresource.
    pub fn pod_status(&self, i: u32, k: u32, now: &str) -> anyhow::Result<Value> {
        let ip = self.pod_address(i, k)?.to_string();
        let host = self.node_address(i)?.to_string();
        Ok(json!({"status": {
            "phase": "Running",
            "hostIP": host,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        }}))
    }
}

/// How many distinct fake pod addresses `text` holds (an nft listing).
pub fn pod_addresses_in(text: &str) -> u64 {
    let mut seen = std::collections::HashSet::new();
    for w in text.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
        if let Ok(a) = w.parse::<Ipv4Addr>()
            && (u32::from(a) >> (32 - POD_PREFIX)) == (u32::from(POD_BASE) >> (32 - POD_PREFIX))
        {
            seen.insert(a);
        }
    }
    seen.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(per: u32) -> Gen {
        Gen {
            pods_per_node: per,
            namespace: "scale".into(),
            asn: 64512,
        }
    }

    #[test]
    fn node_addresses_are_distinct_above_the_lab_and_refused_past_the_range() {
        let g = g(30);
        assert_eq!(g.node_address(0).unwrap(), Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(g.node_address(255).unwrap(), Ipv4Addr::new(10, 100, 1, 0));
        assert_eq!(
            g.node_address(4999).unwrap(),
            Ipv4Addr::new(10, 100, 19, 136)
        );
        // 2^22 / 32 pod strides bound it before the node range does.
        assert_eq!(g.max_nodes(), 131_072);
        assert!(g.node_address(131_071).is_ok());
        let e = g.node_address(131_072).unwrap_err().to_string();
        assert!(e.contains("at most 131072"), "{e}");
        // One pod per node: the /14 of node addresses is the bound.
        let one = super::tests::g(1);
        assert_eq!(one.max_nodes(), (1 << 18) - 2);
        assert_eq!(
            one.node_address((1 << 18) - 3).unwrap(),
            Ipv4Addr::new(10, 103, 255, 254)
        );
        assert!(one.node_address((1 << 18) - 2).is_err());
        assert!(g.check(u32::MAX).is_err());
    }

    #[test]
    fn pod_addresses_take_a_power_of_two_stride_per_node() {
        let g = g(30);
        assert_eq!(g.stride(), 32);
        assert_eq!(g.pod_address(0, 0).unwrap(), Ipv4Addr::new(100, 64, 0, 0));
        assert_eq!(g.pod_address(0, 29).unwrap(), Ipv4Addr::new(100, 64, 0, 29));
        assert_eq!(g.pod_address(1, 0).unwrap(), Ipv4Addr::new(100, 64, 0, 32));
        assert_eq!(
            g.pod_address(999, 5).unwrap(),
            Ipv4Addr::new(100, 64, 124, 229)
        );
        assert!(g.pod_address(0, 30).is_err());
        // The last node's last pod is the range's last address or below.
        let last = g.pod_address(131_071, 29).unwrap();
        assert!(u32::from(last) < u32::from(Ipv4Addr::new(100, 128, 0, 0)));
        assert_eq!(super::tests::g(0).stride(), 1);
        assert_eq!(super::tests::g(64).stride(), 64);
        assert_eq!(super::tests::g(65).stride(), 128);
    }

    #[test]
    fn a_node_carries_what_the_agents_read() {
        let n = g(30).node(41).unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("scale-n00041"));
        let ann = n.metadata.annotations.unwrap();
        assert_eq!(ann[margay_api::node::ANN_ADDRESS], "10.100.0.42/14");
        assert_eq!(ann[margay_api::node::ANN_ASN], "64512");
        let sl = g(100).slices(41, "u").unwrap();
        assert_eq!(sl.len(), 2);
        assert_eq!(sl[0].spec.endpoints.len() + sl[1].spec.endpoints.len(), 100);
        assert_eq!(
            pod_addresses_in("elements = { 100.64.0.1, 100.127.255.254, 10.0.0.1, 100.64.0.1 }"),
            2
        );
        let m = g(30).identity(41, "u").unwrap();
        assert_eq!(m.spec.bgp_address.as_deref(), Some("10.100.0.42/14"));
        assert_eq!(
            m.metadata.labels.unwrap()[LABEL],
            "true",
            "cleaned up with the rest"
        );
        assert_eq!(n.metadata.labels.unwrap()[LABEL], "true");
        let a = &n.status.unwrap().addresses.unwrap()[0];
        assert_eq!(
            (a.type_.as_str(), a.address.as_str()),
            ("InternalIP", "10.100.0.42")
        );
    }

    #[test]
    fn a_pod_is_bound_labelled_and_its_status_names_its_addresses() {
        let g = g(30);
        let p = g.pod(3, 12).unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("scale-n00003-p012"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("scale"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("scale-n00003"));
        let l = p.metadata.labels.unwrap();
        assert_eq!(l["app"], "app-2");
        assert_eq!(l[NODE_LABEL], "scale-n00003");
        let s = g.pod_status(3, 12, "2026-01-01T00:00:00Z").unwrap();
        assert_eq!(s["status"]["podIP"], "100.64.0.108");
        assert_eq!(s["status"]["podIPs"][0]["ip"], "100.64.0.108");
        assert_eq!(s["status"]["hostIP"], "10.100.0.4");
        // The patch is a valid PodStatus.
        let _: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(s["status"].clone()).unwrap();
        let _: k8s_openapi::api::core::v1::NodeStatus =
            serde_json::from_value(Gen::node_status("2026-01-01T00:00:00Z")["status"].clone())
                .unwrap();
    }
}
