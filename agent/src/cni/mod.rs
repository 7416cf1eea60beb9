//! The agent's CNI service: ADD, DEL, CHECK, STATUS and GC over gRPC on a
//! unix socket, translating to IPAM and the dataplane.
//!
//! Every call acts on one attachment (network name, container ID,
//! interface name: `margay_api::cni::Attachment`, checked as the spec
//! says). Its handle names its addresses in IPAM and its host interface
//! (`cali` + a hash of the handle), and the interface's alias records it:
//! DEL, CHECK and GC touch an interface only when its alias records their
//! own attachment, so a stale DEL of an old sandbox or a second interface
//! of one container never reach another's.
//!
//! ADD checks the pod namespace (a network namespace, not the node's),
//! takes addresses from the node's reserve (a retried ADD gets the same
//! ones; a pre-assigned spare when there is one, so no datastore write is
//! waited for), then wires the pod, recording the handle on its host
//! interface; then the attribution is written behind. If wiring fails the
//! dataplane has already rolled back and the addresses go back, so a failed
//! ADD leaves nothing; an ADD whose caller went away (the plugin killed)
//! is finished, then undone (see [`server`]). DEL unwires (nothing to do
//! is fine; the pod namespace may be gone) and releases, written behind.
//! Pods wired before handles named their network (`container.ifname`,
//! interface named after the pod) are still found by DEL and CHECK.
//! Operations on one handle never overlap.
//! Errors carry CNI codes (`margay_api::cni`): 11 when asking again may
//! work, 3 when the pod namespace does not exist, 100 for address
//! allocation, 101 for the dataplane, 50 for STATUS when not ready.
//!
//! - [`server`]: the gRPC server on the unix socket (root callers only);
//! - [`alias`]: the attribution record on each pod's host interface;
//! - [`reconcile`]: start-up agreement of the kernel and IPAM.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;
use margay_api::cni::Attachment;
use margay_api::ipam::{AllowedUse, IPPool, PodRef};
use margay_ipam::model::validate_pools;
use margay_ipam::{Assign, Reserve, Store};
use margay_proto::cni;

use crate::dataplane::ownership::{alias_owner, host_ifname};
use crate::dataplane::routed::Local;
use crate::dataplane::{self, Dataplane, GATEWAY_V4, HOST_MAC, PodSpec};
use crate::kube::Known;

pub mod alias;
pub mod reconcile;
pub mod server;

pub use server::serve;

/// The CNI error codes the agent answers with (one table with the plugin).
pub use margay_api::cni as code;

fn err(code: u32, msg: impl Into<String>) -> cni::CniError {
    cni::CniError {
        code,
        msg: msg.into(),
        details: String::new(),
    }
}

fn ipam_err(e: &margay_ipam::Error) -> cni::CniError {
    let code = if e.is_transient() {
        code::TRY_AGAIN
    } else {
        code::IPAM
    };
    err(code, format!("margay IPAM: {e}"))
}

/// The CNI service, generic over the IPAM store and the dataplane.
#[derive(Debug)]
pub struct CniService<S, D> {
    node: String,
    store: Arc<S>,
    reserve: Reserve,
    dp: Arc<D>,
    mtu: u32,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Poked after an ADD or DEL whose addresses lie outside the node's
    /// blocks as last published (a new block needs its blackhole and
    /// advertisement, a borrowed address its /32 or its withdrawal); the
    /// other ADDs and DELs make their own host routes, and a pass for each
    /// would only compete with them for the kernel's RTNL lock.
    pods_changed: Arc<tokio::sync::Notify>,
    /// What `routing::local` last published (unset: every change pokes).
    routed: Option<tokio::sync::watch::Receiver<Known<Local>>>,
    /// The pools last read (for the MTU when the datastore is slow).
    last_pools: Mutex<Option<Vec<IPPool>>>,
    /// The NetworkPolicy engine an ADD waits for (none: policy disabled).
    policy: Option<crate::netpol::PolicyHandle>,
}

/// Every attachment this node has wired, as the NetworkPolicy engine
/// needs them: from their interfaces' aliases, the pod of one whose
/// alias could not hold it from IPAM's record of its handle (`owners`);
/// one whose pod neither names is unattributed (quarantined).
pub async fn wired_endpoints<D: Dataplane>(
    dp: &D,
    owners: &reconcile::Attributions,
) -> crate::Result<Vec<crate::netpol::Restored>> {
    let pods = dp.list_pods().await?;
    Ok(pods
        .iter()
        .filter_map(alias::parse)
        .map(|a| {
            let pod = a.pod.clone().or_else(|| owners.get(&a.handle).cloned());
            crate::netpol::Restored {
                unattributed: a.pod_cut && pod.is_none(),
                endpoint: crate::netpol::Endpoint {
                    host_if: a.host_if,
                    pod: pod.map(|p| margay_policy::PodKey::new(&p.namespace, &p.name)),
                    ips: a.addrs,
                },
            }
        })
        .collect())
}

/// The attachment a request acts on; a bad identity is the caller's error
/// (code 7 for the network name, 4 for the environment).
fn attachment_of(r: &cni::CniRequest) -> Result<Attachment, cni::CniError> {
    Attachment::new(&r.network, &r.container_id, &r.ifname)
        .map_err(|e| err(e.code(), e.to_string()))
}

