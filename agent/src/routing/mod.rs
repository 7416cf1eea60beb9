//! The routing loop: this node's BGP identity, its sessions, what it
//! advertises, and the kernel routes to every other node's blocks.
//!
//! Each pass is three steps (controller-rs and felix are the model):
//! 1. a [`plan::Snapshot`] of every input, each [`Known`]: this node's
//!    Node, every node's `MargayNode` (not the Node objects: their status
//!    is rewritten every few minutes, a `MargayNode` only when its node's
//!    identity changes), BGPConfigurations, BGPPeers and IPPools from watches
//!    ([`crate::kube::reflect`]), this node's blocks from [`local`], BGP
//!    passwords, the host's addresses, and the speaker's view;
//! 2. [`plan::plan`], pure: what to publish, how to run the speaker, which
//!    remote routes to have and whether anything may be removed;
//! 3. [`apply::apply`], thin I/O over [`crate::dataplane::Dataplane`],
//!    [`apply::Bgp`] ([`speaker::Embedded`]) and [`apply::ClusterWrites`].
//!
//! A pass runs on any watch event, learned-route or BGP-sync change, own
//! block change, and every resync period. The modules: [`sessions`] (who
//! peers with whom), [`nodes`] (the identity published and read, the address choice),
//! [`encap`] (blocks to kernel state per encapsulation), [`problem`] (what
//! is reported), [`local`] (this node's blackholes and pod routes).

pub mod apply;
pub mod encap;
pub mod local;
pub mod nodes;
pub mod plan;
pub mod problem;
pub mod sessions;
pub mod speaker;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::Api;
use margay_api::bgp::{BGPConfiguration, BGPPeer};
use margay_api::condition::Condition;
use margay_api::ipam::AllowedUse;
use margay_ipam::k8s::KubeStore;
use margay_ipam::model::validate_pools;
use margay_ipam::{Allocator, Assign};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::dataplane::{Dataplane, PerTunnel, Tunnel};
use crate::kube::node::Annotations;
use crate::kube::{Known, Watched, Why, deadline, watch as watched, watch_with};
use crate::obs::AgentState;
use apply::{Bgp, ClusterWrites};
use kube::runtime::watcher;
use margay_api::identity::MargayNode;
use plan::Snapshot;

/// What the routing loop needs.
pub struct RoutingCtx<D> {
    /// This node.
    pub node: String,
    /// The API client.
    pub client: Client,
    /// IPAM's store; its watches give the pools.
    pub store: Arc<KubeStore>,
    /// Notified by every watch the loop reads (the store's too).
    pub poke: Arc<Notify>,
    /// Whether this agent holds the leader Lease.
    pub leader: watch::Receiver<bool>,
    /// IPAM (the VXLAN tunnel address).
    pub alloc: Allocator,
    /// The kernel.
    pub dp: Arc<D>,
    /// This node's blocks and pods' addresses, from [`local::run`].
    pub own_blocks: watch::Receiver<Known<local::Local>>,
    /// Shared status.
    pub state: Arc<AgentState>,
    /// `--node-ip`: the BGP address (`autodetect` or an address, optionally with its prefix length).
    pub node_ip: String,
    /// Namespace of BGP password Secrets.
    pub namespace: String,
    /// Namespace of the agents' heartbeat Leases (read for nodes that
    /// share an address, to tell the live one).
    pub lease_namespace: String,
    /// Underlay MTU.
    pub mtu: u32,
    /// Resync period.
    pub every: Duration,
    /// Run the BGP speaker and program remote routes (off: identity and
    /// conditions only, for clusters routed by something else).
    pub bgp: bool,
}

impl<D> std::fmt::Debug for RoutingCtx<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingCtx")
            .field("node", &self.node)
            .field("node_ip", &self.node_ip)
            .field("bgp", &self.bgp)
            .finish_non_exhaustive()
    }
}

