//! The bench itself ([`Bench`]): the fake objects loaded onto the lab's
//! apiserver size after size (Nodes, their `MargayNode` and slices, Pods
//! and their status), the churn, the probe pods, the node status writer,
//! and what is read at each size once the agents' CPU has settled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use margay_api::identity::MargayNode;
use margay_api::slice::MargayEndpointSlice;
use tokio::task::JoinSet;

use crate::Cli;
use crate::fake::{self, Gen};
use crate::lab::{LabState, ProcSample, command_lines, control_plane, mib, proc_sample};
use crate::metrics::{self, Api as Metrics};
use crate::watch::Seen;
use crate::{Churn, Point};

/// The NetworkPolicy `--policy` makes.
const POLICY: &str = "scale-every-pod";
/// The real pod on node2 it selects.
const ANCHOR: &str = "scale-anchor";

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

/// Retries `f` on errors other than "already there" / "not there" a few
/// times (the apiserver under load answers 429/5xx or times out).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(None),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing_less_warn(&format!("{what}: {e} (retry {attempt})"));
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(what.to_string())),
        }
    }
}

fn tracing_less_warn(msg: &str) {
    eprintln!("scale: {msg}");
}

/// The bench on a running lab: what it asks the API and reads of the
/// agents, and what it keeps between sizes.
pub(crate) struct Bench {
    /// What it was asked.
    pub cli: Cli,
    client: kube::Client,
    fakes: Gen,
    lab_dir: PathBuf,
    api_port: u16,
    clk_tck: f64,
    /// Fake nodes the node status writer cycles through.
    status_nodes: Arc<AtomicU32>,
    /// Node status writes it made.
    status_writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Pod and Node changes the bench's own watches saw.
    seen: Seen,
}

type Agents = Vec<(String, u32, ProcSample)>;

impl Bench {
    /// The bench `cli` asks for, on the lab `lab` describes, its fake
    /// objects made by `fakes`.
    pub(crate) async fn new(cli: Cli, fakes: Gen, lab: &LabState) -> anyhow::Result<Self> {
        let client = margay_harness::kube::client_from(Path::new(&lab.kubeconfig)).await?;
        let api_port = metrics::url_port(&lab.apiserver_url)
            .with_context(|| format!("the apiserver's port in {}", lab.apiserver_url))?;
        let clk_tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .map_or(100.0, |v| v as f64);
        Ok(Self {
            lab_dir: cli.lab_dir.clone(),
            fakes,
            client,
            api_port,
            clk_tck,
            status_nodes: Arc::new(AtomicU32::new(0)),
            status_writes: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            seen: Seen::default(),
            cli,
        })
    }

    /// The bench's own watches, of the fake pods and of every Node: each
    /// aborted when its handle goes.
    pub(crate) fn watches(&self) -> [margay_task::Owned; 2] {
        [
            margay_task::Owned::spawn(Seen::watch(
                Api::<Pod>::namespaced(self.client.clone(), &self.cli.namespace),
                self.seen.pods.clone(),
                self.stop.clone(),
            )),
            margay_task::Owned::spawn(Seen::watch(
                Api::<Node>::all(self.client.clone()),
                self.seen.nodes.clone(),
                self.stop.clone(),
            )),
        ]
    }

    /// Tells the node status writer to stop.
    pub(crate) fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn lab(&self) -> anyhow::Result<LabState> {
        LabState::load(&self.lab_dir)
    }

    fn agents(&self) -> anyhow::Result<(Agents, u32)> {
        let s = self.lab()?;
        let restarts = s.nodes.iter().map(|n| n.restarts).sum();
        let a = s
            .nodes
            .iter()
            .filter(|n| n.agent_pid != 0)
            .filter_map(|n| Some((n.name.clone(), n.agent_pid, proc_sample(n.agent_pid)?)))
            .collect();
        Ok((a, restarts))
    }

    /// CPU ticks of all agents, by pid (a restarted agent counts anew).
    fn cpu(&self) -> anyhow::Result<BTreeMap<u32, u64>> {
        Ok(self
            .agents()?
            .0
            .into_iter()
            .map(|(_, pid, s)| (pid, s.cpu_ticks))
            .collect())
    }

    fn cpu_seconds_since(&self, before: &BTreeMap<u32, u64>) -> anyhow::Result<f64> {
        let now = self.cpu()?;
        let ticks: u64 = now
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
            .sum();
        Ok(ticks as f64 / self.clk_tck)
    }

