//! The policy engine's state, without I/O: watch events (Pods,
//! Namespaces, NetworkPolicies, each with its list/relist cycle) and this
//! node's endpoints in; nft scripts and answers to waiting ADDs out.
//!
//! - Until every one of the three kinds has been listed once, nothing is
//!   written: the table the kernel holds (from before a restart) stays.
//!   Then the whole table is loaded in one transaction, and from then on
//!   each batch of changes is one delta ([`margay_policy::nft::Delta`]).
//! - A relist (after a watch broke) is compared with what was known when
//!   it completes: objects it no longer has are deleted then, not before.
//! - A local endpoint joins the policy world only once its Pod's labels are
//!   known (an unlabelled pod would escape selectors); its addresses are
//!   the ADD's until the Pod's status has them.
//! - An ADD waiting for its rules is answered once everything is listed,
//!   its Pod is known, and the script with its endpoint is in the kernel.
//! - A failed load is retried as a full load.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use margay_policy::model::{Key, Namespace};
use margay_policy::nft::{Batch, Compiler, Delta};
use margay_policy::{Pod, PodKey, Policy, PolicyKey};

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

/// A pod of this node as its ADD wired it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its Pod.
    pub key: PodKey,
    /// Its host interface.
    pub host_if: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// What the watch says of a Pod: labels and named ports, and addresses
/// (maybe none yet).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    pod: Pod,
}

fn watched_pod(p: &core::Pod) -> Option<(PodKey, Watched)> {
    Pod::from_k8s_unaddressed(p).map(|(key, pod)| (key, Watched { pod }))
}

