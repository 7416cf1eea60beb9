//! `margay-agent run`: the node agent. It owns every task it starts (in
//! one `JoinSet`): IPAM's leak collection and pool status, this node's
//! blocks and pod routes, natOutgoing, the routing loop (with its watches
//! and the embedded speaker) and the health/metrics endpoints, beside the
//! CNI server. None of them is meant to end: one that ends or panics ends
//! the process with its reason and a non-zero exit, so the DaemonSet
//! restarts the agent instead of leaving it half alive.
//!
//! Start-up order: the endpoints (so probes answer), start-up
//! reconciliation of the kernel and IPAM (retried until the API answers;
//! nothing is decided without it), the spare reserve, then everything
//! else, the CNI socket last.
//!
//! # Tasks
//!
//! `══▶` is ownership (a task ends when its owner drops it: the owner
//! holds a `margay_task::Owned` or a `JoinSet`), `──▶` a channel. `run`
//! owns the first column in its `Tasks`; every other task hangs below one
//! of them or below a value they hold.
//!
//! ```text
//!  run ══Tasks══▶ IPAM watches: IPPools, IPAMConfigurations, this Node's labels,
//!   ║               IPAMBlocks (KubeStore's Watched views)
//!   ║               ─poke (Notify)──▶ routing        ─views──▶ Allocator, natOutgoing
//!   ╠═Arc═▶ Allocator ══Owned══▶ its actor  ◀─requests (mpsc + oneshot)── Reserve, CNI, routing
//!   ╠═Arc═▶ Reserve ══Owned×3══▶ writer, rechecker, refiller ◀─spares taken── CNI server
//!   ╠═Arc═▶ Netlink ══Owned══▶ the rtnetlink connection (a pod namespace's: a short
//!   ║               thread makes its socket, answers by oneshot and ends)
//!   ╠═Tasks═▶ HTTP endpoints ══JoinSet══▶ a task per connection (reads AgentState)
//!   ╠═Tasks═▶ leader election ══Owned══▶ the leader Lease's watch (and an older
//!   ║            agents' one) ─leader (watch)──▶ duties, NetworkPolicy events, routing
//!   ╠═Tasks═▶ cluster-wide duties (leader only) ══Owned══▶ its IPPool, IPAMConfiguration,
//!   ║            IPAMBlock watches and slim Node and Pod watches
//!   ╠═Tasks═▶ heartbeat (renews this node's Lease) ─API answering──▶ AgentState
//!   ╠═Tasks═▶ NetworkPolicy (its watches polled in its loop; the nftnl socket)
//!   ║            ══Owned══▶ slice writer ◀─this node's pods (watch)── NetworkPolicy
//!   ║            ◀─endpoint added/removed, rules-in waits (mpsc, PolicyHandle)── CNI server
//!   ║            ─status (watch)──▶ NetworkPolicy events, /status
//!   ╠═Tasks═▶ NetworkPolicy events (Events on policies not enforced as written)
//!   ╠═Tasks═▶ natOutgoing
//!   ╠═Tasks═▶ block routes ◀─pods changed (Notify)── CNI server
//!   ║            ─own blocks (watch)──▶ CNI server, routing
//!   ╠═Tasks═▶ routing ══JoinSet══▶ watches: this Node, MargayNodes, BGPPeers,
//!   ║            ║                 BGPConfigurations ─poke──▶ routing
//!   ║            ╠══Owned══▶ a Secret watch per password Secret ─poke──▶ routing
//!   ║            ╚═════════▶ the embedded speaker (margay-bgp: its own tree)
//!   ╚═══════════▶ CNI server (gRPC on the socket) ══JoinSet══▶ each ADD (finishes
//!                  even when its caller hangs up)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use margay_ipam::k8s::KubeStore;
use margay_ipam::{Allocator, Options, Reserve, ReserveOptions};
use tokio::task::JoinSet;

use crate::cni::{CniService, serve};
use crate::dataplane::Netlink;
use crate::obs::AgentState;
use crate::{Error, Result};

