//! The agent's shared state: what its tasks publish for the endpoints (the
//! routing loop's findings, the running speaker, the CNI server's start)
//! and the readiness and liveness rules read from it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use margay_api::status::{AgentStatus, ApiView, PolicyStatus, RoutingStatus, SessionState};
use margay_bgp::speaker::Speaker;

/// State shared by the agent's tasks and read by the endpoints.
#[derive(Debug)]
pub struct AgentState {
    /// Node name.
    pub node: String,
    /// The CNI socket is being served.
    pub cni_serving: AtomicBool,
    /// The routing loop's findings, and when it last finished a pass.
    routing: Mutex<(RoutingStatus, Option<Instant>)>,
    /// Routing passes finished since start.
    routing_passes: std::sync::atomic::AtomicU64,
    /// The running speaker.
    speaker: Mutex<Option<Arc<Speaker>>>,
    /// The IPAM allocator (for its counters).
    pub alloc: margay_ipam::Allocator,
    /// The spare reserve, once started (pods start from it while the API
    /// is unreachable).
    pub reserve: OnceLock<margay_ipam::Reserve>,
    /// Liveness: the routing loop must finish a pass within this.
    pub stall_after: Duration,
    /// The heartbeat's last outcome: when the API last answered, whether
    /// the last attempt was answered, and its error.
    api: Mutex<(Option<Instant>, bool, Option<String>)>,
    /// Whether this agent holds the leader Lease, once elections run.
    pub leader: OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// The NetworkPolicy engine, when it runs.
    pub policy: OnceLock<crate::netpol::PolicyHandle>,
    /// What the NetworkPolicy engine last reported.
    pub policy_status: OnceLock<tokio::sync::watch::Receiver<PolicyStatus>>,
}

impl AgentState {
    /// Fresh state for `node`.
    pub fn new(node: &str, alloc: margay_ipam::Allocator, stall_after: Duration) -> Self {
        Self {
            node: node.to_string(),
            cni_serving: AtomicBool::new(false),
            routing: Mutex::new((RoutingStatus::default(), None)),
            routing_passes: Default::default(),
            speaker: Mutex::new(None),
            policy: OnceLock::new(),
            policy_status: OnceLock::new(),
            alloc,
            reserve: OnceLock::new(),
            stall_after,
            api: Mutex::new((None, false, None)),
            leader: OnceLock::new(),
        }
    }

    /// Records a heartbeat renewal: done, refused by the API (it answered:
    /// RBAC, a conflict), or not answered.
    pub fn set_api(&self, outcome: crate::Result<()>) {
        let mut g = self.api.lock().expect("api");
        match outcome {
            Ok(()) => *g = (Some(Instant::now()), true, None),
            Err(crate::Error::Refused { message, .. }) => {
                *g = (Some(Instant::now()), true, Some(message))
            }
            Err(crate::Error::Unanswered(e)) => *g = (g.0, false, Some(e)),
            Err(e) => *g = (g.0, false, Some(e.to_string())),
        }
    }

    /// How the API answers.
    pub fn api(&self) -> ApiView {
        let (ok, answered, err) = self.api.lock().expect("api").clone();
        ApiView {
            answering: ok.is_some() && answered,
            last_error: err,
            answered_seconds_ago: ok.map(|t| t.elapsed().as_secs()),
            leader: self.leader.get().is_some_and(|l| *l.borrow()),
        }
    }

    /// The running speaker, if any.
    pub fn speaker(&self) -> Option<Arc<Speaker>> {
        self.speaker.lock().expect("speaker").clone()
    }

    /// Publishes the running speaker (or none).
    pub fn set_speaker(&self, s: Option<Arc<Speaker>>) {
        *self.speaker.lock().expect("speaker") = s;
    }

    /// What the routing loop last found.
    pub fn routing(&self) -> RoutingStatus {
        self.routing.lock().expect("routing").0.clone()
    }

    /// Publishes a finished routing pass; returns the problems that are new.
    pub fn set_routing(&self, st: RoutingStatus) -> Vec<margay_api::status::Problem> {
        let mut g = self.routing.lock().expect("routing");
        let new = st
            .problems
            .iter()
            .filter(|p| !g.0.problems.contains(p))
            .cloned()
            .collect();
        *g = (st, Some(Instant::now()));
        self.routing_passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        new
    }

    /// Routing passes finished since start.
    pub fn routing_passes(&self) -> u64 {
        self.routing_passes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `None` when alive, else why not.
    pub fn not_alive(&self) -> Option<String> {
        match self.routing.lock().expect("routing").1 {
            Some(t) if t.elapsed() > self.stall_after => Some(format!(
                "the routing loop has not finished a pass for {}s",
                t.elapsed().as_secs()
            )),
            _ => None,
        }
    }

    /// Reasons not to be ready (empty: ready). An unreachable API alone
    /// does not make the agent unready while it has spare addresses: pods
    /// still start from them, and the outage shows in `/status`.
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.cni_serving.load(Ordering::Relaxed) {
            why.push("the CNI socket is not served yet".to_string());
        }
        let (r, last) = self.routing.lock().expect("routing").clone();
        let spares = self.reserve.get().map_or(0, |r| r.stats().spares);
        if last.is_none() {
            why.push("routing has not been set up yet".to_string());
        } else if spares == 0 {
            let api = self.api();
            let mut down = r.unknown_inputs.clone();
            if !api.answering
                && let Some(e) = api.last_error
            {
                down.push(format!("heartbeat: {e}"));
            }
            if !r.datastore_ok || !down.is_empty() {
                why.push(format!(
                    "the Kubernetes API did not answer ({}) and no spare address is left",
                    down.join("; ")
                ));
            }
        }
        let peers = self.speaker().map(|s| s.neighbors()).unwrap_or_default();
        let configured: Vec<_> = peers.iter().filter(|p| !p.dynamic).collect();
        if !configured.is_empty()
            && !configured
                .iter()
                .any(|p| p.state == SessionState::Established)
        {
            why.push(format!(
                "none of the {} BGP sessions is established",
                configured.len()
            ));
        }
        why
    }

    /// What the NetworkPolicy engine last reported (`None` before it
    /// runs).
    pub fn policy_status(&self) -> Option<PolicyStatus> {
        self.policy_status.get().map(|r| r.borrow().clone())
    }

    /// `/status`.
    pub async fn status(&self) -> AgentStatus {
        let speaker = self.speaker();
        let routes = match &speaker {
            Some(s) => s.routes().await.unwrap_or_default(),
            None => Vec::new(),
        };
        let not_ready = self.not_ready();
        AgentStatus {
            node: self.node.clone(),
            ready: not_ready.is_empty(),
            not_ready,
            routing: self.routing(),
            api: self.api(),
            peers: speaker.map(|s| s.neighbors()).unwrap_or_default(),
            routes,
            policy: self.policy_status(),
        }
    }
}
