//! A real Kubernetes node inside a lab node's network namespace: one
//! containerd (Debian's 1.6, runc) and one kubelet (v1.20, built by the
//! installer) registered as the Node, sharing a mount namespace of the
//! node's own in which per-node directories stand where a host keeps
//! them (`/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/kubelet`,
//! `/var/log/pods`, `/var/lib/containerd`, `/run/containerd`,
//! `/var/run/netns`, `/var/lib/cni`, `/var/run/margay`). Host-network pods
//! then run in the node's network namespace and see the node's own
//! filesystem, as on a real host: a DaemonSet's `hostPath` is this node's.
//!
//! Pitfalls found (../shared/reference/environment.md): processes enter
//! the network namespace with `nsenter --net` (`ip netns exec` remounts
//! `/sys` and hides the cgroup mounts); the kubelet's `--cgroup-root` must
//! exist in every cgroup v1 hierarchy (the cpuset one with `cpus` and
//! `mems` copied); containerd needs `restrict_oom_score_adj`.
//!
//! Dropping a [`KubeletNode`] stops the kubelet, kills every container
//! process (from its cgroups), containerd and its shims (every process in
//! the node's mount namespace), then unmounts and removes what it made.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::kube::ADMIN_TOKEN;
use crate::netns::Netns;
use crate::process::{Daemon, run};
use crate::{Error, Result, names, paths, wait};

/// Node paths replaced by per-node directories (host path under the
/// node's directory, path on the node).
const BINDS: [(&str, &str); 9] = [
    ("cni-net.d", "/etc/cni/net.d"),
    ("cni-bin", "/opt/cni/bin"),
    ("kubelet", "/var/lib/kubelet"),
    ("pods-log", "/var/log/pods"),
    ("containerd", "/var/lib/containerd"),
    ("containerd-run", "/run/containerd"),
    ("netns", "/run/netns"),
    ("cni-cache", "/var/lib/cni"),
    ("margay-run", "/run/margay"),
];

/// cgroup v1 hierarchies the kubelet's root must exist in.
const CGROUPS: [&str; 9] = [
    "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids", "systemd",
];

/// How to start a node.
#[derive(Debug, Clone)]
pub struct KubeletSpec {
    /// The Node's name.
    pub name: String,
    /// Its address (`--node-ip`).
    pub ip: std::net::Ipv4Addr,
    /// The apiserver as the node reaches it (`https://...`).
    pub server: String,
    /// The sandbox image (imported before the kubelet starts).
    pub pause_image: String,
    /// Image archives to import into its containerd.
    pub images: Vec<PathBuf>,
}

/// A pod sandbox on a node, as containerd knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its sandbox process (`/proc/<pid>/ns/net` is the pod's network).
    pub pid: u32,
}

/// A kubelet node; dropping it takes it down.
#[derive(Debug)]
pub struct KubeletNode {
    kubelet: Option<Daemon>,
    containerd: Option<Daemon>,
    /// The node's directory.
    dir: PathBuf,
    /// The persistent mount namespace (a file under `dir/ns`).
    mnt: PathBuf,
    cgroup_root: String,
    name: String,
    netns: String,
}

fn ok(cmd: &mut Command) -> Result<String> {
    run(cmd)
}

