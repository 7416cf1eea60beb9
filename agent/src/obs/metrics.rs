//! The agent's Prometheus metrics, in one `prometheus_client` registry:
//! CNI request latency histograms and error counts per operation (recorded
//! by the CNI server), IPAM counters, readiness, and the running speaker's
//! own metrics (its collector), rendered in the OpenMetrics text format.

use std::sync::{OnceLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::AgentState;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// CNI operations measured.
#[derive(Debug, Clone, Copy)]
pub enum CniOp {
    /// ADD.
    Add,
    /// DEL.
    Del,
    /// CHECK.
    Check,
}

impl CniOp {
    fn label(self) -> [(&'static str, &'static str); 1] {
        [(
            "op",
            match self {
                CniOp::Add => "ADD",
                CniOp::Del => "DEL",
                CniOp::Check => "CHECK",
            },
        )]
    }
}

type OpLabel = [(&'static str, &'static str); 1];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// CNI request metrics (process-wide, like a default registry).
#[derive(Debug)]
pub struct CniMetrics {
    latency: Family<OpLabel, Histogram, fn() -> Histogram>,
    errors: Family<OpLabel, Counter>,
}

/// The process's CNI metrics.
pub fn cni() -> &'static CniMetrics {
    static CNI: OnceLock<CniMetrics> = OnceLock::new();
    CNI.get_or_init(|| CniMetrics {
        latency: Family::new_with_constructor(histogram),
        errors: Family::default(),
    })
}

impl CniMetrics {
    /// Records one request.
    pub fn record(&self, op: CniOp, took: Duration, ok: bool) {
        self.latency
            .get_or_create(&op.label())
            .observe(took.as_secs_f64());
        let errors = self.errors.get_or_create(&op.label());
        if !ok {
            errors.inc();
        }
    }
}

/// What is read from the agent's state on each scrape.
#[derive(Debug)]
struct AgentCollector(Weak<AgentState>);

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(state) = self.0.upgrade() else {
            return Ok(());
        };
        counter(
            &mut enc,
            "margay_routing_passes",
            "Routing passes finished (each reads the inputs, plans and applies).",
            state.routing_passes(),
        )?;
        let s = state.alloc.stats();
        counter(
            &mut enc,
            "margay_ipam_batches",
            "Allocator batches served.",
            s.batches,
        )?;
        counter(
            &mut enc,
            "margay_ipam_operations",
            "IPAM operations served.",
            s.ops,
        )?;
        counter(
            &mut enc,
            "margay_ipam_block_writes",
            "Block writes that succeeded.",
            s.writes,
        )?;
        counter(
            &mut enc,
            "margay_ipam_conflicts",
            "Block writes that lost to another writer.",
            s.conflicts,
        )?;
        counter(
            &mut enc,
            "margay_ipam_busy",
            "IPAM requests answered busy.",
            s.busy,
        )?;
        let m = enc.encode_descriptor(
            "margay_agent_ready",
            "1 when the agent is ready.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(state.not_ready().is_empty())).encode(m)?;
        let api = state.api();
        let datastore = state.routing().datastore_ok && api.answering;
        let m = enc.encode_descriptor(
            "margay_datastore_reachable",
            "1 when the routing loop's last pass read every input from the Kubernetes API and the last heartbeat was answered.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(datastore)).encode(m)?;
        let m = enc.encode_descriptor(
            "margay_agent_leader",
            "1 while this agent holds the leader Lease (pool status, garbage collection).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(api.leader)).encode(m)?;
        if let Some(p) = state.policy_status() {
            let m = enc.encode_descriptor(
                "margay_policy_table_current",
                "1 when the kernel holds the NetworkPolicy table the engine computed (everything listed, the last load succeeded).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(p.current)).encode(m)?;
            let m = enc.encode_descriptor(
                "margay_policy_unenforced",
                "NetworkPolicies not enforced as written (refused or too large): each is enforced fail closed, its pods isolated with nothing allowed.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(p.unenforced.len()).unwrap_or(i64::MAX)).encode(m)?;
        }
        match state.speaker() {
            Some(sp) => sp.metrics().encode(enc),
            None => Ok(()),
        }
    }
}

/// The agent's registry: the CNI metrics and what is read from `state`.
pub fn registry(state: Weak<AgentState>) -> Registry {
    let mut r = Registry::default();
    let c = cni();
    r.register(
        "margay_cni_request_duration_seconds",
        "Time the agent took to answer a CNI request.",
        c.latency.clone(),
    );
    r.register(
        "margay_cni_request_errors",
        "CNI requests answered with an error.",
        c.errors.clone(),
    );
    r.register_collector(Box::new(AgentCollector(state)));
    r
}

/// The text exposition of `r`.
pub fn render(r: &Registry) -> String {
    margay_bgp::metrics::render(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_histogram_is_cumulative_and_errors_count() {
        let m = CniMetrics {
            latency: Family::new_with_constructor(histogram),
            errors: Family::default(),
        };
        m.record(CniOp::Add, Duration::from_micros(500), true);
        m.record(CniOp::Add, Duration::from_millis(20), false);
        m.record(CniOp::Add, Duration::from_secs(30), true);
        let mut r = Registry::default();
        r.register("x", "h", m.latency.clone());
        r.register("e", "h", m.errors.clone());
        let o = render(&r);
        assert!(
            o.contains("x_bucket{le=\"0.001\",op=\"ADD\"} 1\n")
                || o.contains("x_bucket{op=\"ADD\",le=\"0.001\"} 1\n"),
            "{o}"
        );
        assert!(o.contains("x_count{op=\"ADD\"} 3\n"), "{o}");
        assert!(o.contains("e_total{op=\"ADD\"} 1\n"), "{o}");
    }
}
