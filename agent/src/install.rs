//! `margay-agent install-cni`: puts the `margay` plugin and its conflist
//! onto the host (the DaemonSet's init container runs it with the host's
//! `/opt/cni/bin` and `/etc/cni/net.d` mounted).
//!
//! Every file is written to a hidden temporary name in the target
//! directory, synced, given its mode, then renamed over the target, so a
//! runtime never sees half a file; a file whose content is already right
//! is not touched (re-running is a no-op); nothing else in the directories
//! is changed. The conflist comes from a template (`CNI_NETWORK_CONFIG`,
//! from the ConfigMap) with `__NODENAME__`, `__MTU__`, `__SOCKET__` and
//! `__LOG_LEVEL__` filled in, and must be valid JSON naming the `margay`
//! plugin.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The conflist used when no template is given.
pub const DEFAULT_TEMPLATE: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "margay", "socket": "__SOCKET__", "mtu": __MTU__},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

/// Settings of `install-cni`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Where CNI plugins live on the host.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where CNI network configurations live on the host.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/host/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The conflist's file name (lowest sorting name wins in most runtimes).
    #[arg(long, env = "CNI_CONF_NAME", default_value = "10-margay.conflist")]
    pub conf_name: String,
    /// The plugin binary to copy (default: `margay` next to this program).
    #[arg(long, env = "MARGAY_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// Conflist template (default: a margay + portmap + bandwidth chain).
    #[arg(long, env = "CNI_NETWORK_CONFIG")]
    pub template: Option<String>,
    /// This node's name, for `__NODENAME__`.
    #[arg(long, env = "NODENAME", default_value = "")]
    pub node_name: String,
    /// Pod MTU for `__MTU__` (0: the agent derives it from the pool's encapsulation).
    #[arg(long, env = "MARGAY_MTU", default_value_t = 0)]
    pub mtu: u32,
    /// The agent's socket, for `__SOCKET__`.
    #[arg(long, default_value = margay_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Log level, for `__LOG_LEVEL__`.
    #[arg(long, env = "MARGAY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// What happened to each file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (new or changed).
    Written(PathBuf),
    /// Already right; not touched.
    Unchanged(PathBuf),
}

/// Fills the template; errors name what is wrong with the result.
pub fn render(args: &InstallArgs) -> crate::Result<String> {
    let t = args.template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
    let mtu = if args.mtu == 0 {
        // The plugin treats 0 as "not set": the agent decides.
        "0".to_string()
    } else {
        args.mtu.to_string()
    };
    let text = t
        .replace("__NODENAME__", &args.node_name)
        .replace("__MTU__", &mtu)
        .replace("__SOCKET__", &args.socket.display().to_string())
        .replace("__LOG_LEVEL__", &args.log_level);
    let bad = |m: String| crate::Error::Config(m);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "the CNI config template is not valid JSON once filled in: {e}"
        ))
    })?;
    let plugins = v["plugins"]
        .as_array()
        .ok_or_else(|| bad("the CNI config template has no \"plugins\" list".into()))?;
    if !plugins.iter().any(|p| p["type"] == "margay") {
        return Err(bad(
            "the CNI config template does not use the \"margay\" plugin".into(),
        ));
    }
    if v["name"].as_str().is_none_or(|n| n.is_empty()) {
        return Err(bad("the CNI config template has no network \"name\"".into()));
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| bad(e.to_string()))?;
    Ok(text + "\n")
}

