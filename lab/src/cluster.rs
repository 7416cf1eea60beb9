//! One Margay cluster in network namespaces. Every part is a harness value
//! owned by [`Cluster`]: dropping it stops every process by PID and removes
//! every namespace (pods first, then agents, router, fabric, apiserver).

pub mod kubernetes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod as KubePod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use margay_api::bgp::{BGPConfiguration, BGPConfigurationSpec, BGPPeer, BGPPeerSpec};
use margay_api::ipam::{
    CONFIG_NAME, IPAMBlock, IPAMConfiguration, IPAMConfigurationSpec, IPPool, IPPoolSpec,
    LabelSelector,
};
use margay_harness::bgpd::{Bird, Frr, Gobgp};
use margay_harness::kube::{ApiRelay, ApiServer};
use margay_harness::netns::Netns;
use margay_harness::process::Daemon;
use margay_harness::topo::{FABRIC_GW_V4, Fabric, Node};
use margay_harness::{names, paths, wait};
use margay_ipam::k8s::list_items;

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

/// The router (held for its destructor).
#[derive(Debug)]
#[allow(dead_code)]
pub enum Router {
    /// BIRD.
    Bird(Bird),
    /// FRR.
    Frr(Frr),
    /// GoBGP.
    Gobgp(Gobgp),
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

/// A kubelet's restart policy for one agent: a dead agent is started again
/// after a back-off that doubles from 1 s to 30 s, and starts over at 1 s
/// once an agent has run for a minute.
#[derive(Debug, Clone)]
pub struct Restarts {
    /// How many times the agent was started again.
    pub count: u32,
    /// How the last run ended (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub last_exit: Option<String>,
    started: Instant,
    due: Option<Instant>,
    backoff: Duration,
}

impl Default for Restarts {
    fn default() -> Self {
        Self {
            count: 0,
            last_exit: None,
            started: Instant::now(),
            due: None,
            backoff: Duration::from_secs(1),
        }
    }
}

impl Restarts {
    /// The agent ended now, as `how`: when to start it again.
    fn ended(&mut self, how: String, now: Instant) -> Instant {
        if now.duration_since(self.started) >= Duration::from_secs(60) {
            self.backoff = Duration::from_secs(1);
        }
        let due = now + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        self.last_exit = Some(how);
        self.due = Some(due);
        due
    }

