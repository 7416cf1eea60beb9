//! The fault schedule: a 3-node lab (real agents, real kube-apiserver and
//! etcd, BIRD as top-of-rack router) carrying pings every 20 ms between
//! pods on every pair of nodes, while pods come and go, goes through, in
//! turn: the apiserver stopped for 60 s; frozen (accepting connections,
//! answering nothing) for 60 s; one node cut off from it for 60 s (its
//! agent killed and started again meanwhile); etcd restarted; every
//! BGPConfiguration field that restarts the speaker changed and changed
//! back (and the two that do not); a second Node announcing a node's BGP
//! address; a BGPPeer whose password Secret is missing, then too long; an
//! agent SIGKILLed; two agents SIGKILLed at once. The lab starts dead
//! agents again, as a kubelet would.
//!
//! What must hold throughout: no route to another node's block ever
//! missing from any node's kernel (sampled every 200 ms); under 0.5% of
//! the pings lost overall and no gap over 1 s on any pair; no address ever
//! held by two pods; every problem shown in the Node condition while it
//! lasts and gone after; no leak once garbage collection has run.
//!
//! The per-fault table it prints (packets lost, longest gap, time to a
//! clean status after the API returns) is what BENCHMARKS.md reports.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as KubeNode, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use margay_api::bgp::{BGPConfiguration, BGPPeer};
use margay_api::ctl::IpamCheck;
use margay_api::identity::MargayNode;
use margay_api::status::AgentStatus;
use margay_harness::wait;
use margay_lab::Tor;
use margay_lab::cluster::{Cluster, Options};
use margay_tests::PingLog;

/// Ping interval.
const EVERY_MS: u64 = 20;
/// The longest run of lost pings allowed on a pair (1 s).
const MAX_GAP_MS: u64 = 1000;
/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(60);
/// The agents' namespace (the lab's default).
const NS: &str = "kube-system";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One fault, as it went.
#[derive(Debug, Clone)]
struct Phase {
    name: String,
    start: f64,
    end: f64,
    /// Seconds from the API's return to a clean status on every node.
    converged: Option<f64>,
}

/// Pings from a pod on one node to a pod on another, every 20 ms.
struct Pinger {
    pair: String,
    child: Child,
    out: PathBuf,
}

/// Every pair's pinger.
struct Traffic(Vec<Pinger>);

impl Traffic {
    fn start(c: &Cluster, dir: &std::path::Path) -> Self {
        let mut out = Vec::new();
        for from in c.pods.iter().filter(|p| p.name.starts_with("t-")) {
            for to in c
                .pods
                .iter()
                .filter(|p| p.name.starts_with("t-") && p.node != from.node)
            {
                let pair = format!("{}->{}", from.node, to.node);
                let path = dir.join(format!("ping-{pair}.log"));
                let file = std::fs::File::create(&path).unwrap();
                let child = from
                    .ns
                    .cmd("ping")
                    .args(["-D", "-n", "-i", "0.02", &to.ip])
                    .stdin(Stdio::null())
                    .stdout(file)
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("ping");
                out.push(Pinger {
                    pair,
                    child,
                    out: path,
                });
            }
        }
        Traffic(out)
    }

