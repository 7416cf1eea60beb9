//! Endpoint chains and dispatch: each interface of a local endpoint
//! dispatched to the chain of the policies isolating it (shared by every
//! endpoint they isolate alike), quarantined interfaces dropped, and the
//! chains of scheduled pods made before their ADD.

use std::collections::BTreeSet;

use super::{Compiler, User};
use crate::model::{Direction, PodKey, PolicyKey};
use crate::ruleset::names::{endpoint_chain, policy_chain};
use crate::ruleset::{Line, Set, SetKind, Verdict, iface_set};

impl Compiler {
    pub(super) fn quarantine_maps(&mut self, ifname: &str) {
        if let Some(k) = self.endpoints.get(ifname).cloned() {
            self.recompile_iface(&k, ifname);
            return;
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            if self.quarantined.contains(ifname) {
                self.put_map(dir, ifname, Verdict::Drop);
            } else if self.map(dir).get(ifname) == Some(&Verdict::Drop) {
                self.drop_map(dir, ifname);
            }
        }
    }

    /// The endpoint `key`'s selection may have changed: the policies of
    /// its namespace compiled or dropped as they now select local pods,
    /// and its own chains.
    pub(super) fn endpoint_changed(&mut self, key: &PodKey) {
        for k in self.update_here(key) {
            if self.selects_local(&k) != self.compiled.contains_key(&k) {
                self.recompile_policy(&k);
            }
        }
        self.recompile_endpoint(key);
        self.prepare(key);
    }

    /// Makes the endpoint chains of scheduled pod `key` (and lets go of
    /// those it no longer needs, or all of them once it is not scheduled).
    pub(super) fn prepare(&mut self, key: &PodKey) {
        let mut want = Vec::new();
        if let Some(labels) = self.scheduled.get(key).cloned()
            && !self.local.contains_key(key)
        {
            for dir in [Direction::Ingress, Direction::Egress] {
                let policies = self.isolating_labels(&key.namespace, &labels, dir);
                if !policies.is_empty() {
                    want.push(self.ep_chain(dir, policies, User::Scheduled(key.clone())));
                }
            }
        }
        let held = self.prepared.remove(key).unwrap_or_default();
        for chain in held.into_iter().filter(|c| !want.contains(c)) {
            self.release(&chain, &User::Scheduled(key.clone()));
        }
        if !want.is_empty() {
            self.prepared.insert(key.clone(), want);
        }
    }

    /// Each interface of local endpoint `key` dispatched as its policies
    /// say.
    pub(super) fn recompile_endpoint(&mut self, key: &PodKey) {
        for ifname in self.local.get(key).cloned().unwrap_or_default() {
            self.recompile_iface(key, &ifname);
        }
    }

    fn recompile_iface(&mut self, key: &PodKey, ifname: &str) {
        let ifname = ifname.to_string();
        for dir in [Direction::Ingress, Direction::Egress] {
            let policies = self.isolating(key, dir);
            let current = match self.map(dir).get(&ifname) {
                Some(Verdict::Jump(c)) => self.ep_chains.def(c),
                _ => None,
            };
            if !policies.is_empty() && current.is_some_and(|(_, p)| *p == policies) {
                continue;
            }
            self.release_ep_chain(dir, &ifname);
            if policies.is_empty() {
                if self.quarantined.contains(&ifname) {
                    // Known now, and not isolated: the quarantine is over
                    // only when the engine lifts it.
                    self.put_map(dir, &ifname, Verdict::Drop);
                } else {
                    self.drop_map(dir, &ifname);
                }
                continue;
            }
            let chain = self.ep_chain(dir, policies, User::Iface(ifname.clone()));
            self.put_map(dir, &ifname, Verdict::Jump(chain));
        }
    }

    /// The endpoint chain for `dir` jumping to `policies`, used by
    /// `user`; made if nothing used it yet.
    fn ep_chain(&mut self, dir: Direction, policies: Vec<PolicyKey>, user: User) -> String {
        let base = || endpoint_chain(dir, &policies);
        let (name, new) = self.ep_chains.acquire((dir, policies.clone()), base, user);
        if !new {
            return name;
        }
        let mut rules = vec![Line::DropInvalid, Line::ClearMark];
        rules.extend(policies.iter().map(|p| Line::Jump(policy_chain(dir, p))));
        rules.push(Line::DropUnmarked);
        rules.push(Line::ClearMark);
        self.put_chain(name.clone(), rules);
        self.put_set(
            iface_set(dir, &Verdict::Jump(name.clone())),
            Set {
                kind: SetKind::Iface,
                elements: BTreeSet::new(),
            },
        );
        self.stale_dispatch.insert(dir);
        name
    }

    /// Interface `ifname` no longer uses the endpoint chain its `dir` map
    /// entry jumps to. The entry stays.
    pub(super) fn release_ep_chain(&mut self, dir: Direction, ifname: &str) {
        if let Some(Verdict::Jump(chain)) = self.map(dir).get(ifname).cloned() {
            self.release(&chain, &User::Iface(ifname.to_string()));
        }
    }

    /// `user` no longer uses endpoint chain `chain` (dropped with its last
    /// user).
    pub(super) fn release(&mut self, chain: &str, user: &User) {
        if let Some((dir, _)) = self.ep_chains.release(chain, user) {
            self.stale_dispatch.insert(dir);
            self.drop_chain(chain);
            self.drop_set(&iface_set(dir, &Verdict::Jump(chain.to_string())));
        }
    }
}
