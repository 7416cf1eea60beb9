//! This node's endpoint slices (`MargayEndpointSlice`, see
//! [`margay_api::slice`]): what the other nodes' NetworkPolicy knows of
//! this node's pods, written by this agent from the Pod watch it keeps
//! anyway, instead of every agent watching every Pod.
//!
//! - [`LocalPods`] (pure): this node's pods with an address, as slice
//!   endpoints, kept from the local Pod watch's events (a relist replaces
//!   the view only once complete); nothing is published before the first
//!   list completes, so a starting agent never writes its slices empty.
//! - [`Book`] (pure): which slice holds each pod (a pod stays in its slice
//!   while it lives; a new one takes the first slice with room), what each
//!   slice should hold, and what was last written: the writes to make.
//! - [`run`]: the writer task: lists this node's slices once (so a
//!   restarted agent keeps its pods where they are), then writes what
//!   changed at most once per [`SLICE_EVERY`], retrying what failed. A
//!   write that fails changes nothing it knows: it is tried again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use margay_api::slice::{
    MargayEndpointSlice, MargayEndpointSliceSpec, SLICE_EVERY, SLICE_MAX, SLICE_NODE_LABEL,
    SliceEndpoint, SlicePort, node_label, slice_name,
};
use margay_policy::model::Proto;
use margay_policy::{Pod, PodKey};
use tokio::sync::watch;

use super::engine::Event;

/// What this node publishes: its pods with an address, by key (`None`
/// until its Pods were first listed).
pub type Published = Option<Arc<BTreeMap<PodKey, SliceEndpoint>>>;

/// Pod `p` as a slice endpoint, if it has a part in policy and an address.
pub fn endpoint(p: &core::Pod) -> Option<(PodKey, SliceEndpoint)> {
    let (key, pod) = Pod::from_k8s(p)?;
    Some((key.clone(), as_endpoint(&key, &pod)))
}

fn as_endpoint(key: &PodKey, pod: &Pod) -> SliceEndpoint {
    let mut addresses: Vec<String> = pod.ips.iter().map(|a| a.to_string()).collect();
    addresses.sort();
    let mut ports: Vec<SlicePort> = pod
        .ports
        .iter()
        .map(|p| SlicePort {
            name: p.name.clone(),
            protocol: match p.proto {
                Proto::Tcp => "TCP",
                Proto::Udp => "UDP",
                Proto::Sctp => "SCTP",
            }
            .to_string(),
            port: p.port,
        })
        .collect();
    ports.sort();
    SliceEndpoint {
        namespace: key.namespace.to_string(),
        name: key.name.to_string(),
        labels: (*pod.labels).clone(),
        addresses,
        ports,
    }
}

/// This node's pods with an address, from its Pod watch.
#[derive(Debug, Default)]
pub struct LocalPods {
    pods: BTreeMap<PodKey, SliceEndpoint>,
    relist: Option<BTreeMap<PodKey, SliceEndpoint>>,
    listed: bool,
    changed: bool,
}

impl LocalPods {
    /// Takes in a local Pod watch event.
    pub fn event(&mut self, ev: &Event<core::Pod>) {
        match ev {
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let (Some(r), Some((k, e))) = (self.relist.as_mut(), endpoint(p)) {
                    r.insert(k, e);
                }
            }
            Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                self.changed |= !self.listed || new != self.pods;
                self.pods = new;
                self.listed = true;
            }
            Event::Apply(p) => match (endpoint(p), super::engine::pod_key(p)) {
                (Some((k, e)), _) => {
                    if self.pods.get(&k) != Some(&e) {
                        self.pods.insert(k, e);
                        self.changed = true;
                    }
                }
                (None, Some(k)) => self.changed |= self.pods.remove(&k).is_some(),
                (None, None) => {}
            },
            Event::Delete(p) => {
                if let (Some(ns), Some(n)) = (&p.metadata.namespace, &p.metadata.name) {
                    let k = margay_policy::model::Key::new(ns, n);
                    self.changed |= self.pods.remove(&k).is_some();
                }
            }
        }
    }

    /// What to publish, when it changed since the last call (and the
    /// first list is complete).
    pub fn take(&mut self) -> Option<Arc<BTreeMap<PodKey, SliceEndpoint>>> {
        if !self.listed || !self.changed {
            return None;
        }
        self.changed = false;
        Some(Arc::new(self.pods.clone()))
    }
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Slice `i` holds these (sorted).
    Apply(usize, Vec<SliceEndpoint>),
    /// Slice `i` holds nothing any more.
    Delete(usize),
}

/// Which slice holds each pod, and what each slice holds in the API.
#[derive(Debug, Default, Clone)]
pub struct Book {
    slot: BTreeMap<PodKey, usize>,
    written: BTreeMap<usize, Vec<SliceEndpoint>>,
}

impl Book {
    /// From this node's slices as listed: each pod stays where it is
    /// (a pod listed twice, in the first slice that holds it).
    pub fn from_listed(listed: &[(usize, Vec<SliceEndpoint>)]) -> Self {
        let mut b = Self::default();
        for (i, eps) in listed {
            let mut eps = eps.clone();
            eps.sort();
            for e in &eps {
                b.slot
                    .entry(margay_policy::model::Key::new(&e.namespace, &e.name))
                    .or_insert(*i);
            }
            b.written.insert(*i, eps);
        }
        b
    }

