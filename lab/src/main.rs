//! `margay-lab`: a whole Margay cluster on one machine, the way `kind` shows
//! Kubernetes.
//!
//! `up` starts a background supervisor (`margay-lab supervise`) that builds
//! the lab ([`margay_lab::cluster::Cluster`]: etcd + kube-apiserver, N node
//! namespaces on a fabric each running a real `margay-agent`, an optional
//! top-of-rack router, K pods per node through the real `margay` CNI
//! plugin). It writes `state.json` once every route is in place and every
//! pod reaches every other; `up` waits for that and prints the status and
//! the connectivity matrix. `pod add|del` and `check` go through the
//! supervisor's control socket; `down` signals it, and its destructors tear
//! everything down. The other commands read `state.json`.

mod control;
mod state;
mod supervise;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use margay_lab::{Encap, Install, Tor, value_name};

use control::{Answer, PodAdd, Reply, Request};
use state::State;

#[derive(Debug, Parser)]
#[command(name = "margay-lab", version, about = "Local multi-node Margay lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options of `up`, passed on to the supervisor.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct UpArgs {
    /// Number of nodes (at most 249: each is an address 10.99.S.N/24 on
    /// the lab's fabric; Node objects without a namespace behind them, as
    /// many as the API takes, are what bench/scale makes).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=i64::from(margay_harness::topo::MAX_NODES)))]
    pub nodes: u32,
    /// Encapsulation between nodes.
    #[arg(long, value_enum, default_value_t = Encap::None)]
    pub encap: Encap,
    /// Top-of-rack router peering eBGP with every node.
    #[arg(long, value_enum, default_value_t = Tor::Bird)]
    pub tor: Tor,
    /// Pods to start on each node.
    #[arg(long, default_value_t = 2)]
    pub pods_per_node: u32,
    /// Make the first N nodes route reflectors and turn the full mesh off.
    #[arg(long, default_value_t = 0)]
    pub route_reflectors: u32,
    /// Spread the nodes over this many IPv4 subnets (10.99.S.0/24, round
    /// robin), joined by the router: what the CrossSubnet encapsulations
    /// are for.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    #[serde(default = "one")]
    pub subnets: u32,
    /// Real Kubernetes nodes: a kubelet and containerd per node, Margay
    /// installed from its image as a user would, pods as Pods.
    #[arg(long)]
    #[serde(default)]
    pub kubernetes: bool,
    /// How --kubernetes installs Margay.
    #[arg(long, value_enum, default_value_t = Install::Manifest)]
    #[serde(default = "manifest")]
    pub install: Install,
}

fn manifest() -> Install {
    Install::Manifest
}

fn one() -> u32 {
    1
}

