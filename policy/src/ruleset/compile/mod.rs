//! The incremental compiler ([`Compiler`]): the inputs (the world, this
//! node's workload interfaces, endpoints and scheduled pods), the table
//! they compile to, and what was compiled for each policy. Each change
//! (`set_*`) updates the table and returns the [`Delta`] it made. By
//! concern: `journal` (what a change touched, and its delta), `select`
//! (which policies select the pods here), `endpoints` (endpoint chains
//! and dispatch), `rules` (a policy's chains), `sets` (the shared pod
//! sets and their elements).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::registry::{Index, Registry, SetDef};
use super::{Delta, Element, IFACES_SET, Table, source_set};
use crate::World;
use crate::model::{Direction, Namespace, Pod, PodKey, Policy, PolicyKey};
use crate::selector::Labels;

mod endpoints;
mod journal;
mod rules;
mod select;
mod sets;

use journal::Journal;

/// Everything compiled for one policy: what the incremental updates need.
#[derive(Debug, Clone, Default)]
struct Compiled {
    /// The shared pod sets its rules use.
    sets: BTreeSet<String>,
    /// Its rule and except chains (besides its policy chains).
    chains: BTreeSet<String>,
}

/// A user of an endpoint chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum User {
    /// An interface dispatched to it.
    Iface(String),
    /// A Pod scheduled to this node and not wired yet: its chains are
    /// made ready before its ADD, which then only adds elements.
    Scheduled(PodKey),
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

/// The incremental compiler: inputs, the table, and what was compiled.
#[derive(Debug, Clone)]
pub struct Compiler {
    world: World,
    /// Every workload interface of this node and its addresses (its
    /// allowed sources), pod or no pod.
    sources: BTreeMap<String, Vec<IpAddr>>,
    /// Local endpoints: host interface → its pod.
    endpoints: BTreeMap<String, PodKey>,
    /// Local endpoints by pod: its interfaces (one per attachment).
    local: BTreeMap<PodKey, BTreeSet<String>>,
    /// Pods by address (two pods may briefly share one): a sorted list,
    /// nearly always of one (a set's tree node would cost some 500 bytes
    /// an address).
    by_ip: BTreeMap<IpAddr, Vec<PodKey>>,
    compiled: BTreeMap<PolicyKey, Compiled>,
    /// Interfaces of pods whose Pod cannot be read: everything dropped
    /// but replies, until it can.
    quarantined: BTreeSet<String>,
    /// Endpoint chains, by direction and the policies they jump to.
    ep_chains: Registry<(Direction, Vec<PolicyKey>), User>,
    /// Pods scheduled to this node and not wired yet, with their labels:
    /// the policies selecting them are compiled and their endpoint chains
    /// made before their ADD.
    scheduled: BTreeMap<PodKey, Labels>,
    /// The endpoint chains each scheduled pod holds.
    prepared: BTreeMap<PodKey, Vec<String>>,
    /// For each pod here (a local endpoint, or scheduled), the policies
    /// selecting it.
    selecting: BTreeMap<PodKey, BTreeSet<PolicyKey>>,
    /// The labels `selecting` was last worked out from, per pod here: a
    /// pod whose labels did not change keeps its selection (a policy's
    /// change updates it itself), without matching every policy of its
    /// namespace again.
    selected_as: BTreeMap<PodKey, Vec<Labels>>,
    /// For each policy, how many pods here it selects (compiled while
    /// not zero).
    here: BTreeMap<PolicyKey, usize>,
    /// Shared pod sets, used by policies.
    shared: Registry<SetDef, PolicyKey>,
    /// Shared pod sets by what a pod needs to be in them.
    index: Index,
    table: Table,
    /// What the change under way touched.
    journal: Journal,
    /// The directions whose endpoint chains came or went in the change
    /// under way: their dispatch chains are written once, at its end.
    stale_dispatch: BTreeSet<Direction>,
}

