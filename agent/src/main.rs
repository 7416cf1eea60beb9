//! `margay-agent`: the per-node daemon (CNI API, IPAM, dataplane, BGP).
//!
//! Work in progress: `run` and `install-cni` are declared with the names
//! operators will rely on and say plainly that they are not built yet;
//! `crds` writes (or checks) the CustomResourceDefinitions.

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
    Run,
    /// Copy the CNI plugin and write its conflist onto the host.
    InstallCni,
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
            let res = if check {
                margay_agent::crds::stale(&out).map(|stale| {
                    if stale.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("stale in {}: {}", out.display(), stale.join(", "));
                        ExitCode::from(1)
                    }
                })
            } else {
                margay_agent::crds::write(&out).map(|()| ExitCode::SUCCESS)
            };
            res.unwrap_or_else(|e| {
                eprintln!("margay-agent crds: {e:#}");
                ExitCode::from(2)
            })
        }
        Cmd::Run | Cmd::InstallCni => {
            let what = if matches!(cli.cmd, Cmd::Run) {
                "run"
            } else {
                "install-cni"
            };
            eprintln!("margay-agent {what}: not available in this build yet");
            ExitCode::from(2)
        }
    }
}