    /// The writes that make the slices hold `pods`.
    pub fn plan(&mut self, pods: &BTreeMap<PodKey, SliceEndpoint>) -> Vec<Write> {
        self.slot.retain(|k, _| pods.contains_key(k));
        let mut count: BTreeMap<usize, usize> = BTreeMap::new();
        for i in self.slot.values() {
            *count.entry(*i).or_default() += 1;
        }
        for k in pods.keys() {
            if self.slot.contains_key(k) {
                continue;
            }
            let i = (0..)
                .find(|i| count.get(i).copied().unwrap_or(0) < SLICE_MAX)
                .unwrap_or(0);
            *count.entry(i).or_default() += 1;
            self.slot.insert(k.clone(), i);
        }
        let mut want: BTreeMap<usize, Vec<SliceEndpoint>> = BTreeMap::new();
        for (k, i) in &self.slot {
            want.entry(*i).or_default().push(pods[k].clone());
        }
        for v in want.values_mut() {
            v.sort();
        }
        let mut out = Vec::new();
        let all: BTreeSet<usize> = want.keys().chain(self.written.keys()).copied().collect();
        for i in all {
            match (want.remove(&i), self.written.get(&i)) {
                (Some(w), Some(h)) if w == *h => {}
                (Some(w), _) => out.push(Write::Apply(i, w)),
                (None, Some(_)) => out.push(Write::Delete(i)),
                (None, None) => {}
            }
        }
        out
    }

    /// `w` was written.
    pub fn wrote(&mut self, w: &Write) {
        match w {
            Write::Apply(i, eps) => {
                self.written.insert(*i, eps.clone());
            }
            Write::Delete(i) => {
                self.written.remove(i);
            }
        }
    }
}

/// The slice index in `name` for node `node`, if it is one of its.
fn index_of(node: &str, name: &str) -> Option<usize> {
    let (_, i) = name.rsplit_once('.')?;
    let i: usize = i.parse().ok()?;
    (slice_name(node, i) == name).then_some(i)
}

/// This node's Node's UID (the slices' owner) and its slices as listed.
async fn read_back(
    api: &Api<MargayEndpointSlice>,
    nodes: &Api<core::Node>,
    node: &str,
) -> crate::Result<(String, Book)> {
    let lp = ListParams::default().labels(&format!("{SLICE_NODE_LABEL}={}", node_label(node)));
    let what = || format!("reading node {node}'s endpoint slices");
    crate::kube::deadline(what, async {
        let n = nodes
            .get(node)
            .await
            .map_err(|e| crate::Error::kube(what(), e))?;
        let listed = margay_ipam::k8s::list_items(api, &lp)
            .await
            .map_err(|e| crate::Error::kube(what(), e))?;
        let mine: Vec<(usize, Vec<SliceEndpoint>)> = listed
            .iter()
            .filter(|s| s.spec.node == node)
            .filter_map(|s| Some((index_of(node, &s.name_any())?, s.spec.endpoints.clone())))
            .collect();
        Ok((n.metadata.uid.unwrap_or_default(), Book::from_listed(&mine)))
    })
    .await
}

/// Slice `i` of `node` holding `eps`, owned by the Node (UID `uid`).
fn slice_object(node: &str, uid: &str, i: usize, eps: &[SliceEndpoint]) -> MargayEndpointSlice {
    let mut s = MargayEndpointSlice::new(
        &slice_name(node, i),
        MargayEndpointSliceSpec {
            node: node.to_string(),
            endpoints: eps.to_vec(),
        },
    );
    s.metadata.labels = Some([(SLICE_NODE_LABEL.to_string(), node_label(node))].into());
    s.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.to_string(),
            uid: uid.to_string(),
            ..Default::default()
        },
    ]);
    s
}

/// Carries out one planned write (a slice already gone counts as deleted).
async fn write(
    api: &Api<MargayEndpointSlice>,
    node: &str,
    uid: &str,
    w: &Write,
) -> crate::Result<()> {
    match w {
        Write::Apply(i, eps) => {
            let name = slice_name(node, *i);
            let what = || format!("writing endpoint slice {name}");
            let s = slice_object(node, uid, *i, eps);
            let pp = PatchParams::apply("margay-agent").force();
            crate::kube::deadline(what, async {
                api.patch(&name, &pp, &Patch::Apply(&s))
                    .await
                    .map(|_| ())
                    .map_err(|e| crate::Error::kube(what(), e))
            })
            .await
        }
        Write::Delete(i) => {
            let name = slice_name(node, *i);
            let what = || format!("deleting endpoint slice {name}");
            crate::kube::deadline(what, async {
                match api.delete(&name, &DeleteParams::default()).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    r => r.map(|_| ()).map_err(|e| crate::Error::kube(what(), e)),
                }
            })
            .await
        }
    }
}

