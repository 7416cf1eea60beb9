//! BGP benchmarks, Margay next to BIRD 2 and FRR in the same run.
//!
//! - `feed`: a BIRD feeder announces N /32s (default 100,000) over eBGP;
//!   for each receiver, the time from the first to the last route in its
//!   kernel table (and from feeder start), and the receiver's peak RSS.
//! - `mesh`: N speakers (default 50) in an iBGP full mesh, each originating
//!   one /26; time from start until every kernel holds all N-1 others.
//!
//! Kernel routes are counted from `/proc/PID/net/fib_triestat` (cheap at
//! 100k routes). Each figure is the median of `--runs` runs. Output is a
//! Markdown table ready for BENCHMARKS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use margay_harness::bgpd::{Bird, Frr};
use margay_harness::{Daemon, Fabric, Node, names};

#[derive(Debug, Parser)]
#[command(about = "Margay BGP benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A BIRD feeder announces N prefixes to each receiver in turn.
    Feed {
        /// /32s announced, from 100.64.0.0 (at most 4,194,304: the /10).
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=1 << 22))]
        prefixes: u32,
    },
    /// A full mesh of N speakers, Margay vs BIRD.
    Mesh {
        /// Speakers (at most 249: one fabric's addresses).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=i64::from(margay_harness::topo::MAX_NODES)))]
        speakers: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Margay,
    Bird,
    Frr,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Margay => "margay-bgp",
            Kind::Bird => "BIRD 2",
            Kind::Frr => "FRR (bgpd+zebra)",
        }
    }
}

fn margay_bin() -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name("margay-bgp");
    if !p.exists() {
        bail!(
            "{} missing: cargo build --release -p margay-bgp",
            p.display()
        );
    }
    Ok(p)
}

/// IPv4 prefixes in the main table of the namespace `pid` lives in.
fn kernel_prefixes(pid: u32) -> usize {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/fib_triestat")).unwrap_or_default();
    let mut in_main = false;
    for l in text.lines() {
        if l.starts_with("Main:") {
            in_main = true;
        } else if in_main && let Some(v) = l.trim().strip_prefix("Prefixes:") {
            return v.trim().parse().unwrap_or(0);
        }
    }
    0
}

/// Peak RSS (VmHWM) of a process in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A receiver under test: its processes (kept alive by `_hold`).
struct Speaker {
    pids: Vec<u32>,
    _hold: Box<dyn std::any::Any>,
}

fn start_margay(node: &Node, conf: &str, dir: &std::path::Path) -> anyhow::Result<Speaker> {
    let path = dir.join(format!("margay-{}.toml", node.index));
    std::fs::write(
        &path,
        format!(
            "control_socket = \"{}\"\n{conf}",
            dir.join(format!("m{}.sock", node.index)).display()
        ),
    )?;
    let mut cmd = node.ns.cmd(margay_bin()?);
    cmd.arg("--config").arg(&path).env("RUST_LOG", "warn");
    let d = Daemon::spawn(
        "margay-bgp",
        cmd,
        &dir.join(format!("margay-{}.log", node.index)),
    )?;
    Ok(Speaker {
        pids: vec![d.pid()],
        _hold: Box::new(d),
    })
}

fn start_receiver(kind: Kind, node: &Node, dir: &std::path::Path) -> anyhow::Result<Speaker> {
    match kind {
        Kind::Margay => start_margay(
            node,
            "asn = 64512\nrouter_id = \"10.99.0.1\"\nimport_prefixes = []\n[[neighbor]]\naddress = \"10.99.0.2\"\nasn = 64513\nhold_time = 90\n",
            dir,
        ),
        Kind::Bird => {
            let mut b = Bird::start(
                &node.ns,
                "router id 10.99.0.1;\nprotocol device {}\nprotocol kernel { ipv4 { import none; export all; }; }\n\
                 protocol bgp feed { local 10.99.0.1 as 64512; neighbor 10.99.0.2 as 64513; direct;\n\
                 ipv4 { import all; export none; }; }\n",
            )?;
            let pid = b.daemon().pid();
            Ok(Speaker {
                pids: vec![pid],
                _hold: Box::new(b),
            })
        }
        Kind::Frr => {
            let mut f = Frr::start(
                &node.ns,
                "frr defaults traditional\nhostname rx\nrouter bgp 64512\n bgp router-id 10.99.0.1\n no bgp ebgp-requires-policy\n neighbor 10.99.0.2 remote-as 64513\n!\n",
                true,
            )?;
            let bgpd = f.bgpd().pid();
            // zebra shares the namespace; count it too (it holds the routes).
            let mut pids = vec![bgpd];
            pids.extend(node.ns.pids().into_iter().filter(|&p| p != bgpd));
            Ok(Speaker {
                pids,
                _hold: Box::new(f),
            })
        }
    }
}

