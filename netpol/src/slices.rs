//! The other nodes' pods, from their endpoint slices
//! (MargayEndpointSlice): kept once, in the compiler's world, each with
//! the slice that holds it.

use std::collections::{BTreeMap, BTreeSet};

use margay_api::slice::MargayEndpointSlice;
use margay_policy::model::{Key, NamedPort};
use margay_policy::{Pod, PodKey};

use super::{Engine, Event, Scope, Watched};

impl Engine {
    /// The remote pods slice `s` holds that are kept (with an address, of
    /// another node).
    pub(super) fn slice_pods(
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
    pub(super) fn slice_dropped(&mut self, slice: &str, k: &PodKey) {
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
}
