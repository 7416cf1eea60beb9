//! Pod churn on real kubelets (issue 30): pods started and stopped at a
//! fixed rate for minutes on a running `margay-lab up --kubernetes`, and
//! how long each took from its creation to Ready.
//!
//! `churn run` trades two Deployments of the lab pod image (`churn-a`,
//! `churn-b`, label `app=churn`, every pod selected by the NetworkPolicy
//! `churn`): once `--level` pods of one are Ready, every `1/--rate` s one
//! is scaled up by one and the other down by one, swapping when the
//! shrinking one is empty, so `--rate` pods are created and as many
//! deleted per second while about `--level` run. A watch on the pods
//! records when each is first seen (its creation, to within the watch's
//! delivery) and when it is first Ready; pods created during the churn
//! are measured, then the tool waits up to `--drain` s for the last of
//! them. With `--rules` (Margay installed from its manifest), every
//! agent's log says when each pod's rules were in (its `pod added` line:
//! the ADD answers only once they are, `rules_ms` into it), and the tool
//! reports Ready minus rules-in per pod: negative means the rules were in
//! first. One JSON line per run is appended to `--out`.
//!
//! `churn plot` draws p50 and p99 start-up latency against the rate for
//! each install from those lines (SVG).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[path = "scale/svg.rs"]
#[allow(dead_code)]
mod svg;

#[derive(Debug, Parser)]
#[command(about = "pod churn on a running lab: created -> Ready, Ready -> rules in")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One run at one rate on the running lab.
    Run(RunArgs),
    /// `run`'s JSON lines as a Markdown table.
    Table {
        /// The JSON lines `run --out` appended.
        input: PathBuf,
    },
    /// p50/p99 against the rate, per install, from `run`'s JSON lines.
    Plot {
        /// The JSON lines `run --out` appended.
        input: PathBuf,
        /// The SVG to write.
        output: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The lab's directory (its `state.json`).
    #[arg(long, env = "MARGAY_LAB_DIR", default_value = "/run/margay-lab")]
    lab: PathBuf,
    /// The install's name in the results (`manifest`, `ptp`).
    #[arg(long)]
    install: String,
    /// Pods created (and as many deleted) per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Pods running throughout.
    #[arg(long, default_value_t = 30)]
    level: u32,
    /// Seconds to wait after the churn for its last pods to be Ready.
    #[arg(long, default_value_t = 60)]
    drain: u64,
    /// Read the Margay agents' logs for when each pod's rules were in.
    #[arg(long)]
    rules: bool,
    /// Append the run's result here as one JSON line.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What the lab's `state.json` says that this tool needs.
#[derive(Debug, Deserialize)]
struct LabState {
    kubeconfig: String,
}

/// One pod as the watch saw it.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    /// Created while the churn ran (not during the warm-up or drain).
    measured: bool,
    first: Instant,
    ready: Option<(Instant, jiff::Timestamp)>,
    deleted: bool,
}

/// The pods seen, by UID, and the most measured pods pending at once.
#[derive(Debug, Default)]
struct Book {
    pods: HashMap<String, Seen>,
    pending_max: usize,
}

type Pods = Arc<Mutex<Book>>;

/// One run's figures (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    install: String,
    rate: f64,
    /// Steps (one pod up, one down) per second as the churn came out:
    /// below `rate` when the scale calls could not keep up.
    achieved_rate: f64,
    level: u32,
    seconds: u64,
    created: usize,
    ready: usize,
    /// Created during the churn, deleted before they were Ready.
    deleted_unready: usize,
    /// Still not Ready `--drain` s after the churn.
    never_ready: usize,
    /// Most measured pods waiting for Ready at once.
    pending_max: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rules: Option<Rules>,
}

