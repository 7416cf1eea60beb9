//! IPAM on the Kubernetes API: [`KubeStore`], the compare-and-swap store
//! over `IPAMBlock` objects, [`pools`], each IPPool's status conditions and
//! in-use finalizer, [`reflect`], watched objects that know whether they
//! are current (what the store, and the agent, read instead of polling),
//! and [`list`], the paginated LIST every list goes through.

pub mod list;
pub mod pools;
pub mod reflect;
mod store;

pub use list::{list_all, list_items};
pub use reflect::{Known, Op, Watched, Why, watch, watch_slim, watch_with, why_of};
pub(crate) use store::ask;
pub use store::{DEADLINE, KubeStore, map_err};
