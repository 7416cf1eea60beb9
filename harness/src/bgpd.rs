//! Real BGP daemons (BIRD 2, FRR, GoBGP, ExaBGP) run inside a namespace.
//!
//! Each daemon gets a private directory (config, control socket, log) and
//! runs in the foreground under `ip netns exec`, so its PID is ours to stop.
//! Configs are passed in whole; `{dir}` in a config is replaced by the
//! daemon's directory. The query helpers return the daemon's own output so
//! tests can assert on what the real implementation believes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{Daemon, run};
use crate::{Netns, Result, names, paths};

fn prepare(hint: &str, file: &str, conf: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = names::temp_dir(hint)?;
    let path = dir.path().join(file);
    std::fs::write(
        &path,
        conf.replace("{dir}", &dir.path().display().to_string()),
    )?;
    Ok((dir, path))
}

/// Waits until `path` exists, failing early (with the log) if `daemon` exits.
fn wait_for_path(daemon: &mut Daemon, path: &Path, what: &str) -> Result<()> {
    daemon.await_ready(
        what,
        Duration::from_secs(10),
        Duration::from_millis(20),
        || path.exists().then_some(()),
    )
}

/// BIRD 2 (`bird -f`), queried through `birdc`.
#[derive(Debug)]
pub struct Bird {
    daemon: Daemon,
    ctl: PathBuf,
    dir: tempfile::TempDir,
}

impl Bird {
    /// Starts BIRD in `ns` with config text `conf` and waits for its socket.
    pub fn start(ns: &Netns, conf: &str) -> Result<Self> {
        let (dir, conf_path) = prepare("bird", "bird.conf", conf)?;
        let ctl = dir.path().join("bird.ctl");
        let mut cmd = ns.cmd(paths::system("bird")?);
        cmd.arg("-f").arg("-c").arg(&conf_path).arg("-s").arg(&ctl);
        let mut daemon = Daemon::spawn("bird", cmd, &dir.path().join("bird.log"))?;
        wait_for_path(&mut daemon, &ctl, "bird control socket")?;
        Ok(Self { daemon, ctl, dir })
    }

    /// Runs a `birdc` command (e.g. `show protocols all`).
    pub fn birdc(&self, command: &str) -> Result<String> {
        let mut c = Command::new(paths::system("birdc")?);
        c.arg("-s").arg(&self.ctl);
        c.args(command.split_whitespace());
        run(&mut c)
    }

    /// True when protocol `name` is in state Established.
    pub fn established(&self, name: &str) -> bool {
        self.birdc(&format!("show protocols {name}"))
            .map(|o| o.contains("Established"))
            .unwrap_or(false)
    }

