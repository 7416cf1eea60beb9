//! The IPAM store on the Kubernetes API.
//!
//! Blocks are `IPAMBlock` objects; every write is a compare-and-swap on
//! `metadata.resourceVersion` (create fails with AlreadyExists, replace and
//! delete-with-precondition fail with Conflict). Blocks are always read
//! from the API. Pools, the IPAM settings and this node's labels come from
//! watches in the agent ([`KubeStore::watched`]: no polling), or through a
//! short-lived cache for one-shot users (`margayctl`, tests).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Block, Cluster, Error, Store};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use super::reflect::{Known, Watched, watch, watch_with};
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
}

/// What a watched store reads from watches.
struct Watches {
    node: String,
    pools: Watched<IPPool>,
    config: Watched<IPAMConfiguration>,
    me: Watched<Node>,
}

/// A watched value as the store answers it: current or last known; an
/// error only when nothing was ever read.
fn known<T>(k: Known<T>) -> Result<T> {
    match k {
        Known::Fresh(v) | Known::Stale(v, _) => Ok(v),
        Known::Unknown(why) => Err(Error::Unavailable(why)),
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
        }
    }

    /// A store for node `node` whose pools, IPAM settings and node labels
    /// come from watches (`poke` is notified on every change); the returned
    /// task keeps them and never ends: run it beside the store.
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
        let mut store = Self::new(client, Duration::ZERO);
        store.watches = Some(Watches {
            node: node.to_string(),
            pools,
            config,
            me,
        });
        let task = async move {
            futures::join!(t1, t2, t3);
        };
        (store, task)
    }

    /// The pools as watched (with whether they are current), for a store
    /// made by [`KubeStore::watched`].
    pub fn pool_watch(&self) -> Option<&Watched<IPPool>> {
        self.watches.as_ref().map(|w| &w.pools)
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
        let list = self
            .blocks
            .list(&ListParams::default())
            .await
            .map_err(|e| map_err("ipamblocks", e))?;
        let mut out = Vec::with_capacity(list.items.len());
        for res in &list.items {
            match Block::from_resource(res) {
                Ok(b) => out.push(b),
                // A corrupt block is left alone (and its addresses are
                // never handed out again, because its name stays taken).
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(out)
    }

    async fn get_block(&self, name: &str) -> Result<Option<Block>> {
        match self.blocks.get_opt(name).await {
            Ok(Some(res)) => Block::from_resource(&res).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(map_err(&format!("ipamblock {name}"), e)),
        }
    }

    async fn create_block(&self, block: &Block) -> Result<Block> {
        let mut res = block.to_resource();
        res.metadata.resource_version = None;
        let made = self
            .blocks
            .create(&PostParams::default(), &res)
            .await
            .map_err(|e| map_err(&format!("ipamblock {}", block.name), e))?;
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
        let made = self
            .blocks
            .replace(&block.name, &PostParams::default(), &res)
            .await
            .map_err(|e| map_err(&format!("ipamblock {}", block.name), e))?;
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
        self.blocks
            .delete(name, &dp)
            .await
            .map(|_| ())
            .map_err(|e| map_err(&format!("ipamblock {name}"), e))
    }

    async fn pools(&self) -> Result<Vec<IPPool>> {
        if let Some(w) = &self.watches {
            return known(w.pools.read()).map(|p| p.iter().map(|p| (**p).clone()).collect());
        }
        if let Some(p) = fresh(&self.cache().pools, self.ttl) {
            return Ok(p);
        }
        let api: Api<IPPool> = Api::all(self.client.clone());
        let pools = api
            .list(&ListParams::default())
            .await
            .map_err(|e| map_err("ippools", e))?
            .items;
        self.cache().pools = Some((Instant::now(), pools.clone()));
        Ok(pools)
    }

    async fn config(&self) -> Result<IPAMConfigurationSpec> {
        if let Some(w) = &self.watches {
            return known(w.config.read()).map(|all| {
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
        let cfg = api
            .get_opt(CONFIG_NAME)
            .await
            .map_err(|e| map_err("ipamconfiguration default", e))?
            .map(|c| c.spec)
            .unwrap_or_default();
        self.cache().config = Some((Instant::now(), cfg.clone()));
        Ok(cfg)
    }

    async fn node_labels(&self, node: &str) -> Result<BTreeMap<String, String>> {
        if let Some(w) = self.watches.as_ref().filter(|w| w.node == node) {
            return known(w.me.read())
                .map(|n| n.first().map(|n| n.labels().clone()).unwrap_or_default());
        }
        if let Some((at, l)) = self.cache().labels.get(node)
            && at.elapsed() < self.ttl
        {
            return Ok(l.clone());
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let labels = api
            .get_metadata_opt(node)
            .await
            .map_err(|e| map_err(&format!("node {node}"), e))?
            .map(|m| m.labels().clone())
            .unwrap_or_default();
        self.cache()
            .labels
            .insert(node.to_string(), (Instant::now(), labels.clone()));
        Ok(labels)
    }
}

impl Cluster for KubeStore {
    async fn nodes(&self) -> Result<BTreeSet<String>> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| map_err("nodes", e))?;
        Ok(list.items.iter().map(|n| n.name_any()).collect())
    }

    async fn node_exists(&self, name: &str) -> Result<bool> {
        let api: Api<Node> = Api::all(self.client.clone());
        api.get_metadata_opt(name)
            .await
            .map(|n| n.is_some())
            .map_err(|e| map_err(&format!("node {name}"), e))
    }

    async fn pods(&self) -> Result<HashMap<(String, String), String>> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let list = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| map_err("pods", e))?;
        Ok(list
            .items
            .iter()
            .map(|p| {
                (
                    (p.namespace().unwrap_or_default(), p.name_any()),
                    p.uid().unwrap_or_default(),
                )
            })
            .collect())
    }

    async fn pod_uid(&self, namespace: &str, name: &str) -> Result<Option<String>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        api.get_metadata_opt(name)
            .await
            .map(|p| p.map(|p| p.uid().unwrap_or_default()))
            .map_err(|e| map_err(&format!("pod {namespace}/{name}"), e))
    }
}