/// The cluster writes of a pass, on the real API and IPAM.
struct Kube {
    client: Client,
    node: String,
    alloc: Allocator,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ClusterWrites for Kube {
    // Every write has a deadline: a pass that waits on a frozen API would
    // also hold the kernel's routes back from what BGP learned.
    async fn annotate(&self, a: &Annotations) -> crate::Result<()> {
        deadline(
            || format!("annotating Node {}", self.node),
            crate::kube::node::annotate(&self.client, &self.node, a),
        )
        .await
    }

    async fn identity(&self, w: &margay_api::identity::Wanted) -> crate::Result<()> {
        deadline(
            || format!("writing MargayNode {}", self.node),
            crate::kube::node::write_identity(&self.client, &self.node, w),
        )
        .await
    }

    async fn node_status(&self, patch: &serde_json::Value) -> crate::Result<()> {
        deadline(
            || format!("the condition of Node {}", self.node),
            crate::kube::node::patch_status(&self.client, &self.node, patch),
        )
        .await
    }

    async fn valid_config(&self, name: &str, c: &Condition) -> crate::Result<()> {
        deadline(
            || format!("the Valid condition of BGPConfiguration {name}"),
            crate::kube::valid::write::<BGPConfiguration>(&self.client, name, c),
        )
        .await
    }

    async fn valid_peer(&self, name: &str, c: &Condition) -> crate::Result<()> {
        deadline(
            || format!("the Valid condition of BGPPeer {name}"),
            crate::kube::valid::write::<BGPPeer>(&self.client, name, c),
        )
        .await
    }

    async fn assign_tunnel(&self, t: Tunnel) -> crate::Result<Option<Ipv4Addr>> {
        let assign = async {
            self.alloc
                .assign(Assign {
                    handle: t.handle(&self.node),
                    pod: None,
                    use_: AllowedUse::Tunnel,
                })
                .await
                .map_err(crate::Error::from)
        };
        let addrs = deadline(|| format!("the {t} tunnel address"), assign).await?;
        Ok(addrs.iter().find_map(|a| match a.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }))
    }

    async fn release_tunnel(&self, t: Tunnel) -> crate::Result<usize> {
        let release = async {
            self.alloc
                .release(&t.handle(&self.node))
                .await
                .map_err(crate::Error::from)
        };
        deadline(|| format!("releasing the {t} tunnel address"), release)
            .await
            .map(|freed| freed.len())
    }
}

/// The watched inputs (the pools are the store's).
struct Inputs {
    me: Watched<Node>,
    nodes: Watched<MargayNode>,
    peers: Watched<BGPPeer>,
    configs: Watched<BGPConfiguration>,
}

impl Inputs {
    fn start(
        client: &Client,
        node: &str,
        poke: &Arc<Notify>,
        tasks: &mut JoinSet<&'static str>,
    ) -> Self {
        let mut own =
            |what: &'static str, t: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
                tasks.spawn(async move {
                    t.await;
                    what
                });
            };
        let (me, t) = watch_with(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            "this Node",
            poke.clone(),
        );
        own("Node watch", Box::pin(t));
        let (nodes, t) = watched(Api::all(client.clone()), "MargayNodes", poke.clone());
        own("MargayNode watch", Box::pin(t));
        let (peers, t) = watched(Api::all(client.clone()), "BGPPeers", poke.clone());
        own("BGPPeer watch", Box::pin(t));
        let (configs, t) = watched(Api::all(client.clone()), "BGPConfigurations", poke.clone());
        own("BGPConfiguration watch", Box::pin(t));
        Self {
            me,
            nodes,
            peers,
            configs,
        }
    }
}

/// `k`, stale for `why` when the API does not answer.
fn unless_quiet<T>(k: Known<T>, why: &Option<Why>) -> Known<T> {
    match why {
        Some(w) => k.failed(w.clone()),
        None => k,
    }
}