#[derive(Debug, Subcommand)]
enum PodCmd {
    /// Start a pod on a node (through the real CNI plugin).
    Add {
        /// Node name (`node1`...).
        node: String,
        /// Pod name.
        name: String,
        /// Its Kubernetes namespace (created if new).
        #[arg(long)]
        namespace: Option<String>,
        /// Its labels: k=v,k2=v2.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Listeners that accept and answer: tcp:80,tcp:81,udp:80 (also
        /// its named container ports serve-80-tcp, ...).
        #[arg(long, value_delimiter = ',')]
        serve: Vec<margay_harness::netcheck::Listen>,
    },
    /// Delete a pod (CNI DEL, namespace and Pod object).
    Del {
        /// Pod name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the lab in the background and return once it is ready.
    Up(UpArgs),
    /// Stop the lab and remove everything it made.
    Down,
    /// Show the lab's nodes, pods and routes.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Routes match the blocks and every pod reaches every pod and its
    /// node; non-zero exit on any failure.
    Check,
    /// Add or delete a pod.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
    /// Run a command inside a node's or a pod's namespace (or `tor` for the
    /// router). On a node, `KUBECONFIG` is the lab's and `margayctl` is on
    /// the `PATH`: `margay-lab exec node1 -- margayctl ipam show`.
    Exec {
        /// Node name (`node1`...), pod name, or `tor`.
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
    /// Builds the images (Margay's from this build's binaries, the lab
    /// pod's, the sandbox's) as OCI archives; with a `--kubernetes` lab
    /// up, imports them into every node's containerd.
    Image {
        /// Where to write the archives.
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
        /// Margay's image name.
        #[arg(long, default_value = margay_lab::image::MARGAY_IMAGE)]
        tag: String,
    },
    /// (internal) Runs apiservers for a VM on this host (`scripts/in-vm.sh`
    /// starts it): writes its port to PORT_FILE, serves until killed.
    #[command(hide = true)]
    ApiserverBroker {
        /// Where to write the port it listens on (on 127.0.0.1).
        #[arg(long)]
        port_file: std::path::PathBuf,
    },
    /// Whether pod FROM reaches pod TO (a pod name, or an address) on
    /// PORT[/tcp|udp]: a TCP connection accepted or a UDP reply within 1 s.
    /// Exit 0 if so, 1 if not.
    Probe {
        /// The pod probing.
        from: String,
        /// The pod (or address) probed.
        to: String,
        /// PORT[/tcp|udp] (TCP if no protocol).
        port: String,
    },
    /// (internal) Listeners and probes run inside pods.
    #[command(hide = true, subcommand)]
    Netcheck(NetcheckCmd),
}

#[derive(Debug, Subcommand)]
enum NetcheckCmd {
    /// Serves tcp:PORT / udp:PORT listeners until killed.
    Serve {
        /// Listeners, comma separated: tcp:80,udp:80.
        #[arg(value_delimiter = ',', required = true)]
        listen: Vec<margay_harness::netcheck::Listen>,
    },
    /// Probes every IP:PORT[/tcp|udp] at once; prints `TARGET OUTCOME`
    /// per target (ok, refused: nothing listens; timeout: dropped or
    /// nobody there; unreachable), or `TARGET error: WHY` when it could not
    /// be sent. Exit 0 if all were ok, 2 if one could not be sent, else 1.
    Probe {
        /// Milliseconds to wait for each.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// UDP only: send from this address (one of this namespace's; add
        /// another pod's to an interface to forge its source).
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        /// UDP only: the datagram's text (default `margay-probe`).
        #[arg(long)]
        payload: Option<String>,
        /// Targets.
        #[arg(required = true)]
        targets: Vec<margay_harness::netcheck::Target>,
    },
    /// Receives UDP datagrams on PORT (both families) for a while: prints
    /// `listening udp:PORT` once bound, then `SOURCE PAYLOAD` per datagram
    /// (payload escaped), then exits.
    Recv {
        /// udp:PORT.
        listen: margay_harness::netcheck::Listen,
        /// How long to receive, in milliseconds from the bind.
        #[arg(long, default_value_t = 1000)]
        for_ms: u64,
    },
}

fn netcheck(cmd: NetcheckCmd) -> anyhow::Result<ExitCode> {
    use margay_harness::netcheck::{self, Outcome, Transport};
    match cmd {
        NetcheckCmd::Serve { listen } => {
            netcheck::serve(&listen)?;
            Ok(ExitCode::SUCCESS)
        }
        NetcheckCmd::Probe {
            timeout_ms,
            from,
            payload,
            targets,
        } => {
            let mut o = netcheck::ProbeOpts {
                timeout: Duration::from_millis(timeout_ms),
                from,
                ..Default::default()
            };
            if let Some(p) = payload {
                o.payload = p.into_bytes();
            }
            let got = netcheck::probe(&targets, &o);
            let mut code = 0;
            for (t, r) in targets.iter().zip(&got) {
                match r {
                    Ok(out) => {
                        println!("{t} {out}");
                        if *out != Outcome::Ok {
                            code = code.max(1);
                        }
                    }
                    Err(e) => {
                        println!("{t} error: {e}");
                        code = 2;
                    }
                }
            }
            Ok(ExitCode::from(code))
        }
        NetcheckCmd::Recv { listen, for_ms } => {
            if listen.transport != Transport::Udp {
                bail!("recv {listen}: UDP only");
            }
            let r = netcheck::Receiver::bind(listen.port)?;
            println!("listening {listen}");
            r.run(Duration::from_millis(for_ms), |src, payload| {
                println!("{src} {}", String::from_utf8_lossy(payload).escape_debug());
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn probe(from: &str, to: &str, port: &str) -> anyhow::Result<ExitCode> {
    let s = need_live()?;
    let src = s
        .pods
        .iter()
        .find(|p| p.name == from)
        .with_context(|| format!("no pod named {from:?}"))?;
    let dst = match s.pods.iter().find(|p| p.name == to) {
        Some(p) => p.ip.clone(),
        None => to
            .parse::<std::net::IpAddr>()
            .map(|a| a.to_string())
            .with_context(|| format!("{to:?} is neither a pod nor an address"))?,
    };
    let (num, proto) = port.split_once('/').unwrap_or((port, "tcp"));
    let target: margay_harness::netcheck::Target = format!("{dst}:{num}/{proto}").parse()?;
    let st = margay_harness::netns::Netns::borrowed(&src.netns)
        .cmd(std::env::current_exe()?)
        .args([
            "netcheck",
            "probe",
            "--timeout-ms",
            "1000",
            &target.to_string(),
        ])
        .status()?;
    Ok(ExitCode::from(u8::from(!st.success())))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Up(a) => up(a),
        Cmd::Down => down(),
        Cmd::Status { json } => status(json),
        Cmd::Check => check(),
        Cmd::Pod { cmd } => pod(cmd),
        Cmd::Exec { target, cmd } => exec(&target, &cmd),
        Cmd::Kubectl { args } => kubectl(&args),
        Cmd::Supervise(a) => supervise::run(a),
        Cmd::ApiserverBroker { port_file } => apiserver_broker(&port_file),
        Cmd::Image { out, tag } => image(&out, &tag),
        Cmd::Netcheck(c) => netcheck(c),
        Cmd::Probe { from, to, port } => probe(&from, &to, &port),
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
    for bin in ["margay-agent", "margay"] {
        margay_harness::paths::workspace_bin(bin).with_context(|| {
            format!("{bin} must be built next to margay-lab (cargo build --release -p margay-lab -p margay-agent -p margay-cni)")
        })?;
    }
    margay_lab::cluster::Options {
        nodes: args.nodes,
        route_reflectors: args.route_reflectors,
        subnets: args.subnets,
        ..Default::default()
    }
    .check_counts()?;
    State::clear();
    std::fs::create_dir_all(state::dir())?;
    let log = std::fs::File::create(state::log_path())?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("supervise")
        .arg(format!("--nodes={}", args.nodes))
        .arg(format!("--encap={}", value_name(args.encap)))
        .arg(format!("--tor={}", value_name(args.tor)))
        .arg(format!("--pods-per-node={}", args.pods_per_node))
        .arg(format!("--route-reflectors={}", args.route_reflectors))
        .arg(format!("--subnets={}", args.subnets))
        .arg(format!("--install={}", value_name(args.install)))
        .args(args.kubernetes.then_some("--kubernetes"))
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
            eprintln!(
                "margay-lab: up in {:.1}s (routes and pod connectivity complete after {:.1}s)",
                start.elapsed().as_secs_f64(),
                s.ready_seconds
            );
            print_status(&s, false)?;
            let code = check()?;
            eprintln!("margay-lab: running in the background; `margay-lab down` stops it");
            return Ok(code);
        }
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(state::log_path()).unwrap_or_default();
            bail!("the supervisor exited ({st}) before the lab was ready:\n{log}");
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!(
                "the lab was not ready after 600 s; see {}",
                state::log_path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn image(out: &std::path::Path, tag: &str) -> anyhow::Result<ExitCode> {
    use margay_lab::image;
    std::fs::create_dir_all(out)?;
    let bin = margay_harness::paths::workspace_bin("margay-agent")?;
    let m = out.join("margay.tar");
    image::margay(bin.parent().unwrap_or(std::path::Path::new(".")), tag, &m)?;
    image::lab_pod(&out.join("lab-pod.tar"))?;
    image::pause(&out.join("pause.tar"))?;
    println!("{} ({tag})", m.display());
    // A Kubernetes lab that is up takes Margay's image into every node.
    if let Some(s) = State::load_live()?
        && s.args.kubernetes
    {
        let answer = control(&Request::Import {
            archive: m.canonicalize()?,
        })?;
        let Answer::Imported { nodes } = answer else {
            bail!("the supervisor answered {answer:?} to an import");
        };
        println!("imported into {nodes} nodes");
    }
    Ok(ExitCode::SUCCESS)
}

fn apiserver_broker(port_file: &std::path::Path) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt().with_target(false).init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let tmp = port_file.with_extension("tmp");
        std::fs::write(&tmp, l.local_addr()?.port().to_string())?;
        std::fs::rename(&tmp, port_file)?;
        // `scripts/in-vm.sh` ends the broker with SIGTERM: serving stops
        // and the runtime, dropped on return, drops every connection's
        // apiserver (processes stopped, directories removed) instead of
        // dying with them left behind.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = margay_harness::broker::serve(l) => r?,
            _ = term.recv() => tracing::info!("stopping: SIGTERM"),
        }
        Ok(ExitCode::SUCCESS)
    })
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

/// Asks the supervisor: its answer, or the error of a request that failed.
fn control(req: &Request) -> anyhow::Result<Answer> {
    need_live()?;
    let mut s = UnixStream::connect(state::control_path()).context("the lab supervisor")?;
    s.write_all(control::line(req)?.as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let reply: Reply = serde_json::from_str(&line).context("the supervisor's reply")?;
    reply.into_answer()
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
        "{:<10} {:<24} {:<14} {:>6} {:>8} {:>9} {:>14}  LAST-EXIT",
        "NODE", "NETNS", "ADDRESS", "PODS", "AGENT", "RESTARTS", "REMOTE-ROUTES"
    );
    for n in &s.nodes {
        let routes = Command::new("ip")
            .args(["-n", &n.netns, "-4", "route", "show", "proto", "79"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
        let pods = s.pods.iter().filter(|p| p.node == n.name).count();
        let agent = if n.agent_pid == 0 {
            "-".to_string()
        } else if std::path::Path::new(&format!("/proc/{}", n.agent_pid)).exists() {
            n.agent_pid.to_string()
        } else {
            "dead".to_string()
        };
        println!(
            "{:<10} {:<24} {:<14} {:>6} {:>8} {:>9} {:>14}  {}",
            n.name,
            n.netns,
            n.v4,
            pods,
            agent,
            n.restarts,
            routes,
            n.last_exit.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

fn check() -> anyhow::Result<ExitCode> {
    let answer = control(&Request::Check)?;
    let Answer::Checked {
        route_gaps: gaps,
        matrix: m,
    } = answer
    else {
        bail!("the supervisor answered {answer:?} to a check");
    };
    print!("{}", m.table());
    for g in &gaps {
        eprintln!("route missing: {g}");
    }
    for f in &m.failures {
        eprintln!("unreachable: {f}");
    }
    if gaps.is_empty() && m.failures.is_empty() {
        println!(
            "all {} pod pairs reachable; every node and the router route every block",
            m.total
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "margay-lab: {} unreachable of {}, {} routes missing",
            m.failures.len(),
            m.total,
            gaps.len()
        );
        Ok(ExitCode::from(1))
    }
}

fn pod(cmd: PodCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PodCmd::Add {
            node,
            name,
            namespace,
            labels,
            serve,
        } => {
            let mut l = std::collections::BTreeMap::new();
            for kv in &labels {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("label {kv:?}: want key=value"))?;
                l.insert(k.to_string(), v.to_string());
            }
            let serve: Vec<String> = serve.iter().map(ToString::to_string).collect();
            let answer = control(&Request::PodAdd(PodAdd {
                node,
                name: name.clone(),
                namespace,
                labels: l,
                serve,
            }))?;
            let Answer::PodAdded { ip } = answer else {
                bail!("the supervisor answered {answer:?} to pod add");
            };
            println!("{name} {ip}");
        }
        PodCmd::Del { name } => {
            control(&Request::PodDel { name: name.clone() })?;
            println!("{name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(target: &str, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let s = need_live()?;
    let node = s.nodes.iter().find(|n| n.name == target);
    if s.args.kubernetes && target != "tor" && node.is_none() {
        // A Pod: through the apiserver and its kubelet, as a user would.
        let st = Command::new(margay_harness::paths::kubectl()?)
            .env("KUBECONFIG", &s.kubeconfig)
            .args(["exec", target, "--"])
            .args(cmd)
            .status()?;
        return Ok(ExitCode::from(st.code().unwrap_or(1) as u8));
    }
    let ns = if target == "tor" {
        s.fabric_netns.clone()
    } else if let Some(n) = node {
        n.netns.clone()
    } else {
        s.pods
            .iter()
            .find(|p| p.name == target)
            .map(|p| p.netns.clone())
            .with_context(|| format!("no node or pod named {target:?}"))?
    };
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns]).args(cmd);
    let mnt = state::dir().join("work").join(target).join("ns/mnt");
    if s.args.kubernetes && node.is_some() && mnt.exists() {
        // The node's own filesystem too (its /opt/cni/bin, /etc/cni/net.d).
        c = Command::new("nsenter");
        c.arg(format!("--mount={}", mnt.display()))
            .arg(format!("--net=/run/netns/{ns}"))
            .args(cmd);
    }
    if node.is_some() {
        // As on a node: its kubeconfig, and margayctl on the PATH (it is
        // built next to margay-lab).
        c.env("KUBECONFIG", &s.kubeconfig);
        if let Some(dir) = std::env::current_exe()?.parent() {
            let path = std::env::var("PATH").unwrap_or_default();
            c.env("PATH", format!("{}:{path}", dir.display()));
        }
    }
    let st = c.status()?;
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn node_counts_are_u32_up_to_the_fabric() {
        let up = |n: &str| super::Cli::try_parse_from(["margay-lab", "up", "--nodes", n]);
        assert!(up("249").is_ok());
        let e = up("250").unwrap_err().to_string();
        assert!(e.contains("1..=249"), "{e}");
        assert!(up("0").is_err());
        let c = super::Cli::try_parse_from(["margay-lab", "up", "--pods-per-node", "100000"]);
        assert!(c.is_ok());
    }
}