    /// It was started again now.
    fn started(&mut self, now: Instant) {
        self.count += 1;
        self.started = now;
        self.due = None;
    }
}

/// A pod: a namespace wired by the `margay` plugin.
#[derive(Debug)]
pub struct Pod {
    /// Its listeners (`--serve`), stopped before its namespace goes.
    pub(crate) _server: Option<Daemon>,
    /// Pod name (unique in the lab, whatever its namespace).
    pub name: String,
    /// Its Kubernetes Pod's name: `name`, except for another sandbox of a
    /// Pod ([`Cluster::add_sandbox`]).
    pub pod_name: String,
    /// Its Kubernetes namespace.
    pub namespace: String,
    /// Its node.
    pub node: String,
    /// Its network namespace.
    pub ns: Netns,
    /// Its IPv4 address.
    pub ip: String,
    /// Its IPv6 address ([`Options::pool6_cidr`]).
    pub ip6: Option<String>,
    /// Its interface on the node (`cali…`), as the CNI result names it
    /// (unknown for a Pod of `--kubernetes`).
    pub host_if: Option<String>,
    /// The container ID the runtime used.
    pub id: String,
    /// A Pod's sandbox network, named for `ip netns` (`--kubernetes`).
    pub(crate) _attached: Option<kubernetes::Attached>,
}

/// What a lab pod is made with beyond its node and name.
#[derive(Debug, Clone, Default)]
pub struct PodOpts {
    /// Its namespace (`default` if none), created if new.
    pub namespace: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Listeners it runs (`tcp:80`, `udp:80`), also its named container
    /// ports `serve-80-tcp`, ...
    pub serve: Vec<String>,
    /// Its CNI ADD uses a container ID of 64 hex digits, as containerd
    /// and CRI-O make them, instead of the readable `lab-<name>` (on
    /// real kubelets the runtime's IDs are used anyway).
    pub runtime_id: bool,
}

/// A container ID as runtimes make them: 64 hex digits, unique per pod
/// name.
pub fn runtime_container_id(name: &str) -> String {
    (0..4)
        .map(|k| {
            format!(
                "{:016x}",
                margay_api::stable::fnv1a(format!("{k}/{name}").as_bytes())
            )
        })
        .collect()
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

/// The command line of `margay-agent run` for node `name` inside `node`'s
/// namespace, talking to `api`, serving CNI on `socket`.
pub fn agent_cmd(
    node: &Node,
    name: &str,
    api: &ApiServer,
    socket: &Path,
) -> anyhow::Result<Command> {
    let mut cmd = node.ns.cmd(paths::workspace_bin("margay-agent")?);
    cmd.args(["run", "--node-name", name, "--kubeconfig"])
        .arg(api.kubeconfig())
        .arg("--socket")
        .arg(socket);
    Ok(cmd)
}

/// Creates the agents' Lease namespace ([`margay_api::node::LEASE_NAMESPACE`])
/// as the manifest does: agents started with their default flags write
/// their leader and heartbeat Leases there, and without it none leads.
pub async fn create_lease_namespace(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = json(serde_json::json!({"metadata": {"name": margay_api::node::LEASE_NAMESPACE}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("creating the Lease namespace"),
    }
}

/// `cnitool VERB CONFLIST ID NETNS` in `node`, as a runtime on that node
/// calls plugins: the workspace's `margay` and Debian's reference plugins on
/// `CNI_PATH`, results cached in `cache`. Callers add `CNI_ARGS`.
pub fn cnitool_cmd(
    node: &Netns,
    verb: &str,
    conflist: &Path,
    id: &str,
    netns: &Path,
    cache: &Path,
) -> anyhow::Result<Command> {
    let margay = paths::workspace_bin("margay")?;
    let mut cmd = node.cmd(paths::cnitool()?);
    cmd.args([verb, &conflist.display().to_string(), id])
        .arg(netns)
        .env(
            "CNI_PATH",
            format!(
                "{}:{}",
                margay.parent().unwrap_or(Path::new("/")).display(),
                paths::cni_plugin_dir().display()
            ),
        )
        .env("CNI_CACHE_DIR", cache);
    Ok(cmd)
}

/// The router's configuration: every node of the fabric (any of its
/// subnets) is a dynamic eBGP neighbor. BIRD accepts any external AS (the cluster's may change)
/// and waits 1-5 s after a session error instead of its default 60-300 s,
/// which after a cluster AS change would keep the nodes out for minutes.
pub(crate) fn tor_config(tor: Tor) -> String {
    match tor {
        Tor::Bird => format!(
            "log stderr all;\nrouter id 10.99.0.254;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; merge paths on; }}\n\
             protocol bgp nodes {{\n  local 10.99.0.254 as {TOR_ASN};\n  neighbor range 10.99.0.0/16 external;\n  direct;\n  error wait time 1, 5;\n  hold time 9; keepalive time 3;\n  ipv4 {{ import all; export all; }};\n}}\n"
        ),
        Tor::Frr => format!(
            "frr defaults traditional\nhostname tor\nrouter bgp {TOR_ASN}\n bgp router-id 10.99.0.254\n no bgp ebgp-requires-policy\n neighbor nodes peer-group\n neighbor nodes remote-as 64512\n neighbor nodes timers 3 9\n bgp listen range 10.99.0.0/16 peer-group nodes\n!\n"
        ),
        Tor::Gobgp => format!(
            "[global.config]\n  as = {TOR_ASN}\n  router-id = \"10.99.0.254\"\n\
             [[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = \"nodes\"\n    peer-as = 64512\n\
             [[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = \"10.99.0.0/16\"\n    peer-group = \"nodes\"\n"
        ),
        Tor::None => String::new(),
    }
}

/// What a pod's CNI ADD result says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Added {
    /// Its IPv4 address.
    ip: String,
    /// Its IPv6 address, if a pool of that family gave one.
    ip6: Option<String>,
    /// The node's side of its interface (the one with no sandbox).
    host_if: Option<String>,
}

impl Added {
    fn parse(result: &str) -> anyhow::Result<Self> {
        let v: serde_json::Value = serde_json::from_str(result)?;
        let addrs: Vec<&str> = v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .map(|a| a.split('/').next().unwrap_or(a))
            .collect();
        let host_if = v["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
            .and_then(|i| i["name"].as_str())
            .map(str::to_string);
        Ok(Self {
            ip: addrs
                .iter()
                .find(|a| !a.contains(':'))
                .context("no IPv4 address in the CNI result")?
                .to_string(),
            ip6: addrs
                .iter()
                .find(|a| a.contains(':'))
                .map(ToString::to_string),
            host_if,
        })
    }
}

fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> anyhow::Result<T> {
    Ok(serde_json::from_value(v)?)
}

impl Cluster {
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
        let api = ApiServer::start().await.context("kube-apiserver")?;
        let client = api.client().await?;
        margay_api::crds::install(&client).await.context("CRDs")?;
        create_lease_namespace(&client).await?;
        let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        sa.create(
            &PostParams::default(),
            &json(serde_json::json!({"metadata": {"name": "default"}}))?,
        )
        .await?;
        let cfgs: Api<IPAMConfiguration> = Api::all(client.clone());
        let ipam = IPAMConfigurationSpec {
            leak_grace_seconds: opts.leak_grace,
            ..Default::default()
        };
        cfgs.create(
            &PostParams::default(),
            &IPAMConfiguration::new(CONFIG_NAME, ipam),
        )
        .await?;
        let mut pool = IPPoolSpec::with_cidr(&opts.pool_cidr, Some(opts.block_size));
        pool.encapsulation = opts.encap.pool();
        let pools: Api<IPPool> = Api::all(client.clone());
        pools
            .create(&PostParams::default(), &IPPool::new("default", pool))
            .await?;
        if let Some(cidr) = &opts.pool6_cidr {
            pools
                .create(
                    &PostParams::default(),
                    &IPPool::new("default-v6", IPPoolSpec::with_cidr(cidr, None)),
                )
                .await?;
        }
        let bgp: Api<BGPConfiguration> = Api::all(client.clone());
        bgp.create(
            &PostParams::default(),
            &BGPConfiguration::new(
                "default",
                BGPConfigurationSpec {
                    as_number: Some(64512),
                    node_to_node_mesh_enabled: Some(opts.route_reflectors == 0),
                    ..Default::default()
                },
            ),
        )
        .await?;
        let peers: Api<BGPPeer> = Api::all(client.clone());
        if opts.tor != Tor::None {
            peers
                .create(
                    &PostParams::default(),
                    &BGPPeer::new(
                        "tor",
                        BGPPeerSpec {
                            peer_ip: Some(FABRIC_GW_V4.to_string()),
                            as_number: Some(TOR_ASN),
                            hold_time_seconds: Some(9),
                            ..Default::default()
                        },
                    ),
                )
                .await?;
        }
        if opts.route_reflectors > 0 {
            let mut sel = LabelSelector::default();
            sel.match_labels.insert(RR_LABEL.into(), "true".into());
            peers
                .create(
                    &PostParams::default(),
                    &BGPPeer::new(
                        "route-reflectors",
                        BGPPeerSpec {
                            peer_selector: Some(sel),
                            ..Default::default()
                        },
                    ),
                )
                .await?;
        }
        let work = match &opts.work_dir {
            Some(p) => {
                std::fs::create_dir_all(p)?;
                WorkDir::Fixed(p.clone())
            }
            None => WorkDir::Temp(names::temp_dir("lab")?),
        };
        let fabric = Fabric::new().context("fabric")?;
        let tor = Self::start_tor(&fabric, opts.tor).context("top-of-rack router")?;
        let kube_nodes: Api<KubeNode> = Api::all(client.clone());
        let mut nodes = Vec::new();
        for i in 1..=opts.nodes {
            let name = format!("node{i}");
            let node = fabric.add_node_in(&name, opts.subnet_of(i))?;
            let rr = i <= opts.route_reflectors;
            let mut meta =
                serde_json::json!({"name": name, "labels": {"kubernetes.io/hostname": name}});
            if rr {
                meta["labels"][RR_LABEL] = "true".into();
                meta["annotations"] = serde_json::json!({
                    margay_api::node::ANN_RR_CLUSTER_ID: "244.0.0.1"
                });
            }
            kube_nodes
                .create(
                    &PostParams::default(),
                    &json(serde_json::json!({
                        "metadata": meta,
                        "status": {"addresses": [{"type": "InternalIP", "address": node.v4.to_string()}]}
                    }))?,
                )
                .await?;
            let relay = api.expose_in(&node.ns)?;
            let socket = work.path().join(format!("{name}.sock"));
            let conflist = work.path().join(format!("{name}.conflist"));
            std::fs::write(
                &conflist,
                serde_json::json!({"cniVersion": "1.0.0", "name": "margay",
                    "plugins": [{"type": "margay", "socket": socket}]})
                .to_string(),
            )?;
            nodes.push(LabNode {
                name,
                node,
                socket,
                conflist,
                agent: None,
                restarts: Restarts::default(),
                kubelet: None,
                _relay: Some(relay),
            });
        }
        let mut c = Cluster {
            pods: Vec::new(),
            nodes,
            tor,
            client,
            work,
            fabric,
            api,
            opts,
        };
        for i in 0..c.nodes.len() {
            c.start_agent(i)?;
        }
        Ok(c)
    }

    pub(crate) fn start_tor(fabric: &Fabric, tor: Tor) -> anyhow::Result<Option<Router>> {
        let ns = fabric.ns();
        let conf = tor_config(tor);
        Ok(match tor {
            Tor::None => None,
            Tor::Bird => Some(Router::Bird(Bird::start(ns, &conf)?)),
            Tor::Frr => Some(Router::Frr(Frr::start(ns, &conf, true)?)),
            Tor::Gobgp => Some(Router::Gobgp(Gobgp::start(ns, &conf)?)),
        })
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

    /// Starts node `i`'s agent without waiting for it.
    fn spawn_agent(&self, i: usize) -> anyhow::Result<Daemon> {
        let n = &self.nodes[i];
        let _ = std::fs::remove_file(&n.socket);
        let mut cmd = agent_cmd(&n.node, &n.name, &self.api, &n.socket)?;
        cmd.args(["--gc-interval", &self.opts.gc_interval.to_string()])
            .env("MARGAY_LOG", "info");
        let log = self.work.path().join(format!("{}.log", n.name));
        Ok(Daemon::spawn("margay-agent", cmd, &log)?)
    }

    /// Starts (or restarts) node `i`'s agent; returns once its socket is there.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let mut agent = self.spawn_agent(i)?;
        let n = &self.nodes[i];
        let socket = n.socket.clone();
        // Generous: start-up reconciliation waits for the API, and inside
        // a VM under emulation (scripts/in-vm.sh) everything is slower. An
        // agent that exited is reported as such.
        wait::until(
            "agent socket",
            Duration::from_secs(120),
            Duration::from_millis(50),
            || {
                if socket.exists() {
                    return Ok(Some(()));
                }
                if !agent.is_running() {
                    return Err("the agent exited".into());
                }
                Ok(None)
            },
        )
        .with_context(|| format!("{} agent did not start:\n{}", n.name, agent.log_tail(20)))?;
        self.nodes[i].agent = Some(agent);
        Ok(())
    }

    /// SIGKILLs node `i`'s agent and keeps it stopped (its kernel state
    /// stays): see [`Cluster::crash_agent`] for a crash the lab recovers.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill9();
        }
    }

    /// SIGKILLs node `i`'s agent as a crash would: [`Cluster::supervise`]
    /// starts it again after its back-off.
    pub fn crash_agent(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(a) = &self.nodes[i].agent {
            a.signal(nix::sys::signal::Signal::SIGKILL)?;
        }
        Ok(())
    }

    /// Restarts agents that died, each after its back-off (call it every
    /// second or so). Returns whether anything changed.
    pub fn supervise(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let Some(agent) = n.agent.as_mut() else {
                continue;
            };
            if n.restarts.due.is_none()
                && let Some(st) = agent.exit_status()
            {
                let due = n.restarts.ended(st.to_string(), now);
                tracing::warn!(
                    node = %n.name,
                    "agent ended ({st}); starting it again in {:.0?}",
                    due - now
                );
                changed = true;
            }
            if n.restarts.due.is_some_and(|d| d <= now) {
                match self.spawn_agent(i) {
                    Ok(a) => {
                        let n = &mut self.nodes[i];
                        n.agent = Some(a);
                        n.restarts.started(now);
                        tracing::info!(node = %n.name, restarts = n.restarts.count, "agent started again");
                    }
                    Err(e) => {
                        let n = &mut self.nodes[i];
                        let due = n.restarts.ended(format!("could not start: {e:#}"), now);
                        tracing::warn!(node = %n.name, "agent not started ({e:#}); next try in {:.0?}", due - now);
                    }
                }
                changed = true;
            }
        }
        changed
    }

