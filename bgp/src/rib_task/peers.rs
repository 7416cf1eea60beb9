//! The RIB task's peers: how each is configured ([`PeerParams`], from a
//! `[[neighbor]]` or a listen range), its slot while configured, its
//! session while established, and starting, finding and removing them
//! (the peer tasks are the RIB task's, in its `JoinSet`).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use margay_task::Owned;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::RibTask;
use crate::config::{Config, ListenRange, Neighbor};
use crate::fsm::{SessionConfig, State};
use crate::group::{GroupKey, Member};
use crate::net::canonical;
use crate::packet::consts::{AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use crate::packet::{Ctx, GracefulRestartCap, Prefix};
use crate::peer::{PeerCmd, PeerStatus, PeerTask, Transport};
use crate::rib::PeerId;
use crate::{Error, Result};

/// First reconnect delay; it doubles per failure up to 30 s. Short, because
/// the usual failure is a peer (a node) not listening yet.
const RETRY_BASE: Duration = Duration::from_millis(250);

/// How a peer is configured, whether from `[[neighbor]]` or a listen range.
#[derive(Debug, Clone)]
pub(super) struct PeerParams {
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) asn: u32,
    pub(super) rr_client: bool,
    pub(super) next_hop_self: bool,
    pub(super) max_prefixes: Option<usize>,
    pub(super) password: Option<String>,
    pub(super) gtsm_hops: Option<u8>,
    pub(super) dynamic: bool,
    pub(super) export_local_only: bool,
    pub(super) session: SessionConfig,
    /// Its BFD session's settings, when it has one.
    pub(super) bfd: Option<crate::bfd::Params>,
}

impl PeerParams {
    /// A `[[neighbor]]`'s.
    pub(super) fn configured(cfg: &Config, n: &Neighbor, restarting: bool) -> Self {
        let gr = n.graceful_restart.then(|| {
            let mut cap = gr_cap(cfg, restarting);
            if let Some(t) = n.restart_time {
                cap.restart_time = t;
            }
            cap
        });
        Self {
            addr: n.address,
            port: n.port,
            asn: n.asn,
            rr_client: n.route_reflector_client,
            next_hop_self: n.next_hop_self,
            max_prefixes: n.max_prefixes,
            password: n.password.clone(),
            gtsm_hops: n.ttl_security,
            dynamic: false,
            export_local_only: n.export_local_only,
            session: session(cfg, n.asn, n.hold_time, n.keepalive, n.passive, gr),
            bfd: n.bfd.as_ref().map(|b| b.params()),
        }
    }

    /// A dynamic neighbor's: `addr` connected from inside listen range `r`.
    fn dynamic(cfg: &Config, addr: IpAddr, r: &ListenRange, restarting: bool) -> Self {
        let gr = r.graceful_restart.then(|| gr_cap(cfg, restarting));
        Self {
            addr,
            port: 179,
            asn: r.asn,
            rr_client: r.route_reflector_client,
            next_hop_self: false,
            max_prefixes: None,
            password: None,
            gtsm_hops: None,
            dynamic: true,
            export_local_only: false,
            session: session(cfg, r.asn, r.hold_time, None, true, gr),
            bfd: None,
        }
    }
}

/// The session parameters of a peer in AS `peer_as`.
fn session(
    cfg: &Config,
    peer_as: u32,
    hold_time: u16,
    keepalive: Option<u16>,
    passive: bool,
    graceful_restart: Option<GracefulRestartCap>,
) -> SessionConfig {
    SessionConfig {
        local_as: cfg.asn,
        peer_as,
        router_id: cfg.router_id,
        hold_time,
        keepalive,
        passive,
        families: families(),
        graceful_restart,
        retry_base: RETRY_BASE,
        retry_max: Duration::from_secs(30),
    }
}

pub(super) struct PeerSlot {
    pub(super) params: PeerParams,
    /// The configuration it came from (`None`: a dynamic neighbor).
    pub(super) source: Option<Neighbor>,
    pub(super) status: Arc<Mutex<PeerStatus>>,
    /// Commands to the peer task; dropping it ends the task (Cease/peer
    /// de-configured). `None`: a passive neighbor nobody has connected
    /// from yet, whose task starts with the first connection (a full mesh
    /// of many nodes where the other side dials costs no task per node).
    pub(super) incoming: Option<mpsc::Sender<PeerCmd>>,
    pub(super) session: Option<Established>,
    /// Graceful restart: when the peer's stale routes are dropped (RFC 4724
    /// restart time); cancelled with the slot.
    pub(super) stale_timer: Option<Owned>,
}

pub(super) struct Established {
    pub(super) out: mpsc::UnboundedSender<crate::peer::Wire>,
    pub(super) ctx: Ctx,
    /// Its update group (whose Adj-RIB-Out is what it was told, less
    /// what `member` holds back); its families are the session's.
    pub(super) group: GroupKey,
    pub(super) member: Member,
    pub(super) eor_received: HashSet<u16>,
    /// When a ROUTE-REFRESH was last served, and the timer of one asked for
    /// since (any number of them are served once, [`REFRESH_GAP`] after).
    pub(super) refreshed: Option<tokio::time::Instant>,
    pub(super) refresh_due: Option<Owned>,
}

