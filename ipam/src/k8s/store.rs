//! The IPAM store on the Kubernetes API.
//!
//! Blocks are `IPAMBlock` objects; every write is a compare-and-swap on
//! `metadata.resourceVersion` (create fails with AlreadyExists, replace and
//! delete-with-precondition fail with Conflict). Pools, the IPAM settings
//! and this node's labels come from watches in the agent
//! ([`KubeStore::watched`]: no polling), or through a short-lived cache for
//! one-shot users (`margayctl`, tests). A node's store also follows the
//! blocks with a watch that it hands to the allocator
//! ([`Store::block_feed`]), which keeps its view from it instead of
//! listing every block again; the store itself reads blocks from the API
//! (a paginated list, a get). The cluster-wide store reads blocks from a
//! watch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{BlockChange, BlockFeed};
use crate::{Block, Cluster, Error, Store};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use super::list::list_items;
use super::reflect::{Change, Known, Watched, follow, watch, watch_slim, watch_with};
use margay_api::ipam::{CONFIG_NAME, IPAMBlock, IPAMConfiguration, IPAMConfigurationSpec, IPPool};

type Result<T> = std::result::Result<T, Error>;

/// Translates a Kubernetes API error into the store's terms.
pub fn map_err(what: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) => match s.code {
            404 => Error::NotFound(what.to_string()),
            409 if s.reason == "AlreadyExists" => Error::AlreadyExists(what.to_string()),
            409 => Error::Conflict(what.to_string()),
            429 | 500..=599 => Error::Unavailable(format!("{what}: {}", s.message)),
            _ => Error::Refused(format!("{what}: {} ({})", s.message, s.reason)),
        },
        other => Error::Unavailable(format!("{what}: {other}")),
    }
}

/// How long a read waits for a watch's first list (an agent just started)
/// before it answers `Unavailable`.
const FIRST_LIST: Duration = Duration::from_secs(5);

/// How long one request may take before it counts as unanswered (a frozen
/// apiserver): the caller gets `Unavailable` (a write may or may not have
/// been applied, as with any lost answer) instead of waiting minutes.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// `fut`, its error mapped, or `Unavailable` after [`DEADLINE`].
pub(crate) async fn ask<T>(
    what: &str,
    fut: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(r) => r.map_err(|e| map_err(what, e)),
        Err(_) => Err(Error::Unavailable(format!(
            "{what}: no answer within {}s",
            DEADLINE.as_secs()
        ))),
    }
}

#[derive(Debug, Default)]
struct Cache {
    pools: Option<(Instant, Vec<IPPool>)>,
    config: Option<(Instant, IPAMConfigurationSpec)>,
    labels: HashMap<String, (Instant, BTreeMap<String, String>)>,
}

/// [`Store`] and [`Cluster`] over a Kubernetes client.
pub struct KubeStore {
    client: Client,
    blocks: Api<IPAMBlock>,
    ttl: Duration,
    cache: Mutex<Cache>,
    watches: Option<Watches>,
    /// The blocks' watch of a node's store, until the allocator takes it.
    feed: Mutex<Option<BlockFeed>>,
}

/// What a watched store reads from watches.
struct Watches {
    /// Only current contents answer (stale ones are an error).
    strict: bool,
    pools: Watched<IPPool>,
    config: Watched<IPAMConfiguration>,
    /// This node (a node's store).
    me: Option<(String, Watched<Node>)>,
    /// Every block, node and pod (the cluster-wide store).
    cluster: Option<ClusterWatches>,
}

/// The leader's watches. Nodes and Pods are watched as metadata only
/// (`Api<PartialObjectMeta<_>>`: kube asks for `PartialObjectMetadata`)
/// and kept as only what is read of them ([`node_name`], [`pod_sandbox`]);
/// every kept object's managedFields are dropped.
struct ClusterWatches {
    blocks: Watched<IPAMBlock>,
    nodes: Watched<PartialObjectMeta<Node>>,
    pods: Watched<PartialObjectMeta<Pod>>,
}

impl Watches {
    /// A watched value as the store answers it: current, or (unless
    /// strict) last known; an error when nothing (current) was read.
    fn known<T>(&self, k: Known<T>) -> Result<T> {
        match k {
            Known::Fresh(v) => Ok(v),
            Known::Stale(v, _) if !self.strict => Ok(v),
            Known::Stale(_, why) | Known::Unknown(why) => Err(Error::Unavailable(why.to_string())),
        }
    }

