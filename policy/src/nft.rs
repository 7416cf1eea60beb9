//! NetworkPolicy compiled to Margay's own nftables table,
//! `inet margay_policy`, kept up to date in O(changed).
//!
//! Layout (names are readable: `in/NAMESPACE/POLICY`):
//!
//! ```text
//! chain forward (hook forward, priority filter, policy accept)
//!   ct state established,related accept         replies of allowed connections
//!   iifname vmap @egress                        a local pod sending: its egress chain
//!   oifname vmap @ingress                       a local pod receiving: its ingress chain
//! map ingress / egress   { "caliXXX" : jump ep-in/caliXXX }   only isolated endpoints
//! chain ep-in/IFNAME     clear the allow mark; jump each policy isolating it; no mark: drop
//! chain in/NS/NAME       one rule line per (peer kind, port) of each rule: match, set the
//!                        allow mark, return
//! set in/NS/NAME/R.p4    addresses of the pods the rule's pod peers select (p6: IPv6)
//! set in/NS/NAME/R.b4    the rule's ipBlocks minus their excepts, as intervals (b6)
//! set in/NS/NAME/R.n4.I  destination address . protocol . port of the named port I (n6)
//! ```
//!
//! Traffic the node itself sends to its pods leaves through the output
//! hook and is not filtered (kubelet probes); a pod reaching itself never
//! leaves it. Only policies that select a pod of this node are compiled.
//!
//! [`Compiler`] holds the inputs and the [`Table`]; each change
//! ([`Compiler::set_pod`], [`set_namespace`](Compiler::set_namespace),
//! [`set_policy`](Compiler::set_policy),
//! [`set_endpoint`](Compiler::set_endpoint)) updates the table and returns
//! the [`Delta`] that takes the kernel from the old table to the new one:
//! a pod or a label is set elements, a policy its own chains and sets. A
//! delta is one `nft -f` transaction ([`Delta::script`]); [`Table::script`]
//! rebuilds the whole table atomically (start-up, periodic resync, or
//! after a failed delta).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Direction, Namespace, Peer, Pod, PodKey, Policy, PolicyKey, PortMatch, Rule};
use crate::ranges::Ranges;
use crate::spec::peer_matches;
use crate::{Proto, World};

/// The table, as `nft` names it.
pub const TABLE: &str = "inet margay_policy";
/// The packet mark bit a policy rule sets when it allows.
pub const ALLOW_MARK: u32 = 0x0001_0000;

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// IPv4 addresses.
    Addr4,
    /// IPv6 addresses.
    Addr6,
    /// IPv4 intervals.
    Block4,
    /// IPv6 intervals.
    Block6,
    /// IPv4 address . protocol . port.
    Named4,
    /// IPv6 address . protocol . port.
    Named6,
}

impl SetKind {
    fn decl(self) -> &'static str {
        match self {
            Self::Addr4 => "type ipv4_addr;",
            Self::Addr6 => "type ipv6_addr;",
            Self::Block4 => "type ipv4_addr; flags interval;",
            Self::Block6 => "type ipv6_addr; flags interval;",
            Self::Named4 => "type ipv4_addr . inet_proto . inet_service;",
            Self::Named6 => "type ipv6_addr . inet_proto . inet_service;",
        }
    }
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Its type.
    pub kind: SetKind,
    /// Its elements, as nft writes them.
    pub elements: BTreeSet<String>,
}

/// The whole table as Margay wants it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Named sets.
    pub sets: BTreeMap<String, Set>,
    /// Regular chains and their rules (the base chain is fixed).
    pub chains: BTreeMap<String, Vec<String>>,
    /// Ingress dispatch: interface → verdict (`jump ep-in/IF`, or `drop`
    /// for a quarantined interface).
    pub ingress: BTreeMap<String, String>,
    /// Egress dispatch: interface → verdict.
    pub egress: BTreeMap<String, String>,
}

