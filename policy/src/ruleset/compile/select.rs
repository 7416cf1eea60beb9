//! Which policies select each pod here (a local endpoint, or a pod
//! scheduled to this node), kept as pods and policies change and worked
//! out again for a pod only when its labels here change; which of them
//! isolate it in each direction.

use std::collections::BTreeSet;

use super::{Compiler, in_namespace, keys_in};
use crate::model::{Direction, PodKey, Policy, PolicyKey};
use crate::selector::Labels;

impl Compiler {
    /// The policies of namespace `ns`.
    fn policies_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = (&'a PolicyKey, &'a Policy)> {
        in_namespace(&self.world.policies, ns)
    }

    /// Whether policy `p` selects pod `key` as a pod here: a local
    /// endpoint with its Pod's labels, or a scheduled pod.
    fn selects_here(&self, p: &Policy, key: &PodKey) -> bool {
        self.here_labels(key)
            .into_iter()
            .any(|l| p.selector.matches(l))
    }

    /// The labels pod `key` is selected by here: its Pod's as a local
    /// endpoint, those it was scheduled with (once each; none if it is
    /// neither).
    fn here_labels(&self, key: &PodKey) -> Vec<&Labels> {
        let mut v = Vec::new();
        if self.local.contains_key(key)
            && let Some(p) = self.world.pods.get(key)
        {
            v.push(&*p.labels);
        }
        if let Some(l) = self.scheduled.get(key)
            && !v.contains(&l)
        {
            v.push(l);
        }
        v
    }

    /// Brings `selecting` and `here` in line for pod `key`; returns the
    /// policies whose count went from or to zero. Nothing to do when its
    /// labels here are those its selection was worked out from.
    pub(super) fn update_here(&mut self, key: &PodKey) -> Vec<PolicyKey> {
        let here = self.here_labels(key);
        let same = match self.selected_as.get(key) {
            Some(l) => l.iter().eq(here.iter().copied()),
            None => here.is_empty(),
        };
        if same {
            return Vec::new();
        }
        let new: BTreeSet<PolicyKey> = self
            .policies_in(&key.namespace)
            .filter(|(_, p)| here.iter().any(|l| p.selector.matches(l)))
            .map(|(k, _)| k.clone())
            .collect();
        let labels: Vec<Labels> = here.into_iter().cloned().collect();
        if labels.is_empty() {
            self.selected_as.remove(key);
        } else {
            self.selected_as.insert(key.clone(), labels);
        }
        let old = self.selecting.remove(key).unwrap_or_default();
        let mut changed = Vec::new();
        for k in old.difference(&new) {
            if let Some(n) = self.here.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.here.remove(k);
                    changed.push(k.clone());
                }
            }
        }
        for k in new.difference(&old) {
            let n = self.here.entry(k.clone()).or_default();
            *n += 1;
            if *n == 1 {
                changed.push(k.clone());
            }
        }
        if !new.is_empty() {
            self.selecting.insert(key.clone(), new);
        }
        changed
    }

    /// Counts again the pods here that policy `key` selects (it changed).
    pub(super) fn recount(&mut self, key: &PolicyKey) {
        // A pod both wired and still scheduled counts once.
        let pods: BTreeSet<PodKey> = keys_in(&self.local, &key.namespace)
            .into_iter()
            .chain(keys_in(&self.scheduled, &key.namespace))
            .collect();
        let policy = self.world.policies.get(key).cloned();
        let mut n = 0;
        for pk in pods {
            let on = policy.as_ref().is_some_and(|p| self.selects_here(p, &pk));
            let set = self.selecting.entry(pk.clone()).or_default();
            if on {
                set.insert(key.clone());
                n += 1;
            } else {
                set.remove(key);
            }
            if set.is_empty() {
                self.selecting.remove(&pk);
            }
        }
        if n > 0 {
            self.here.insert(key.clone(), n);
        } else {
            self.here.remove(key);
        }
    }

    /// Whether policy `key` selects a local endpoint or a pod scheduled
    /// here.
    pub(super) fn selects_local(&self, key: &PolicyKey) -> bool {
        self.here.contains_key(key) && self.world.policies.contains_key(key)
    }

    /// The policies isolating local endpoint `key` in `dir`: of those
    /// selecting it here (kept up to date), the ones matching its Pod's
    /// labels with rules for `dir`.
    pub(super) fn isolating(&self, key: &PodKey, dir: Direction) -> Vec<PolicyKey> {
        let (Some(pod), Some(selecting)) = (self.world.pods.get(key), self.selecting.get(key))
        else {
            return Vec::new();
        };
        selecting
            .iter()
            .filter(|k| {
                self.world
                    .policies
                    .get(*k)
                    .is_some_and(|p| p.rules(dir).is_some() && p.selector.matches(&pod.labels))
            })
            .cloned()
            .collect()
    }

    /// The policies of namespace `ns` isolating a pod labelled `labels` in
    /// `dir`.
    pub(super) fn isolating_labels(
        &self,
        ns: &str,
        labels: &Labels,
        dir: Direction,
    ) -> Vec<PolicyKey> {
        self.policies_in(ns)
            .filter(|(_, p)| p.rules(dir).is_some() && p.selector.matches(labels))
            .map(|(k, _)| k.clone())
            .collect()
    }
}
