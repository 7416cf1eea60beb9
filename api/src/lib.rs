//! Margay's contracts: everything two components (or Margay and an
//! operator) agree on, and nothing that decides or does I/O.
//!
//! - [`ipam`] and [`bgp`]: the `margay.dev/v1` resources (IPPool,
//!   IPAMBlock, IPAMConfiguration, BGPConfiguration, BGPPeer, MargayNode, MargayEndpointSlice) and their
//!   validation; [`crds`] renders their CRDs (pure: installing them is
//!   `margay_harness::kube::crds`);
//! - [`condition`]: status conditions and their transition-time rule;
//! - [`node`]: annotation keys and the Node condition; [`identity`]: the
//!   `MargayNode` resource, each node's identity as the others read it;
//!   [`slice`]: `MargayEndpointSlice`, each node's pods as the others'
//!   NetworkPolicy reads them;
//! - [`cni`]: the CNI error codes the plugin and the agent answer with;
//! - [`status`]: the agent's `/status`, the speaker's session and route
//!   views; [`ctl`]: what `margayctl ipam` reports;
//! - [`community`]: `ASN:VALUE` communities;
//! - [`known`]: an input current, stale or unknown, and why ([`known::Why`]);
//! - [`stable`]: hashes and formats that must not change between versions;
//! - [`tunnel`]: the tunnels' device, VNI, port and filter table names.
//!
//! Without the default `crd` feature only the parts with no Kubernetes
//! dependency are built (what the CNI plugin and the BGP speaker need).

pub mod cni;
pub mod community;
pub mod known;
pub mod node;
pub mod stable;
pub mod status;
pub mod tunnel;

#[cfg(feature = "crd")]
pub mod bgp;
#[cfg(feature = "crd")]
pub mod condition;
#[cfg(feature = "crd")]
pub mod crds;
#[cfg(feature = "crd")]
pub mod ctl;
#[cfg(feature = "crd")]
pub mod identity;
#[cfg(feature = "crd")]
pub mod ipam;
#[cfg(feature = "crd")]
pub mod slice;

/// The API group of every Margay resource.
pub const GROUP: &str = "margay.dev";
