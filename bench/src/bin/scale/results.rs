//! A run's figures, as the JSON `--json` writes and `--baseline` and
//! `--replot` read: one [`Point`] per size, its [`Churn`].

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The churn at one size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Churn {
    /// Pods replaced per second asked.
    pub rate: f64,
    /// Seconds it took.
    pub seconds: f64,
    /// Pod writes done (delete, create, status).
    pub writes: u64,
    /// Pod changes: the events the bench's watch of the fake pods'
    /// namespace got (a deletion is two: its deletion timestamp, then its
    /// removal).
    pub changes: u64,
    /// Pod watch events the apiserver sent meanwhile, less the bench's
    /// own watch's.
    pub pod_events: f64,
    /// Their bytes (the mean event size times `pod_events`).
    pub pod_bytes: f64,
    /// The agents' CPU meanwhile, all together (percent of a core).
    pub agents_cpu_percent: f64,
}

/// Everything measured at one size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Point {
    /// Fake nodes.
    pub nodes: u32,
    /// Fake pods.
    pub pods: u64,
    /// With `--policy`: the fake pods' addresses in one (non-leader)
    /// agent's NetworkPolicy table.
    #[serde(default)]
    pub peer_set: Option<u64>,
    /// With `--probe`: milliseconds from each probe pod's start to its
    /// address in node2's peer set (a probe never seen: absent).
    #[serde(default)]
    pub peer_latency_ms: Vec<f64>,
    /// Seconds the load to this size took.
    pub load_seconds: f64,
    /// Pod writes of that load (create + status).
    pub load_pod_writes: u64,
    /// Node writes of that load (create; status if written).
    pub load_node_writes: u64,
    /// Pod and Node changes during the load, as the bench's own watches
    /// saw them (a Node's include its agent's writes, for the real ones).
    pub load_pod_changes: u64,
    pub load_node_changes: u64,
    /// Pod and Node watch events the apiserver sent during the load, less
    /// the bench's own watches'.
    pub load_pod_events: f64,
    pub load_node_events: f64,
    /// Seconds from the end of the load to settled.
    pub settle_seconds: f64,
    /// Whether the agents' CPU settled before `--settle-max`.
    pub settled: bool,
    /// The leader's node, its RSS (MiB).
    pub leader: String,
    pub leader_rss_mib: f64,
    /// The other agents' RSS (MiB): mean and max.
    pub others_rss_mib_mean: f64,
    pub others_rss_mib_max: f64,
    /// Control plane RSS (MiB).
    pub apiserver_rss_mib: Option<f64>,
    pub etcd_rss_mib: Option<f64>,
    /// CPU seconds of all agents from the start of the load to settled.
    pub agents_cpu_load_seconds: f64,
    /// CPU at rest over the window (percent of a core): the leader, the
    /// others' mean, all agents together.
    pub rest_cpu_leader_percent: f64,
    pub rest_cpu_others_percent: f64,
    pub rest_cpu_all_percent: f64,
    /// Requests per second at rest to what agents use, all agents
    /// together, by "VERB resource".
    pub rest_requests_by: BTreeMap<String, f64>,
    /// Their total per agent (the total over the lab's agents).
    pub rest_requests_per_agent: f64,
    /// Watch events per second at rest, by kind.
    pub rest_events_per_s: BTreeMap<String, f64>,
    /// Watchers registered for Pods and Nodes.
    pub pod_watchers: f64,
    pub node_watchers: f64,
    /// The churn, if asked.
    pub churn: Option<Churn>,
    /// Agent restarts so far (the lab starts a dead agent again).
    pub agent_restarts: u32,
}

impl Point {
    pub(crate) fn pod_events_per_change(&self) -> Option<f64> {
        (self.load_pod_changes > 0).then(|| self.load_pod_events / self.load_pod_changes as f64)
    }

    pub(crate) fn node_events_per_change(&self) -> Option<f64> {
        (self.load_node_changes > 0).then(|| self.load_node_events / self.load_node_changes as f64)
    }
}

/// A run's figures (the JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Results {
    pub label: String,
    pub command: String,
    pub agents: usize,
    pub pods_per_node: u32,
    pub points: Vec<Point>,
}

/// Reads a run's JSON.
pub(crate) fn load_results(p: &Path) -> anyhow::Result<Results> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("{}", p.display()))?)
        .with_context(|| format!("{}: not a scale run's JSON", p.display()))
}
