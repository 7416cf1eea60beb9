//! A route reflector at scale (issue 27): one reflector, margay-bgp and
//! BIRD 2 in turn, with N iBGP clients, each announcing its share of R
//! /32s; the reflector's memory (peak RSS) and convergence (from the
//! moment every client announces until every client holds every other
//! client's routes) for each N, side by side, as a table and an SVG plot.
//!
//! Everything runs in one network namespace the bench makes: the
//! reflector listens on 10.100.0.1 and accepts any client of 10.100.0.0/16
//! (margay-bgp's `listen_range`, BIRD's `neighbor range`); the clients are
//! tasks of this process on one thread (written here on Margay's own
//! codec), each bound to an address of its own. They
//! connect, announce, count what they are sent, and send keepalives; a
//! client is done when it holds every route but its own. (The addresses
//! sit on a veth pair inside the namespace: this kernel has no dummy
//! interfaces.)
//!
//! Usage (as root, after `cargo build --release -p margay-bgp -p
//! margay-bench`): `rr-bench --clients 100,500,1000 --routes 10000
//! [--plot rr.svg]`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use margay_bgp::packet::{Attrs, Ctx, Message, Open, Prefix, UpdateBuilder, frame_len};
use margay_harness::bgpd::Bird;
use margay_harness::{Daemon, Netns, names};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

#[path = "scale/svg.rs"]
mod svg;

#[derive(Debug, Parser)]
#[command(about = "A BGP route reflector with N clients: margay-bgp against BIRD 2")]
struct Cli {
    /// Client counts, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
    clients: Vec<u32>,
    /// Routes in all (spread over the clients).
    #[arg(long, default_value_t = 10_000)]
    routes: u32,
    /// An SVG plot of memory and convergence against N, drawn here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Another margay-bgp to measure beside this build's, as NAME=PATH
    /// (e.g. `before=/path/to/old/margay-bgp`).
    #[arg(long)]
    also: Vec<String>,
}

const RR: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const ASN: u32 = 64512;
/// The longest a measurement may take.
const DEADLINE: Duration = Duration::from_secs(600);

/// A reflector to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// margay-bgp: its name in the table and its binary.
    Margay(String, PathBuf),
    Bird,
}

impl Kind {
    fn name(&self) -> &str {
        match self {
            Kind::Margay(n, _) => n,
            Kind::Bird => "BIRD 2",
        }
    }
}

/// Client `i`'s address (10.100.0.2 onward).
fn client_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(RR) + 1 + i)
}

/// Client `i`'s routes of `routes` in all over `n` clients: /32s of
/// 100.64.0.0/10, dealt round-robin.
fn client_routes(i: u32, n: u32, routes: u32) -> Vec<Prefix> {
    (0..routes)
        .filter(|r| r % n == i)
        .map(|r| Prefix::new(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + r)), 32).expect("a /32"))
        .collect()
}

/// A reflector running, and its process.
struct Reflector {
    pid: u32,
    _hold: Box<dyn std::any::Any>,
}