impl Compiler {
    /// Nothing known: a table isolating nothing.
    pub fn new() -> Self {
        Self {
            world: World::default(),
            sources: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            local: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            compiled: BTreeMap::new(),
            quarantined: BTreeSet::new(),
            ep_chains: Registry::default(),
            scheduled: BTreeMap::new(),
            prepared: BTreeMap::new(),
            selecting: BTreeMap::new(),
            selected_as: BTreeMap::new(),
            here: BTreeMap::new(),
            shared: Registry::default(),
            index: Index::new(),
            table: Table::new(),
            journal: Journal::default(),
            stale_dispatch: BTreeSet::new(),
        }
    }

    /// Compiles `world` with the local endpoints `local` (one interface
    /// per pod, its sources the pod's addresses) in one go.
    pub fn full(world: World, local: BTreeMap<PodKey, String>) -> Self {
        let sources = local
            .iter()
            .map(|(k, i)| {
                let ips = world.pods.get(k).map(|p| p.ips.clone()).unwrap_or_default();
                (i.clone(), ips)
            })
            .collect();
        let endpoints = local.into_iter().map(|(k, i)| (i, k)).collect();
        Self::full_with(world, sources, endpoints, BTreeMap::new())
    }

    /// The same inputs compiled again in one go (what an incremental
    /// table must equal).
    pub fn rebuilt(&self) -> Self {
        self.rebuilt_with(self.world.clone())
    }

    /// This node's inputs (workloads, endpoints, scheduled pods,
    /// quarantine) compiled in one go with `world` instead.
    pub fn rebuilt_with(&self, world: World) -> Self {
        let mut c = Self::full_with(
            world,
            self.sources.clone(),
            self.endpoints.clone(),
            self.scheduled.clone(),
        );
        for i in &self.quarantined {
            let _ = c.set_quarantine(i, true);
        }
        c
    }

    /// The policies compiled here (those selecting a pod of this node).
    pub fn compiled(&self) -> impl Iterator<Item = &PolicyKey> {
        self.compiled.keys()
    }

