//! The policy engine's state, without I/O: watch events (Pods,
//! Namespaces, NetworkPolicies, each with its list/relist cycle) and this
//! node's endpoints in; nft scripts and answers to waiting ADDs out.
//!
//! - Until every one of the three kinds has been listed once, nothing is
//!   written: the table the kernel holds (from before a restart) stays.
//!   Then the whole table is loaded in one transaction, and from then on
//!   each batch of changes is one delta ([`margay_policy::ruleset::Delta`]).
//! - A relist (after a watch broke) is compared with what was known when
//!   it completes: objects it no longer has are deleted then, not before.
//! - Endpoints are attachments, keyed by their host interface: every one
//!   is a workload interface whose packets must carry its own addresses,
//!   pod or no pod, and several of one pod are each enforced. An endpoint
//!   joins its pod's policies only once its Pod's labels are known (an
//!   unlabelled pod would escape selectors); its addresses are the ADD's
//!   until the Pod's status has them.
//! - A Pod that leaves the watch (force-deleted, finished) while its
//!   sandbox is still wired keeps its last labels, and so its rules, until
//!   its last attachment's DEL. An endpoint whose Pod cannot be learned
//!   (the API says there is none, it cannot be read, or it was not there
//!   when the agent started) is quarantined while its namespace has any
//!   policy, open while it has none.
//! - A policy that cannot be enforced as written (the model refuses it, or
//!   it is larger than [`margay_policy::ruleset::MAX_POLICY_COST`]) is
//!   enforced fail closed: the pods it selects are isolated by it in its
//!   directions with nothing allowed, on every node alike; it is reported.
//! - An ADD waiting for its rules is answered once everything is listed,
//!   its Pod is known (or decided on), and the change with its endpoint is
//!   in the kernel.
//! - A failed load is retried as a full load.
//! - Another node's pod (from its endpoint slice) is kept once: its
//!   labels, addresses and ports in the compiler's world, here only its
//!   key and the slice holding it; label sets, namespace and node names
//!   and port lists are interned, shared by the pods alike (a cluster's
//!   pods cost some 800 bytes each, `bench/src/bin/policy-mem.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use margay_api::slice::MargayEndpointSlice;
pub use margay_policy::enforce::Unenforced;
use margay_policy::model::{Key, NamedPort, Namespace};
use margay_policy::ruleset::{Batch, Compiler, Delta};
use margay_policy::{Labels, Pod, PodKey, Policy, PolicyKey};
use std::sync::Arc;

/// A watch event, of any kind (the shape kube-runtime's watcher gives).
#[derive(Debug, Clone)]
pub enum Event<K> {
    /// A (re)list starts.
    Init,
    /// An object of the list.
    InitApply(K),
    /// The list is complete.
    InitDone,
    /// An object added or changed.
    Apply(K),
    /// An object deleted.
    Delete(K),
}

/// One attachment of this node as its ADD wired it (or start-up found it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its host interface (one per attachment: network, container,
    /// interface).
    pub host_if: String,
    /// Its Pod, as the runtime named it (`None`: a container that is no
    /// Kubernetes Pod: its sources are checked, no policy selects it).
    pub pod: Option<PodKey>,
    /// Its addresses: the only sources its packets may carry.
    pub ips: Vec<IpAddr>,
}

/// Which Pod watch an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The Pods scheduled to this node (`spec.nodeName` is this node's
    /// name): always watched. (The engine of no node takes every Pod
    /// from this one.)
    Local,
    /// Every other Pod, from the other nodes' endpoint slices
    /// ([`Engine::slice_event`]; in tests also from a Pod watch): read
    /// only while a policy has pod or namespace peers
    /// ([`Engine::needs_remote_pods`]), kept only with an address.
    Remote,
}

/// What the watch says of a Pod: labels and named ports, and addresses
/// (maybe none yet), and which watch said it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    pod: Pod,
    scope: Scope,
    /// The endpoint slice that holds it (remote pods; shared name).
    slice: Option<std::sync::Arc<str>>,
}

/// Pod `p`'s key, when it has a namespace and a name.
pub(crate) fn pod_key(p: &core::Pod) -> Option<PodKey> {
    p.metadata
        .namespace
        .as_deref()
        .zip(p.metadata.name.as_deref())
        .map(|(ns, n)| Key::new(ns, n))
}

fn watched_pod(p: &core::Pod, scope: Scope) -> Option<(PodKey, Watched)> {
    Pod::from_k8s_unaddressed(p).map(|(key, pod)| {
        let slice = None;
        (key, Watched { pod, scope, slice })
    })
}

/// Label sets shared by the remote pods labelled alike (most of a
/// cluster's pods share theirs with their replicas, so a pod costs a
/// pointer, not a map), namespace and node names, and lists of named
/// ports.
#[derive(Debug, Default)]
struct Interned {
    sets: std::collections::HashSet<Arc<Labels>>,
    names: std::collections::HashSet<Arc<str>>,
    ports: std::collections::HashSet<Arc<[NamedPort]>>,
    /// The sizes after the last sweeps: sets (names, port lists) no pod
    /// holds any more are swept when their number has doubled.
    swept: (usize, usize, usize),
}

/// The one shared copy of `v` in `set`, swept of copies only it holds
/// when it has doubled since the last sweep (`swept`).
fn intern<T: ?Sized + Eq + std::hash::Hash>(
    set: &mut std::collections::HashSet<Arc<T>>,
    swept: &mut usize,
    v: &T,
    make: impl FnOnce(&T) -> Arc<T>,
) -> Arc<T> {
    if let Some(l) = set.get(v) {
        return l.clone();
    }
    if set.len() >= 2 * (*swept).max(1024) {
        set.retain(|l| Arc::strong_count(l) > 1);
        *swept = set.len();
    }
    let l = make(v);
    set.insert(l.clone());
    l
}

impl Interned {
    /// The one shared copy of `labels`.
    fn labels(&mut self, labels: &Labels) -> Arc<Labels> {
        intern(&mut self.sets, &mut self.swept.0, labels, |l| {
            Arc::new(l.clone())
        })
    }

    /// The one shared copy of named ports `ports`.
    fn ports(&mut self, ports: &[NamedPort]) -> Arc<[NamedPort]> {
        intern(&mut self.ports, &mut self.swept.2, ports, |p| Arc::from(p))
    }

    /// The one shared copy of namespace or node name `name`.
    fn name(&mut self, name: &str) -> Arc<str> {
        intern(&mut self.names, &mut self.swept.1, name, |n| Arc::from(n))
    }
}

/// Which kinds have been listed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Listed {
    pods: bool,
    /// The remote Pods, while they are watched.
    remote: bool,
    namespaces: bool,
    policies: bool,
}

/// The engine.
#[derive(Debug, Default)]
pub struct Engine {
    compiler: Compiler,
    /// This node's name: its Pods not wired yet get their chains ready.
    node: Option<String>,
    listed: Listed,
    /// This node's Pods as its watch shows them.
    pods: BTreeMap<PodKey, Watched>,
    /// The other nodes' pods that are kept, each with the endpoint slice
    /// holding it (shared name; empty from a remote Pod watch): their
    /// labels, addresses and ports are only in the compiler's world, one
    /// copy of each.
    remote_pods: std::collections::HashMap<PodKey, std::sync::Arc<str>>,
    /// A relist under way, per scope.
    relist_pods: BTreeMap<Scope, BTreeMap<PodKey, Watched>>,
    /// Whether remote Pods are watched (the loader's to say).
    remote: bool,
    /// Policies with a pod or namespace peer: while there is one, remote
    /// Pods are needed.
    peer_policies: BTreeSet<PolicyKey>,
    /// The remote pods each endpoint slice holds, by slice name, and a
    /// relist's under way (which slice speaks for a pod is in its record:
    /// one that moved between slices is removed only by the one holding
    /// it now).
    slices: std::collections::HashMap<std::sync::Arc<str>, Vec<PodKey>>,
    relist_slices: Option<std::collections::HashMap<std::sync::Arc<str>, Vec<PodKey>>>,
    relist_namespaces: Option<BTreeMap<String, Namespace>>,
    /// What the remote pods share: label sets, namespace and node
    /// names, lists of named ports, one copy of each.
    interned: Interned,
    relist_policies: Option<BTreeMap<PolicyKey, Policy>>,
    /// This node's endpoints, by host interface.
    endpoints: BTreeMap<String, Endpoint>,
    /// Their interfaces, by pod.
    by_pod: BTreeMap<PodKey, BTreeSet<String>>,
    /// Pods gone from the watch (deleted, force-deleted, finished) with
    /// an attachment still wired: their last labels, kept until its DEL.
    departed: BTreeMap<PodKey, Watched>,
    /// Pods of endpoints whose Pod cannot be learned (the API says there
    /// is none, it cannot be read, or it was not there at start-up):
    /// quarantined while their namespace has a policy.
    unresolved: BTreeSet<PodKey>,
    /// Policies the API holds that are not enforced as written, and why
    /// (each enforced fail closed), with their UIDs.
    invalid: BTreeMap<PolicyKey, (Unenforced, Option<String>)>,
    /// Every policy's generation and UID as last seen.
    meta: BTreeMap<PolicyKey, (Option<i64>, Option<String>)>,
    /// Policies whose rules this node's kernel refused, at which
    /// generation, and its answer: enforced fail closed until they change.
    load_failed: BTreeMap<PolicyKey, (Option<i64>, String)>,
    /// Deltas since the last load, rendered only when taken (for the
    /// path they take: netlink elements or an nft script).
    pending: Vec<Delta>,
    /// The next load must be the whole table.
    full: bool,
    /// Whether anything was ever loaded.
    loaded: bool,
}

