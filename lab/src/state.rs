//! The lab's state file: what `up` built, for every other command to read,
//! and the supervisor's control socket path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::UpArgs;

/// Where the running lab keeps its state, log and kubeconfig:
/// `$MARGAY_LAB_DIR`, default `/run/margay-lab`.
pub fn dir() -> PathBuf {
    std::env::var_os("MARGAY_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/margay-lab"))
}

/// A node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    /// Kubernetes node name (`node1`...).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Fabric IPv4 address.
    pub v4: String,
    /// Fabric IPv6 address.
    pub v6: String,
    /// Its agent's log.
    pub log: String,
    /// Its agent's PID (0: not running).
    pub agent_pid: u32,
    /// How many times the lab started the agent again after it died.
    #[serde(default)]
    pub restarts: u32,
    /// How its last run ended.
    #[serde(default)]
    pub last_exit: Option<String>,
}

/// A pod of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    /// Pod name (namespace `default`).
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its network namespace.
    pub netns: String,
    /// Its IPv4 address.
    pub ip: String,
}

/// Everything `up` built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// PID of the background supervisor that owns the lab.
    pub supervisor_pid: u32,
    /// Options the lab was started with.
    pub args: UpArgs,
    /// kube-apiserver URL (loopback).
    pub apiserver_url: String,
    /// Admin kubeconfig.
    pub kubeconfig: String,
    /// The fabric namespace (also the top-of-rack router).
    pub fabric_netns: String,
    /// The router's fabric address.
    pub tor_v4: String,
    /// Seconds from start to every route in place and every pod reachable.
    pub ready_seconds: f64,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Pods.
    pub pods: Vec<PodState>,
}

fn path() -> PathBuf {
    dir().join("state.json")
}

/// The supervisor's log.
pub fn log_path() -> PathBuf {
    dir().join("lab.log")
}

/// The supervisor's control socket.
pub fn control_path() -> PathBuf {
    dir().join("control.sock")
}

impl State {
    /// Reads the state file, if any.
    pub fn load() -> anyhow::Result<Option<State>> {
        match std::fs::read(path()) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the state file if its supervisor is still alive.
    pub fn load_live() -> anyhow::Result<Option<State>> {
        Ok(Self::load()?.filter(|s| Path::new(&format!("/proc/{}", s.supervisor_pid)).exists()))
    }

    /// Writes the state atomically (temp file + rename).
    pub fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir())?;
        let tmp = path().with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path())?;
        Ok(())
    }

    /// Removes the state file.
    pub fn clear() {
        let _ = std::fs::remove_file(path());
    }
}
