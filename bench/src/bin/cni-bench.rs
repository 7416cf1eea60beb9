//! CNI benchmark: `margay` (agent + real kube-apiserver behind IPAM) next to
//! Debian's `ptp` + `host-local`, same machine, same run, both driven by
//! libcni (`cnitool`) in a node namespace exactly as a runtime would.
//!
//! - ADD and DEL latency (p50, p99) for N pods one after another;
//! - wall time for N concurrent ADDs (pods per second);
//! - the same for `cni-noop`, a plugin that does nothing: the runtime's own
//!   cost (libcni and process start-up), the floor under both plugins; the
//!   last row compares what each plugin adds above it.
//!
//! Pod namespaces are made before the clock starts; the fresh apiserver is
//! given time to settle; margay and ptp alternate for `--rounds` rounds and
//! each figure is the median. Output is a Markdown table for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use margay_api::ipam::IPAMConfigurationSpec;
use margay_harness::netns::Netns;
use margay_harness::topo::Fabric;
use margay_harness::{names, paths};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "margay vs ptp+host-local, CNI ADD/DEL")]
struct Cli {
    /// Pods per measurement.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// The agent's `--ipam-spares` (its default when not given).
    #[arg(long)]
    ipam_spares: Option<u16>,
    /// Rounds, margay and ptp alternating; each figure is the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds to let the fresh apiserver settle before measuring.
    #[arg(long, default_value_t = 10)]
    settle: u64,
    /// NetworkPolicies in the pods' namespace (each pod selected by
    /// about one in 50 of them), with a Pod object for every pod: what
    /// the agent's ADD costs when it waits for the pod's rules.
    #[arg(long, default_value_t = 0)]
    policies: usize,
    /// Write every sequential ADD's latency here, one file per plugin and
    /// round (`PLUGIN-ROUND.txt`: pod index, milliseconds), to see where
    /// the slow ones fall.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// After the rounds: this many ADDs one after another with the
    /// kube-apiserver frozen (SIGSTOP), once the agent holds that many
    /// spares, their latency beside margay's unfrozen row (0: skipped).
    #[arg(long, default_value_t = 0)]
    frozen: usize,
}

/// The namespace `bench` with a Pod for every pod the measurement makes
/// (`s0`.., `b0`..; labels app, tier) and `n` NetworkPolicies selecting
/// them by app, allowing ingress from a tier (and egress to 10/8 for one
/// in four).
async fn policies(client: &kube::Client, pods: usize, n: usize) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{Api, PostParams};
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": "bench", "labels": {"team": "team-0"}}}),
    )?;
    Api::<Namespace>::all(client.clone())
        .create(&pp, &ns)
        .await?;
    // No controller-manager here makes the namespace's ServiceAccount.
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), "bench")
        .create(&pp, &sa)
        .await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let names = (0..pods)
        .flat_map(|i| [(format!("s{i}"), i), (format!("b{i}"), i)])
        .chain([("warm".to_string(), 0)]);
    for (name, i) in names {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name,
                         "labels": {"app": format!("app-{}", i % 50), "tier": (["web", "api", "db"][i % 3])}},
            "spec": {"nodeName": "n1", "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "busybox"}]}
        }))?;
        api.create(&pp, &p).await?;
    }
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), "bench");
    for j in 0..n {
        let mut spec = json!({
            "podSelector": {"matchLabels": {"app": format!("app-{}", j % 50)}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", j % 10)}},
                                   "podSelector": {"matchLabels": {"tier": (["web", "api", "db"][j % 3])}}}],
                         "ports": [{"port": 80 + u16::try_from(j % 2).unwrap_or(0), "protocol": "TCP"}]}]
        });
        if j.is_multiple_of(4) {
            spec["egress"] =
                json!([{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]);
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
        }
        let p: NetworkPolicy =
            serde_json::from_value(json!({"metadata": {"name": format!("np-{j}")}, "spec": spec}))?;
        api.create(&pp, &p).await?;
    }
    Ok(())
}

