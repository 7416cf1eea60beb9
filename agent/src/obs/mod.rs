//! What the agent shows about itself: [`state`] (what its tasks publish),
//! [`http`] (`/healthz`, `/readyz`, `/metrics`, `/status`) and [`metrics`]
//! (one Prometheus registry for the agent and its speaker).

pub mod http;
pub mod metrics;
pub mod state;

pub use state::AgentState;