fn start(kind: &Kind, ns: &Netns, dir: &std::path::Path) -> anyhow::Result<Reflector> {
    match kind {
        Kind::Margay(_, bin) => {
            if !bin.exists() {
                bail!(
                    "{} missing: cargo build --release -p margay-bgp",
                    bin.display()
                );
            }
            let conf = dir.join("rr.toml");
            std::fs::write(
                &conf,
                format!(
                    "asn = {ASN}\nrouter_id = \"{RR}\"\nfib = false\nlisten = \"{RR}:179\"\n\
                     control_socket = \"{}\"\n\
                     [[listen_range]]\nprefix = \"10.100.0.0/16\"\nasn = {ASN}\n\
                     route_reflector_client = true\nhold_time = 240\n",
                    dir.join("rr.sock").display()
                ),
            )?;
            let mut cmd = ns.cmd(bin);
            cmd.arg("--config").arg(&conf).env("RUST_LOG", "warn");
            let d = Daemon::spawn("margay-bgp", cmd, &dir.join("rr.log"))?;
            Ok(Reflector {
                pid: d.pid(),
                _hold: Box::new(d),
            })
        }
        Kind::Bird => {
            let mut b = Bird::start(
                ns,
                &format!(
                    "router id {RR};\nprotocol device {{}}\nprotocol direct {{ ipv4; }}\n\
                     protocol bgp clients {{ local {RR} as {ASN}; neighbor range 10.100.0.0/16 internal;\n\
                     dynamic name \"c\"; dynamic name digits 5; multihop; rr client; hold time 240;\n\
                     ipv4 {{ import all; export all; }}; }}\n"
                ),
            )?;
            Ok(Reflector {
                pid: b.daemon().pid(),
                _hold: Box::new(b),
            })
        }
    }
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What a client tells the bench.
enum Report {
    Established,
    Done(Instant),
    Failed(String),
}

/// One client: connect from `src`, OPEN, wait for `go`, announce `own`,
/// count until every route of `all` but its own was sent to it.
async fn client(
    src: Ipv4Addr,
    own: Vec<Prefix>,
    all: u32,
    mut go: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<Report>,
) {
    // A session that fails before it is established is tried again, as a
    // router would (BIRD resets some of many simultaneous connections).
    let mut established = false;
    for attempt in 1.. {
        match client_inner(src, &own, all, &mut go, &tx, &mut established).await {
            Err(e) if established || attempt >= 30 => {
                let _ = tx.send(Report::Failed(format!("client {src}: {e:#}")));
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            Ok(()) => return,
        }
    }
}

async fn client_inner(
    src: Ipv4Addr,
    own: &[Prefix],
    all: u32,
    go: &mut watch::Receiver<bool>,
    tx: &mpsc::UnboundedSender<Report>,
    up: &mut bool,
) -> anyhow::Result<()> {
    let ctx = Ctx {
        four_octet_as: true,
        ibgp: true,
    };
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    let mut s = tokio::time::timeout(
        Duration::from_secs(60),
        sock.connect(SocketAddr::new(IpAddr::V4(RR), 179)),
    )
    .await
    .context("connect timed out")??;
    let open = Message::Open(Open::ipv4_unicast(ASN, 240, src));
    s.write_all(&open.encode(&ctx)).await?;
    let want = all as usize - own.len();
    let own_set: HashSet<Prefix> = own.iter().copied().collect();
    let mut have: HashSet<Prefix> = HashSet::new();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    let mut established = false;
    let mut announced = false;
    let mut done = false;
    let mut keepalive = tokio::time::interval(Duration::from_secs(30));
    loop {
        if established && !announced && *go.borrow() {
            let attrs = Attrs {
                next_hop: Some(IpAddr::V4(src)),
                local_pref: Some(100),
                ..Attrs::default()
            };
            let msgs = UpdateBuilder::announce(&attrs, own, None, &ctx)
                .map_err(|n| anyhow::anyhow!("an UPDATE of {n} octets"))?;
            for m in msgs {
                s.write_all(&m).await?;
            }
            announced = true;
        }
        if !done && have.len() >= want {
            done = true;
            let _ = tx.send(Report::Done(Instant::now()));
        }
        tokio::select! {
            r = s.read(&mut chunk) => {
                let n = r?;
                if n == 0 {
                    bail!("the reflector closed the session");
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(len) = frame_len(&buf).map_err(|e| anyhow::anyhow!("{e:?}"))? {
                    if buf.len() < len {
                        break;
                    }
                    let msg = Message::decode(&buf[..len], &ctx).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    buf.drain(..len);
                    match msg {
                        Message::Open(_) => s.write_all(&Message::Keepalive.encode(&ctx)).await?,
                        Message::Keepalive if !established => {
                            established = true;
                            *up = true;
                            let _ = tx.send(Report::Established);
                        }
                        Message::Update(u) => {
                            for p in u.withdrawn {
                                have.remove(&p);
                            }
                            for p in u.nlri {
                                if !own_set.contains(&p) {
                                    have.insert(p);
                                }
                            }
                        }
                        Message::Notification(n) => bail!("NOTIFICATION {}", n.describe()),
                        _ => {}
                    }
                }
            }
            _ = keepalive.tick() => s.write_all(&Message::Keepalive.encode(&ctx)).await?,
            _ = go.changed(), if !announced => {}
        }
    }
}

/// One measurement: (convergence in s, reflector's peak RSS in KiB, its
/// RSS with every session up before any route, in KiB).
fn once(kind: &Kind, n: u32, routes: u32) -> anyhow::Result<(f64, u64, u64)> {
    let ns = Netns::create("rr")?;
    ns.ip(&["link", "set", "lo", "up"])?;
    // A veth pair inside the namespace: the reflector's side holds the
    // /16 (a connected network, as BIRD's `direct` wants), the other the
    // clients' /32s (this kernel has no dummy interfaces).
    ns.ip(&["link", "add", "rr0", "type", "veth", "peer", "name", "cl0"])?;
    ns.ip(&["link", "set", "rr0", "up"])?;
    ns.ip(&["link", "set", "cl0", "up"])?;
    ns.ip(&["addr", "add", "10.100.0.1/16", "dev", "rr0"])?;
    let batch: String = (0..n)
        .map(|i| format!("addr add {}/32 dev cl0\n", client_addr(i)))
        .collect();
    let dir = names::temp_dir("rr")?;
    let file = dir.path().join("addrs");
    std::fs::write(&file, batch)?;
    ns.ip(&["-batch", &file.display().to_string()])?;
    let rr = start(kind, &ns, dir.path())?;
    std::thread::sleep(Duration::from_millis(500));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = ns.enter(|| {
        rt.block_on(async {
            let (go_tx, go_rx) = watch::channel(false);
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut tasks = tokio::task::JoinSet::new();
            let started = Instant::now();
            let mut up = 0;
            // Connected 50 at a time (a reflector's listen backlog).
            for i in 0..n {
                tasks.spawn(client(
                    client_addr(i),
                    client_routes(i, n, routes),
                    routes,
                    go_rx.clone(),
                    tx.clone(),
                ));
                if i % 50 == 49 {
                    while up < i + 1 {
                        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                            Ok(Some(Report::Established)) => up += 1,
                            Ok(Some(Report::Failed(e))) => bail!(e),
                            Ok(Some(Report::Done(_))) => {}
                            Ok(None) | Err(_) => bail!("{up} of {n} sessions up after a minute"),
                        }
                    }
                }
            }
            while up < n {
                match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                    Ok(Some(Report::Established)) => up += 1,
                    Ok(Some(Report::Failed(e))) => bail!(e),
                    Ok(Some(Report::Done(_))) => {}
                    Ok(None) | Err(_) => bail!("{up} of {n} sessions up after a minute"),
                }
            }
            eprintln!(
                "{}: {n} sessions up in {:.1}s",
                kind.name(),
                started.elapsed().as_secs_f64()
            );
            let idle = rss_kib(rr.pid).0;
            let go = Instant::now();
            go_tx.send_replace(true);
            let mut done = 0;
            let mut last = go;
            while done < n {
                let left = DEADLINE.saturating_sub(go.elapsed());
                match tokio::time::timeout(left, rx.recv()).await {
                    Ok(Some(Report::Done(t))) => {
                        done += 1;
                        last = last.max(t);
                    }
                    Ok(Some(Report::Failed(e))) => bail!(e),
                    Ok(Some(Report::Established)) => {}
                    Ok(None) | Err(_) => bail!("{done} of {n} clients complete after {DEADLINE:?}"),
                }
            }
            tasks.abort_all();
            Ok(((last - go).as_secs_f64(), idle))
        })
    })??;
    let (_, peak) = rss_kib(rr.pid);
    Ok((result.0, peak, result.1))
}

/// One measurement: (convergence s, peak RSS KiB, RSS with sessions
/// only KiB).
type M = (f64, u64, u64);

/// One row per N: each reflector's measurement, BIRD's last.
type Row = (u32, Vec<M>);

fn table(names: &[String], rows: &[Row], routes: u32) -> String {
    let mut t = String::from(
        "| clients | routes | reflector | converged (s) | vs BIRD | peak RSS (MiB) | vs BIRD | RSS, sessions only (MiB) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (n, ms) in rows {
        let bird = ms.last().copied().unwrap_or((1.0, 1, 1));
        for (name, m) in names.iter().zip(ms) {
            let _ = writeln!(
                t,
                "| {n} | {routes} | {name} | {:.2} | {:.2}x | {:.1} | {:.2}x | {:.1} |",
                m.0,
                m.0 / bird.0,
                m.1 as f64 / 1024.0,
                m.1 as f64 / bird.1 as f64,
                m.2 as f64 / 1024.0,
            );
        }
    }
    t
}

/// Two line charts side by side (peak RSS, convergence) against N, one
/// line per reflector, drawn by the scale bench's chart ([`svg::Chart`]).
fn svg(names: &[String], rows: &[Row], routes: u32) -> String {
    type Axis = fn(&M) -> f64;
    let charts: [(&str, &str, Axis); 2] = [
        ("Reflector peak RSS", "peak RSS (MiB)", |v| {
            v.1 as f64 / 1024.0
        }),
        ("Reflector convergence", "converged (s)", |v| v.0),
    ];
    let drawn: Vec<String> = charts
        .iter()
        .map(|(title, y_label, f)| {
            svg::Chart {
                title: format!("{title}, {routes} routes"),
                x_label: "route reflector clients".into(),
                y_label: (*y_label).into(),
                log_x: false,
                series: names
                    .iter()
                    .enumerate()
                    .map(|(k, name)| svg::Series {
                        name: name.clone(),
                        points: rows
                            .iter()
                            .filter_map(|r| Some((f64::from(r.0), f(r.1.get(k)?))))
                            .collect(),
                        dashed: false,
                        color: k,
                    })
                    .collect(),
            }
            .render()
        })
        .collect();
    // Side by side: each chart is an SVG of its own, placed in one.
    let (w, h) = (svg::W, svg::H);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\">\n",
        2.0 * w
    );
    for (i, c) in drawn.iter().enumerate() {
        let _ = writeln!(
            out,
            "<g transform=\"translate({},0)\">{c}</g>",
            i as f64 * w
        );
    }
    out.push_str("</svg>\n");
    out
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut kinds = vec![Kind::Margay(
        "margay-bgp".into(),
        std::env::current_exe()?.with_file_name("margay-bgp"),
    )];
    for a in &cli.also {
        let (name, path) = a
            .split_once('=')
            .with_context(|| format!("--also {a}: NAME=PATH"))?;
        kinds.push(Kind::Margay(format!("margay-bgp {name}"), path.into()));
    }
    kinds.push(Kind::Bird);
    let names: Vec<String> = kinds.iter().map(|k| k.name().to_string()).collect();
    let mut rows: Vec<Row> = Vec::new();
    for &n in &cli.clients {
        if n == 0 || n > 60_000 {
            bail!("--clients {n}: between 1 and 60,000 (addresses of 10.100.0.0/16)");
        }
        let mut ms = Vec::new();
        for k in &kinds {
            let m = once(k, n, cli.routes)?;
            eprintln!("{}, {n} clients: {:.2}s, peak {} KiB", k.name(), m.0, m.1);
            ms.push(m);
        }
        rows.push((n, ms));
    }
    print!("{}", table(&names, &rows, cli.routes));
    if let Some(p) = &cli.plot {
        std::fs::write(p, svg(&names, &rows, cli.routes))?;
        eprintln!("plot: {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_dealt_to_every_client_once() {
        let all: Vec<Prefix> = (0..7).flat_map(|i| client_routes(i, 7, 100)).collect();
        let set: HashSet<Prefix> = all.iter().copied().collect();
        assert_eq!((all.len(), set.len()), (100, 100));
        assert_eq!(client_addr(0), Ipv4Addr::new(10, 100, 0, 2));
        assert_eq!(client_addr(300), Ipv4Addr::new(10, 100, 1, 46));
    }

    #[test]
    fn the_table_and_plot_show_every_row() {
        let names = vec!["margay-bgp".to_string(), "BIRD 2".to_string()];
        let rows = vec![
            (
                100,
                vec![(0.5, 20 * 1024, 10 * 1024), (0.4, 10 * 1024, 5 * 1024)],
            ),
            (
                1000,
                vec![(2.0, 40 * 1024, 30 * 1024), (1.5, 40 * 1024, 20 * 1024)],
            ),
        ];
        let t = table(&names, &rows, 10_000);
        assert!(
            t.contains("| 1000 | 10000 | margay-bgp | 2.00 | 1.33x | 40.0 | 1.00x | 30.0 |"),
            "{t}"
        );
        assert!(
            t.contains("| 100 | 10000 | BIRD 2 | 0.40 | 1.00x | 10.0 | 1.00x | 5.0 |"),
            "{t}"
        );
        let s = svg(&names, &rows, 10_000);
        assert_eq!(s.matches("<polyline").count(), 4, "{s}");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
    }
}
