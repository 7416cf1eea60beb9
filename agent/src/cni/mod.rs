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
//! - `plan.rs`: the ADD as a pure plan (what to tell the policy engine,
//!   whether the node must forward IPv6, what to wire, the CNI result),
//!   which [`CniService::add`] applies;
//! - [`server`]: the gRPC server on the unix socket (root callers only);
//! - [`alias`]: the attribution record on each pod's host interface;
//! - [`reconcile`]: start-up agreement of the kernel and IPAM.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;
use margay_api::cni::Attachment;
use margay_api::ipam::{AllowedUse, IPPool, PodRef};
use margay_ipam::model::validate_pools;
use margay_ipam::{Assign, Reserve, Store};
use margay_proto::cni;

use crate::dataplane::ownership::{alias_owner, host_ifname};
use crate::dataplane::routed::Local;
use crate::dataplane::{self, Dataplane};
use crate::kube::Known;

pub mod alias;
mod plan;
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
        plan::mtu(self.mtu, self.pools().await.as_deref(), addrs)
    }

    /// The pools, read with a bound: with spares an ADD needs no
    /// datastore, and must not start waiting for one here; the last pools
    /// seen serve meanwhile (none: none were ever read).
    async fn pools(&self) -> Option<Vec<IPPool>> {
        let fresh =
            tokio::time::timeout(std::time::Duration::from_millis(300), self.store.pools()).await;
        match fresh {
            Ok(Ok(p)) => {
                *self.last_pools.lock().expect("pools") = Some(p.clone());
                Some(p)
            }
            _ => self.last_pools.lock().expect("pools").clone(),
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

    /// CNI ADD: its inputs read first (the attachment, its namespace,
    /// opened once and wired into, its addresses), then its plan
    /// ([`plan::AddPlan`]) applied.
    pub async fn add(&self, r: &cni::CniRequest) -> Result<cni::CniResult, cni::CniError> {
        let at = attachment_of(r)?;
        need_netns(r)?;
        let netns = self
            .dp
            .pod_netns(std::path::Path::new(&r.netns))
            .await
            .map_err(|e| netns_err(&e).unwrap_or_else(|| err(code::DATAPLANE, e.to_string())))?;
        let w = Wired::of(&at);
        let _g = self.lock(&w.handle).await;
        let pod = pod_of(r);
        let t0 = std::time::Instant::now();
        let taken = self
            .reserve
            .take(&Assign {
                handle: w.handle.clone(),
                pod: pod.clone(),
                use_: AllowedUse::Workload,
            })
            .await
            .map_err(|e| ipam_err(&e))?;
        margay_task::crash::point("add.taken");
        let ipam_ms = t0.elapsed().as_secs_f64() * 1e3;
        let plan = plan::AddPlan::new(r, w, pod, taken.addrs.clone(), self.policy.is_some());
        let (result, wired_ms, rules_ms) = self.apply_add(r, &plan, taken, &netns, t0).await?;
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            handle = %plan.wired.handle,
            pod = plan.pod.as_ref().map(tracing::field::display),
            host_if = %plan.wired.host_if,
            addrs = ?plan.addrs,
            ipam_ms,
            wired_ms,
            rules_ms,
            total_ms,
            "pod added"
        );
        Ok(result)
    }

    /// Applies ADD `plan` (its addresses `taken`, its namespace `netns`):
    /// the engine told, the pod wired, the addresses committed, the rules
    /// waited for; any failure undoes what was done (the addresses given
    /// back, the rules and the wiring taken back). The result, and when
    /// the pod was wired and its rules were in (ms since `t0`).
    async fn apply_add(
        &self,
        r: &cni::CniRequest,
        plan: &plan::AddPlan,
        taken: margay_ipam::reserve::Taken,
        netns: &D::Netns,
        t0: std::time::Instant,
    ) -> Result<(cni::CniResult, f64, f64), cni::CniError> {
        let (handle, host_if) = (&plan.wired.handle, &plan.wired.host_if);
        // No window: the pod is not answered for before its rules are in.
        // The engine is told now, with the addresses, and programs the
        // rules (matching the interface by name, before it exists) while
        // the pod is wired: the ADD waits for whichever ends last.
        let ready = match (&self.policy, &plan.endpoint) {
            (Some(policy), Some(ep)) => Some(policy.added(ep.clone(), crate::netpol::ADD_WAIT)),
            _ => None,
        };
        let mut ready = std::pin::pin!(async move {
            match ready {
                Some(r) => r.await,
                None => Ok(()),
            }
        });
        let mut early = None;
        let wire = async {
            let mtu = self.mtu_for(r, &plan.addrs).await;
            let spec = plan.spec(mtu);
            if plan.forward_ipv6 {
                self.dp.forward_ipv6().await?;
            }
            self.dp
                .add_pod_in(&spec, netns)
                .await
                .map(|wiring| (spec, wiring))
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
                    p.deleted(host_if);
                }
                if let Err(re) = self.reserve.abort(taken).await {
                    tracing::warn!(%handle, "release after failed ADD: {re} (GC will collect it)");
                }
                return Err(netns_err(&e).unwrap_or_else(|| {
                    err(code::DATAPLANE, format!("wiring the pod failed: {e}"))
                }));
            }
        };
        margay_task::crash::point("add.wired");
        // The kernel now records the attribution: write it behind.
        self.reserve.commit(&taken, plan.pod.clone());
        margay_task::crash::point("add.committed");
        self.poke_for(&plan.addrs);
        let wired_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (ruled, rules_at) = match early {
            Some(r) => r,
            None => (ready.await, t0.elapsed()),
        };
        if let Err(why) = ruled {
            if let Some(p) = &self.policy {
                p.deleted(host_if);
            }
            if let Err(e) = self.unwire(&plan.wired, true).await {
                tracing::warn!(%handle, "undoing the ADD: {}", e.msg);
            }
            let released = self.reserve.release(handle);
            tracing::warn!(%handle, ?released, "{why}");
            return Err(err(code::TRY_AGAIN, why.to_string()));
        }
        let rules_ms = rules_at.as_secs_f64() * 1e3;
        Ok((plan.result(&spec, wiring.pod_mac), wired_ms, rules_ms))
    }

    /// CNI DEL: removes this attachment's interface (only when its alias
    /// records this attachment) and releases its addresses; an attachment
    /// that is not there is a success that touches nothing.
    pub async fn del(&self, r: &cni::CniRequest) -> Result<(), cni::CniError> {
        let at = attachment_of(r)?;
        let w = Wired::of(&at);
        let _g = self.lock(&w.handle).await;
        self.unwire(&w, true).await?;
        margay_task::crash::point("del.unwired");
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
            .check_pod(&plan::pod_spec(r, &w, addrs, mtu))
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
mod tests;
