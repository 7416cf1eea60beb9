//! `margay-lab` as a library: [`cluster::Cluster`] builds a whole Margay
//! cluster on one machine from the test harness's parts (a real etcd +
//! kube-apiserver, node namespaces on a fabric, a real `margay-agent` per
//! node, an optional top-of-rack router, pods wired through the real
//! `margay` CNI plugin). The `margay-lab` binary keeps one in the
//! background; the end-to-end tests build their own.

pub mod cluster;
pub mod image;
pub use cluster::kubernetes;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Encapsulation for pod traffic between nodes.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Encap {
    /// Native routing on the fabric.
    None,
    /// VXLAN overlay.
    Vxlan,
    /// IP-in-IP overlay through `tunl0` (needs a kernel with IPIP: run
    /// the lab in `scripts/in-vm.sh` on a host without it).
    Ipip,
    /// Native inside a node's subnet, VXLAN across subnets.
    VxlanCrossSubnet,
    /// Native inside a node's subnet, IP-in-IP across subnets.
    IpipCrossSubnet,
}

impl Encap {
    /// The pool's encapsulation for this choice.
    pub fn pool(self) -> margay_api::ipam::Encapsulation {
        use margay_api::ipam::Encapsulation as E;
        match self {
            Encap::None => E::None,
            Encap::Vxlan => E::Vxlan,
            Encap::Ipip => E::Ipip,
            Encap::VxlanCrossSubnet => E::VxlanCrossSubnet,
            Encap::IpipCrossSubnet => E::IpipCrossSubnet,
        }
    }
}

/// How `--kubernetes` installs Margay.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Install {
    /// `kubectl apply -f deploy/margay.yaml`.
    Manifest,
    /// `helm install margay charts/margay -n kube-system`.
    Helm,
    /// No Margay: Debian's reference plugins `ptp` + `host-local`, each
    /// node its own range (10.244.N.0/24) and static routes to the others'
    /// (the baseline the pod start benchmark compares with).
    Ptp,
    /// No network at all: `cni-noop` on every node, which wires nothing and
    /// answers each ADD with a made-up address (pods become Ready; nothing
    /// can reach them): the floor under every plugin in the pod start
    /// benchmark, what the kubelets, containerd and the API server cost.
    Noop,
}

/// Top-of-rack router software.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Tor {
    /// BIRD 2.
    Bird,
    /// FRR (bgpd + zebra).
    Frr,
    /// GoBGP.
    Gobgp,
    /// No router.
    None,
}

/// The name clap shows for a value.
pub fn value_name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}