/// Ready against rules-in, over the measured pods that became Ready.
#[derive(Debug, Serialize, Deserialize)]
struct Rules {
    /// Pods whose rules-in time the agents' logs gave.
    matched: usize,
    /// Ready pods without a `pod added` line.
    missing: usize,
    /// Pods Ready before their rules were in (must be 0).
    ready_first: usize,
    /// Rules-in minus Ready (ms): the largest (<= 0 is rules first).
    max_ms: f64,
    /// ... and the median.
    p50_ms: f64,
    /// The agents' ADDs for these pods (`total_ms`): median and p99.
    #[serde(default = "nan")]
    add_p50_ms: f64,
    #[serde(default = "nan")]
    add_p99_ms: f64,
    /// ... of which waiting for an address (`ipam_ms`), p99.
    #[serde(default = "nan")]
    ipam_p99_ms: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Table { input } => table(&input),
        Cmd::Plot { input, output } => plot(&input, &output),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    if !(a.rate > 0.0 && a.rate <= 100.0) {
        bail!("--rate {}: give pods per second in (0, 100]", a.rate);
    }
    if a.level == 0 {
        bail!("--level 0: give the pods to keep running (>= 1)");
    }
    let p = a.lab.join("state.json");
    let st: LabState = serde_json::from_slice(
        &std::fs::read(&p).with_context(|| format!("{}: is a lab up?", p.display()))?,
    )?;
    let client = margay_harness::kube::client_from(Path::new(&st.kubeconfig)).await?;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), "default");

    policy(&client).await?;
    let pods: Pods = Arc::default();
    let churning = Arc::new(AtomicBool::new(false));
    // Ends (aborted) when dropped, after the drain.
    let watch =
        margay_task::Owned::spawn(watch_pods(pods_api.clone(), pods.clone(), churning.clone()));

    // Warm-up: `level` pods of churn-a Ready, churn-b empty.
    deployment(&deps, "churn-a", a.level).await?;
    deployment(&deps, "churn-b", 0).await?;
    let t = Instant::now();
    while ready_now(&pods) < a.level as usize {
        if t.elapsed() > Duration::from_secs(300) {
            bail!(
                "warm-up: {} of {} pods Ready after 300 s",
                ready_now(&pods),
                a.level
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start_wall = jiff::Timestamp::now();

    // The churn.
    churning.store(true, Ordering::SeqCst);
    let (mut grow, mut shrink) = (("churn-b", 0u32), ("churn-a", a.level));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
    let t0 = Instant::now();
    let mut ticks = 0usize;
    while t0.elapsed() < Duration::from_secs(a.seconds) {
        tick.tick().await;
        if shrink.1 == 0 {
            std::mem::swap(&mut grow, &mut shrink);
        }
        grow.1 += 1;
        shrink.1 -= 1;
        let (g, s) = tokio::join!(
            scale(&deps, grow.0, grow.1),
            scale(&deps, shrink.0, shrink.1)
        );
        g?;
        s?;
        ticks += 1;
    }
    churning.store(false, Ordering::SeqCst);
    let churned = t0.elapsed();

    // Drain: the measured pods still there become Ready, or the time is up
    // (the last scale's pods given 2 s to be made and seen first).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    while pending_now(&pods) > 0 && t.elapsed() < Duration::from_secs(a.drain) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (seen, pending_max): (Vec<Seen>, usize) = {
        let b = pods.lock().expect("pods lock");
        (
            b.pods.values().filter(|s| s.measured).cloned().collect(),
            b.pending_max,
        )
    };
    drop(watch);

    let mut lat: Vec<f64> = seen
        .iter()
        .filter_map(|s| s.ready.map(|(r, _)| ms(r - s.first)))
        .collect();
    lat.sort_by(f64::total_cmp);
    let rules = if a.rules {
        Some(rules(&client, &seen, start_wall).await?)
    } else {
        None
    };
    let o = Outcome {
        install: a.install.clone(),
        rate: a.rate,
        achieved_rate: ticks as f64 / churned.as_secs_f64(),
        level: a.level,
        seconds: a.seconds,
        created: seen.len(),
        ready: lat.len(),
        deleted_unready: seen
            .iter()
            .filter(|s| s.ready.is_none() && s.deleted)
            .count(),
        never_ready: seen
            .iter()
            .filter(|s| s.ready.is_none() && !s.deleted)
            .count(),
        pending_max,
        p50_ms: pct(&lat, 0.50),
        p90_ms: pct(&lat, 0.90),
        p99_ms: pct(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        rules,
    };

    // Clean: both Deployments gone with their pods, for the next run.
    for d in ["churn-a", "churn-b"] {
        deps.delete(d, &DeleteParams::background()).await?;
    }
    let t = Instant::now();
    while !pods_api
        .list(&ListParams::default().labels("app=churn"))
        .await?
        .items
        .is_empty()
    {
        if t.elapsed() > Duration::from_secs(120) {
            eprintln!("churn: pods of app=churn still there after 120 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let line = serde_json::to_string(&o)?;
    println!("{line}");
    if let Some(out) = &a.out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .with_context(|| out.display().to_string())?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// The NetworkPolicy `churn`: every `app=churn` pod selected, ingress
/// from the others on TCP 8080.
async fn policy(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), "default");
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "churn"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "churn"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "churn"}}}],
                "ports": [{"protocol": "TCP", "port": 8080}]
            }]
        }
    }))?;
    match api.create(&PostParams::default(), &np).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deployment `name` of the lab pod image (label `app=churn`) with
