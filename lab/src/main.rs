//! `margay-lab`: a whole Margay cluster on one machine, the way `kind` shows
//! Kubernetes.
//!
//! `up` starts a background supervisor (`margay-lab supervise`) that builds
//! the lab from the test harness's parts: etcd + kube-apiserver, N node
//! namespaces on a fabric, an optional top-of-rack BGP router in the fabric
//! namespace. It writes `state.json` once everything is ready; `up` waits
//! for that and prints a summary. `down` signals the supervisor, whose
//! destructors tear everything down. The other commands read `state.json`.

mod state;
mod supervise;

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use state::State;

#[derive(Debug, Parser)]
#[command(name = "margay-lab", version, about = "Local multi-node Margay lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Encapsulation for pod traffic between nodes.
#[derive(Debug, Clone, Copy, ValueEnum, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// Native routing on the fabric.
    None,
    /// VXLAN overlay.
    Vxlan,
    /// IP-in-IP overlay (needs a kernel with IPIP).
    Ipip,
}

/// Top-of-rack router software.
#[derive(Debug, Clone, Copy, ValueEnum, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Tor {
    /// BIRD 2.
    Bird,
    /// FRR (bgpd + zebra).
    Frr,
    /// GoBGP.
    Gobgp,
    /// No router.
    None,
}

