//! One Margay cluster in network namespaces. Every part is a harness value
//! owned by [`Cluster`]: dropping it stops every process by PID and removes
//! every namespace (pods first, then agents, router, fabric, apiserver).
//!
//! This file holds the cluster's values ([`Options`], [`LabNode`],
//! [`Cluster`]) and what both bootstraps build them from (`Ground`: the
//! work directory, the fabric and the router). The rest by concern:
//! `plain.rs` the plain bootstrap (an apiserver and the agents run by the
//! lab), [`kubernetes`] the one on real kubelets, `agents.rs` the plain
//! lab's agents (started, crashed, started again after a back-off),
//! `pods.rs` lab pods wired through the real plugin, `checks.rs` routes
//! against blocks and the ping matrix, `tor.rs` the top-of-rack router.

mod agents;
mod checks;
pub mod kubernetes;
mod plain;
mod pods;
pub(crate) mod tor;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kube::api::{Api, PostParams};
use margay_harness::kube::{ApiRelay, ApiServer};
use margay_harness::names;
use margay_harness::process::Daemon;
use margay_harness::topo::{Fabric, Node};

pub use agents::{Restarts, agent_cmd};
pub use checks::{Matrix, NodePair};
pub use plain::create_lease_namespace;
pub(crate) use pods::container_ports;
pub use pods::{Pod, PodOpts, cnitool_cmd, runtime_container_id};
pub use tor::Router;

use crate::{Encap, Tor};

/// The ToR's AS; nodes use the cluster AS (64512).
pub const TOR_ASN: u32 = 65000;
/// The pod pool.
pub const POOL_CIDR: &str = "10.244.0.0/16";
/// An IPv6 pod pool for [`Options::pool6_cidr`].
pub const POOL6_CIDR: &str = "fd00:244::/64";
/// Label (and annotation) marking route reflector nodes.
pub const RR_LABEL: &str = "margay.dev/route-reflector";

/// How to build the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of nodes (at most [`margay_harness::topo::MAX_NODES`]: one
    /// fabric's addresses).
    pub nodes: u32,
    /// The pool's encapsulation.
    pub encap: Encap,
    /// Top-of-rack router.
    pub tor: Tor,
    /// Nodes 1..=N are route reflectors and the mesh is off (0: full mesh).
    pub route_reflectors: u32,
    /// Agents' leak collection period in seconds (0: off).
    pub gc_interval: u64,
    /// IPAM's leak grace period in seconds.
    pub leak_grace: u64,
    /// Where agents' logs and sockets go (default: a temp dir).
    pub work_dir: Option<PathBuf>,
    /// The pool's CIDR (default [`POOL_CIDR`]).
    pub pool_cidr: String,
    /// A second pool, IPv6 (e.g. [`POOL6_CIDR`]): every pod then gets an
    /// address of each family (plain lab only). IPv6 is not routed between
    /// nodes yet: IPv6 traffic stays between the pods of one node.
    pub pool6_cidr: Option<String>,
    /// The pool's block size.
    pub block_size: u8,
    /// IPv4 subnets the nodes are spread over, round robin (node1 in
    /// 10.99.0.0/24, node2 in 10.99.1.0/24, ...), reaching each other
    /// through the router across them (at most 250: `S` is an octet).
    pub subnets: u32,
    /// Real nodes (a kubelet and containerd each), Margay installed as a
    /// user would (`kubectl apply` or `helm install`), pods as Pods.
    pub kubernetes: Option<crate::Install>,
}

impl Options {
    /// Refuses counts the lab cannot address: more nodes than one fabric
    /// holds ([`margay_harness::topo::MAX_NODES`]), more route reflectors
    /// than nodes, more subnets than the third octet of `10.99.S.0/24`
    /// can name.
    pub fn check_counts(&self) -> anyhow::Result<()> {
        use margay_harness::topo::MAX_NODES;
        if self.nodes == 0 || self.nodes > MAX_NODES {
            bail!(
                "{} nodes: the lab holds 1 to {MAX_NODES} (each a fabric address 10.99.S.N/24)",
                self.nodes
            );
        }
        if self.route_reflectors > self.nodes {
            bail!(
                "{} route reflectors for {} nodes",
                self.route_reflectors,
                self.nodes
            );
        }
        if self.subnets > 250 {
            bail!("{} subnets: at most 250 (10.99.S.0/24)", self.subnets);
        }
        Ok(())
    }

    /// The subnet (`S` of `10.99.S.0/24`) of node `i` (1-based): round
    /// robin over [`Options::subnets`].
    pub fn subnet_of(&self, i: u32) -> u8 {
        let s = (i.max(1) - 1) % self.subnets.clamp(1, 250);
        u8::try_from(s).expect("fewer than 250 subnets")
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            encap: Encap::None,
            tor: Tor::Bird,
            route_reflectors: 0,
            gc_interval: 60,
            leak_grace: 300,
            work_dir: None,
            pool_cidr: POOL_CIDR.into(),
            pool6_cidr: None,
            block_size: 26,
            subnets: 1,
            kubernetes: None,
        }
    }
}