    /// Stops every pinger; (pair, log).
    fn stop(mut self) -> Vec<(String, PingLog)> {
        let mut logs = Vec::new();
        for p in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = p.child.wait();
            let text = std::fs::read_to_string(&p.out).unwrap_or_default();
            logs.push((p.pair.clone(), PingLog::parse(&text)));
        }
        self.0.clear();
        logs
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Samples every node's routes to the other nodes' blocks every 200 ms.
struct RouteWatch {
    stop: Arc<AtomicBool>,
    missing: Arc<Mutex<(u64, Vec<String>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RouteWatch {
    fn start(expect: Vec<(String, String, BTreeSet<String>)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let missing = Arc::new(Mutex::new((0u64, Vec::new())));
        let (s, m) = (stop.clone(), missing.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (node, ns, want) in &expect {
                    let out = Command::new("ip")
                        .args(["-n", ns, "-4", "route", "show", "proto", "79"])
                        .output();
                    let Ok(out) = out else { continue };
                    let have: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                        .collect();
                    for cidr in want.difference(&have) {
                        let mut g = m.lock().unwrap();
                        g.0 += 1;
                        if g.1.len() < 30 {
                            g.1.push(format!("{:.1}: {node} had no route to {cidr}", now()));
                        }
                    }
                }
                // Not a wait: the sampler's pace.
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            missing,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.missing.lock().unwrap().clone()
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pods coming and going, with the addresses they were given.
#[derive(Default)]
struct Churn {
    next: usize,
    added: usize,
    deleted: usize,
    /// ADDs the API kept from starting (no Pod object could be made).
    skipped: usize,
    /// ADDs that failed on a node whose agent was running.
    failures: Vec<String>,
    /// Any address given to a pod while another live pod held it.
    double: Vec<String>,
}

impl Churn {
    /// One step: on the next node (of `nodes`), delete its oldest churn pod
    /// when it has two, then add one (unless `adds` is false).
    async fn step(&mut self, c: &mut Cluster, nodes: &[usize], adds: bool) {
        if nodes.is_empty() {
            return;
        }
        let i = nodes[self.next % nodes.len()];
        self.next += 1;
        let node = c.nodes[i].name.clone();
        let mine: Vec<String> = c
            .pods
            .iter()
            .filter(|p| p.node == node && p.name.starts_with("churn-"))
            .map(|p| p.name.clone())
            .collect();
        if mine.len() >= 2 {
            let name = mine[0].clone();
            match tokio::time::timeout(Duration::from_secs(8), c.del_pod(&name)).await {
                Ok(Ok(())) | Err(_) => self.deleted += 1,
                Ok(Err(e)) => self.failures.push(format!("DEL {name}: {e:#}")),
            }
        }
        if !adds {
            return;
        }
        let name = format!("churn-{}", self.next);
        let live: BTreeMap<String, String> = c
            .pods
            .iter()
            .map(|p| (p.ip.clone(), p.name.clone()))
            .collect();
        match tokio::time::timeout(Duration::from_secs(8), c.add_pod(&node, &name)).await {
            Ok(Ok(ip)) => {
                self.added += 1;
                if let Some(other) = live.get(&ip) {
                    self.double
                        .push(format!("{ip} given to {name} while {other} held it"));
                }
            }
            Ok(Err(e)) if format!("{e:#}").contains("creating Pod") => self.skipped += 1,
            Err(_) => self.skipped += 1,
            Ok(Err(e)) => {
                let running = c.nodes[i]
                    .agent
                    .as_mut()
                    .is_some_and(|a| a.exit_status().is_none());
                if running {
                    self.failures.push(format!("ADD {name} on {node}: {e:#}"));
                } else {
                    self.skipped += 1;
                }
            }
        }
    }
}

/// `margayctl node status -o json` on node `i`.
fn status(c: &Cluster, i: usize) -> Option<AgentStatus> {
    let (_, out, _) = c.margayctl(i, &["node", "status", "-o", "json"]).ok()?;
    serde_json::from_str(&out).ok()
}

/// Every node's status is clean: all inputs read, the API answering, no
/// problem, BGP synced.
fn clean(c: &Cluster) -> Result<(), String> {
    for i in 0..c.nodes.len() {
        let s = status(c, i).ok_or_else(|| format!("{}: no status", c.nodes[i].name))?;
        let r = &s.routing;
        if !(r.datastore_ok && s.api.answering && r.problems.is_empty() && r.bgp_synced) {
            let down: Vec<String> = s
                .peers
                .iter()
                .filter(|p| p.state != margay_api::status::SessionState::Established)
                .map(|p| format!("{} {:?} {:?}", p.address, p.state, p.last_error))
                .collect();
            return Err(format!(
                "{}: datastore_ok {} answering {} synced {} problems {:?} unknown {:?} peers not up {down:?}",
                c.nodes[i].name,
                r.datastore_ok,
                s.api.answering,
                r.bgp_synced,
                r.problems,
                r.unknown_inputs
            ));
        }
    }
    Ok(())
}

/// The schedule's state: the lab, what runs in the background, the log.
struct Run {
    c: Cluster,
    churn: Churn,
    phases: Vec<Phase>,
    t0: Instant,
}

impl Run {
    fn say(&self, what: &str) {
        let line = format!("[chaos {:>6.1}s] {what}", self.t0.elapsed().as_secs_f64());
        println!("{line}");
        let _ = std::io::stdout().flush();
    }

    /// Lets `dur` pass: the lab supervises its agents every second and
    /// pods churn every 4 s on `nodes` (adds only if `adds`).
    async fn idle(&mut self, dur: Duration, nodes: &[usize], adds: bool) {
        let end = Instant::now() + dur;
        let mut churn_at = Instant::now();
        while Instant::now() < end {
            self.c.supervise();
            if Instant::now() >= churn_at {
                self.churn.step(&mut self.c, nodes, adds).await;
                churn_at = Instant::now() + Duration::from_secs(4);
            }
            // Not a wait: idling for `dur` is the point; this is its pace.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits (supervising, no churn) until `f` holds on node status.
    async fn until(
        &mut self,
        what: &str,
        secs: u64,
        f: impl Fn(&Cluster) -> Result<(), String>,
    ) -> f64 {
        let every = Duration::from_millis(250);
        let mut p = wait::Poller::new(what, Duration::from_secs(secs), every);
        let mut said = Instant::now();
        loop {
            self.c.supervise();
            match f(&self.c) {
                Ok(()) => return p.elapsed().as_secs_f64(),
                Err(e) => p.saw(e),
            }
            if said.elapsed() > Duration::from_secs(10) {
                self.say(&format!("still waiting for {what}: {}", p.last()));
                said = Instant::now();
            }
            if let Err(e) = p.next().await {
                panic!("{e}\nnode1 log:\n{}", tail(&self.c.agent_log(0), 40));
            }
        }
    }

    /// A fault begins.
    fn begin(&self, name: &str) -> Phase {
        self.say(&format!("fault: {name}"));
        Phase {
            name: name.to_string(),
            start: now(),
            end: 0.0,
            converged: None,
        }
    }

    /// It ends once every node's status is clean again (timing that).
    async fn end_when_clean(&mut self, p: Phase, what: &str, secs: u64) {
        let after = self.until(what, secs, clean).await;
        self.end(p, Some(after));
    }

    /// It ended; the status was clean `converged` seconds after the API
    /// returned.
    fn end(&mut self, mut p: Phase, converged: Option<f64>) {
        p.end = now();
        p.converged = converged;
        self.say(&format!(
            "fault done: {} ({:.0} s{})",
            p.name,
            p.end - p.start,
            converged.map_or(String::new(), |c| format!(", clean {c:.1} s after"))
        ));
        self.phases.push(p);
    }

    /// Every node but `except` shows `needle` in its MargayReady condition
    /// (or, with `present` false, none shows it).
    async fn condition(&mut self, needle: &str, present: bool, except: &[usize]) {
        let what = format!(
            "condition {needle:?} to {}",
            if present { "show" } else { "clear" }
        );
        let every = Duration::from_millis(300);
        let mut p = wait::Poller::new(what, Duration::from_secs(60), every);
        let nodes: Api<KubeNode> = Api::all(self.c.client.clone());
        loop {
            self.c.supervise();
            let mut ok = true;
            let mut seen = Vec::new();
            for i in 0..self.c.nodes.len() {
                let name = self.c.nodes[i].name.clone();
                let msg = match nodes.get(&name).await {
                    Ok(n) => margay_api::node::condition(&n, margay_api::node::CONDITION)
                        .map(|c| format!("{}: {}", c.status, c.message.clone().unwrap_or_default()))
                        .unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                let has = msg.contains(needle);
                if except.contains(&i) {
                    ok &= !has || !present;
                } else {
                    ok &= has == present;
                }
                seen.push(format!("{name}: {msg}"));
            }
            if ok {
                return;
            }
            p.saw(format!("{seen:#?}"));
            p.next().await.unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// nftables in node `ns`: TCP to the apiserver's port answered with resets.
fn cut_off(ns: &margay_harness::netns::Netns, port: u16, on: bool) {
    let script = if on {
        format!(
            "table inet margay_chaos {{\n  chain out {{\n    type filter hook output priority 0;\n    tcp dport {port} reject with tcp reset\n  }}\n}}\n"
        )
    } else {
        "delete table inet margay_chaos\n".to_string()
    };
    let mut child = ns
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft {script}");
}

async fn patch_bgp(c: &Cluster, spec: serde_json::Value) {
    let api: Api<BGPConfiguration> = Api::all(c.client.clone());
    api.patch(
        "default",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": spec })),
    )
    .await
    .expect("BGPConfiguration patch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_outlives_every_fault_of_the_control_plane() {
    let c = Cluster::start(Options {
        nodes: 3,
        tor: Tor::Bird,
        gc_interval: 5,
        leak_grace: 20,
        ..Default::default()
    })
    .await
    .expect("lab");
    let mut run = Run {
        c,
        churn: Churn::default(),
        phases: Vec::new(),
        t0: Instant::now(),
    };
    for i in 0..3 {
        let node = run.c.nodes[i].name.clone();
        run.c
            .add_pod(&node, &format!("t-{node}"))
            .await
            .expect("pod");
    }
    run.c
        .wait_connected(Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tail(&run.c.agent_log(0), 40)));
    let all = [0usize, 1, 2];
    // Start-up grace: every node clean, some churn.
    run.until("a clean start", 90, clean).await;
    let blocks = run.c.blocks().await.unwrap();
    let expect = run
        .c
        .nodes
        .iter()
        .map(|n| {
            let want = blocks
                .iter()
                .filter(|(_, owner)| *owner != n.name)
                .map(|(cidr, _)| cidr.clone())
                .collect();
            (n.name.clone(), n.node.ns.name().to_string(), want)
        })
        .collect();
    let dir = run.c.work_dir().to_path_buf();
    let traffic = Traffic::start(&run.c, &dir);
    let routes = RouteWatch::start(expect);
    run.say("traffic and route sampling started");
    run.idle(Duration::from_secs(10), &all, true).await;

    // 1. The apiserver stopped.
    let p = run.begin("apiserver stopped 60 s");
    run.c.api.stop_apiserver().expect("stop the apiserver");
    let down = Instant::now();
    run.until("node1 to see the API down and stay ready", 45, |c| {
        let s = status(c, 0).ok_or("no status")?;
        if (s.api.answering && s.routing.datastore_ok) || !s.ready {
            return Err(format!("{:?} ready {} {:?}", s.api, s.ready, s.not_ready));
        }
        Ok(())
    })
    .await;
    run.idle(OUTAGE.saturating_sub(down.elapsed()), &all, false)
        .await;
    run.c.api.start_apiserver().await.expect("apiserver back");
    run.end_when_clean(p, "a clean status after the apiserver returned", 90)
        .await;
    run.idle(Duration::from_secs(5), &all, true).await;

    // 2. The apiserver frozen.
    let p = run.begin("apiserver frozen 60 s");
    run.c.api.freeze(true).unwrap();
    let down = Instant::now();
    run.until("node1 to see the API not answering", 55, |c| {
        let s = status(c, 0).ok_or("no status")?;
        if s.api.answering || !s.ready {
            return Err(format!("{:?} ready {}", s.api, s.ready));
        }
        Ok(())
    })
    .await;
    run.idle(OUTAGE.saturating_sub(down.elapsed()), &all, false)
        .await;
    run.c.api.freeze(false).unwrap();
    run.end_when_clean(p, "a clean status after the apiserver thawed", 90)
        .await;
    run.idle(Duration::from_secs(5), &all, true).await;

    // 3. node1 cut off; its agent killed and started again meanwhile.
    let p = run.begin("node1 cut off 60 s, its agent restarted meanwhile");
    let port = run.c.api.port();
    cut_off(&run.c.nodes[0].node.ns, port, true);
    let down = Instant::now();
    run.until("node1 to see the API down", 45, |c| {
        let s = status(c, 0).ok_or("no status")?;
        if s.api.answering && s.routing.datastore_ok {
            return Err(format!("{:?}", s.api));
        }
        Ok(())
    })
    .await;
    // Pods still start on node1, from its spares.
    for k in 0..2 {
        let name = format!("cut-{k}");
        let ip = run.c.add_pod("node1", &name).await.unwrap_or_else(|e| {
            panic!(
                "ADD on the cut-off node1: {e:#}\n{}",
                tail(&run.c.agent_log(0), 30)
            )
        });
        run.say(&format!("{name} started on cut-off node1 with {ip}"));
    }
    run.c.crash_agent(0).unwrap();
    run.idle(OUTAGE.saturating_sub(down.elapsed()), &[1, 2], true)
        .await;
    cut_off(&run.c.nodes[0].node.ns, port, false);
    run.end_when_clean(p, "a clean status after node1 reached the API again", 120)
        .await;
    assert_eq!(
        run.c.nodes[0].restarts.count, 1,
        "node1's agent was started again"
    );
    run.idle(Duration::from_secs(5), &all, true).await;

    // 4. etcd restarted.
    let p = run.begin("etcd restarted");
    run.c.api.restart_etcd().expect("etcd");
    run.idle(Duration::from_secs(10), &[0, 1, 2], false).await;
    run.end_when_clean(p, "a clean status after etcd returned", 90)
        .await;

    // 5. What restarts the speaker (AS, port), changed and changed back;
    // what does not (communities, restart time).
    let p = run.begin("BGPConfiguration: asNumber, listenPort, communities, restartTime");
    for (what, spec) in [
        ("asNumber 64513", serde_json::json!({"asNumber": 64513})),
        ("listenPort 1790", serde_json::json!({"listenPort": 1790})),
        (
            "communities",
            serde_json::json!({"communities": ["64512:100"]}),
        ),
        (
            "restartTimeSeconds 100",
            serde_json::json!({"restartTimeSeconds": 100}),
        ),
        ("listenPort back", serde_json::json!({"listenPort": null})),
        ("asNumber back", serde_json::json!({"asNumber": 64512})),
        (
            "communities and restart time back",
            serde_json::json!({"communities": null, "restartTimeSeconds": null}),
        ),
    ] {
        run.say(&format!("BGPConfiguration {what}"));
        patch_bgp(&run.c, spec).await;
        run.idle(Duration::from_secs(12), &[0, 1, 2], true).await;
    }
    run.end_when_clean(p, "a clean status after the BGP edits", 90)
        .await;

    // 6. A stale Node announcing node2's address, as an agent of an earlier
    // version did (annotations only): the leader writes its MargayNode
    // (so upgraded agents see it), and deleting the Node deletes that
    // (the leader's collection: no controller-manager here).
    let p = run.begin("a second Node with node2's BGP address");
    let nodes: Api<KubeNode> = Api::all(run.c.client.clone());
    let identities: Api<MargayNode> = Api::all(run.c.client.clone());
    let addr = identities
        .get("node2")
        .await
        .unwrap()
        .spec
        .bgp_address
        .expect("node2's MargayNode has its address");
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "node2-stale", "annotations": {margay_api::node::ANN_ADDRESS: addr}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    run.condition(
        "peering with node2, the one whose agent is alive",
        true,
        &[1],
    )
    .await;
    run.idle(Duration::from_secs(5), &[0, 1, 2], true).await;
    nodes
        .delete("node2-stale", &DeleteParams::default())
        .await
        .unwrap();
    run.condition("both announce BGP address", false, &[]).await;
    assert!(
        identities.get_opt("node2-stale").await.unwrap().is_none(),
        "the deleted Node's MargayNode is collected"
    );
    run.end(p, None);

    // 7. A BGPPeer whose password Secret is missing, then too long.
    let p = run.begin("a BGPPeer's password Secret missing, then too long");
    let peers: Api<BGPPeer> = Api::all(run.c.client.clone());
    margay_tests::create_password_peer(&run.c.client, "chaos-pw", "10.99.0.253", 65099, "chaos-pw")
        .await;
    run.condition("password Secret chaos-pw/pw not found", true, &[])
        .await;
    let secrets: Api<Secret> = Api::namespaced(run.c.client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "chaos-pw"}, "stringData": {"pw": "x".repeat(100)}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    run.condition(
        "neighbor 10.99.0.253 (BGPPeer chaos-pw) left out",
        true,
        &[],
    )
    .await;
    run.idle(Duration::from_secs(5), &[0, 1, 2], true).await;
    let dp = DeleteParams::default();
    peers.delete("chaos-pw", &dp).await.unwrap();
    secrets.delete("chaos-pw", &dp).await.unwrap();
    run.condition("chaos-pw", false, &[]).await;
    run.end(p, None);

    // 8. One agent SIGKILLed; 9. two at once (the lab starts them again).
    let p = run.begin("node2's agent SIGKILLed");
    run.c.crash_agent(1).unwrap();
    run.idle(Duration::from_secs(15), &[0, 2], true).await;
    run.end_when_clean(p, "a clean status after node2's agent came back", 90)
        .await;
    let p = run.begin("node1's and node3's agents SIGKILLed at once");
    run.c.crash_agent(0).unwrap();
    run.c.crash_agent(2).unwrap();
    run.idle(Duration::from_secs(15), &[1], true).await;
    run.end_when_clean(p, "a clean status after both came back", 90)
        .await;
    run.idle(Duration::from_secs(10), &all, true).await;

    // The end: traffic and routes, then the ledger.
    let logs = traffic.stop();
    let (missing, examples) = routes.finish();
    let (mut sent, mut lost_total) = (0u64, 0u64);
    let mut worst: Vec<(String, u64)> = Vec::new();
    let mut per_phase: Vec<u64> = vec![0; run.phases.len()];
    let mut gap_phase: Vec<u64> = vec![0; run.phases.len()];
    for (pair, log) in &logs {
        let (lost, longest) = log.losses();
        sent += log.sent;
        lost_total += lost.len() as u64;
        worst.push((pair.clone(), longest * EVERY_MS));
        for (k, p) in run.phases.iter().enumerate() {
            let n = lost
                .iter()
                .filter(|t| **t >= p.start && **t < p.end)
                .count() as u64;
            per_phase[k] += n;
            gap_phase[k] = gap_phase[k].max(if n > 0 { longest * EVERY_MS } else { 0 });
        }
    }
    println!(
        "\n| fault | seconds | pings lost (all pairs) | longest gap on a pair (ms) | clean status after (s) |"
    );
    println!("|---|---|---|---|---|");
    for (k, p) in run.phases.iter().enumerate() {
        println!(
            "| {} | {:.0} | {} | {} | {} |",
            p.name,
            p.end - p.start,
            per_phase[k],
            gap_phase[k],
            p.converged.map_or("-".to_string(), |s| format!("{s:.1}"))
        );
    }
    println!(
        "\n{sent} pings sent, {lost_total} lost ({:.3}%); longest gap per pair: {worst:?}",
        100.0 * lost_total as f64 / sent.max(1) as f64
    );
    println!(
        "churn: {} added, {} deleted, {} not started (API down), failures {:?}",
        run.churn.added, run.churn.deleted, run.churn.skipped, run.churn.failures
    );
    println!(
        "agent restarts: {:?}",
        run.c
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.restarts.count))
            .collect::<Vec<_>>()
    );

    assert_eq!(
        missing, 0,
        "routes to remote blocks went missing: {examples:#?}"
    );
    assert!(sent > 6 * 10_000, "too few pings sent: {sent}");
    assert!(
        (lost_total as f64) < 0.005 * sent as f64,
        "{lost_total} of {sent} pings lost"
    );
    for (pair, gap) in &worst {
        assert!(*gap <= MAX_GAP_MS, "{pair}: {gap} ms without an answer");
    }
    assert!(run.churn.double.is_empty(), "{:?}", run.churn.double);
    assert!(run.churn.failures.is_empty(), "{:?}", run.churn.failures);
    assert!(
        run.churn.added >= 20,
        "churn added only {} pods",
        run.churn.added
    );
    let restarts: Vec<u32> = run.c.nodes.iter().map(|n| n.restarts.count).collect();
    assert_eq!(restarts, [2, 1, 1]);

    // One leader, a live agent.
    let leases: Api<Lease> =
        Api::namespaced(run.c.client.clone(), margay_api::node::LEASE_NAMESPACE);
    let l = leases
        .get("margay-agent-leader")
        .await
        .expect("the leader Lease");
    let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(
        ["node1", "node2", "node3"].contains(&holder.as_str()),
        "{holder}"
    );
    let leaders: Vec<bool> = (0..3)
        .map(|i| status(&run.c, i).is_some_and(|s| s.api.leader))
        .collect();
    assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");

    // No address held twice, and no leak once collection has run.
    let every = Duration::from_secs(2);
    let mut p = wait::Poller::new("IPAM check ok", Duration::from_secs(120), every);
    let report = loop {
        let (_, out, _) = run
            .c
            .margayctl(0, &["ipam", "check", "-o", "json"])
            .unwrap();
        let r: IpamCheck = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(r.duplicates.is_empty(), "{:?}", r.duplicates);
        if r.ok {
            break r;
        }
        run.c.supervise();
        p.saw(format!("{r:?}"));
        p.next()
            .await
            .unwrap_or_else(|e| panic!("after garbage collection: {e}"));
    };
    assert!(report.ok, "after garbage collection: {report:?}");
    let held: BTreeMap<String, String> = margay_tests::allocations(&run.c.client)
        .await
        .into_iter()
        .map(|(ip, a)| (ip, a.handle))
        .collect();
    for p in &run.c.pods {
        let h = held.get(&p.ip);
        assert_eq!(
            h.map(String::as_str),
            Some(format!("margay/{}/eth0", p.id).as_str()),
            "{} ({})",
            p.name,
            p.ip
        );
    }
}
