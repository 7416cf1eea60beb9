//! Container images made offline, for the lab's real nodes (no registry,
//! no container engine): OCI image archives (`oci-layout`, one layer)
//! that containerd imports with `ctr images import`.
//!
//! - [`margay`]: Margay's image as the Dockerfile describes it (the same
//!   files at the same paths, the same entrypoint), assembled from the
//!   workspace's binaries, the libraries `ldd` names, and the `nft` the
//!   agent execs, with its libraries;
//! - [`lab_pod`]: `margay.dev/lab-pod:latest`, busybox (sh, ping, nc,
//!   httpd, sleep...);
//! - [`pause`]: the sandbox image, busybox sleeping.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The image the chart and manifest run by default.
pub const MARGAY_IMAGE: &str = "ghcr.io/margay-dev/margay:0.1.0";
/// The lab's workload image.
pub const LAB_POD_IMAGE: &str = "margay.dev/lab-pod:latest";
/// The sandbox ("pause") image the lab's containerd and kubelets use.
pub const PAUSE_IMAGE: &str = "margay.dev/pause:3.2";

/// Where the Dockerfile puts Margay's binaries.
pub const BIN_DIR: &str = "usr/local/bin";
/// Margay's binaries in its image.
pub const BINARIES: [&str; 3] = ["margay-agent", "margayctl", "margay"];

/// What the image runs.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
}

fn sha256(p: &Path) -> anyhow::Result<(String, u64)> {
    let out = Command::new("sha256sum").arg(p).output()?;
    if !out.status.success() {
        bail!("sha256sum {}", p.display());
    }
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .context("sha256sum output")?
        .to_string();
    Ok((hex, std::fs::metadata(p)?.len()))
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes an OCI image archive of `rootfs` named `name` to `out`.
pub fn archive(rootfs: &Path, name: &str, config: &Config, out: &Path) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("margay-image-")
        .tempdir_in(out.parent().unwrap_or(Path::new("/tmp")))?;
    let img = work.path().join("oci");
    let blobs = img.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer = work.path().join("layer.tar");
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("--owner=0")
        .arg("--group=0")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let put = |src: &Path| -> anyhow::Result<(String, u64)> {
        let (h, n) = sha256(src)?;
        std::fs::copy(src, blobs.join(&h))?;
        Ok((h, n))
    };
    let (lh, ln) = put(&layer)?;
    let write = |file: &str, v: &Value| -> anyhow::Result<PathBuf> {
        let p = work.path().join(file);
        std::fs::write(&p, v.to_string())?;
        Ok(p)
    };
    let mut cfg = json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    });
    if !config.entrypoint.is_empty() {
        cfg["Entrypoint"] = json!(config.entrypoint);
    }
    if !config.cmd.is_empty() {
        cfg["Cmd"] = json!(config.cmd);
    }
    let config = write(
        "config.json",
        &json!({"architecture": "amd64", "os": "linux", "config": cfg,
                "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{lh}")]}}),
    )?;
    let (ch, cn) = put(&config)?;
    let manifest = write(
        "manifest.json",
        &json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": format!("sha256:{ch}"), "size": cn},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": format!("sha256:{lh}"), "size": ln}]}),
    )?;
    let (mh, mn) = put(&manifest)?;
    std::fs::write(
        img.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{mh}"), "size": mn,
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name}}]})
        .to_string(),
    )?;
    std::fs::write(img.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let tmp = out.with_extension("tar.tmp");
    run(Command::new("tar")
        .arg("-C")
        .arg(&img)
        .arg("-cf")
        .arg(&tmp)
        .arg("."))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Copies `bin` to `dest` (a path inside `root`) with every library
/// `ldd` names for it, at the paths `ldd` gives.
fn with_libraries(root: &Path, bin: &Path, dest: &str) -> anyhow::Result<()> {
    let copy = |src: &Path, rel: &str| -> anyhow::Result<()> {
        let to = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("a parent")?)?;
        // The file itself, not a symlink to it.
        std::fs::copy(std::fs::canonicalize(src)?, &to)
            .with_context(|| format!("copying {}", src.display()))?;
        Ok(())
    };
    copy(bin, dest)?;
    let out = run(Command::new("ldd").arg(bin))?;
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            copy(Path::new(p), p)?;
        }
    }
    Ok(())
}

