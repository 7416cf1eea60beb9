//! What the bench reads of the running lab: its `state.json` (the
//! kubeconfig, the apiserver, each node's agent PID) and its processes
//! (`/proc`: an agent's RSS and CPU time, the apiserver and etcd found by
//! their command lines).

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::metrics;

/// What the bench reads of the lab's `state.json`.
#[derive(Debug, Deserialize)]
pub(crate) struct LabState {
    pub kubeconfig: String,
    pub apiserver_url: String,
    pub nodes: Vec<LabNode>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LabNode {
    pub name: String,
    pub agent_pid: u32,
    #[serde(default)]
    pub restarts: u32,
}

impl LabState {
    /// Reads `dir`/state.json.
    pub(crate) fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = dir.join("state.json");
        let b = std::fs::read(&p)
            .with_context(|| format!("{}: is a lab up (margay-lab up)?", p.display()))?;
        Ok(serde_json::from_slice(&b)?)
    }
}

/// One process's figures.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    pub rss_kib: u64,
    pub cpu_ticks: u64,
}

pub(crate) fn proc_sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ProcSample {
        rss_kib: metrics::rss_kib(&status)?,
        cpu_ticks: metrics::cpu_ticks(&stat)?,
    })
}

/// Every process's command line.
pub(crate) fn command_lines() -> Vec<(u32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let raw = std::fs::read(e.path().join("cmdline")).ok()?;
        let args = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some((pid, args))
    })
    .collect()
}

/// The apiserver serving on `port` and the etcd behind it, by their
/// command lines.
pub(crate) fn control_plane(procs: &[(u32, Vec<String>)], port: u16) -> (Option<u32>, Option<u32>) {
    let is = |args: &[String], prog: &str| {
        args.first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|f| f == prog))
    };
    let api = procs.iter().find(|(_, a)| {
        is(a, "kube-apiserver") && metrics::flag(a, "--secure-port") == Some(&port.to_string())
    });
    let etcd_port = api
        .and_then(|(_, a)| metrics::flag(a, "--etcd-servers"))
        .and_then(|u| metrics::url_port(u.split(',').next().unwrap_or(u)));
    let etcd = etcd_port.and_then(|p| {
        procs.iter().find(|(_, a)| {
            is(a, "etcd")
                && metrics::flag(a, "--listen-client-urls")
                    .is_some_and(|u| u.split(',').any(|u| metrics::url_port(u) == Some(p)))
        })
    });
    (api.map(|p| p.0), etcd.map(|p| p.0))
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn finds_the_labs_apiserver_and_its_etcd_by_command_line() {
        let procs = vec![
            (
                10,
                args(&[
                    "/usr/bin/etcd",
                    "--listen-client-urls=http://127.0.0.1:2000",
                ]),
            ),
            (
                11,
                args(&[
                    "/usr/bin/etcd",
                    "--listen-client-urls=http://127.0.0.1:3000",
                ]),
            ),
            (
                20,
                args(&[
                    "/x/kube-apiserver",
                    "--etcd-servers=http://127.0.0.1:2000",
                    "--secure-port=7000",
                ]),
            ),
            (
                21,
                args(&[
                    "/x/kube-apiserver",
                    "--etcd-servers=http://127.0.0.1:3000",
                    "--secure-port=8000",
                ]),
            ),
            (
                30,
                args(&["bash", "-c", "kube-apiserver --secure-port=8000"]),
            ),
        ];
        assert_eq!(control_plane(&procs, 8000), (Some(21), Some(11)));
        assert_eq!(control_plane(&procs, 7000), (Some(20), Some(10)));
        assert_eq!(control_plane(&procs, 9000), (None, None));
    }
}