/// Settings of `margay-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// This node's name (the Node object's).
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,
    /// Kubeconfig to use instead of the in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The CNI API socket.
    #[arg(long, default_value = margay_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// MTU of pod interfaces when the CNI config does not set one.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=65535))]
    pub mtu: u32,
    /// Run leak collection every this many seconds (0: never).
    #[arg(long, default_value_t = 60)]
    pub gc_interval: u64,
    /// Addresses kept pre-assigned to this node so a pod start waits for
    /// no datastore write (0: every ADD writes before answering).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub ipam_spares: u16,
    /// At most this many addresses pre-assigned when bursts of pod starts
    /// call for more than `--ipam-spares` (twice the largest recent burst;
    /// given back after a few quiet minutes; never below `--ipam-spares`).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub ipam_spares_max: u16,
    /// Re-check the kernel's block routes and pods' host routes every this
    /// many seconds (also after a block claim, and after an ADD or DEL of
    /// an address outside the node's known blocks).
    #[arg(long, default_value_t = 30)]
    pub resync_interval: u64,
    /// This node's BGP address: `autodetect` (the Node's InternalIP if it
    /// is on this host, else the first global IPv4 address) or an address,
    /// optionally with its prefix length (`10.0.0.5/24`).
    #[arg(long, env = "IP", default_value = "autodetect")]
    pub node_ip: String,
    /// Namespace holding the Secrets BGPPeers take passwords from (and
    /// where agents before the Lease namespace kept their leader Lease,
    /// which this agent reads so that it never leads beside an older one).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// Namespace of Margay's Leases: the leader Lease and every node's
    /// heartbeat Lease (a namespace of their own: the agents' RBAC lets
    /// them write Leases there and nowhere else).
    #[arg(long, env = "MARGAY_LEASE_NAMESPACE", default_value = margay_api::node::LEASE_NAMESPACE)]
    pub lease_namespace: String,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/status` are served.
    #[arg(long, env = "MARGAY_HTTP_LISTEN", default_value = "127.0.0.1:9099")]
    pub http_listen: std::net::SocketAddr,
    /// Run no BGP speaker and program no routes to other nodes (pod
    /// networking and IPAM only, for clusters routed by something else).
    #[arg(long, env = "MARGAY_DISABLE_BGP")]
    pub disable_bgp: bool,
    /// Enforce no NetworkPolicy (for clusters where something else does):
    /// Pods, Namespaces and NetworkPolicies are not watched; the
    /// `inet margay_policy` table still checks every workload interface's
    /// sources and closes interfaces Margay does not know.
    #[arg(long, env = "MARGAY_DISABLE_POLICY")]
    pub disable_policy: bool,
    /// Reload the whole NetworkPolicy table every this many seconds
    /// (changes are loaded as they come, as deltas).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub policy_resync_interval: u64,
}

async fn client(args: &RunArgs) -> Result<kube::Client> {
    let cfg = match &args.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| Error::ClientConfig(format!("{}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Error::ClientConfig(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::ClientConfig(e.to_string()))?,
    };
    kube::Client::try_from(cfg).map_err(|e| Error::ClientConfig(e.to_string()))
}

/// The agent's tasks: each is named, and none may end.
#[derive(Debug, Default)]
struct Tasks(JoinSet<(&'static str, Result<()>)>);

impl Tasks {
    fn spawn(&mut self, name: &'static str, f: impl Future<Output = Result<()>> + Send + 'static) {
        self.0.spawn(async move { (name, f.await) });
    }

    /// Waits for the first task to end: always an error.
    async fn failed(&mut self) -> Error {
        match self.0.join_next().await {
            Some(Ok((_, Err(e)))) => e,
            Some(Ok((name, Ok(())))) => Error::TaskEnded(name),
            Some(Err(e)) => Error::TaskPanicked {
                task: "agent",
                why: e.to_string(),
            },
            None => std::future::pending().await,
        }
    }
}

/// Runs until SIGTERM or SIGINT (or until one of its tasks fails).
pub async fn run(args: RunArgs) -> Result<()> {
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .map_err(|e| Error::io("reading the hostname", e.into()))?
            .to_string_lossy()
            .into_owned(),
    };
    let client = client(&args).await?;
    let mut tasks = Tasks::default();
    // Pools, IPAM settings and this Node's labels come from watches, for
    // IPAM, the CNI service, natOutgoing and the routing loop alike.
    let poke = Arc::new(tokio::sync::Notify::new());
    let (store, watches) = KubeStore::watched(client.clone(), &node, poke.clone());
    let store = Arc::new(store);
    tasks.spawn("IPAM watches", async move {
        watches.await;
        Ok(())
    });
    let alloc = Allocator::start(store.clone(), &node, Options::default());
    let dp = Arc::new(Netlink::new()?);
    let every = Duration::from_secs(args.resync_interval.max(1));
    let state = Arc::new(AgentState::new(
        &node,
        alloc.clone(),
        every * 3 + Duration::from_secs(60),
    ));
    let listener = crate::obs::http::bind(args.http_listen).await?;
    tasks.spawn(
        "HTTP endpoints",
        crate::obs::http::serve(listener, crate::obs::http::Endpoints::new(state.clone())),
    );
    // One agent, elected through a Lease, does the cluster-wide writes;
    // every agent renews its own heartbeat Lease. Both in the Lease
    // namespace; an older agent's leader Lease in the agent's namespace is
    // only read (kube::lease: no two leaders during an upgrade).
    let (leader_tx, leader) = tokio::sync::watch::channel(false);
    let _ = state.leader.set(leader.clone());
    {
        let election = crate::kube::lease::Election {
            namespace: args.lease_namespace.clone(),
            legacy_namespace: (args.namespace != args.lease_namespace)
                .then(|| args.namespace.clone()),
            me: node.clone(),
        };
        let client = client.clone();
        tasks.spawn("leader election", async move {
            crate::kube::lease::elect(client, election, leader_tx).await;
            Ok(())
        });
    }
    {
        let client = client.clone();
        let gc = (args.gc_interval > 0).then(|| Duration::from_secs(args.gc_interval));
        let leader = leader.clone();
        tasks.spawn("cluster-wide duties", async move {
            crate::duties::run(client, gc, leader).await;
            Ok(())
        });
    }
    {
        let (client, ns, me) = (client.clone(), args.lease_namespace.clone(), node.clone());
        let name = margay_api::node::heartbeat_lease(&node);
        let st = state.clone();
        tasks.spawn("heartbeat", async move {
            crate::kube::lease::heartbeat(client, ns, name, me, move |r| st.set_api(r)).await;
            Ok(())
        });
    }
    // The kernel and IPAM agree before anything is served. Without the
    // datastore nothing is decided (existing pods keep working); retry.
    let mut wait = Duration::from_secs(1);
    let (report, owners) = loop {
        match crate::cni::reconcile::apply(&node, &alloc, dp.as_ref()).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!("start-up reconciliation: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    tracing::info!(?report, "start-up reconciliation done");
    let reserve = Reserve::start(
        alloc.clone(),
        &node,
        ReserveOptions {
            depth: usize::from(args.ipam_spares),
            max_depth: usize::from(args.ipam_spares_max),
            ..Default::default()
        },
    )
    .await?;
    let _ = state.reserve.set(reserve.clone());
    let (own_tx, own_blocks) = tokio::sync::watch::channel(crate::kube::Known::Unknown(
        crate::kube::Why::NotRead(Some("this node's blocks")),
    ));
    let mut service = CniService::new(&node, store.clone(), reserve.clone(), dp.clone(), args.mtu);
    service.follow_local(own_blocks.clone());
    {
        // With NetworkPolicy disabled the engine still runs, without
        // watches: every workload interface's sources are checked and an
        // unknown one is closed; no policy is enforced.
        let (handle, inbox) = crate::netpol::PolicyHandle::new(client.clone());
        let (report, reported) = tokio::sync::watch::channel(crate::netpol::Status::default());
        let initial = crate::cni::wired_endpoints(dp.as_ref(), &owners).await?;
        tasks.spawn(
            "NetworkPolicy",
            crate::netpol::run(
                client.clone(),
                node.clone(),
                inbox,
                initial,
                Duration::from_secs(args.policy_resync_interval),
                !args.disable_policy,
                report,
            ),
        );
        let _ = state.policy.set(handle.clone());
        let _ = state.policy_status.set(reported.clone());
        tasks.spawn("NetworkPolicy events", {
            let (client, node, leader) = (client.clone(), node.clone(), leader.clone());
            async move {
                crate::netpol::events::run(client, node, reported, leader).await;
                Ok(())
            }
        });
        service.enforce_policy(handle);
    }
    tasks.spawn(
        "natOutgoing",
        crate::dataplane::nat::run(
            store.clone(),
            Duration::from_secs(2),
            Duration::from_secs(args.resync_interval.max(1)),
        ),
    );
    tasks.spawn(
        "block routes",
        crate::routing::local::run(
            node.clone(),
            alloc.clone(),
            dp.clone(),
            service.pods_changed(),
            every,
            own_tx,
        ),
    );
    tasks.spawn(
        "routing",
        crate::routing::run(crate::routing::RoutingCtx {
            node: node.clone(),
            client: client.clone(),
            store: store.clone(),
            poke,
            leader,
            alloc,
            dp,
            own_blocks,
            state: state.clone(),
            node_ip: args.node_ip.clone(),
            namespace: args.namespace.clone(),
            lease_namespace: args.lease_namespace.clone(),
            mtu: args.mtu,
            every,
            bgp: !args.disable_bgp,
        }),
    );
    tracing::info!(%node, socket = %args.socket.display(), "margay-agent serving CNI");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stop_rx.await;
    };
    state
        .cni_serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let server = serve(service, &args.socket, shutdown);
    tokio::pin!(server);
    let signals = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::io("installing the SIGINT handler", e))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<(), Error>(())
    };
    let outcome = tokio::select! {
        r = &mut server => r.and(Err(Error::TaskEnded("CNI server"))),
        e = tasks.failed() => Err(e),
        r = signals => {
            r?;
            tracing::info!("shutting down");
            let _ = stop_tx.send(());
            (&mut server).await
        }
    };
    // Write what is queued before leaving (a kill skips this; the next
    // start reconciles instead).
    if tokio::time::timeout(Duration::from_secs(10), reserve.flush())
        .await
        .is_err()
    {
        tracing::warn!("IPAM writes still queued at exit; the next start reconciles them");
    }
    outcome
}
