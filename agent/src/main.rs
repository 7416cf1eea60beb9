//! `margay-agent`: the per-node daemon (CNI API, IPAM, dataplane, BGP).
//!
//! Work in progress: the subcommands are declared with the names operators
//! will rely on; each says plainly what is not built yet.

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let what = match cli.cmd {
        Cmd::Run => "run",
        Cmd::InstallCni => "install-cni",
    };
    eprintln!("margay-agent {what}: not available in this build yet");
    std::process::ExitCode::from(2)
}