/// Whether a rule of `p` names pods (by pod or namespace selector).
fn has_pod_peers(p: &Policy) -> bool {
    p.ingress
        .iter()
        .chain(p.egress.iter())
        .flatten()
        .flat_map(|r| &r.peers)
        .any(|peer| matches!(peer, margay_policy::model::Peer::Pods { .. }))
}

/// What the kernel is handed next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// The whole table, as an `nft -f` script.
    Script(String),
    /// The changes since the last load, in one transaction (the agent
    /// hands them to the kernel over netlink, without `nft`).
    Batch(Batch),
}

impl Load {
    /// As an `nft -f` script (the same changes).
    pub fn script(&self) -> String {
        match self {
            Self::Script(s) => s.clone(),
            Self::Batch(b) => b.script(),
        }
    }
}

impl Engine {
    /// Nothing known.
    pub fn new() -> Self {
        Self {
            full: true,
            ..Default::default()
        }
    }

    /// Nothing known, on node `node`: a Pod the API schedules here has
    /// its rules made ready before its ADD
    /// ([`Compiler::set_scheduled`]), so the ADD waits only for set
    /// elements.
    pub fn on_node(node: &str) -> Self {
        Self {
            node: Some(node.to_string()),
            ..Self::new()
        }
    }

    /// Whether every kind has been listed (remote Pods while watched).
    pub fn listed(&self) -> bool {
        self.listed.pods
            && (!self.remote || self.listed.remote)
            && self.listed.namespaces
            && self.listed.policies
    }

