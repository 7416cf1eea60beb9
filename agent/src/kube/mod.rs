//! The agent's side of the Kubernetes API, as plain functions over a
//! client: [`reflect`] (watched inputs that know whether they are current:
//! [`Known`]), [`node`] (this node's identity annotations and its
//! `MargayReady` condition), [`valid`] (the `Valid` condition of BGP
//! objects), [`secrets`] (BGP passwords). What to write is decided
//! elsewhere (the routing plan); this module only reads and writes.

pub mod node;
pub mod reflect;
pub mod secrets;
pub mod valid;

pub use reflect::{Known, Watched, watch};