    fn cnitool(
        &self,
        n: &LabNode,
        verb: &str,
        id: &str,
        netns: &Path,
        (namespace, pod): (&str, &str),
        uid: &str,
    ) -> anyhow::Result<String> {
        let out = cnitool_cmd(
            &n.node.ns,
            verb,
            &n.conflist,
            id,
            netns,
            &self.work.path().join(format!("cni-cache-{}", n.name)),
        )?
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID={uid}"
            ),
        )
        .output()?;
        if !out.status.success() {
            bail!(
                "CNI {verb} of {pod} on {}: {}{}",
                n.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates pod `name` on node `node` in namespace `default`: see
    /// [`Cluster::add_pod_with`].
    pub async fn add_pod(&mut self, node: &str, name: &str) -> anyhow::Result<String> {
        self.add_pod_with(node, name, &PodOpts::default()).await
    }

    /// Creates pod `name` on node `node`: its namespace if new, the Pod
    /// object (labels, its listeners as named container ports), a network
    /// namespace, CNI ADD through the real plugin, the Pod's status written
    /// as a kubelet would (so every node's policy sees its address), and
    /// its listeners started. Returns its address.
    pub async fn add_pod_with(
        &mut self,
        node: &str,
        name: &str,
        o: &PodOpts,
    ) -> anyhow::Result<String> {
        if self.opts.kubernetes.is_some() {
            return kubernetes::add_pod(self, node, name, o).await;
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("a pod named {name:?} exists already");
        }
        let i = self.node_index(node)?;
        let namespace = o.namespace.as_deref().unwrap_or("default").to_string();
        self.ensure_namespace(&namespace).await?;
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &namespace);
        let ports = container_ports(&o.serve);
        let obj = api
            .create(
                &PostParams::default(),
                &json(serde_json::json!({
                    "metadata": {"name": name, "labels": o.labels},
                    "spec": {"nodeName": node, "automountServiceAccountToken": false,
                             "containers": [{"name": "c", "image": "busybox", "ports": ports}]}
                }))?,
            )
            .await
            .with_context(|| format!("creating Pod {namespace}/{name}"))?;
        let uid = obj.metadata.uid.unwrap_or_default();
        let (ns, id, added) = match self.wire(i, name, (&namespace, name), &uid, o.runtime_id) {
            Ok(w) => w,
            Err(e) => {
                let _ = api.delete(name, &DeleteParams::default()).await;
                return Err(e);
            }
        };
        // What the kubelet would write: the other nodes learn the
        // addresses.
        let ips: Vec<&String> = std::iter::once(&added.ip)
            .chain(added.ip6.as_ref())
            .collect();
        let pod_ips: Vec<serde_json::Value> =
            ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "status": {"phase": "Running", "podIP": added.ip, "podIPs": pod_ips}
            })),
        )
        .await
        .with_context(|| format!("writing Pod {namespace}/{name}'s status"))?;
        let server = self.serve(&ns, name, &o.serve)?;
        let ip = added.ip.clone();
        self.pods.push(Pod {
            _server: server,
            name: name.to_string(),
            pod_name: name.to_string(),
            namespace,
            node: node.to_string(),
            ns,
            ip: added.ip,
            ip6: added.ip6,
            host_if: added.host_if,
            id,
            _attached: None,
        });
        Ok(ip)
    }

    /// Another sandbox of lab pod `of`'s Pod, as a runtime makes one when
    /// it recreates a pod's sandbox: a network namespace of its own, wired
    /// on `of`'s node by CNI ADD with a container ID of its own (`lab-NAME`)
    /// and the same Pod (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID), its
    /// listeners `serve` started. It is lab pod `name`: a second attachment
    /// of the Pod, with addresses of its own (the Pod's status still names
    /// the first). [`Cluster::del_pod`] of it DELs this attachment only and
    /// leaves the Pod. Plain lab only. Returns its IPv4 address.
    pub async fn add_sandbox(
        &mut self,
        of: &str,
        name: &str,
        serve: &[String],
    ) -> anyhow::Result<String> {
        if self.opts.kubernetes.is_some() {
            bail!("another sandbox of a Pod is for the plain lab only");
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("a pod named {name:?} exists already");
        }
        let first = self
            .pods
            .iter()
            .find(|p| p.name == of)
            .with_context(|| format!("no pod named {of:?}"))?;
        let (node, namespace, pod_name) = (
            first.node.clone(),
            first.namespace.clone(),
            first.pod_name.clone(),
        );
        let i = self.node_index(&node)?;
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &namespace);
        let uid = api
            .get(&pod_name)
            .await
            .with_context(|| format!("reading Pod {namespace}/{pod_name}"))?
            .metadata
            .uid
            .unwrap_or_default();
        let (ns, id, added) = self.wire(i, name, (&namespace, &pod_name), &uid, false)?;
        let server = self.serve(&ns, name, serve)?;
        let ip = added.ip.clone();
        self.pods.push(Pod {
            _server: server,
            name: name.to_string(),
            pod_name,
            namespace,
            node,
            ns,
            ip: added.ip,
            ip6: added.ip6,
            host_if: added.host_if,
            id,
            _attached: None,
        });
        Ok(ip)
    }

    /// A network namespace for lab pod `name`, wired on node `i` by CNI
    /// ADD (container ID `lab-NAME`) as an attachment of Pod
    /// `namespace/pod`: the namespace, the container ID and what the
    /// result says.
    fn wire(
        &self,
        i: usize,
        name: &str,
        (namespace, pod): (&str, &str),
        uid: &str,
        runtime_id: bool,
    ) -> anyhow::Result<(Netns, String, Added)> {
        // Pod names may be 253 characters: the network namespace's name,
        // a file name, keeps a prefix (the harness makes it unique).
        let hint: String = name.chars().take(40).collect();
        let ns = Netns::create(&format!("pod-{hint}"))?;
        let id = if runtime_id {
            runtime_container_id(name)
        } else {
            format!("lab-{name}")
        };
        let out = self.cnitool(
            &self.nodes[i],
            "add",
            &id,
            &ns.path(),
            (namespace, pod),
            uid,
        )?;
        let added = Added::parse(&out)?;
        Ok((ns, id, added))
    }

    /// Starts pod `name`'s listeners (`--serve`) in its namespace `ns`.
    pub(crate) fn serve(
        &self,
        ns: &Netns,
        name: &str,
        serve: &[String],
    ) -> anyhow::Result<Option<Daemon>> {
        if serve.is_empty() {
            return Ok(None);
        }
        let mut cmd = ns.cmd(paths::workspace_bin("margay-lab")?);
        cmd.args(["netcheck", "serve", &serve.join(",")]);
        // A file name holds 255 bytes; a pod name may be 253 characters.
        let log = if name.len() <= 100 {
            format!("serve-{name}.log")
        } else {
            format!("serve-{}.log", ns.name())
        };
        let log = self.work.path().join(log);
        Ok(Some(Daemon::spawn("netcheck", cmd, &log)?))
    }

    /// Creates namespace `name` unless it exists.
    pub async fn ensure_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        if api.get_opt(name).await?.is_none() {
            let ns = json(serde_json::json!({"metadata": {"name": name}}))?;
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e).with_context(|| format!("creating namespace {name}")),
            }
        }
        // No controller-manager in the plain lab makes its `default`
        // ServiceAccount, which admission wants for every Pod.
        if self.opts.kubernetes.is_none() {
            let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), name);
            if sa.get_opt("default").await?.is_none() {
                let obj = json(serde_json::json!({"metadata": {"name": "default"}}))?;
                match sa.create(&PostParams::default(), &obj).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e).context("creating ServiceAccount default"),
                }
            }
        }
        Ok(())
    }

    /// CNI DEL of pod `name`, then its namespace goes, and its Pod object
    /// unless another sandbox of it is left ([`Cluster::add_sandbox`]).
    pub async fn del_pod(&mut self, name: &str) -> anyhow::Result<()> {
        if self.opts.kubernetes.is_some() {
            return kubernetes::del_pod(self, name).await;
        }
        let k = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod named {name:?}"))?;
        let i = self.node_index(&self.pods[k].node)?;
        let p = &self.pods[k];
        self.cnitool(
            &self.nodes[i],
            "del",
            &p.id,
            &p.ns.path(),
            (&p.namespace, &p.pod_name),
            "",
        )?;
        let p = self.pods.remove(k);
        if self
            .pods
            .iter()
            .any(|q| q.namespace == p.namespace && q.pod_name == p.pod_name)
        {
            // Another sandbox of its Pod is still there.
            return Ok(());
        }
        let api: Api<KubePod> = Api::namespaced(self.client.clone(), &p.namespace);
        // No kubelet finishes a graceful delete here: force it.
        let _ = api
            .delete(&p.pod_name, &DeleteParams::default().grace_period(0))
            .await;
        Ok(())
    }

    /// Every IPAM block (its range, as its name gives it) with its node.
    pub async fn blocks(&self) -> anyhow::Result<Vec<(String, String)>> {
        let api: Api<IPAMBlock> = Api::all(self.client.clone());
        Ok(list_items(&api, &ListParams::default())
            .await?
            .into_iter()
            .filter_map(|b| {
                // The name says the range even when the content is corrupt.
                let cidr = b
                    .metadata
                    .name
                    .as_deref()
                    .and_then(margay_api::ipam::block_cidr_from_name)
                    .map_or_else(|| b.spec.cidr.clone(), |c| c.to_string());
                Some((cidr, b.spec.node.clone()?))
            })
            .collect())
    }

    /// What keeps the routes from matching the blocks: each node needs a
    /// route (protocol 79) to every block of the others, and a BIRD/FRR
    /// router one to every block.
    pub async fn route_gaps(&self) -> anyhow::Result<Vec<String>> {
        if self.opts.kubernetes == Some(crate::Install::Ptp) {
            // No Margay, no blocks: static routes, in place from the start.
            return Ok(Vec::new());
        }
        // IPv6 blocks are not routed between nodes yet
        // ([`Options::pool6_cidr`]).
        let blocks: Vec<(String, String)> = self
            .blocks()
            .await?
            .into_iter()
            .filter(|(cidr, _)| !cidr.contains(':'))
            .collect();
        // An address borrowed from another node's block has a host route
        // of its own everywhere else (the block's route leads to the lender).
        let borrowed = self.borrowed(&blocks);
        let has =
            |routes: &str, dst: &str| routes.lines().any(|l| l.starts_with(&format!("{dst} ")));
        let mut gaps = Vec::new();
        for n in self
            .nodes
            .iter()
            .filter(|n| n.agent.is_some() || n.kubelet.is_some())
        {
            let routes = n.node.ns.ip(&["-4", "route", "show", "proto", "79"])?;
            for (cidr, owner) in blocks.iter().filter(|(_, o)| *o != n.name) {
                if !has(&routes, cidr) {
                    gaps.push(format!("{} has no route to {cidr} ({owner})", n.name));
                }
            }
            for p in borrowed.iter().filter(|p| p.node != n.name) {
                if !has(&routes, &p.ip) {
                    gaps.push(format!(
                        "{} has no route to {} (borrowed by {})",
                        n.name, p.ip, p.node
                    ));
                }
            }
        }
        if matches!(self.opts.tor, Tor::Bird | Tor::Frr) {
            let routes = self.fabric.ns().ip(&["-4", "route", "show"])?;
            for (cidr, owner) in &blocks {
                if !has(&routes, cidr) {
                    gaps.push(format!("the router has no route to {cidr} ({owner})"));
                }
            }
            for p in &borrowed {
                if !has(&routes, &p.ip) {
                    gaps.push(format!(
                        "the router has no route to {} (borrowed by {})",
                        p.ip, p.node
                    ));
                }
            }
        }
        Ok(gaps)
    }

    /// The pods whose address is not in a block of their node's (borrowed
    /// from another node's block), given every block and its node.
    pub fn borrowed(&self, blocks: &[(String, String)]) -> Vec<&Pod> {
        let nets: Vec<(ipnetwork::IpNetwork, &str)> = blocks
            .iter()
            .filter_map(|(c, n)| Some((c.parse().ok()?, n.as_str())))
            .collect();
        self.pods
            .iter()
            .filter(|p| {
                let Ok(ip) = p.ip.parse::<std::net::IpAddr>() else {
                    return false;
                };
                !nets.iter().any(|(c, n)| *n == p.node && c.contains(ip))
            })
            .collect()
    }

    /// Waits until routes have converged and every pod reaches every pod
    /// (and its node); returns the time it took.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.wait_converged(timeout).await?;
        loop {
            let m = self.matrix()?;
            if m.failures.is_empty() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                bail!(
                    "pods not connected after {timeout:?}: {}",
                    m.failures.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The agent log of node `i`.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.work.path().join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    /// Runs `margayctl ARGS` inside node `i`'s namespace with the admin
    /// kubeconfig; returns (exit code, stdout, stderr).
    pub fn margayctl(&self, i: usize, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let out = self.nodes[i]
            .node
            .ns
            .cmd(paths::workspace_bin("margayctl")?)
            .args(args)
            .env("KUBECONFIG", self.api.kubeconfig())
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Waits until [`Cluster::route_gaps`] is empty.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut last = Vec::new();
        while t.elapsed() < timeout {
            last = self.route_gaps().await?;
            if last.is_empty() {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "routes did not converge in {timeout:?}: {}",
            last.join("; ")
        )
    }

    /// Pings every pod from every pod, and each pod's own node from the
    /// pod (fping from each pod's namespace, all pods at once).
    pub fn matrix(&self) -> anyhow::Result<Matrix> {
        let node_ip: BTreeMap<&str, String> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.node.v4.to_string()))
            .collect();
        let mut children = Vec::new();
        for p in &self.pods {
            // (address, node it lives on; "node" for the pod's own node)
            let mut targets: Vec<(String, String)> = self
                .pods
                .iter()
                .filter(|q| q.name != p.name)
                .map(|q| (q.ip.clone(), q.node.clone()))
                .collect();
            if let Some(ip) = node_ip.get(p.node.as_str()) {
                targets.push((ip.clone(), "node".into()));
            }
            let child =
                p.ns.cmd("fping")
                    .args(["-u", "-r", "3", "-t", "300", "-i", "1"])
                    .args(targets.iter().map(|(ip, _)| ip))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("fping (apt install fping)")?;
            children.push((p, targets, child));
        }
        let mut m = Matrix {
            nodes: self.nodes.iter().map(|n| n.name.clone()).collect(),
            ..Default::default()
        };
        let mut pairs: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
        for (p, targets, c) in children {
            let out = c.wait_with_output()?;
            let failed: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            for (ip, node) in targets {
                let e = pairs.entry((p.node.clone(), node)).or_default();
                e.1 += 1;
                m.total += 1;
                if failed.contains(&ip) {
                    m.failures.push(format!("{} -> {ip}", p.name));
                } else {
                    e.0 += 1;
                }
            }
        }
        m.pairs = pairs
            .into_iter()
            .map(|((from, to), (ok, total))| NodePair {
                from,
                to,
                ok,
                total,
            })
            .collect();
        Ok(m)
    }
}

