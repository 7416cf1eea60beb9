//! Namespaces and NetworkPolicies: their watches into the compiler's
//! world; a policy not enforceable as written, or refused by this
//! node's kernel, enforced fail closed and reported.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use margay_policy::model::{Key, Namespace};
use margay_policy::{PodKey, Policy, PolicyKey};

use super::relist::{Relist, Whole};
use super::{Engine, Event, Unenforced};

/// Whether a rule of `p` names pods (by pod or namespace selector).
fn has_pod_peers(p: &Policy) -> bool {
    p.ingress
        .iter()
        .chain(p.egress.iter())
        .flatten()
        .flat_map(|r| &r.peers)
        .any(|peer| matches!(peer, margay_policy::model::Peer::Pods { .. }))
}

impl Engine {
    pub(super) fn set_namespace(&mut self, name: &str, ns: Option<Namespace>) {
        if self.compiler.world().namespaces.get(name) != ns.as_ref() {
            let d = self.compiler.set_namespace(name, ns);
            self.push(d);
        }
    }

    /// A Namespace watch event.
    pub fn namespace_event(&mut self, ev: Event<core::Namespace>) {
        self.whole_event::<Namespaces>(ev);
    }

    pub(super) fn set_policy(&mut self, key: &PolicyKey, p: Option<Policy>) {
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
    pub(super) fn convert(&mut self, p: &net::NetworkPolicy) -> Option<(PolicyKey, Policy)> {
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

    pub(super) fn forget_policy(&mut self, k: &PolicyKey) {
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
        self.whole_event::<Policies>(ev);
    }
}

/// Namespaces, whole in the compiler's world.
#[derive(Debug)]
struct Namespaces;

impl Whole for Namespaces {
    type Object = core::Namespace;
    type Key = String;
    type Value = Namespace;

    fn relist(e: &mut Engine) -> &mut Relist<String, Namespace> {
        &mut e.relist_namespaces
    }

    fn world(e: &Engine) -> &BTreeMap<String, Namespace> {
        &e.compiler.world().namespaces
    }

    fn convert(_: &mut Engine, n: &core::Namespace) -> Option<(String, Namespace)> {
        Namespace::from_k8s(n)
    }

    fn key(n: &core::Namespace) -> Option<String> {
        n.metadata.name.clone()
    }

    fn set(e: &mut Engine, k: &String, v: Option<Namespace>) {
        e.set_namespace(k, v);
    }

    fn listed(e: &mut Engine) {
        e.listed.namespaces = true;
    }
}

/// NetworkPolicies, whole in the compiler's world (as enforced: fail
/// closed where they cannot be as written).
#[derive(Debug)]
struct Policies;

impl Whole for Policies {
    type Object = net::NetworkPolicy;
    type Key = PolicyKey;
    type Value = Policy;

    fn relist(e: &mut Engine) -> &mut Relist<PolicyKey, Policy> {
        &mut e.relist_policies
    }

    fn world(e: &Engine) -> &BTreeMap<PolicyKey, Policy> {
        &e.compiler.world().policies
    }

    fn convert(e: &mut Engine, p: &net::NetworkPolicy) -> Option<(PolicyKey, Policy)> {
        e.convert(p)
    }

    fn key(p: &net::NetworkPolicy) -> Option<PolicyKey> {
        let m = &p.metadata;
        Some(Key::new(m.namespace.as_deref()?, m.name.as_deref()?))
    }

    fn set(e: &mut Engine, k: &PolicyKey, v: Option<Policy>) {
        if v.is_none() {
            e.forget_policy(k);
        }
        e.set_policy(k, v);
    }

    fn listed(e: &mut Engine) {
        e.listed.policies = true;
    }
}