    /// Every object `w` holds, as [`Watches::known`] answers (waiting a
    /// little for a first list still under way).
    async fn objects<K>(&self, w: &Watched<K>) -> Result<Vec<K>>
    where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        self.known(w.read_listed(FIRST_LIST).await)
            .map(|all| all.iter().map(|o| (**o).clone()).collect())
    }
}

fn fresh<T: Clone>(slot: &Option<(Instant, T)>, ttl: Duration) -> Option<T> {
    slot.as_ref()
        .filter(|(at, _)| at.elapsed() < ttl)
        .map(|(_, v)| v.clone())
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl KubeStore {
    /// A store on `client`; pools, settings and labels are cached for `ttl`.
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            blocks: Api::all(client.clone()),
            client,
            ttl,
            cache: Mutex::new(Cache::default()),
            watches: None,
            feed: Mutex::new(None),
        }
    }

    /// A store for node `node` whose pools, IPAM settings and node labels
    /// come from watches (`poke` is notified on every change); the returned
    /// task keeps them and never ends: run it beside the store. Last known
    /// contents answer while a watch is down (a node keeps allocating from
    /// the pools it knew). The blocks are followed by a watch too, handed
    /// to the allocator ([`Store::block_feed`]: it keeps its own view); the
    /// store's own block reads go to the API.
    pub fn watched(
        client: Client,
        node: &str,
        poke: Arc<Notify>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (pools, t1) = watch(Api::all(client.clone()), "IPPools", poke.clone());
        let (config, t2) = watch(Api::all(client.clone()), "IPAMConfigurations", poke.clone());
        let (me, t3) = watch_with(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            "this Node",
            poke,
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (fresh, t4) = follow(
            Api::<IPAMBlock>::all(client.clone()),
            watcher::Config::default(),
            "IPAMBlocks",
            move |c| {
                let _ = tx.send(match c {
                    Change::Listed(all) => BlockChange::Listed(read_blocks(&all)),
                    Change::Applied(b) => match read_blocks(std::slice::from_ref(&b)).pop() {
                        Some(b) => BlockChange::Put(b),
                        None => return,
                    },
                    Change::Deleted(b) => BlockChange::Gone(b.name_any()),
                });
            },
        );
        let mut store = Self::new(client, Duration::ZERO);
        store.watches = Some(Watches {
            strict: false,
            pools,
            config,
            me: Some((node.to_string(), me)),
            cluster: None,
        });
        store.feed = Mutex::new(Some(BlockFeed::new(rx, move || {
            fresh.stale().map(|w| w.to_string())
        })));
        let task = async move {
            futures::join!(t1, t2, t3, t4);
        };
        (store, task)
    }

    /// A store for cluster-wide work (pool status, garbage collection)
    /// whose every read (pools, settings, blocks, node names, pod UIDs)
    /// comes from watches, current only: a watch that is down makes its
    /// reads fail, so nothing is decided on stale contents. Writes and the
    /// read-now checks (`get_block`, `node_exists`, `pod_uid`) go to the
    /// API. The task keeps the watches and never ends.
    pub fn cluster_watched(
        client: Client,
        poke: Arc<Notify>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (pools, t1) = watch(Api::all(client.clone()), "IPPools", poke.clone());
        let (config, t2) = watch(Api::all(client.clone()), "IPAMConfigurations", poke.clone());
        let (blocks, t3) = watch(Api::all(client.clone()), "IPAMBlocks", poke.clone());
        let (nodes, t4) = watch_slim(
            Api::all(client.clone()),
            watcher::Config::default(),
            "Nodes",
            poke.clone(),
            node_name,
        );
        let (pods, t5) = watch_slim(
            Api::all(client.clone()),
            watcher::Config::default(),
            "Pods",
            poke,
            pod_sandbox,
        );
        let mut store = Self::new(client, Duration::ZERO);
        store.watches = Some(Watches {
            strict: true,
            pools,
            config,
            me: None,
            cluster: Some(ClusterWatches {
                blocks,
                nodes,
                pods,
            }),
        });
        let task = async move {
            futures::join!(t1, t2, t3, t4, t5);
        };
        (store, task)
    }

    /// The pools as watched (with whether they are current), for a store
    /// made by [`KubeStore::watched`].
    pub fn pool_watch(&self) -> Option<&Watched<IPPool>> {
        self.watches.as_ref().map(|w| &w.pools)
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn cluster(&self) -> Option<(&Watches, &ClusterWatches)> {
        let w = self.watches.as_ref()?;
        Some((w, w.cluster.as_ref()?))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().expect("cache lock")
    }

    /// Forgets cached pools, settings and labels.
    pub fn invalidate(&self) {
        *self.cache() = Cache::default();
    }
}

impl Store for KubeStore {
    async fn list_blocks(&self) -> Result<Vec<Block>> {
        let items: Vec<IPAMBlock> = match self
            .watches
            .as_ref()
            .and_then(|w| Some((w, w.cluster.as_ref()?)))
        {
            Some((w, c)) => w.objects(&c.blocks).await?,
            None => {
                ask(
                    "ipamblocks",
                    list_items(&self.blocks, &ListParams::default()),
                )
                .await?
            }
        };
        Ok(read_blocks(&items))
    }

    async fn get_block(&self, name: &str) -> Result<Option<Block>> {
        match ask(&format!("ipamblock {name}"), self.blocks.get_opt(name)).await? {
            Some(res) => Block::from_resource(&res).map(Some),
            None => Ok(None),
        }
    }

    async fn create_block(&self, block: &Block) -> Result<Block> {
        let mut res = block.to_resource();
        res.metadata.resource_version = None;
        let what = format!("ipamblock {}", block.name);
        let made = ask(&what, self.blocks.create(&PostParams::default(), &res)).await?;
        Block::from_resource(&made)
    }

    async fn update_block(&self, block: &Block) -> Result<Block> {
        if block.version.is_none() {
            return Err(Error::Conflict(format!(
                "ipamblock {} (no version)",
                block.name
            )));
        }
        let res = block.to_resource();
        let what = format!("ipamblock {}", block.name);
        let pp = PostParams::default();
        let made = ask(&what, self.blocks.replace(&block.name, &pp, &res)).await?;
        Block::from_resource(&made)
    }

    async fn delete_block(&self, name: &str, version: &str) -> Result<()> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version.to_string()),
                uid: None,
            }),
            ..Default::default()
        };
        ask(&format!("ipamblock {name}"), self.blocks.delete(name, &dp))
            .await
            .map(|_| ())
    }

    async fn pools(&self) -> Result<Vec<IPPool>> {
        if let Some(w) = &self.watches {
            return w.objects(&w.pools).await;
        }
        if let Some(p) = fresh(&self.cache().pools, self.ttl) {
            return Ok(p);
        }
        let api: Api<IPPool> = Api::all(self.client.clone());
        let pools = ask("ippools", list_items(&api, &ListParams::default())).await?;
        self.cache().pools = Some((Instant::now(), pools.clone()));
        Ok(pools)
    }

    async fn config(&self) -> Result<IPAMConfigurationSpec> {
        if let Some(w) = &self.watches {
            return w.known(w.config.read_listed(FIRST_LIST).await).map(|all| {
                all.iter()
                    .find(|c| c.name_any() == CONFIG_NAME)
                    .map(|c| c.spec.clone())
                    .unwrap_or_default()
            });
        }
        if let Some(c) = fresh(&self.cache().config, self.ttl) {
            return Ok(c);
        }
        let api: Api<IPAMConfiguration> = Api::all(self.client.clone());
        let cfg = ask("ipamconfiguration default", api.get_opt(CONFIG_NAME))
            .await?
            .map(|c| c.spec)
            .unwrap_or_default();
        self.cache().config = Some((Instant::now(), cfg.clone()));
        Ok(cfg)
    }

    async fn node_labels(&self, node: &str) -> Result<crate::store::NodeLabels> {
        if let Some((w, me)) = self
            .watches
            .as_ref()
            .and_then(|w| Some((w, &w.me.as_ref().filter(|(n, _)| n == node)?.1)))
        {
            return w
                .known(me.read_listed(FIRST_LIST).await)
                .map(|n| n.first().map(|n| n.labels().clone()).unwrap_or_default());
        }
        if let Some((at, l)) = self.cache().labels.get(node)
            && at.elapsed() < self.ttl
        {
            return Ok(l.clone());
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let labels = ask(&format!("node {node}"), api.get_metadata_opt(node))
            .await?
            .map(|m| m.labels().clone())
            .unwrap_or_default();
        self.cache()
            .labels
            .insert(node.to_string(), (Instant::now(), labels.clone()));
        Ok(labels)
    }

    fn block_feed(&self) -> Option<BlockFeed> {
        self.feed.lock().expect("feed lock").take()
    }
}

