//! `margay-agent`: the per-node daemon (CNI API, IPAM, dataplane, BGP).
//!
//! `run` is the agent (IPAM, the CNI API, routing, BGP, health);
//! `install-cni` puts the plugin and its conflist onto the host; `crds`
//! writes (or checks) the CustomResourceDefinitions.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "margay-agent", version, about = "Margay node agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent on this node.
    Run(margay_agent::run::RunArgs),
    /// Copy the CNI plugin and write its conflist onto the host.
    InstallCni(margay_agent::install::InstallArgs),
    /// Write the CustomResourceDefinitions as YAML files.
    Crds {
        /// Directory to write into (one file per CRD).
        #[arg(long, default_value = "deploy/crds")]
        out: PathBuf,
        /// Only check that the files there are current (exit 1 if not).
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Crds { out, check } => {
            let res = margay_api::crds::render().and_then(|rendered| {
                if check {
                    let stale = margay_api::crds::stale(&rendered, |f| {
                        std::fs::read_to_string(out.join(f)).ok()
                    });
                    if stale.is_empty() {
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!("stale in {}: {}", out.display(), stale.join(", "));
                        Ok(ExitCode::from(1))
                    }
                } else {
                    std::fs::create_dir_all(&out)?;
                    for (file, text) in rendered {
                        std::fs::write(out.join(file), text)?;
                    }
                    Ok(ExitCode::SUCCESS)
                }
            });
            res.unwrap_or_else(|e| {
                eprintln!("margay-agent crds: {e:#}");
                ExitCode::from(2)
            })
        }
        Cmd::Run(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_env("MARGAY_LOG")
                .unwrap_or_else(|_| "info".into());
            // MARGAY_LOG_FORMAT=json: one JSON object per line (for log
            // collectors); otherwise human-readable text with key=value fields.
            if std::env::var("MARGAY_LOG_FORMAT").as_deref() == Ok("json") {
                tracing_subscriber::fmt()
                    .json()
                    .with_env_filter(filter)
                    .init();
            } else {
                // Colour only on a terminal (log files stay plain text).
                use std::io::IsTerminal;
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_ansi(std::io::stdout().is_terminal())
                    .init();
            }
            // A panic in any task ends the agent (the DaemonSet restarts
            // it) instead of leaving it half alive.
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                tracing::error!("panic: {info}; margay-agent exits");
                default(info);
                std::process::exit(101);
            }));
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("margay-agent run: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(margay_agent::run::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("margay-agent run: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::InstallCni(args) => match margay_agent::install::install(&args) {
            Ok(done) => {
                for o in done {
                    match o {
                        margay_agent::install::Outcome::Written(p) => {
                            println!("installed {}", p.display())
                        }
                        margay_agent::install::Outcome::Unchanged(p) => {
                            println!("unchanged {}", p.display())
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("margay-agent install-cni: {e}");
                ExitCode::from(1)
            }
        },
    }
}