/// `replicas`, made or scaled.
async fn deployment(deps: &Api<Deployment>, name: &str, replicas: u32) -> anyhow::Result<()> {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "churn", "set": name}},
            "template": {
                "metadata": {"labels": {"app": "churn", "set": name}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "pod",
                        "image": margay_lab::image::LAB_POD_IMAGE,
                        "imagePullPolicy": "IfNotPresent"
                    }]
                }
            }
        }
    }))?;
    match deps.create(&PostParams::default(), &d).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => scale(deps, name, replicas).await,
        Err(e) => Err(e.into()),
    }
}

async fn scale(deps: &Api<Deployment>, name: &str, replicas: u32) -> anyhow::Result<()> {
    deps.patch_scale(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .with_context(|| format!("scaling {name} to {replicas}"))?;
    Ok(())
}

/// Records, per pod UID, when the watch first saw it and when first Ready.
async fn watch_pods(api: Api<Pod>, pods: Pods, churning: Arc<AtomicBool>) {
    let mut s = std::pin::pin!(
        watcher(api, watcher::Config::default().labels("app=churn")).default_backoff()
    );
    while let Some(ev) = s.next().await {
        let (pod, deleted) = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
            Ok(watcher::Event::Delete(p)) => (p, true),
            Ok(_) => continue,
            Err(e) => {
                eprintln!("churn: pod watch: {e}");
                continue;
            }
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        let now = Instant::now();
        let ready = is_ready(&pod);
        let mut b = pods.lock().expect("pods lock");
        let s = b.pods.entry(uid).or_insert_with(|| Seen {
            name: pod.metadata.name.clone().unwrap_or_default(),
            measured: churning.load(Ordering::SeqCst),
            first: now,
            ready: None,
            deleted: false,
        });
        if ready && s.ready.is_none() {
            s.ready = Some((now, jiff::Timestamp::now()));
        }
        s.deleted |= deleted || pod.metadata.deletion_timestamp.is_some();
        let pending = pending_in(&b);
        b.pending_max = b.pending_max.max(pending);
    }
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
}

fn ready_now(pods: &Pods) -> usize {
    pods.lock()
        .expect("pods lock")
        .pods
        .values()
        .filter(|s| s.ready.is_some() && !s.deleted)
        .count()
}

/// Measured pods neither Ready nor deleted.
fn pending_now(pods: &Pods) -> usize {
    pending_in(&pods.lock().expect("pods lock"))
}

fn pending_in(b: &Book) -> usize {
    b.pods
        .values()
        .filter(|s| s.measured && s.ready.is_none() && !s.deleted)
        .count()
}

/// When each Margay agent says each pod's rules were in, against when
/// the pod was seen Ready.
async fn rules(
    client: &kube::Client,
    seen: &[Seen],
    since: jiff::Timestamp,
) -> anyhow::Result<Rules> {
    let agents: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let lp = LogParams {
        container: Some("margay-agent".into()),
        since_seconds: Some(jiff::Timestamp::now().duration_since(since).as_secs() + 600),
        ..LogParams::default()
    };
    let mut rules_in: HashMap<String, Added> = HashMap::new();
    let list = agents
        .list(&ListParams::default().labels("app.kubernetes.io/name=margay"))
        .await?;
    for p in list.items {
        let name = p.metadata.name.unwrap_or_default();
        let text = agents
            .logs(&name, &lp)
            .await
            .with_context(|| format!("logs of {name}"))?;
        for line in text.lines() {
            if let Some(a) = parse_added(line) {
                rules_in.insert(a.pod.clone(), a);
            }
        }
    }
    let (mut d, mut add, mut ipam) = (Vec::new(), Vec::new(), Vec::new());
    let mut missing = 0;
    for s in seen {
        let Some((_, ready)) = s.ready else { continue };
        match rules_in.get(&format!("default/{}", s.name)) {
            Some(r) => {
                d.push(r.rules_in.duration_since(ready).as_secs_f64() * 1e3);
                add.push(r.total_ms);
                ipam.push(r.ipam_ms);
            }
            None => missing += 1,
        }
    }
    for v in [&mut d, &mut add, &mut ipam] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Rules {
        matched: d.len(),
        missing,
        ready_first: d.iter().filter(|x| **x > 0.0).count(),
        max_ms: d.last().copied().unwrap_or(f64::NAN),
        p50_ms: pct(&d, 0.5),
        add_p50_ms: pct(&add, 0.5),
        add_p99_ms: pct(&add, 0.99),
        ipam_p99_ms: pct(&ipam, 0.99),
    })
}

/// An agent's `pod added` line.
#[derive(Debug, Clone, PartialEq)]
struct Added {
    /// `namespace/name`.
    pod: String,
    /// When the pod's rules were in: the line's time less what the ADD
    /// did after them.
    rules_in: jiff::Timestamp,
    total_ms: f64,
    ipam_ms: f64,
}

