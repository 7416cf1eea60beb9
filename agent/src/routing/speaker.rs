//! The embedded speaker ([`margay_bgp::speaker::Speaker`] with kernel
//! writes off: the agent programs routes itself), as the routing pass's
//! [`Bgp`]: started and restarted with [`SpeakerSettings`], published in
//! the agent's state for `/status` and the metrics, and remembering what it
//! was given (neighbors, whether they came from current inputs, when it
//! started) for the next pass's snapshot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use margay_bgp::config::{Config, Neighbor};
use margay_bgp::packet::Prefix;
use margay_bgp::speaker::Speaker;

use super::apply::Bgp;
use super::plan::{SpeakerSettings, SpeakerView};
use super::sessions::Live;
use crate::obs::AgentState;

/// The speaker the agent runs.
#[derive(Debug)]
pub struct Embedded {
    running: Option<Running>,
    /// A speaker turned off, kept until its peers have heard Cease (its
    /// tasks end with it).
    stopping: Option<Arc<Speaker>>,
    state: Arc<AgentState>,
}

#[derive(Debug)]
struct Running {
    settings: SpeakerSettings,
    live: Live,
    speaker: Arc<Speaker>,
    started: Instant,
    neighbors: Vec<Neighbor>,
    neighbors_set: bool,
}

impl Embedded {
    /// No speaker yet; `state` is where it is published.
    pub fn new(state: Arc<AgentState>) -> Self {
        Self {
            running: None,
            stopping: None,
            state,
        }
    }

    /// The running speaker.
    pub fn speaker(&self) -> Option<Arc<Speaker>> {
        self.running.as_ref().map(|r| r.speaker.clone())
    }

    fn running(&self) -> margay_bgp::Result<&Running> {
        self.running.as_ref().ok_or(margay_bgp::Error::Stopped)
    }
}

impl Bgp for Embedded {
    fn view(&self) -> SpeakerView {
        match &self.running {
            None => SpeakerView::default(),
            Some(r) => SpeakerView {
                settings: Some(r.settings.clone()),
                live: Some(r.live.clone()),
                neighbors: r.neighbors.clone(),
                neighbors_set: r.neighbors_set,
                learned: Some(r.speaker.learned().borrow().clone()),
                synced: *r.speaker.synced().borrow(),
                age: r.started.elapsed(),
            },
        }
    }

    async fn start(
        &mut self,
        s: &SpeakerSettings,
        live: &Live,
        import: &[Prefix],
        originate: &[Prefix],
    ) -> margay_bgp::Result<()> {
        if let Some(old) = self.running.take() {
            // Without a NOTIFICATION: the peers keep our routes (graceful
            // restart) until the new speaker has re-advertised them, and
            // the kernel keeps theirs (the plan removes nothing until the
            // new sessions have sent End-of-RIB).
            tracing::info!("BGP settings changed; restarting the speaker gracefully");
            self.state.set_speaker(None);
            old.speaker.stop_graceful();
            // Its listener must be gone before the new one binds.
            let _ = tokio::time::timeout(Duration::from_secs(2), old.speaker.stopped()).await;
        }
        if let Some(old) = self.stopping.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), old.stopped()).await;
        }
        let g = &s.global;
        let mut cfg = Config::new(g.asn, s.router_id);
        cfg.listen = Some(SocketAddr::from(([0u16; 8], g.port)));
        cfg.fib = false;
        cfg.forwarding_preserved = true;
        cfg.restart_time = live.restart_time;
        cfg.communities = live.communities.clone();
        cfg.cluster_id = s.cluster_id;
        cfg.import_prefixes = import.to_vec();
        cfg.originate = originate
            .iter()
            .map(|p| margay_bgp::config::Originate { prefix: *p })
            .collect();
        let sp = Arc::new(Speaker::start(cfg).await?);
        tracing::info!(asn = g.asn, router_id = %s.router_id, port = g.port, "BGP speaker started");
        self.state.set_speaker(Some(sp.clone()));
        self.running = Some(Running {
            settings: s.clone(),
            live: live.clone(),
            speaker: sp,
            started: Instant::now(),
            neighbors: Vec::new(),
            neighbors_set: false,
        });
        Ok(())
    }

    async fn set_live(&mut self, live: &Live) -> margay_bgp::Result<()> {
        let r = self.running()?;
        let sp = r.speaker.clone();
        if r.live.communities != live.communities {
            sp.set_communities(live.communities.clone()).await?;
            tracing::info!(communities = ?live.communities, "communities re-advertised");
        }
        if r.live.restart_time != live.restart_time {
            sp.set_restart_time(live.restart_time).await?;
        }
        if let Some(r) = self.running.as_mut() {
            r.live = live.clone();
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            tracing::info!("BGP turned off; stopping the speaker");
            r.speaker.stop();
            self.state.set_speaker(None);
            self.stopping = Some(r.speaker);
        }
    }

    async fn set_neighbors(&mut self, n: Vec<Neighbor>) -> margay_bgp::Result<()> {
        let r = self.running()?;
        if r.neighbors_set && r.neighbors == n {
            return Ok(());
        }
        r.speaker.set_neighbors(n.clone()).await?;
        let r = self.running.as_mut().expect("running");
        r.neighbors = n;
        r.neighbors_set = true;
        Ok(())
    }

    async fn set_import(&mut self, p: Vec<Prefix>) -> margay_bgp::Result<()> {
        let sp = self.running()?.speaker.clone();
        sp.set_import(p).await
    }

    async fn set_originate(&mut self, p: Vec<Prefix>) -> margay_bgp::Result<()> {
        let sp = self.running()?.speaker.clone();
        sp.set_originate(p).await
    }
}