/// The host interface of a pod wired before handles named their network:
/// named after the pod (or the container when no pod was given).
fn legacy_host_if(r: &cni::CniRequest) -> String {
    match &r.pod {
        Some(p) if !p.name.is_empty() => host_ifname(&format!("{}.{}", p.namespace, p.name)),
        _ => host_ifname(&r.container_id),
    }
}

/// How an attachment was wired: its handle and host interface.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wired {
    handle: String,
    host_if: String,
}

impl Wired {
    fn of(a: &Attachment) -> Self {
        let handle = a.handle();
        Self {
            host_if: host_ifname(&handle),
            handle,
        }
    }

    fn legacy(a: &Attachment, r: &cni::CniRequest) -> Self {
        Self {
            handle: a.legacy_handle(),
            host_if: legacy_host_if(r),
        }
    }
}

fn pod_of(r: &cni::CniRequest) -> Option<PodRef> {
    r.pod.as_ref().map(|p| PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
    })
}

/// Held while an operation on a handle runs.
struct HandleGuard<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    handle: String,
    m: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for HandleGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("locks");
        // The map's copy, this guard's, and the owned guard's: nobody
        // else waits on it.
        if Arc::strong_count(&self.m) <= 3 {
            map.remove(&self.handle);
        }
    }
}

fn need_netns(r: &cni::CniRequest) -> Result<(), cni::CniError> {
    if r.netns.is_empty() {
        return Err(err(
            code::INVALID_ENV,
            "CNI_NETNS is required for ADD and CHECK",
        ));
    }
    Ok(())
}

fn netns_err(e: &dataplane::Error) -> Option<cni::CniError> {
    match e {
        dataplane::Error::Netns { .. } => Some(err(code::UNKNOWN_CONTAINER, e.to_string())),
        dataplane::Error::NotPodNetns { .. } => Some(err(code::INVALID_ENV, e.to_string())),
        _ => None,
    }
}

impl<S: Store, D: Dataplane> CniService<S, D> {
    /// A service for `node`.
    pub fn new(node: &str, store: Arc<S>, reserve: Reserve, dp: Arc<D>, mtu: u32) -> Self {
        Self {
            node: node.to_string(),
            store,
            reserve,
            dp,
            mtu,
            locks: Mutex::new(HashMap::new()),
            pods_changed: Arc::new(tokio::sync::Notify::new()),
            routed: None,
            last_pools: Mutex::new(None),
            policy: None,
        }
    }

    /// Follows what `routing::local` publishes, to poke it only for
    /// addresses outside the node's known blocks.
    pub fn follow_local(&mut self, rx: tokio::sync::watch::Receiver<Known<Local>>) {
        self.routed = Some(rx);
    }

    /// Registers every pod with the NetworkPolicy engine; an ADD answers
    /// once its pod's rules are loaded.
    pub fn enforce_policy(&mut self, policy: crate::netpol::PolicyHandle) {
        self.policy = Some(policy);
    }

    /// Tells `routing::local` about a pod change with `addrs`, when its
    /// published state may not cover them (no addresses known: it may not).
    fn poke_for(&self, addrs: &[IpNetwork]) {
        let covered = !addrs.is_empty()
            && self.routed.as_ref().is_some_and(|rx| {
                rx.borrow().value().is_some_and(|l| {
                    addrs
                        .iter()
                        .all(|a| l.blocks.iter().any(|b| b.contains(a.ip())))
                })
            });
        if !covered {
            self.pods_changed.notify_one();
        }
    }

    /// Notified after each ADD and DEL that changed an interface.
    pub fn pods_changed(&self) -> Arc<tokio::sync::Notify> {
        self.pods_changed.clone()
    }