/// An agent's `pod added` line, if `line` is one.
fn parse_added(line: &str) -> Option<Added> {
    if !line.contains(" pod added") {
        return None;
    }
    let mut words = line.split_whitespace();
    let at: jiff::Timestamp = words.next()?.parse().ok()?;
    let (mut pod, mut rules_ms, mut total_ms, mut ipam_ms) = (None, None, None, None);
    for w in words {
        let num = |p: &str| w.strip_prefix(p).and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = w.strip_prefix("pod=") {
            pod = Some(v.to_string());
        }
        rules_ms = rules_ms.or(num("rules_ms="));
        total_ms = total_ms.or(num("total_ms="));
        ipam_ms = ipam_ms.or(num("ipam_ms="));
    }
    let (total_ms, rules_ms) = (total_ms?, rules_ms?);
    let after = (total_ms - rules_ms).max(0.0);
    let rules_in = at
        .checked_sub(jiff::SignedDuration::from_secs_f64(after / 1e3))
        .ok()?;
    Some(Added {
        pod: pod?,
        rules_in,
        total_ms,
        ipam_ms: ipam_ms.unwrap_or(f64::NAN),
    })
}

fn nan() -> f64 {
    f64::NAN
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted `v` (NaN when empty).
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The runs `run --out` appended to `input`.
fn outcomes(input: &Path) -> anyhow::Result<Vec<Outcome>> {
    let text = std::fs::read_to_string(input).with_context(|| input.display().to_string())?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", input.display())))
        .collect()
}

fn table(input: &Path) -> anyhow::Result<()> {
    println!(
        "| install | rate (pods/s) | achieved | created | Ready | p50 (ms) | p90 (ms) | p99 (ms) \
         | max (ms) | not Ready | most pending | rules in - Ready, max (ms) | Ready before rules \
         | agent ADD p50/p99 (ms) | of it IPAM p99 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in outcomes(input)? {
        let (rmax, first, add, ipam) = match &r.rules {
            Some(x) => (
                format!("{:.0}", x.max_ms),
                format!(
                    "{} of {} ({} unmatched)",
                    x.ready_first, x.matched, x.missing
                ),
                format!("{:.0}/{:.0}", x.add_p50_ms, x.add_p99_ms),
                format!("{:.0}", x.ipam_p99_ms),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.2} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {rmax} | {first} | {add} | {ipam} |",
            r.install,
            r.rate,
            r.achieved_rate,
            r.created,
            r.ready,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            r.never_ready,
            r.pending_max,
        );
    }
    Ok(())
}

fn plot(input: &Path, output: &Path) -> anyhow::Result<()> {
    let runs = outcomes(input)?;
    let mut installs: Vec<&str> = runs.iter().map(|r| r.install.as_str()).collect();
    installs.sort_unstable();
    installs.dedup();
    let mut series = Vec::new();
    for (i, inst) in installs.iter().enumerate() {
        for (q, dashed, f) in [
            (
                "p99",
                false,
                (|r: &Outcome| r.p99_ms) as fn(&Outcome) -> f64,
            ),
            ("p50", true, |r: &Outcome| r.p50_ms),
        ] {
            let mut points: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.install == *inst)
                .map(|r| (r.rate, f(r) / 1e3))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(svg::Series {
                name: format!("{inst} {q}"),
                points,
                dashed,
                color: i,
            });
        }
    }
    let c = svg::Chart {
        title: "Pod start-up (created to Ready) under churn, real kubelets".into(),
        x_label: "pods created (and deleted) per second".into(),
        y_label: "seconds".into(),
        log_x: false,
        series,
    };
    if let Some(d) = output.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(output, c.render()).with_context(|| output.display().to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_added_line_gives_the_pod_and_when_its_rules_were_in() {
        let l = "2026-12-07T23:25:26.500000Z  INFO margay_agent::cni: pod added \
                 handle=k8s-pod-network.abc.eth0 pod=default/churn-a-x host_if=cali1 \
                 addrs=[10.244.0.5/32] ipam_ms=0.1 wired_ms=3.0 rules_ms=2.0 total_ms=4.0";
        let a = parse_added(l).expect("parsed");
        assert_eq!(a.pod, "default/churn-a-x");
        assert_eq!(a.rules_in.to_string(), "2026-12-07T23:25:26.498Z");
        assert_eq!((a.total_ms, a.ipam_ms), (4.0, 0.1));
        assert!(parse_added("2026-12-07T23:25:26Z INFO pod deleted pod=x").is_none());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
