//! NetworkPolicy update cost: the time from a change (a pod's label, a new
//! policy, a new pod) to the kernel holding the rules for it, at 1k, 5k and
//! 10k pods across the cluster with 1k policies, for Margay and for an
//! iptables + ipset rendering of the same policies applied the way
//! kube-router applies them. Same machine, same run, each in a fresh
//! network namespace.
//!
//! - Margay: `margay_policy::ruleset::Compiler` (what the agent runs) turns the
//!   change into a delta, which the agent's own code loads as the agent
//!   does: over netlink (`margay-nftnl`, one batch, one transaction,
//!   on a socket kept open), with `nft -f -` only for a batch too large
//!   for one write.
//! - Baseline (written here, not in the product): every change re-renders
//!   everything, kube-router's full sync: an ipset set per policy's targets
//!   and per rule peer (hash:ip, hash:net for ipBlocks with `nomatch`
//!   excepts) swapped in through `ipset restore` (a temporary set filled,
//!   swapped, destroyed), and the whole filter table through
//!   `iptables-restore` (a chain per policy marking what its rules allow,
//!   a chain per local pod jumping to its policies and dropping what is
//!   unmarked, FORWARD dispatching by pod address). Debian 12's iptables
//!   is the nf_tables backend (iptables-nft).
//!
//! The cluster: 100 namespaces (team, env labels), pods spread over them
//! (app, tier, version labels), 100 of them on this node; policies select
//! an app in their namespace and allow ingress from a tier in namespaces of
//! a team on a port or range, one in four also egress to an ipBlock with
//! an except and to a tier on 5432. Changes: a remote pod's tier flipped
//! (api <-> web, which moves it in and out of about a tenth of the peer
//! sets), a policy created over a local pod, a remote pod added with tier
//! web, and a pod scheduled to this node wired (what its CNI ADD costs the
//! engine: its address, its interface in its endpoint chain's set, the chains prepared
//! when it was scheduled). Each figure is the median (and max) over
//! `--changes` changes.
//! Output: a Markdown table for BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use margay_harness::netns::Netns;
use margay_nftnl as nftnl;
use margay_policy::model::{Direction, Key, NamedPort, Peer, PortMatch, Rule};
use margay_policy::ruleset::{Batch, Compiler, Delta, TABLE_NAME};
use margay_policy::selector::Labels;
use margay_policy::{Namespace, Pod, PodKey, Policy, Proto, Selector, World, spec};

#[derive(Debug, Parser)]
#[command(
    about = "NetworkPolicy change-to-enforced: margay (nft deltas) vs iptables+ipset full sync"
)]
struct Cli {
    /// Cluster sizes (pods), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pods: Vec<usize>,
    /// Policies.
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// Pods on this node.
    #[arg(long, default_value_t = 100)]
    local: usize,
    /// Changes of each kind measured.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Skip the baseline above this many pods (it can take minutes).
    #[arg(long, default_value_t = usize::MAX)]
    baseline_max_pods: usize,
    /// Write Margay's initial script and the first delta of each kind here.
    #[arg(long)]
    dump_dir: Option<std::path::PathBuf>,
}

const NAMESPACES: usize = 100;
const TIERS: [&str; 3] = ["web", "api", "db"];

