//! The `margay` CNI plugin as a library: CNI parsing and rendering
//! ([`spec`]) and the translation to and from the agent's gRPC API
//! ([`client`]).

pub mod client;
pub mod spec;
