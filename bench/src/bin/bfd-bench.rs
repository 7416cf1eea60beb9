//! A router of a two-router rack dies (issue 28): how long a node's
//! traffic through it is lost, with BFD and without, side by side.
//!
//! In namespaces the bench makes: a node running this build's
//! `margay-bgp` (10.99.0.1, AS 64512, routes into its kernel) and two BIRD
//! routers (10.99.0.2 and .3, AS 65000) on one segment, both holding
//! 10.200.0.1 and announcing 10.200.0.0/24, so the node has an ECMP route
//! with one next hop per router. A ping every 20 ms from the node to
//! 10.200.0.1 flows through one of them (`ip route get` says which);
//! that router's link is cut (it sends nothing more: no FIN, no
//! NOTIFICATION). The gap is the longest time without a reply, until
//! the node withdraws the dead router's path and the flow moves to the
//! other: with BFD (margay and BIRD at `--bfd-ms` × 3) and without (the
//! BGP hold time, `--hold`), alternating, `--rounds` times each.
//!
//! Usage (as root, after `cargo build --release -p margay-bgp -p
//! margay-bench`): `bfd-bench [--rounds 3] [--hold 90] [--bfd-ms 300]`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use margay_harness::bgpd::Bird;
use margay_harness::{Daemon, Fabric, Node, names};
use margay_tests::Pinger;

#[derive(Debug, Parser)]
#[command(about = "A router of a two-router rack dies: traffic lost with BFD and without")]
struct Cli {
    /// Measurements per mode.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// BGP hold time (seconds) on both sides: what finds the dead router
    /// without BFD (90: the default of margay and of most routers).
    #[arg(long, default_value_t = 90)]
    hold: u16,
    /// BFD interval (ms), both directions, multiplier 3.
    #[arg(long, default_value_t = 300)]
    bfd_ms: u32,
}

const ANYCAST: &str = "10.200.0.1";
const PREFIX: &str = "10.200.0.0/24";

/// One measurement.
struct Round {
    bfd: bool,
    /// The longest time between two replies: the gap in traffic (a count
    /// of pings lost would understate it: ping sends less often while
    /// the dead router's neighbor entry fails).
    gap: Duration,
    /// Longest run of pings lost in a row, as time.
    outage: Duration,
    /// From the cut to the node's route down to one next hop.
    withdrawn: Duration,
}

fn margay_conf(sock: &Path, hold: u16, bfd: Option<u32>) -> String {
    let bfd = bfd
        .map(|ms| format!("[neighbor.bfd]\nmin_tx_ms = {ms}\nmin_rx_ms = {ms}\n"))
        .unwrap_or_default();
    let mut c = format!(
        "control_socket = \"{}\"\nasn = 64512\nrouter_id = \"10.99.0.1\"\n",
        sock.display()
    );
    for r in ["10.99.0.2", "10.99.0.3"] {
        c.push_str(&format!(
            "[[neighbor]]\naddress = \"{r}\"\nasn = 65000\nhold_time = {hold}\n{bfd}"
        ));
    }
    c
}