/// Writes node `node`'s slices from `rx` until the process ends.
pub async fn run(client: kube::Client, node: String, mut rx: watch::Receiver<Published>) {
    let api: Api<MargayEndpointSlice> = Api::all(client.clone());
    let nodes: Api<core::Node> = Api::all(client);
    let retry = Duration::from_secs(2);
    let (uid, mut book) = loop {
        match read_back(&api, &nodes, &node).await {
            Ok(got) => break got,
            Err(e) => tracing::debug!("endpoint slices: {e}"),
        }
        tokio::time::sleep(retry).await;
    };
    // A failure is a warning once, then quiet until a write succeeds.
    let (mut failed, mut warned) = (false, false);
    loop {
        if failed {
            tokio::time::sleep(retry).await;
        } else if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let Some(pods) = rx.borrow_and_update().clone() else {
            continue;
        };
        failed = false;
        for w in book.plan(&pods) {
            match write(&api, &node, &uid, &w).await {
                Ok(()) => {
                    book.wrote(&w);
                    warned = false;
                }
                Err(e) if warned => {
                    tracing::debug!("endpoint slices: {e}");
                    failed = true;
                }
                Err(e) => {
                    tracing::warn!(
                        "endpoint slices: {e} (other nodes' policies see this node's pods as last written; retrying)"
                    );
                    (failed, warned) = (true, true);
                }
            }
        }
        tokio::time::sleep(SLICE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, ip: &str) -> (PodKey, SliceEndpoint) {
        (
            margay_policy::model::Key::new("ns", name),
            SliceEndpoint {
                namespace: "ns".into(),
                name: name.into(),
                addresses: vec![ip.into()],
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_pod_stays_in_its_slice_and_a_change_rewrites_only_that_one() {
        let mut pods: BTreeMap<PodKey, SliceEndpoint> = (0..SLICE_MAX + 10)
            .map(|i| {
                ep(
                    &format!("p{i:03}"),
                    &format!("10.0.{}.{}", i / 200, i % 200),
                )
            })
            .collect();
        let mut b = Book::default();
        let w = b.plan(&pods);
        assert_eq!(w.len(), 2, "two slices");
        for x in &w {
            b.wrote(x);
        }
        assert!(b.plan(&pods).is_empty(), "nothing changed: nothing written");
        // A pod sorting first joins: the full first slice is not reshuffled,
        // the new pod goes where there is room.
        let (k, e) = ep("a-new", "10.9.9.9");
        pods.insert(k, e);
        let w = b.plan(&pods);
        assert!(
            matches!(&w[..], [Write::Apply(1, eps)] if eps.len() == 11),
            "{w:?}"
        );
        for x in &w {
            b.wrote(x);
        }
        // A pod of the first slice goes: that slice only.
        pods.remove(&margay_policy::model::Key::new("ns", "p000"));
        let w = b.plan(&pods);
        assert!(
            matches!(&w[..], [Write::Apply(0, eps)] if eps.len() == SLICE_MAX - 1),
            "{w:?}"
        );
        // A failed write is planned again.
        assert_eq!(b.plan(&pods), w);
        b.wrote(&w[0]);
        // Every pod gone: both slices deleted.
        let w = b.plan(&BTreeMap::new());
        assert_eq!(w, vec![Write::Delete(0), Write::Delete(1)]);
    }

    #[test]
    fn a_restarted_writer_keeps_pods_where_they_are() {
        let pods: BTreeMap<PodKey, SliceEndpoint> = [ep("a", "10.0.0.1"), ep("b", "10.0.0.2")]
            .into_iter()
            .collect();
        // Listed: b in slice 3, a in slice 0.
        let mut b = Book::from_listed(&[
            (3, vec![pods.values().nth(1).unwrap().clone()]),
            (0, vec![pods.values().next().unwrap().clone()]),
        ]);
        assert!(b.plan(&pods).is_empty());
    }

    #[test]
    fn nothing_is_published_before_the_first_list() {
        let mut l = LocalPods::default();
        let p: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "a"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c",
                     "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"podIPs": [{"ip": "10.0.0.5"}]}
        }))
        .unwrap();
        l.event(&Event::Init);
        l.event(&Event::InitApply(p.clone()));
        assert!(l.take().is_none(), "not listed yet");
        l.event(&Event::InitDone);
        let got = l.take().unwrap();
        let e = &got[&margay_policy::model::Key::new("ns", "p")];
        assert_eq!(e.addresses, ["10.0.0.5"]);
        assert_eq!(e.ports[0].protocol, "TCP");
        assert!(l.take().is_none(), "unchanged");
        // A status write that changes nothing policy sees: nothing.
        l.event(&Event::Apply(p.clone()));
        assert!(l.take().is_none());
        l.event(&Event::Delete(p));
        assert!(l.take().unwrap().is_empty());
    }

    #[test]
    fn only_this_nodes_slice_names_are_its() {
        assert_eq!(index_of("n1", "n1.3"), Some(3));
        assert_eq!(index_of("n1", "n10.3"), None);
        assert_eq!(index_of("n1", "n1.x"), None);
    }
}