/// Margay's image from the binaries in `bin_dir`, into `out`.
pub fn margay(bin_dir: &Path, name: &str, out: &Path) -> anyhow::Result<()> {
    let root = tempfile::Builder::new()
        .prefix("margay-rootfs-")
        .tempdir_in(out.parent().unwrap_or(Path::new("/tmp")))?;
    for b in BINARIES {
        let src = bin_dir.join(b);
        if !src.exists() {
            bail!("{} not built", src.display());
        }
        with_libraries(root.path(), &src, &format!("{BIN_DIR}/{b}"))?;
    }
    // The agent execs nft (natOutgoing): the Dockerfile installs Debian's.
    with_libraries(root.path(), Path::new("/usr/sbin/nft"), "usr/sbin/nft")?;
    for d in ["tmp", "var/run", "etc"] {
        std::fs::create_dir_all(root.path().join(d))?;
    }
    let config = Config {
        entrypoint: vec!["/usr/local/bin/margay-agent".into()],
        cmd: vec!["run".into()],
    };
    archive(root.path(), name, &config, out)
}

/// A busybox root: `/bin/busybox` and a link per applet in `applets`.
fn busybox_root(dir: &Path, applets: &[&str]) -> anyhow::Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox")).context("busybox-static")?;
    for a in applets {
        std::os::unix::fs::symlink("busybox", bin.join(a))?;
    }
    for d in ["tmp", "etc", "var/www"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    Ok(())
}

/// The lab's workload image: busybox, sleeping until stopped.
pub fn lab_pod(out: &Path) -> anyhow::Result<()> {
    let root = tempfile::Builder::new()
        .prefix("lab-pod-rootfs-")
        .tempdir_in(out.parent().unwrap_or(Path::new("/tmp")))?;
    busybox_root(
        root.path(),
        &[
            "sh", "ping", "nc", "httpd", "sleep", "ip", "ifconfig", "wget", "cat", "ls", "echo",
            "hostname", "ps", "kill", "true",
        ],
    )?;
    let config = Config {
        entrypoint: vec![],
        cmd: vec!["/bin/sleep".into(), "2147483647".into()],
    };
    archive(root.path(), LAB_POD_IMAGE, &config, out)
}

/// The sandbox image: busybox sleeping.
pub fn pause(out: &Path) -> anyhow::Result<()> {
    let root = tempfile::Builder::new()
        .prefix("pause-rootfs-")
        .tempdir_in(out.parent().unwrap_or(Path::new("/tmp")))?;
    busybox_root(root.path(), &["sleep"])?;
    let config = Config {
        entrypoint: vec!["/bin/sleep".into(), "2147483647".into()],
        cmd: vec![],
    };
    archive(root.path(), PAUSE_IMAGE, &config, out)
}

/// An archive unpacked: its directory and a reader of its blobs by digest.
struct Unpacked {
    dir: tempfile::TempDir,
    manifest: Value,
}

impl Unpacked {
    fn new(archive: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        run(Command::new("tar")
            .arg("-C")
            .arg(dir.path())
            .arg("-xf")
            .arg(archive))?;
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json"))?)?;
        let mut me = Self {
            dir,
            manifest: Value::Null,
        };
        let m = index["manifests"][0]["digest"].as_str().context("index")?;
        me.manifest = serde_json::from_str(&std::fs::read_to_string(me.blob(m))?)?;
        Ok(me)
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.dir
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }
}

/// The paths of the files an image archive holds (its one layer's).
pub fn files(archive: &Path) -> anyhow::Result<Vec<String>> {
    let u = Unpacked::new(archive)?;
    let layer = u.manifest["layers"][0]["digest"]
        .as_str()
        .context("layer")?;
    let list = run(Command::new("tar").arg("-tf").arg(u.blob(layer)))?;
    Ok(list
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The image config (`config` of the OCI config blob) of an archive.
pub fn config(archive: &Path) -> anyhow::Result<Value> {
    let u = Unpacked::new(archive)?;
    let c = u.manifest["config"]["digest"].as_str().context("config")?;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(u.blob(c))?)?;
    Ok(v["config"].clone())
}