/// Runs until the process ends; an error means a task it owns ended.
pub async fn run<D: Dataplane>(ctx: RoutingCtx<D>) -> crate::Result<()> {
    let poke = ctx.poke.clone();
    let mut watchers = JoinSet::new();
    let inputs = Inputs::start(&ctx.client, &ctx.node, &poke, &mut watchers);
    let mut liveness = Liveness::default();
    let cluster = Kube {
        client: ctx.client.clone(),
        node: ctx.node.clone(),
        alloc: ctx.alloc.clone(),
    };
    let mut bgp = speaker::Embedded::new(ctx.state.clone());
    let mut own = ctx.own_blocks.clone();
    let mut host: Known<Vec<(String, IpNetwork)>> = Known::Unknown(Why::NotRead(None));
    let mut tunnels = Tunnels::default();
    let mut secrets = crate::kube::secrets::SecretWatches::new(
        ctx.client.clone(),
        &ctx.namespace,
        poke.clone(),
        ctx.every,
    );
    let mut leader = ctx.leader.clone();
    let mut policy = ctx.state.policy_status.get().cloned();
    let mut policy_current = true;
    let mut speaker_watch: Option<SpeakerWatch> = None;
    let mut why = "start";
    loop {
        let t = Instant::now();
        host = match ctx.dp.host_addresses().await {
            Ok(h) => Known::Fresh(h),
            Err(e) => host.failed(Why::Local {
                what: "list this host's addresses",
                error: e.to_string(),
            }),
        };
        // A watch the API stopped answering may look current (an open
        // connection that says nothing): while the heartbeat goes
        // unanswered every watched input counts as stale.
        let api = ctx.state.api();
        let quiet = (!api.answering)
            .then_some(api.last_error)
            .flatten()
            .map(Why::ApiQuiet);
        let peers = unless_quiet(inputs.peers.read(), &quiet);
        let refs = peers
            .value()
            .map(|p| {
                let named: Vec<_> = p.iter().map(|p| (String::new(), p.spec.clone())).collect();
                sessions::password_refs(&named)
            })
            .unwrap_or_default();
        let own_blocks = own.borrow_and_update().clone();
        let passwords = secrets.passwords(&refs).await;
        let nodes = unless_quiet(inputs.nodes.read(), &quiet);
        let alive = match nodes.value() {
            Some(all) => {
                let shared = nodes::sharing_an_address(
                    all.iter().map(|n| nodes::name_and_address(n)),
                    &ctx.node,
                );
                liveness
                    .alive(&ctx.client, &ctx.lease_namespace, &shared)
                    .await
            }
            None => Default::default(),
        };
        let snap = Snapshot {
            node: ctx.node.clone(),
            node_ip: ctx.node_ip.clone(),
            bgp: ctx.bgp,
            mtu: ctx.mtu,
            me: unless_quiet(inputs.me.read(), &quiet).map(|v| v.first().cloned()),
            nodes,
            alive,
            configs: unless_quiet(inputs.configs.read(), &quiet),
            peers,
            pools: match ctx.store.pool_watch() {
                Some(w) => unless_quiet(w.read(), &quiet).map(|p| {
                    validate_pools(&p.iter().map(|p| (**p).clone()).collect::<Vec<_>>()).0
                }),
                None => Known::Unknown(Why::NoPools),
            },
            own_blocks,
            passwords,
            host: host.clone(),
            tunnels: tunnels.inputs(),
            leader: *leader.borrow_and_update(),
            speaker: {
                // Seen now: a change from here on wakes the next pass.
                if let Some(w) = speaker_watch.as_mut() {
                    w.mark_seen();
                }
                bgp.view()
            },
            policy_stale: policy.as_mut().and_then(|p| {
                let s = p.borrow_and_update();
                policy_current = s.current;
                policy_stale(&s)
            }),
        };
        let plan = plan::plan(&snap);
        let (used, announced) = (plan.tunnels_used, plan.tunnels_announced);
        let out = apply::apply(plan, ctx.dp.as_ref(), &mut bgp, &cluster).await;
        let again = tunnels.update(used, announced, &out);
        for p in ctx.state.set_routing(out.status) {
            tracing::warn!("routing: {p}");
        }
        tracing::debug!(why, took = ?t.elapsed(), "routing pass");
        if again {
            why = "tunnels";
            continue;
        }
        let sp = bgp.speaker();
        SpeakerWatch::follow(&mut speaker_watch, sp.as_ref());
        let (learned, synced) = match speaker_watch.as_mut() {
            Some(w) => (Some(&mut w.learned), Some(&mut w.synced)),
            None => (None, None),
        };
        why = tokio::select! {
            _ = poke.notified() => "watch",
            _ = own.changed() => "own blocks",
            Ok(()) = leader.changed() => "leadership",
            _ = changed(learned) => "learned routes",
            _ = changed(synced) => "BGP sync",
            _ = currency(&mut policy, policy_current) => "NetworkPolicy table",
            _ = tokio::time::sleep(tunnels.next_wake(ctx.every)) => "resync",
            () = stopped(sp.as_deref()) => {
                return Err(crate::Error::TaskEnded("BGP speaker"));
            }
            Some(r) = watchers.join_next() => {
                return match r {
                    Ok(what) => Err(crate::Error::TaskEnded(what)),
                    Err(e) => Err(crate::Error::TaskPanicked { task: "watch", why: e.to_string() }),
                };
            }
        };
        // Let a burst of events settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which agents are alive, by their heartbeat Leases, for the few nodes
/// that share an address with another (none in a healthy cluster: then no
/// Lease is read). Each answer is kept [`Liveness::TTL`].
#[derive(Debug, Default)]
struct Liveness {
    seen: std::collections::HashMap<String, (Instant, bool)>,
}

impl Liveness {
    const TTL: Duration = Duration::from_secs(30);

    async fn alive(
        &mut self,
        client: &Client,
        namespace: &str,
        names: &std::collections::BTreeSet<String>,
    ) -> std::collections::BTreeSet<String> {
        use k8s_openapi::api::coordination::v1::Lease;
        self.seen
            .retain(|n, (at, _)| names.contains(n) && at.elapsed() < Self::TTL);
        let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
        for name in names {
            if self.seen.contains_key(name) {
                continue;
            }
            let lease = margay_api::node::heartbeat_lease(name);
            let what = || format!("reading node {name}'s heartbeat Lease");
            let got = crate::kube::deadline(what, async {
                leases
                    .get_opt(&lease)
                    .await
                    .map_err(|e| crate::Error::kube(what(), e))
            })
            .await;
            match got {
                Ok(l) => {
                    let alive = l.is_some_and(|l| {
                        margay_api::node::lease_alive(&l, Duration::from_secs(30))
                    });
                    self.seen.insert(name.clone(), (Instant::now(), alive));
                }
                // Not known: counted as not alive this pass, asked again
                // the next (an address stays ambiguous meanwhile).
                Err(e) => tracing::debug!("{e}"),
            }
        }
        names
            .iter()
            .filter(|n| self.seen.get(*n).is_some_and(|(_, a)| *a))
            .cloned()
            .collect()
    }
}

/// What the loop remembers of this node's tunnels between passes.
#[derive(Debug, Default)]
struct Tunnels {
    ip: PerTunnel<Option<Ipv4Addr>>,
    ready: PerTunnel<bool>,
    unused_since: PerTunnel<Option<Instant>>,
    retired: PerTunnel<bool>,
}

impl Tunnels {
    fn inputs(&self) -> PerTunnel<plan::TunnelInput> {
        self.ip.map(|t, ip| plan::TunnelInput {
            ip: *ip,
            ready: *self.ready.get(t),
            unused_for: self.unused_since.get(t).map(|s| s.elapsed()),
            retired: *self.retired.get(t),
        })
    }

    /// Takes in a pass's outcome; whether another pass should follow at
    /// once (an address was allocated, a device became ready, a tunnel
    /// was retired: the next pass uses or announces it). An unused
    /// tunnel's linger starts once this node is seen announcing the
    /// tunnels the pools use (`announced`): until then the others still
    /// route to it through the old one.
    fn update(
        &mut self,
        used: Option<PerTunnel<bool>>,
        announced: bool,
        out: &apply::Outcome,
    ) -> bool {
        let mut again = false;
        for t in Tunnel::ALL {
            match used.map(|u| *u.get(t)) {
                Some(true) => {
                    *self.unused_since.get_mut(t) = None;
                    *self.retired.get_mut(t) = false;
                }
                Some(false) if announced => {
                    self.unused_since
                        .get_mut(t)
                        .get_or_insert_with(Instant::now);
                }
                Some(false) => *self.unused_since.get_mut(t) = None,
                None => {}
            }
            if let Some(ip) = *out.assigned.get(t) {
                again |= self.ip.get(t).is_none();
                *self.ip.get_mut(t) = Some(ip);
            }
            again |= *out.ready.get(t) && !self.ready.get(t);
            *self.ready.get_mut(t) = *out.ready.get(t);
            if *out.retired.get(t) {
                *self.retired.get_mut(t) = true;
                *self.ip.get_mut(t) = None;
                again = true;
            }
        }
        again
    }

    /// How long to sleep at most: `every`, or until a tunnel has lingered
    /// long enough to be retired.
    fn next_wake(&self, every: Duration) -> Duration {
        Tunnel::ALL
            .iter()
            .filter(|t| !self.retired.get(**t))
            .filter_map(|t| *self.unused_since.get(*t))
            .filter(|s| s.elapsed() < plan::TUNNEL_LINGER)
            .map(|s| plan::TUNNEL_LINGER - s.elapsed() + Duration::from_millis(100))
            .fold(every, Duration::min)
    }
}

/// Why the NetworkPolicy table is not current, if it is not.
fn policy_stale(s: &margay_api::status::PolicyStatus) -> Option<String> {
    if s.current {
        return None;
    }
    Some(if !s.waiting_for.is_empty() {
        format!("{} not listed yet", s.waiting_for.join(", "))
    } else if let Some(e) = &s.last_error {
        format!("{e} (reloading)")
    } else {
        "not loaded yet".to_string()
    })
}

/// Until the NetworkPolicy table's currency differs from `was`.
async fn currency(rx: &mut Option<watch::Receiver<margay_api::status::PolicyStatus>>, was: bool) {
    match rx {
        Some(rx) => {
            if rx.wait_for(|s| s.current != was).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The running speaker's `learned` and `synced` watches, subscribed once
/// per speaker and marked seen when a pass reads them: a change made while
/// a pass runs wakes the next one. (A fresh clone of the speaker's
/// receivers each pass would not do: a clone has seen what the original
/// has, here nothing since the speaker started, so it woke every pass at
/// once once a route was learned.)
struct SpeakerWatch {
    speaker: Arc<margay_bgp::speaker::Speaker>,
    learned: watch::Receiver<margay_bgp::speaker::LearnedRoutes>,
    synced: watch::Receiver<bool>,
}

impl SpeakerWatch {
    /// Follows `now`, the running speaker: a new one is subscribed to
    /// (its receivers have seen nothing, so whatever it learned since it
    /// started wakes a pass at once).
    fn follow(w: &mut Option<Self>, now: Option<&Arc<margay_bgp::speaker::Speaker>>) {
        let same = matches!((&*w, now), (Some(w), Some(s)) if Arc::ptr_eq(&w.speaker, s));
        if !same {
            *w = now.map(|s| Self {
                speaker: s.clone(),
                learned: s.learned(),
                synced: s.synced(),
            });
        }
    }

    fn mark_seen(&mut self) {
        self.learned.mark_unchanged();
        self.synced.mark_unchanged();
    }
}

async fn changed<T>(rx: Option<&mut watch::Receiver<T>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn stopped(sp: Option<&margay_bgp::speaker::Speaker>) {
    match sp {
        Some(s) => s.stopped().await,
        None => std::future::pending().await,
    }
}