/// Pod reachability between two nodes (`to` = `node`: pods to their own node).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodePair {
    /// Pods on this node...
    pub from: String,
    /// ...to pods on this node.
    pub to: String,
    /// Pings answered.
    pub ok: usize,
    /// Pings sent.
    pub total: usize,
}

/// Result of [`Cluster::matrix`].
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Matrix {
    /// The nodes, in order.
    pub nodes: Vec<String>,
    /// Pairs tried.
    pub total: usize,
    /// `pod -> address` that did not answer.
    pub failures: Vec<String>,
    /// Per node pair.
    pub pairs: Vec<NodePair>,
}

impl Matrix {
    /// A node × node table (`ok/total` per cell; column `node` = pods to
    /// their own node).
    pub fn table(&self) -> String {
        let rows: Vec<&str> = self
            .nodes
            .iter()
            .map(String::as_str)
            .filter(|n| self.pairs.iter().any(|p| p.from == *n))
            .collect();
        let mut cols: Vec<&str> = rows.clone();
        cols.push("node");
        let mut o = format!("{:<12}", "pods on\\to");
        for c in &cols {
            o.push_str(&format!(" {c:>9}"));
        }
        o.push('\n');
        for r in &rows {
            o.push_str(&format!("{r:<12}"));
            for c in &cols {
                let cell = self
                    .pairs
                    .iter()
                    .find(|p| p.from == *r && p.to == *c)
                    .map_or("-".to_string(), |p| format!("{}/{}", p.ok, p.total));
                o.push_str(&format!(" {cell:>9}"));
            }
            o.push('\n');
        }
        o
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

/// The container ports of a pod serving `serve` (`tcp:80`): named
/// `serve-80-tcp`, as NetworkPolicy named ports refer to them.
pub(crate) fn container_ports(serve: &[String]) -> Vec<serde_json::Value> {
    serve
        .iter()
        .map(|l| {
            let (proto, port) = l.split_once(':').unwrap_or(("tcp", l));
            serde_json::json!({
                "name": format!("serve-{port}-{proto}"),
                "containerPort": port.parse::<u16>().unwrap_or(0),
                "protocol": proto.to_ascii_uppercase(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Added, Options};

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

    #[test]
    fn a_cni_result_gives_both_families_and_the_host_interface() {
        let dual = r#"{"cniVersion":"1.0.0",
            "interfaces":[{"name":"cali0123456789a","mac":"ee:ee:ee:ee:ee:ee"},
                          {"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/run/netns/p"}],
            "ips":[{"address":"10.244.0.5/32","gateway":"169.254.1.1","interface":1},
                   {"address":"fd00:244::5/128","gateway":"fe80::ecee:eeff:feee:eeee","interface":1}]}"#;
        assert_eq!(
            Added::parse(dual).unwrap(),
            Added {
                ip: "10.244.0.5".into(),
                ip6: Some("fd00:244::5".into()),
                host_if: Some("cali0123456789a".into()),
            }
        );
        let v6_only = r#"{"ips":[{"address":"fd00:244::5/128"}]}"#;
        assert!(Added::parse(v6_only).is_err());
    }
}