    /// What is not listed yet, for status and errors.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.listed.pods {
            v.push("Pods");
        }
        if self.remote && !self.listed.remote {
            v.push("remote Pods");
        }
        if !self.listed.namespaces {
            v.push("Namespaces");
        }
        if !self.listed.policies {
            v.push("NetworkPolicies");
        }
        v
    }

    /// The compiler (the world and table as they are).
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    /// Policies not enforced as written, why, and their UIDs.
    pub fn invalid(&self) -> &BTreeMap<PolicyKey, (Unenforced, Option<String>)> {
        &self.invalid
    }

    /// What `/status` says of the engine (`current` and `last_error` are
    /// the loader's to fill in).
    pub fn status(&self, enforcing: bool) -> margay_api::status::PolicyStatus {
        use margay_api::status::{UnenforcedPolicy, UnenforcedReason};
        margay_api::status::PolicyStatus {
            enforcing,
            waiting_for: self.waiting_for().iter().map(|s| s.to_string()).collect(),
            policies: self.compiler.world().policies.len(),
            endpoints: self.endpoints.len(),
            pods: self.pods.len() + self.remote_pods.len(),
            remote_pods: self.remote,
            current: false,
            last_error: None,
            unenforced: self
                .invalid
                .iter()
                .map(|(k, (why, uid))| UnenforcedPolicy {
                    namespace: k.namespace.to_string(),
                    name: k.name.to_string(),
                    uid: uid.clone(),
                    reason: match why {
                        Unenforced::Refused(_) => UnenforcedReason::Refused,
                        Unenforced::TooLarge { .. } => UnenforcedReason::TooLarge,
                        Unenforced::LoadFailed(_) => UnenforcedReason::LoadFailed,
                    },
                    message: why.to_string(),
                })
                .collect(),
        }
    }

    /// This node's endpoints, by host interface.
    pub fn endpoints(&self) -> &BTreeMap<String, Endpoint> {
        &self.endpoints
    }

    fn push(&mut self, d: Delta) {
        if !self.full && !d.is_empty() {
            self.pending.push(d);
        }
    }

    /// The Pod `key` as last known: from the watch (a remote one from
    /// the compiler's world, its one copy), or its last labels if it left
    /// the watch while wired here.
    fn known(&self, key: &PodKey) -> Option<&Pod> {
        match self.pods.get(key) {
            Some(w) => Some(&w.pod),
            None if self.remote_pods.contains_key(key) => self.compiler.world().pods.get(key),
            None => self.departed.get(key).map(|w| &w.pod),
        }
    }

    /// Brings pod `key` in the compiler in line with the watch and the
    /// endpoint registry.
    fn sync_pod(&mut self, key: &PodKey) {
        let ifs = self.by_pod.get(key).cloned().unwrap_or_default();
        if ifs.is_empty() {
            self.departed.remove(key);
            self.unresolved.remove(key);
        }
        let w = self.known(key);
        let pod = w.map(|w| {
            let mut p = w.clone();
            for i in &ifs {
                for ip in self.endpoints.get(i).into_iter().flat_map(|e| &e.ips) {
                    if !p.ips.contains(ip) {
                        p.ips.push(*ip);
                    }
                }
            }
            p
        });
        // A Pod of this node not wired yet: its rules made ready.
        let scheduled = match (self.pods.get(key), &self.node) {
            (Some(w), Some(n)) if ifs.is_empty() && w.pod.node.as_deref() == Some(n.as_str()) => {
                Some((*w.pod.labels).clone())
            }
            _ => None,
        };
        let pod = pod.filter(|p| !p.ips.is_empty());
        let want = pod.as_ref().map(|_| key.clone());
        if self.compiler.world().pods.get(key) != pod.as_ref() {
            let d = self.compiler.set_pod(key, pod);
            self.push(d);
        }
        for i in &ifs {
            if self.compiler.endpoints().get(i) != want.as_ref() {
                let d = self.compiler.set_endpoint(i, want.clone());
                self.push(d);
            }
        }
        // After its endpoints: the chains it held pass to its interfaces.
        if self.compiler.scheduled().get(key) != scheduled.as_ref() {
            let d = self.compiler.set_scheduled(key, scheduled);
            self.push(d);
        }
        if self.known(key).is_some() {
            self.unresolved.remove(key);
        }
        self.quarantine_as_decided(key);
    }

    /// Quarantines pod `key`'s interfaces, or lifts it, as its state
    /// says: unresolved in a namespace with a policy, quarantined;
    /// otherwise not.
    fn quarantine_as_decided(&mut self, key: &PodKey) {
        let on = self.unresolved.contains(key) && !self.namespace_has_no_policy_listed(key);
        for i in self.by_pod.get(key).cloned().unwrap_or_default() {
            if self.compiler.is_quarantined(&i) != on {
                let d = self.compiler.set_quarantine(&i, on);
                self.push(d);
            }
        }
    }

    /// Whether the watch (or a read) has shown Pod `key`.
    pub fn knows_pod(&self, key: &PodKey) -> bool {
        self.known(key).is_some()
    }

    fn namespace_has_no_policy_listed(&self, key: &PodKey) -> bool {
        let from = Key::new(&key.namespace, "");
        self.compiler
            .world()
            .policies
            .range(from..)
            .next()
            .is_none_or(|(k, _)| k.namespace != key.namespace)
    }

    /// Whether everything is listed and no policy of `key`'s namespace
    /// exists: an endpoint whose Pod the watch has not shown yet needs no
    /// rules now (no API read on the ADD's path); its labels, once the
    /// watch shows them, count like any change.
    pub fn namespace_has_no_policy(&self, key: &PodKey) -> bool {
        self.listed() && self.namespace_has_no_policy_listed(key)
    }

    /// The ADD read the Pod itself (the watch has not shown it yet).
    pub fn pod_read(&mut self, p: core::Pod) {
        self.pod_event(Event::Apply(p));
    }

    /// Endpoint pod `key`'s Pod cannot be learned (the API says there is
    /// none, or it cannot be read, or its namespace has no policy and the
    /// watch has not shown it yet): its interfaces are quarantined (every
    /// new connection in or out dropped) while a policy of its namespace
    /// could select it, and open like any unselected pod while none could;
    /// its labels, once known, count like any change.
    pub fn unresolved(&mut self, key: &PodKey) {
        if self.knows_pod(key) || !self.by_pod.contains_key(key) {
            return;
        }
        self.unresolved.insert(key.clone());
        self.quarantine_as_decided(key);
    }

    /// A Pod gone from the watch: kept as departed while wired here.
    fn pod_gone(&mut self, key: &PodKey, was: Option<Watched>) {
        if let Some(w) = was
            && self.by_pod.contains_key(key)
        {
            self.departed.insert(key.clone(), w);
        }
        self.sync_pod(key);
    }

    /// Pod `key` gone from whichever watch held it.
    fn forget(&mut self, key: &PodKey) {
        let was = match self.pods.remove(key) {
            Some(w) => Some(w),
            None => self.remote_pods.remove(key).and_then(|slice| {
                let pod = self.compiler.world().pods.get(key)?.clone();
                Some(Watched {
                    pod,
                    scope: Scope::Remote,
                    slice: Some(slice),
                })
            }),
        };
        self.remote_pods.remove(key);
        self.pod_gone(key, was);
    }

    /// A Pod watch event of this node's Pods (or, in tests, of every
    /// Pod).
    pub fn pod_event(&mut self, ev: Event<core::Pod>) {
        self.pod_event_in(Scope::Local, ev);
    }

    /// Whether a policy has pod or namespace peers, so remote Pods are
    /// needed (the loader then watches them and says so with
    /// [`Engine::remote_pods`]). Without one no remote Pod can make a
    /// difference: this node's own Pods are what policies select.
    pub fn needs_remote_pods(&self) -> bool {
        !self.peer_policies.is_empty()
    }

    /// Remote Pods are watched from now on (`true`: nothing is loaded
    /// until they are listed, so no policy is enforced with part of its
    /// peers), or no longer (`false`: they are forgotten).
    pub fn remote_pods(&mut self, on: bool) {
        if on == self.remote {
            return;
        }
        self.remote = on;
        self.listed.remote = false;
        self.relist_pods.remove(&Scope::Remote);
        self.slices.clear();
        self.relist_slices = None;
        if !on {
            let gone: Vec<PodKey> = self.remote_pods.keys().cloned().collect();
            for k in gone {
                self.forget(&k);
            }
        }
    }

    /// Whether a Pod from `scope`'s watch is kept: a remote one only with
    /// an address and not of this node (the local watch speaks for those).
    fn keeps(&self, scope: Scope, w: &Watched) -> bool {
        scope == Scope::Local
            || (!w.pod.ips.is_empty()
                && (self.node.is_none() || w.pod.node.as_deref() != self.node.as_deref()))
    }

    /// Whether an event about pod `key` from `scope`'s watch is to be
    /// ignored: the remote watch's, about a pod this node's watch holds
    /// (which speaks for it).
    fn local_holds(&self, scope: Scope, key: &PodKey) -> bool {
        scope == Scope::Remote && self.pods.contains_key(key)
    }

    /// A Pod watch event from `scope`'s watch.
    pub fn pod_event_in(&mut self, scope: Scope, ev: Event<core::Pod>) {
        if scope == Scope::Remote && !self.remote {
            return;
        }
        match ev {
            Event::Init => {
                self.relist_pods.insert(scope, BTreeMap::new());
            }
            Event::InitApply(p) => {
                if let Some((k, w)) = watched_pod(&p, scope)
                    && self.keeps(scope, &w)
                    && let Some(r) = self.relist_pods.get_mut(&scope)
                {
                    r.insert(k, w);
                }
            }
            Event::InitDone => {
                let new = self.relist_pods.remove(&scope).unwrap_or_default();
                self.relisted(scope, new);
            }
            Event::Apply(p) => {
                match (watched_pod(&p, scope), pod_key(&p)) {
                    (Some((k, _)), _) if self.local_holds(scope, &k) => {}
                    (Some((k, w)), _) if self.keeps(scope, &w) => {
                        if scope == Scope::Remote {
                            self.remote_or_local_set(k, w);
                        } else {
                            self.remote_pods.remove(&k);
                            self.pods.insert(k.clone(), w);
                            self.departed.remove(&k);
                            self.sync_pod(&k);
                        }
                    }
                    // Host network, or finished (or, remote, without an
                    // address): no part in policy (its sandbox, while
                    // wired, keeps its last labels).
                    (Some((k, _)), _) | (None, Some(k)) => {
                        if self.local_holds(scope, &k) {
                            return;
                        }
                        self.forget(&k);
                    }
                    (None, None) => {}
                }
            }
            Event::Delete(p) => {
                if let (Some(ns), Some(n)) = (&p.metadata.namespace, &p.metadata.name) {
                    let k = Key::new(ns, n);
                    if self.local_holds(scope, &k) {
                        return;
                    }
                    self.forget(&k);
                }
            }
        }
    }

    /// A (re)list of `scope` is complete with `new`: what it no longer has
    /// goes, the rest is taken.
    fn relisted(&mut self, scope: Scope, mut new: BTreeMap<PodKey, Watched>) {
        let held: Vec<&PodKey> = match scope {
            Scope::Local => self.pods.keys().collect(),
            Scope::Remote => self.remote_pods.keys().collect(),
        };
        let keys: BTreeSet<PodKey> = held.into_iter().chain(new.keys()).cloned().collect();
        for k in keys {
            match new.remove(&k) {
                Some(_) if self.local_holds(scope, &k) => {}
                Some(w) => self.remote_or_local_set(k, w),
                None => self.forget(&k),
            }
        }
        match scope {
            Scope::Local => self.listed.pods = true,
            Scope::Remote => self.listed.remote = true,
        }
        self.resolve_restored();
    }

    /// Pod `k` is as `w` says (synced only when that changed). A remote
    /// one's Pod goes to the compiler's world and is kept nowhere else.
    fn remote_or_local_set(&mut self, k: PodKey, w: Watched) {
        if w.scope == Scope::Remote {
            let slice = w.slice.unwrap_or_else(|| "".into());
            if self.remote_pods.get(&k) == Some(&slice)
                && self.compiler.world().pods.get(&k) == Some(&w.pod)
                && !self.departed.contains_key(&k)
            {
                return;
            }
            self.pods.remove(&k);
            self.departed.remove(&k);
            self.remote_pods.insert(k.clone(), slice);
            if self.compiler.world().pods.get(&k) != Some(&w.pod) {
                let d = self.compiler.set_pod(&k, Some(w.pod));
                self.push(d);
            }
            self.sync_pod(&k);
            return;
        }
        if self.pods.get(&k) == Some(&w) && !self.departed.contains_key(&k) {
            return;
        }
        self.remote_pods.remove(&k);
        self.pods.insert(k.clone(), w);
        self.departed.remove(&k);
        self.sync_pod(&k);
    }

    /// The remote pods slice `s` holds that are kept (with an address, of
    /// another node).
    fn slice_pods(
        &mut self,
        name: &std::sync::Arc<str>,
        s: &MargayEndpointSlice,
    ) -> Vec<(PodKey, Watched)> {
        let node = self.interned.name(&s.spec.node);
        s.spec
            .endpoints
            .iter()
            .map(|e| {
                let ports: Vec<NamedPort> = e
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some(NamedPort {
                            name: p.name.clone(),
                            proto: margay_policy::model::Proto::from_k8s(Some(&p.protocol)).ok()?,
                            port: p.port,
                        })
                    })
                    .collect();
                let pod = Pod {
                    labels: self.interned.labels(&e.labels),
                    ips: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    node: Some(node.clone()),
                    ports: self.interned.ports(&ports),
                };
                let w = Watched {
                    pod,
                    scope: Scope::Remote,
                    slice: Some(name.clone()),
                };
                let ns = self.interned.name(&e.namespace);
                (Key::in_namespace(&ns, &e.name), w)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|(_, w)| self.keeps(Scope::Remote, w))
            .collect()
    }

    /// Remote pod `k` as slice `slice` last held it is gone from it: gone,
    /// unless another slice holds it now or this node's watch does.
    fn slice_dropped(&mut self, slice: &str, k: &PodKey) {
        let holder = self.remote_pods.get(k).map(|s| &**s);
        if holder != Some(slice) || self.local_holds(Scope::Remote, k) {
            return;
        }
        self.forget(k);
    }

    /// An endpoint slice watch event: the other nodes' pods (this node's
    /// own slices are ignored: its Pod watch speaks for them).
    pub fn slice_event(&mut self, ev: Event<MargayEndpointSlice>) {
        if !self.remote {
            return;
        }
        match ev {
            Event::Init => {
                self.relist_pods.insert(Scope::Remote, BTreeMap::new());
                self.relist_slices = Some(Default::default());
            }
            Event::InitApply(s) => {
                let name: std::sync::Arc<str> =
                    s.metadata.name.as_deref().unwrap_or_default().into();
                let pods = self.slice_pods(&name, &s);
                if let (Some(r), Some(sl)) = (
                    self.relist_pods.get_mut(&Scope::Remote),
                    self.relist_slices.as_mut(),
                ) {
                    sl.insert(name, pods.iter().map(|(k, _)| k.clone()).collect());
                    r.extend(pods);
                }
            }
            Event::InitDone => {
                let new = self.relist_pods.remove(&Scope::Remote).unwrap_or_default();
                self.slices = self.relist_slices.take().unwrap_or_default();
                self.relisted(Scope::Remote, new);
            }
            Event::Apply(s) => {
                let name: std::sync::Arc<str> =
                    s.metadata.name.as_deref().unwrap_or_default().into();
                let pods = self.slice_pods(&name, &s);
                let now: Vec<PodKey> = pods.iter().map(|(k, _)| k.clone()).collect();
                let before = self
                    .slices
                    .insert(name.clone(), now.clone())
                    .unwrap_or_default();
                let kept: BTreeSet<&PodKey> = now.iter().collect();
                for k in before.iter().filter(|k| !kept.contains(k)) {
                    self.slice_dropped(&name, k);
                }
                for (k, w) in pods {
                    if !self.local_holds(Scope::Remote, &k) {
                        self.remote_or_local_set(k, w);
                    }
                }
            }
            Event::Delete(s) => {
                let name = s.metadata.name.clone().unwrap_or_default();
                for k in self.slices.remove(name.as_str()).unwrap_or_default() {
                    self.slice_dropped(&name, &k);
                }
            }
        }
    }

    /// Once everything is listed: endpoints found wired at start-up whose
    /// Pod the API does not have are unresolved (quarantined where a
    /// policy could select them).
    fn resolve_restored(&mut self) {
        if !self.listed() {
            return;
        }
        let unknown: Vec<PodKey> = self
            .by_pod
            .keys()
            .filter(|k| !self.knows_pod(k) && !self.unresolved.contains(*k))
            .cloned()
            .collect();
        for k in unknown {
            self.unresolved(&k);
        }
    }

    fn set_namespace(&mut self, name: &str, ns: Option<Namespace>) {
        if self.compiler.world().namespaces.get(name) != ns.as_ref() {
            let d = self.compiler.set_namespace(name, ns);
            self.push(d);
        }
    }

    /// A Namespace watch event.
    pub fn namespace_event(&mut self, ev: Event<core::Namespace>) {
        let conv = Namespace::from_k8s;
        match ev {
            Event::Init => self.relist_namespaces = Some(BTreeMap::new()),
            Event::InitApply(n) => {
                if let (Some(r), Some((k, v))) = (self.relist_namespaces.as_mut(), conv(&n)) {
                    r.insert(k, v);
                }
            }
            Event::InitDone => {
                let new = self.relist_namespaces.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .compiler
                    .world()
                    .namespaces
                    .keys()
                    .filter(|k| !new.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.set_namespace(&k, None);
                }
                for (k, v) in new {
                    self.set_namespace(&k, Some(v));
                }
                self.listed.namespaces = true;
                self.resolve_restored();
            }
            Event::Apply(n) => {
                if let Some((k, v)) = conv(&n) {
                    self.set_namespace(&k, Some(v));
                }
            }
            Event::Delete(n) => {
                if let Some(k) = n.metadata.name {
                    self.set_namespace(&k, None);
                }
            }
        }
    }

    fn set_policy(&mut self, key: &PolicyKey, p: Option<Policy>) {
        if p.as_ref().is_some_and(has_pod_peers) {
            self.peer_policies.insert(key.clone());
        } else {
            self.peer_policies.remove(key);
        }
        if self.compiler.world().policies.get(key) != p.as_ref() {
            let d = self.compiler.set_policy(key, p);
            self.push(d);
            // Unresolved pods of its namespace: quarantined while it has
            // a policy.
            let pods: Vec<PodKey> = self
                .unresolved
                .iter()
                .filter(|k| k.namespace == key.namespace)
                .cloned()
                .collect();
            for k in pods {
                self.quarantine_as_decided(&k);
            }
        }
    }

    /// Converts; a policy that cannot be enforced as written is recorded
    /// and enforced fail closed (`margay_policy::enforce`).
    fn convert(&mut self, p: &net::NetworkPolicy) -> Option<(PolicyKey, Policy)> {
        let (key, mut policy, mut why) = margay_policy::enforce::enforced(p)?;
        let generation = p.metadata.generation;
        self.meta
            .insert(key.clone(), (generation, p.metadata.uid.clone()));
        // The version the kernel refused stays closed; a new one is tried.
        match self.load_failed.get(&key) {
            Some((g, msg)) if *g == generation && why.is_none() => {
                why = Some(Unenforced::LoadFailed(msg.clone()));
                policy = margay_policy::enforce::closed(&policy);
            }
            Some((g, _)) if *g == generation => {}
            Some(_) => {
                self.load_failed.remove(&key);
            }
            None => {}
        }
        match why {
            None => {
                self.invalid.remove(&key);
            }
            Some(why) => {
                if self.invalid.get(&key).map(|(w, _)| w) != Some(&why) {
                    tracing::warn!(policy = %key, "NetworkPolicy not enforced as written, its pods isolated by it with nothing allowed: {why}");
                }
                self.invalid
                    .insert(key.clone(), (why, p.metadata.uid.clone()));
            }
        }
        Some((key, policy))
    }

    fn forget_policy(&mut self, k: &PolicyKey) {
        self.invalid.remove(k);
        self.meta.remove(k);
        self.load_failed.remove(k);
    }

    /// The policies a refused full load may be about: those compiled
    /// here and enforced as written.
    pub fn load_suspects(&self) -> Vec<PolicyKey> {
        self.compiler
            .compiled()
            .filter(|k| !self.invalid.contains_key(*k))
            .cloned()
            .collect()
    }

    /// The whole table as an `nft` script with `closed` enforced fail
    /// closed (to find which policy the kernel refuses).
    pub fn script_closing(&self, closed: &[PolicyKey]) -> String {
        let mut world = self.compiler.world().clone();
        for k in closed {
            if let Some(p) = world.policies.get_mut(k) {
                *p = margay_policy::enforce::closed(p);
            }
        }
        self.compiler.rebuilt_with(world).table().script()
    }

    /// This node's kernel refused the rules of `keys` (`why`): each is
    /// enforced fail closed until it changes, and reported; the next load
    /// is the whole table.
    pub fn kernel_refused(&mut self, keys: &[PolicyKey], why: &str) {
        for k in keys {
            let (generation, uid) = self.meta.get(k).cloned().unwrap_or_default();
            tracing::warn!(policy = %k, "NetworkPolicy refused by this node's kernel, enforced fail closed: {why}");
            self.load_failed
                .insert(k.clone(), (generation, why.to_string()));
            self.invalid
                .insert(k.clone(), (Unenforced::LoadFailed(why.to_string()), uid));
            if let Some(p) = self.compiler.world().policies.get(k) {
                let closed = margay_policy::enforce::closed(p);
                self.set_policy(k, Some(closed));
            }
        }
        self.full = true;
        self.pending.clear();
    }

    /// A NetworkPolicy watch event.
    pub fn policy_event(&mut self, ev: Event<net::NetworkPolicy>) {
        match ev {
            Event::Init => self.relist_policies = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let Some((k, v)) = self.convert(&p)
                    && let Some(r) = self.relist_policies.as_mut()
                {
                    r.insert(k, v);
                }
            }
            Event::InitDone => {
                let new = self.relist_policies.take().unwrap_or_default();
                let gone: Vec<PolicyKey> = self
                    .compiler
                    .world()
                    .policies
                    .keys()
                    .filter(|k| !new.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.forget_policy(&k);
                    self.set_policy(&k, None);
                }
                for (k, v) in new {
                    self.set_policy(&k, Some(v));
                }
                self.listed.policies = true;
                self.resolve_restored();
            }
            Event::Apply(p) => {
                if let Some((k, v)) = self.convert(&p) {
                    self.set_policy(&k, Some(v));
                }
            }
            Event::Delete(p) => {
                if let (Some(ns), Some(n)) = (&p.metadata.namespace, &p.metadata.name) {
                    let k = Key::new(ns, n);
                    self.forget_policy(&k);
                    self.set_policy(&k, None);
                }
            }
        }
    }

    /// An ADD wired `ep` (or start-up found it wired). A retried ADD of
    /// the same attachment replaces it.
    pub fn endpoint_added(&mut self, ep: Endpoint) {
        let host_if = ep.host_if.clone();
        let d = self.compiler.set_workload(&host_if, Some(ep.ips.clone()));
        self.push(d);
        let old = self.endpoints.insert(host_if.clone(), ep.clone());
        let old_pod = old
            .and_then(|o| o.pod)
            .filter(|k| Some(k) != ep.pod.as_ref());
        if let Some(k) = &old_pod {
            self.unlink(k, &host_if);
        }
        match &ep.pod {
            Some(k) => {
                self.by_pod
                    .entry(k.clone())
                    .or_default()
                    .insert(host_if.clone());
                self.sync_pod(k);
            }
            None => {
                if self.compiler.endpoints().contains_key(&host_if) {
                    let d = self.compiler.set_endpoint(&host_if, None);
                    self.push(d);
                }
            }
        }
        if let Some(k) = old_pod {
            self.sync_pod(&k);
        }
    }

    /// Interface `host_if` no longer belongs to pod `key`.
    fn unlink(&mut self, key: &PodKey, host_if: &str) {
        if let Some(ifs) = self.by_pod.get_mut(key) {
            ifs.remove(host_if);
            if ifs.is_empty() {
                self.by_pod.remove(key);
            }
        }
        if self.compiler.endpoints().contains_key(host_if) {
            let d = self.compiler.set_endpoint(host_if, None);
            self.push(d);
        }
    }

    /// Start-up found `host_if` wired, but neither its alias nor IPAM
    /// says whose it is: it is quarantined (nothing in or out but
    /// replies) until its DEL.
    pub fn endpoint_unattributed(&mut self, host_if: &str, ips: Vec<IpAddr>) {
        self.endpoint_added(Endpoint {
            host_if: host_if.to_string(),
            pod: None,
            ips,
        });
        let d = self.compiler.set_quarantine(host_if, true);
        self.push(d);
    }

    /// The attachment on `host_if` was deleted: its interface is no longer
    /// a workload (nothing it sends passes, nothing reaches it).
    pub fn endpoint_deleted(&mut self, host_if: &str) {
        if let Some(ep) = self.endpoints.remove(host_if) {
            if let Some(k) = &ep.pod {
                self.unlink(k, host_if);
                self.sync_pod(k);
            }
            if self.compiler.endpoints().contains_key(host_if) {
                let d = self.compiler.set_endpoint(host_if, None);
                self.push(d);
            }
        }
        if self.compiler.workloads().contains_key(host_if) {
            let d = self.compiler.set_workload(host_if, None);
            self.push(d);
        }
        if self.compiler.is_quarantined(host_if) {
            let d = self.compiler.set_quarantine(host_if, false);
            self.push(d);
        }
    }

    /// Whether the endpoint on `host_if` is in the rules as loaded
    /// (everything listed, its Pod known or decided on, nothing pending).
    pub fn programmed(&self, host_if: &str) -> bool {
        let Some(ep) = self.endpoints.get(host_if) else {
            return false;
        };
        let decided = match &ep.pod {
            None => true,
            Some(k) => {
                self.compiler.endpoints().get(host_if) == Some(k)
                    || self.unresolved.contains(k)
                    || self.compiler.is_quarantined(host_if)
            }
        };
        self.listed() && self.loaded && !self.full && self.pending.is_empty() && decided
    }

    /// Why the endpoint of pod `key` is not programmed yet.
    pub fn why_not(&self, key: &PodKey) -> String {
        if !self.listed() {
            return format!("not listed yet: {}", self.waiting_for().join(", "));
        }
        if !self.knows_pod(key) {
            return format!("Pod {key} not seen in the API yet");
        }
        "the rules are not loaded yet".into()
    }
    /// The next script to load, if any: the whole table (first load,
    /// after a failure, or asked by [`Engine::resync`]), else the deltas.
    pub fn take_script(&mut self) -> Option<String> {
        self.take_load().map(|l| l.script())
    }

    /// What to load next, if anything: as [`Engine::take_script`], but
    /// deltas come as their typed commands (the agent hands them to the
    /// kernel over netlink, without `nft`).
    pub fn take_load(&mut self) -> Option<Load> {
        if !self.listed() {
            return None;
        }
        let pending = std::mem::take(&mut self.pending);
        if self.full {
            return Some(Load::Script(self.compiler.table().script()));
        }
        if pending.is_empty() {
            return None;
        }
        let mut b = Batch::default();
        for d in &pending {
            b.extend(d);
        }
        (!b.is_empty()).then_some(Load::Batch(b))
    }

    /// The script from [`Engine::take_script`] was loaded (or not).
    pub fn loaded(&mut self, ok: bool) {
        if ok {
            self.full = false;
            self.loaded = true;
        } else {
            self.full = true;
            self.pending.clear();
        }
    }

    /// Whether a load succeeded and nothing since asked for the whole
    /// table again.
    pub fn is_loaded(&self) -> bool {
        self.loaded && !self.full
    }

    /// The next load is the whole table.
    pub fn resync(&mut self) {
        self.full = true;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: Option<&str>) -> core::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
            "status": ip.map_or(serde_json::json!({"phase": "Pending"}), |ip| serde_json::json!({"phase": "Running", "podIP": ip}))
        }))
        .unwrap()
    }

    fn ns(name: &str) -> core::Namespace {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    }

    fn deny_all(ns: &str) -> net::NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": "deny"},
            "spec": {"podSelector": {}}
        }))
        .unwrap()
    }

    fn list_all(
        e: &mut Engine,
        pods: Vec<core::Pod>,
        nss: Vec<core::Namespace>,
        pols: Vec<net::NetworkPolicy>,
    ) {
        e.pod_event(Event::Init);
        for p in pods {
            e.pod_event(Event::InitApply(p));
        }
        e.pod_event(Event::InitDone);
        e.namespace_event(Event::Init);
        for n in nss {
            e.namespace_event(Event::InitApply(n));
        }
        e.namespace_event(Event::InitDone);
        e.policy_event(Event::Init);
        for p in pols {
            e.policy_event(Event::InitApply(p));
        }
        e.policy_event(Event::InitDone);
    }

    #[test]
    fn nothing_is_written_until_every_kind_is_listed_then_the_whole_table() {
        let mut e = Engine::new();
        e.pod_event(Event::Init);
        e.pod_event(Event::InitApply(pod("x", "a", &[], Some("10.0.0.1"))));
        e.pod_event(Event::InitDone);
        e.namespace_event(Event::Init);
        e.namespace_event(Event::InitDone);
        assert_eq!(e.take_script(), None, "NetworkPolicies not listed");
        assert_eq!(e.waiting_for(), ["NetworkPolicies"]);
        e.policy_event(Event::Init);
        e.policy_event(Event::InitApply(deny_all("x")));
        e.policy_event(Event::InitDone);
        let s = e.take_script().unwrap();
        assert!(
            s.starts_with("table inet margay_policy\ndelete table"),
            "{s}"
        );
        e.loaded(true);
        assert_eq!(e.take_script(), None);
    }

    /// The ADD of x/a on cali1 (10.0.0.1).
    /// Whether `script` adds or deletes (`verb`) interface cali1 in a set
    /// whose name starts with `set`.
    fn dispatched(script: &str, verb: &str, set: &str) -> bool {
        dispatched_if(script, verb, set, "cali1")
    }

    /// Whether `script` adds or deletes (`verb`) interface `i` in a set
    /// whose name starts with `set`.
    fn dispatched_if(script: &str, verb: &str, set: &str, i: &str) -> bool {
        script.lines().any(|l| {
            l.starts_with(&format!("{verb} element inet margay_policy {set}"))
                && l.ends_with(&format!("{{ \"{i}\" }}"))
        })
    }

    fn add_cali1(e: &mut Engine) -> PodKey {
        let key = Key::new("x", "a");
        e.endpoint_added(Endpoint {
            pod: Some(key.clone()),
            host_if: "cali1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        key
    }

    #[test]
    fn an_add_is_programmed_once_its_pod_is_known_and_the_delta_loaded() {
        let mut e = Engine::new();
        list_all(&mut e, vec![], vec![ns("x")], vec![deny_all("x")]);
        assert!(e.take_script().is_some());
        e.loaded(true);
        // The ADD comes before the watch shows the Pod with its labels.
        let key = add_cali1(&mut e);
        assert!(!e.programmed("cali1"));
        assert!(e.why_not(&key).contains("not seen"), "{}", e.why_not(&key));
        // The Pod, without an address yet (the kubelet writes it later).
        e.pod_event(Event::Apply(pod("x", "a", &[("app", "a")], None)));
        assert!(!e.programmed("cali1"));
        let s = e.take_script().unwrap();
        assert!(dispatched(&s, "add", "if-in/"), "{s}");
        e.loaded(true);
        assert!(e.programmed("cali1"));
        // Its address from the ADD is in the world.
        assert_eq!(
            e.compiler().world().pods[&key].ips,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        // Deleted: out of the map.
        e.endpoint_deleted("cali1");
        let s = e.take_script().unwrap();
        assert!(
            dispatched(&s, "delete", "if-in/")
                || s.contains("delete set inet margay_policy if-in/"),
            "{s}"
        );
    }

    /// A Pod the API schedules here has its rules ready before its ADD:
    /// the ADD is set elements only (netlink, not nft).
    #[test]
    fn a_pod_scheduled_here_makes_its_add_elements_only() {
        let mut e = Engine::on_node("node1");
        list_all(&mut e, vec![], vec![ns("x")], vec![deny_all("x")]);
        assert!(e.take_load().is_some());
        e.loaded(true);
        // Scheduled (nodeName node1), no address yet: chains made now.
        e.pod_event(Event::Apply(pod("x", "a", &[("app", "a")], None)));
        let Some(Load::Batch(b)) = e.take_load() else {
            panic!("the policy and endpoint chains are a delta");
        };
        let s = b.script();
        assert!(!b.elements_only());
        assert!(s.contains("add chain inet margay_policy ep-in/"), "{s}");
        assert!(!s.contains("cali"), "no interface yet: {s}");
        e.loaded(true);
        add_cali1(&mut e);
        let Some(Load::Batch(d)) = e.take_load() else {
            panic!("the ADD is a delta");
        };
        assert!(d.elements_only(), "the ADD is elements only: {d:?}");
        assert!(dispatched(&d.script(), "add", "if-in/"), "{}", d.script());
        e.loaded(true);
        assert!(e.programmed("cali1"));
        // Another node's Pod prepares nothing.
        let mut other = pod("x", "b", &[("app", "a")], None);
        other.spec.as_mut().unwrap().node_name = Some("node2".into());
        e.pod_event(Event::Apply(other));
        assert_eq!(e.take_load(), None);
    }

    #[test]
    fn an_unknown_pod_in_a_namespace_without_policies_needs_no_read() {
        let mut e = Engine::new();
        list_all(&mut e, vec![], vec![ns("x"), ns("y")], vec![deny_all("x")]);
        e.take_script();
        e.loaded(true);
        let (kx, ky) = (Key::new("x", "a"), Key::new("y", "a"));
        assert!(!e.namespace_has_no_policy(&kx));
        assert!(e.namespace_has_no_policy(&ky));
        e.endpoint_added(Endpoint {
            pod: Some(ky.clone()),
            host_if: "cali2".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        });
        e.unresolved(&ky);
        let s = e.take_script().unwrap();
        assert!(!s.contains("if-in/drop"), "open: {s}");
        assert!(
            s.contains("src/4 { \"cali2\" . 10.0.0.2 }"),
            "its sources: {s}"
        );
        e.loaded(true);
        assert!(e.programmed("cali2"));
        // A policy comes to its namespace while its Pod is still unknown:
        // quarantined, not open.
        e.policy_event(Event::Apply(deny_all("y")));
        let s = e.take_script().unwrap();
        assert!(dispatched_if(&s, "add", "if-in/drop", "cali2"), "{s}");
        e.loaded(true);
        // The Pod shows up later with labels: handled like any change.
        e.pod_event(Event::Apply(pod(
            "y",
            "a",
            &[("app", "a")],
            Some("10.0.0.2"),
        )));
        assert!(e.knows_pod(&ky));
        let s = e.take_script().unwrap();
        assert!(dispatched_if(&s, "delete", "if-in/drop", "cali2"), "{s}");
    }

    fn on(p: core::Pod, node: &str) -> core::Pod {
        let mut p = p;
        p.spec.as_mut().unwrap().node_name = Some(node.into());
        p
    }

    /// Other nodes' Pods count only while a policy has pod peers: their
    /// watch is wanted then, nothing is loaded until it has listed, and
    /// they are forgotten when it stops. This node's watch speaks for
    /// its own Pods whatever the other says.
    fn slice(name: &str, node: &str, eps: &[(&str, &str, &str)]) -> MargayEndpointSlice {
        MargayEndpointSlice::new(
            name,
            margay_api::slice::MargayEndpointSliceSpec {
                node: node.into(),
                endpoints: eps
                    .iter()
                    .map(|(n, app, ip)| margay_api::slice::SliceEndpoint {
                        namespace: "x".into(),
                        name: (*n).into(),
                        labels: [("app".to_string(), (*app).to_string())].into(),
                        addresses: vec![(*ip).into()],
                        ports: vec![],
                    })
                    .collect(),
            },
        )
    }

    /// Node1's engine, everything listed: its pod `x/a`, and a policy of
    /// `x` allowing pods labelled `app=b` in (a pod peer: remote pods
    /// needed).
    fn with_a_policy_from_b() -> Engine {
        let mut e = Engine::on_node("node1");
        list_all(
            &mut e,
            vec![pod("x", "a", &[], Some("10.0.0.1"))],
            vec![ns("x")],
            vec![],
        );
        let from_b: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "from-b"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}
        }))
        .unwrap();
        e.policy_event(Event::Apply(from_b));
        e
    }

    #[test]
    fn remote_pods_come_from_the_other_nodes_slices() {
        let mut e = with_a_policy_from_b();
        let _ = e.take_load();
        e.loaded(true);
        assert!(e.needs_remote_pods());
        e.remote_pods(true);
        assert_eq!(e.take_load(), None, "no peer set loaded half full");
        e.slice_event(Event::Init);
        e.slice_event(Event::InitApply(slice(
            "node2.0",
            "node2",
            &[("r", "b", "10.0.0.9"), ("s", "b", "10.0.0.10")],
        )));
        // This node's own slice: its Pod watch speaks for those.
        e.slice_event(Event::InitApply(slice(
            "node1.0",
            "node1",
            &[("a", "b", "10.0.0.1")],
        )));
        e.slice_event(Event::InitDone);
        assert!(e.listed());
        let world = e.compiler().world();
        assert_eq!(
            world.pods[&Key::new("x", "r")].node.as_deref(),
            Some("node2")
        );
        assert!(world.pods.contains_key(&Key::new("x", "s")));
        assert!(
            world.pods[&Key::new("x", "a")].labels.is_empty(),
            "local labels kept"
        );
        let script = e.take_load().unwrap().script();
        assert!(
            script.contains("10.0.0.9") && script.contains("10.0.0.10"),
            "{script}"
        );
        e.loaded(true);
        // s moves to another slice of node2, then its old slice drops it:
        // it stays; r leaves: it goes.
        e.slice_event(Event::Apply(slice(
            "node2.1",
            "node2",
            &[("s", "b", "10.0.0.10")],
        )));
        e.slice_event(Event::Apply(slice("node2.0", "node2", &[])));
        let world = e.compiler().world();
        assert!(!world.pods.contains_key(&Key::new("x", "r")));
        assert!(world.pods.contains_key(&Key::new("x", "s")));
        // A relabel is one element change.
        e.slice_event(Event::Apply(slice(
            "node2.1",
            "node2",
            &[("s", "c", "10.0.0.10")],
        )));
        let Some(Load::Batch(b)) = e.take_load() else {
            panic!("a delta")
        };
        assert!(b.script().contains("10.0.0.10"));
        e.loaded(true);
        // The slice is deleted (its node went): its pods go.
        e.slice_event(Event::Delete(slice("node2.1", "node2", &[])));
        assert!(!e.compiler().world().pods.contains_key(&Key::new("x", "s")));
        // A relist without a slice seen before drops its pods, not before.
        e.slice_event(Event::Apply(slice(
            "node3.0",
            "node3",
            &[("t", "b", "10.0.0.11")],
        )));
        e.slice_event(Event::Init);
        assert!(e.compiler().world().pods.contains_key(&Key::new("x", "t")));
        e.slice_event(Event::InitDone);
        assert!(!e.compiler().world().pods.contains_key(&Key::new("x", "t")));
    }

    /// A remote pod is kept once: its labels, addresses and ports in the
    /// compiler's world only (the engine holds its key and slice), its
    /// label set and namespace shared with the pods labelled alike.
    #[test]
    fn a_remote_pod_is_kept_once_its_labels_shared() {
        let mut e = with_a_policy_from_b();
        e.remote_pods(true);
        e.slice_event(Event::Init);
        e.slice_event(Event::InitApply(slice(
            "node2.0",
            "node2",
            &[("r", "b", "10.0.0.9"), ("s", "b", "10.0.0.10")],
        )));
        e.slice_event(Event::InitDone);
        e.slice_event(Event::Apply(slice(
            "node3.0",
            "node3",
            &[("t", "b", "10.0.0.11")],
        )));
        let (r, s, t) = (Key::new("x", "r"), Key::new("x", "s"), Key::new("x", "t"));
        for k in [&r, &s, &t] {
            assert!(!e.pods.contains_key(k), "{k}: not in this node's Pods");
            assert!(!e.departed.contains_key(k));
            assert!(e.remote_pods.contains_key(k));
        }
        assert_eq!(&*e.remote_pods[&t], "node3.0");
        let world = &e.compiler().world().pods;
        assert!(Arc::ptr_eq(&world[&r].labels, &world[&t].labels));
        // Held by the three pods in the world and the interner: a copy
        // anywhere else (the engine's record of a pod) would count.
        assert_eq!(Arc::strong_count(&world[&r].labels), 4);
        let keys: Vec<&PodKey> = world.keys().filter(|k| k.name != "a".into()).collect();
        assert!(Arc::ptr_eq(&keys[0].namespace, &keys[2].namespace));
        // Forgotten when remote pods are no longer watched.
        e.remote_pods(false);
        assert!(e.remote_pods.is_empty());
        assert_eq!(e.compiler().world().pods.len(), 1);
    }

    #[test]
    fn remote_pods_are_needed_only_for_pod_peers() {
        let mut e = Engine::on_node("node1");
        list_all(
            &mut e,
            vec![pod("x", "a", &[], Some("10.0.0.1"))],
            vec![ns("x")],
            vec![deny_all("x")],
        );
        assert!(!e.needs_remote_pods(), "deny-all names no pods");
        assert!(e.listed());
        assert!(e.take_load().is_some());
        e.loaded(true);
        // A remote event while none is watched: ignored.
        e.pod_event_in(
            Scope::Remote,
            Event::Apply(on(
                pod("x", "r", &[("app", "b")], Some("10.0.0.9")),
                "node2",
            )),
        );
        assert!(!e.compiler().world().pods.contains_key(&Key::new("x", "r")));
        let from_b: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "from-b"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}
        }))
        .unwrap();
        e.policy_event(Event::Apply(from_b.clone()));
        assert!(e.needs_remote_pods());
        e.remote_pods(true);
        assert!(!e.listed() && e.waiting_for() == ["remote Pods"]);
        assert_eq!(e.take_load(), None, "no peer set loaded half full");
        e.pod_event_in(Scope::Remote, Event::Init);
        e.pod_event_in(
            Scope::Remote,
            Event::InitApply(on(
                pod("x", "r", &[("app", "b")], Some("10.0.0.9")),
                "node2",
            )),
        );
        // Without an address, or of this node: not kept from this watch.
        e.pod_event_in(
            Scope::Remote,
            Event::InitApply(on(pod("x", "p", &[("app", "b")], None), "node2")),
        );
        e.pod_event_in(
            Scope::Remote,
            Event::InitApply(pod("x", "a", &[("app", "b")], Some("10.0.0.1"))),
        );
        e.pod_event_in(Scope::Remote, Event::InitDone);
        assert!(e.listed());
        let world = e.compiler().world();
        assert!(world.pods.contains_key(&Key::new("x", "r")));
        assert!(!world.pods.contains_key(&Key::new("x", "p")));
        assert!(
            world.pods[&Key::new("x", "a")].labels.is_empty(),
            "local labels kept"
        );
        let Some(load) = e.take_load() else {
            panic!("nothing loaded")
        };
        assert!(load.script().contains("10.0.0.9"), "{}", load.script());
        e.loaded(true);
        // The remote watch's delete of a local pod (it was briefly
        // unscheduled) does not remove it.
        e.pod_event_in(
            Scope::Remote,
            Event::Delete(pod("x", "a", &[], Some("10.0.0.1"))),
        );
        assert!(e.compiler().world().pods.contains_key(&Key::new("x", "a")));
        // A local relist does not drop remote pods.
        e.pod_event_in(Scope::Local, Event::Init);
        e.pod_event_in(
            Scope::Local,
            Event::InitApply(pod("x", "a", &[], Some("10.0.0.1"))),
        );
        e.pod_event_in(Scope::Local, Event::InitDone);
        assert!(e.compiler().world().pods.contains_key(&Key::new("x", "r")));
        let _ = e.take_load();
        e.loaded(true);
        // The policy goes, the watch stops: remote pods forgotten, local kept.
        e.policy_event(Event::Delete(from_b));
        assert!(!e.needs_remote_pods());
        e.remote_pods(false);
        assert!(e.listed());
        let world = e.compiler().world();
        assert!(!world.pods.contains_key(&Key::new("x", "r")));
        assert!(world.pods.contains_key(&Key::new("x", "a")));
    }

    #[test]
    fn a_remote_pods_label_is_elements_only_a_policy_is_chains_one_batch() {
        let mut e = Engine::new();
        let from_b: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "from-b"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}
        }))
        .unwrap();
        list_all(
            &mut e,
            vec![
                pod("x", "a", &[], Some("10.0.0.1")),
                pod("x", "r", &[], Some("10.0.0.9")),
            ],
            vec![ns("x")],
            vec![from_b],
        );
        e.endpoint_added(Endpoint {
            pod: Some(Key::new("x", "a")),
            host_if: "cali1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        assert!(matches!(e.take_load(), Some(Load::Script(_))), "first load");
        e.loaded(true);
        // The remote pod becomes app=b: an element of the peer set.
        e.pod_event(Event::Apply(pod(
            "x",
            "r",
            &[("app", "b")],
            Some("10.0.0.9"),
        )));
        let Some(Load::Batch(d)) = e.take_load() else {
            panic!("not a delta")
        };
        assert!(d.elements_only());
        let s = d.script();
        assert!(
            s.starts_with("add element inet margay_policy peer/")
                && s.ends_with(".p4 { 10.0.0.9 }\n")
                && s.lines().count() == 1,
            "{s}"
        );
        e.loaded(true);
        // A second policy: chains.
        e.policy_event(Event::Apply(deny_all("x")));
        assert!(matches!(e.take_load(), Some(Load::Batch(b)) if !b.elements_only()));
        e.loaded(true);
        // Elements, then a chain change: one batch, in that order.
        e.pod_event(Event::Apply(pod("x", "r", &[], Some("10.0.0.9"))));
        e.policy_event(Event::Delete(deny_all("x")));
        let Some(Load::Batch(b)) = e.take_load() else {
            panic!("mixed changes not one batch")
        };
        let s = b.script();
        assert!(
            s.contains("delete element inet margay_policy peer/") && s.contains(".p4 { 10.0.0.9 }"),
            "{s}"
        );
        assert_eq!(e.take_load(), None);
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_has_and_a_failure_reloads_everything() {
        let mut e = Engine::new();
        list_all(
            &mut e,
            vec![pod("x", "a", &[], Some("10.0.0.1"))],
            vec![ns("x")],
            vec![deny_all("x")],
        );
        e.endpoint_added(Endpoint {
            pod: Some(Key::new("x", "a")),
            host_if: "cali1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        e.take_script();
        e.loaded(true);
        assert!(!e.compiler().table().chains.is_empty());
        // The watch broke and lists again: the policy is gone.
        e.policy_event(Event::Init);
        assert!(
            !e.compiler().table().chains.is_empty(),
            "kept until the list completes"
        );
        e.policy_event(Event::InitDone);
        let s = e.take_script().unwrap();
        assert!(
            s.contains("delete chain inet margay_policy in/x/deny"),
            "{s}"
        );
        e.loaded(false);
        let s = e.take_script().unwrap();
        assert!(
            s.starts_with("table inet margay_policy\ndelete table"),
            "{s}"
        );
    }

    #[test]
    fn an_unreadable_pod_is_quarantined_until_its_labels_are_known() {
        let mut e = Engine::new();
        list_all(&mut e, vec![], vec![ns("x"), ns("y")], vec![deny_all("y")]);
        e.take_script();
        e.loaded(true);
        // In a namespace without policies, an unreadable pod is open.
        let free = Key::new("x", "free");
        e.endpoint_added(Endpoint {
            pod: Some(free.clone()),
            host_if: "cali9".into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
        });
        e.unresolved(&free);
        let s = e.take_script().unwrap();
        assert!(!s.contains("drop"), "open: {s}");
        e.loaded(true);
        assert!(e.programmed("cali9"));
        let key = Key::new("y", "a");
        e.endpoint_added(Endpoint {
            pod: Some(key.clone()),
            host_if: "cali1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        assert!(!e.programmed("cali1"));
        e.unresolved(&key);
        let s = e.take_script().unwrap();
        assert!(dispatched(&s, "add", "if-in/drop"), "{s}");
        assert!(dispatched(&s, "add", "if-out/drop"), "{s}");
        e.loaded(true);
        assert!(e.programmed("cali1"));
        // Known, with labels the deny-all selects: its endpoint rules.
        e.pod_event(Event::Apply(pod("y", "a", &[], None)));
        let s = e.take_script().unwrap();
        assert!(dispatched(&s, "add", "if-in/"), "{s}");
        assert!(dispatched(&s, "delete", "if-in/drop"), "{s}");
        assert!(dispatched(&s, "delete", "if-out/drop"), "{s}");
        e.loaded(true);
        assert!(
            e.compiler().table().egress.is_empty(),
            "deny-all is ingress only"
        );
        // A Pod the API does not have, in a namespace with a policy:
        // quarantined (it may be a force-deleted Pod's sandbox).
        let other = Key::new("y", "nope");
        e.endpoint_added(Endpoint {
            pod: Some(other.clone()),
            host_if: "cali2".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        });
        assert!(!e.programmed("cali2"));
        e.unresolved(&other);
        let s = e.take_script().unwrap();
        assert!(dispatched_if(&s, "add", "if-in/drop", "cali2"), "{s}");
        e.loaded(true);
        assert!(e.programmed("cali2"));
        // A container that is no Pod: its sources only, answered.
        e.endpoint_added(Endpoint {
            pod: None,
            host_if: "cali3".into(),
            ips: vec!["10.0.0.3".parse().unwrap()],
        });
        let s = e.take_script().unwrap();
        assert!(!s.contains("drop"), "{s}");
        e.loaded(true);
        assert!(e.programmed("cali3"));
    }

    /// A policy that cannot be enforced as written is enforced fail
    /// closed (its pods isolated by it, nothing allowed), whatever this
    /// agent saw before, so every node agrees; and reported.
    #[test]
    fn an_unenforceable_policy_isolates_its_pods_with_nothing_allowed() {
        let mut e = Engine::new();
        let allow_all: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "deny"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{}]}
        }))
        .unwrap();
        list_all(&mut e, vec![], vec![ns("x")], vec![allow_all.clone()]);
        let k = Key::new("x", "deny");
        assert_eq!(
            e.compiler().world().policies[&k]
                .ingress
                .as_ref()
                .unwrap()
                .len(),
            1
        );
        let mut bad = allow_all.clone();
        bad.spec.as_mut().unwrap().policy_types = Some(vec!["Sideways".into()]);
        e.policy_event(Event::Apply(bad.clone()));
        let p = &e.compiler().world().policies[&k];
        assert_eq!(p.ingress, Some(vec![]), "nothing allowed in");
        assert_eq!(p.egress, Some(vec![]), "nor out");
        assert!(
            p.selector
                .matches(&[("app".to_string(), "a".to_string())].into())
        );
        assert!(!p.selector.matches(&BTreeMap::new()), "its own selector");
        assert!(
            matches!(&e.invalid()[&k].0, Unenforced::Refused(m) if m.to_string().contains("Sideways"))
        );
        // Too large: the same, with its cost.
        let mut big = allow_all.clone();
        big.spec.as_mut().unwrap().ingress = Some(vec![serde_json::from_value(serde_json::json!({
            "from": (0..3000).map(|i| serde_json::json!({"ipBlock": {"cidr": format!("192.168.{}.{}/32", i / 256, i % 256)}})).collect::<Vec<_>>(),
            "ports": (0..3000).map(|i| serde_json::json!({"port": 1000 + i})).collect::<Vec<_>>(),
        }))
        .unwrap()]);
        e.policy_event(Event::Apply(big));
        assert_eq!(e.compiler().world().policies[&k].ingress, Some(vec![]));
        assert!(
            matches!(e.invalid()[&k].0, Unenforced::TooLarge { cost, .. } if cost > margay_policy::enforce::MAX_POLICY_COST)
        );
        let st = e.status(true);
        assert_eq!(st.unenforced.len(), 1);
        assert_eq!(
            st.unenforced[0].reason,
            margay_api::status::UnenforcedReason::TooLarge
        );
        // Fixed: enforced as written again.
        e.policy_event(Event::Apply(allow_all.clone()));
        assert!(e.invalid().is_empty());
        assert_eq!(
            e.compiler().world().policies[&k]
                .ingress
                .as_ref()
                .unwrap()
                .len(),
            1
        );
        e.policy_event(Event::Delete(bad));
        assert!(e.compiler().world().policies.is_empty());
        assert!(e.invalid().is_empty());
    }

    fn ep(pod: Option<&PodKey>, host_if: &str, ip: &str) -> Endpoint {
        Endpoint {
            pod: pod.cloned(),
            host_if: host_if.into(),
            ips: vec![ip.parse().unwrap()],
        }
    }

    /// Two attachments of one pod are each enforced, and each DEL takes
    /// only its own interface out.
    #[test]
    fn each_attachment_is_an_endpoint_and_each_del_its_own() {
        let mut e = Engine::new();
        list_all(
            &mut e,
            vec![pod("x", "a", &[], Some("10.0.0.1"))],
            vec![ns("x")],
            vec![deny_all("x")],
        );
        e.take_script();
        e.loaded(true);
        let k = Key::new("x", "a");
        e.endpoint_added(ep(Some(&k), "cali1", "10.0.0.1"));
        e.endpoint_added(ep(Some(&k), "cali2", "10.1.0.1"));
        let t = e.compiler().table();
        assert!(t.ingress.contains_key("cali1") && t.ingress.contains_key("cali2"));
        assert!(e.take_script().is_some());
        e.loaded(true);
        assert!(e.programmed("cali1") && e.programmed("cali2"));
        // Both addresses are the pod's (peers of others see both).
        assert_eq!(e.compiler().world().pods[&k].ips.len(), 2);
        e.endpoint_deleted("cali1");
        let s = e.take_script().unwrap();
        assert!(dispatched_if(&s, "delete", "if-in/", "cali1"), "{s}");
        assert!(!s.contains("cali2"), "the other is left alone: {s}");
        assert!(
            s.contains("delete element inet margay_policy ifaces { \"cali1\" }"),
            "{s}"
        );
        let t = e.compiler().table();
        assert!(t.ingress.contains_key("cali2"));
        let ips = &e.compiler().world().pods[&k].ips;
        assert!(ips.contains(&"10.1.0.1".parse().unwrap()), "{ips:?}");
    }

    /// A Pod deleted from the API (forced) while its sandbox is wired
    /// keeps its last labels, so its rules, until the DEL.
    #[test]
    fn a_force_deleted_pod_keeps_its_rules_until_its_del() {
        let mut e = Engine::new();
        let a = pod("x", "a", &[("app", "a")], Some("10.0.0.1"));
        list_all(&mut e, vec![a.clone()], vec![ns("x")], vec![deny_all("x")]);
        let k = Key::new("x", "a");
        e.endpoint_added(ep(Some(&k), "cali1", "10.0.0.1"));
        e.take_script();
        e.loaded(true);
        assert!(e.compiler().table().ingress.contains_key("cali1"));
        e.pod_event(Event::Delete(a.clone()));
        assert_eq!(e.take_script(), None, "nothing changes");
        // A relist without it: still kept.
        e.pod_event(Event::Init);
        e.pod_event(Event::InitDone);
        assert_eq!(e.take_script(), None, "nothing changes on a relist");
        assert!(e.compiler().table().ingress.contains_key("cali1"));
        // Its DEL: gone.
        e.endpoint_deleted("cali1");
        assert!(e.take_script().is_some());
        assert!(e.compiler().world().pods.is_empty());
        assert!(e.compiler().table().ingress.is_empty());
    }

    /// After a restart: an attachment whose Pod the API no longer has is
    /// quarantined where a policy could select it; one neither its alias
    /// nor IPAM attributes is quarantined anyway.
    #[test]
    fn restored_attachments_whose_pod_is_unknown_are_closed() {
        let mut e = Engine::new();
        let gone = Key::new("x", "gone");
        let free = Key::new("y", "free");
        e.endpoint_added(ep(Some(&gone), "cali1", "10.0.0.1"));
        e.endpoint_added(ep(Some(&free), "cali2", "10.0.0.2"));
        e.endpoint_unattributed("cali3", vec!["10.0.0.3".parse().unwrap()]);
        list_all(&mut e, vec![], vec![ns("x"), ns("y")], vec![deny_all("x")]);
        let s = e.take_script().unwrap();
        let t = e.compiler().table();
        assert_eq!(
            t.ingress.get("cali1"),
            Some(&margay_policy::ruleset::Verdict::Drop),
            "{s}"
        );
        assert_eq!(t.ingress.get("cali2"), None, "nothing could select it");
        assert_eq!(
            t.ingress.get("cali3"),
            Some(&margay_policy::ruleset::Verdict::Drop)
        );
        for i in ["cali1", "cali2", "cali3"] {
            assert!(
                s.contains(&format!("\"{i}\" . 10.0.0.")),
                "{i}'s sources: {s}"
            );
        }
        e.loaded(true);
        assert!(e.programmed("cali1") && e.programmed("cali2") && e.programmed("cali3"));
    }

    /// A policy this node's kernel refused is enforced fail closed and
    /// reported until it changes (a new generation is tried again); the
    /// other policies are left as they are.
    #[test]
    fn a_policy_the_kernel_refused_is_closed_until_it_changes() {
        let mut e = Engine::new();
        let mut open: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "open", "generation": 1},
            "spec": {"podSelector": {}, "ingress": [{}]}
        }))
        .unwrap();
        list_all(
            &mut e,
            vec![pod("x", "a", &[], Some("10.0.0.1"))],
            vec![ns("x")],
            vec![open.clone(), deny_all("x")],
        );
        e.endpoint_added(ep(Some(&Key::new("x", "a")), "cali1", "10.0.0.1"));
        let k = Key::new("x", "open");
        assert_eq!(e.load_suspects().len(), 2);
        assert!(
            e.script_closing(std::slice::from_ref(&k))
                .contains("chain in/x/open")
        );
        e.kernel_refused(std::slice::from_ref(&k), "no");
        assert_eq!(e.compiler().world().policies[&k].ingress, Some(vec![]));
        assert!(matches!(e.invalid()[&k].0, Unenforced::LoadFailed(_)));
        assert!(
            matches!(e.take_load(), Some(Load::Script(_))),
            "the whole table next"
        );
        assert_eq!(e.load_suspects(), [Key::new("x", "deny")]);
        // The same generation again (a relist): still closed.
        e.policy_event(Event::Apply(open.clone()));
        assert_eq!(e.compiler().world().policies[&k].ingress, Some(vec![]));
        // A new one: tried as written.
        open.metadata.generation = Some(2);
        e.policy_event(Event::Apply(open));
        assert_eq!(
            e.compiler().world().policies[&k]
                .ingress
                .as_ref()
                .map(Vec::len),
            Some(1)
        );
        assert!(e.invalid().is_empty());
    }
}
