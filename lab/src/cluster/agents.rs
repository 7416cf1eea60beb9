//! The plain lab's agents, run by the lab as a kubelet would run them:
//! started (and waited for: their CNI socket), killed, crashed, and
//! started again after a back-off ([`Restarts`]); their logs and
//! `margayctl` in their nodes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use margay_harness::kube::ApiServer;
use margay_harness::process::Daemon;
use margay_harness::topo::Node;
use margay_harness::{paths, wait};

use super::Cluster;

/// A kubelet's restart policy for one agent: a dead agent is started again
/// after a back-off that doubles from 1 s to 30 s, and starts over at 1 s
/// once an agent has run for a minute.
#[derive(Debug, Clone)]
pub struct Restarts {
    /// How many times the agent was started again.
    pub count: u32,
    /// How the last run ended (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub last_exit: Option<String>,
    started: Instant,
    due: Option<Instant>,
    backoff: Duration,
}

impl Default for Restarts {
    fn default() -> Self {
        Self {
            count: 0,
            last_exit: None,
            started: Instant::now(),
            due: None,
            backoff: Duration::from_secs(1),
        }
    }
}

impl Restarts {
    /// The agent ended now, as `how`: when to start it again.
    fn ended(&mut self, how: String, now: Instant) -> Instant {
        if now.duration_since(self.started) >= Duration::from_secs(60) {
            self.backoff = Duration::from_secs(1);
        }
        let due = now + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        self.last_exit = Some(how);
        self.due = Some(due);
        due
    }

    /// It was started again now.
    fn started(&mut self, now: Instant) {
        self.count += 1;
        self.started = now;
        self.due = None;
    }
}

/// The command line of `margay-agent run` for node `name` inside `node`'s
/// namespace, talking to `api`, serving CNI on `socket`.
pub fn agent_cmd(
    node: &Node,
    name: &str,
    api: &ApiServer,
    socket: &Path,
) -> anyhow::Result<Command> {
    let mut cmd = node.ns.cmd(paths::workspace_bin("margay-agent")?);
    cmd.args(["run", "--node-name", name, "--kubeconfig"])
        .arg(api.kubeconfig())
        .arg("--socket")
        .arg(socket);
    Ok(cmd)
}

impl Cluster {
    /// Starts node `i`'s agent without waiting for it.
    fn spawn_agent(&self, i: usize) -> anyhow::Result<Daemon> {
        let n = &self.nodes[i];
        let _ = std::fs::remove_file(&n.socket);
        let mut cmd = agent_cmd(&n.node, &n.name, &self.api, &n.socket)?;
        cmd.args(["--gc-interval", &self.opts.gc_interval.to_string()])
            .env("MARGAY_LOG", "info");
        let log = self.work.path().join(format!("{}.log", n.name));
        Ok(Daemon::spawn("margay-agent", cmd, &log)?)
    }

    /// Starts (or restarts) node `i`'s agent; returns once its socket is there.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let mut agent = self.spawn_agent(i)?;
        let n = &self.nodes[i];
        let socket = n.socket.clone();
        // Generous: start-up reconciliation waits for the API, and inside
        // a VM under emulation (scripts/in-vm.sh) everything is slower. An
        // agent that exited is reported as such.
        wait::until(
            "agent socket",
            Duration::from_secs(120),
            Duration::from_millis(50),
            || {
                if socket.exists() {
                    return Ok(Some(()));
                }
                if !agent.is_running() {
                    return Err("the agent exited".into());
                }
                Ok(None)
            },
        )
        .with_context(|| format!("{} agent did not start:\n{}", n.name, agent.log_tail(20)))?;
        self.nodes[i].agent = Some(agent);
        Ok(())
    }

    /// SIGKILLs node `i`'s agent and keeps it stopped (its kernel state
    /// stays): see [`Cluster::crash_agent`] for a crash the lab recovers.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill9();
        }
    }

    /// SIGKILLs node `i`'s agent as a crash would: [`Cluster::supervise`]
    /// starts it again after its back-off.
    pub fn crash_agent(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(a) = &self.nodes[i].agent {
            a.signal(nix::sys::signal::Signal::SIGKILL)?;
        }
        Ok(())
    }

    /// Restarts agents that died, each after its back-off (call it every
    /// second or so). Returns whether anything changed.
    pub fn supervise(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let Some(agent) = n.agent.as_mut() else {
                continue;
            };
            if n.restarts.due.is_none()
                && let Some(st) = agent.exit_status()
            {
                let due = n.restarts.ended(st.to_string(), now);
                tracing::warn!(
                    node = %n.name,
                    "agent ended ({st}); starting it again in {:.0?}",
                    due - now
                );
                changed = true;
            }
            if n.restarts.due.is_some_and(|d| d <= now) {
                match self.spawn_agent(i) {
                    Ok(a) => {
                        let n = &mut self.nodes[i];
                        n.agent = Some(a);
                        n.restarts.started(now);
                        tracing::info!(node = %n.name, restarts = n.restarts.count, "agent started again");
                    }
                    Err(e) => {
                        let n = &mut self.nodes[i];
                        let due = n.restarts.ended(format!("could not start: {e:#}"), now);
                        tracing::warn!(node = %n.name, "agent not started ({e:#}); next try in {:.0?}", due - now);
                    }
                }
                changed = true;
            }
        }
        changed
    }

    /// The agent log of node `i`.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.work.path().join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    /// Runs `margayctl ARGS` inside node `i`'s namespace with the admin
    /// kubeconfig; returns (exit code, stdout, stderr).
    pub fn margayctl(&self, i: usize, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let out = self.nodes[i]
            .node
            .ns
            .cmd(paths::workspace_bin("margayctl")?)
            .args(args)
            .env("KUBECONFIG", self.api.kubeconfig())
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}
