//! A real control plane on loopback: etcd + kube-apiserver v1.20.
//!
//! One [`ApiServer`] per test (about 6 s to start): tests stay independent
//! and can run in parallel. etcd keeps its data on tmpfs so fsync is free.
//! Auth is a static token in `system:masters`; RBAC is on, so tests can also
//! bind roles to other tokens ([`ApiServer::start_with_tokens`]). Only the
//! apiserver runs: no controller-manager, so tests create Node objects and
//! ServiceAccounts themselves.

pub mod broker;
pub mod crds;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::netns::Netns;
use crate::process::{Daemon, run};
use crate::{Error, Result, names, paths, wait};

/// The admin token every harness apiserver accepts.
pub const ADMIN_TOKEN: &str = "margay-admin-token";

/// A running etcd + kube-apiserver pair (or, inside a VM, one the VM's
/// host runs for it: see [`crate::broker`]).
#[derive(Debug)]
pub struct ApiServer {
    // Field order is drop order: the processes stop first, the directory
    // goes last.
    backend: Backend,
    port: u16,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

#[derive(Debug)]
enum Backend {
    /// etcd and kube-apiserver are children of this process.
    Local(Box<Local>),
    /// A broker on the VM's host runs them; this machine's loopback port
    /// relays to the host's. Closing the connection stops them.
    Remote {
        _relay: Daemon,
        _conn: std::net::TcpStream,
    },
}

#[derive(Debug)]
struct Local {
    // Relays and controllers stop first, the apiserver before etcd.
    extras: Vec<Daemon>,
    apiserver: Daemon,
    etcd: Daemon,
    /// How each was started, to start it again the same way.
    apiserver_cmd: CommandLine,
    etcd_cmd: CommandLine,
    /// etcd's client port.
    etcd_port: u16,
    /// The namespace it runs in and the address it serves on there.
    place: Option<(String, std::net::Ipv4Addr)>,
    /// Its serving certificate's CA (when it runs in a namespace).
    ca: Option<PathBuf>,
}

/// A program and its arguments (a `Command` cannot be cloned).
#[derive(Debug, Clone)]
struct CommandLine(PathBuf, Vec<std::ffi::OsString>);

impl CommandLine {
    fn of(cmd: &Command) -> Self {
        Self(
            PathBuf::from(cmd.get_program()),
            cmd.get_args().map(ToOwned::to_owned).collect(),
        )
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.0);
        c.args(&self.1);
        c
    }
}