    /// Serialises operations on one handle.
    async fn lock(&self, handle: &str) -> HandleGuard<'_> {
        let m = self
            .locks
            .lock()
            .expect("locks")
            .entry(handle.to_string())
            .or_default()
            .clone();
        let guard = m.clone().lock_owned().await;
        HandleGuard {
            map: &self.locks,
            handle: handle.to_string(),
            _guard: guard,
            m,
        }
    }

    /// The pod MTU: the request's, else the agent's minus the overhead of
    /// the encapsulation of the pools the addresses come from.
    async fn mtu_for(&self, r: &cni::CniRequest, addrs: &[IpNetwork]) -> u32 {
        if r.mtu > 0 {
            return r.mtu;
        }
        // Bounded: with spares an ADD needs no datastore, and must not start
        // waiting for one here; the last pools seen serve meanwhile.
        let fresh =
            tokio::time::timeout(std::time::Duration::from_millis(300), self.store.pools()).await;
        let pools = match fresh {
            Ok(Ok(p)) => {
                *self.last_pools.lock().expect("pools") = Some(p.clone());
                p
            }
            _ => match self.last_pools.lock().expect("pools").clone() {
                Some(p) => p,
                None => return self.mtu,
            },
        };
        let (valid, _) = validate_pools(&pools);
        addrs
            .iter()
            .filter_map(|a| valid.iter().find(|p| p.cidr.contains(a.ip())))
            .map(|p| dataplane::pod_mtu(self.mtu, p.encapsulation))
            .min()
            .unwrap_or(self.mtu)
    }

    fn spec(&self, r: &cni::CniRequest, w: &Wired, addrs: Vec<IpNetwork>, mtu: u32) -> PodSpec {
        let pod = pod_of(r);
        PodSpec {
            netns: PathBuf::from(&r.netns),
            ifname: r.ifname.clone(),
            host_if: w.host_if.clone(),
            alias: alias::alias(&w.handle, &addrs, pod.as_ref()),
            owner: w.handle.clone(),
            addrs,
            mtu,
        }
    }

    /// Removes `w`'s host interface when its alias records `w.handle` (or,
    /// with `unrecorded`, records nothing: an ADD that died before writing
    /// it). Whether the interface is gone now.
    async fn unwire(&self, w: &Wired, unrecorded: bool) -> Result<bool, cni::CniError> {
        let failed = |e: dataplane::Error| {
            err(
                code::TRY_AGAIN,
                format!("removing the pod's interfaces: {e}"),
            )
        };
        let Some(link) = self.dp.pod_link(&w.host_if).await.map_err(failed)? else {
            return Ok(true);
        };
        match alias_owner(&link.alias) {
            Some(o) if o == w.handle => {}
            None if unrecorded => {}
            other => {
                tracing::info!(
                    host_if = %w.host_if,
                    handle = %w.handle,
                    owner = other.unwrap_or("-"),
                    "host interface is another attachment's: left alone"
                );
                return Ok(false);
            }
        }
        self.dp.del_pod(&w.host_if).await.map_err(failed)?;
        if let Some(p) = &self.policy {
            p.deleted(&w.host_if);
        }
        let addrs = alias::parse(&link).map(|a| a.addrs).unwrap_or_default();
        let addrs: Vec<IpNetwork> = addrs.into_iter().map(IpNetwork::from).collect();
        self.poke_for(&addrs);
        Ok(true)
    }

    /// CNI ADD.
    pub async fn add(&self, r: &cni::CniRequest) -> Result<cni::CniResult, cni::CniError> {
        let at = attachment_of(r)?;
        need_netns(r)?;
        if let Err(e) = self.dp.pod_netns(std::path::Path::new(&r.netns)).await {
            return Err(netns_err(&e).unwrap_or_else(|| err(code::DATAPLANE, e.to_string())));
        }
        let w = Wired::of(&at);
        let handle = w.handle.clone();
        let _g = self.lock(&handle).await;
        let pod = pod_of(r);
        let t0 = std::time::Instant::now();
        let taken = self
            .reserve
            .take(&Assign {
                handle: handle.clone(),
                pod: pod.clone(),
                use_: AllowedUse::Workload,
            })
            .await
            .map_err(|e| ipam_err(&e))?;
        let ipam_ms = t0.elapsed().as_secs_f64() * 1e3;
        let addrs = taken.addrs.clone();
        let host_if = w.host_if.clone();
        // No window: the pod is not answered for before its rules are in.
        // The engine is told now, with the addresses, and programs the
        // rules (matching the interface by name, before it exists) while
        // the pod is wired: the ADD waits for whichever ends last.
        // Every attachment is a workload interface (its sources checked);
        // one of a Pod gets its Pod's policies.
        let ready = self.policy.as_ref().map(|policy| {
            let ep = crate::netpol::Endpoint {
                host_if: host_if.clone(),
                pod: pod
                    .as_ref()
                    .filter(|p| !p.name.is_empty())
                    .map(|p| margay_policy::PodKey::new(&p.namespace, &p.name)),
                ips: addrs.iter().map(IpNetwork::ip).collect(),
            };
            policy.added(ep, crate::netpol::ADD_WAIT)
        });
        let mut ready = std::pin::pin!(async move {
            match ready {
                Some(r) => r.await,
                None => Ok(()),
            }
        });
        let mut early = None;
        let wire = async {
            let mtu = self.mtu_for(r, &addrs).await;
            let spec = self.spec(r, &w, addrs.clone(), mtu);
            self.dp.add_pod(&spec).await.map(|wiring| (spec, wiring))
        };
        let mut wire = std::pin::pin!(wire);
        let wired = loop {
            // Biased: the engine is told (first poll) before wiring starts.
            tokio::select! {
                biased;
                r = &mut ready, if early.is_none() => early = Some((r, t0.elapsed())),
                r = &mut wire => break r,
            }
        };
        let (spec, wiring) = match wired {
            Ok(w) => w,
            Err(e) => {
                // Nothing may be left: give the addresses back, and the
                // rules.
                if let Some(p) = &self.policy {
                    p.deleted(&host_if);
                }
                if let Err(re) = self.reserve.abort(taken).await {
                    tracing::warn!(%handle, "release after failed ADD: {re} (GC will collect it)");
                }
                return Err(netns_err(&e).unwrap_or_else(|| {
                    err(code::DATAPLANE, format!("wiring the pod failed: {e}"))
                }));
            }
        };
        // The kernel now records the attribution: write it behind.
        self.reserve.commit(&taken, pod.clone());
        self.poke_for(&addrs);
        let wired_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (ruled, rules_at) = match early {
            Some(r) => r,
            None => (ready.await, t0.elapsed()),
        };
        let rules_ms = rules_at.as_secs_f64() * 1e3;
        if let Err(why) = ruled {
            if let Some(p) = &self.policy {
                p.deleted(&host_if);
            }
            if let Err(e) = self.unwire(&w, true).await {
                tracing::warn!(%handle, "undoing the ADD: {}", e.msg);
            }
            let released = self.reserve.release(&handle);
            tracing::warn!(%handle, ?released, "{why}");
            return Err(err(code::TRY_AGAIN, why.to_string()));
        }
        let host_mac = margay_api::stable::mac_string(&HOST_MAC);
        let mut routes = Vec::new();
        let mut ips = Vec::new();
        for a in &addrs {
            let (gw, dst) = match a {
                IpNetwork::V4(_) => (GATEWAY_V4.to_string(), "0.0.0.0/0"),
                IpNetwork::V6(_) => (dataplane::GATEWAY_V6.to_string(), "::/0"),
            };
            ips.push(cni::IpConfig {
                address: a.to_string(),
                gateway: gw.clone(),
                interface: 1,
            });
            routes.push(cni::Route {
                dst: dst.to_string(),
                gw,
            });
        }
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            handle = %handle,
            host_if = %spec.host_if,
            ?addrs,
            ipam_ms,
            wired_ms,
            rules_ms,
            total_ms,
            "pod added"
        );
        Ok(cni::CniResult {
            interfaces: vec![
                cni::Interface {
                    name: spec.host_if.clone(),
                    mac: host_mac,
                    sandbox: String::new(),
                    mtu: spec.mtu,
                },
                cni::Interface {
                    name: r.ifname.clone(),
                    mac: wiring.pod_mac,
                    sandbox: r.netns.clone(),
                    mtu: spec.mtu,
                },
            ],
            ips,
            routes,
        })
    }

    /// CNI DEL: removes this attachment's interface (only when its alias
    /// records this attachment) and releases its addresses; an attachment
    /// that is not there is a success that touches nothing.
    pub async fn del(&self, r: &cni::CniRequest) -> Result<(), cni::CniError> {
        let at = attachment_of(r)?;
        let w = Wired::of(&at);
        let _g = self.lock(&w.handle).await;
        self.unwire(&w, true).await?;
        // The interface (the node's record) is gone: the release is
        // written behind, after any attribution of the handle still queued.
        let released = self.reserve.release(&w.handle);
        // A pod wired by an older version, under its old handle.
        let old = Wired::legacy(&at, r);
        if self.reserve.holding(&old.handle).is_some() {
            let _g = self.lock(&old.handle).await;
            if self.unwire(&old, false).await? {
                let more = self.reserve.release(&old.handle);
                tracing::info!(handle = %old.handle, released = ?more, "pod of an older version deleted");
            }
        }
        tracing::info!(handle = %w.handle, ?released, "pod deleted");
        Ok(())
    }

    /// Addresses IPAM holds for a handle.
    fn held(&self, handle: &str) -> Vec<IpNetwork> {
        // The reserve knows every pod handle of this node, including
        // attributions and releases not written yet.
        let mut v = self.reserve.holding(handle).unwrap_or_default();
        v.sort();
        v
    }

    /// CNI CHECK: the attachment's interface records it and the pod side
    /// holds its addresses.
    pub async fn check(&self, r: &cni::CniRequest) -> Result<(), cni::CniError> {
        let at = attachment_of(r)?;
        need_netns(r)?;
        let mut w = Wired::of(&at);
        let mut addrs = self.held(&w.handle);
        if addrs.is_empty() {
            let old = Wired::legacy(&at, r);
            addrs = self.held(&old.handle);
            w = old;
        }
        if addrs.is_empty() {
            return Err(err(
                code::IPAM,
                format!("no address is allocated to {}", at.handle()),
            ));
        }
        let mtu = self.mtu_for(r, &addrs).await;
        self.dp
            .check_pod(&self.spec(r, &w, addrs, mtu))
            .await
            .map_err(|e| {
                netns_err(&e).unwrap_or_else(|| err(code::DATAPLANE, format!("CHECK failed: {e}")))
            })
    }

    /// CNI STATUS: ready when the datastore answers and a pool can serve
    /// this node.
    pub async fn status(&self) -> Result<(), cni::CniError> {
        let pools = self.store.pools().await.map_err(|e| {
            err(
                code::NOT_AVAILABLE,
                format!("margay-agent cannot read IPPools: {e}"),
            )
        })?;
        let labels = self.store.node_labels(&self.node).await.map_err(|e| {
            err(
                code::NOT_AVAILABLE,
                format!("margay-agent cannot read its Node: {e}"),
            )
        })?;
        let (valid, _) = validate_pools(&pools);
        if !valid
            .iter()
            .any(|p| p.usable(&labels, AllowedUse::Workload))
        {
            return Err(err(
                code::NOT_AVAILABLE,
                format!("no enabled IPPool selects node {}", self.node),
            ));
        }
        Ok(())
    }

    /// CNI GC (spec 1.1): removes this network's attachments on this
    /// node that are not in `cni.dev/valid-attachments` (their host
    /// interfaces and addresses), each under its handle's lock; refused
    /// when the list is missing. Attachments of other networks, and pods
    /// of older versions (whose handles name no network), are left alone.
    /// Returns the handles removed.
    pub async fn gc(&self, g: &cni::GcRequest) -> Result<Vec<String>, cni::CniError> {
        if !g.valid_given {
            return Err(err(
                code::INVALID_CONFIG,
                "GC needs cni.dev/valid-attachments (an empty list means none is valid); nothing was removed",
            ));
        }
        if !margay_api::cni::valid_id(&g.network) {
            let bad = margay_api::cni::BadAttachment::Network(g.network.clone());
            return Err(err(bad.code(), format!("{bad}; nothing was removed")));
        }
        let valid: HashSet<(&str, &str)> = g
            .valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        // What this node holds: the reserve's handles and the interfaces'
        // records (an interface whose addresses were released by force).
        let mut handles: HashSet<String> = self.reserve.handles().into_iter().collect();
        let links = self
            .dp
            .list_pods()
            .await
            .map_err(|e| err(code::TRY_AGAIN, format!("listing pod interfaces: {e}")))?;
        handles.extend(
            links
                .iter()
                .filter_map(|l| alias_owner(&l.alias).map(str::to_string)),
        );
        let mut doomed: Vec<Attachment> = handles
            .iter()
            .filter_map(|h| Attachment::from_handle(h))
            .filter(|a| {
                a.network == g.network
                    && !valid.contains(&(a.container_id.as_str(), a.ifname.as_str()))
            })
            .collect();
        doomed.sort();
        let mut gone = Vec::new();
        for at in doomed {
            let w = Wired::of(&at);
            let _g = self.lock(&w.handle).await;
            self.unwire(&w, false).await?;
            let released = self.reserve.release(&w.handle);
            tracing::info!(handle = %w.handle, ?released, "GC removed an attachment the runtime does not know");
            gone.push(w.handle);
        }
        tracing::info!(network = %g.network, removed = gone.len(), kept = g.valid.len(), "CNI GC done");
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use margay_api::ipam::{IPPool, IPPoolSpec};
    use margay_ipam::{Allocator, MemStore, Options};

    use super::*;
    use crate::dataplane::FakeDataplane;
    use crate::netpol::Heard;

    async fn service() -> (
        CniService<MemStore, FakeDataplane>,
        Arc<MemStore>,
        FakeDataplane,
    ) {
        service_with(0, Arc::new(MemStore::new()), FakeDataplane::default()).await
    }

    /// A service with `depth` spares over `store` and `dp` (pass the same
    /// ones again to play an agent restart).
    async fn service_with(
        depth: usize,
        store: Arc<MemStore>,
        dp: FakeDataplane,
    ) -> (
        CniService<MemStore, FakeDataplane>,
        Arc<MemStore>,
        FakeDataplane,
    ) {
        store.set_pools(vec![IPPool::new(
            "p",
            IPPoolSpec::with_cidr("10.1.0.0/24", Some(26)),
        )]);
        store.add_node("n1", BTreeMap::new());
        let alloc = Allocator::start(store.clone(), "n1", Options::default());
        reconcile::apply("n1", &alloc, &dp).await.unwrap();
        let opts = margay_ipam::ReserveOptions {
            depth,
            ..Default::default()
        };
        let reserve = Reserve::start(alloc.clone(), "n1", opts).await.unwrap();
        let svc = CniService::new("n1", store.clone(), reserve, Arc::new(dp.clone()), 1500);
        (svc, store, dp)
    }

    #[tokio::test]
    async fn routing_is_poked_only_for_addresses_outside_the_known_blocks() {
        let (mut svc, _, _) = service().await;
        let poke = svc.pods_changed();
        let poked = || async {
            tokio::time::timeout(std::time::Duration::from_millis(100), poke.notified())
                .await
                .is_ok()
        };
        // Nothing published yet: every change pokes.
        svc.add(&req("a")).await.unwrap();
        assert!(poked().await);
        // The node's block known: an ADD and a DEL inside it do not.
        let (tx, rx) = tokio::sync::watch::channel(Known::Fresh(Local::blocks(["10.1.0.0/26"
            .parse()
            .unwrap()])));
        svc.follow_local(rx);
        svc.add(&req("b")).await.unwrap();
        svc.del(&req("b")).await.unwrap();
        assert!(!poked().await);
        // A block not published yet (or a borrowed address): poked.
        tx.send_replace(Known::Fresh(Local::blocks(["10.1.0.64/26"
            .parse()
            .unwrap()])));
        svc.add(&req("c")).await.unwrap();
        assert!(poked().await);
        svc.del(&req("c")).await.unwrap();
        assert!(poked().await);
    }

    /// A client whose reads fail at once (nothing listens there).
    fn nowhere() -> kube::Client {
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap()
    }

    /// A service telling a policy "engine" the test plays.
    async fn policed() -> (
        Arc<CniService<MemStore, FakeDataplane>>,
        crate::netpol::PolicyInbox,
        FakeDataplane,
    ) {
        let (mut svc, _, dp) = service().await;
        let (handle, inbox) = crate::netpol::PolicyHandle::new(nowhere());
        svc.enforce_policy(handle);
        (Arc::new(svc), inbox, dp)
    }

    const SOON: std::time::Duration = std::time::Duration::from_secs(5);

    type AddTask = tokio::task::JoinHandle<Result<cni::CniResult, cni::CniError>>;

    /// An ADD of `id` running on its own, and the registration the
    /// engine gets from it.
    #[allow(clippy::disallowed_methods)] // the test joins it
    async fn add_registered(
        svc: &Arc<CniService<MemStore, FakeDataplane>>,
        inbox: &mut crate::netpol::PolicyInbox,
        id: &str,
    ) -> (
        AddTask,
        crate::netpol::Endpoint,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let add = tokio::spawn({
            let (svc, r) = (svc.clone(), req(id));
            async move { svc.add(&r).await }
        });
        match tokio::time::timeout(SOON, inbox.next()).await {
            Ok(Some(Heard::Added(ep, answer))) => (add, ep, answer),
            other => panic!("no registration: {other:?}"),
        }
    }

    async fn succeeds(add: AddTask) -> cni::CniResult {
        tokio::time::timeout(SOON, add)
            .await
            .expect("in time")
            .expect("ran")
            .expect("succeeded")
    }

    #[tokio::test]
    async fn an_add_has_its_rules_made_while_the_pod_is_wired() {
        let (svc, mut inbox, dp) = policed().await;
        let hold = dp.add_hold.clone().lock_owned().await;
        // The engine hears of the pod, with its interface and addresses,
        // while the wiring is still held.
        let (add, ep, answer) = add_registered(&svc, &mut inbox, "a").await;
        assert_eq!(ep.pod.unwrap().to_string(), "ns/pod-a");
        assert_eq!(ep.host_if, svc.spec_name("a", "eth0"));
        assert_eq!(ep.ips.len(), 1);
        assert!(dp.pods.lock().unwrap().is_empty());
        // Its rules in first: the ADD ends as soon as it is wired.
        answer.send(()).unwrap();
        drop(hold);
        assert_eq!(succeeds(add).await.ips.len(), 1);
        assert!(dp.pods.lock().unwrap().contains_key(&ep.host_if));
    }

    #[tokio::test]
    async fn an_add_wired_first_waits_for_its_rules() {
        let (svc, mut inbox, dp) = policed().await;
        let (add, ep, answer) = add_registered(&svc, &mut inbox, "a").await;
        tokio::time::timeout(SOON, async {
            while !dp.pods.lock().unwrap().contains_key(&ep.host_if) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!add.is_finished(), "answered before its rules were in");
        answer.send(()).unwrap();
        succeeds(add).await;
    }

    /// An engine that knows the Pod answers without the ADD reading it
    /// from the API (it drops its "unknown" signal unsent; a dropped
    /// signal once sent every ADD to the API first).
    #[tokio::test]
    async fn an_add_whose_pod_the_engine_knows_reads_nothing() {
        let (svc, mut inbox, _) = policed().await;
        for id in ["a", "b", "c"] {
            let (add, _, answer) = add_registered(&svc, &mut inbox, id).await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            answer.send(()).unwrap();
            succeeds(add).await;
            match inbox.try_next() {
                None => {}
                Some(Heard::Read(k)) => panic!("the ADD read Pod {k} from the API"),
                Some(h) => panic!("{h:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_failed_wiring_takes_its_rules_back() {
        let (svc, mut inbox, dp) = policed().await;
        *dp.fail_next_add.lock().unwrap() = Some("no veth".into());
        // Fails at once: it does not wait for the rules of a pod that
        // will not be.
        let e = tokio::time::timeout(SOON, svc.add(&req("a")))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.msg.contains("no veth"), "{}", e.msg);
        let host_if = svc.spec_name("a", "eth0");
        let Some(Heard::Added(ep, _answer)) = inbox.next().await else {
            panic!("no registration");
        };
        assert_eq!(ep.host_if, host_if);
        assert!(matches!(inbox.next().await, Some(Heard::Deleted(i)) if i == host_if));
        // And the addresses came back: the next ADD gets the same one.
        let (add, again, answer) = add_registered(&svc, &mut inbox, "b").await;
        assert_eq!(again.ips, ep.ips);
        answer.send(()).unwrap();
        succeeds(add).await;
    }

    const NET: &str = "k8s-pod-network";

    fn h(id: &str) -> String {
        format!("{NET}/{id}/eth0")
    }

    fn req(id: &str) -> cni::CniRequest {
        cni::CniRequest {
            cni_version: "1.0.0".into(),
            container_id: id.into(),
            // Any namespace path that exists will do for the fake.
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            network: NET.into(),
            pod: Some(cni::PodRef {
                namespace: "ns".into(),
                name: format!("pod-{id}"),
                uid: "u".into(),
            }),
            ..Default::default()
        }
    }

    impl CniService<MemStore, FakeDataplane> {
        fn spec_name(&self, id: &str, ifname: &str) -> String {
            Wired::of(&Attachment::new(NET, id, ifname).unwrap()).host_if
        }
    }

    fn held(store: &MemStore) -> usize {
        store.snapshot().iter().map(|b| b.allocations.len()).sum()
    }

    #[tokio::test]
    async fn a_failed_wiring_leaves_no_address() {
        let (svc, store, dp) = service().await;
        *dp.fail_next_add.lock().unwrap() = Some("injected".into());
        let e = svc.add(&req("a")).await.unwrap_err();
        assert_eq!(e.code, code::DATAPLANE);
        assert_eq!(held(&store), 0);
        assert!(dp.pods.lock().unwrap().is_empty());
        // The retry works and gets a pod-side MTU from the request or the
        // agent's default.
        let mut r = req("a");
        r.mtu = 1400;
        let res = svc.add(&r).await.unwrap();
        assert_eq!(res.ips[0].gateway, "169.254.1.1");
        assert_eq!(res.ips[0].interface, 1);
        assert_eq!(res.interfaces[1].sandbox, "/proc/self/ns/net");
        assert_eq!(res.interfaces[0].mtu, 1400);
        assert_eq!(res.routes[0].dst, "0.0.0.0/0");
        assert_eq!(held(&store), 1);
    }

    #[tokio::test]
    async fn missing_netns_and_bad_requests() {
        let (svc, store, _) = service().await;
        let mut r = req("a");
        r.netns = "/run/netns/none-such".into();
        assert_eq!(svc.add(&r).await.unwrap_err().code, code::UNKNOWN_CONTAINER);
        let mut r = req("a");
        r.ifname = "a-very-long-interface".into();
        assert_eq!(svc.add(&r).await.unwrap_err().code, code::INVALID_ENV);
        let mut r = req("a");
        r.network.clear();
        assert_eq!(svc.add(&r).await.unwrap_err().code, code::INVALID_CONFIG);
        let mut r = req("a");
        r.container_id = "-a".into();
        assert_eq!(svc.add(&r).await.unwrap_err().code, code::INVALID_ENV);
        assert_eq!(held(&store), 0);
    }

    #[tokio::test]
    async fn a_namespace_the_dataplane_refuses_takes_no_address() {
        let (svc, store, dp) = service().await;
        let r = req("a");
        dp.refused_netns
            .lock()
            .unwrap()
            .insert(PathBuf::from(&r.netns));
        assert_eq!(svc.add(&r).await.unwrap_err().code, code::INVALID_ENV);
        svc.reserve.flush().await;
        assert_eq!(held(&store), 0);
        assert!(dp.pods.lock().unwrap().is_empty());
    }

    fn with(id: &str, ifname: &str, pod: &str) -> cni::CniRequest {
        let mut r = req(id);
        r.ifname = ifname.into();
        r.pod.as_mut().unwrap().name = pod.into();
        r
    }

    #[tokio::test]
    async fn each_call_acts_on_its_own_attachment_only() {
        let (svc, _, dp) = service().await;
        // A pod recreated: the new sandbox c2 is added while c1's DEL is
        // still to come; c1's DEL leaves c2 alone.
        svc.add(&with("c1", "eth0", "web-0")).await.unwrap();
        svc.add(&with("c2", "eth0", "web-0")).await.unwrap();
        assert_eq!(dp.pods.lock().unwrap().len(), 2);
        svc.del(&with("c1", "eth0", "web-0")).await.unwrap();
        svc.check(&with("c2", "eth0", "web-0")).await.unwrap();
        assert_eq!(dp.pods.lock().unwrap().len(), 1);
        // A second interface of one container (Multus) is its own.
        let a = svc.add(&with("c2", "net1", "web-0")).await.unwrap();
        svc.check(&with("c2", "eth0", "web-0")).await.unwrap();
        svc.check(&with("c2", "net1", "web-0")).await.unwrap();
        assert_ne!(a.interfaces[0].name, svc.spec_name("c2", "eth0"));
        // IDs whose old handles collided get two addresses.
        let x = svc.add(&with("a.b", "c", "x")).await.unwrap();
        let y = svc.add(&with("a", "b.c", "y")).await.unwrap();
        assert_ne!(x.ips[0].address, y.ips[0].address);
        assert_ne!(x.interfaces[0].name, y.interfaces[0].name);
        // DEL of one that is not there touches nothing.
        let before = dp.pods.lock().unwrap().len();
        svc.del(&with("zz", "eth0", "web-0")).await.unwrap();
        assert_eq!(dp.pods.lock().unwrap().len(), before);
    }

    #[tokio::test]
    async fn gc_needs_the_list_and_keeps_to_its_network() {
        let (svc, store, dp) = service().await;
        svc.add(&req("a")).await.unwrap();
        let mut other = req("o");
        other.network = "other-net".into();
        svc.add(&other).await.unwrap();
        let gc = |network: &str, given: bool| cni::GcRequest {
            network: network.into(),
            valid: vec![],
            valid_given: given,
            ..Default::default()
        };
        let e = svc.gc(&gc(NET, false)).await.unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert_eq!(dp.pods.lock().unwrap().len(), 2);
        let gone = svc.gc(&gc(NET, true)).await.unwrap();
        assert_eq!(gone, vec![h("a")]);
        svc.reserve.flush().await;
        assert_eq!(held(&store), 1);
        svc.check(&other).await.unwrap();
        // A valid attachment is kept.
        let mut keep = gc("other-net", true);
        keep.valid.push(cni::Attachment {
            container_id: "o".into(),
            ifname: "eth0".into(),
        });
        assert!(svc.gc(&keep).await.unwrap().is_empty());
        svc.check(&other).await.unwrap();
    }

    #[tokio::test]
    async fn a_pod_of_an_older_version_is_found_checked_and_deleted() {
        let (svc, store, dp) = service().await;
        // Wired as before: handle "c1.eth0", interface named after the pod.
        let r = with("c1", "eth0", "web-0");
        let old = Wired::legacy(&attachment_of(&r).unwrap(), &r);
        let taken = svc
            .reserve
            .take(&Assign {
                handle: old.handle.clone(),
                pod: pod_of(&r),
                use_: AllowedUse::Workload,
            })
            .await
            .unwrap();
        let addrs = taken.addrs.clone();
        svc.reserve.commit(&taken, pod_of(&r));
        dp.add_pod(&svc.spec(&r, &old, addrs, 1500)).await.unwrap();
        svc.check(&r).await.unwrap();
        // A new sandbox of the same pod does not disturb it.
        svc.add(&with("c2", "eth0", "web-0")).await.unwrap();
        svc.check(&r).await.unwrap();
        svc.del(&r).await.unwrap();
        assert!(!dp.pods.lock().unwrap().contains_key(&old.host_if));
        svc.check(&with("c2", "eth0", "web-0")).await.unwrap();
        svc.reserve.flush().await;
        assert_eq!(held(&store), 1);
    }

    #[tokio::test]
    async fn del_is_idempotent_check_verifies_gc_collects() {
        let (svc, store, dp) = service().await;
        svc.add(&req("a")).await.unwrap();
        svc.add(&req("b")).await.unwrap();
        svc.check(&req("a")).await.unwrap();
        let mut del = req("a");
        del.netns.clear();
        svc.del(&del).await.unwrap();
        svc.del(&del).await.unwrap();
        assert_eq!(svc.check(&req("a")).await.unwrap_err().code, code::IPAM);
        svc.reserve.flush().await;
        assert_eq!(held(&store), 1);
        // GC with no valid attachments removes "b" too.
        let gone = svc
            .gc(&cni::GcRequest {
                network: NET.into(),
                valid: vec![],
                valid_given: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(gone, vec![h("b")]);
        svc.reserve.flush().await;
        assert_eq!(held(&store), 0);
        assert!(dp.pods.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn status_says_why_not_ready() {
        let (svc, store, _) = service().await;
        svc.status().await.unwrap();
        store.set_pools(vec![]);
        let e = svc.status().await.unwrap_err();
        assert_eq!(e.code, code::NOT_AVAILABLE);
        assert!(
            e.msg.contains("no enabled IPPool selects node n1"),
            "{}",
            e.msg
        );
    }

    /// handle -> addresses in the store.
    fn by_handle(store: &MemStore) -> BTreeMap<String, Vec<std::net::IpAddr>> {
        let mut out: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
        for b in store.snapshot() {
            for (ip, a) in &b.allocations {
                out.entry(a.handle.clone()).or_default().push(*ip);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_crash_before_the_write_behind_loses_nothing() {
        let store = Arc::new(MemStore::new());
        let dp = FakeDataplane::default();
        let (svc, _, _) = service_with(4, store.clone(), dp.clone()).await;
        while svc.reserve.stats().spares < 4 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The store stops taking writes: ADDs answer anyway, from spares,
        // and record their handle on the host interface.
        for _ in 0..64 {
            store.inject(margay_ipam::store::Fault::Unavailable);
        }
        let a = svc.add(&req("a")).await.unwrap();
        let b = svc.add(&req("b")).await.unwrap();
        assert_ne!(a.ips[0].address, b.ips[0].address);
        let aliases: Vec<String> = dp
            .pods
            .lock()
            .unwrap()
            .values()
            .map(|p| p.alias.clone())
            .collect();
        assert!(
            aliases
                .iter()
                .any(|al| al.starts_with(&format!("margay1 {} ", h("a")))),
            "{aliases:?}"
        );
        assert!(!by_handle(&store).contains_key(&h("a")), "written already");
        // Delete b (its release is not written either), then the agent dies.
        svc.del(&req("b")).await.unwrap();
        svc.reserve.halt();
        drop(svc);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        store.clear_faults();

        // Restart: reconciliation writes a's attribution from the kernel
        // and gives b's address back (b's spare is in the store, b's
        // interface is gone, nothing says b holds it: it stays a spare).
        let (svc2, _, _) = service_with(4, store.clone(), dp.clone()).await;
        let held = by_handle(&store);
        let a_ip: std::net::IpAddr = a.ips[0].address.trim_end_matches("/32").parse().unwrap();
        assert_eq!(held[&h("a")], vec![a_ip]);
        assert!(!held.contains_key(&h("b")));
        let rec = store
            .snapshot()
            .iter()
            .flat_map(|b| b.allocations.values().cloned().collect::<Vec<_>>())
            .find(|r| r.handle == h("a"))
            .unwrap();
        assert_eq!(rec.pod.unwrap().name, "pod-a");
        // Every address is held once; a retried ADD of a gets a's address.
        let again = svc2.add(&req("a")).await.unwrap();
        assert_eq!(again.ips[0].address, a.ips[0].address);
        let all: Vec<_> = by_handle(&store).into_values().flatten().collect();
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(all.len(), dedup.len());
    }

    #[tokio::test]
    async fn pod_mtu_leaves_room_for_the_pools_encapsulation() {
        let (svc, store, dp) = service().await;
        let mut spec = IPPoolSpec::with_cidr("10.1.0.0/24", Some(26));
        spec.encapsulation = margay_api::ipam::Encapsulation::Vxlan;
        store.set_pools(vec![IPPool::new("p", spec)]);
        let res = svc.add(&req("v")).await.unwrap();
        assert_eq!(res.interfaces[0].mtu, 1450);
        let host_if = res.interfaces[0].name.clone();
        assert_eq!(dp.pods.lock().unwrap()[&host_if].mtu, 1450);
        svc.check(&req("v")).await.unwrap();
    }
}