fn ip(i: usize) -> IpAddr {
    let n = 0x0A01_0000u32 + u32::try_from(i).unwrap_or(0);
    IpAddr::V4(Ipv4Addr::from(n))
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

fn pod(i: usize, tier: &str) -> (PodKey, Pod) {
    (
        Key::new(&format!("ns-{}", i % NAMESPACES), &format!("pod-{i}")),
        Pod {
            labels: std::sync::Arc::new(labels(&[
                ("app", format!("app-{}", i % 50)),
                ("tier", tier.to_string()),
                ("version", format!("v{}", i % 2)),
            ])),
            ips: vec![ip(i)],
            node: None,
            ports: [NamedPort {
                name: "http".into(),
                proto: Proto::Tcp,
                port: 80,
            }]
            .into(),
        },
    )
}

fn policy(j: usize) -> (Key, Policy) {
    let sel = |pairs: &[(&str, String)]| Selector {
        match_labels: labels(pairs),
        expressions: Vec::new(),
    };
    let ports = if j.is_multiple_of(2) {
        vec![PortMatch::Range {
            proto: Proto::Tcp,
            first: 80,
            last: 80,
        }]
    } else {
        vec![PortMatch::Range {
            proto: Proto::Tcp,
            first: 8000,
            last: 8100,
        }]
    };
    let ingress = vec![Rule {
        peers: vec![Peer::Pods {
            namespaces: Some(sel(&[("team", format!("team-{}", j % 10))])),
            pods: sel(&[("tier", TIERS[j % 3].to_string())]),
        }],
        ports,
    }];
    let egress = (j.is_multiple_of(4)).then(|| {
        vec![
            Rule {
                peers: vec![Peer::Block {
                    cidr: "10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
                    except: vec!["10.1.0.0/16".parse().unwrap_or_else(|_| unreachable!())],
                }],
                ports: Vec::new(),
            },
            Rule {
                peers: vec![Peer::Pods {
                    namespaces: None,
                    pods: sel(&[("tier", "db".to_string())]),
                }],
                ports: vec![PortMatch::Range {
                    proto: Proto::Tcp,
                    first: 5432,
                    last: 5432,
                }],
            },
        ]
    });
    (
        Key::new(&format!("ns-{}", j % NAMESPACES), &format!("np-{j}")),
        Policy {
            selector: sel(&[("app", format!("app-{}", j % 50))]),
            ingress: Some(ingress),
            egress,
        },
    )
}

/// The cluster and this node's endpoints (pods 0, 1, ... `local`-1).
fn cluster(pods: usize, policies: usize, local: usize) -> (World, BTreeMap<PodKey, String>) {
    let mut w = World::default();
    for n in 0..NAMESPACES {
        w.namespaces.insert(
            format!("ns-{n}"),
            Namespace {
                labels: labels(&[
                    ("team", format!("team-{}", n % 10)),
                    (
                        "env",
                        if n.is_multiple_of(2) { "prod" } else { "dev" }.to_string(),
                    ),
                ]),
            },
        );
    }
    for i in 0..pods {
        let (k, p) = pod(i, TIERS[i % 3]);
        w.pods.insert(k, p);
    }
    for j in 0..policies {
        let (k, p) = policy(j);
        w.policies.insert(k, p);
    }
    let eps = (0..local)
        .map(|i| (pod(i, "web").0, format!("cali{i:011x}")))
        .collect();
    (w, eps)
}

/// Runs `f` with this thread in `ns`, so the programs it starts run there
/// directly (as the agent's run in its node's namespace), not through
/// `ip netns exec`.
fn load(prog: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut c = std::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {prog}"))?;
    c.stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One change of the cluster.
#[derive(Debug, Clone)]
enum Change {
    Pod(PodKey, Option<Pod>),
    Policy(Key, Option<Policy>),
    /// A pod scheduled to this node wired (its CNI ADD: its address, its
    /// interface, no longer only scheduled; `on`) or unwired (its DEL, and
    /// scheduled again, so the world stays the size it was).
    Wire {
        key: PodKey,
        pod: Pod,
        ifname: String,
        on: bool,
    },
}

fn apply_to_world(w: &mut World, local: &mut BTreeMap<PodKey, String>, c: &Change) {
    match c {
        Change::Wire {
            key,
            pod,
            ifname,
            on,
        } => {
            if *on {
                w.pods.insert(key.clone(), pod.clone());
                local.insert(key.clone(), ifname.clone());
            } else {
                w.pods.remove(key);
                local.remove(key);
            }
        }
        Change::Pod(k, Some(p)) => {
            w.pods.insert(k.clone(), p.clone());
        }
        Change::Pod(k, None) => {
            w.pods.remove(k);
        }
        Change::Policy(k, Some(p)) => {
            w.policies.insert(k.clone(), p.clone());
        }
        Change::Policy(k, None) => {
            w.policies.remove(k);
        }
    }
}

/// The changes of each kind, in order, each followed by its undo so the
/// world stays the size it was.
fn changes(pods: usize, local: usize, n: usize) -> Vec<(&'static str, Vec<Change>)> {
    let remote = |k: usize| local + (k * 7919) % (pods - local);
    let relabel = (0..n)
        .flat_map(|k| {
            let i = remote(k);
            let (key, p) = pod(i, "web");
            let (_, back) = pod(i, TIERS[i % 3]);
            let (_, api) = pod(i, "api");
            let first = if TIERS[i % 3] == "web" { api } else { p };
            [
                Change::Pod(key.clone(), Some(first)),
                Change::Pod(key, Some(back)),
            ]
        })
        .collect();
    let new_policy = (0..n)
        .flat_map(|k| {
            let (mut key, mut p) = policy(k % local);
            key.name = format!("bench-np-{k}").into();
            p.selector = Selector {
                match_labels: labels(&[("app", format!("app-{}", k % local % 50))]),
                expressions: Vec::new(),
            };
            [
                Change::Policy(key.clone(), Some(p)),
                Change::Policy(key, None),
            ]
        })
        .collect();
    let new_pod = (0..n)
        .flat_map(|k| {
            let (_, mut p) = pod(pods + k, "web");
            p.ips = vec![ip(pods + 1000 + k)];
            let key = Key::new(&format!("ns-{}", k % NAMESPACES), &format!("new-{k}"));
            [Change::Pod(key.clone(), Some(p)), Change::Pod(key, None)]
        })
        .collect();
    let wired = (0..n)
        .flat_map(|k| {
            let (mut key, p) = pod(k % local, "web");
            key.name = format!("wired-{k}").into();
            let mut p = p;
            p.ips = vec![ip(pods + 2000 + k)];
            let ifname = format!("caliw{k:010x}");
            [true, false].map(|on| Change::Wire {
                key: key.clone(),
                pod: p.clone(),
                ifname: ifname.clone(),
                on,
            })
        })
        .collect();
    vec![
        ("pod label changed", relabel),
        ("policy created", new_policy),
        ("pod added", new_pod),
        ("local pod wired (CNI ADD)", wired),
    ]
}

/// What the agent's engine does for the change: the compiler's calls, in
/// its order.
fn delta(c: &mut Compiler, ch: &Change) -> Vec<Delta> {
    match ch {
        Change::Pod(k, p) => vec![c.set_pod(k, p.clone())],
        Change::Policy(k, p) => vec![c.set_policy(k, p.clone())],
        Change::Wire {
            key,
            pod,
            ifname,
            on: true,
        } => vec![
            c.set_workload(ifname, Some(pod.ips.clone())),
            c.set_pod(key, Some(pod.clone())),
            c.set_endpoint(ifname, Some(key.clone())),
            c.set_scheduled(key, None),
        ],
        Change::Wire {
            key,
            pod,
            ifname,
            on: false,
        } => vec![
            c.set_endpoint(ifname, None),
            c.set_workload(ifname, None),
            c.set_pod(key, None),
            c.set_scheduled(key, Some((*pod.labels).clone())),
        ],
    }
}

/// The pods the wiring changes wire, scheduled to this node first (what
/// the Pod watch shows before their ADD).
fn schedule(c: &mut Compiler, changes: &[Change]) -> Batch {
    let mut b = Batch::default();
    for ch in changes {
        if let Change::Wire {
            key, pod, on: true, ..
        } = ch
        {
            b.extend(&c.set_scheduled(key, Some((*pod.labels).clone())));
        }
    }
    b
}

/// kube-router's rendering of the whole world: (ipset restore, iptables-restore).
fn baseline(w: &World, local: &BTreeMap<PodKey, String>) -> (String, String) {
    let mut sets = String::new();
    let mut ipt = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-ROUTER-FORWARD - [0:0]\n",
    );
    let mut rules = String::from("-A FORWARD -j KUBE-ROUTER-FORWARD\n");
    let mut set = |name: &str, kind: &str, entries: &[String]| {
        let _ = writeln!(sets, "create {name} {kind} family inet -exist");
        let _ = writeln!(sets, "create T-{name} {kind} family inet -exist");
        let _ = writeln!(sets, "flush T-{name}");
        for e in entries {
            let _ = writeln!(sets, "add T-{name} {e}");
        }
        let _ = writeln!(sets, "swap T-{name} {name}");
        let _ = writeln!(sets, "destroy T-{name}");
    };
    let ips_of = |pred: &dyn Fn(&PodKey, &Pod) -> bool| -> Vec<String> {
        w.pods
            .iter()
            .filter(|(k, p)| pred(k, p))
            .flat_map(|(_, p)| p.ips.iter().map(ToString::to_string))
            .collect()
    };
    let mut chain_of = BTreeMap::new();
    for (n, (pk, p)) in w.policies.iter().enumerate() {
        let chain = format!("KUBE-NWPLCY-{n}");
        chain_of.insert(pk.clone(), chain.clone());
        let _ = writeln!(ipt, ":{chain} - [0:0]");
        set(
            &format!("KD-{n}"),
            "hash:ip",
            &ips_of(&|k, pod| k.namespace == pk.namespace && p.selector.matches(&pod.labels)),
        );
        for dir in [Direction::Ingress, Direction::Egress] {
            let (here, there) = match dir {
                Direction::Ingress => ("dst", "src"),
                Direction::Egress => ("src", "dst"),
            };
            for (r, rule) in p.rules(dir).unwrap_or_default().iter().enumerate() {
                let ports: Vec<String> = if rule.ports.is_empty() {
                    vec![String::new()]
                } else {
                    rule.ports
                        .iter()
                        .map(|m| match m {
                            PortMatch::All { proto } => format!(" -p {proto}"),
                            PortMatch::Range { proto, first, last } if first == last => {
                                format!(" -p {proto} --dport {first}")
                            }
                            PortMatch::Range { proto, first, last } => {
                                format!(" -p {proto} --dport {first}:{last}")
                            }
                            PortMatch::Named { proto, name } => {
                                format!(" -p {proto} --dport {name}")
                            }
                        })
                        .collect()
                };
                let peers: Vec<String> = if rule.peers.is_empty() {
                    vec![String::new()]
                } else {
                    rule.peers
                        .iter()
                        .enumerate()
                        .map(|(q, peer)| {
                            let name = format!("K{}-{n}-{r}-{q}", &here[..1]);
                            match peer {
                                Peer::Block { cidr, except } => {
                                    let mut e = vec![cidr.to_string()];
                                    e.extend(except.iter().map(|x| format!("{x} nomatch")));
                                    set(&name, "hash:net", &e);
                                }
                                Peer::Pods { .. } => set(
                                    &name,
                                    "hash:ip",
                                    &ips_of(&|k, pod| {
                                        pod.ips.iter().any(|a| {
                                            spec::peer_matches(
                                                w,
                                                &pk.namespace,
                                                peer,
                                                *a,
                                                Some((k, pod)),
                                            )
                                        })
                                    }),
                                ),
                            }
                            format!(" -m set --match-set {name} {there}")
                        })
                        .collect()
                };
                for peer in &peers {
                    for port in &ports {
                        let _ = writeln!(
                            rules,
                            "-A {chain} -m set --match-set KD-{n} {here}{peer}{port} -j MARK --set-xmark 0x10000/0x10000"
                        );
                    }
                }
            }
        }
        let _ = writeln!(rules, "-A {chain} -m mark --mark 0x10000/0x10000 -j RETURN");
    }
    for (i, (k, _)) in local.iter().enumerate() {
        let Some(p) = w.pods.get(k) else { continue };
        let chain = format!("KUBE-POD-FW-{i}");
        let _ = writeln!(ipt, ":{chain} - [0:0]");
        for a in &p.ips {
            let _ = writeln!(rules, "-A KUBE-ROUTER-FORWARD -d {a} -j {chain}");
            let _ = writeln!(rules, "-A KUBE-ROUTER-FORWARD -s {a} -j {chain}");
        }
        let _ = writeln!(
            rules,
            "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
        for (pk, pol) in &w.policies {
            if pk.namespace == k.namespace && pol.selector.matches(&p.labels) {
                let _ = writeln!(rules, "-A {chain} -j {}", chain_of[pk]);
            }
        }
        let _ = writeln!(rules, "-A {chain} -m mark ! --mark 0x10000/0x10000 -j DROP");
        let _ = writeln!(rules, "-A {chain} -j MARK --set-xmark 0x0/0x10000");
    }
    ipt.push_str(&rules);
    ipt.push_str("COMMIT\n");
    (sets, ipt)
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap_or(&Duration::ZERO))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    println!(
        "| pods | policies | change | margay p50 (max) ms | of which compile | iptables+ipset p50 (max) ms | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &pods in &cli.pods {
        let (world, local) = cluster(pods, cli.policies, cli.local.min(pods));
        // Margay.
        let ns = Netns::create("polbench")?;
        let margay = ns.enter(|| -> anyhow::Result<_> {
            let t = Instant::now();
            let mut c = Compiler::full(world.clone(), local.clone());
            let script = c.table().script();
            if let Some(d) = &cli.dump_dir {
                std::fs::write(d.join(format!("{pods}-table.nft")), &script)?;
            }
            load("nft", &["-f", "-"], &script)?;
            eprintln!(
                "{pods} pods: margay initial load {:.0?} ({} KiB of nft)",
                t.elapsed(),
                script.len() / 1024
            );
            let mut margay = BTreeMap::new();
            // As the agent: one netlink socket kept open.
            let mut sock = nftnl::Socket::open()?;
            for (kind, chs) in changes(pods, cli.local.min(pods), cli.changes) {
                let mut total = Vec::new();
                let mut compile = Vec::new();
                let scheduled = schedule(&mut c, &chs);
                if sock.apply(TABLE_NAME, &scheduled)? == nftnl::Sent::TooLarge {
                    load("nft", &["-f", "-"], &scheduled.script())?;
                }
                for ch in &chs {
                    let t = Instant::now();
                    let ds = delta(&mut c, ch);
                    compile.push(t.elapsed());
                    // Loaded as the agent loads a delta: over netlink,
                    // through nft only when too large for one write.
                    let mut b = Batch::default();
                    for d in &ds {
                        b.extend(d);
                    }
                    if sock.apply(TABLE_NAME, &b)? == nftnl::Sent::TooLarge {
                        load("nft", &["-f", "-"], &b.script())?;
                    }
                    total.push(t.elapsed());
                    if let Some(dir) = &cli.dump_dir
                        && total.len() == 1
                    {
                        std::fs::write(dir.join(format!("{pods}-{kind}.nft")), b.script())?;
                    }
                }
                margay.insert(kind, (stats(total), stats(compile)));
            }
            Ok(margay)
        })??;
        drop(ns);
        // Baseline.
        let mut base = BTreeMap::new();
        if pods <= cli.baseline_max_pods {
            let ns = Netns::create("polbase")?;
            base = ns.enter(|| -> anyhow::Result<_> {
                let mut base = BTreeMap::new();
                let mut w = world.clone();
                let mut local = local.clone();
                let t = Instant::now();
                let (sets, ipt) = baseline(&w, &local);
                load("ipset", &["restore"], &sets)?;
                load("iptables-restore", &[], &ipt)?;
                eprintln!(
                    "{pods} pods: baseline initial load {:.0?} ({} KiB ipset, {} KiB iptables)",
                    t.elapsed(),
                    sets.len() / 1024,
                    ipt.len() / 1024
                );
                for (kind, chs) in changes(pods, cli.local.min(pods), cli.changes) {
                    let mut total = Vec::new();
                    for ch in &chs {
                        let t = Instant::now();
                        apply_to_world(&mut w, &mut local, ch);
                        let (sets, ipt) = baseline(&w, &local);
                        load("ipset", &["restore"], &sets)?;
                        load("iptables-restore", &[], &ipt)?;
                        total.push(t.elapsed());
                    }
                    base.insert(kind, stats(total));
                }
                Ok(base)
            })??;
        }
        for (kind, ((p50, max), (cp50, _))) in &margay {
            let (b, ratio) = match base.get(kind) {
                Some((b50, bmax)) => (
                    format!("{} ({})", ms(*b50), ms(*bmax)),
                    format!("{:.3}x", p50.as_secs_f64() / b50.as_secs_f64()),
                ),
                None => ("not run".into(), "-".into()),
            };
            println!(
                "| {pods} | {} | {kind} | {} ({}) | {} | {b} | {ratio} |",
                cli.policies,
                ms(*p50),
                ms(*max),
                ms(*cp50)
            );
        }
    }
    Ok(())
}
