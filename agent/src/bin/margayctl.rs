//! `margayctl`: operator CLI (node status, IPAM show/check/release, routes).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "margayctl", version, about = "Margay operator CLI")]
struct Cli {
    /// Command and arguments.
    args: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "margayctl {}: not available in this build yet",
        cli.args.join(" ")
    );
    std::process::ExitCode::from(2)
}
