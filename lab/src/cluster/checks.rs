//! What the lab checks: every node's routes against every IPAM block
//! (and the router's), addresses borrowed from another node's block, and
//! the ping matrix of every pod to every pod and to its node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kube::api::{Api, ListParams};
use margay_api::ipam::IPAMBlock;
use margay_ipam::k8s::list_items;

use super::{Cluster, Pod};
use crate::Tor;

impl Cluster {
    /// Every IPAM block (its range, as its name gives it) with its node.
    pub async fn blocks(&self) -> anyhow::Result<Vec<(String, String)>> {
        let api: Api<IPAMBlock> = Api::all(self.client.clone());
        Ok(list_items(&api, &ListParams::default())
            .await?
            .into_iter()
            .filter_map(|b| {
                // The name says the range even when the content is corrupt.
                let cidr = b
                    .metadata
                    .name
                    .as_deref()
                    .and_then(margay_api::ipam::block_cidr_from_name)
                    .map_or_else(|| b.spec.cidr.clone(), |c| c.to_string());
                Some((cidr, b.spec.node.clone()?))
            })
            .collect())
    }

    /// What keeps the routes from matching the blocks: each node needs a
    /// route (protocol 79) to every block of the others, and a BIRD/FRR
    /// router one to every block.
    pub async fn route_gaps(&self) -> anyhow::Result<Vec<String>> {
        if matches!(
            self.opts.kubernetes,
            Some(crate::Install::Ptp | crate::Install::Noop)
        ) {
            // No Margay, no blocks: static routes (ptp), in place from the
            // start, or no network at all (noop).
            return Ok(Vec::new());
        }
        // IPv6 blocks are not routed between nodes yet
        // ([`Options::pool6_cidr`]).
        let blocks: Vec<(String, String)> = self
            .blocks()
            .await?
            .into_iter()
            .filter(|(cidr, _)| !cidr.contains(':'))
            .collect();
        // An address borrowed from another node's block has a host route
        // of its own everywhere else (the block's route leads to the lender).
        let borrowed = self.borrowed(&blocks);
        let has =
            |routes: &str, dst: &str| routes.lines().any(|l| l.starts_with(&format!("{dst} ")));
        let mut gaps = Vec::new();
        for n in self
            .nodes
            .iter()
            .filter(|n| n.agent.is_some() || n.kubelet.is_some())
        {
            let routes = n.node.ns.ip(&["-4", "route", "show", "proto", "79"])?;
            for (cidr, owner) in blocks.iter().filter(|(_, o)| *o != n.name) {
                if !has(&routes, cidr) {
                    gaps.push(format!("{} has no route to {cidr} ({owner})", n.name));
                }
            }
            for p in borrowed.iter().filter(|p| p.node != n.name) {
                if !has(&routes, &p.ip) {
                    gaps.push(format!(
                        "{} has no route to {} (borrowed by {})",
                        n.name, p.ip, p.node
                    ));
                }
            }
        }
        if matches!(self.opts.tor, Tor::Bird | Tor::Frr) {
            let routes = self.fabric.ns().ip(&["-4", "route", "show"])?;
            for (cidr, owner) in &blocks {
                if !has(&routes, cidr) {
                    gaps.push(format!("the router has no route to {cidr} ({owner})"));
                }
            }
            for p in &borrowed {
                if !has(&routes, &p.ip) {
                    gaps.push(format!(
                        "the router has no route to {} (borrowed by {})",
                        p.ip, p.node
                    ));
                }
            }
        }
        Ok(gaps)
    }

    /// The pods whose address is not in a block of their node's (borrowed
    /// from another node's block), given every block and its node.
    pub fn borrowed(&self, blocks: &[(String, String)]) -> Vec<&Pod> {
        let nets: Vec<(ipnetwork::IpNetwork, &str)> = blocks
            .iter()
            .filter_map(|(c, n)| Some((c.parse().ok()?, n.as_str())))
            .collect();
        self.pods
            .iter()
            .filter(|p| {
                let Ok(ip) = p.ip.parse::<std::net::IpAddr>() else {
                    return false;
                };
                !nets.iter().any(|(c, n)| *n == p.node && c.contains(ip))
            })
            .collect()
    }

