//! The shared pod sets: made and filled when a policy first uses one,
//! dropped with its last user, and their elements kept current as pods
//! and namespaces change (the index finds the sets a pod may be in; only
//! the addresses a change touched are worked out again).

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::Compiler;
use crate::Proto;
use crate::model::{Pod, PodKey, PolicyKey};
use crate::ruleset::registry::{IndexKey, NsPart, PodPart, SetDef};
use crate::ruleset::{Element, Set};
use crate::selector::Labels;

impl Compiler {
    /// Pod `key`'s addresses in the pod sets again (whether it is local
    /// changes the named-port sets of ingress rules).
    pub(super) fn refresh_pod_addresses(&mut self, key: &PodKey) {
        let ips: BTreeSet<IpAddr> = self
            .world
            .pods
            .get(key)
            .map(|p| p.ips.iter().copied().collect())
            .unwrap_or_default();
        self.refresh_addresses(&ips, BTreeSet::new());
    }

    /// The shared set `def` for policy `key`: made and filled if no
    /// policy uses it yet.
    pub(super) fn use_set(&mut self, def: SetDef, key: &PolicyKey) -> String {
        let (name, new) = self.shared.acquire(def.clone(), || def.name(), key.clone());
        if !new {
            return name;
        }
        let mut elements = BTreeSet::new();
        for (pk, pod) in &self.world.pods {
            elements.extend(self.pod_elements(&def, pk, pod));
        }
        self.put_set(
            name.clone(),
            Set {
                kind: def.kind(),
                elements,
            },
        );
        self.index
            .entry(def.index_key())
            .or_default()
            .insert(name.clone());
        name
    }

    /// Policy `key` no longer uses shared set `name` (dropped with its
    /// last user).
    pub(super) fn release_set(&mut self, name: &str, key: &PolicyKey) {
        let Some(def) = self.shared.release(name, key) else {
            return;
        };
        let k = def.index_key();
        if let Some(e) = self.index.get_mut(&k) {
            e.remove(name);
            if e.is_empty() {
                self.index.remove(&k);
            }
        }
        self.drop_set(name);
    }

    /// The elements pod `pk` contributes to the shared set `def` (the
    /// same decision as [`crate::spec::peer_matches`] for a pod peer).
    fn pod_elements(&self, def: &SetDef, pk: &PodKey, pod: &Pod) -> Vec<Element> {
        let (v6, elements): (bool, Vec<Element>) = match def {
            SetDef::Peer {
                ns,
                namespaces,
                pods,
                v6,
            } => {
                let ns_ok = match (ns, namespaces) {
                    (Some(ns), _) => *pk.namespace == **ns,
                    (None, Some(sel)) => {
                        let empty = Labels::new();
                        sel.matches(self.world.namespace_labels(&pk.namespace).unwrap_or(&empty))
                    }
                    (None, None) => true,
                };
                if !(ns_ok && pods.matches(&pod.labels)) {
                    return Vec::new();
                }
                (*v6, pod.ips.iter().map(|ip| Element::Addr(*ip)).collect())
            }
            SetDef::Named {
                local,
                proto,
                name,
                v6,
            } => {
                if *local && !self.local.contains_key(pk) {
                    return Vec::new();
                }
                let Some(port) = pod.named_port(name, *proto) else {
                    return Vec::new();
                };
                let e = pod
                    .ips
                    .iter()
                    .map(|ip| Element::Port {
                        addr: *ip,
                        proto: *proto,
                        port,
                    })
                    .collect();
                (*v6, e)
            }
        };
        elements
            .into_iter()
            .filter(|e| e.addr().is_some_and(|a| a.is_ipv6() == v6))
            .collect()
    }

    /// Adds to `out` the pod sets that may hold pod `pod` of namespace
    /// `ns` (labelled `ns_labels`): those its labels, namespace and port
    /// names find in the index. Every set that holds it is among them.
    pub(super) fn candidates(
        &self,
        ns: &str,
        ns_labels: Option<&Labels>,
        pod: &Pod,
        out: &mut BTreeSet<String>,
    ) {
        let label = |(k, v): (&String, &String)| (k.clone(), v.clone());
        let nss: Vec<NsPart> = [NsPart::Name(ns.to_string()), NsPart::Any]
            .into_iter()
            .chain(
                ns_labels
                    .into_iter()
                    .flatten()
                    .map(&label)
                    .map(|(k, v)| NsPart::Label(k, v)),
            )
            .collect();
        let pods: Vec<PodPart> = [PodPart::Any]
            .into_iter()
            .chain(
                pod.labels
                    .iter()
                    .map(label)
                    .map(|(k, v)| PodPart::Label(k, v)),
            )
            .collect();
        for n in &nss {
            for p in &pods {
                if let Some(e) = self.index.get(&IndexKey::Peer(n.clone(), p.clone())) {
                    out.extend(e.iter().cloned());
                }
            }
        }
        for port in pod.ports.iter() {
            if let Some(e) = self.index.get(&IndexKey::Port(port.name.clone())) {
                out.extend(e.iter().cloned());
            }
        }
    }

    /// Recomputes the elements of `ips` from the pods that hold them now,
    /// in the pod sets that may hold those pods and in `before` (the sets
    /// that may have held them before the change).
    pub(super) fn refresh_addresses(
        &mut self,
        ips: &BTreeSet<IpAddr>,
        mut before: BTreeSet<String>,
    ) {
        if ips.is_empty() {
            return;
        }
        let holders: BTreeSet<PodKey> = ips
            .iter()
            .flat_map(|ip| self.by_ip.get(ip).into_iter().flatten().cloned())
            .collect();
        for pk in &holders {
            if let Some(pod) = self.world.pods.get(pk) {
                let ns = self.world.namespace_labels(&pk.namespace);
                self.candidates(&pk.namespace, ns, pod, &mut before);
            }
        }
        let mut updates: Vec<(String, BTreeSet<Element>)> = Vec::new();
        for name in &before {
            let Some(def) = self.shared.def(name) else {
                continue;
            };
            let mut elems = BTreeSet::new();
            for pk in &holders {
                if let Some(pod) = self.world.pods.get(pk) {
                    elems.extend(
                        self.pod_elements(def, pk, pod)
                            .into_iter()
                            .filter(|e| e.addr().is_some_and(|a| ips.contains(&a))),
                    );
                }
            }
            updates.push((name.clone(), elems));
        }
        for (name, elems) in updates {
            let Some(set) = self.table.sets.get(&name) else {
                continue;
            };
            let now: BTreeSet<Element> = ips
                .iter()
                .flat_map(|ip| elements_about(&set.elements, *ip))
                .collect();
            if now == elems {
                continue;
            }
            let gone: BTreeSet<Element> = now.difference(&elems).cloned().collect();
            let new: BTreeSet<Element> = elems.difference(&now).cloned().collect();
            self.change_elements(&name, &gone, new);
        }
    }
}

/// The elements of `set` about `ip`: the address itself, or the
/// `address . proto . port` ones, which sort together.
fn elements_about(set: &BTreeSet<Element>, ip: IpAddr) -> Vec<Element> {
    let mut v: Vec<Element> = set.get(&Element::Addr(ip)).cloned().into_iter().collect();
    let first = Element::Port {
        addr: ip,
        proto: Proto::Tcp,
        port: 0,
    };
    v.extend(
        set.range(first..)
            .take_while(|e| matches!(e, Element::Port { addr, .. } if *addr == ip))
            .cloned(),
    );
    v
}