/// Writes `content` to `target` atomically with `mode`, unless it already
/// holds exactly that with that mode.
pub fn write_atomic(target: &Path, content: &[u8], mode: u32) -> std::io::Result<Outcome> {
    if let Ok(old) = std::fs::read(target)
        && old == content
        && std::fs::metadata(target)?.permissions().mode() & 0o7777 == mode
    {
        return Ok(Outcome::Unchanged(target.to_path_buf()));
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and without a .conf/.conflist/.json suffix: no runtime reads it.
    let tmp = dir.join(format!(".{name}.margay-tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, target)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map(|()| Outcome::Written(target.to_path_buf()))
}

/// Installs the plugin and the conflist.
pub fn install(args: &InstallArgs) -> crate::Result<Vec<Outcome>> {
    use crate::Error;
    let plugin = match &args.plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::io("finding this program", e))?
            .with_file_name("margay"),
    };
    let bin = std::fs::read(&plugin)
        .map_err(|e| Error::io(format!("cannot read the plugin {}", plugin.display()), e))?;
    let conf = render(args)?;
    Ok(vec![
        write_atomic(&args.cni_bin_dir.join("margay"), &bin, 0o755)
            .map_err(|e| Error::io(format!("installing into {}", args.cni_bin_dir.display()), e))?,
        write_atomic(
            &args.cni_conf_dir.join(&args.conf_name),
            conf.as_bytes(),
            0o644,
        )
        .map_err(|e| Error::io(format!("writing into {}", args.cni_conf_dir.display()), e))?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn args(root: &Path) -> InstallArgs {
        let plugin = root.join("src-margay");
        std::fs::write(&plugin, b"\x7fELF plugin").unwrap();
        InstallArgs {
            cni_bin_dir: root.join("opt/cni/bin"),
            cni_conf_dir: root.join("etc/cni/net.d"),
            conf_name: "10-margay.conflist".into(),
            plugin: Some(plugin),
            template: None,
            node_name: "node1".into(),
            mtu: 1400,
            socket: "/var/run/margay/agent.sock".into(),
            log_level: "info".into(),
        }
    }

    #[test]
    fn lands_with_modes_keeps_others_and_reruns_as_a_no_op() {
        let root = tempfile::tempdir().unwrap();
        let a = args(root.path());
        std::fs::create_dir_all(&a.cni_conf_dir).unwrap();
        let other = a.cni_conf_dir.join("05-other.conflist");
        std::fs::write(&other, "{\"name\":\"other\"}").unwrap();
        let out = install(&a).unwrap();
        assert!(out.iter().all(|o| matches!(o, Outcome::Written(_))));
        let bin = a.cni_bin_dir.join("margay");
        let conf = a.cni_conf_dir.join("10-margay.conflist");
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF plugin");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "margay");
        assert_eq!(v["plugins"][0]["mtu"], 1400);
        assert_eq!(v["plugins"][0]["socket"], "/var/run/margay/agent.sock");
        assert_eq!(
            std::fs::read_to_string(&other).unwrap(),
            "{\"name\":\"other\"}"
        );
        // Re-run: nothing written, same inodes, no temp files left.
        let inode = std::fs::metadata(&conf).unwrap().ino();
        let out = install(&a).unwrap();
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Unchanged(_))),
            "{out:?}"
        );
        assert_eq!(std::fs::metadata(&conf).unwrap().ino(), inode);
        let names: Vec<String> = std::fs::read_dir(&a.cni_conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A change (new MTU) is written.
        let mut b = a.clone();
        b.mtu = 1450;
        assert!(matches!(install(&b).unwrap()[1], Outcome::Written(_)));
    }

    #[test]
    fn a_reader_never_sees_half_a_file() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("10-margay.conflist");
        let big_a = vec![b'a'; 4 << 20];
        let big_b = vec![b'b'; 4 << 20];
        write_atomic(&target, &big_a, 0o644).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (t, stop) = (target.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let c = std::fs::read(&t).unwrap();
                    assert_eq!(c.len(), 4 << 20, "a partial file was visible");
                    assert!(c.iter().all(|&x| x == c[0]), "a mixed file was visible");
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..20 {
            write_atomic(&target, if i % 2 == 0 { &big_b } else { &big_a }, 0o644).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    #[test]
    fn bad_templates_are_refused_and_nothing_is_written() {
        let root = tempfile::tempdir().unwrap();
        let mut a = args(root.path());
        for (t, why) in [
            ("{not json", "not valid JSON"),
            (
                r#"{"name": "x", "plugins": [{"type": "bridge"}]}"#,
                "does not use",
            ),
            (r#"{"name": "x"}"#, "no \"plugins\""),
        ] {
            a.template = Some(t.into());
            let e = install(&a).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        assert!(!a.cni_conf_dir.exists() && !a.cni_bin_dir.exists());
        a.template = None;
        a.plugin = Some(root.path().join("missing"));
        assert!(
            install(&a)
                .unwrap_err()
                .to_string()
                .contains("cannot read the plugin")
        );
    }
}
