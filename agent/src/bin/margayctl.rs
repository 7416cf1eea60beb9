//! `margayctl`: operator CLI. `node status` and `routes` ask the agent on
//! this node (its `/status` endpoint); `ipam show|check|release` read and
//! write the IPAM objects through the Kubernetes API; `policy show|check`
//! read Namespaces, Pods and NetworkPolicies and say what the policies
//! allow (Margay's reading of the API, the one its rules are tested
//! against). Tables by default,
//! `-o json` for scripts. Exit codes: 0 fine, 1 problems found or refused,
//! 2 cannot run (bad flags, unreachable agent or API).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use margay_agent::ctl;
use margay_ipam::Store;
use margay_ipam::k8s::KubeStore;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Parser)]
#[command(name = "margayctl", version, about = "Margay operator CLI")]
struct Cli {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Kubeconfig (default: $KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG", global = true)]
    kubeconfig: Option<PathBuf>,
    /// The agent's HTTP endpoint on this node.
    #[arg(
        long,
        env = "MARGAY_AGENT",
        default_value = "127.0.0.1:9099",
        global = true
    )]
    agent: String,
    /// The agents' namespace (heartbeat Leases of agents from before the
    /// Lease namespace, read after those in `--lease-namespace`).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "kube-system",
        global = true
    )]
    namespace: String,
    /// The agents' Lease namespace (their heartbeat Leases).
    #[arg(
        long,
        env = "MARGAY_LEASE_NAMESPACE",
        default_value = margay_api::node::LEASE_NAMESPACE,
        global = true
    )]
    lease_namespace: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// This node.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Address management.
    Ipam {
        #[command(subcommand)]
        cmd: IpamCmd,
    },
    /// BGP best routes on this node.
    Routes,
    /// NetworkPolicy: what selects a pod, what a connection meets.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// The policies selecting a pod, per direction, with their peers
    /// resolved to pods and their ports (exit 1: no such pod).
    Show {
        /// NAMESPACE/POD (POD: in `default`).
        pod: margay_policy::PodKey,
    },
    /// What the policies decide for a connection, and why (exit 0
    /// allowed, 1 denied).
    Check {
        /// Source: NAMESPACE/POD or an address.
        from: margay_policy::explain::End,
        /// Destination: NAMESPACE/POD or an address.
        to: margay_policy::explain::End,
        /// PORT[/tcp|udp|sctp] (TCP when not given).
        port: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// The agent's state and its BGP sessions.
    Status,
}

#[derive(Debug, Subcommand)]
enum IpamCmd {
    /// Pools, blocks and usage per node.
    Show,
    /// Leaks, duplicates and orphans, as a report (exit 1 when any).
    Check,
    /// Release addresses (refused for a node whose agent runs, unless --force).
    Release {
        /// Addresses to release.
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        /// A report from `margayctl ipam check -o json`: releases its leaks.
        #[arg(long)]
        from_report: Option<PathBuf>,
        /// Release even when the node's agent is running.
        #[arg(long)]
        force: bool,
    },
}

async fn client(kubeconfig: &Option<PathBuf>) -> anyhow::Result<kube::Client> {
    let cfg = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(cfg)?)
}

fn print(
    out: Output,
    json: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(json)?),
        Output::Table => print!("{}", text()),
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Node {
            cmd: NodeCmd::Status,
        } => {
            let st = ctl::agent_status(&cli.agent)?;
            print(cli.output, &st, || ctl::render_node_status(&st))?;
            Ok(if st.ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Routes => {
            let st = ctl::agent_status(&cli.agent)?;
            print(cli.output, &st.routes, || ctl::render_routes(&st))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Policy { cmd } => {
            let client = client(&cli.kubeconfig).await.context("Kubernetes API")?;
            let (world, bad) = ctl::policy_world(&client).await?;
            for (p, e) in &bad {
                eprintln!(
                    "margayctl: warning: NetworkPolicy {p} is not enforced as written ({e}): \
                     the pods it selects are isolated by it with nothing allowed"
                );
            }
            match cmd {
                PolicyCmd::Show { pod } => match margay_policy::explain::show(&world, &pod) {
                    Some(mut s) => {
                        margay_policy::explain::mark_unenforced(&mut s, &bad);
                        print(cli.output, &s, || ctl::render_policy_show(&s))?;
                        Ok(ExitCode::SUCCESS)
                    }
                    None => {
                        eprintln!("margayctl: no pod {pod} on the pod network with an address");
                        Ok(ExitCode::from(1))
                    }
                },
                PolicyCmd::Check { from, to, port } => {
                    let (port, proto) = margay_policy::explain::parse_port(&port)?;
                    let c = margay_policy::explain::check(&world, &from, &to, port, proto)?;
                    print(cli.output, &c, || ctl::render_policy_check(&c))?;
                    Ok(if c.allowed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    })
                }
            }
        }
        Cmd::Ipam { cmd } => {
            let client = client(&cli.kubeconfig).await.context("Kubernetes API")?;
            let store = Arc::new(KubeStore::new(client.clone(), Duration::ZERO));
            match cmd {
                IpamCmd::Show => {
                    let s = ctl::ipam_show(&store.pools().await?, &store.list_blocks().await?);
                    print(cli.output, &s, || ctl::render_ipam_show(&s))?;
                    Ok(ExitCode::SUCCESS)
                }
                IpamCmd::Check => {
                    let c = ctl::collect_check(&store).await?;
                    print(cli.output, &c, || ctl::render_ipam_check(&c))?;
                    Ok(if c.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    })
                }
                IpamCmd::Release {
                    mut addresses,
                    from_report,
                    force,
                } => {
                    if let Some(p) = from_report {
                        let r: margay_api::ctl::IpamCheck = serde_json::from_slice(
                            &std::fs::read(&p)
                                .with_context(|| format!("reading {}", p.display()))?,
                        )
                        .with_context(|| {
                            format!(
                                "{} is not a report of `margayctl ipam check -o json`",
                                p.display()
                            )
                        })?;
                        addresses.extend(r.leaks.iter().map(|l| l.address));
                    }
                    anyhow::ensure!(
                        !addresses.is_empty(),
                        "nothing to release: give --address or --from-report"
                    );
                    let mut lease_namespaces = vec![cli.lease_namespace.clone()];
                    if cli.namespace != cli.lease_namespace {
                        lease_namespaces.push(cli.namespace.clone());
                    }
                    match ctl::release(&client, &lease_namespaces, store, &addresses, force).await {
                        Ok(done) => {
                            print(cli.output, &done, || {
                                done.iter().map(|d| format!("{d}\n")).collect()
                            })?;
                            Ok(ExitCode::SUCCESS)
                        }
                        Err(e) => {
                            eprintln!("margayctl: {e}");
                            Ok(ExitCode::from(1))
                        }
                    }
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("margayctl: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("margayctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
