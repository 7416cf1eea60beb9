//! IPAM on the Kubernetes API: [`KubeStore`], the compare-and-swap store
//! over `IPAMBlock` objects, and [`pools`], each IPPool's status conditions
//! and in-use finalizer.

pub mod pools;
mod store;

pub use store::{KubeStore, map_err};