/// A free TCP port on loopback (the listener is closed before returning).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    pub async fn start() -> Result<Self> {
        Self::start_with_tokens(&[]).await
    }

    /// Like [`ApiServer::start`], with extra static tokens
    /// `(token, user, groups)` for RBAC tests. Inside a VM started by
    /// `scripts/in-vm.sh` ([`crate::broker::ENV`] set), the VM's host runs
    /// it (an apiserver under emulation takes minutes to start).
    pub async fn start_with_tokens(extra: &[(&str, &str, &str)]) -> Result<Self> {
        if let Some(broker) = std::env::var_os(crate::broker::ENV) {
            let mut me = Self::remote(&broker.to_string_lossy(), extra)?;
            me.wait_ready().await?;
            return Ok(me);
        }
        Self::start_local(extra).await
    }

    /// Starts etcd and kube-apiserver as children of this process.
    pub async fn start_local(extra: &[(&str, &str, &str)]) -> Result<Self> {
        Self::start_at(None, extra).await
    }

    /// Starts etcd and kube-apiserver inside `ns`, the apiserver serving on
    /// `addr` there (and the namespace's loopback) with a certificate of a
    /// CA of its own ([`ApiServer::ca_cert`]) naming `addr`, 127.0.0.1 and
    /// the `kubernetes` Service: as a control plane on the nodes' network,
    /// which kubelets reach and which reaches kubelets (`kubectl exec`,
    /// logs). This machine's loopback relays to it at the same port, so
    /// [`ApiServer::kubeconfig`] and [`ApiServer::client`] work as usual.
    pub async fn start_in(ns: &Netns, addr: std::net::Ipv4Addr) -> Result<Self> {
        Self::start_at(Some((ns, addr)), &[]).await
    }

    async fn start_at(
        place: Option<(&Netns, std::net::Ipv4Addr)>,
        extra: &[(&str, &str, &str)],
    ) -> Result<Self> {
        let mut last = None;
        // Ports are picked then bound by a child: a parallel test can race us
        // to one, so retry with new ports a couple of times.
        for _ in 0..3 {
            match Self::try_start(place, extra).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!("apiserver start failed, retrying: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn try_start(
        place: Option<(&Netns, std::net::Ipv4Addr)>,
        extra: &[(&str, &str, &str)],
    ) -> Result<Self> {
        let apiserver_bin = paths::kube_apiserver()?;
        let etcd_bin = paths::system("etcd")?;
        let dir = names::shm_dir("kube")?;
        let d = dir.path();
        let (client, peer, port) = (free_port()?, free_port()?, free_port()?);
        let command = |prog: PathBuf| match place {
            Some((ns, _)) => ns.cmd(prog),
            None => Command::new(prog),
        };

        let mut etcd_cmd = command(etcd_bin);
        etcd_cmd
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--log-level=warn");
        let etcd_line = CommandLine::of(&etcd_cmd);
        let mut etcd = Daemon::spawn("etcd", etcd_cmd, &d.join("etcd.log"))?;

        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(d.join("sa.key"))
            .arg("2048"))?;
        run(Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(d.join("sa.key"))
            .arg("-out")
            .arg(d.join("sa.pub")))?;
        let mut tokens = format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n");
        for (i, (tok, user, groups)) in extra.iter().enumerate() {
            tokens.push_str(&format!("{tok},{user},uid-{i},\"{groups}\"\n"));
        }
        std::fs::write(d.join("tokens.csv"), tokens)?;

        etcd.await_ready(
            "etcd to listen",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || match place {
                Some((ns, _)) => ns
                    .exec(
                        "bash",
                        &["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{client}")],
                    )
                    .ok(),
                None => std::net::TcpStream::connect(("127.0.0.1", client))
                    .ok()
                    .map(|_| String::new()),
            },
        )?;

        let mut api_cmd = command(apiserver_bin);
        api_cmd.arg(format!("--etcd-servers=http://127.0.0.1:{client}"));
        let mut ca = None;
        match place {
            None => {
                api_cmd.args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"]);
            }
            Some((_, addr)) => {
                let (crt, key) = serving_cert(d, addr)?;
                api_cmd
                    .args([
                        "--bind-address=0.0.0.0",
                        &format!("--advertise-address={addr}"),
                    ])
                    .arg(format!("--tls-cert-file={}", crt.display()))
                    .arg(format!("--tls-private-key-file={}", key.display()))
                    .arg("--kubelet-preferred-address-types=InternalIP");
                ca = Some(d.join("ca.crt"));
            }
        }
        api_cmd
            .arg(format!("--secure-port={port}"))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .args([
                "--authorization-mode=RBAC",
                // As on real clusters: CNI agents run privileged.
                "--allow-privileged=true",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                "--v=0",
            ]);
        let apiserver_line = CommandLine::of(&api_cmd);
        let apiserver = Daemon::spawn("kube-apiserver", api_cmd, &d.join("apiserver.log"))?;
        let mut extras = Vec::new();
        if let Some((ns, _)) = place {
            extras.extend(relay_into(ns, port, d)?);
        }

        let kubeconfig = d.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(port, ADMIN_TOKEN))?;
        let mut me = Self {
            backend: Backend::Local(Box::new(Local {
                extras,
                apiserver,
                etcd,
                apiserver_cmd: apiserver_line,
                etcd_cmd: etcd_line,
                etcd_port: client,
                place: place.map(|(ns, addr)| (ns.name().to_string(), addr)),
                ca,
            })),
            port,
            kubeconfig,
            dir,
        };
        me.wait_ready().await?;
        Ok(me)
    }

    /// An apiserver the broker at `broker` (`host:port`) starts for us,
    /// relayed to this machine's loopback at the port it has there.
    fn remote(broker: &str, extra: &[(&str, &str, &str)]) -> Result<Self> {
        let (conn, port) = crate::broker::request(broker, extra)?;
        let host = broker.rsplit_once(':').map_or(broker, |(h, _)| h);
        let dir = names::shm_dir("kube")?;
        let mut relay = Command::new(paths::system("socat")?);
        relay
            .arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay"
            ))
            .arg(format!("TCP:{host}:{port},nodelay"));
        let relay = Daemon::spawn(
            "socat (apiserver on the VM's host)",
            relay,
            &dir.path().join("relay.log"),
        )?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(port, ADMIN_TOKEN))?;
        Ok(Self {
            backend: Backend::Remote {
                _relay: relay,
                _conn: conn,
            },
            port,
            kubeconfig,
            dir,
        })
    }

    /// The local processes, or an error naming `what` cannot be done to an
    /// apiserver the VM's host runs.
    fn local(&mut self, what: &str) -> Result<&mut Local> {
        match &mut self.backend {
            Backend::Local(l) => Ok(l),
            Backend::Remote { .. } => Err(Error::Other(format!(
                "cannot {what}: this apiserver runs on the VM's host"
            ))),
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let start = std::time::Instant::now();
        loop {
            if let Backend::Local(l) = &mut self.backend {
                l.apiserver.ensure_running()?;
                l.etcd.ensure_running()?;
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(Error::Timeout {
                    what: "kube-apiserver /readyz".into(),
                    secs: 60.0,
                    detail: match &self.backend {
                        Backend::Local(l) => format!("; log:\n{}", l.apiserver.log_tail(20)),
                        Backend::Remote { .. } => " (on the VM's host)".into(),
                    },
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The secure port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the kube-apiserver: a control
    /// plane that accepts connections and never answers.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        use nix::sys::signal::Signal;
        let Backend::Local(l) = &self.backend else {
            return Err(Error::Other(
                "cannot freeze it: this apiserver runs on the VM's host".into(),
            ));
        };
        l.apiserver.signal(if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        })
    }

    /// Stops the kube-apiserver (SIGTERM, then SIGKILL); etcd keeps its
    /// data. [`ApiServer::start_apiserver`] brings it back on the same port.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        self.local("stop it")?
            .apiserver
            .stop(Duration::from_secs(5));
        Ok(())
    }

    /// Starts the kube-apiserver again as it was started first, and waits
    /// until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        let log = self.dir.path().join("apiserver.log");
        let l = self.local("start it again")?;
        l.apiserver = Daemon::spawn("kube-apiserver", l.apiserver_cmd.command(), &log)?;
        self.wait_ready().await
    }

    /// Restarts etcd (its data stays): the apiserver loses its datastore
    /// for the time etcd takes to come back.
    pub fn restart_etcd(&mut self) -> Result<()> {
        let log = self.dir.path().join("etcd.log");
        let l = self.local("restart etcd")?;
        l.etcd.stop(Duration::from_secs(5));
        l.etcd = Daemon::spawn("etcd", l.etcd_cmd.command(), &log)?;
        let port = l.etcd_port;
        l.etcd.await_ready(
            "etcd to listen again",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        )?;
        Ok(())
    }

    /// The address nodes reach it at: `https://<addr>:<port>` when it runs
    /// in a namespace ([`ApiServer::start_in`]), else [`ApiServer::url`].
    pub fn node_url(&self) -> String {
        match &self.backend {
            Backend::Local(l) => match &l.place {
                Some((_, addr)) => format!("https://{addr}:{}", self.port),
                None => self.url(),
            },
            Backend::Remote { .. } => self.url(),
        }
    }

    /// The CA of its serving certificate (only when it runs in a
    /// namespace: else its certificate is self-signed).
    pub fn ca_cert(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(l) => l.ca.as_deref(),
            Backend::Remote { .. } => None,
        }
    }

    /// Starts kube-controller-manager (service account tokens with this
    /// apiserver's CA, DaemonSets, Deployments, node lifecycle, garbage
    /// collection) and kube-scheduler beside it, both stopped with it.
    pub fn start_controllers(&mut self) -> Result<()> {
        let d = self.dir.path().to_path_buf();
        let kubeconfig = self.kubeconfig.clone();
        let l = self.local("start controllers")?;
        let ns = l.place.as_ref().map(|(n, _)| Netns::borrowed(n));
        let command = |prog: PathBuf| match &ns {
            Some(ns) => ns.cmd(prog),
            None => Command::new(prog),
        };
        let mut kcm = command(paths::cache_bin("kube-controller-manager")?);
        kcm.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                d.join("sa.key").display()
            ))
            .args([
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--use-service-account-credentials=false",
                "--node-monitor-grace-period=20s",
                "--pod-eviction-timeout=30s",
                "--v=0",
            ]);
        if let Some(ca) = &l.ca {
            kcm.arg(format!("--root-ca-file={}", ca.display()));
        }
        l.extras.push(Daemon::spawn(
            "kube-controller-manager",
            kcm,
            &d.join("controller-manager.log"),
        )?);
        let mut sched = command(paths::cache_bin("kube-scheduler")?);
        sched
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--v=0",
            ]);
        l.extras.push(Daemon::spawn(
            "kube-scheduler",
            sched,
            &d.join("scheduler.log"),
        )?);
        Ok(())
    }

    /// Path of an admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The scratch directory (logs, keys) of this control plane.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a kubeconfig for another token (e.g. a ServiceAccount's).
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&p, kubeconfig_yaml(self.port, token))?;
        Ok(p)
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }

    /// Makes the apiserver reachable from inside `ns` at the same
    /// `https://127.0.0.1:<port>` (so [`ApiServer::kubeconfig`] works there
    /// too), as a node's agent reaches its control plane. Loopback is per
    /// namespace and the root namespace must not be changed, so two `socat`
    /// relays meet at a unix socket in this control plane's directory (unix
    /// sockets live in the filesystem, not in a network namespace). The
    /// relays stop when the returned value is dropped.
    pub fn expose_in(&self, ns: &Netns) -> Result<ApiRelay> {
        let sock = self.dir.path().join(format!("relay-{}.sock", ns.name()));
        let socat = paths::system("socat")?;
        let mut outer = Command::new(&socat);
        outer
            .arg(format!("UNIX-LISTEN:{},fork,unlink-early", sock.display()))
            // nodelay: a relay splits requests into several writes; with
            // Nagle on, the tail waits for a delayed ACK (40 ms).
            .arg(format!("TCP:127.0.0.1:{},nodelay", self.port));
        let outer = Daemon::spawn(
            "socat (apiserver relay, outside)",
            outer,
            &self.dir.path().join(format!("relay-{}-out.log", ns.name())),
        )?;
        let mut inner = ns.cmd(&socat);
        inner
            .arg(format!(
                "TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr,nodelay",
                self.port
            ))
            .arg(format!("UNIX-CONNECT:{}", sock.display()));
        let inner = Daemon::spawn(
            "socat (apiserver relay, inside)",
            inner,
            &self.dir.path().join(format!("relay-{}-in.log", ns.name())),
        )?;
        let port = self.port;
        wait::until(
            "apiserver reachable in the namespace",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                Ok(ns
                    .exec(
                        socat.to_str().unwrap_or("socat"),
                        &["-u", "OPEN:/dev/null", &format!("TCP:127.0.0.1:{port}")],
                    )
                    .is_ok()
                    .then_some(()))
            },
        )?;
        Ok(ApiRelay {
            _inner: inner,
            _outer: outer,
        })
    }

    /// `kubectl` pointed at this apiserver.
    pub fn kubectl(&self) -> Result<Command> {
        let mut c = Command::new(paths::kubectl()?);
        c.env("KUBECONFIG", &self.kubeconfig);
        Ok(c)
    }
}

