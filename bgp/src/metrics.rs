//! The speaker's Prometheus metrics: a [`Collector`] that reads the
//! speaker's shared state at scrape time (sessions, prefixes, UPDATE and
//! kernel write counters), for any `prometheus_client` registry. The agent
//! registers it beside its own metrics; `margay-bgp show metrics` encodes a
//! registry holding only it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::fsm::State;
use crate::state::Shared;

/// The metrics of one running speaker.
#[derive(Debug, Clone)]
pub struct SpeakerMetrics(Arc<Shared>);

impl SpeakerMetrics {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self(shared)
    }
}

/// One sample per peer: (address, AS) and the value.
type PerPeer = Vec<([(&'static str, String); 2], u64)>;

/// One value of `kind` (a counter or a gauge).
fn value(m: MetricEncoder<'_>, kind: MetricType, v: u64) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v as i64).encode(m),
    }
}

/// What one metric family holds.
enum Samples {
    /// One unlabelled value.
    One(u64),
    /// A value per peer.
    PerPeer(PerPeer),
}

fn metric(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Samples,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    match samples {
        Samples::One(v) => value(m, kind, v),
        Samples::PerPeer(rows) => {
            for (labels, v) in &rows {
                value(m.encode_family(labels)?, kind, *v)?;
            }
            Ok(())
        }
    }
}

impl Collector for SpeakerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let peers: Vec<_> = self
            .0
            .peers
            .lock()
            .expect("peers")
            .values()
            .map(|s| s.lock().expect("status").clone())
            .collect();
        let rows = |f: &dyn Fn(&crate::peer::PeerStatus) -> u64| -> PerPeer {
            peers
                .iter()
                .map(|p| {
                    (
                        [
                            ("peer", p.address.to_string()),
                            ("peer_asn", p.asn.to_string()),
                        ],
                        f(p),
                    )
                })
                .collect()
        };
        let up = peers
            .iter()
            .filter(|p| p.state == State::Established)
            .count();
        metric(
            &mut enc,
            "margay_bgp_sessions_established",
            "Sessions in state Established.",
            MetricType::Gauge,
            Samples::One(up as u64),
        )?;
        metric(
            &mut enc,
            "margay_bgp_sessions_configured",
            "Known peers (configured and dynamic).",
            MetricType::Gauge,
            Samples::One(peers.len() as u64),
        )?;
        metric(
            &mut enc,
            "margay_bgp_session_up",
            "1 when the session with the peer is Established.",
            MetricType::Gauge,
            Samples::PerPeer(rows(&|p| u64::from(p.state == State::Established))),
        )?;
        // Only peers with BFD on have a row.
        let bfd: PerPeer = rows(&|p| u64::from(p.bfd == Some(crate::bfd::State::Up)))
            .into_iter()
            .zip(&peers)
            .filter(|(_, p)| p.bfd.is_some())
            .map(|(row, _)| row)
            .collect();
        metric(
            &mut enc,
            "margay_bgp_bfd_up",
            "1 when the BFD session with the peer is Up (peers with BFD on).",
            MetricType::Gauge,
            Samples::PerPeer(bfd),
        )?;
        metric(
            &mut enc,
            "margay_bgp_updates_received",
            "UPDATE messages received.",
            MetricType::Counter,
            Samples::PerPeer(rows(&|p| p.updates_in)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_updates_sent",
            "UPDATE messages sent.",
            MetricType::Counter,
            Samples::PerPeer(rows(&|p| p.updates_out)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_prefixes_received",
            "Prefixes accepted from the peer.",
            MetricType::Gauge,
            Samples::PerPeer(rows(&|p| p.prefixes_received as u64)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_prefixes_sent",
            "Prefixes advertised to the peer.",
            MetricType::Gauge,
            Samples::PerPeer(rows(&|p| p.prefixes_sent as u64)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_rib_prefixes",
            "Prefixes with a best path.",
            MetricType::Gauge,
            Samples::One(self.0.rib_prefixes.load(Relaxed)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_update_groups",
            "Update groups: peers exported the same routes with the same attributes, sharing one Adj-RIB-Out.",
            MetricType::Gauge,
            Samples::One(self.0.update_groups.load(Relaxed)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_adj_rib_out_entries",
            "Routes held in the update groups' Adj-RIB-Outs, all groups together.",
            MetricType::Gauge,
            Samples::One(self.0.adj_out_entries.load(Relaxed)),
        )?;
        metric(
            &mut enc,
            "margay_bgp_updates_treated_as_withdraw",
            "UPDATEs turned into withdrawals under RFC 7606.",
            MetricType::Counter,
            Samples::One(self.0.treat_as_withdraw.load(Relaxed)),
        )?;
        let (writes, failures) = self.0.kernel.as_ref().map_or((0, 0), |k| {
            (k.writes.load(Relaxed), k.failures.load(Relaxed))
        });
        metric(
            &mut enc,
            "margay_bgp_kernel_route_writes",
            "Kernel route adds, replaces and deletes.",
            MetricType::Counter,
            Samples::One(writes),
        )?;
        metric(
            &mut enc,
            "margay_bgp_kernel_route_failures",
            "Kernel route writes that failed.",
            MetricType::Counter,
            Samples::One(failures),
        )
    }
}

/// The text exposition of a registry (OpenMetrics).
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_sessions_and_counters() {
        let shared = Arc::new(Shared::default());
        shared.rib_prefixes.store(7, Relaxed);
        let st = crate::peer::PeerStatus {
            address: "10.0.0.2".parse().unwrap(),
            asn: 65000,
            state: State::Established,
            since: None,
            prefixes_received: 3,
            prefixes_sent: 1,
            updates_in: 5,
            updates_out: 2,
            too_big: 0,
            last_error: None,
            dynamic: false,
            bfd: None,
        };
        let with_bfd = crate::peer::PeerStatus {
            address: "10.0.0.3".parse().unwrap(),
            bfd: Some(crate::bfd::State::Up),
            ..st.clone()
        };
        shared
            .peers
            .lock()
            .unwrap()
            .insert(1, Arc::new(std::sync::Mutex::new(st)));
        shared
            .peers
            .lock()
            .unwrap()
            .insert(2, Arc::new(std::sync::Mutex::new(with_bfd)));
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(SpeakerMetrics::new(shared)));
        let t = render(&r);
        for line in [
            "margay_bgp_sessions_established 2\n",
            "margay_bgp_bfd_up{peer=\"10.0.0.3\",peer_asn=\"65000\"} 1\n",
            "margay_bgp_rib_prefixes 7\n",
            "margay_bgp_updates_received_total{peer=\"10.0.0.2\",peer_asn=\"65000\"} 5\n",
            "margay_bgp_kernel_route_writes_total 0\n",
        ] {
            assert!(t.contains(line), "{t}");
        }
        assert!(!t.contains("margay_bgp_bfd_up{peer=\"10.0.0.2\""), "{t}");
    }
}