    async fn metrics(&self) -> anyhow::Result<Metrics> {
        let req = http::Request::get("/metrics").body(Vec::new())?;
        let text = self
            .client
            .request_text(req)
            .await
            .context("the apiserver's /metrics")?;
        Ok(Metrics::from_text(&text))
    }

    async fn leader(&self) -> String {
        let leases: Api<Lease> =
            Api::namespaced(self.client.clone(), margay_api::node::LEASE_NAMESPACE);
        match leases.get_opt("margay-agent-leader").await {
            Ok(Some(l)) => l.spec.and_then(|s| s.holder_identity).unwrap_or_default(),
            _ => String::new(),
        }
    }

    pub(crate) async fn prepare(&self) -> anyhow::Result<()> {
        let pp = PostParams::default();
        let ns: Api<Namespace> = Api::all(self.client.clone());
        let obj: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": self.cli.namespace, "labels": {fake::LABEL: "true"}}
        }))?;
        retry("creating the namespace", || ns.create(&pp, &obj)).await?;
        // No controller-manager in the lab: the namespace's ServiceAccount
        // is ours to make, or every Pod POST is refused.
        let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        let obj: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))?;
        retry("creating its ServiceAccount", || sa.create(&pp, &obj)).await?;
        if self.cli.policy {
            let np: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.cli.namespace);
            let obj: NetworkPolicy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": POLICY, "labels": {fake::LABEL: "true"}},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}
            }))?;
            retry("creating the NetworkPolicy", || np.create(&pp, &obj)).await?;
            // A real pod the policy selects on node2: its table then holds
            // the policy's peer set (a node builds the sets its own pods'
            // policies use, no other).
            let lab = std::env::current_exe()?.with_file_name("margay-lab");
            let out = tokio::process::Command::new(&lab)
                .args([
                    "pod",
                    "add",
                    "node2",
                    ANCHOR,
                    "--namespace",
                    &self.cli.namespace,
                ])
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "margay-lab pod add node2 {ANCHOR}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// `--probe` pods on node1, each timed until node2's peer set has it.
    async fn probe(&self, size: u32) -> anyhow::Result<Vec<f64>> {
        if !self.cli.policy || self.cli.probe == 0 || size == 0 || self.fakes.pods_per_node == 0 {
            return Ok(Vec::new());
        }
        let (agents, _) = self.agents()?;
        let Some(pid) = agents.iter().find(|(n, _, _)| n == "node2").map(|a| a.1) else {
            bail!("--probe needs a lab node named node2");
        };
        let lab = std::env::current_exe()?.with_file_name("margay-lab");
        // The peer set: the set holding a fake pod's address.
        let sets = nft(pid, &["-t", "list", "sets", "inet"]).await?;
        let text = String::from_utf8_lossy(&sets.stdout).to_string();
        let probe_ip = self.fakes.pod_address(0, 0)?.to_string();
        let mut set = None;
        for name in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("set "))
            .map(|l| l.trim_end_matches(" {").to_string())
        {
            if in_set(pid, &name, &probe_ip).await? {
                set = Some(name);
                break;
            }
        }
        let Some(set) = set else {
            eprintln!("scale: no set of node2's table holds {probe_ip}: no probe");
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for i in 0..self.cli.probe {
            let name = format!("probe-{size}-{i}");
            let t0 = Instant::now();
            let add = tokio::process::Command::new(&lab)
                .args([
                    "pod",
                    "add",
                    "node1",
                    &name,
                    "--namespace",
                    &self.cli.namespace,
                ])
                .output()
                .await?;
            let said = String::from_utf8_lossy(&add.stdout).to_string();
            let Some(ip) = said.split_whitespace().nth(1).map(str::to_string) else {
                bail!(
                    "margay-lab pod add: {said} {}",
                    String::from_utf8_lossy(&add.stderr)
                );
            };
            loop {
                if in_set(pid, &set, &ip).await? {
                    out.push(t0.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    eprintln!("scale: probe {name} ({ip}) not in node2's peer set after 30 s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tokio::process::Command::new(&lab)
                .args(["pod", "del", &name])
                .output()
                .await;
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed())).await;
        }
        Ok(out)
    }

    /// The pod addresses (of the fake range) in one non-leader agent's
    /// NetworkPolicy table: its peer set.
    async fn peer_set(&self, leader: &str) -> Option<u64> {
        if !self.cli.policy {
            return None;
        }
        let (agents, _) = self.agents().ok()?;
        let pid = agents
            .iter()
            .find(|(n, _, _)| n != leader)
            .or(agents.first())?
            .1;
        let out = nft(pid, &["list", "table", "inet", "margay_policy"])
            .await
            .ok()?;
        Some(fake::pod_addresses_in(&String::from_utf8_lossy(
            &out.stdout,
        )))
    }

    /// Deletes every object of kind `K` carrying the bench's label.
    async fn delete_all<K>(&self, api: Api<K>, what: &str) -> anyhow::Result<u64>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default()
                .labels(&format!("{}=true", fake::LABEL))
                .limit(500);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let l = api.list_metadata(&lp).await?;
            names.extend(l.items.into_iter().filter_map(|o| o.metadata.name));
            token = l.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        let n = names.len() as u64;
        if n == 0 {
            return Ok(0);
        }
        eprintln!("scale: deleting {n} {what}");
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        futures::stream::iter(names)
            .map(|name| {
                let (api, dp) = (api.clone(), dp.clone());
                async move { retry(&format!("deleting {name}"), || api.delete(&name, &dp)).await }
            })
            .buffer_unordered(self.cli.concurrency.max(1))
            .try_for_each(|_| async { Ok(()) })
            .await?;
        Ok(n)
    }

    pub(crate) async fn cleanup(&self) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        self.delete_all(pods, "pods").await?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        self.delete_all(nodes, "nodes").await?;
        let slices: Api<MargayEndpointSlice> = Api::all(self.client.clone());
        self.delete_all(slices, "endpoint slices").await?;
        let np: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        self.delete_all(np, "NetworkPolicies").await?;
        let identities: Api<MargayNode> = Api::all(self.client.clone());
        self.delete_all(identities, "MargayNodes").await?;
        Ok(())
    }

    /// Fake nodes `from..to` and their pods: (node writes, pod writes).
    async fn load(&self, from: u32, to: u32) -> anyhow::Result<(u64, u64)> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let objs: Vec<Node> = (from..to)
            .map(|i| self.fakes.node(i))
            .collect::<anyhow::Result<_>>()?;
        let identities: Api<MargayNode> = Api::all(self.client.clone());
        let slices: Api<MargayEndpointSlice> = Api::all(self.client.clone());
        let node_writes = futures::stream::iter((from..to).zip(objs))
            .map(|(i, n)| {
                let (nodes, identities, slices) =
                    (nodes.clone(), identities.clone(), slices.clone());
                async move {
                    let pp = PostParams::default();
                    let name = n.metadata.name.clone().unwrap_or_default();
                    let r =
                        retry(&format!("creating Node {name}"), || nodes.create(&pp, &n)).await?;
                    let created = r.is_some();
                    // Its agent's MargayNode, owned by the Node.
                    let uid = match r.and_then(|n| n.metadata.uid) {
                        Some(u) => u,
                        None => nodes.get(&name).await?.metadata.uid.unwrap_or_default(),
                    };
                    let m = self.fakes.identity(i, &uid)?;
                    let ap = PatchParams::apply("margay-agent").force();
                    identities.patch(&name, &ap, &Patch::Apply(&m)).await?;
                    // Its pods as its agent publishes them.
                    for sl in self.fakes.slices(i, &uid)? {
                        let sn = sl.metadata.name.clone().unwrap_or_default();
                        slices.patch(&sn, &ap, &Patch::Apply(&sl)).await?;
                    }
                    Ok::<u64, anyhow::Error>(u64::from(created))
                }
            })
            .buffer_unordered(self.cli.concurrency.max(1))
            .try_fold(0u64, |a, b| async move { Ok(a + b) })
            .await?;
        self.status_nodes.store(to, Ordering::Relaxed);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        let per = self.fakes.pods_per_node;
        let total = u64::from(to - from) * u64::from(per);
        let t0 = Instant::now();
        let mut done = 0u64;
        let mut writes = 0u64;
        let mut stream =
            futures::stream::iter((from..to).flat_map(|i| (0..per).map(move |k| (i, k))))
                .map(|(i, k)| {
                    let pods = pods.clone();
                    async move { create_pod(&pods, &self.fakes, i, k).await }
                })
                .buffer_unordered(self.cli.concurrency.max(1));
        let mut shown = Instant::now();
        while let Some(r) = stream.next().await {
            writes += r?;
            done += 1;
            if shown.elapsed() > Duration::from_secs(10) {
                shown = Instant::now();
                eprintln!(
                    "scale: {done}/{total} pods ({:.0}/s)",
                    done as f64 / t0.elapsed().as_secs_f64()
                );
            }
        }
        Ok((node_writes, writes))
    }

    /// Waits until the agents' CPU is quiet: (seconds, settled).
    async fn settle(&self) -> anyhow::Result<(f64, bool)> {
        let t0 = Instant::now();
        let mut history = Vec::new();
        loop {
            let before = self.cpu()?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let pct = self.cpu_seconds_since(&before)? / 5.0 * 100.0;
            history.push(pct);
            let e = t0.elapsed();
            if e >= Duration::from_secs(self.cli.settle_min)
                && settled(&history, self.cli.settle_cpu)
            {
                return Ok((e.as_secs_f64(), true));
            }
            if e >= Duration::from_secs(self.cli.settle_max) {
                eprintln!(
                    "scale: agents still at {pct:.1}% of a core after {:.0} s",
                    e.as_secs_f64()
                );
                return Ok((e.as_secs_f64(), false));
            }
        }
    }

    /// Replaces pods at `--churn` per second for `--churn-seconds` over
    /// the `nodes` fake nodes.
    async fn churn(&self, nodes: u32) -> anyhow::Result<Churn> {
        let rate = self.cli.churn;
        let count = (rate * self.cli.churn_seconds as f64).round() as u64;
        let per = u64::from(self.fakes.pods_per_node.max(1));
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.cli.namespace);
        let seen0 = self.seen.snapshot();
        let cpu0 = self.cpu()?;
        let m0 = self.metrics().await?;
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sem = Arc::new(tokio::sync::Semaphore::new(self.cli.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for j in 0..count {
            tick.tick().await;
            // Spread over the nodes: node j mod N, then the next pod.
            let i = u32::try_from(j % u64::from(nodes))?;
            let k = u32::try_from((j / u64::from(nodes)) % per)?;
            let permit = sem.clone().acquire_owned().await?;
            let (pods, dp, fakes) = (pods.clone(), dp.clone(), self.fakes.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let name = Gen::pod_name(i, k);
                let mut w = 0u64;
                if retry(&format!("deleting {name}"), || pods.delete(&name, &dp))
                    .await?
                    .is_some()
                {
                    w += 1;
                }
                w += create_pod(&pods, &fakes, i, k).await?;
                Ok::<u64, anyhow::Error>(w)
            });
        }
        let mut writes = 0;
        while let Some(r) = tasks.join_next().await {
            writes += r??;
        }
        let seconds = t0.elapsed().as_secs_f64();
        // Let the last events go out.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let d = self.metrics().await?.since(&m0);
        let changes = self.seen.snapshot().0 - seen0.0;
        let (all, bytes) = (d.events("Pod"), d.bytes("Pod"));
        let others = (all - changes as f64).max(0.0);
        Ok(Churn {
            rate,
            seconds,
            writes,
            changes,
            pod_events: others,
            pod_bytes: if all > 0.0 { bytes / all * others } else { 0.0 },
            agents_cpu_percent: self.cpu_seconds_since(&cpu0)? / (seconds + 2.0) * 100.0,
        })
    }

    /// Writes each fake node's status every `--node-status-interval`,
    /// spread evenly, until stopped: a task in `tasks`, which its owner
    /// joins once it has set `stop` (none when the interval is 0).
    pub(crate) fn spawn_node_status(&self, tasks: &mut JoinSet<()>) {
        let every = self.cli.node_status_interval;
        if every == 0 {
            return;
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let (count, writes, stop) = (
            self.status_nodes.clone(),
            self.status_writes.clone(),
            self.stop.clone(),
        );
        tasks.spawn(async move {
            let mut next = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let n = count.load(Ordering::Relaxed);
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let gap = Duration::from_secs_f64(every as f64 / f64::from(n));
                let t = Instant::now();
                let name = Gen::node_name(next % n);
                next = next.wrapping_add(1);
                let p = Gen::node_status(&now_rfc3339());
                let (ppatch, patch) = (PatchParams::default(), Patch::Merge(&p));
                if nodes.patch_status(&name, &ppatch, &patch).await.is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(gap.saturating_sub(t.elapsed())).await;
            }
        });
    }

    /// Grows the fake cluster from `from` to `to` nodes and measures.
    pub(crate) async fn step(&self, from: u32, to: u32) -> anyhow::Result<Point> {
        let m0 = self.metrics().await?;
        let seen0 = self.seen.snapshot();
        let cpu0 = self.cpu()?;
        let status0 = self.status_writes.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let (node_writes, pod_writes) = if to > from {
            eprintln!("scale: growing to {to} fake nodes");
            self.load(from, to).await?
        } else {
            (0, 0)
        };
        let load_seconds = t0.elapsed().as_secs_f64();
        // The watch events of the load; the status writer's Node writes
        // meanwhile count too.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status_load = self.status_writes.load(Ordering::Relaxed) - status0;
        let d = self.metrics().await?.since(&m0);
        let seen = self.seen.snapshot();
        let (pod_changes, node_changes) = (seen.0 - seen0.0, seen.1 - seen0.1);
        let (settle_seconds, settled) = self.settle().await?;
        let agents_cpu_load_seconds = self.cpu_seconds_since(&cpu0)?;

        // Memory, then the quiet window.
        let leader = self.leader().await;
        let (agents, restarts) = self.agents()?;
        let procs = command_lines();
        let (api_pid, etcd_pid) = control_plane(&procs, self.api_port);
        let rss_of = |pid: Option<u32>| pid.and_then(proc_sample).map(|s| mib(s.rss_kib));
        let (lead, others): (Vec<_>, Vec<_>) = agents.iter().partition(|(n, _, _)| *n == leader);
        let others_rss: Vec<f64> = others.iter().map(|(_, _, s)| mib(s.rss_kib)).collect();

        let w0 = self.metrics().await?;
        let s0 = self.status_writes.load(Ordering::Relaxed);
        let c0: BTreeMap<u32, u64> = agents.iter().map(|(_, p, s)| (*p, s.cpu_ticks)).collect();
        tokio::time::sleep(Duration::from_secs(self.cli.window)).await;
        let secs = self.cli.window.max(1) as f64;
        let w = self.metrics().await?.since(&w0);
        let mine = (self.status_writes.load(Ordering::Relaxed) - s0) as f64;
        let (after, _) = self.agents()?;
        let pct = |pid: u32| {
            let b = c0.get(&pid).copied().unwrap_or(0);
            after
                .iter()
                .find(|(_, p, _)| *p == pid)
                .map_or(0.0, |(_, _, s)| {
                    s.cpu_ticks.saturating_sub(b) as f64 / self.clk_tck / secs * 100.0
                })
        };
        let others_pct: Vec<f64> = others.iter().map(|(_, p, _)| pct(*p)).collect();
        let n_agents = agents.len().max(1) as f64;
        let mut by: BTreeMap<String, f64> = BTreeMap::new();
        for ((verb, res), v) in &w.requests {
            let mut v = *v;
            if verb == "PATCH" && res == "nodes/status" {
                v = (v - mine).max(0.0);
            }
            if v > 0.0 {
                by.insert(format!("{verb} {res}"), v / secs);
            }
        }
        let total = w.requests_less("PATCH", "nodes/status", mine) / secs;
        let mut point = Point {
            nodes: to,
            pods: u64::from(to) * u64::from(self.fakes.pods_per_node),
            load_seconds,
            load_pod_writes: pod_writes,
            load_node_writes: node_writes + status_load,
            load_pod_changes: pod_changes,
            load_node_changes: node_changes,
            load_pod_events: (d.events("Pod") - pod_changes as f64).max(0.0),
            load_node_events: (d.events("Node") - node_changes as f64).max(0.0),
            settle_seconds,
            settled,
            leader: leader.clone(),
            leader_rss_mib: lead.first().map_or(0.0, |(_, _, s)| mib(s.rss_kib)),
            others_rss_mib_mean: mean(&others_rss),
            others_rss_mib_max: others_rss.iter().copied().fold(0.0, f64::max),
            apiserver_rss_mib: rss_of(api_pid),
            etcd_rss_mib: rss_of(etcd_pid),
            agents_cpu_load_seconds,
            rest_cpu_leader_percent: lead.first().map_or(0.0, |(_, p, _)| pct(*p)),
            rest_cpu_others_percent: mean(&others_pct),
            rest_cpu_all_percent: agents.iter().map(|(_, p, _)| pct(*p)).sum(),
            rest_requests_by: by,
            rest_requests_per_agent: total / n_agents,
            rest_events_per_s: w
                .watch_events
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(k, v)| (k.clone(), v / secs))
                .collect(),
            // Not the bench's own.
            pod_watchers: (w.watchers_of("Pod") - 1.0).max(0.0),
            node_watchers: (w.watchers_of("Node") - 1.0).max(0.0),
            churn: None,
            agent_restarts: restarts,
            peer_set: self.peer_set(&leader).await,
            peer_latency_ms: Vec::new(),
        };
        let churn = async {
            if self.cli.churn > 0.0 && to > 0 && self.fakes.pods_per_node > 0 {
                eprintln!(
                    "scale: churn at {} pods/s for {} s",
                    self.cli.churn, self.cli.churn_seconds
                );
                return self.churn(to).await.map(Some);
            }
            Ok(None)
        };
        let (churn, probe) = tokio::join!(churn, self.probe(to));
        point.churn = churn?;
        point.peer_latency_ms = probe?;
        eprintln!(
            "scale: {to} fake nodes: leader {} {:.1} MiB, others {:.1} MiB (max {:.1}), {:.2} Pod events per Pod change",
            point.leader,
            point.leader_rss_mib,
            point.others_rss_mib_mean,
            point.others_rss_mib_max,
            point.pod_events_per_change().unwrap_or(f64::NAN)
        );
        Ok(point)
    }
}