    /// Waits until routes have converged and every pod reaches every pod
    /// (and its node); returns the time it took.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.wait_converged(timeout).await?;
        loop {
            let m = self.matrix()?;
            if m.failures.is_empty() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                bail!(
                    "pods not connected after {timeout:?}: {}",
                    m.failures.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until [`Cluster::route_gaps`] is empty.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut last = Vec::new();
        while t.elapsed() < timeout {
            last = self.route_gaps().await?;
            if last.is_empty() {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "routes did not converge in {timeout:?}: {}",
            last.join("; ")
        )
    }

    /// Pings every pod from every pod, and each pod's own node from the
    /// pod (fping from each pod's namespace, all pods at once).
    pub fn matrix(&self) -> anyhow::Result<Matrix> {
        let node_ip: BTreeMap<&str, String> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.node.v4.to_string()))
            .collect();
        let mut children = Vec::new();
        for p in &self.pods {
            // (address, node it lives on; "node" for the pod's own node)
            let mut targets: Vec<(String, String)> = self
                .pods
                .iter()
                .filter(|q| q.name != p.name)
                .map(|q| (q.ip.clone(), q.node.clone()))
                .collect();
            if let Some(ip) = node_ip.get(p.node.as_str()) {
                targets.push((ip.clone(), "node".into()));
            }
            let child =
                p.ns.cmd("fping")
                    .args(["-u", "-r", "3", "-t", "300", "-i", "1"])
                    .args(targets.iter().map(|(ip, _)| ip))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("fping (apt install fping)")?;
            children.push((p, targets, child));
        }
        let mut m = Matrix {
            nodes: self.nodes.iter().map(|n| n.name.clone()).collect(),
            ..Default::default()
        };
        let mut pairs: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
        for (p, targets, c) in children {
            let out = c.wait_with_output()?;
            let failed: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            for (ip, node) in targets {
                let e = pairs.entry((p.node.clone(), node)).or_default();
                e.1 += 1;
                m.total += 1;
                if failed.contains(&ip) {
                    m.failures.push(format!("{} -> {ip}", p.name));
                } else {
                    e.0 += 1;
                }
            }
        }
        m.pairs = pairs
            .into_iter()
            .map(|((from, to), (ok, total))| NodePair {
                from,
                to,
                ok,
                total,
            })
            .collect();
        Ok(m)
    }
}

/// Pod reachability between two nodes (`to` = `node`: pods to their own node).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodePair {
    /// Pods on this node...
    pub from: String,
    /// ...to pods on this node.
    pub to: String,
    /// Pings answered.
    pub ok: usize,
    /// Pings sent.
    pub total: usize,
}

/// Result of [`Cluster::matrix`].
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Matrix {
    /// The nodes, in order.
    pub nodes: Vec<String>,
    /// Pairs tried.
    pub total: usize,
    /// `pod -> address` that did not answer.
    pub failures: Vec<String>,
    /// Per node pair.
    pub pairs: Vec<NodePair>,
}

impl Matrix {
    /// A node × node table (`ok/total` per cell; column `node` = pods to
    /// their own node).
    pub fn table(&self) -> String {
        let rows: Vec<&str> = self
            .nodes
            .iter()
            .map(String::as_str)
            .filter(|n| self.pairs.iter().any(|p| p.from == *n))
            .collect();
        let mut cols: Vec<&str> = rows.clone();
        cols.push("node");
        let mut o = format!("{:<12}", "pods on\\to");
        for c in &cols {
            o.push_str(&format!(" {c:>9}"));
        }
        o.push('\n');
        for r in &rows {
            o.push_str(&format!("{r:<12}"));
            for c in &cols {
                let cell = self
                    .pairs
                    .iter()
                    .find(|p| p.from == *r && p.to == *c)
                    .map_or("-".to_string(), |p| format!("{}/{}", p.ok, p.total));
                o.push_str(&format!(" {cell:>9}"));
            }
            o.push('\n');
        }
        o
    }
}
