//! `margay-bgp`: Margay's BGP speaker on its own.
//!
//! `margay-bgp --config FILE` runs it; `margay-bgp show neighbors|routes`
//! asks a running one over its control socket and prints JSON. Bad
//! configuration exits with status 2 and a message naming the problem.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use margay_bgp::config::Config;
use margay_bgp::speaker::Speaker;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const DEFAULT_SOCKET: &str = "/run/margay-bgp.sock";

#[derive(Debug, Parser)]
#[command(name = "margay-bgp", version, about = "Margay BGP speaker")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Control socket (overrides the config's `control_socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print sessions or routes of a running speaker as JSON, or its
    /// counters in the Prometheus text format.
    Show {
        /// `neighbors`, `routes` or `metrics`.
        #[arg(value_parser = ["neighbors", "routes", "metrics"])]
        what: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("margay-bgp: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.cmd {
        Some(Cmd::Show { what }) => {
            let sock = cli
                .socket
                .or_else(|| {
                    cli.config
                        .as_ref()
                        .and_then(|c| Config::load(c).ok()?.control_socket)
                })
                .unwrap_or_else(|| DEFAULT_SOCKET.into());
            rt.block_on(show(&sock, &what))
        }
        None => {
            let Some(path) = cli.config else {
                eprintln!("margay-bgp: --config FILE is required");
                return ExitCode::from(2);
            };
            let cfg = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("margay-bgp: {e}");
                    return ExitCode::from(2);
                }
            };
            let sock = cli
                .socket
                .or(cfg.control_socket.clone())
                .unwrap_or_else(|| DEFAULT_SOCKET.into());
            rt.block_on(run(cfg, sock))
        }
    }
}

async fn show(sock: &std::path::Path, what: &str) -> ExitCode {
    let mut s = match UnixStream::connect(sock).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "margay-bgp: cannot reach the speaker at {}: {e}",
                sock.display()
            );
            return ExitCode::from(1);
        }
    };
    if s.write_all(format!("{what}\n").as_bytes()).await.is_err() {
        return ExitCode::from(1);
    }
    let mut out = String::new();
    if s.read_to_string(&mut out).await.is_err() {
        return ExitCode::from(1);
    }
    println!("{}", out.trim_end());
    ExitCode::SUCCESS
}

/// One control request: a word (`neighbors`, `routes`, `metrics`) in, the
/// view (JSON) or the metrics (text) out.
async fn answer(speaker: std::sync::Arc<Speaker>, s: UnixStream) {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    if BufReader::new(r).read_line(&mut line).await.is_err() {
        return;
    }
    let json = |v: Result<String, serde_json::Error>| {
        v.unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    };
    let body = match line.trim() {
        "neighbors" => json(serde_json::to_string_pretty(&speaker.neighbors())),
        "routes" => match speaker.routes().await {
            Ok(r) => json(serde_json::to_string_pretty(&r)),
            Err(e) => format!("{{\"error\": \"{e}\"}}"),
        },
        "metrics" => {
            let mut reg = prometheus_client::registry::Registry::default();
            reg.register_collector(Box::new(speaker.metrics()));
            margay_bgp::metrics::render(&reg)
        }
        other => {
            format!("{{\"error\": \"unknown request {other:?}: neighbors, routes or metrics\"}}")
        }
    };
    let _ = w.write_all(body.as_bytes()).await;
}

async fn run(cfg: Config, sock: PathBuf) -> ExitCode {
    let speaker = match Speaker::start(cfg).await {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            eprintln!("margay-bgp: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = std::fs::remove_file(&sock);
    let listener = match UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "margay-bgp: cannot bind control socket {}: {e}",
                sock.display()
            );
            return ExitCode::from(2);
        }
    };
    let ctl = {
        let speaker = speaker.clone();
        margay_task::Owned::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((s, _)) = a else { break };
                        conns.spawn(answer(speaker.clone(), s));
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        })
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("margay-bgp: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(ctl);
    let _ = std::fs::remove_file(&sock);
    if let Ok(s) = std::sync::Arc::try_unwrap(speaker) {
        s.shutdown().await;
    }
    ExitCode::SUCCESS
}