impl Cluster for KubeStore {
    async fn nodes(&self) -> Result<BTreeSet<String>> {
        if let Some((w, c)) = self.cluster() {
            return w
                .known(c.nodes.read_listed(FIRST_LIST).await)
                .map(|n| n.iter().map(|n| n.name_any()).collect());
        }
        let api: Api<PartialObjectMeta<Node>> = Api::all(self.client.clone());
        let list = ask("nodes", list_items(&api, &ListParams::default())).await?;
        Ok(list.iter().map(|n| n.name_any()).collect())
    }

    async fn node_exists(&self, name: &str) -> Result<bool> {
        let api: Api<Node> = Api::all(self.client.clone());
        ask(&format!("node {name}"), api.get_metadata_opt(name))
            .await
            .map(|n| n.is_some())
    }

    async fn pods(&self) -> Result<crate::store::PodSandboxes> {
        let items: Vec<PartialObjectMeta<Pod>> = match self.cluster() {
            Some((w, c)) => w.objects(&c.pods).await?,
            None => {
                let api: Api<PartialObjectMeta<Pod>> = Api::all(self.client.clone());
                ask("pods", list_items(&api, &ListParams::default())).await?
            }
        };
        Ok(items
            .iter()
            .map(|p| {
                (
                    (p.namespace().unwrap_or_default(), p.name_any()),
                    sandbox_uid(&p.metadata),
                )
            })
            .collect())
    }