/// The shortest time between two full re-advertisements a peer's
/// ROUTE-REFRESH messages cause: a peer that floods them gets one per gap.
pub(super) const REFRESH_GAP: Duration = Duration::from_secs(5);

pub(super) fn set_listener_md5(listener: &TcpListener, n: &Neighbor) -> Result<()> {
    let v6 = listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    crate::net::set_md5(listener, n.address, n.password.as_deref(), v6).map_err(|e| {
        Error::Config(format!(
            "neighbor {}: cannot set TCP MD5 key: {e}",
            n.address
        ))
    })
}

/// The families every session announces.
fn families() -> Vec<(u16, u8)> {
    vec![(AFI_IPV4, SAFI_UNICAST), (AFI_IPV6, SAFI_UNICAST)]
}

fn gr_cap(cfg: &Config, restarting: bool) -> GracefulRestartCap {
    GracefulRestartCap {
        restarting,
        notification: false,
        restart_time: cfg.restart_time,
        families: families()
            .into_iter()
            .map(|(a, s)| (a, s, cfg.fib || cfg.forwarding_preserved))
            .collect(),
    }
}

impl RibTask {
    pub(super) fn add_peer(&mut self, params: PeerParams, source: Option<Neighbor>) -> PeerId {
        let id = self.next_id;
        self.next_id += 1;
        // A configured passive neighbor waits for its connection without a
        // task (Active, as its FSM would say).
        let lazy = params.session.passive && source.is_some();
        let status = Arc::new(Mutex::new(PeerStatus {
            address: params.addr,
            asn: params.asn,
            state: if lazy { State::Active } else { State::Idle },
            since: Some(Instant::now()),
            prefixes_received: 0,
            prefixes_sent: 0,
            updates_in: 0,
            updates_out: 0,
            last_error: None,
            dynamic: params.dynamic,
            too_big: 0,
            bfd: super::bfd_status(self.bfd.as_ref(), params.addr, params.bfd.is_some()),
        }));
        self.shared
            .peers
            .lock()
            .expect("peers")
            .insert(id, status.clone());
        self.peers.insert(
            id,
            PeerSlot {
                params,
                source,
                status,
                incoming: None,
                session: None,
                stale_timer: None,
            },
        );
        if !lazy {
            self.start_peer(id);
        }
        id
    }

    /// Peer `id`'s command channel, its task started first if it has none.
    pub(super) fn start_peer(&mut self, id: PeerId) -> Option<mpsc::Sender<PeerCmd>> {
        let slot = self.peers.get_mut(&id)?;
        if let Some(tx) = &slot.incoming {
            return Some(tx.clone());
        }
        let (itx, irx) = mpsc::channel(4);
        let task = PeerTask {
            id,
            transport: Transport {
                addr: SocketAddr::new(slot.params.addr, slot.params.port),
                password: slot.params.password.clone(),
                gtsm_hops: slot.params.gtsm_hops,
            },
            session: crate::fsm::Session::new(slot.params.session.clone()),
            events: self.peer_tx.clone(),
            status: slot.status.clone(),
            incoming: irx,
            shutdown: self.shutdown.clone(),
        };
        slot.incoming = Some(itx.clone());
        self.peer_tasks.spawn(task.run());
        Some(itx)
    }

    /// Forgets a peer; dropping its command channel ends its task, which
    /// closes the session with Cease/peer de-configured.
    pub(super) fn remove_peer(&mut self, id: PeerId) -> Option<PeerSlot> {
        self.leave_group(id);
        self.shared.peers.lock().expect("peers").remove(&id);
        self.peers.remove(&id)
    }

    /// The update group of peer `id`, while it is established.
    pub(super) fn group_of(&self, id: PeerId) -> Option<GroupKey> {
        self.peers
            .get(&id)
            .and_then(|p| p.session.as_ref())
            .map(|s| s.group.clone())
    }

    /// Peer `id` (established) leaves its update group; the last member
    /// out drops the group's table.
    pub(super) fn leave_group(&mut self, id: PeerId) {
        let Some(key) = self.group_of(id) else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&key) {
            g.members.remove(&id);
            if g.members.is_empty() {
                self.groups.remove(&key);
            }
        }
    }

    pub(super) fn incoming(&mut self, stream: TcpStream, from: SocketAddr) {
        let ip = canonical(from.ip());
        let known = self
            .peers
            .iter()
            .find(|(_, p)| p.params.addr == ip)
            .map(|(id, _)| *id);
        if let Some(id) = known {
            if let Some(tx) = self.start_peer(id) {
                let _ = tx.try_send(PeerCmd::Incoming(stream));
            }
            return;
        }
        let host = Prefix::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix");
        let Some(r) = self
            .cfg
            .listen_ranges
            .iter()
            .find(|r| r.prefix.contains(&host))
        else {
            tracing::info!(%from, "connection from an unknown address refused");
            return;
        };
        let params = PeerParams::dynamic(&self.cfg, ip, r, self.restarting);
        let id = self.add_peer(params, None);
        if let Some(tx) = self.start_peer(id) {
            let _ = tx.try_send(PeerCmd::Incoming(stream));
        }
    }
}
