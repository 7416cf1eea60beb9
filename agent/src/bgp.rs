//! The routing loop: watches Nodes, [`BGPConfiguration`] and [`BGPPeer`]s
//! (reflectors), IPPools (a watch that wakes the loop) and this node's blocks; publishes this node's BGP
//! identity on its Node; runs the embedded speaker (`margay-bgp` as a
//! library, kernel writes off: the agent programs routes itself, per the
//! pool's encapsulation); reports problems as the Node condition
//! [`CONDITION`] and BGP objects' `Valid` condition.
//!
//! Each pass computes everything from scratch with the pure functions in
//! [`crate::routing`] and [`crate::remote`], then applies only what
//! changed. After a (re)start nothing is removed from the kernel until BGP
//! has relearned every peer's table (or [`PRUNE_GRACE`] passed), so pods'
//! traffic keeps flowing through an agent restart.
//!
//! [`BGPConfiguration`]: crate::bgp_crd::BGPConfiguration
//! [`BGPPeer`]: crate::bgp_crd::BGPPeer

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use margay_bgp::packet::Prefix;
use margay_bgp::speaker::Speaker;
use margay_ipam::crd::{AllowedUse, Condition, Encapsulation};
use margay_ipam::model::validate_pools;
use margay_ipam::{Allocator, Assign, Store as _};
use tokio::sync::{Notify, watch};

use crate::bgp_crd::{BGP_CONFIG_NAME, BGPConfiguration, BGPPeer, validate_peer};
use crate::dataplane::{LocalVtep, Netlink};
use crate::http::AgentState;
use crate::kube_store::KubeStore;
use crate::remote::VXLAN_OVERHEAD;
use crate::routing::{
    NodeInfo, Settings, identity_annotations, neighbors, remote_blocks, vtep_mac,
};

/// The Node condition the agent maintains.
pub const CONDITION: &str = "MargayReady";
/// How often the Node condition's heartbeat is renewed even when nothing
/// changed (`margayctl` reads an older heartbeat as "agent not running").
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// Longest wait after a start before routes BGP has not relearned are
/// removed from the kernel.
pub const PRUNE_GRACE: Duration = Duration::from_secs(90);

/// What the routing loop needs.
pub struct RoutingCtx {
    /// This node.
    pub node: String,
    /// The API client.
    pub client: Client,
    /// IPAM's store (pools).
    pub store: Arc<KubeStore>,
    /// IPAM (the VXLAN tunnel address).
    pub alloc: Allocator,
    /// The kernel.
    pub dp: Arc<Netlink>,
    /// This node's blocks, from [`crate::blocks::run`].
    pub own_blocks: watch::Receiver<BTreeSet<IpNetwork>>,
    /// Shared status.
    pub state: Arc<AgentState>,
    /// `--node-ip`: the BGP address (`autodetect` or an address, optionally with its prefix length).
    pub node_ip: String,
    /// Namespace of BGP password Secrets.
    pub namespace: String,
    /// Underlay MTU.
    pub mtu: u32,
    /// Resync period.
    pub every: Duration,
    /// Run the BGP speaker and program remote routes (off: identity and
    /// conditions only, for clusters routed by something else).
    pub bgp: bool,
}

impl std::fmt::Debug for RoutingCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingCtx")
            .field("node", &self.node)
            .field("node_ip", &self.node_ip)
            .field("bgp", &self.bgp)
            .finish_non_exhaustive()
    }
}

fn reflect<K>(api: Api<K>, poke: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let what = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("?");
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        let mut warned: Option<Instant> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                // The watcher retries with back-off; say so once a minute
                // (e.g. a CRD not installed, or RBAC missing).
                Err(e) if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) => {
                    tracing::warn!("cannot watch {what}s (retrying): {e}");
                    warned = Some(Instant::now());
                }
                Err(_) => {}
                Ok(_) => poke.notify_one(),
            }
        }
    });
    reader
}

type SpeakerKey = (u32, Ipv4Addr, u16, u16, Vec<String>, Option<Ipv4Addr>);

struct Routing {
    ctx: RoutingCtx,
    nodes: Store<Node>,
    peers: Store<BGPPeer>,
    configs: Store<BGPConfiguration>,
    speaker: Option<(SpeakerKey, Arc<Speaker>)>,
    tunnel_ip: Option<Ipv4Addr>,
    started: Instant,
}