fn feeder_conf(n: u32) -> String {
    let mut c = String::with_capacity(n as usize * 40);
    c.push_str("router id 10.99.0.2;\nprotocol device {}\nprotocol static feed { ipv4;\n");
    for i in 0..n {
        let a = 0x6440_0000u32 + i; // 100.64.0.0/10
        c.push_str(&format!(
            "route {}.{}.{}.{}/32 blackhole;\n",
            a >> 24,
            (a >> 16) & 255,
            (a >> 8) & 255,
            a & 255
        ));
    }
    c.push_str("}\nprotocol bgp receiver { local 10.99.0.2 as 64513; neighbor 10.99.0.1 as 64512; direct;\n ipv4 { import none; export all; }; }\n");
    c
}

struct FeedResult {
    from_first: f64,
    from_start: f64,
    rss_kib: u64,
}

fn feed_once(kind: Kind, n: u32, feeder: &str) -> anyhow::Result<FeedResult> {
    let fabric = Fabric::new()?;
    let rx = fabric.add_node("rx")?;
    let tx = fabric.add_node("tx")?;
    let dir = names::temp_dir("bench")?;
    let r = start_receiver(kind, &rx, dir.path())?;
    let probe = r.pids[0];
    std::thread::sleep(Duration::from_millis(300));
    let base = kernel_prefixes(probe);
    let start = Instant::now();
    let bird = Bird::start(&tx.ns, feeder)?;
    let mut first = None;
    let mut poked = Instant::now();
    loop {
        let have = kernel_prefixes(probe).saturating_sub(base);
        if have > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if have >= n as usize {
            break;
        }
        if poked.elapsed() > Duration::from_millis(200) {
            // BIRD as a feeder can stall until its control socket is poked;
            // poking it regularly treats every receiver the same.
            let _ = bird.birdc("show status");
            poked = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(300)
            || (first.is_none() && start.elapsed() > Duration::from_secs(30))
        {
            bail!(
                "{}: only {have} of {n} routes after {:.0} s (logs in {})",
                kind.name(),
                start.elapsed().as_secs_f64(),
                dir.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let end = Instant::now();
    let rss_kib = r.pids.iter().map(|&p| peak_rss_kib(p)).sum();
    Ok(FeedResult {
        from_first: (end - first.context("no first route")?).as_secs_f64(),
        from_start: (end - start).as_secs_f64(),
        rss_kib,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn feed(n: u32, runs: usize) -> anyhow::Result<()> {
    let feeder = feeder_conf(n);
    let mut rows = Vec::new();
    for kind in [Kind::Margay, Kind::Bird, Kind::Frr] {
        let mut first = Vec::new();
        let mut start = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            let r = feed_once(kind, n, &feeder)?;
            eprintln!(
                "{}: {:.3}s from first route, {:.3}s from start, {} KiB",
                kind.name(),
                r.from_first,
                r.from_start,
                r.rss_kib
            );
            first.push(r.from_first);
            start.push(r.from_start);
            rss.push(r.rss_kib as f64);
        }
        rows.push((kind, median(first), median(start), median(rss)));
    }
    let (_, mf, _, mr) = rows[0];
    println!(
        "| receiver ({n} /32s from a BIRD feeder) | first→last route in kernel (s) | feeder start→last (s) | peak RSS (MiB) | time vs margay | RSS vs margay |"
    );
    println!("|---|---|---|---|---|---|");
    for (kind, f, s, r) in rows {
        println!(
            "| {} | {f:.3} | {s:.3} | {:.1} | {:.2}x | {:.2}x |",
            kind.name(),
            r / 1024.0,
            f / mf,
            r / mr
        );
    }
    Ok(())
}

/// The /26 speaker `index` (1-based, a fabric index) originates in the
/// mesh: `10.244.<index>.0/26`.
fn mesh_block(index: u32) -> anyhow::Result<String> {
    let octet = u8::try_from(index)
        .ok()
        .filter(|o| *o > 0)
        .with_context(|| format!("speaker {index}: blocks are 10.244.1.0/26 to 10.244.255.0/26"))?;
    Ok(format!("10.244.{octet}.0/26"))
}

fn mesh_once(kind: Kind, n: u32) -> anyhow::Result<(f64, u64)> {
    let fabric = Fabric::new()?;
    let nodes: Vec<Node> = (0..n)
        .map(|i| fabric.add_node(&format!("s{i}")))
        .collect::<Result<_, _>>()?;
    let dir = names::temp_dir("mesh")?;
    let start = Instant::now();
    let mut speakers = Vec::new();
    for node in &nodes {
        let i = node.index;
        let block = mesh_block(i)?;
        let others = nodes.iter().filter(|m| m.index != i);
        let sp = match kind {
            Kind::Margay => {
                let mut c = format!(
                    "asn = 64512\nrouter_id = \"{}\"\n[[originate]]\nprefix = \"{block}\"\n",
                    node.v4
                );
                for m in others {
                    c.push_str(&format!(
                        "[[neighbor]]\naddress = \"{}\"\nasn = 64512\npassive = {}\n",
                        m.v4,
                        i < m.index
                    ));
                }
                start_margay(node, &c, dir.path())?
            }
            _ => {
                let mut c = format!(
                    "router id {};\nprotocol device {{}}\nprotocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n\
                     protocol static own {{ ipv4; route {block} blackhole; }}\n\
                     template bgp mesh {{ local as 64512; direct; connect delay time 1; connect retry time 2; error wait time 1, 4;\n\
                     ipv4 {{ import all; export where proto = \"own\"; next hop self; }}; }}\n",
                    node.v4
                );
                for m in others {
                    c.push_str(&format!(
                        "protocol bgp p{} from mesh {{ neighbor {} as 64512; {} }}\n",
                        m.index,
                        m.v4,
                        if i < m.index { "passive on;" } else { "" }
                    ));
                }
                let mut b = Bird::start(&node.ns, &c)?;
                let pid = b.daemon().pid();
                Speaker {
                    pids: vec![pid],
                    _hold: Box::new(b),
                }
            }
        };
        speakers.push(sp);
    }
    let want = nodes.len() - 1;
    loop {
        // Every node holds a route to each other node's block.
        let done = nodes.iter().all(|node| {
            let routes = node
                .ns
                .ip(&["-4", "route", "show", "root", "10.244.0.0/16"])
                .unwrap_or_default();
            routes
                .lines()
                .filter(|l| !l.starts_with("blackhole"))
                .count()
                >= want
        });
        if done {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("{}: mesh not converged after 600 s", kind.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    let rss: u64 = speakers
        .iter()
        .flat_map(|s| s.pids.iter())
        .map(|&p| peak_rss_kib(p))
        .sum();
    Ok((secs, rss / u64::from(n)))
}

fn mesh(n: u32, runs: usize) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for kind in [Kind::Margay, Kind::Bird] {
        let mut t = Vec::new();
        let mut r = Vec::new();
        for _ in 0..runs {
            let (secs, rss) = mesh_once(kind, n)?;
            eprintln!(
                "{}: mesh of {n} converged in {secs:.2}s, {rss} KiB per speaker",
                kind.name()
            );
            t.push(secs);
            r.push(rss as f64);
        }
        rows.push((kind, median(t), median(r)));
    }
    let (_, mt, mr) = rows[0];
    println!(
        "| speaker (full mesh of {n}, one /26 each) | start→all routes in every kernel (s) | peak RSS per speaker (MiB) | time vs margay | RSS vs margay |"
    );
    println!("|---|---|---|---|---|");
    for (kind, t, r) in rows {
        println!(
            "| {} | {t:.2} | {:.1} | {:.2}x | {:.2}x |",
            kind.name(),
            r / 1024.0,
            t / mt,
            r / mr
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Feed { prefixes } => feed(prefixes, cli.runs.max(1)),
        Cmd::Mesh { speakers } => mesh(speakers, cli.runs.max(1)),
    }
}
