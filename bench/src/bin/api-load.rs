//! Steady-state load of the agents on the Kubernetes API: a lab of N nodes
//! (real agents, real kube-apiserver, BIRD as top-of-rack router) is brought
//! up and left alone; the apiserver's own `apiserver_request_total` is read
//! from `/metrics` at the start and the end of a quiet window, and the
//! difference is reported per agent and minute, by verb and resource, with
//! the watches each agent holds open (`apiserver_registered_watchers`).
//!
//! Nothing else talks to this apiserver during the window but the
//! apiserver's own loops (namespaces, services, flow control objects:
//! resources no agent uses) and this program's `/metrics` reads (not a
//! resource); only what agents touch is counted: Nodes, Pods, Secrets,
//! Leases and the `margay.dev` objects.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use margay_lab::Tor;
use margay_lab::cluster::{Cluster, Options};

#[derive(Debug, Parser)]
#[command(about = "requests per minute per agent on an idle lab")]
struct Cli {
    /// Lab nodes (one agent each; at most 249, the lab's fabric).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=i64::from(margay_harness::topo::MAX_NODES)))]
    nodes: u32,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pods_per_node: u32,
    /// Seconds to wait after the lab is connected, before the window.
    #[arg(long, default_value_t = 60)]
    settle: u64,
    /// The measured window, in seconds.
    #[arg(long, default_value_t = 180)]
    window: u64,
}

/// `(verb, resource)` → count, from the apiserver's metrics text.
type Counts = BTreeMap<(String, String), f64>;

/// The labels and value of one sample line of `metric`.
fn samples<'a>(
    text: &'a str,
    metric: &'a str,
) -> impl Iterator<Item = (BTreeMap<&'a str, &'a str>, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
        let (labels, value) = rest.rsplit_once("} ")?;
        let labels = labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        Some((labels, value.trim().parse().ok()?))
    })
}

/// The resources agents read or write (the apiserver's own loops touch
/// others).
fn agents_use(group: &str, resource: &str) -> bool {
    group == "margay.dev"
        || (group.is_empty() && matches!(resource, "nodes" | "pods" | "secrets"))
        || (group == "coordination.k8s.io" && resource == "leases")
}

fn requests(text: &str) -> Counts {
    let mut out = Counts::new();
    for (l, v) in samples(text, "apiserver_request_total") {
        let resource = l.get("resource").copied().unwrap_or_default();
        let group = l.get("group").copied().unwrap_or_default();
        if !agents_use(group, resource) {
            continue;
        }
        let sub = l.get("subresource").copied().unwrap_or_default();
        let name = if sub.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}/{sub}")
        };
        let verb = l.get("verb").copied().unwrap_or_default().to_string();
        *out.entry((verb, name)).or_default() += v;
    }
    out
}

fn watchers(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (l, v) in samples(text, "apiserver_registered_watchers") {
        let kind = l.get("kind").copied().unwrap_or_default();
        let group = l.get("group").copied().unwrap_or_default();
        let ours = group == "margay.dev"
            || (group.is_empty() && matches!(kind, "Node" | "Pod" | "Secret"))
            || (group == "coordination.k8s.io" && kind == "Lease");
        if ours {
            *out.entry(kind.to_string()).or_default() += v;
        }
    }
    out
}

async fn metrics(client: &kube::Client) -> anyhow::Result<String> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    client
        .request_text(req)
        .await
        .context("reading the apiserver's /metrics")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut c = Cluster::start(Options {
        nodes: cli.nodes,
        tor: Tor::Bird,
        ..Default::default()
    })
    .await?;
    for n in 1..=cli.nodes {
        for k in 0..cli.pods_per_node {
            c.add_pod(&format!("node{n}"), &format!("p{n}-{k}")).await?;
        }
    }
    c.wait_connected(Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(cli.settle)).await;
    let before = metrics(&c.client).await?;
    tokio::time::sleep(Duration::from_secs(cli.window)).await;
    let after = metrics(&c.client).await?;
    let (b, a) = (requests(&before), requests(&after));
    let per = |v: f64| v / f64::from(cli.nodes) / (cli.window as f64 / 60.0);
    println!(
        "{} nodes, {} pods each, {} s window after {} s settling: requests per agent per minute",
        cli.nodes, cli.pods_per_node, cli.window, cli.settle
    );
    println!("| verb | resource | per agent per minute |");
    println!("|---|---|---|");
    let (mut total, mut lists) = (0.0, 0.0);
    for (k, v) in &a {
        let d = v - b.get(k).copied().unwrap_or(0.0);
        if d <= 0.0 {
            continue;
        }
        total += d;
        if k.0 == "LIST" {
            lists += d;
        }
        println!("| {} | {} | {:.2} |", k.0, k.1, per(d));
    }
    println!("| all | | {:.2} |", per(total));
    println!("| LIST | | {:.2} |", per(lists));
    let w = watchers(&after);
    let open: f64 = w.values().sum();
    println!(
        "watches open per agent: {:.1} ({})",
        open / f64::from(cli.nodes),
        w.iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    c.matrix()?
        .failures
        .is_empty()
        .then_some(())
        .context("pods stopped reaching each other during the window")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_resource_requests_by_verb_and_skips_the_rest() {
        let text = "# HELP x\n\
            apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"margay.dev\",resource=\"ipamblocks\",scope=\"cluster\",subresource=\"\",verb=\"LIST\",version=\"v1\"} 3\n\
            apiserver_request_total{code=\"409\",component=\"apiserver\",group=\"margay.dev\",resource=\"ipamblocks\",scope=\"cluster\",subresource=\"\",verb=\"LIST\",version=\"v1\"} 2\n\
            apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"\",resource=\"nodes\",scope=\"resource\",subresource=\"status\",verb=\"PATCH\",version=\"v1\"} 7\n\
            apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"\",resource=\"\",scope=\"\",subresource=\"/metrics\",verb=\"GET\",version=\"\"} 9\n\
            apiserver_request_total{code=\"200\",component=\"apiserver\",group=\"\",resource=\"namespaces\",scope=\"resource\",subresource=\"\",verb=\"GET\",version=\"v1\"} 4\n";
        let c = requests(text);
        assert_eq!(c[&("LIST".into(), "ipamblocks".into())], 5.0);
        assert_eq!(c[&("PATCH".into(), "nodes/status".into())], 7.0);
        assert_eq!(c.len(), 2);
    }
}
