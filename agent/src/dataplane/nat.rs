//! natOutgoing: pods of a pool with `natOutgoing: true` reach destinations
//! outside every pool with the node's address (masquerade), as in Calico.
//!
//! Margay owns exactly one nftables table, `inet margay`, and nothing else
//! in the ruleset. [`render`] (pure) turns the pools into the whole table;
//! [`Nat::apply`] loads it in one `nft -f` transaction that creates,
//! flushes and redefines the table, so a rebuild is atomic and idempotent
//! and leaves other tables (kube-proxy's, the operator's) alone. With no
//! pool asking for NAT the table is removed.
//!
//! Disabled pools keep their NAT (their pods still exist); pools are
//! matched by CIDR, so every pod of the pool is covered on every node.

use std::collections::BTreeSet;
use std::time::Duration;

use ipnetwork::IpNetwork;
use margay_ipam::Store;
use margay_ipam::model::validate_pools;

use super::nft_script::set;

/// The table Margay owns.
pub const TABLE: &str = super::ownership::NFT_TABLE;

/// What the table must do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatSpec {
    /// Sources to masquerade (pools with natOutgoing).
    pub nat: BTreeSet<IpNetwork>,
    /// Destinations never masqueraded to (every pool).
    pub pools: BTreeSet<IpNetwork>,
}

impl NatSpec {
    /// From the pools (invalid pools, e.g. overlapping ones, are skipped as
    /// IPAM skips them).
    pub fn from_pools(pools: &[margay_api::ipam::IPPool]) -> Self {
        let (valid, _) = validate_pools(pools);
        let mut spec = Self::default();
        for p in valid {
            spec.pools.insert(p.cidr);
            if p.nat_outgoing {
                spec.nat.insert(p.cidr);
            }
        }
        spec
    }
}

/// The nft script that makes the table match `spec` (one transaction).
pub fn render(spec: &NatSpec) -> String {
    // Creating then deleting makes the delete succeed whether or not the
    // table existed.
    let mut s = format!("table {TABLE}\ndelete table {TABLE}\n");
    if spec.nat.is_empty() {
        return s;
    }
    s.push_str(&format!("table {TABLE} {{\n"));
    for (v4, fam, kind) in [(true, "4", "ipv4_addr"), (false, "6", "ipv6_addr")] {
        for (name, nets) in [("nat", &spec.nat), ("pools", &spec.pools)] {
            let of_family = nets.iter().filter(|n| n.is_ipv4() == v4).copied();
            s.push_str(&set(
                &format!("{name}{fam}"),
                kind,
                Some("interval"),
                of_family,
            ));
        }
    }
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    s.push_str("    ip saddr @nat4 ip daddr != @pools4 masquerade fully-random\n");
    s.push_str("    ip6 saddr @nat6 ip6 daddr != @pools6 masquerade fully-random\n");
    s.push_str("  }\n}\n");
    s
}

/// Loads rendered tables with the `nft` binary.
#[derive(Debug, Default)]
pub struct Nat {
    last: Option<String>,
}

impl Nat {
    /// Loads `spec` unless it is what was loaded last (`force`: always).
    pub async fn apply(&mut self, spec: &NatSpec, force: bool) -> super::Result<bool> {
        let script = render(spec);
        if !force && self.last.as_deref() == Some(script.as_str()) {
            return Ok(false);
        }
        super::nft_script::load(&script, TABLE).await?;
        self.last = Some(script);
        Ok(true)
    }
}

/// Keeps the table in step with the pools: checks every `poll` (pools are
/// cached by the store), reloads at least every `resync`. Pools that cannot
/// be read change nothing. Never ends.
pub async fn run<S: Store>(
    store: std::sync::Arc<S>,
    poll: Duration,
    resync: Duration,
) -> crate::Result<()> {
    let mut nat = Nat::default();
    let mut since = tokio::time::Instant::now();
    loop {
        match store.pools().await {
            Ok(pools) => {
                let spec = NatSpec::from_pools(&pools);
                let force = since.elapsed() >= resync;
                match nat.apply(&spec, force).await {
                    Ok(true) => {
                        since = tokio::time::Instant::now();
                        tracing::info!(nat = ?spec.nat, "natOutgoing table loaded");
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!("natOutgoing: {e}"),
                }
            }
            Err(e) => tracing::warn!("natOutgoing: cannot read IPPools: {e}"),
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_api::ipam::{IPPool, IPPoolSpec};

    fn pool(name: &str, cidr: &str, nat: bool) -> IPPool {
        let mut spec = IPPoolSpec::with_cidr(cidr, None);
        spec.nat_outgoing = nat;
        IPPool::new(name, spec)
    }

    #[test]
    fn renders_one_owned_table() {
        let spec = NatSpec::from_pools(&[
            pool("a", "10.244.0.0/16", true),
            pool("b", "10.245.0.0/16", false),
            pool("c", "fd00:244::/64", true),
            pool("overlap", "10.244.1.0/24", true),
        ]);
        assert_eq!(spec.nat.len(), 2, "{spec:?}");
        assert_eq!(spec.pools.len(), 3, "{spec:?}");
        let s = render(&spec);
        assert!(s.starts_with("table inet margay\ndelete table inet margay\n"));
        assert!(
            s.contains(
                "set nat4 { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 }; }"
            ),
            "{s}"
        );
        assert!(
            s.contains("elements = { 10.244.0.0/16, 10.245.0.0/16 }"),
            "{s}"
        );
        assert!(s.contains("ip saddr @nat4 ip daddr != @pools4 masquerade"));
        assert!(s.contains("elements = { fd00:244::/64 }"));
        // Nothing asks for NAT: the table goes.
        let none = render(&NatSpec::from_pools(&[pool("b", "10.245.0.0/16", false)]));
        assert_eq!(none, "table inet margay\ndelete table inet margay\n");
    }
}