    /// Compiles `world` in one go with this node's workload interfaces
    /// (`sources`: interface → its addresses), the local endpoints among
    /// them (interface → pod) and the pods scheduled to this node and not
    /// wired yet (see [`Compiler::set_scheduled`]).
    pub fn full_with(
        world: World,
        sources: BTreeMap<String, Vec<IpAddr>>,
        endpoints: BTreeMap<String, PodKey>,
        scheduled: BTreeMap<PodKey, Labels>,
    ) -> Self {
        let mut local: BTreeMap<PodKey, BTreeSet<String>> = BTreeMap::new();
        for (i, k) in &endpoints {
            local.entry(k.clone()).or_default().insert(i.clone());
        }
        let mut c = Self {
            world,
            endpoints,
            local,
            scheduled,
            ..Self::new()
        };
        for (i, ips) in sources {
            let _ = c.set_workload(&i, Some(ips));
        }
        for (k, p) in &c.world.pods {
            for ip in &p.ips {
                hold(&mut c.by_ip, *ip, k);
            }
        }
        let here: BTreeSet<PodKey> = c.local.keys().chain(c.scheduled.keys()).cloned().collect();
        for k in here {
            c.update_here(&k);
        }
        let keys: Vec<PolicyKey> = c.world.policies.keys().cloned().collect();
        for k in keys {
            c.recompile_policy(&k);
        }
        let eps: Vec<PodKey> = c.local.keys().cloned().collect();
        for k in eps {
            c.recompile_endpoint(&k);
        }
        let scheduled: Vec<PodKey> = c.scheduled.keys().cloned().collect();
        for k in scheduled {
            c.prepare(&k);
        }
        c.redispatch();
        c.journal = Journal::default();
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

    /// The local endpoints, by pod: its interfaces.
    pub fn local(&self) -> &BTreeMap<PodKey, BTreeSet<String>> {
        &self.local
    }

    /// The local endpoints: interface → pod.
    pub fn endpoints(&self) -> &BTreeMap<String, PodKey> {
        &self.endpoints
    }

    /// Every workload interface and its addresses.
    pub fn workloads(&self) -> &BTreeMap<String, Vec<IpAddr>> {
        &self.sources
    }

    /// Workload interface `ifname` of this node with its addresses (the
    /// only sources its packets may carry), or gone (`None`). An
    /// interface not known here takes and sends nothing.
    pub fn set_workload(&mut self, ifname: &str, addrs: Option<Vec<IpAddr>>) -> Delta {
        let old = match addrs {
            Some(a) => self.sources.insert(ifname.to_string(), a),
            None => self.sources.remove(ifname),
        };
        let new = self.sources.get(ifname).cloned();
        let name = || BTreeSet::from([Element::Iface(ifname.to_string())]);
        match (&old, &new) {
            (None, Some(_)) => self.change_elements(IFACES_SET, &BTreeSet::new(), name()),
            (Some(_), None) => self.change_elements(IFACES_SET, &name(), BTreeSet::new()),
            _ => {}
        }
        for v6 in [false, true] {
            let of = |a: &Option<Vec<IpAddr>>| -> BTreeSet<Element> {
                a.iter()
                    .flatten()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .map(|ip| Element::IfaceAddr {
                        ifname: ifname.to_string(),
                        addr: *ip,
                    })
                    .collect()
            };
            let (was, now) = (of(&old), of(&new));
            let gone: BTreeSet<Element> = was.difference(&now).cloned().collect();
            let added: BTreeSet<Element> = now.difference(&was).cloned().collect();
            self.change_elements(source_set(v6), &gone, added);
        }
        self.finish()
    }

    /// The pods scheduled to this node and not wired yet.
    pub fn scheduled(&self) -> &BTreeMap<PodKey, Labels> {
        &self.scheduled
    }

    /// A Pod the API schedules to this node and that is not wired yet
    /// (`Some`: its labels), or no longer so (`None`). The policies that
    /// select it are compiled and its endpoint chains made now, so its ADD
    /// changes only set elements (the kernel's fast path); nothing
    /// it prepares lets traffic through, since no interface is in its set.
    pub fn set_scheduled(&mut self, key: &PodKey, labels: Option<Labels>) -> Delta {
        match labels {
            Some(l) => self.scheduled.insert(key.clone(), l),
            None => self.scheduled.remove(key),
        };
        self.endpoint_changed(key);
        self.finish()
    }

    /// A pod added, changed (`Some`) or gone (`None`).
    pub fn set_pod(&mut self, key: &PodKey, pod: Option<Pod>) -> Delta {
        // The sets that may hold it as it was.
        let mut before = BTreeSet::new();
        if let Some(p) = self.world.pods.get(key) {
            let ns = self.world.namespace_labels(&key.namespace);
            self.candidates(&key.namespace, ns, p, &mut before);
        }
        let old = match pod {
            Some(p) => self.world.pods.insert(key.clone(), p),
            None => self.world.pods.remove(key),
        };
        let mut ips: BTreeSet<IpAddr> = old.iter().flat_map(|p| p.ips.clone()).collect();
        for ip in &old.as_ref().map(|p| p.ips.clone()).unwrap_or_default() {
            if let Some(s) = self.by_ip.get_mut(ip) {
                s.retain(|k| k != key);
                if s.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        if let Some(p) = self.world.pods.get(key) {
            for ip in &p.ips {
                ips.insert(*ip);
                hold(&mut self.by_ip, *ip, key);
            }
        }
        let labels_changed =
            old.as_ref().map(|p| &p.labels) != self.world.pods.get(key).map(|p| &p.labels);
        self.refresh_addresses(&ips, before);
        if self.local.contains_key(key) && labels_changed {
            self.endpoint_changed(key);
        }
        self.finish()
    }

    /// A namespace added, relabelled or gone.
    pub fn set_namespace(&mut self, name: &str, ns: Option<Namespace>) -> Delta {
        // Its pods' addresses, and the sets that may hold those pods under
        // its old labels.
        let mut before = BTreeSet::new();
        let mut ips = BTreeSet::new();
        let old = self.world.namespace_labels(name);
        for (_, p) in in_namespace(&self.world.pods, name) {
            self.candidates(name, old, p, &mut before);
            ips.extend(p.ips.iter().copied());
        }
        match ns {
            Some(n) => self.world.namespaces.insert(name.to_string(), n),
            None => self.world.namespaces.remove(name),
        };
        self.refresh_addresses(&ips, before);
        self.finish()
    }

    /// A policy added, changed or gone.
    pub fn set_policy(&mut self, key: &PolicyKey, policy: Option<Policy>) -> Delta {
        match policy {
            Some(p) => self.world.policies.insert(key.clone(), p),
            None => self.world.policies.remove(key),
        };
        self.recount(key);
        self.recompile_policy(key);
        for k in keys_in(&self.local, &key.namespace) {
            self.recompile_endpoint(&k);
        }
        for k in keys_in(&self.scheduled, &key.namespace) {
            self.prepare(&k);
        }
        self.finish()
    }

    /// Quarantines interface `ifname` (every new connection in or out
    /// dropped) or lifts it. An interface that is a local endpoint keeps
    /// its endpoint's rules.
    pub fn set_quarantine(&mut self, ifname: &str, on: bool) -> Delta {
        if on {
            self.quarantined.insert(ifname.to_string());
        } else {
            self.quarantined.remove(ifname);
        }
        self.quarantine_maps(ifname);
        self.finish()
    }

    /// Whether `ifname` is quarantined.
    pub fn is_quarantined(&self, ifname: &str) -> bool {
        self.quarantined.contains(ifname)
    }

    /// Interface `ifname` of this node is an endpoint of pod `pod`
    /// (`Some`: it gets the pod's policies), or of none (`None`). A pod
    /// has one per attachment, each enforced.
    pub fn set_endpoint(&mut self, ifname: &str, pod: Option<PodKey>) -> Delta {
        let old = match &pod {
            Some(k) => self.endpoints.insert(ifname.to_string(), k.clone()),
            None => self.endpoints.remove(ifname),
        };
        if old == pod {
            return self.finish();
        }
        if let Some(old) = &old {
            if let Some(ifs) = self.local.get_mut(old) {
                ifs.remove(ifname);
                if ifs.is_empty() {
                    self.local.remove(old);
                }
            }
            for dir in [Direction::Ingress, Direction::Egress] {
                self.release_ep_chain(dir, ifname);
                self.drop_map(dir, ifname);
            }
            self.quarantine_maps(ifname);
            self.endpoint_changed(old);
            self.refresh_pod_addresses(old);
        }
        if let Some(k) = &pod {
            self.local
                .entry(k.clone())
                .or_default()
                .insert(ifname.to_string());
            self.endpoint_changed(k);
            self.refresh_pod_addresses(k);
        }
        self.finish()
    }
}

/// Pod `key` holds address `ip` (kept once, in order).
fn hold(by_ip: &mut BTreeMap<IpAddr, Vec<PodKey>>, ip: IpAddr, key: &PodKey) {
    // A first holder takes a list of exactly one (a push would make room
    // for four).
    let v = by_ip.entry(ip).or_insert_with(|| Vec::with_capacity(1));
    if let Err(i) = v.binary_search(key) {
        v.insert(i, key.clone());
    }
}

/// The entries of `m` in namespace `ns`: a range, since keys sort
/// namespace first.
pub(super) fn in_namespace<'a, V>(
    m: &'a BTreeMap<crate::model::Key, V>,
    ns: &'a str,
) -> impl Iterator<Item = (&'a crate::model::Key, &'a V)> {
    let from = crate::model::Key::new(ns, "");
    m.range(from..)
        .take_while(move |(k, _)| &*k.namespace == ns)
}

/// The keys of `m` in namespace `ns`.
pub(super) fn keys_in<V>(m: &BTreeMap<PodKey, V>, ns: &str) -> Vec<PodKey> {
    in_namespace(m, ns).map(|(k, _)| k.clone()).collect()
}