fn elements(e: &BTreeSet<String>) -> String {
    e.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn map_elements(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(i, v)| format!("\"{i}\" : {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Table {
    /// One transaction that replaces the whole table (creating it first,
    /// so the delete never fails): atomic, and other tables untouched.
    pub fn script(&self) -> String {
        let mut s = format!("table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n");
        for (name, set) in &self.sets {
            s.push_str(&format!("  set {name} {{ {} ", set.kind.decl()));
            if !set.elements.is_empty() {
                s.push_str(&format!("elements = {{ {} }}; ", elements(&set.elements)));
            }
            s.push_str("}\n");
        }
        for (name, m) in [("ingress", &self.ingress), ("egress", &self.egress)] {
            s.push_str(&format!("  map {name} {{ type ifname : verdict; "));
            if !m.is_empty() {
                s.push_str(&format!("elements = {{ {} }}; ", map_elements(m)));
            }
            s.push_str("}\n");
        }
        for name in self.chains.keys() {
            s.push_str(&format!("  chain {name} {{ }}\n"));
        }
        for (name, rules) in &self.chains {
            s.push_str(&format!("  chain {name} {{\n"));
            for r in rules {
                s.push_str(&format!("    {r}\n"));
            }
            s.push_str("  }\n");
        }
        s.push_str(
            "  chain forward {\n    type filter hook forward priority filter; policy accept;\n    \
             ct state established,related accept\n    iifname vmap @egress\n    \
             oifname vmap @ingress\n  }\n}\n",
        );
        s
    }

    /// The script that removes the table (nothing of it left).
    pub fn remove_script() -> String {
        format!("table {TABLE}\ndelete table {TABLE}\n")
    }

    /// The changes that take `self` to `new`.
    pub fn delta(&self, new: &Table) -> Delta {
        let mut d = Delta::default();
        for (name, set) in &new.sets {
            match self.sets.get(name) {
                None => d.new_sets.push((name.clone(), set.clone())),
                Some(old) if old.kind != set.kind => {
                    // Names carry their kind (p4, b6, ...): cannot happen,
                    // but a set of another type would need a new name.
                    d.del_sets.push(name.clone());
                    d.late_sets.push((name.clone(), set.clone()));
                }
                Some(old) => {
                    let add: BTreeSet<String> =
                        set.elements.difference(&old.elements).cloned().collect();
                    let del: BTreeSet<String> =
                        old.elements.difference(&set.elements).cloned().collect();
                    if !add.is_empty() {
                        d.add_elements.push((name.clone(), add));
                    }
                    if !del.is_empty() {
                        d.del_elements.push((name.clone(), del));
                    }
                }
            }
        }
        for name in self.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
            d.del_sets.push(name.clone());
        }
        for (name, rules) in &new.chains {
            match self.chains.get(name) {
                None => {
                    d.new_chains.push(name.clone());
                    d.rewrite.push((name.clone(), rules.clone()));
                }
                Some(old) if old != rules => d.rewrite.push((name.clone(), rules.clone())),
                Some(_) => {}
            }
        }
        for name in self.chains.keys().filter(|n| !new.chains.contains_key(*n)) {
            d.del_chains.push(name.clone());
        }
        for (map, old, new) in [
            ("ingress", &self.ingress, &new.ingress),
            ("egress", &self.egress, &new.egress),
        ] {
            for (i, c) in old {
                if new.get(i) != Some(c) {
                    d.del_map.push((map, i.clone()));
                }
            }
            for (i, c) in new {
                if old.get(i) != Some(c) {
                    d.add_map.push((map, i.clone(), c.clone()));
                }
            }
        }
        d
    }
}

/// The changes between two tables, in an order the kernel accepts in one
/// transaction: what is referenced exists before what references it, and
/// goes after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    new_sets: Vec<(String, Set)>,
    /// Sets whose type changed: deleted, then created again.
    late_sets: Vec<(String, Set)>,
    new_chains: Vec<String>,
    add_elements: Vec<(String, BTreeSet<String>)>,
    rewrite: Vec<(String, Vec<String>)>,
    del_map: Vec<(&'static str, String)>,
    add_map: Vec<(&'static str, String, String)>,
    del_elements: Vec<(String, BTreeSet<String>)>,
    del_chains: Vec<String>,
    del_sets: Vec<String>,
}

impl Delta {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// How many objects it touches (set elements, chains, map entries):
    /// what an update costs.
    pub fn size(&self) -> usize {
        self.new_sets
            .iter()
            .chain(&self.late_sets)
            .map(|(_, s)| 1 + s.elements.len())
            .sum::<usize>()
            + self.new_chains.len()
            + self
                .add_elements
                .iter()
                .map(|(_, e)| e.len())
                .sum::<usize>()
            + self.rewrite.len()
            + self.del_map.len()
            + self.add_map.len()
            + self
                .del_elements
                .iter()
                .map(|(_, e)| e.len())
                .sum::<usize>()
            + self.del_chains.len()
            + self.del_sets.len()
    }

    /// One `nft -f` transaction.
    pub fn script(&self) -> String {
        let mut s = String::new();
        let set_decl = |s: &mut String, name: &str, set: &Set| {
            s.push_str(&format!(
                "add set {TABLE} {name} {{ {} }}\n",
                set.kind.decl()
            ));
            if !set.elements.is_empty() {
                s.push_str(&format!(
                    "add element {TABLE} {name} {{ {} }}\n",
                    elements(&set.elements)
                ));
            }
        };
        for (name, set) in &self.new_sets {
            set_decl(&mut s, name, set);
        }
        for name in &self.new_chains {
            s.push_str(&format!("add chain {TABLE} {name}\n"));
        }
        for (name, e) in &self.add_elements {
            s.push_str(&format!(
                "add element {TABLE} {name} {{ {} }}\n",
                elements(e)
            ));
        }
        // With a set to renew, the chains are refilled after it is.
        for (name, rules) in &self.rewrite {
            s.push_str(&format!("flush chain {TABLE} {name}\n"));
            if self.late_sets.is_empty() {
                for r in rules {
                    s.push_str(&format!("add rule {TABLE} {name} {r}\n"));
                }
            }
        }
        for (map, i) in &self.del_map {
            s.push_str(&format!("delete element {TABLE} {map} {{ \"{i}\" }}\n"));
        }
        for (map, i, c) in &self.add_map {
            s.push_str(&format!("add element {TABLE} {map} {{ \"{i}\" : {c} }}\n"));
        }
        for (name, e) in &self.del_elements {
            s.push_str(&format!(
                "delete element {TABLE} {name} {{ {} }}\n",
                elements(e)
            ));
        }
        for name in &self.del_chains {
            s.push_str(&format!("flush chain {TABLE} {name}\n"));
        }
        for name in &self.del_chains {
            s.push_str(&format!("delete chain {TABLE} {name}\n"));
        }
        for name in &self.del_sets {
            s.push_str(&format!("delete set {TABLE} {name}\n"));
        }
        if !self.late_sets.is_empty() {
            for (name, set) in &self.late_sets {
                set_decl(&mut s, name, set);
            }
            for (name, rules) in &self.rewrite {
                for r in rules {
                    s.push_str(&format!("add rule {TABLE} {name} {r}\n"));
                }
            }
        }
        s
    }
}

fn dir_prefix(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

/// The chain of `policy` for `dir`.
pub fn policy_chain(dir: Direction, policy: &PolicyKey) -> String {
    format!("{}/{}/{}", dir_prefix(dir), policy.namespace, policy.name)
}

/// The chain of the endpoint on interface `ifname` for `dir`.
pub fn endpoint_chain(dir: Direction, ifname: &str) -> String {
    format!("ep-{}/{ifname}", dir_prefix(dir))
}

fn set_name(dir: Direction, policy: &PolicyKey, rule: usize, what: &str) -> String {
    format!("{}/{rule}.{what}", policy_chain(dir, policy))
}

/// The sets of one rule that hold pods (their names and what decides an
/// element).
#[derive(Debug, Clone, PartialEq, Eq)]
enum PodSet {
    /// Addresses of pods a pod peer selects.
    Peers { v6: bool },
    /// `address . proto . port` of pods whose port `name` resolves (for
    /// ingress: local endpoints only).
    Named {
        v6: bool,
        proto: Proto,
        name: String,
    },
}

/// Everything compiled for one policy: what the incremental updates need.
#[derive(Debug, Clone)]
struct Compiled {
    /// Sets holding pods, with the rule (direction, index) they belong to.
    pod_sets: Vec<(String, Direction, usize, PodSet)>,
}

/// The incremental compiler: inputs, the table, and what was compiled.
#[derive(Debug, Clone, Default)]
pub struct Compiler {
    world: World,
    /// Local endpoints: pod → host interface.
    local: BTreeMap<PodKey, String>,
    /// Pods by address (two pods may briefly share one).
    by_ip: BTreeMap<IpAddr, BTreeSet<PodKey>>,
    compiled: BTreeMap<PolicyKey, Compiled>,
    /// Interfaces of pods whose Pod cannot be read: everything dropped
    /// but replies, until it can.
    quarantined: BTreeSet<String>,
    table: Table,
}

impl Compiler {
    /// Nothing known: an empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compiles `world` with the local endpoints `local` in one go.
    pub fn full(world: World, local: BTreeMap<PodKey, String>) -> Self {
        let mut c = Self {
            world,
            local,
            ..Default::default()
        };
        for (k, p) in &c.world.pods {
            for ip in &p.ips {
                c.by_ip.entry(*ip).or_default().insert(k.clone());
            }
        }
        let keys: Vec<PolicyKey> = c.world.policies.keys().cloned().collect();
        for k in keys {
            c.recompile_policy(&k);
        }
        let eps: Vec<PodKey> = c.local.keys().cloned().collect();
        for k in eps {
            c.recompile_endpoint(&k);
        }
        c
    }

    /// The table as it should be.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The inputs.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The local endpoints.
    pub fn local(&self) -> &BTreeMap<PodKey, String> {
        &self.local
    }

    /// A pod added, changed (`Some`) or gone (`None`).
    pub fn set_pod(&mut self, key: &PodKey, pod: Option<Pod>) -> Delta {
        let old_table = self.table.clone();
        let old = match pod {
            Some(p) => self.world.pods.insert(key.clone(), p),
            None => self.world.pods.remove(key),
        };
        let mut ips: BTreeSet<IpAddr> = old.iter().flat_map(|p| p.ips.clone()).collect();
        for ip in &old.as_ref().map(|p| p.ips.clone()).unwrap_or_default() {
            if let Some(s) = self.by_ip.get_mut(ip) {
                s.remove(key);
                if s.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        if let Some(p) = self.world.pods.get(key) {
            for ip in &p.ips {
                ips.insert(*ip);
                self.by_ip.entry(*ip).or_default().insert(key.clone());
            }
        }
        let labels_changed =
            old.as_ref().map(|p| &p.labels) != self.world.pods.get(key).map(|p| &p.labels);
        self.refresh_addresses(&ips);
        if self.local.contains_key(key) && labels_changed {
            self.endpoint_changed(key);
        }
        old_table.delta(&self.table)
    }

    /// A namespace added, relabelled or gone.
    pub fn set_namespace(&mut self, name: &str, ns: Option<Namespace>) -> Delta {
        let old_table = self.table.clone();
        match ns {
            Some(n) => self.world.namespaces.insert(name.to_string(), n),
            None => self.world.namespaces.remove(name),
        };
        let ips: BTreeSet<IpAddr> = self
            .world
            .pods
            .iter()
            .filter(|(k, _)| k.namespace == name)
            .flat_map(|(_, p)| p.ips.clone())
            .collect();
        self.refresh_addresses(&ips);
        old_table.delta(&self.table)
    }

    /// A policy added, changed or gone.
    pub fn set_policy(&mut self, key: &PolicyKey, policy: Option<Policy>) -> Delta {
        let old_table = self.table.clone();
        match policy {
            Some(p) => self.world.policies.insert(key.clone(), p),
            None => self.world.policies.remove(key),
        };
        self.recompile_policy(key);
        let eps: Vec<PodKey> = self
            .local
            .keys()
            .filter(|k| k.namespace == key.namespace)
            .cloned()
            .collect();
        for k in eps {
            self.recompile_endpoint(&k);
        }
        old_table.delta(&self.table)
    }

    /// Quarantines interface `ifname` (every new connection in or out
    /// dropped) or lifts it. An interface that is a local endpoint keeps
    /// its endpoint's rules.
    pub fn set_quarantine(&mut self, ifname: &str, on: bool) -> Delta {
        let old_table = self.table.clone();
        if on {
            self.quarantined.insert(ifname.to_string());
        } else {
            self.quarantined.remove(ifname);
        }
        self.quarantine_maps(ifname);
        old_table.delta(&self.table)
    }

    /// Whether `ifname` is quarantined.
    pub fn is_quarantined(&self, ifname: &str) -> bool {
        self.quarantined.contains(ifname)
    }

    fn quarantine_maps(&mut self, ifname: &str) {
        let owner = self
            .local
            .iter()
            .find(|(_, v)| *v == ifname)
            .map(|(k, _)| k.clone());
        if let Some(k) = owner {
            self.recompile_endpoint(&k);
            return;
        }
        for map in [&mut self.table.ingress, &mut self.table.egress] {
            if self.quarantined.contains(ifname) {
                map.insert(ifname.to_string(), "drop".into());
            } else if map.get(ifname).map(String::as_str) == Some("drop") {
                map.remove(ifname);
            }
        }
    }

    /// A pod of this node wired on `ifname` (`Some`) or gone (`None`).
    pub fn set_endpoint(&mut self, key: &PodKey, ifname: Option<String>) -> Delta {
        let old_table = self.table.clone();
        let old = match ifname {
            Some(i) => self.local.insert(key.clone(), i),
            None => self.local.remove(key),
        };
        if let Some(old) = old {
            for dir in [Direction::Ingress, Direction::Egress] {
                self.table.chains.remove(&endpoint_chain(dir, &old));
            }
            self.table.ingress.remove(&old);
            self.table.egress.remove(&old);
            self.quarantine_maps(&old);
        }
        self.endpoint_changed(key);
        let ips: BTreeSet<IpAddr> = self
            .world
            .pods
            .get(key)
            .map(|p| p.ips.iter().copied().collect())
            .unwrap_or_default();
        self.refresh_addresses(&ips);
        old_table.delta(&self.table)
    }

    /// The endpoint `key`'s selection may have changed: the policies of
    /// its namespace compiled or dropped as they now select local pods,
    /// and its own chains.
    fn endpoint_changed(&mut self, key: &PodKey) {
        let policies: Vec<PolicyKey> = self
            .world
            .policies
            .keys()
            .filter(|k| k.namespace == key.namespace)
            .cloned()
            .collect();
        for k in policies {
            let wanted = self.selects_local(&k);
            if wanted != self.compiled.contains_key(&k) {
                self.recompile_policy(&k);
            }
        }
        self.recompile_endpoint(key);
    }

    fn selects_local(&self, key: &PolicyKey) -> bool {
        let Some(p) = self.world.policies.get(key) else {
            return false;
        };
        self.local.keys().any(|k| {
            k.namespace == key.namespace
                && self
                    .world
                    .pods
                    .get(k)
                    .is_some_and(|pod| p.selector.matches(&pod.labels))
        })
    }

    /// The policies isolating local endpoint `key` in `dir`.
    fn isolating(&self, key: &PodKey, dir: Direction) -> Vec<PolicyKey> {
        let Some(pod) = self.world.pods.get(key) else {
            return Vec::new();
        };
        self.world
            .policies
            .iter()
            .filter(|(k, p)| {
                k.namespace == key.namespace
                    && p.rules(dir).is_some()
                    && p.selector.matches(&pod.labels)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn recompile_endpoint(&mut self, key: &PodKey) {
        let Some(ifname) = self.local.get(key).cloned() else {
            return;
        };
        for dir in [Direction::Ingress, Direction::Egress] {
            let chain = endpoint_chain(dir, &ifname);
            let policies = self.isolating(key, dir);
            let map = match dir {
                Direction::Ingress => &mut self.table.ingress,
                Direction::Egress => &mut self.table.egress,
            };
            if policies.is_empty() {
                map.remove(&ifname);
                self.table.chains.remove(&chain);
                if self.quarantined.contains(&ifname) {
                    // Known now, and not isolated: the quarantine is over
                    // only when the engine lifts it.
                    map.insert(ifname.clone(), "drop".into());
                }
                continue;
            }
            let clear = format!("meta mark set meta mark & {:#010x}", !ALLOW_MARK);
            let mut rules = vec!["ct state invalid drop".to_string(), clear.clone()];
            rules.extend(
                policies
                    .iter()
                    .map(|p| format!("jump {}", policy_chain(dir, p))),
            );
            rules.push(format!("meta mark & {ALLOW_MARK:#010x} == 0 drop"));
            rules.push(clear);
            map.insert(ifname.clone(), format!("jump {chain}"));
            self.table.chains.insert(chain, rules);
        }
    }

    /// Drops what was compiled for `key` and compiles it again if it
    /// exists and selects a local endpoint.
    fn recompile_policy(&mut self, key: &PolicyKey) {
        if self.compiled.remove(key).is_some() {
            for dir in [Direction::Ingress, Direction::Egress] {
                let chain = policy_chain(dir, key);
                self.table.chains.remove(&chain);
                let prefix = format!("{chain}/");
                self.table.sets.retain(|n, _| !n.starts_with(&prefix));
            }
        }
        if !self.selects_local(key) {
            return;
        }
        let policy = self.world.policies[key].clone();
        let mut compiled = Compiled {
            pod_sets: Vec::new(),
        };
        for dir in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = policy.rules(dir) else {
                continue;
            };
            let mut lines = Vec::new();
            for (i, r) in rules.iter().enumerate() {
                lines.extend(self.rule_lines(dir, key, i, r, &mut compiled));
            }
            self.table.chains.insert(policy_chain(dir, key), lines);
        }
        // Fill the pod sets.
        for (name, dir, i, what) in &compiled.pod_sets {
            let rule = &policy.rules(*dir).unwrap_or_default()[*i];
            let mut elems = BTreeSet::new();
            for (pk, pod) in &self.world.pods {
                elems.extend(self.pod_elements(key, *dir, rule, what, pk, pod));
            }
            self.table.sets.insert(
                name.clone(),
                Set {
                    kind: match what {
                        PodSet::Peers { v6: false } => SetKind::Addr4,
                        PodSet::Peers { v6: true } => SetKind::Addr6,
                        PodSet::Named { v6: false, .. } => SetKind::Named4,
                        PodSet::Named { v6: true, .. } => SetKind::Named6,
                    },
                    elements: elems,
                },
            );
        }
        self.compiled.insert(key.clone(), compiled);
    }

    /// The rule lines of rule `i` (and its sets declared: block sets
    /// filled, pod sets recorded in `compiled`).
    fn rule_lines(
        &mut self,
        dir: Direction,
        key: &PolicyKey,
        i: usize,
        r: &Rule,
        compiled: &mut Compiled,
    ) -> Vec<String> {
        let other = match dir {
            Direction::Ingress => "saddr",
            Direction::Egress => "daddr",
        };
        // Peer matches: (family: None = any, text).
        let mut peers: Vec<(Option<bool>, String)> = Vec::new();
        if r.peers.is_empty() {
            peers.push((None, String::new()));
        }
        if r.peers.iter().any(|p| matches!(p, Peer::Pods { .. })) {
            for v6 in [false, true] {
                let name = set_name(dir, key, i, if v6 { "p6" } else { "p4" });
                compiled
                    .pod_sets
                    .push((name.clone(), dir, i, PodSet::Peers { v6 }));
                let fam = if v6 { "ip6" } else { "ip" };
                peers.push((Some(v6), format!("{fam} {other} @{name}")));
            }
        }
        for v6 in [false, true] {
            let mut ranges = Ranges::new(v6);
            let mut any = false;
            for p in &r.peers {
                if let Peer::Block { cidr, except } = p
                    && cidr.is_ipv6() == v6
                {
                    ranges.add_block(cidr, except);
                    any = true;
                }
            }
            if !any {
                continue;
            }
            let name = set_name(dir, key, i, if v6 { "b6" } else { "b4" });
            self.table.sets.insert(
                name.clone(),
                Set {
                    kind: if v6 { SetKind::Block6 } else { SetKind::Block4 },
                    elements: ranges.elements().into_iter().collect(),
                },
            );
            let fam = if v6 { "ip6" } else { "ip" };
            peers.push((Some(v6), format!("{fam} {other} @{name}")));
        }
        // Port matches: (family, text).
        let mut ports: Vec<(Option<bool>, String)> = Vec::new();
        if r.ports.is_empty() {
            ports.push((None, String::new()));
        }
        for (j, p) in r.ports.iter().enumerate() {
            match p {
                PortMatch::All { proto } => ports.push((None, format!("meta l4proto {proto}"))),
                PortMatch::Range { proto, first, last } if first == last => {
                    ports.push((None, format!("meta l4proto {proto} th dport {first}")));
                }
                PortMatch::Range { proto, first, last } => {
                    ports.push((
                        None,
                        format!("meta l4proto {proto} th dport {first}-{last}"),
                    ));
                }
                PortMatch::Named { proto, name } => {
                    for v6 in [false, true] {
                        let set =
                            set_name(dir, key, i, &format!("n{}.{j}", if v6 { 6 } else { 4 }));
                        compiled.pod_sets.push((
                            set.clone(),
                            dir,
                            i,
                            PodSet::Named {
                                v6,
                                proto: *proto,
                                name: name.clone(),
                            },
                        ));
                        let fam = if v6 { "ip6" } else { "ip" };
                        ports.push((
                            Some(v6),
                            format!("{fam} daddr . meta l4proto . th dport @{set}"),
                        ));
                    }
                }
            }
        }
        let mut lines = Vec::new();
        let allow = format!("meta mark set meta mark | {ALLOW_MARK:#010x} return");
        for (pf, pt) in &peers {
            for (qf, qt) in &ports {
                if let (Some(a), Some(b)) = (pf, qf)
                    && a != b
                {
                    continue;
                }
                let text: Vec<&str> = [pt.as_str(), qt.as_str(), allow.as_str()]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect();
                lines.push(text.join(" "));
            }
        }
        lines
    }

    /// The elements pod `pk` contributes to a pod set of rule `rule` of
    /// policy `key`.
    fn pod_elements(
        &self,
        key: &PolicyKey,
        dir: Direction,
        rule: &Rule,
        what: &PodSet,
        pk: &PodKey,
        pod: &Pod,
    ) -> Vec<String> {
        match what {
            PodSet::Peers { v6 } => {
                let Some(ip) = pod.ips.first() else {
                    return Vec::new();
                };
                let hit = rule.peers.iter().any(|p| {
                    matches!(p, Peer::Pods { .. })
                        && peer_matches(&self.world, &key.namespace, p, *ip, Some((pk, pod)))
                });
                if !hit {
                    return Vec::new();
                }
                pod.ips
                    .iter()
                    .filter(|ip| ip.is_ipv6() == *v6)
                    .map(ToString::to_string)
                    .collect()
            }
            PodSet::Named { v6, proto, name } => {
                if dir == Direction::Ingress && !self.local.contains_key(pk) {
                    return Vec::new();
                }
                let Some(port) = pod.named_port(name, *proto) else {
                    return Vec::new();
                };
                pod.ips
                    .iter()
                    .filter(|ip| ip.is_ipv6() == *v6)
                    .map(|ip| format!("{ip} . {proto} . {port}"))
                    .collect()
            }
        }
    }

    /// Recomputes, in every compiled pod set, the elements of `ips` from
    /// the pods that hold them now.
    fn refresh_addresses(&mut self, ips: &BTreeSet<IpAddr>) {
        if ips.is_empty() {
            return;
        }
        let holders: BTreeSet<PodKey> = ips
            .iter()
            .flat_map(|ip| self.by_ip.get(ip).into_iter().flatten().cloned())
            .collect();
        let mut updates: Vec<(String, BTreeSet<String>)> = Vec::new();
        for (key, c) in &self.compiled {
            let policy = &self.world.policies[key];
            for (name, dir, i, what) in &c.pod_sets {
                let rule = &policy.rules(*dir).unwrap_or_default()[*i];
                let mut elems = BTreeSet::new();
                for pk in &holders {
                    if let Some(pod) = self.world.pods.get(pk) {
                        elems.extend(
                            self.pod_elements(key, *dir, rule, what, pk, pod)
                                .into_iter()
                                .filter(|e| ips.iter().any(|ip| element_of(e, *ip))),
                        );
                    }
                }
                updates.push((name.clone(), elems));
            }
        }
        for (name, elems) in updates {
            if let Some(set) = self.table.sets.get_mut(&name) {
                set.elements
                    .retain(|e| !ips.iter().any(|ip| element_of(e, *ip)));
                set.elements.extend(elems);
            }
        }
    }
}

/// Whether set element `e` (an address, or `address . proto . port`) is
/// about `ip`.
fn element_of(e: &str, ip: IpAddr) -> bool {
    let addr = e.split(" . ").next().unwrap_or(e);
    addr.parse::<IpAddr>().is_ok_and(|a| a == ip)
}

#[cfg(test)]
mod tests;