fn cnitool(
    node: &Netns,
    cni_path: &str,
    cache: &Path,
    verb: &str,
    conf: &Path,
    id: &str,
    ns: &Netns,
) -> anyhow::Result<()> {
    let out = node
        .cmd(paths::cnitool()?)
        .args([verb, &conf.display().to_string(), id])
        .arg(ns.path())
        .env("CNI_PATH", cni_path)
        .env("CNI_CACHE_DIR", cache)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id}"),
        )
        .output()
        .context("cnitool")?;
    if !out.status.success() {
        bail!(
            "{verb} {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

struct Row {
    add_p50: f64,
    add_p99: f64,
    del_p50: f64,
    del_p99: f64,
    burst: Duration,
}

fn measure(
    node: &Netns,
    cni_path: &str,
    dir: &Path,
    conf: &Path,
    n: usize,
    samples: Option<PathBuf>,
) -> anyhow::Result<Row> {
    let cache = dir.join(format!(
        "cache-{}",
        conf.file_stem().unwrap_or_default().to_string_lossy()
    ));
    let pods: Vec<Netns> = (0..n)
        .map(|_| Netns::create("bp"))
        .collect::<Result<_, _>>()?;
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for (i, p) in pods.iter().enumerate() {
        let t = Instant::now();
        cnitool(node, cni_path, &cache, "add", conf, &format!("s{i}"), p)?;
        adds.push(t.elapsed());
    }
    if let Some(path) = samples {
        let text: String = adds
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{i} {:.2}\n", d.as_secs_f64() * 1e3))
            .collect();
        std::fs::write(path, text)?;
    }
    for (i, p) in pods.iter().enumerate() {
        let t = Instant::now();
        cnitool(node, cni_path, &cache, "del", conf, &format!("s{i}"), p)?;
        dels.push(t.elapsed());
    }
    let t = Instant::now();
    let cache_ref = &cache;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                s.spawn(move || {
                    cnitool(node, cni_path, cache_ref, "add", conf, &format!("b{i}"), p)
                })
            })
            .collect();
        for h in hs {
            h.join().expect("thread")?;
        }
        Ok(())
    })?;
    let burst = t.elapsed();
    for (i, p) in pods.iter().enumerate() {
        cnitool(node, cni_path, &cache, "del", conf, &format!("b{i}"), p)?;
    }
    Ok(Row {
        add_p50: pct(&mut adds, 0.5),
        add_p99: pct(&mut adds, 0.99),
        del_p50: pct(&mut dels, 0.5),
        del_p99: pct(&mut dels, 0.99),
        burst,
    })
}

