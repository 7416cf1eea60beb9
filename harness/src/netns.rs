//! Network namespaces made by the harness, and commands run inside them.
//!
//! A [`Netns`] is created with loopback up and deleted on drop, after every
//! process still inside it has been killed (by PID, from `ip netns pids`).
//! Only namespaces the harness made are ever touched; the root namespace's
//! links, routes and sysctls are never changed.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use crate::process::{destroy_netns as destroy, pids_in, run};
use crate::{Error, Result, names};

/// A named network namespace (`/run/netns/<name>`) owned by this value.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates a fresh namespace with a unique name derived from `hint`
    /// (keep hints short: they show up in interface-free names only).
    pub fn create(hint: &str) -> Result<Self> {
        let name = names::unique(hint);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on an existing namespace that is not deleted on drop.
    pub fn borrowed(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what CNI_NETNS and `nsenter --net=` take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// An open handle on the namespace, for `setns`.
    pub fn open(&self) -> Result<File> {
        Ok(File::open(self.path())?)
    }

    /// Runs `f` with the calling thread inside the namespace, then moves
    /// the thread back (what the agent does in its node's namespace:
    /// sockets opened in `f` stay bound to this one).
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        use nix::sched::{CloneFlags, setns};
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(self.open()?, CloneFlags::CLONE_NEWNET)?;
        let r = f();
        setns(home, CloneFlags::CLONE_NEWNET)?;
        Ok(r)
    }

    /// A command that will run `prog` inside the namespace (`ip netns exec`
    /// execs, so the child's PID is the program's PID).
    pub fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// Like [`Netns::cmd`] but through `nsenter --net`, which keeps the host's
    /// `/sys` mounted (containerd and runc need it; `ip netns exec` remounts).
    pub fn nsenter(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg(prog);
        c
    }

    /// Runs `prog args...` inside the namespace, returning stdout.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<String> {
        run(self.cmd(prog).args(args))
    }

    /// Runs a shell snippet inside the namespace, returning stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        run(self.cmd("sh").args(["-c", script]))
    }

    /// `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a sysctl inside the namespace, e.g. `net.ipv4.ip_forward`, `1`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.exec("sysctl", &["-n", key])?.trim().to_owned())
    }

    /// PIDs of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }

    /// `ping -c1` from inside this namespace; true when it is answered.
    pub fn ping(&self, addr: &str) -> bool {
        self.exec("ping", &["-c1", "-W1", "-q", addr]).is_ok()
    }

    /// Fails unless `addr` answers a ping from this namespace within a few tries.
    pub fn ping_ok(&self, addr: &str) -> Result<()> {
        for _ in 0..5 {
            if self.ping(addr) {
                return Ok(());
            }
        }
        Err(Error::Other(format!(
            "{}: no answer from {addr}",
            self.name
        )))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            destroy(&self.name);
        }
    }
}

/// Joins two namespaces with a veth pair: `a_if` in `a`, `b_if` in `b`,
/// both up. The pair is made inside `a`, so names only need to be unique
/// within the two namespaces.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
