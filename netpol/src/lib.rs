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
//!
//! One job per file: this one the engine's state and what goes out
//! (loads, answers to waiting ADDs, status); `pods.rs` the Pod watches
//! (this node's and, in tests, every Pod's) and each pod's state in the
//! compiler; `slices.rs` the other nodes' pods from their endpoint
//! slices; `objects.rs` Namespaces and NetworkPolicies (fail closed,
//! refused by the kernel); `endpoints.rs` this node's attachments;
//! `intern.rs` what the remote pods share; `relist.rs` a (re)list's
//! diff with what was known, written once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
pub use margay_policy::enforce::Unenforced;
use margay_policy::model::{Key, Namespace};
use margay_policy::ruleset::{Batch, Compiler, Delta};
use margay_policy::{Pod, PodKey, Policy, PolicyKey};

mod endpoints;
mod intern;
mod objects;
mod pods;
mod relist;
mod slices;
#[cfg(test)]
mod tests;

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
pub struct Watched {
    pod: Pod,
    scope: Scope,
    /// The endpoint slice that holds it (remote pods; shared name).
    slice: Option<std::sync::Arc<str>>,
}

/// Pod `p`'s key, when it has a namespace and a name.
pub fn pod_key(p: &core::Pod) -> Option<PodKey> {
    p.metadata
        .namespace
        .as_deref()
        .zip(p.metadata.name.as_deref())
        .map(|(ns, n)| Key::new(ns, n))
}

pub fn watched_pod(p: &core::Pod, scope: Scope) -> Option<(PodKey, Watched)> {
    Pod::from_k8s_unaddressed(p).map(|(key, pod)| {
        let slice = None;
        (key, Watched { pod, scope, slice })
    })
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
    relist_namespaces: relist::Relist<String, Namespace>,
    /// What the remote pods share: label sets, namespace and node
    /// names, lists of named ports, one copy of each.
    interned: intern::Interned,
    relist_policies: relist::Relist<PolicyKey, Policy>,
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