impl KubeletNode {
    /// Starts containerd and the kubelet for `spec` in `ns` (the node's
    /// network namespace), with state under `dir` (made if missing).
    pub fn start(ns: &Netns, dir: &Path, spec: &KubeletSpec) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut me = Self {
            kubelet: None,
            containerd: None,
            mnt: dir.join("ns/mnt"),
            cgroup_root: format!("/{}", names::unique(&format!("kubelet-{}", spec.name))),
            name: spec.name.clone(),
            netns: ns.name().to_string(),
            dir,
        };
        me.mount_namespace()?;
        me.cgroups()?;
        // Debian's reference plugins, where a kubelet host keeps them.
        for e in std::fs::read_dir(paths::cni_plugin_dir())? {
            let e = e?;
            std::fs::copy(e.path(), me.dir.join("cni-bin").join(e.file_name()))?;
        }
        me.start_containerd(spec)?;
        for img in &spec.images {
            me.import(img)?;
        }
        me.start_kubelet(spec)?;
        Ok(me)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's directory on this machine: `cni-bin/`, `cni-net.d/` ...
    /// are what the node sees at `/opt/cni/bin`, `/etc/cni/net.d` ...
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host-side path of what the node sees at `node_path` (one of the
    /// per-node directories).
    pub fn host_path(&self, node_path: &str) -> Option<PathBuf> {
        BINDS.iter().find_map(|(sub, at)| {
            let rest = Path::new(node_path).strip_prefix(at).ok()?;
            Some(self.dir.join(sub).join(rest))
        })
    }

    /// A command run on the node: its network and mount namespaces.
    pub fn enter(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.mnt.display()))
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(prog);
        c
    }

    /// The kubelet's log.
    pub fn kubelet_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kubelet.log")).unwrap_or_default()
    }

    /// containerd's socket as seen from this machine.
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd-run/containerd.sock")
    }

    /// `ctr` against this node's containerd, namespace `k8s.io`.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.socket()).args(["-n", "k8s.io"]);
        c
    }

    /// Imports an image archive into the node's containerd.
    pub fn import(&self, archive: &Path) -> Result<()> {
        ok(self
            .ctr()
            .args(["images", "import", "--no-unpack=false"])
            .arg(archive))
        .map(drop)
    }

    /// The pod sandboxes running on the node, with their processes.
    pub fn sandboxes(&self) -> Result<Vec<Sandbox>> {
        let tasks = ok(self.ctr().args(["tasks", "ls"]))?;
        let mut out = Vec::new();
        for line in tasks.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(id), Some(pid), Some("RUNNING")) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Ok(info) = ok(self.ctr().args(["containers", "info", id])) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&info)
                .map_err(|e| Error::Other(format!("ctr containers info {id}: {e}")))?;
            let l = &v["Labels"];
            if l["io.cri-containerd.kind"] != "sandbox" {
                continue;
            }
            out.push(Sandbox {
                namespace: l["io.kubernetes.pod.namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                name: l["io.kubernetes.pod.name"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                pid: pid.parse().unwrap_or(0),
            });
        }
        Ok(out)
    }

    fn mount_namespace(&self) -> Result<()> {
        let nsdir = self.dir.join("ns");
        std::fs::create_dir_all(&nsdir)?;
        // A persistent namespace is bound to a file on a private mount.
        ok(Command::new("mount").arg("--bind").arg(&nsdir).arg(&nsdir))?;
        ok(Command::new("mount").arg("--make-private").arg(&nsdir))?;
        std::fs::write(&self.mnt, "")?;
        let mut script = String::from("set -e\n");
        for (sub, at) in BINDS {
            let host = self.dir.join(sub);
            std::fs::create_dir_all(&host)?;
            // The mount point, empty, where the host has none.
            std::fs::create_dir_all(at)?;
            script.push_str(&format!("mount --bind '{}' '{at}'\n", host.display()));
        }
        // As on a systemd host: mounts shared, so a container's
        // HostToContainer mount (the DaemonSet's netns volume) follows.
        script.push_str("mount --make-rshared /\n");
        ok(Command::new("unshare")
            .arg(format!("--mount={}", self.mnt.display()))
            .args(["--propagation", "private", "sh", "-c", &script]))?;
        Ok(())
    }

    fn cgroups(&self) -> Result<()> {
        for c in CGROUPS {
            let base = Path::new("/sys/fs/cgroup").join(c);
            if !base.is_dir() {
                continue;
            }
            let d = base.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&d)?;
            if c == "cpuset" {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    std::fs::write(d.join(f), std::fs::read_to_string(base.join(f))?)?;
                }
            }
        }
        Ok(())
    }

    fn start_containerd(&mut self, spec: &KubeletSpec) -> Result<()> {
        let conf = self.dir.join("containerd.toml");
        std::fs::write(&conf, containerd_toml(&spec.pause_image))?;
        let mut cmd = self.enter(paths::system("containerd")?);
        cmd.arg("--config").arg(&conf);
        let d = Daemon::spawn(
            &format!("containerd ({})", self.name),
            cmd,
            &self.dir.join("containerd.log"),
        )?;
        self.containerd = Some(d);
        let sock = self.socket();
        wait::until(
            "containerd to serve",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || Ok(ok(self.ctr().arg("version")).ok().filter(|_| sock.exists())),
        )?;
        Ok(())
    }

    fn start_kubelet(&mut self, spec: &KubeletSpec) -> Result<()> {
        let kubeconfig = self.dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: kubelet\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: kubelet\ncurrent-context: lab\n",
                spec.server
            ),
        )?;
        let config = self.dir.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 cgroupDriver: cgroupfs\ncgroupRoot: {root}\nfailSwapOn: false\n\
                 readOnlyPort: 0\nhealthzPort: 0\n\
                 authentication:\n  anonymous:\n    enabled: true\n  webhook:\n    enabled: false\n\
                 authorization:\n  mode: AlwaysAllow\n\
                 evictionHard:\n  memory.available: \"1Mi\"\n  nodefs.available: \"0%\"\n  imagefs.available: \"0%\"\n  nodefs.inodesFree: \"0%\"\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 serializeImagePulls: false\nmaxPods: 250\nnodeStatusUpdateFrequency: 4s\n",
                root = self.cgroup_root
            ),
        )?;
        let mut cmd = self.enter(paths::cache_bin("kubelet")?);
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--container-runtime=remote",
                "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
                "--root-dir=/var/lib/kubelet",
                "--cert-dir=/var/lib/kubelet/pki",
            ])
            .arg(format!("--hostname-override={}", spec.name))
            .arg(format!("--node-ip={}", spec.ip))
            .arg(format!("--pod-infra-container-image={}", spec.pause_image))
            .arg("--v=1");
        self.kubelet = Some(Daemon::spawn(
            &format!("kubelet ({})", self.name),
            cmd,
            &self.dir.join("kubelet.log"),
        )?);
        Ok(())
    }

    /// Every process in the node's cgroups (its pods' containers).
    fn pod_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let base = Path::new("/sys/fs/cgroup/pids").join(self.cgroup_root.trim_start_matches('/'));
        let mut stack = vec![base];
        while let Some(d) = stack.pop() {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.parse::<u32>().ok()));
            }
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
        }
        out
    }

    /// Every process whose mount namespace is the node's (containerd, its
    /// shims, the kubelet).
    fn node_pids(&self) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt;
        let Ok(ino) = std::fs::metadata(&self.mnt).map(|m| m.ino()) else {
            return Vec::new();
        };
        let want = format!("mnt:[{ino}]");
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .is_ok_and(|l| l.to_string_lossy() == want)
            })
            .collect()
    }
}

fn kill_all(pids: &[u32]) {
    for &p in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            k.stop(Duration::from_secs(5));
        }
        // Containers, then containerd and its shims, until none is left.
        for _ in 0..50 {
            let pods = self.pod_pids();
            let mut node = self.node_pids();
            if pods.is_empty() && node.is_empty() {
                break;
            }
            kill_all(&pods);
            if let Some(mut c) = self.containerd.take() {
                c.stop(Duration::from_secs(2));
                node = self.node_pids();
            }
            kill_all(&node);
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("umount").arg(self.dir.join("ns")).status();
        for c in CGROUPS {
            remove_cgroup(
                &Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(self.cgroup_root.trim_start_matches('/')),
            );
        }
        // Mounts containerd made (overlay snapshots) lived in the node's
        // namespace and went with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a cgroup directory and its children, depth first.
fn remove_cgroup(d: &Path) {
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(d);
}

/// The containerd configuration of a lab node: CRI with `pause` as the
/// sandbox image, CNI from the node's own `/opt/cni/bin` and
/// `/etc/cni/net.d`.
fn containerd_toml(pause: &str) -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#
    )
}