    /// The process, e.g. to `kill9` it in a graceful-restart test.
    pub fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    /// BIRD's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// GoBGP (`gobgpd`), queried with the `gobgp` CLI over its gRPC API.
#[derive(Debug)]
pub struct Gobgp {
    // Held for their Drop: the process is stopped, then its directory goes.
    _daemon: Daemon,
    ns_name: String,
    port: u16,
    _dir: tempfile::TempDir,
}

/// GoBGP's neighbour timers: hold time 9 s, keepalive 3 s.
pub const GOBGP_TIMERS: &str =
    "  [neighbors.timers.config]\n    hold-time = 9\n    keepalive-interval = 3\n";

/// A gobgpd configuration: AS `asn` at `me` (router ID and source
/// address), one neighbour `peer` of AS `peer_as`, hold time 9 s.
pub fn gobgp_conf(asn: u32, me: &str, peer: &str, peer_as: u32) -> String {
    gobgp_conf_with(asn, me, peer, peer_as, GOBGP_TIMERS)
}

/// [`gobgp_conf`] with `neighbor` (lines of TOML) for the neighbour's
/// section in place of the timers.
pub fn gobgp_conf_with(asn: u32, me: &str, peer: &str, peer_as: u32, neighbor: &str) -> String {
    format!(
        r#"[global.config]
  as = {asn}
  router-id = "{me}"
  local-address-list = ["{me}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{peer}"
    peer-as = {peer_as}
{neighbor}"#
    )
}

impl Gobgp {
    /// Starts gobgpd in `ns` with TOML config `conf`; its API listens on the
    /// namespace's own loopback.
    pub fn start(ns: &Netns, conf: &str) -> Result<Self> {
        let (dir, conf_path) = prepare("gobgp", "gobgpd.toml", conf)?;
        let port = 50051;
        let mut cmd = ns.cmd(paths::system("gobgpd")?);
        cmd.arg("-f")
            .arg(&conf_path)
            .arg("-t")
            .arg("toml")
            .arg("--api-hosts")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--pprof-disable");
        let mut daemon = Daemon::spawn("gobgpd", cmd, &dir.path().join("gobgpd.log"))?;
        let me_ns = ns.name().to_owned();
        let probe = |ns_name: &str| {
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns_name,
                "gobgp",
                "-p",
                &port.to_string(),
                "global",
            ]))
        };
        daemon.await_ready(
            "gobgpd API",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || probe(&me_ns).ok().map(drop),
        )?;
        Ok(Self {
            _daemon: daemon,
            ns_name: me_ns,
            port,
            _dir: dir,
        })
    }

    /// Runs `gobgp -p PORT args...` in the daemon's namespace.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns_name,
                "gobgp",
                "-p",
                &self.port.to_string(),
            ])
            .args(args))
    }

    /// True when neighbor `addr` is established.
    pub fn established(&self, addr: &str) -> bool {
        self.gobgp(&["neighbor", addr])
            .map(|o| o.to_lowercase().contains("bgp state = established"))
            .unwrap_or(false)
    }
}

/// FRR: `bgpd`, with `zebra` when routes must reach the kernel, and
/// `bfdd` (through zebra) for BFD.
#[derive(Debug)]
pub struct Frr {
    // bgpd stops before bfdd, bfdd before zebra.
    bgpd: Daemon,
    _bfdd: Option<Daemon>,
    zebra: Option<Daemon>,
    dir: tempfile::TempDir,
}

impl Frr {
    /// Starts FRR in `ns` from an integrated config (`bgpd.conf`); with
    /// `zebra`, best routes are installed in the namespace's kernel table.
    pub fn start(ns: &Netns, conf: &str, zebra: bool) -> Result<Self> {
        Self::start_with(ns, conf, zebra, None)
    }

    /// [`Frr::start`] with zebra and `bfdd` configured with `bfd` (its
    /// `bfd` section), for `neighbor … bfd` in `conf`.
    pub fn start_with_bfd(ns: &Netns, conf: &str, bfd: &str) -> Result<Self> {
        Self::start_with(ns, conf, true, Some(bfd))
    }

    fn start_with(ns: &Netns, conf: &str, zebra: bool, bfd: Option<&str>) -> Result<Self> {
        let (dir, conf_path) = prepare("frr", "bgpd.conf", conf)?;
        let d = dir.path().to_owned();
        std::fs::write(d.join("zebra.conf"), "hostname zebra\n")?;
        std::fs::write(d.join("vtysh.conf"), "")?;
        run(Command::new("chown").args(["-R", "frr:frr"]).arg(&d))?;
        let common = |c: &mut Command, pid: &str| {
            c.arg("-i")
                .arg(d.join(pid))
                .arg("-z")
                .arg(d.join("zserv.api"))
                .arg("--vty_socket")
                .arg(&d)
                .arg("-P")
                .arg("0");
        };
        let zebra_d = if zebra {
            let mut c = ns.cmd(paths::system("zebra")?);
            c.arg("-f").arg(d.join("zebra.conf"));
            common(&mut c, "zebra.pid");
            let mut z = Daemon::spawn("zebra", c, &d.join("zebra.log"))?;
            let api = d.join("zserv.api");
            wait_for_path(&mut z, &api, "zebra socket")?;
            Some(z)
        } else {
            None
        };
        let bfdd = match bfd {
            Some(text) => {
                let f = d.join("bfdd.conf");
                std::fs::write(&f, text)?;
                run(Command::new("chown").args(["frr:frr"]).arg(&f))?;
                let mut c = ns.cmd(paths::system("bfdd")?);
                c.arg("-f").arg(&f);
                common(&mut c, "bfdd.pid");
                let mut b = Daemon::spawn("bfdd", c, &d.join("bfdd.log"))?;
                wait_for_path(&mut b, &d.join("bfdd.vty"), "bfdd vty socket")?;
                Some(b)
            }
            None => None,
        };
        let mut c = ns.cmd(paths::system("bgpd")?);
        c.arg("-f").arg(&conf_path);
        common(&mut c, "bgpd.pid");
        if !zebra {
            c.arg("-Z");
        }
        let mut bgpd = Daemon::spawn("bgpd", c, &d.join("bgpd.log"))?;
        let vty = d.join("bgpd.vty");
        wait_for_path(&mut bgpd, &vty, "bgpd vty socket")?;
        Ok(Self {
            bgpd,
            _bfdd: bfdd,
            zebra: zebra_d,
            dir,
        })
    }

