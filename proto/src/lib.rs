//! The agent's gRPC API (`margay.cni.v1`), generated from
//! `proto/margay/cni/v1/cni.proto`, plus the socket path both sides agree on.

#![allow(missing_debug_implementations, clippy::all, rust_2018_idioms)]

/// Generated messages, client and server for `margay.cni.v1`.
pub mod cni {
    tonic::include_proto!("margay.cni.v1");
}

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/margay/agent.sock";