fn median(rows: &[Row]) -> Row {
    let mid = |f: &dyn Fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Row {
        add_p50: mid(&|r| r.add_p50),
        add_p99: mid(&|r| r.add_p99),
        del_p50: mid(&|r| r.del_p50),
        del_p99: mid(&|r| r.del_p99),
        burst: Duration::from_secs_f64(mid(&|r| r.burst.as_secs_f64())),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let n = cli.pods;
    let (api, client) = margay_tests::cluster(
        &["n1"],
        "10.244.0.0/16",
        26,
        IPAMConfigurationSpec::default(),
    )
    .await;
    if cli.policies > 0 {
        policies(&client, n, cli.policies).await?;
    }
    let fabric = Fabric::new()?;
    let node = fabric.add_node("n1")?;
    let dir = names::temp_dir("cni-bench")?;
    let socket = dir.path().join("agent.sock");
    let _relay = api.expose_in(&node.ns)?;
    let mut cmd = margay_tests::agent_cmd(&node, "n1", &api, &socket)?;
    cmd.args(
        cli.ipam_spares
            .map(|n| vec!["--ipam-spares".to_string(), n.to_string()])
            .unwrap_or_default(),
    )
    .env(
        "MARGAY_LOG",
        std::env::var("MARGAY_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let _agent = margay_tests::start_agent(cmd, &socket, &dir.path().join("agent.log"))?;
    let margay_dir: PathBuf = paths::workspace_bin("margay")?
        .parent()
        .unwrap()
        .to_path_buf();
    let cni_path = format!(
        "{}:{}",
        margay_dir.display(),
        paths::cni_plugin_dir().display()
    );
    let margay_conf = dir.path().join("margay.conflist");
    std::fs::write(&margay_conf, json!({"cniVersion": "1.0.0", "name": "margay", "plugins": [{"type": "margay", "socket": socket}]}).to_string())?;
    let noop_conf = dir.path().join("noop.conflist");
    std::fs::write(
        &noop_conf,
        json!({"cniVersion": "1.0.0", "name": "noop", "plugins": [{"type": "cni-noop"}]})
            .to_string(),
    )?;
    let ptp_conf = dir.path().join("ptp.conflist");
    std::fs::write(&ptp_conf, json!({"cniVersion": "1.0.0", "name": "ptp", "plugins": [{"type": "ptp", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/16"}]], "dataDir": dir.path().join("host-local")}}]}).to_string())?;
    // Warm both (first block claim, page cache).
    let warm = Netns::create("bw")?;
    for conf in [&margay_conf, &ptp_conf] {
        cnitool(
            &node.ns,
            &cni_path,
            &dir.path().join("warm"),
            "add",
            conf,
            "warm",
            &warm,
        )?;
        cnitool(
            &node.ns,
            &cni_path,
            &dir.path().join("warm"),
            "del",
            conf,
            "warm",
            &warm,
        )?;
    }
    // A fresh kube-apiserver runs its start-up work for several seconds;
    // measuring during it would charge margay for it.
    tokio::time::sleep(Duration::from_secs(cli.settle)).await;
    let (mut ms, mut ps, mut fs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cli.rounds.max(1) {
        let out = |plugin: &str| {
            cli.samples
                .as_ref()
                .map(|d| d.join(format!("{plugin}-{}.txt", ms.len())))
        };
        let (m, p, f) = (out("margay"), out("ptp"), out("noop"));
        ms.push(measure(
            &node.ns,
            &cni_path,
            dir.path(),
            &margay_conf,
            n,
            m,
        )?);
        ps.push(measure(&node.ns, &cni_path, dir.path(), &ptp_conf, n, p)?);
        fs.push(measure(&node.ns, &cni_path, dir.path(), &noop_conf, n, f)?);
    }
    let (m, p, f) = (median(&ms), median(&ps), median(&fs));
    let frozen = if cli.frozen > 0 {
        Some(
            frozen_adds(
                &api,
                &client,
                &node.ns,
                &cni_path,
                dir.path(),
                &margay_conf,
                cli.frozen,
            )
            .await?,
        )
    } else {
        None
    };
    if let Ok(to) = std::env::var("CNI_BENCH_AGENT_LOG") {
        std::fs::copy(dir.path().join("agent.log"), to)?;
    }
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "| plugin ({n} pods) | ADD p50 (ms) | ADD p99 (ms) | DEL p50 (ms) | DEL p99 (ms) | {n} concurrent ADDs (s) | pods/s in the burst |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in [
        ("margay (agent, kube-apiserver IPAM)", &m),
        ("ptp + host-local", &p),
        ("floor: cni-noop (the runtime alone)", &f),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
            r.add_p50,
            r.add_p99,
            r.del_p50,
            r.del_p99,
            r.burst.as_secs_f64(),
            rate(r.burst)
        );
    }
    println!(
        "| margay / ptp | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        m.add_p50 / p.add_p50,
        m.add_p99 / p.add_p99,
        m.del_p50 / p.del_p50,
        m.del_p99 / p.del_p99,
        m.burst.as_secs_f64() / p.burst.as_secs_f64(),
        rate(m.burst) / rate(p.burst)
    );
    let above = |a: f64, b: f64, fl: f64| (a - fl) / (b - fl);
    let (mb, pb, fb) = (
        m.burst.as_secs_f64(),
        p.burst.as_secs_f64(),
        f.burst.as_secs_f64(),
    );
    println!(
        "| margay / ptp, above the floor | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        above(m.add_p50, p.add_p50, f.add_p50),
        above(m.add_p99, p.add_p99, f.add_p99),
        above(m.del_p50, p.del_p50, f.del_p50),
        above(m.del_p99, p.del_p99, f.del_p99),
        above(mb, pb, fb),
        (pb - fb) / (mb - fb)
    );
    if let Some((p50, p99)) = frozen {
        println!();
        println!(
            "| margay, {} ADDs with the kube-apiserver frozen | ADD p50 (ms) | ADD p99 (ms) |",
            cli.frozen
        );
        println!("|---|---|---|");
        println!("| frozen | {p50:.1} | {p99:.1} |");
        println!(
            "| unfrozen (the rounds above) | {:.1} | {:.1} |",
            m.add_p50, m.add_p99
        );
        println!(
            "| frozen / unfrozen | {:.2} | {:.2} |",
            p50 / m.add_p50,
            p99 / m.add_p99
        );
    }
    Ok(())
}

/// `k` ADDs one after another with the apiserver frozen, once the agent
/// holds `k` spares (the rounds' bursts raised them); thawed and the pods
/// deleted after. Their latency p50 and p99 (ms).
async fn frozen_adds(
    api: &margay_harness::kube::ApiServer,
    client: &kube::Client,
    node: &Netns,
    cni_path: &str,
    dir: &Path,
    conf: &Path,
    k: usize,
) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    loop {
        let spares = margay_tests::allocations(client)
            .await
            .into_iter()
            .filter(|(_, a)| a.handle.starts_with("spare.n1."))
            .count();
        if spares >= k {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the agent holds {spares} spares, not {k}: lower --frozen");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cache = dir.join("cache-frozen");
    let pods: Vec<Netns> = (0..k)
        .map(|_| Netns::create("bf"))
        .collect::<Result<_, _>>()?;
    api.freeze(true)?;
    let mut adds = Vec::new();
    let mut failed = None;
    for (i, p) in pods.iter().enumerate() {
        let t = Instant::now();
        if let Err(e) = cnitool(node, cni_path, &cache, "add", conf, &format!("f{i}"), p) {
            failed = Some(e);
            break;
        }
        adds.push(t.elapsed());
    }
    api.freeze(false)?;
    if let Some(e) = failed {
        return Err(e.context("an ADD with the apiserver frozen"));
    }
    for (i, p) in pods.iter().enumerate() {
        cnitool(node, cni_path, &cache, "del", conf, &format!("f{i}"), p)?;
    }
    Ok((pct(&mut adds, 0.5), pct(&mut adds, 0.99)))
}
