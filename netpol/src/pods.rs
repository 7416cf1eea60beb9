//! The Pod watches (this node's Pods; in tests every Pod) and each pod's
//! state in the compiler: its labels and addresses, its endpoints, its
//! rules made ready before its ADD, its quarantine while it cannot be
//! learned, its last labels kept while wired after it left the watch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use margay_policy::model::Key;
use margay_policy::{Pod, PodKey};

use super::{Engine, Event, Scope, Watched, pod_key, relist, watched_pod};

impl Engine {
    /// The Pod `key` as last known: from the watch (a remote one from
    /// the compiler's world, its one copy), or its last labels if it left
    /// the watch while wired here.
    pub(super) fn known(&self, key: &PodKey) -> Option<&Pod> {
        match self.pods.get(key) {
            Some(w) => Some(&w.pod),
            None if self.remote_pods.contains_key(key) => self.compiler.world().pods.get(key),
            None => self.departed.get(key).map(|w| &w.pod),
        }
    }

    /// Brings pod `key` in the compiler in line with the watch and the
    /// endpoint registry.
    pub(super) fn sync_pod(&mut self, key: &PodKey) {
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
    pub(super) fn quarantine_as_decided(&mut self, key: &PodKey) {
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

    pub(super) fn namespace_has_no_policy_listed(&self, key: &PodKey) -> bool {
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
    pub(super) fn pod_gone(&mut self, key: &PodKey, was: Option<Watched>) {
        if let Some(w) = was
            && self.by_pod.contains_key(key)
        {
            self.departed.insert(key.clone(), w);
        }
        self.sync_pod(key);
    }

    /// Pod `key` gone from whichever watch held it.
    pub(super) fn forget(&mut self, key: &PodKey) {
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
    pub(super) fn keeps(&self, scope: Scope, w: &Watched) -> bool {
        scope == Scope::Local
            || (!w.pod.ips.is_empty()
                && (self.node.is_none() || w.pod.node.as_deref() != self.node.as_deref()))
    }

    /// Whether an event about pod `key` from `scope`'s watch is to be
    /// ignored: the remote watch's, about a pod this node's watch holds
    /// (which speaks for it).
    pub(super) fn local_holds(&self, scope: Scope, key: &PodKey) -> bool {
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
    pub(super) fn relisted(&mut self, scope: Scope, new: BTreeMap<PodKey, Watched>) {
        let gone = match scope {
            Scope::Local => relist::gone(self.pods.keys(), &new),
            Scope::Remote => relist::gone(self.remote_pods.keys(), &new),
        };
        for k in gone {
            self.forget(&k);
        }
        for (k, w) in new {
            if !self.local_holds(scope, &k) {
                self.remote_or_local_set(k, w);
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
    pub(super) fn remote_or_local_set(&mut self, k: PodKey, w: Watched) {
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

    /// Once everything is listed: endpoints found wired at start-up whose
    /// Pod the API does not have are unresolved (quarantined where a
    /// policy could select them).
    pub(super) fn resolve_restored(&mut self) {
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
}