/// Runs until the process ends.
pub async fn run(ctx: RoutingCtx) {
    let poke = Arc::new(Notify::new());
    let nodes = reflect::<Node>(Api::all(ctx.client.clone()), poke.clone());
    let peers = reflect::<BGPPeer>(Api::all(ctx.client.clone()), poke.clone());
    let configs = reflect::<BGPConfiguration>(Api::all(ctx.client.clone()), poke.clone());
    // Pools are read through IPAM's store; their watch only wakes the loop
    // (an encapsulation change applies at once).
    let _pools = reflect::<margay_ipam::crd::IPPool>(Api::all(ctx.client.clone()), poke.clone());
    for (what, ready) in [
        ("Nodes", nodes.wait_until_ready().boxed()),
        ("BGPPeers", peers.wait_until_ready().boxed()),
        ("BGPConfigurations", configs.wait_until_ready().boxed()),
    ] {
        if tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .is_err()
        {
            tracing::warn!("{what} not listed within 30 s; routing starts without them");
        }
    }
    let mut own = ctx.own_blocks.clone();
    let every = ctx.every;
    let mut r = Routing {
        ctx,
        nodes,
        peers,
        configs,
        speaker: None,
        tunnel_ip: None,
        started: Instant::now(),
    };
    let mut why = "start";
    loop {
        let t = Instant::now();
        r.pass().await;
        tracing::debug!(why, took = ?t.elapsed(), "routing pass");
        let (mut learned, mut synced) = match &r.speaker {
            Some((_, s)) => (Some(s.learned()), Some(s.synced())),
            None => (None, None),
        };
        why = tokio::select! {
            _ = poke.notified() => "watch",
            _ = own.changed() => "own blocks",
            _ = changed(&mut learned) => "learned routes",
            _ = changed(&mut synced) => "BGP sync",
            _ = tokio::time::sleep(every) => "resync",
        };
        // Let a burst of events settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Whether a Node condition's heartbeat is more recent than `within`.
pub fn heartbeat_within(c: &k8s_openapi::api::core::v1::NodeCondition, within: Duration) -> bool {
    c.last_heartbeat_time.as_ref().is_some_and(|t| {
        let age = jiff::Timestamp::now().duration_since(t.0);
        age < jiff::SignedDuration::from_secs(within.as_secs() as i64)
    })
}

/// The node's BGP address: `--node-ip` (with or without a prefix length),
/// else the Node's InternalIP, else the first global IPv4 address; the
/// prefix length is taken from the interface holding the address.
pub fn choose_address(
    flag: &str,
    node: Option<&Node>,
    host: &[(String, IpNetwork)],
) -> Result<IpNetwork, String> {
    let on_host = |ip: IpAddr| host.iter().find(|(_, n)| n.ip() == ip).map(|(_, n)| *n);
    if flag != "autodetect" && !flag.is_empty() {
        if let Ok(n) = flag.parse::<IpNetwork>()
            && flag.contains('/')
        {
            return Ok(n);
        }
        let ip: IpAddr = flag
            .parse()
            .map_err(|_| format!("--node-ip {flag:?} is neither an address nor autodetect"))?;
        return Ok(on_host(ip).unwrap_or_else(|| IpNetwork::from(ip)));
    }
    let internal = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find_map(on_host);
    if let Some(n) = internal {
        return Ok(n);
    }
    host.iter()
        .map(|(_, n)| *n)
        .find(IpNetwork::is_ipv4)
        .ok_or_else(|| "no global IPv4 address on this host; set --node-ip".to_string())
}

/// The `Valid` condition for a validation result, keeping the transition
/// time when the status did not change.
fn valid_condition(res: &Result<(), String>, old: Option<&Condition>) -> Condition {
    let (status, reason, message) = match res {
        Ok(()) => ("True", "Valid", "in use".to_string()),
        Err(e) => ("False", "Invalid", e.clone()),
    };
    let time = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Some(margay_ipam::now_rfc3339()),
    };
    Condition {
        type_: "Valid".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: time,
    }
}

fn same(a: &Condition, b: Option<&Condition>) -> bool {
    b.is_some_and(|b| a.status == b.status && a.reason == b.reason && a.message == b.message)
}

impl Routing {
    async fn pass(&mut self) {
        let mut problems = Vec::new();
        let mut datastore_ok = true;
        let node = self.ctx.node.clone();
        let all_nodes: Vec<Arc<Node>> = self.nodes.state();
        let me_obj = all_nodes.iter().find(|n| n.name_any() == node).cloned();
        if me_obj.is_none() {
            problems.push(format!("Node {node} not found in the API"));
        }

        // Cluster settings and their validity.
        let cfg_obj = self
            .configs
            .state()
            .into_iter()
            .find(|c| c.name_any() == BGP_CONFIG_NAME);
        let (settings, invalid) = Settings::from_spec(cfg_obj.as_ref().map(|c| &c.spec));
        if let Some(why) = &invalid {
            problems.push(format!(
                "BGPConfiguration {BGP_CONFIG_NAME} ignored (defaults used): {why}"
            ));
        }
        let mut cfg_reports = Vec::new();
        if let Some(c) = &cfg_obj {
            let valid = invalid.clone().map_or(Ok(()), Err);
            cfg_reports.push((c.name_any(), valid, c.status.clone()));
        }
        self.report_valid::<BGPConfiguration>(cfg_reports).await;
        let peer_objs = self.peers.state();
        let named: Vec<(String, crate::bgp_crd::BGPPeerSpec)> = peer_objs
            .iter()
            .map(|p| (p.name_any(), p.spec.clone()))
            .collect();
        self.report_valid::<BGPPeer>(
            peer_objs
                .iter()
                .map(|p| (p.name_any(), validate_peer(&p.spec), p.status.clone()))
                .collect(),
        )
        .await;

        // Pools.
        let pools = match self.ctx.store.pools().await {
            Ok(p) => validate_pools(&p).0,
            Err(e) => {
                datastore_ok = false;
                problems.push(format!("cannot read IPPools: {e}"));
                Vec::new()
            }
        };

        // This node's address and identity.
        let host = self.ctx.dp.host_addresses().await.unwrap_or_default();
        let address = match choose_address(&self.ctx.node_ip, me_obj.as_deref(), &host) {
            Ok(a) => Some(a),
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let vxlan = pools.iter().any(|p| {
            matches!(
                p.encapsulation,
                Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
            )
        });
        if vxlan && self.tunnel_ip.is_none() {
            let handle = format!("tunnel.vxlan.{node}");
            match self
                .ctx
                .alloc
                .assign(Assign {
                    handle,
                    pod: None,
                    use_: AllowedUse::Tunnel,
                })
                .await
            {
                Ok(addrs) => {
                    self.tunnel_ip = addrs.iter().find_map(|a| match a.ip() {
                        IpAddr::V4(v4) => Some(v4),
                        IpAddr::V6(_) => None,
                    });
                }
                Err(e) => problems.push(format!("no VXLAN tunnel address: {e}")),
            }
        }
        let local_vtep = match (self.tunnel_ip, address.map(|a| a.ip())) {
            (Some(tunnel_ip), Some(IpAddr::V4(underlay))) if vxlan => Some(LocalVtep {
                mac: vtep_mac(&node),
                tunnel_ip,
                underlay,
                mtu: self.ctx.mtu - VXLAN_OVERHEAD,
            }),
            _ => None,
        };
        // Name, labels and reflector role from our Node; the rest is what
        // this agent found (its annotations may lag behind).
        let me = NodeInfo {
            name: node.clone(),
            address,
            asn: Some(settings.asn),
            vtep: local_vtep.map(|l| crate::remote::Vtep {
                mac: l.mac,
                tunnel_ip: l.tunnel_ip,
            }),
            ..me_obj
                .as_deref()
                .map(NodeInfo::from_node)
                .unwrap_or_default()
        };
        if let (Some(obj), Some(addr)) = (&me_obj, address)
            && let Err(e) = self
                .publish_identity(obj, addr, settings.asn, me.vtep)
                .await
        {
            datastore_ok = false;
            problems.push(format!("cannot publish this node's BGP identity: {e}"));
        }

        // The speaker.
        let others: Vec<NodeInfo> = all_nodes.iter().map(|n| NodeInfo::from_node(n)).collect();
        let passwords = self.passwords(&named).await;
        let sessions = neighbors(&me, &others, &settings, &named, &passwords);
        problems.extend(sessions.problems.iter().cloned());
        let own = self.ctx.own_blocks.borrow().clone();
        let mut advertised: Vec<Prefix> = own
            .iter()
            .chain(settings.prefixes.iter())
            .filter_map(|n| Prefix::new(n.network(), n.prefix()))
            .collect();
        advertised.sort();
        advertised.dedup();
        let import: Vec<Prefix> = pools
            .iter()
            .filter_map(|p| Prefix::new(p.cidr.network(), p.cidr.prefix()))
            .collect();
        let mut synced = false;
        let mut remote_routes = 0;
        if !self.ctx.bgp {
            synced = true;
        } else if let Some(IpAddr::V4(router_id)) = address.map(|a| a.ip()) {
            let key: SpeakerKey = (
                settings.asn,
                router_id,
                settings.port,
                settings.restart_time,
                settings.communities.clone(),
                me.rr_cluster_id,
            );
            if let Err(e) = self.ensure_speaker(key).await {
                problems.push(format!("BGP speaker: {e}"));
            }
            if let Some((_, sp)) = &self.speaker {
                if let Err(e) = sp.set_neighbors(sessions.neighbors.clone()).await {
                    problems.push(format!("BGP neighbors: {e}"));
                }
                let _ = sp.set_import(import).await;
                let _ = sp.set_originate(advertised.clone()).await;
                // A round trip through the RIB task: what `synced` says
                // now reflects the neighbors just set.
                let _ = sp.show("neighbors").await;
                synced = *sp.synced().borrow();
                let learned = sp.learned().borrow().clone();
                let blocks = remote_blocks(&learned, &others, &pools, &own);
                let (desired, errors) = crate::remote::plan(&blocks, address);
                problems.extend(errors.iter().map(ToString::to_string));
                remote_routes = desired.routes.len();
                let prune = (synced && datastore_ok) || self.started.elapsed() > PRUNE_GRACE;
                if let Err(e) = self
                    .ctx
                    .dp
                    .apply_remote(local_vtep.as_ref(), &desired, prune)
                    .await
                {
                    problems.push(format!("routes to other nodes' blocks: {e}"));
                }
            }
        } else if address.is_some() {
            problems.push("BGP needs an IPv4 node address (the router ID)".to_string());
        }

        if let Some(obj) = &me_obj
            && let Err(e) = self.set_condition(obj, &problems).await
        {
            tracing::warn!("cannot update the Node condition: {e}");
        }
        {
            let mut st = self.ctx.state.routing.lock().expect("routing");
            if st.problems != problems {
                for p in problems.iter().filter(|p| !st.problems.contains(p)) {
                    tracing::warn!("routing: {p}");
                }
            }
            *st = crate::http::RoutingStatus {
                address: address.map(|a| a.to_string()),
                asn: settings.asn,
                problems,
                datastore_ok,
                bgp_synced: synced,
                neighbors: sessions.neighbors.len(),
                advertised: advertised.iter().map(ToString::to_string).collect(),
                remote_routes,
                last_pass: Some(Instant::now()),
            };
        }
    }

    async fn ensure_speaker(&mut self, key: SpeakerKey) -> anyhow::Result<()> {
        if self.speaker.as_ref().is_some_and(|(k, _)| *k == key) {
            return Ok(());
        }
        if let Some((_, old)) = self.speaker.take() {
            tracing::info!("BGP settings changed; restarting the speaker");
            old.stop();
            *self.ctx.state.speaker.lock().expect("speaker") = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (asn, router_id, port, restart_time, communities, cluster_id) = key.clone();
        let mut cfg = margay_bgp::config::Config::new(asn, router_id);
        cfg.listen = Some(SocketAddr::from(([0u16; 8], port)));
        cfg.fib = false;
        cfg.forwarding_preserved = true;
        cfg.restart_time = restart_time;
        cfg.communities = communities;
        cfg.cluster_id = cluster_id;
        cfg.validate()?;
        let sp = Arc::new(Speaker::start(cfg).await?);
        tracing::info!(asn, %router_id, port, "BGP speaker started");
        *self.ctx.state.speaker.lock().expect("speaker") = Some(sp.clone());
        self.speaker = Some((key, sp));
        Ok(())
    }

    async fn passwords(
        &self,
        peers: &[(String, crate::bgp_crd::BGPPeerSpec)],
    ) -> BTreeMap<(String, String), String> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ctx.namespace);
        let mut out = BTreeMap::new();
        for r in peers.iter().filter_map(|(_, p)| p.password.as_ref()) {
            let k = (r.name.clone(), r.key.clone());
            if out.contains_key(&k) {
                continue;
            }
            if let Ok(Some(s)) = api.get_opt(&r.name).await
                && let Some(v) = s.data.as_ref().and_then(|d| d.get(&r.key))
                && let Ok(pw) = String::from_utf8(v.0.clone())
            {
                out.insert(k, pw.trim_end_matches('\n').to_string());
            }
        }
        out
    }

    async fn publish_identity(
        &self,
        obj: &Node,
        address: IpNetwork,
        asn: u32,
        vtep: Option<crate::remote::Vtep>,
    ) -> kube::Result<()> {
        let want = identity_annotations(address, asn, vtep);
        let have = obj.annotations();
        if want.iter().all(|(k, v)| have.get(k) == v.as_ref()) {
            return Ok(());
        }
        let api: Api<Node> = Api::all(self.ctx.client.clone());
        let patch = serde_json::json!({"metadata": {"annotations": want}});
        api.patch(
            &self.ctx.node,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        tracing::info!(%address, asn, "published this node's BGP identity");
        Ok(())
    }

    async fn set_condition(&self, obj: &Node, problems: &[String]) -> kube::Result<()> {
        let (status, reason, message) = if problems.is_empty() {
            ("True", "MargayIsUp", "routing is complete".to_string())
        } else {
            ("False", "RoutingIncomplete", problems.join("; "))
        };
        let conds = obj
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let cur = conds.iter().find(|c| c.type_ == CONDITION);
        let net = conds.iter().find(|c| c.type_ == "NetworkUnavailable");
        if cur.is_some_and(|c| {
            c.status == status
                && c.reason.as_deref() == Some(reason)
                && c.message.as_deref() == Some(message.as_str())
                && heartbeat_within(c, HEARTBEAT)
        }) && net.is_some_and(|c| c.status == "False")
        {
            return Ok(());
        }
        let now = margay_ipam::now_rfc3339();
        let since = match cur {
            Some(c) if c.status == status => c
                .last_transition_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or(now.clone()),
            _ => now.clone(),
        };
        let patch = serde_json::json!({"status": {"conditions": [
            {"type": CONDITION, "status": status, "reason": reason, "message": message,
             "lastHeartbeatTime": now, "lastTransitionTime": since},
            {"type": "NetworkUnavailable", "status": "False", "reason": "MargayIsUp",
             "message": "margay-agent is running on this node",
             "lastHeartbeatTime": now, "lastTransitionTime": now},
        ]}});
        let api: Api<Node> = Api::all(self.ctx.client.clone());
        api.patch_status(
            &self.ctx.node,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await?;
        Ok(())
    }

    /// Writes each object's `Valid` condition where it differs.
    async fn report_valid<K>(
        &self,
        objs: Vec<(
            String,
            Result<(), String>,
            Option<crate::bgp_crd::BGPStatus>,
        )>,
    ) where
        K: Resource<Scope = kube::core::ClusterResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::all(self.ctx.client.clone());
        for (name, res, status) in objs {
            let old = status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Valid"));
            let c = valid_condition(&res, old);
            if same(&c, old) {
                continue;
            }
            let patch = serde_json::json!({"status": {"conditions": [c]}});
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(%name, "cannot write the Valid condition: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<(String, IpNetwork)> {
        vec![
            ("eth0".into(), "10.0.0.5/24".parse().unwrap()),
            ("eth1".into(), "192.168.1.5/16".parse().unwrap()),
        ]
    }

    #[test]
    fn address_from_flag_node_or_host() {
        assert_eq!(
            choose_address("autodetect", None, &host()),
            Ok("10.0.0.5/24".parse().unwrap())
        );
        assert_eq!(
            choose_address("192.168.1.5", None, &host()),
            Ok("192.168.1.5/16".parse().unwrap())
        );
        assert_eq!(
            choose_address("172.16.0.1/20", None, &host()),
            Ok("172.16.0.1/20".parse().unwrap())
        );
        assert!(
            choose_address("nonsense", None, &host())
                .unwrap_err()
                .contains("--node-ip")
        );
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.5"}]}
        }))
        .unwrap();
        assert_eq!(
            choose_address("autodetect", Some(&n), &host()),
            Ok("192.168.1.5/16".parse().unwrap())
        );
        assert!(choose_address("autodetect", None, &[]).is_err());
    }

    #[test]
    fn valid_condition_keeps_its_transition_time() {
        let first = valid_condition(&Err("bad".into()), None);
        assert_eq!(first.status, "False");
        let again = valid_condition(&Err("bad".into()), Some(&first));
        assert!(same(&again, Some(&first)));
        assert_eq!(again.last_transition_time, first.last_transition_time);
        let fixed = valid_condition(&Ok(()), Some(&first));
        assert!(!same(&fixed, Some(&first)));
    }
}
