//! Margay's node agent as a library: what `margay-agent` and `margayctl`
//! are built from, and what integration tests drive directly.
//!
//! - [`crds`]: the CustomResourceDefinitions, rendered from the Rust types;
//! - [`kube_store`]: the IPAM store on the Kubernetes API (compare-and-swap
//!   on `resourceVersion`);
//! - [`pools`]: pool status conditions and the in-use finalizer;
//! - [`dataplane`]: veth pairs, addresses and routes for pods;
//! - [`cni`]: the CNI service on the agent's unix socket;
//! - [`run`]: `margay-agent run`, wiring it all together.

pub mod bgp;
pub mod bgp_crd;
pub mod blocks;
pub mod cni;
pub mod crds;
pub mod ctl;
pub mod dataplane;
pub mod http;
pub mod install;
pub mod kube_store;
pub mod metrics;
pub mod nat;
pub mod pools;
pub mod reconcile;
pub mod remote;
pub mod routing;
pub mod run;