/// Whether the agents' CPU has settled, from its 5-s samples (percent of
/// a core, all agents): the last two under `quiet`, or a plateau (the last
/// 15 s within a fifth, or 1 % of a core, of the 15 s before: what a
/// steady load such as Node status writes leaves).
fn settled(history: &[f64], quiet: f64) -> bool {
    let n = history.len();
    if n >= 2 && history[n - 2..].iter().all(|p| *p < quiet) {
        return true;
    }
    if n >= 6 {
        let (a, b) = (mean(&history[n - 3..]), mean(&history[n - 6..n - 3]));
        return (a - b).abs() <= (0.2 * b).max(1.0);
    }
    false
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// `nft ARGS` in the network namespace of process `pid` (an agent's node).
async fn nft(pid: u32, args: &[&str]) -> std::io::Result<std::process::Output> {
    tokio::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "nft"])
        .args(args)
        .output()
        .await
}

/// Whether set `set` of the NetworkPolicy table in process `pid`'s
/// network namespace holds `ip`.
async fn in_set(pid: u32, set: &str, ip: &str) -> std::io::Result<bool> {
    let element = format!("{{ {ip} }}");
    let o = nft(
        pid,
        &["get", "element", "inet", "margay_policy", set, &element],
    )
    .await?;
    Ok(o.status.success())
}

