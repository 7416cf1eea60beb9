//! Margay's node agent as a library: what `margay-agent` and `margayctl`
//! are built from, and what integration tests drive directly.
//!
//! - [`crds`]: the CustomResourceDefinitions, rendered from the Rust types;
//! - [`kube_store`]: the IPAM store on the Kubernetes API (compare-and-swap
//!   on `resourceVersion`);
//! - [`pools`]: pool status conditions and the in-use finalizer.

pub mod crds;
pub mod kube_store;
pub mod pools;
