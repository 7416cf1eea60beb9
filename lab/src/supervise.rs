//! The background supervisor: owns the lab's [`Cluster`] for its lifetime,
//! starts dead agents again with a back-off (as a kubelet would; the
//! restarts show in `margay-lab status`), and answers the CLI on a unix
//! socket (one JSON request and one JSON reply per connection, typed in
//! [`crate::control`]: `pod_add`, `pod_del`, `check`, `import`). Returning from
//! [`run`] drops the cluster, which stops every process by PID and deletes
//! every namespace.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use margay_lab::cluster::{Cluster, Options};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::UpArgs;
use crate::control::{self, Answer, Reply, Request};
use crate::state::{self, NodeState, PodState, State};

fn snapshot(c: &Cluster, args: &UpArgs, kubeconfig: &str, ready: f64) -> State {
    State {
        supervisor_pid: std::process::id(),
        args: args.clone(),
        apiserver_url: c.api.url(),
        kubeconfig: kubeconfig.to_string(),
        fabric_netns: c.fabric.ns().name().to_owned(),
        tor_v4: margay_harness::topo::FABRIC_GW_V4.to_string(),
        ready_seconds: ready,
        nodes: c
            .nodes
            .iter()
            .map(|n| NodeState {
                name: n.name.clone(),
                netns: n.node.ns.name().to_owned(),
                v4: n.node.v4.to_string(),
                v6: n.node.v6.to_string(),
                log: c
                    .work_dir()
                    .join(format!("{}.log", n.name))
                    .display()
                    .to_string(),
                agent_pid: n.agent.as_ref().map_or(0, |a| a.pid()),
                restarts: n.restarts.count,
                last_exit: n.restarts.last_exit.clone(),
            })
            .collect(),
        pods: c
            .pods
            .iter()
            .map(|p| PodState {
                name: p.name.clone(),
                node: p.node.clone(),
                netns: p.ns.name().to_owned(),
                ip: p.ip.clone(),
            })
            .collect(),
    }
}

async fn check(c: &Cluster) -> anyhow::Result<Reply> {
    let gaps = c.route_gaps().await?;
    let m = c.matrix()?;
    Ok(Reply::checked(gaps, m))
}

async fn handle(c: &mut Cluster, req: Request) -> anyhow::Result<Reply> {
    match req {
        Request::PodAdd(p) => {
            let ip = c.add_pod_with(&p.node, &p.name, &p.opts()).await?;
            Ok(Reply::ok(Answer::PodAdded { ip }))
        }
        Request::PodDel { name } => {
            c.del_pod(&name).await?;
            Ok(Reply::ok(Answer::Done {}))
        }
        Request::Check => {
            if c.opts.kubernetes.is_some() {
                margay_lab::kubernetes::refresh_pods(c).await?;
            }
            check(c).await
        }
        Request::Import { archive } => {
            let mut nodes = 0;
            for node in &c.nodes {
                if let Some(k) = &node.kubelet {
                    k.import(&archive)?;
                    nodes += 1;
                }
            }
            Ok(Reply::ok(Answer::Imported { nodes }))
        }
    }
}

/// Builds the lab, publishes `state.json`, serves the control socket until
/// SIGTERM/SIGINT, tears down.
pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    // The supervisor logs to lab.log: plain text (colour only on a terminal).
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tracing::info!(?args, "starting lab");
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(state::dir().join("work"));
        let mut c = Cluster::start(Options {
            nodes: args.nodes,
            encap: args.encap,
            tor: args.tor,
            route_reflectors: args.route_reflectors,
            subnets: args.subnets,
            kubernetes: args.kubernetes.then_some(args.install),
            work_dir: Some(state::dir().join("work")),
            ..Default::default()
        })
        .await?;
        let kubeconfig = state::dir().join("kubeconfig");
        std::fs::copy(c.api.kubeconfig(), &kubeconfig)?;
        let kubeconfig = kubeconfig.display().to_string();
        if args.kubernetes {
            let replicas = c.nodes.len() * usize::try_from(args.pods_per_node)?;
            margay_lab::kubernetes::deploy(&mut c, replicas).await?;
        } else {
            for i in 0..c.nodes.len() {
                let node = c.nodes[i].name.clone();
                for k in 1..=args.pods_per_node {
                    c.add_pod(&node, &format!("{node}-pod{k}")).await?;
                }
            }
        }
        // Generous bounds: inside a VM under emulation everything is slower.
        c.wait_converged(Duration::from_secs(300)).await?;
        // Ready when every pod reaches every other (BGP has settled).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let m = c.matrix()?;
            if m.failures.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(failures = m.failures.len(), "pods not all reachable; lab up anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ready = t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(state::control_path());
        let control = UnixListener::bind(state::control_path())?;
        snapshot(&c, &args, &kubeconfig, ready).save()?;
        tracing::info!(ready, "lab ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // Dead agents are started again, as a kubelet would.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tick.tick() => {
                    let mut changed = c.supervise();
                    // Pods come and go through the API (kubectl, the
                    // Deployment): the list follows.
                    if args.kubernetes {
                        let before: Vec<String> = c.pods.iter().map(|p| p.id.clone()).collect();
                        if let Err(e) = margay_lab::kubernetes::refresh_pods(&mut c).await {
                            tracing::warn!("listing the lab's pods: {e:#}");
                        }
                        changed |= before != c.pods.iter().map(|p| p.id.clone()).collect::<Vec<_>>();
                    }
                    if changed {
                        snapshot(&c, &args, &kubeconfig, ready).save()?;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
                conn = control.accept() => {
                    let Ok((conn, _)) = conn else { continue };
                    let (r, mut w) = conn.into_split();
                    let mut line = String::new();
                    if BufReader::new(r).read_line(&mut line).await.is_err() {
                        continue;
                    }
                    let reply = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => handle(&mut c, req).await.unwrap_or_else(|e| Reply::failed(format!("{e:#}"))),
                        Err(e) => Reply::failed(format!("bad request: {e}")),
                    };
                    snapshot(&c, &args, &kubeconfig, ready).save()?;
                    let _ = w.write_all(control::line(&reply)?.as_bytes()).await;
                }
            }
        }
        tracing::info!("tearing down");
        let _ = std::fs::remove_file(state::control_path());
        State::clear();
        Ok(ExitCode::SUCCESS)
    })
}