    /// Runs a `vtysh -c` command against this FRR.
    pub fn vtysh(&self, command: &str) -> Result<String> {
        run(Command::new(paths::system("vtysh")?)
            .arg("--vty_socket")
            .arg(self.dir.path())
            .arg("-c")
            .arg(command))
    }

    /// bgpd's process.
    pub fn bgpd(&mut self) -> &mut Daemon {
        &mut self.bgpd
    }

    /// True when zebra runs alongside bgpd.
    pub fn has_zebra(&self) -> bool {
        self.zebra.is_some()
    }
}

/// ExaBGP 5 with a JSON API helper that logs every event to `received.jsonl`
/// and announces whatever lines are written to its `commands` file.
#[derive(Debug)]
pub struct Exabgp {
    daemon: Daemon,
    dir: tempfile::TempDir,
}

/// An ExaBGP configuration: `me` (AS `local_as`) peering with `peer`
/// (AS `peer_as`), hold time 9 s, IPv4 unicast, everything it hears
/// reported to [`Exabgp::received`].
pub fn exabgp_conf(me: &str, local_as: u32, peer: &str, peer_as: u32) -> String {
    format!(
        r#"process api {{ run {{helper}}; encoder json; }}
neighbor {peer} {{
  router-id {me}; local-address {me}; local-as {local_as}; peer-as {peer_as};
  hold-time 9;
  family {{ ipv4 unicast; }}
  api {{ processes [ api ]; neighbor-changes; receive {{ parsed; update; }} }}
}}
"#
    )
}

impl Exabgp {
    /// Starts ExaBGP in `ns`. In `conf`, `{helper}` names the API helper
    /// script to `run` in a `process` block.
    pub fn start(ns: &Netns, conf: &str) -> Result<Self> {
        let dir = names::temp_dir("exa")?;
        let d = dir.path();
        let helper = d.join("helper.sh");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\n# stdout: commands to ExaBGP; stdin: JSON events.\n\
                 touch {cmds}\ntail -n +1 -f {cmds} &\n\
                 while read -r line; do printf '%s\\n' \"$line\" >> {out}; done\n",
                cmds = d.join("commands").display(),
                out = d.join("received.jsonl").display()
            ),
        )?;
        run(Command::new("chmod").arg("0755").arg(&helper))?;
        let conf_path = d.join("exabgp.conf");
        std::fs::write(
            &conf_path,
            conf.replace("{helper}", &helper.display().to_string())
                .replace("{dir}", &d.display().to_string()),
        )?;
        let mut cmd = ns.cmd(paths::exabgp()?);
        cmd.env("exabgp_daemon_user", "root")
            .env("exabgp_api_cli", "false")
            .env("exabgp_log_destination", "stdout")
            .arg("server")
            .arg(&conf_path);
        let daemon = Daemon::spawn("exabgp", cmd, &d.join("exabgp.log"))?;
        Ok(Self { daemon, dir })
    }

    /// Sends an API command (e.g. `announce route 10.0.0.0/24 next-hop self`).
    pub fn command(&self, line: &str) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::options()
            .append(true)
            .create(true)
            .open(self.dir.path().join("commands"))?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    /// Every JSON event ExaBGP reported so far.
    pub fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("received.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The process.
    pub fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}
