//! The agent's own Prometheus metrics: CNI request latency histograms and
//! error counts (process-wide, like a default registry), rendered in the
//! text exposition format together with the IPAM and BGP counters.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A fixed-bucket latency histogram.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    fn render(&self, o: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {n}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(o, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(o, "{name}_count{{{labels}}} {n}");
    }
}

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

/// CNI request metrics.
#[derive(Debug)]
pub struct CniMetrics {
    latency: [Histogram; 3],
    errors: [AtomicU64; 3],
}

/// The process's CNI metrics.
pub static CNI: CniMetrics = CniMetrics {
    latency: [Histogram::new(), Histogram::new(), Histogram::new()],
    errors: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
};

const OPS: [(&str, CniOp); 3] = [
    ("ADD", CniOp::Add),
    ("DEL", CniOp::Del),
    ("CHECK", CniOp::Check),
];

impl CniMetrics {
    /// Records one request.
    pub fn record(&self, op: CniOp, took: Duration, ok: bool) {
        self.latency[op as usize].observe(took);
        if !ok {
            self.errors[op as usize].fetch_add(1, Relaxed);
        }
    }

    /// The text exposition of these metrics.
    pub fn render(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP margay_cni_request_duration_seconds Time the agent took to answer a CNI request.\n# TYPE margay_cni_request_duration_seconds histogram"
        );
        for (name, op) in OPS {
            self.latency[op as usize].render(
                o,
                "margay_cni_request_duration_seconds",
                &format!("op=\"{name}\""),
            );
        }
        let _ = writeln!(
            o,
            "# HELP margay_cni_request_errors_total CNI requests answered with an error.\n# TYPE margay_cni_request_errors_total counter"
        );
        for (name, op) in OPS {
            let _ = writeln!(
                o,
                "margay_cni_request_errors_total{{op=\"{name}\"}} {}",
                self.errors[op as usize].load(Relaxed)
            );
        }
    }
}

/// IPAM counters of the node's allocator.
pub fn render_ipam(o: &mut String, s: &margay_ipam::StatsSnapshot) {
    for (name, help, v) in [
        (
            "margay_ipam_batches_total",
            "Allocator batches served.",
            s.batches,
        ),
        (
            "margay_ipam_operations_total",
            "IPAM operations served.",
            s.ops,
        ),
        (
            "margay_ipam_block_writes_total",
            "Block writes that succeeded.",
            s.writes,
        ),
        (
            "margay_ipam_conflicts_total",
            "Block writes that lost to another writer.",
            s.conflicts,
        ),
        (
            "margay_ipam_busy_total",
            "IPAM requests answered busy.",
            s.busy,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(30));
        let mut o = String::new();
        h.render(&mut o, "x", "op=\"ADD\"");
        assert!(o.contains("x_bucket{op=\"ADD\",le=\"0.001\"} 1\n"), "{o}");
        assert!(o.contains("x_bucket{op=\"ADD\",le=\"0.025\"} 2\n"), "{o}");
        assert!(o.contains("x_bucket{op=\"ADD\",le=\"10\"} 2\n"), "{o}");
        assert!(o.contains("x_bucket{op=\"ADD\",le=\"+Inf\"} 3\n"), "{o}");
        assert!(o.contains("x_count{op=\"ADD\"} 3\n"), "{o}");
    }
}