/// A CA and a serving certificate for `addr`, 127.0.0.1 and the
/// `kubernetes` Service (10.96.0.1), in `d`; (certificate, key).
fn serving_cert(d: &Path, addr: std::net::Ipv4Addr) -> Result<(PathBuf, PathBuf)> {
    let p = |f: &str| d.join(f);
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        ])
        .args(["-subj", "/CN=margay-lab-ca", "-keyout"])
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")))?;
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=kube-apiserver",
        ])
        .arg("-keyout")
        .arg(p("apiserver.key"))
        .arg("-out")
        .arg(p("apiserver.csr")))?;
    std::fs::write(
        p("san.ext"),
        format!(
            "subjectAltName=IP:{addr},IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n"
        ),
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "3650", "-in"])
        .arg(p("apiserver.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(p("san.ext"))
        .arg("-out")
        .arg(p("apiserver.crt")))?;
    Ok((p("apiserver.crt"), p("apiserver.key")))
}

/// This machine's 127.0.0.1:`port` relayed to `ns`'s (two socats meeting
/// at a unix socket in `d`).
fn relay_into(ns: &Netns, port: u16, d: &Path) -> Result<[Daemon; 2]> {
    let sock = d.join("relay-in.sock");
    let socat = paths::system("socat")?;
    let mut inner = ns.cmd(&socat);
    inner
        .arg(format!("UNIX-LISTEN:{},fork,unlink-early", sock.display()))
        .arg(format!("TCP:127.0.0.1:{port},nodelay"));
    let inner = Daemon::spawn("socat (apiserver, inside)", inner, &d.join("relay-in.log"))?;
    let mut outer = Command::new(&socat);
    outer
        .arg(format!(
            "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay"
        ))
        .arg(format!("UNIX-CONNECT:{}", sock.display()));
    let outer = Daemon::spawn(
        "socat (apiserver, outside)",
        outer,
        &d.join("relay-out.log"),
    )?;
    Ok([outer, inner])
}

/// The relays made by [`ApiServer::expose_in`]; dropping it stops them.
#[derive(Debug)]
pub struct ApiRelay {
    _inner: Daemon,
    _outer: Daemon,
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::KubeConfig(e.to_string()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::KubeConfig(e.to_string()))?;
    Ok(kube::Client::try_from(cfg)?)
}

/// A kubeconfig for `https://127.0.0.1:<port>` with a bearer token.
pub fn kubeconfig_yaml(port: u16, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: margay\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: margay\n  user:\n    token: {token}\ncontexts:\n- name: margay\n  context:\n    cluster: margay\n    user: margay\ncurrent-context: margay\n"
    )
}
