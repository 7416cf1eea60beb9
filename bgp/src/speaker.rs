//! The speaker's handle ([`Speaker`]): what a program embedding Margay's
//! BGP (the agent, `margay-bgp`) holds. It starts the RIB task
//! (`rib_task`), owns it, and talks to it over a channel; the
//! neighbor view and the metrics are read from state the tasks share,
//! without a round trip. See the crate's doc for the task diagram.

use std::sync::Arc;
use std::time::Duration;

use margay_api::status::{NeighborView, RouteView};
use margay_task::Owned;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, Neighbor};
use crate::packet::Prefix;
use crate::peer::Stop;
use crate::rib_task::{RibTask, Started, ToRib};
use crate::state::Shared;
use crate::{Error, Result};

pub use crate::rib::LearnedRoutes;

/// A running speaker.
///
/// Its tasks (the RIB task, the listener, one task per peer) belong to it:
/// [`Speaker::stop`] or [`Speaker::shutdown`] ends them, peers first
/// sending Cease; dropping it aborts whatever still runs (a speaker to be
/// closed politely is stopped first and dropped once
/// [`Speaker::stopped`]). [`Speaker::stopped`] resolves when the RIB task
/// has ended, whether asked to or not (a panic), so an embedding program
/// can treat an unexpected end as fatal.
pub struct Speaker {
    tx: mpsc::Sender<ToRib>,
    shutdown: watch::Sender<Stop>,
    learned: watch::Receiver<LearnedRoutes>,
    synced: watch::Receiver<bool>,
    asn: u32,
    shared: Arc<Shared>,
    /// The RIB task, which owns every other task.
    _rib: Owned,
}

impl Drop for Speaker {
    /// A speaker dropped without [`Speaker::stop`] goes silently, as with
    /// [`Speaker::stop_graceful`]: its tasks, aborted with it, may still
    /// run a moment, and must not tell peers Cease (they would drop our
    /// routes at once; a process that exits, say for an upgrade, relies
    /// on graceful restart to keep them).
    fn drop(&mut self) {
        self.shutdown.send_if_modified(|s| {
            let run = *s == Stop::Run;
            if run {
                *s = Stop::Silent;
            }
            run
        });
    }
}

impl std::fmt::Debug for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speaker")
            .field("asn", &self.asn)
            .finish_non_exhaustive()
    }
}

impl Speaker {
    /// Starts the speaker: binds the listener, adopts our kernel routes
    /// left by a previous run, starts every configured peer.
    pub async fn start(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let asn = cfg.asn;
        let Started {
            tx,
            shutdown,
            learned,
            synced,
            shared,
            task,
        } = RibTask::start(cfg).await?;
        Ok(Self {
            tx,
            shutdown,
            learned,
            synced,
            asn,
            shared,
            _rib: task,
        })
    }

    async fn send(&self, m: ToRib) -> Result<()> {
        self.tx.send(m).await.map_err(|_| Error::Stopped)
    }

    /// Replaces the configured neighbors: peers no longer listed are
    /// closed (Cease/peer de-configured) and their routes withdrawn, new
    /// ones start, changed ones restart; unchanged sessions stay up.
    /// Each neighbor is validated first (nothing changes on an error).
    /// Returns once the RIB task has taken the list, so [`Speaker::synced`]
    /// from then on speaks of these neighbors.
    pub async fn set_neighbors(&self, neighbors: Vec<Neighbor>) -> Result<()> {
        for (i, n) in neighbors.iter().enumerate() {
            crate::config::validate_neighbor(n, self.asn)
                .map_err(|m| Error::Config(format!("neighbor {}: {m}", n.address)))?;
            if neighbors[..i].iter().any(|m| m.address == n.address) {
                return Err(Error::Config(format!("neighbor {}: duplicate", n.address)));
            }
        }
        let (done, rx) = oneshot::channel();
        self.send(ToRib::SetNeighbors(neighbors, done)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Replaces the prefixes we originate (withdrawing the ones dropped).
    pub async fn set_originate(&self, prefixes: Vec<Prefix>) -> Result<()> {
        self.send(ToRib::SetOriginate(prefixes)).await
    }

    /// Replaces the import filter (routes accepted from now on; an empty
    /// list accepts everything).
    pub async fn set_import(&self, allowed: Vec<Prefix>) -> Result<()> {
        self.send(ToRib::SetImport(allowed)).await
    }

    /// True once every configured peer has sent End-of-RIB for each of its
    /// families (the learned routes are complete); false again while a
    /// configured peer is down or has not finished its initial update.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// Best routes learned from peers, kept current (only with `fib` off:
    /// the program embedding the speaker programs them).
    pub fn learned(&self) -> watch::Receiver<LearnedRoutes> {
        self.learned.clone()
    }

    /// The sessions, by address.
    pub fn neighbors(&self) -> Vec<NeighborView> {
        let mut v: Vec<NeighborView> = self
            .shared
            .peers
            .lock()
            .expect("peers")
            .values()
            .map(|st| st.lock().expect("status").view())
            .collect();
        v.sort_by_key(|n| n.address);
        v
    }

    /// The best routes, by prefix.
    pub async fn routes(&self) -> Result<Vec<RouteView>> {
        let (reply, rx) = oneshot::channel();
        self.send(ToRib::Routes(reply)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The speaker's metrics, for a Prometheus registry.
    pub fn metrics(&self) -> crate::metrics::SpeakerMetrics {
        crate::metrics::SpeakerMetrics::new(self.shared.clone())
    }

    /// Resolves when the RIB task has ended (after a stop, or a panic).
    pub async fn stopped(&self) {
        self.tx.closed().await
    }

    /// Asks every task to end (peers send Cease); see [`Speaker::stopped`].
    pub fn stop(&self) {
        let _ = self.shutdown.send(Stop::Cease);
    }

    /// Like [`Speaker::stop`], but sessions are closed without a
    /// NOTIFICATION: peers that negotiated graceful restart keep our routes
    /// (stale) until the speaker that replaces this one has re-advertised
    /// them (RFC 4724), so traffic towards us keeps flowing.
    pub fn stop_graceful(&self) {
        let _ = self.shutdown.send(Stop::Silent);
    }

    /// Replaces the communities added to every export (`ASN:VALUE`): every
    /// established peer is sent the routes whose attributes change; no
    /// session is reset.
    pub async fn set_communities(&self, communities: Vec<String>) -> Result<()> {
        let values = communities
            .iter()
            .map(|c| crate::config::parse_community(c))
            .collect::<Result<Vec<u32>>>()?;
        self.send(ToRib::SetCommunities(values)).await
    }

    /// Replaces the restart time announced in the graceful restart
    /// capability (for neighbors without their own): from each session's
    /// next OPEN on; no session is reset.
    pub async fn set_restart_time(&self, secs: u16) -> Result<()> {
        if secs > 4095 {
            return Err(Error::Config(format!(
                "restart_time {secs} is more than 4095 seconds"
            )));
        }
        self.send(ToRib::SetRestartTime(secs)).await
    }

    /// Stops every session (Cease) and the tasks, and waits for them (at
    /// most a second). Kernel routes stay (forwarding state is preserved for
    /// graceful restart).
    pub async fn shutdown(self) {
        self.stop();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stopped()).await;
    }
}