/// A node: its namespace, its agent and how to reach it.
#[derive(Debug)]
pub struct LabNode {
    /// The real node (`--kubernetes`): its kubelet runs the agent. Torn
    /// down before the node's namespace.
    pub kubelet: Option<margay_harness::kubelet::KubeletNode>,
    /// Kubernetes name (`node1`...).
    pub name: String,
    /// The namespace and its fabric addresses.
    pub node: Node,
    /// The agent's CNI socket.
    pub socket: PathBuf,
    /// The conflist `cnitool` uses on this node.
    pub conflist: PathBuf,
    /// The agent, while it should run (`None`: stopped on purpose).
    pub agent: Option<Daemon>,
    /// How the lab keeps the agent running, as a kubelet would.
    pub restarts: Restarts,
    pub(crate) _relay: Option<ApiRelay>,
}

impl LabNode {
    /// Node `name` in `node`'s namespace, its agent's socket and the
    /// conflist at these paths; no kubelet, no relay, no agent yet.
    pub(crate) fn new(name: String, node: Node, socket: PathBuf, conflist: PathBuf) -> Self {
        Self {
            kubelet: None,
            name,
            node,
            socket,
            conflist,
            agent: None,
            restarts: Restarts::default(),
            _relay: None,
        }
    }
}

/// The whole cluster. Field order is teardown order.
pub struct Cluster {
    /// Pods.
    pub pods: Vec<Pod>,
    /// Nodes.
    pub nodes: Vec<LabNode>,
    /// The top-of-rack router.
    pub tor: Option<Router>,
    /// Admin client.
    pub client: kube::Client,
    pub(crate) work: WorkDir,
    /// The fabric (its namespace is the router's).
    pub fabric: Fabric,
    /// The apiserver.
    pub api: ApiServer,
    /// What it was built with.
    pub opts: Options,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.nodes.len())
            .field("pods", &self.pods.len())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The cluster of `nodes` on `ground`, served by `api`, no pods yet.
    pub(crate) fn new(
        ground: Ground,
        api: ApiServer,
        client: kube::Client,
        nodes: Vec<LabNode>,
        opts: Options,
    ) -> Self {
        let Ground { tor, work, fabric } = ground;
        Cluster {
            pods: Vec::new(),
            nodes,
            tor,
            client,
            work,
            fabric,
            api,
            opts,
        }
    }

    /// Builds the cluster and starts every agent (returns before routes
    /// have converged: see [`Cluster::wait_converged`]).
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        opts.check_counts()?;
        if opts.kubernetes.is_some() {
            if opts.pool6_cidr.is_some() {
                bail!("an IPv6 pool is for the plain lab only");
            }
            return kubernetes::start(opts).await;
        }
        plain::start(opts).await
    }

    /// The directory holding logs, sockets and conflists.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Index of a node by name.
    pub fn node_index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node named {name:?}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents stop first, gracefully (this runs before any field is
        // dropped); then the fields go in order: pods, nodes, router,
        // work dir, fabric, apiserver.
        for n in &mut self.nodes {
            if let Some(a) = n.agent.as_mut() {
                a.stop(Duration::from_secs(5));
            }
        }
    }
}

#[derive(Debug)]
pub(crate) enum WorkDir {
    Temp(tempfile::TempDir),
    Fixed(PathBuf),
}

impl WorkDir {
    pub(crate) fn path(&self) -> &Path {
        match self {
            WorkDir::Temp(t) => t.path(),
            WorkDir::Fixed(p) => p,
        }
    }
}

/// What both bootstraps stand on. Field order is teardown order: the
/// router (in the fabric's namespace) first.
pub(crate) struct Ground {
    pub(crate) tor: Option<Router>,
    pub(crate) work: WorkDir,
    pub(crate) fabric: Fabric,
}

impl Ground {
    /// The work directory (`opts.work_dir`, else a temp dir), the fabric,
    /// and the router `opts.tor` on it.
    pub(crate) fn new(opts: &Options) -> anyhow::Result<Self> {
        let work = match &opts.work_dir {
            Some(p) => {
                std::fs::create_dir_all(p)?;
                WorkDir::Fixed(p.clone())
            }
            None => WorkDir::Temp(names::temp_dir("lab")?),
        };
        let fabric = Fabric::new().context("fabric")?;
        let tor = tor::start(&fabric, opts.tor).context("top-of-rack router")?;
        Ok(Self { tor, work, fabric })
    }
}

/// Creates `obj` unless an object of its name is there already (409).
pub(crate) async fn create_unless_there<K>(api: &Api<K>, obj: &K) -> kube::Result<()>
where
    K: Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> anyhow::Result<T> {
    Ok(serde_json::from_value(v)?)
}

#[cfg(test)]
mod tests {
    use super::Options;

    #[test]
    fn counts_past_what_the_fabric_addresses_are_refused() {
        let o = |nodes, route_reflectors, subnets| Options {
            nodes,
            route_reflectors,
            subnets,
            ..Default::default()
        };
        assert!(o(3, 0, 1).check_counts().is_ok());
        assert!(o(249, 249, 8).check_counts().is_ok());
        let e = o(250, 0, 1).check_counts().unwrap_err().to_string();
        assert!(e.contains("1 to 249"), "{e}");
        assert!(o(0, 0, 1).check_counts().is_err());
        assert!(o(100_000, 0, 1).check_counts().is_err());
        assert!(o(3, 4, 1).check_counts().is_err());
        assert!(o(3, 0, 251).check_counts().is_err());
        // Round robin over the subnets, from node 1.
        let three = o(9, 0, 3);
        let s: Vec<u8> = (1..=7).map(|i| three.subnet_of(i)).collect();
        assert_eq!(s, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(o(9, 0, 0).subnet_of(5), 0);
        assert_eq!(o(9, 0, u32::MAX).subnet_of(249), 248);
    }
}