/// Creates fake pod `k` of node `i` and writes its status as a kubelet
/// would: the writes made (one that found its object there already, or
/// gone, is not counted).
async fn create_pod(pods: &Api<Pod>, fakes: &Gen, i: u32, k: u32) -> anyhow::Result<u64> {
    let (pp, ppatch) = (PostParams::default(), PatchParams::default());
    let p = fakes.pod(i, k)?;
    let name = Gen::pod_name(i, k);
    let mut writes = 0;
    if retry(&format!("creating Pod {name}"), || pods.create(&pp, &p))
        .await?
        .is_some()
    {
        writes += 1;
    }
    let status = fakes.pod_status(i, k, &now_rfc3339())?;
    let patch = Patch::Merge(&status);
    if retry(&format!("writing Pod {name}'s status"), || {
        pods.patch_status(&name, &ppatch, &patch)
    })
    .await?
    .is_some()
    {
        writes += 1;
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_when_quiet_or_on_a_plateau() {
        assert!(!settled(&[], 5.0));
        assert!(!settled(&[4.0], 5.0));
        assert!(settled(&[80.0, 4.0, 3.0], 5.0));
        assert!(!settled(&[80.0, 4.0, 30.0], 5.0));
        // Still falling: not yet.
        assert!(!settled(&[90.0, 80.0, 70.0, 50.0, 40.0, 35.0], 5.0));
        // A steady 30 %, noisy.
        assert!(settled(&[90.0, 31.0, 27.0, 33.0, 29.0, 30.0, 28.0], 5.0));
        // Small figures: within 1 % of a core.
        assert!(settled(&[6.0, 5.5, 6.5, 6.0, 5.2, 6.3], 5.0));
    }
}