fn bird_conf(me: &str, hold: u16, bfd: Option<u32>) -> String {
    let (proto, on) = match bfd {
        Some(ms) => (
            format!(
                "protocol bfd {{ interface \"*\" {{ min rx interval {ms} ms; min tx interval {ms} ms; multiplier 3; }}; }}\n"
            ),
            "bfd on;",
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"router id {me};
protocol device {{}}
protocol static anycast {{ ipv4; route {PREFIX} blackhole; }}
{proto}protocol bgp node {{
  local {me} as 65000; neighbor 10.99.0.1 as 64512; direct;
  hold time {hold}; {on}
  ipv4 {{ import none; export where proto = "anycast"; }};
}}
"#
    )
}

fn route(node: &Node) -> String {
    node.ns.ip(&["route", "show", PREFIX]).unwrap_or_default()
}

fn until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !ok() {
        if t.elapsed() > limit {
            bail!("{what}: not after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn round(bin: &Path, cli: &Cli, bfd: bool) -> anyhow::Result<Round> {
    let fabric = Fabric::new()?;
    let node = fabric.add_node("bfdn")?;
    let routers = [fabric.add_node("bfdr")?, fabric.add_node("bfdr")?];
    let bfd_ms = bfd.then_some(cli.bfd_ms);
    let mut birds = Vec::new();
    for r in &routers {
        r.ns.ip(&["addr", "add", &format!("{ANYCAST}/32"), "dev", "lo"])?;
        r.ns.ip(&["link", "set", "lo", "up"])?;
        birds.push(Bird::start(
            &r.ns,
            &bird_conf(&r.v4.to_string(), cli.hold, bfd_ms),
        )?);
    }
    let dir = names::temp_dir("bfdb")?;
    let sock = dir.path().join("ctl.sock");
    let conf = dir.path().join("bgp.toml");
    std::fs::write(&conf, margay_conf(&sock, cli.hold, bfd_ms))?;
    let mut cmd = node.ns.cmd(bin);
    cmd.arg("--config").arg(&conf);
    let _margay = Daemon::spawn("margay-bgp", cmd, &dir.path().join("log"))?;
    until(
        "an ECMP route through both routers",
        Duration::from_secs(60),
        || {
            let r = route(&node);
            r.contains("nexthop via 10.99.0.2") && r.contains("nexthop via 10.99.0.3")
        },
    )?;
    if bfd {
        for b in &birds {
            until("BFD Up at BIRD", Duration::from_secs(30), || {
                b.birdc("show bfd sessions").is_ok_and(|o| {
                    o.lines()
                        .any(|l| l.contains("10.99.0.1") && l.contains(" Up "))
                })
            })?;
        }
    }
    let via = node.ns.ip(&["route", "get", ANYCAST])?;
    let dead = routers
        .iter()
        .find(|r| via.contains(&format!("via {} ", r.v4)))
        .with_context(|| format!("which router carries the flow: {via}"))?;
    let pinger = Pinger::start(node.ns.name(), ANYCAST, format!("node -> {ANYCAST}"));
    std::thread::sleep(Duration::from_secs(1));
    dead.ns.ip(&["link", "set", "eth0", "down"])?;
    let cut = Instant::now();
    let limit = Duration::from_secs(u64::from(cli.hold) + 30);
    until("the dead router's path withdrawn", limit, || {
        !route(&node).contains(&format!("via {}", dead.v4))
    })?;
    let withdrawn = cut.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let report = pinger.stop();
    Ok(Round {
        bfd,
        gap: report.silence,
        outage: report.outage,
        withdrawn,
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin: PathBuf = margay_harness::paths::workspace_bin("margay-bgp")
        .context("margay-bgp missing: cargo build --release -p margay-bgp")?;
    let mut rounds = Vec::new();
    for i in 0..cli.rounds {
        for bfd in [true, false] {
            let r = round(&bin, &cli, bfd).with_context(|| format!("round {i}, BFD {bfd}"))?;
            eprintln!(
                "round {i} BFD {}: no reply for {:.2} s ({:.2} s of pings lost in a row), path withdrawn after {:.2} s",
                if bfd { "on " } else { "off" },
                r.gap.as_secs_f64(),
                r.outage.as_secs_f64(),
                r.withdrawn.as_secs_f64()
            );
            rounds.push(r);
        }
    }
    println!("| BFD | traffic gap (s), each round | median | path withdrawn after (s), median |");
    println!("|---|---|---|---|");
    for bfd in [true, false] {
        let mine: Vec<&Round> = rounds.iter().filter(|r| r.bfd == bfd).collect();
        let mut out: Vec<f64> = mine.iter().map(|r| r.gap.as_secs_f64()).collect();
        let each = out
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        out.sort_by(f64::total_cmp);
        let mut wd: Vec<f64> = mine.iter().map(|r| r.withdrawn.as_secs_f64()).collect();
        wd.sort_by(f64::total_cmp);
        let label = if bfd {
            format!("on, {} ms × 3", cli.bfd_ms)
        } else {
            format!("off (hold time {} s)", cli.hold)
        };
        println!(
            "| {label} | {each} | {:.2} | {:.2} |",
            out[out.len() / 2],
            wd[wd.len() / 2]
        );
    }
    Ok(())
}