/// Options of `up`, passed on to the supervisor.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub nodes: u8,
    /// Encapsulation between nodes.
    #[arg(long, value_enum, default_value_t = Encap::None)]
    pub encap: Encap,
    /// Top-of-rack router peering eBGP with every node.
    #[arg(long, value_enum, default_value_t = Tor::Bird)]
    pub tor: Tor,
    /// Pods to start on each node.
    #[arg(long, default_value_t = 2)]
    pub pods_per_node: u16,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the lab in the background and return once it is ready.
    Up(UpArgs),
    /// Stop the lab and remove everything it made.
    Down,
    /// Show the lab's nodes and their state.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ping every node from every node (and the router); non-zero exit on any failure.
    Check,
    /// Run a command inside a node's namespace (or `tor` for the router).
    Exec {
        /// Node name (`node1`...) or `tor`.
        target: String,
        /// The command.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run kubectl against the lab's apiserver.
    Kubectl {
        /// Arguments for kubectl.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// (internal) The background supervisor `up` starts.
    #[command(hide = true)]
    Supervise(UpArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Up(a) => up(a),
        Cmd::Down => down(),
        Cmd::Status { json } => status(json),
        Cmd::Check => check(),
        Cmd::Exec { target, cmd } => exec(&target, &cmd),
        Cmd::Kubectl { args } => kubectl(&args),
        Cmd::Supervise(a) => supervise::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("margay-lab: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    if !margay_harness::is_root() {
        bail!("must run as root (it creates network namespaces)");
    }
    if let Some(s) = State::load_live()? {
        bail!(
            "a lab is already up (supervisor pid {}); run `margay-lab down` first",
            s.supervisor_pid
        );
    }
    State::clear();
    std::fs::create_dir_all(state::dir())?;
    let log = std::fs::File::create(state::log_path())?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("supervise")
        .arg(format!("--nodes={}", args.nodes))
        .arg(format!("--encap={}", value_name(args.encap)))
        .arg(format!("--tor={}", value_name(args.tor)))
        .arg(format!("--pods-per-node={}", args.pods_per_node))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting the lab supervisor")?;
    let start = Instant::now();
    eprintln!(
        "margay-lab: starting (log: {})",
        state::log_path().display()
    );
    loop {
        if let Some(s) = State::load()? {
            eprintln!("margay-lab: up in {:.1}s", start.elapsed().as_secs_f64());
            print_status(&s, false)?;
            let code = run_check(&s)?;
            eprintln!("margay-lab: running in the background; `margay-lab down` stops it");
            return Ok(code);
        }
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(state::log_path()).unwrap_or_default();
            bail!("the supervisor exited ({st}) before the lab was ready:\n{log}");
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "the lab was not ready after 300 s; see {}",
                state::log_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn value_name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

fn down() -> anyhow::Result<ExitCode> {
    let Some(s) = State::load()? else {
        eprintln!("margay-lab: no lab is up");
        return Ok(ExitCode::SUCCESS);
    };
    let pid = nix::unistd::Pid::from_raw(s.supervisor_pid as i32);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
        let start = Instant::now();
        while std::path::Path::new(&format!("/proc/{}", s.supervisor_pid)).exists() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("supervisor {} did not stop within 60 s", s.supervisor_pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Whatever a crashed supervisor left is swept by PID.
    margay_harness::names::sweep_stale();
    State::clear();
    eprintln!("margay-lab: down");
    Ok(ExitCode::SUCCESS)
}

fn need_live() -> anyhow::Result<State> {
    State::load_live()?.context("no lab is up; run `margay-lab up`")
}

fn status(json: bool) -> anyhow::Result<ExitCode> {
    let s = need_live()?;
    print_status(&s, json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &State, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "apiserver {}  kubeconfig {}  encap {}  tor {}",
        s.apiserver_url,
        s.kubeconfig,
        value_name(s.args.encap),
        value_name(s.args.tor)
    );
    println!(
        "{:<10} {:<22} {:<16} {:<16} ROUTES",
        "NODE", "NETNS", "ADDRESS", "BLOCK"
    );
    for n in &s.nodes {
        let routes = Command::new("ip")
            .args(["-n", &n.netns, "-4", "route", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
        println!(
            "{:<10} {:<22} {:<16} {:<16} {routes}",
            n.name, n.netns, n.v4, n.block
        );
    }
    Ok(())
}

fn run_check(s: &State) -> anyhow::Result<ExitCode> {
    // Every node's stand-in pod address, pinged from every node's pod
    // address: both directions follow the BGP-learned block routes. The
    // ToR column checks that the router routes back to every pod address.
    let mut targets: Vec<(String, String)> = s
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.pod_v4.clone()))
        .collect();
    // GoBGP keeps routes out of the kernel, so only BIRD and FRR can route
    // replies back to pod addresses.
    if matches!(s.args.tor, Tor::Bird | Tor::Frr) {
        targets.push(("tor".into(), s.tor_v4.clone()));
    }
    let mut failures = 0;
    print!("{:<10}", "from\\to");
    for (name, _) in &targets {
        print!(" {name:>7}");
    }
    println!();
    for n in &s.nodes {
        print!("{:<10}", n.name);
        for (_, addr) in &targets {
            let ok = Command::new("ip")
                .args([
                    "netns", "exec", &n.netns, "ping", "-c1", "-W1", "-q", "-I", &n.pod_v4, addr,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                failures += 1;
            }
            print!(" {:>7}", if ok { "ok" } else { "FAIL" });
        }
        println!();
    }
    if failures > 0 {
        eprintln!("margay-lab: {failures} unreachable pairs");
        Ok(ExitCode::from(1))
    } else {
        println!("all {} pairs reachable", s.nodes.len() * targets.len());
        Ok(ExitCode::SUCCESS)
    }
}

fn check() -> anyhow::Result<ExitCode> {
    run_check(&need_live()?)
}

fn exec(target: &str, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let s = need_live()?;
    let ns = if target == "tor" {
        s.fabric_netns.clone()
    } else {
        s.nodes
            .iter()
            .find(|n| n.name == target)
            .map(|n| n.netns.clone())
            .with_context(|| format!("no node named {target:?}"))?
    };
    let st = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(cmd)
        .status()?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

fn kubectl(args: &[String]) -> anyhow::Result<ExitCode> {
    let s = need_live()?;
    let st = Command::new(margay_harness::paths::kubectl()?)
        .env("KUBECONFIG", &s.kubeconfig)
        .args(args)
        .status()?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}