    async fn pod_uid(&self, namespace: &str, name: &str) -> Result<Option<String>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        ask(
            &format!("pod {namespace}/{name}"),
            api.get_metadata_opt(name),
        )
        .await
        .map(|p| p.map(|p| sandbox_uid(&p.metadata)))
    }
}

/// The blocks of `items`. A corrupt block is there, marked: its range
/// stays taken and nothing in it is handed out, released or deleted. An
/// object whose name is no block's either is left out (no range to keep).
fn read_blocks(items: &[IPAMBlock]) -> Vec<Block> {
    let mut out = Vec::with_capacity(items.len());
    for res in items {
        match Block::read(res) {
            Ok(b) => {
                if let Some(why) = &b.corrupt {
                    tracing::warn!(block = %b.name, "{why}");
                }
                out.push(b);
            }
            Err(e) => tracing::warn!("{e} (the object's name is no block's: ignored)"),
        }
    }
    out
}

/// What the cluster-wide store keeps of a Node (metadata only on the
/// wire): its name.
fn node_name(n: &mut PartialObjectMeta<Node>) {
    n.types = None;
    n.metadata = ObjectMeta {
        name: n.metadata.name.take(),
        ..Default::default()
    };
}

/// What the cluster-wide store keeps of a Pod (metadata only on the wire):
/// its namespace, name and the UID its sandboxes carry
/// ([`sandbox_uid`]).
fn pod_sandbox(p: &mut PartialObjectMeta<Pod>) {
    p.types = None;
    let uid = sandbox_uid(&p.metadata);
    p.metadata = ObjectMeta {
        namespace: p.metadata.namespace.take(),
        name: p.metadata.name.take(),
        uid: Some(uid),
        ..Default::default()
    };
}

/// The annotation a static pod's mirror carries: the static pod's UID
/// (its config hash), which is what the kubelet passes as K8S_POD_UID.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The UID the kubelet gives a pod's sandboxes (and so records in IPAM):
/// a mirror pod's `kubernetes.io/config.mirror` (the static pod's own UID,
/// not the mirror object's), any other pod's `metadata.uid`.
pub fn sandbox_uid(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    m.annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .filter(|h| !h.is_empty())
        .cloned()
        .or_else(|| m.uid.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_leader_keeps_a_nodes_name_and_a_pods_sandbox_uid_only() {
        let full = meta(serde_json::json!({
            "name": "n1", "uid": "u1", "resourceVersion": "7",
            "labels": {"a": "b"}, "annotations": {"x": "y"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
        }));
        let mut n: PartialObjectMeta<Node> = PartialObjectMeta {
            types: None,
            metadata: full.clone(),
            _phantom: Default::default(),
        };
        node_name(&mut n);
        assert_eq!(n.metadata, meta(serde_json::json!({"name": "n1"})));

        for (annotations, uid) in [
            (serde_json::json!({"x": "y"}), "u1"),
            (
                serde_json::json!({MIRROR_ANNOTATION: "static-hash"}),
                "static-hash",
            ),
        ] {
            let mut m = full.clone();
            m.namespace = Some("ns".into());
            m.annotations = serde_json::from_value(annotations).unwrap();
            let mut p: PartialObjectMeta<Pod> = PartialObjectMeta {
                types: None,
                metadata: m.clone(),
                _phantom: Default::default(),
            };
            let before = sandbox_uid(&m);
            pod_sandbox(&mut p);
            assert_eq!(
                p.metadata,
                meta(serde_json::json!({"namespace": "ns", "name": "n1", "uid": uid}))
            );
            assert_eq!(sandbox_uid(&p.metadata), before);
        }
    }
}