/// Which kinds have been listed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Listed {
    pods: bool,
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
    pods: BTreeMap<PodKey, Watched>,
    relist_pods: Option<BTreeMap<PodKey, Watched>>,
    relist_namespaces: Option<BTreeMap<String, Namespace>>,
    relist_policies: Option<BTreeMap<PolicyKey, Policy>>,
    /// This node's endpoints, by Pod.
    endpoints: BTreeMap<PodKey, Endpoint>,
    /// Endpoints answered without rules: the API says their Pod does not
    /// exist (a runtime's pod that is no Kubernetes Pod), or it cannot be
    /// read but their namespace has no policy that could select them.
    no_pod: BTreeSet<PodKey>,
    /// Policies the API holds that cannot be enforced, and why (their
    /// last good version, if any, stays in force).
    invalid: BTreeMap<PolicyKey, String>,
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

    /// Whether every kind has been listed.
    pub fn listed(&self) -> bool {
        self.listed.pods && self.listed.namespaces && self.listed.policies
    }

    /// What is not listed yet, for status and errors.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.listed.pods {
            v.push("Pods");
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

    /// Policies that cannot be enforced, and why.
    pub fn invalid(&self) -> &BTreeMap<PolicyKey, String> {
        &self.invalid
    }

    fn push(&mut self, d: Delta) {
        if !self.full && !d.is_empty() {
            self.pending.push(d);
        }
    }

    /// Brings pod `key` in the compiler in line with the watch and the
    /// endpoint registry.
    fn sync_pod(&mut self, key: &PodKey) {
        let w = self.pods.get(key);
        let ep = self.endpoints.get(key);
        let pod = w.map(|w| {
            let mut p = w.pod.clone();
            if let Some(ep) = ep {
                for ip in &ep.ips {
                    if !p.ips.contains(ip) {
                        p.ips.push(*ip);
                    }
                }
            }
            p
        });
        // A Pod of this node not wired yet: its rules made ready.
        let scheduled = match (w, ep, &self.node) {
            (Some(w), None, Some(n)) if w.pod.node.as_ref() == Some(n) => {
                Some(w.pod.labels.clone())
            }
            _ => None,
        };
        let pod = pod.filter(|p| !p.ips.is_empty());
        let want_ep = match (&pod, ep) {
            (Some(_), Some(ep)) => Some(ep.host_if.clone()),
            _ => None,
        };
        if self.compiler.world().pods.get(key) != pod.as_ref() {
            let d = self.compiler.set_pod(key, pod);
            self.push(d);
        }
        if self.compiler.local().get(key) != want_ep.as_ref() {
            let d = self.compiler.set_endpoint(key, want_ep);
            self.push(d);
        }
        // After its endpoint: the chains it held pass to its interface.
        if self.compiler.scheduled().get(key) != scheduled.as_ref() {
            let d = self.compiler.set_scheduled(key, scheduled);
            self.push(d);
        }
        if self.pods.contains_key(key) {
            self.no_pod.remove(key);
            // Its labels are known: the quarantine is over.
            if let Some(ep) = self.endpoints.get(key)
                && self.compiler.is_quarantined(&ep.host_if)
            {
                let d = self.compiler.set_quarantine(&ep.host_if.clone(), false);
                self.push(d);
            }
        }
    }

    /// Whether the watch (or a read) has shown Pod `key`.
    pub fn knows_pod(&self, key: &PodKey) -> bool {
        self.pods.contains_key(key)
    }

    /// Whether everything is listed and no policy of `key`'s namespace
    /// exists: an endpoint whose Pod the watch has not shown yet needs no
    /// rules now (no API read on the ADD's path); its labels, once the
    /// watch shows them, count like any change.
    pub fn namespace_has_no_policy(&self, key: &PodKey) -> bool {
        self.listed()
            && !self
                .compiler
                .world()
                .policies
                .keys()
                .any(|k| k.namespace == key.namespace)
    }

    /// The ADD read the Pod itself (the watch has not shown it yet).
    pub fn pod_read(&mut self, p: core::Pod) {
        self.pod_event(Event::Apply(p));
    }

    /// The API says endpoint `key`'s Pod does not exist.
    pub fn not_a_pod(&mut self, key: &PodKey) {
        if self.endpoints.contains_key(key) && !self.pods.contains_key(key) {
            self.no_pod.insert(key.clone());
        }
    }

    /// Endpoint `key`'s Pod cannot be read: if a policy of its namespace
    /// might select it, its interface drops every new connection until its
    /// labels are known; if none could, it is open like any pod no policy
    /// selects (so pods start as before while the API is away).
    pub fn quarantine(&mut self, key: &PodKey) {
        if self.pods.contains_key(key) {
            return;
        }
        let selectable = self
            .compiler
            .world()
            .policies
            .keys()
            .any(|k| k.namespace == key.namespace);
        if !selectable {
            self.not_a_pod(key);
            return;
        }
        if let Some(ep) = self.endpoints.get(key) {
            let d = self.compiler.set_quarantine(&ep.host_if.clone(), true);
            self.push(d);
        }
    }

    /// A Pod watch event.
    pub fn pod_event(&mut self, ev: Event<core::Pod>) {
        match ev {
            Event::Init => self.relist_pods = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let (Some(r), Some((k, w))) = (self.relist_pods.as_mut(), watched_pod(&p)) {
                    r.insert(k, w);
                }
            }
            Event::InitDone => {
                let new = self.relist_pods.take().unwrap_or_default();
                let keys: BTreeSet<PodKey> = self.pods.keys().chain(new.keys()).cloned().collect();
                self.pods = new;
                for k in keys {
                    self.sync_pod(&k);
                }
                self.listed.pods = true;
            }
            Event::Apply(p) => {
                let key = p
                    .metadata
                    .namespace
                    .as_deref()
                    .zip(p.metadata.name.as_deref())
                    .map(|(ns, n)| Key::new(ns, n));
                match (watched_pod(&p), key) {
                    (Some((k, w)), _) => {
                        self.pods.insert(k.clone(), w);
                        self.sync_pod(&k);
                    }
                    // Host network, or finished: no part in policy.
                    (None, Some(k)) => {
                        self.pods.remove(&k);
                        self.sync_pod(&k);
                    }
                    (None, None) => {}
                }
            }
            Event::Delete(p) => {
                if let (Some(ns), Some(n)) = (&p.metadata.namespace, &p.metadata.name) {
                    let k = Key::new(ns, n);
                    self.pods.remove(&k);
                    self.sync_pod(&k);
                }
            }
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
        if self.compiler.world().policies.get(key) != p.as_ref() {
            let d = self.compiler.set_policy(key, p);
            self.push(d);
        }
    }

    /// Converts; an invalid policy is recorded, and its last good version
    /// (if any) stays.
    fn convert(&mut self, p: &net::NetworkPolicy) -> Option<(PolicyKey, Policy)> {
        let key = Key::new(
            p.metadata.namespace.as_deref()?,
            p.metadata.name.as_deref()?,
        );
        match Policy::from_k8s(p) {
            Ok(kp) => {
                self.invalid.remove(&key);
                Some(kp)
            }
            Err(e) => {
                tracing::warn!(policy = %key, "NetworkPolicy not enforced: {e}");
                self.invalid.insert(key, e.to_string());
                None
            }
        }
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
                } else if let (Some(r), Some(ns), Some(n)) = (
                    self.relist_policies.as_mut(),
                    &p.metadata.namespace,
                    &p.metadata.name,
                ) {
                    // Invalid: keep what was enforced for it.
                    let k = Key::new(ns, n);
                    if let Some(old) = self.compiler.world().policies.get(&k) {
                        r.insert(k, old.clone());
                    }
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
                    self.invalid.remove(&k);
                    self.set_policy(&k, None);
                }
                for (k, v) in new {
                    self.set_policy(&k, Some(v));
                }
                self.listed.policies = true;
            }
            Event::Apply(p) => {
                if let Some((k, v)) = self.convert(&p) {
                    self.set_policy(&k, Some(v));
                }
            }
            Event::Delete(p) => {
                if let (Some(ns), Some(n)) = (&p.metadata.namespace, &p.metadata.name) {
                    let k = Key::new(ns, n);
                    self.invalid.remove(&k);
                    self.set_policy(&k, None);
                }
            }
        }
    }

    /// An ADD wired `ep` (or start-up found it wired).
    pub fn endpoint_added(&mut self, ep: Endpoint) {
        let key = ep.key.clone();
        // One interface per pod: a retried ADD replaces the old one.
        self.endpoints.insert(key.clone(), ep);
        self.sync_pod(&key);
    }

    /// The pod on `host_if` was deleted.
    pub fn endpoint_deleted(&mut self, host_if: &str) {
        let keys: Vec<PodKey> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.host_if == host_if)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.endpoints.remove(&k);
            self.no_pod.remove(&k);
            self.sync_pod(&k);
        }
        if self.compiler.is_quarantined(host_if) {
            let d = self.compiler.set_quarantine(host_if, false);
            self.push(d);
        }
    }

    /// Whether the endpoint on `host_if` for `key` is in the rules as
    /// loaded (everything listed, its Pod known, nothing pending).
    pub fn programmed(&self, key: &PodKey, host_if: &str) -> bool {
        self.listed()
            && self.loaded
            && !self.full
            && self.pending.is_empty()
            && (self.compiler.local().get(key).map(String::as_str) == Some(host_if)
                || self.compiler.is_quarantined(host_if)
                || self.no_pod.contains(key))
    }

    /// Why the endpoint is not programmed yet.
    pub fn why_not(&self, key: &PodKey) -> String {
        if !self.listed() {
            return format!("not listed yet: {}", self.waiting_for().join(", "));
        }
        if !self.pods.contains_key(key) {
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
        script.lines().any(|l| {
            l.starts_with(&format!("{verb} element inet margay_policy {set}"))
                && l.ends_with("{ \"cali1\" }")
        })
    }

    fn add_cali1(e: &mut Engine) -> PodKey {
        let key = Key::new("x", "a");
        e.endpoint_added(Endpoint {
            key: key.clone(),
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
        assert!(!e.programmed(&key, "cali1"));
        assert!(e.why_not(&key).contains("not seen"), "{}", e.why_not(&key));
        // The Pod, without an address yet (the kubelet writes it later).
        e.pod_event(Event::Apply(pod("x", "a", &[("app", "a")], None)));
        assert!(!e.programmed(&key, "cali1"));
        let s = e.take_script().unwrap();
        assert!(dispatched(&s, "add", "if-in/"), "{s}");
        e.loaded(true);
        assert!(e.programmed(&key, "cali1"));
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
        let key = add_cali1(&mut e);
        let Some(Load::Batch(d)) = e.take_load() else {
            panic!("the ADD is a delta");
        };
        assert!(d.elements_only(), "the ADD is elements only: {d:?}");
        assert!(dispatched(&d.script(), "add", "if-in/"), "{}", d.script());
        e.loaded(true);
        assert!(e.programmed(&key, "cali1"));
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
            key: ky.clone(),
            host_if: "cali2".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        });
        e.not_a_pod(&ky);
        assert!(e.programmed(&ky, "cali2"));
        // The Pod shows up later with labels: handled like any change.
        e.pod_event(Event::Apply(pod(
            "y",
            "a",
            &[("app", "a")],
            Some("10.0.0.2"),
        )));
        assert!(e.knows_pod(&ky));
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
            key: Key::new("x", "a"),
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
            key: Key::new("x", "a"),
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
            key: free.clone(),
            host_if: "cali9".into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
        });
        e.quarantine(&free);
        assert_eq!(e.take_script(), None);
        assert!(e.programmed(&free, "cali9"));
        let key = Key::new("y", "a");
        e.endpoint_added(Endpoint {
            key: key.clone(),
            host_if: "cali1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        assert!(!e.programmed(&key, "cali1"));
        e.quarantine(&key);
        let s = e.take_script().unwrap();
        assert!(dispatched(&s, "add", "if-in/drop"), "{s}");
        assert!(dispatched(&s, "add", "if-out/drop"), "{s}");
        e.loaded(true);
        assert!(e.programmed(&key, "cali1"));
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
        // A runtime's pod the API does not have: no rules, answered.
        let other = Key::new("y", "nope");
        e.endpoint_added(Endpoint {
            key: other.clone(),
            host_if: "cali2".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        });
        assert!(!e.programmed(&other, "cali2"));
        e.not_a_pod(&other);
        assert_eq!(e.take_script(), None);
        assert!(e.programmed(&other, "cali2"));
    }

    #[test]
    fn an_invalid_policy_keeps_its_last_good_version() {
        let mut e = Engine::new();
        list_all(&mut e, vec![], vec![ns("x")], vec![deny_all("x")]);
        let mut bad = deny_all("x");
        bad.spec.as_mut().unwrap().policy_types = Some(vec!["Sideways".into()]);
        e.policy_event(Event::Apply(bad.clone()));
        assert!(
            e.compiler()
                .world()
                .policies
                .contains_key(&Key::new("x", "deny"))
        );
        assert!(e.invalid()[&Key::new("x", "deny")].contains("Sideways"));
        e.policy_event(Event::Delete(bad));
        assert!(e.compiler().world().policies.is_empty());
        assert!(e.invalid().is_empty());
    }
}
