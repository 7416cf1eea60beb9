//! `margay-agent run`: the node agent's main loop: IPAM, start-up
//! reconciliation, the CNI service, block blackholes, natOutgoing, the
//! routing loop (BGP identity, the embedded speaker, remote-block routes,
//! Node condition) and the health/metrics endpoints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use margay_ipam::gc::Janitor;
use margay_ipam::{Allocator, Options, Reserve, ReserveOptions};

use crate::cni::{CniService, serve};
use crate::dataplane::Netlink;
use crate::http::AgentState;
use crate::kube_store::KubeStore;

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
    /// Re-check the kernel's block routes against IPAM every this many
    /// seconds (they are also updated after every ADD).
    #[arg(long, default_value_t = 30)]
    pub resync_interval: u64,
    /// This node's BGP address: `autodetect` (the Node's InternalIP if it
    /// is on this host, else the first global IPv4 address) or an address,
    /// optionally with its prefix length (`10.0.0.5/24`).
    #[arg(long, env = "IP", default_value = "autodetect")]
    pub node_ip: String,
    /// Namespace holding the Secrets BGPPeers take passwords from.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/status` are served.
    #[arg(long, env = "MARGAY_HTTP_LISTEN", default_value = "127.0.0.1:9099")]
    pub http_listen: std::net::SocketAddr,
    /// Run no BGP speaker and program no routes to other nodes (pod
    /// networking and IPAM only, for clusters routed by something else).
    #[arg(long, env = "MARGAY_DISABLE_BGP")]
    pub disable_bgp: bool,
}

async fn client(args: &RunArgs) -> anyhow::Result<kube::Client> {
    let cfg = match &args.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(cfg)?)
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let client = client(&args).await?;
    let store = Arc::new(KubeStore::new(client.clone(), Duration::from_secs(5)));
    let alloc = Allocator::start(store.clone(), &node, Options::default());
    let dp = Arc::new(Netlink::new()?);
    let every = Duration::from_secs(args.resync_interval.max(1));
    let state = Arc::new(AgentState::new(
        &node,
        alloc.clone(),
        every * 3 + Duration::from_secs(60),
    ));
    crate::http::serve(args.http_listen, state.clone())
        .await
        .map_err(|e| anyhow::anyhow!("--http-listen {}: {e}", args.http_listen))?;
    if args.gc_interval > 0 {
        let store = store.clone();
        let every = Duration::from_secs(args.gc_interval);
        tokio::spawn(async move {
            let mut janitor = Janitor::new(store);
            loop {
                tokio::time::sleep(every).await;
                match janitor.run_once().await {
                    Ok(r) if !r.released.is_empty() => {
                        tracing::info!(released = r.released.len(), "leak collection")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("leak collection: {e}"),
                }
            }
        });
    }
    // Pool status conditions, usage and the in-use finalizer.
    {
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = crate::pools::reconcile(&client).await {
                    tracing::debug!("pool status: {e}");
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
    // The kernel and IPAM agree before anything is served. Without the
    // datastore nothing is decided (existing pods keep working); retry.
    let mut wait = Duration::from_secs(1);
    let report = loop {
        match crate::reconcile::apply(&node, &alloc, dp.as_ref()).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!("start-up reconciliation: {e:#}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(?report, "start-up reconciliation done");
    let reserve = Reserve::start(
        alloc.clone(),
        &node,
        ReserveOptions {
            depth: usize::from(args.ipam_spares),
            ..Default::default()
        },
    )
    .await?;
    let service = CniService::new(
        &node,
        store.clone(),
        alloc.clone(),
        reserve.clone(),
        dp.clone(),
        args.mtu,
    );
    tokio::spawn(crate::nat::run(
        store.clone(),
        Duration::from_secs(2),
        Duration::from_secs(args.resync_interval.max(1)),
    ));
    let (own_tx, own_blocks) = tokio::sync::watch::channel(Default::default());
    tokio::spawn(crate::blocks::run(
        node.clone(),
        alloc.clone(),
        dp.clone(),
        service.added(),
        every,
        own_tx,
    ));
    tokio::spawn(crate::bgp::run(crate::bgp::RoutingCtx {
        node: node.clone(),
        client: client.clone(),
        store: store.clone(),
        alloc,
        dp,
        own_blocks,
        state: state.clone(),
        node_ip: args.node_ip.clone(),
        namespace: args.namespace.clone(),
        mtu: args.mtu,
        every,
        bgp: !args.disable_bgp,
    }));
    tracing::info!(%node, socket = %args.socket.display(), "margay-agent serving CNI");
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    };
    state
        .cni_serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    serve(service, &args.socket, shutdown).await?;
    // Write what is queued before leaving (a kill skips this; the next
    // start reconciles instead).
    if tokio::time::timeout(Duration::from_secs(10), reserve.flush())
        .await
        .is_err()
    {
        tracing::warn!("IPAM writes still queued at exit; the next start reconciles them");
    }
    Ok(())
}
