//! The routing pass as a pure function (controller-rs's `reconcile` and
//! felix's desired state are the model): [`plan`] turns a [`Snapshot`] of
//! every input into a [`Plan`] of what to write, and `apply` only carries
//! it out.
//!
//! Every input is [`Known`]: fresh, stale (the last value; its source
//! cannot be read now) or unknown. The plan decides nothing from an unknown
//! input and removes nothing because of a stale one:
//! - the speaker is started only once its settings, this node's address,
//!   the pools (its import filter) and this node's blocks (what it
//!   advertises from its first session on) are known; its neighbor list is set
//!   only from current Nodes and BGPPeers, its import filter only from known
//!   pools, its advertisements only from known blocks;
//! - routes to remote blocks are computed only from known inputs, and may
//!   remove kernel state only when every input is current, the speaker has
//!   been given its neighbors and they have all sent End-of-RIB (or the
//!   start-up grace [`PRUNE_GRACE`] has passed): after an agent or speaker
//!   (re)start, what is in the kernel keeps forwarding until BGP has
//!   relearned it;
//! - the tunnel filter (which addresses this node's tunnels take
//!   encapsulated packets from, see [`tunnel_filter`]) is computed only
//!   from known MargayNodes: an address is added from a current or stale
//!   list and removed only when the list is current; before they are first listed
//!   the kernel's filter is left as it is, and no tunnel device is made
//!   (one that exists is kept).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use margay_api::bgp::{BGP_CONFIG_NAME, BGPConfiguration, BGPPeer, validate_peer};
use margay_api::condition::Condition;
use margay_api::identity::{MargayNode, Wanted};
use margay_api::ipam::Encapsulation;
use margay_bgp::config::Neighbor;
use margay_bgp::packet::Prefix;
use margay_bgp::speaker::LearnedRoutes;
use margay_delta::Removals;
use margay_ipam::model::Pool;

use super::encap::{self, RemoteBlock, Vtep};
use super::local::Local;
use super::nodes::{
    NodeInfo, choose_address, identity_annotations, tunnel_sources, vtep_mac, wanted_identity,
};
use super::problem::Problem;
use super::sessions::{Global, Live, NamedPeer, Settings, neighbors};
use crate::dataplane::{
    DevicePlan, Devices, FilterPlan, Holds, IPIP_OVERHEAD, LocalIpip, LocalVtep, PerTunnel, Remote,
    Tunnel, VXLAN_OVERHEAD,
};
use crate::kube::node::{Annotations, has_annotations};
use crate::kube::secrets::SecretKey;
use crate::kube::valid::valid_condition;
use crate::kube::{Known, Why};

/// Longest wait after a speaker start before routes BGP has not relearned
/// are removed from the kernel (when some peer never sends End-of-RIB).
pub const PRUNE_GRACE: Duration = Duration::from_secs(90);

/// How long a tunnel no pool uses any more keeps taking packets before it
/// is retired: other nodes switch their routes to us when they see the
/// change, not at the same instant, and packets they send through the old
/// tunnel meanwhile still arrive.
pub const TUNNEL_LINGER: Duration = Duration::from_secs(20);

/// What the routing loop knows of one of this node's tunnels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelInput {
    /// Its address, once allocated (in this run of the agent).
    pub ip: Option<Ipv4Addr>,
    /// The last pass made sure of its device (up, with the address).
    pub ready: bool,
    /// How long current pools have not used it (`None`: in use, or the
    /// pools are not current).
    pub unused_for: Option<Duration>,
    /// Retired (device removed, address released) since it was last used.
    pub retired: bool,
}

/// What a pass wants of the remote blocks' routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePlan {
    /// The desired routes and VXLAN entries.
    pub want: Remote,
    /// Blocks kept as they are, and blocks of pools being deleted.
    pub holds: Holds,
    /// Whether what `want` lacks may go.
    pub removals: Removals,
}

/// What restarts the speaker when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerSettings {
    /// The cluster's part.
    pub global: Global,
    /// This node's router ID.
    pub router_id: Ipv4Addr,
    /// Route reflector cluster ID, when this node is one.
    pub cluster_id: Option<Ipv4Addr>,
}

/// What the pass knows of the running speaker.
#[derive(Debug, Clone, Default)]
pub struct SpeakerView {
    /// Running, with these settings.
    pub settings: Option<SpeakerSettings>,
    /// The live settings it was last given.
    pub live: Option<Live>,
    /// The neighbor list it was last given.
    pub neighbors: Vec<Neighbor>,
    /// It has been given a neighbor list computed from current inputs.
    pub neighbors_set: bool,
    /// Its best learned routes (when running).
    pub learned: Option<LearnedRoutes>,
    /// Every configured peer has sent End-of-RIB.
    pub synced: bool,
    /// How long it has been running.
    pub age: Duration,
}

/// Every input of one routing pass.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node's name.
    pub node: String,
    /// `--node-ip`.
    pub node_ip: String,
    /// BGP and remote routes are this agent's job.
    pub bgp: bool,
    /// Underlay MTU.
    pub mtu: u32,
    /// This node's Node object (`None`: there is none).
    pub me: Known<Option<Arc<Node>>>,
    /// Every node's identity.
    pub nodes: Known<Vec<Arc<MargayNode>>>,
    /// Of the nodes that share their address with another, those whose
    /// agent renewed its heartbeat Lease recently.
    pub alive: std::collections::BTreeSet<String>,
    /// BGPConfigurations.
    pub configs: Known<Vec<Arc<BGPConfiguration>>>,
    /// BGPPeers.
    pub peers: Known<Vec<Arc<BGPPeer>>>,
    /// The valid pools.
    pub pools: Known<Vec<Pool>>,
    /// This node's blocks and its pods' addresses.
    pub own_blocks: Known<Local>,
    /// BGP passwords, per (Secret, key) the BGPPeers name.
    pub passwords: BTreeMap<SecretKey, Known<Option<String>>>,
    /// The host's addresses.
    pub host: Known<Vec<(String, IpNetwork)>>,
    /// This node's tunnels.
    pub tunnels: PerTunnel<TunnelInput>,
    /// This agent holds the leader Lease: it writes the cluster-wide
    /// `Valid` conditions (every agent still judges each object for its
    /// own sessions and reports on its own Node).
    pub leader: bool,
    /// The speaker.
    pub speaker: SpeakerView,
    /// Why this node's NetworkPolicy table is not current, if it is not
    /// (the Node condition says so).
    pub policy_stale: Option<String>,
}

/// What to do with the speaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeakerPlan {
    /// BGP is off on this node.
    Off,
    /// Too little is known to start it or change its settings: leave it.
    Keep,
    /// Run with `settings` (restarting it if they changed) and `live`
    /// (applied without a restart); each list that is `Some` replaces the
    /// speaker's, `None` leaves it as it is.
    Run {
        /// Its settings.
        settings: SpeakerSettings,
        /// Communities and restart time.
        live: Live,
        /// Import filter (the pools).
        import: Option<Vec<Prefix>>,
        /// Prefixes to advertise.
        originate: Option<Vec<Prefix>>,
        /// Neighbors.
        neighbors: Option<Vec<Neighbor>>,
    },
}

/// Everything one pass writes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// This node's BGP address.
    pub address: Option<IpNetwork>,
    /// The cluster AS, when known.
    pub asn: Option<u32>,
    /// This node's Node object, when known (for its condition).
    pub me: Option<Arc<Node>>,
    /// Identity annotations to publish (they differ from the Node's).
    pub annotate: Option<Annotations>,
    /// This node's `MargayNode` to write (it differs from what is there).
    pub identity: Option<Wanted>,
    /// Tunnel addresses to allocate (a pool uses the tunnel, none held).
    pub assign_tunnels: Vec<Tunnel>,
    /// This node's tunnel devices (a retired one's address is released
    /// once the device is gone).
    pub devices: Devices,
    /// Which tunnels current pools use (`None`: the pools are not
    /// current), for the loop's [`TUNNEL_LINGER`] clock.
    pub tunnels_used: Option<PerTunnel<bool>>,
    /// Whether this node's MargayNode, as listed, announces every tunnel
    /// the pools use (an unused tunnel's linger counts from then).
    pub tunnels_announced: bool,
    /// Which addresses the tunnels take packets from (`None`: Nodes never
    /// listed; the kernel's filter is left as it is).
    pub tunnel_filter: Option<FilterPlan>,
    /// The speaker.
    pub speaker: SpeakerPlan,
    /// Routes to remote blocks.
    pub remote: Option<RemotePlan>,
    /// `Valid` conditions to write: BGPConfigurations.
    pub valid_configs: Vec<(String, Condition)>,
    /// `Valid` conditions to write: BGPPeers.
    pub valid_peers: Vec<(String, Condition)>,
    /// What keeps routing incomplete.
    pub problems: Vec<Problem>,
    /// Inputs not current, and why.
    pub unknown: Vec<String>,
}

impl Plan {
    /// Whether every input was current.
    pub fn complete(&self) -> bool {
        self.unknown.is_empty()
    }

    /// What the speaker is told to advertise (for `/status`).
    pub fn advertised(&self) -> Vec<Prefix> {
        match &self.speaker {
            SpeakerPlan::Run {
                originate: Some(o), ..
            } => o.clone(),
            _ => Vec::new(),
        }
    }
}

/// The remote blocks to program from what BGP learned: prefixes inside a
/// pool and not [shadowed](Local::shadows) by this node's own (a host route
/// inside our block is an address another node borrowed: routed to it),
/// reached through the node whose
/// address is the route's (first) next hop; an unknown next hop (a router)
/// is reached natively.
pub fn remote_blocks(
    learned: &LearnedRoutes,
    nodes: &[NodeInfo],
    pools: &[Pool],
    own: &Local,
) -> Vec<RemoteBlock> {
    let mut out = Vec::new();
    // Each next hop found in one lookup (not a search of every node per
    // prefix: with a block or more per node that was N^2 per pass). Of
    // two nodes announcing one address the first, as before.
    let mut by_address: std::collections::HashMap<IpAddr, &NodeInfo> =
        std::collections::HashMap::with_capacity(nodes.len());
    for n in nodes {
        if let Some(a) = n.address {
            by_address.entry(a.ip()).or_insert(n);
        }
    }
    for (prefix, hops) in learned {
        let Ok(cidr) = IpNetwork::new(prefix.addr(), prefix.len()) else {
            continue;
        };
        if own.shadows(&cidr) {
            continue;
        }
        let Some(pool) = pools.iter().find(|p| {
            p.cidr.is_ipv4() == cidr.is_ipv4()
                && p.cidr.contains(cidr.network())
                && p.cidr.prefix() <= cidr.prefix()
        }) else {
            continue;
        };
        let Some(&hop) = hops.first() else {
            continue;
        };
        let node = by_address.get(&hop).copied();
        out.push(RemoteBlock {
            cidr,
            node: node.map_or_else(|| hop.to_string(), |n| n.name.clone()),
            node_ip: hop,
            encap: if node.is_some() {
                pool.encapsulation
            } else {
                Encapsulation::None
            },
            vtep: node.and_then(|n| n.vtep),
            ipip: node.and_then(|n| n.ipip),
            pool_deleting: pool.deleting,
        });
    }
    out
}

fn prefixes<'a>(nets: impl IntoIterator<Item = &'a IpNetwork>) -> Vec<Prefix> {
    let mut v: Vec<Prefix> = nets
        .into_iter()
        .filter_map(|n| Prefix::new(n.network(), n.prefix()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The pass's decisions.
pub fn plan(s: &Snapshot) -> Plan {
    let mut problems = Vec::new();
    let mut unknown = Vec::new();
    let mut note = |what: &str, why: Option<&Why>, problems: &mut Vec<Problem>| {
        if let Some(why) = why {
            unknown.push(format!("{what}: {why}"));
            problems.push(Problem::Unknown(why.clone()));
        }
    };
    note("this Node", s.me.why(), &mut problems);
    note("MargayNodes", s.nodes.why(), &mut problems);
    note("BGPConfigurations", s.configs.why(), &mut problems);
    note("BGPPeers", s.peers.why(), &mut problems);
    note("IPPools", s.pools.why(), &mut problems);
    note("blocks", s.own_blocks.why(), &mut problems);
    note("host addresses", s.host.why(), &mut problems);

    // This node's object.
    let me_obj = s.me.value().cloned().flatten();
    if s.me.is_fresh() && me_obj.is_none() {
        problems.push(Problem::NodeMissing(s.node.clone()));
    }
    if let Some(why) = &s.policy_stale {
        problems.push(Problem::PolicyTable(why.clone()));
    }

    // Cluster settings, and the Valid condition of each BGP object.
    let mut valid_configs = Vec::new();
    let settings = s.configs.value().map(|cfgs| {
        let cfg = cfgs.iter().find(|c| c.name_any() == BGP_CONFIG_NAME);
        let (settings, invalid) = Settings::from_spec(cfg.map(|c| &c.spec));
        if let Some(c) = cfg {
            let res = invalid.as_ref().map_or(Ok(()), Err);
            if let Some(cond) = valid_condition(res, c.status.as_ref()) {
                valid_configs.push((c.name_any(), cond));
            }
        }
        if let Some(why) = invalid {
            problems.push(Problem::ConfigIgnored {
                name: BGP_CONFIG_NAME.into(),
                why,
            });
        }
        settings
    });
    let mut valid_peers = Vec::new();
    let named: Option<Vec<NamedPeer>> = s.peers.value().map(|peers| {
        for p in peers {
            let res = validate_peer(&p.spec);
            if let Some(cond) = valid_condition(res, p.status.as_ref()) {
                valid_peers.push((p.name_any(), cond));
            }
        }
        peers
            .iter()
            .map(|p| (p.name_any(), p.spec.clone()))
            .collect()
    });

    // This node's address and identity.
    let host = s.host.value().cloned().unwrap_or_default();
    let address = match choose_address(&s.node_ip, me_obj.as_deref(), &host) {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(Problem::NoAddress(e));
            None
        }
    };
    // Routes to other nodes' blocks.
    let infos: Option<Vec<NodeInfo>> = s.nodes.value().map(|all| {
        all.iter()
            .map(|n| {
                let mut i = NodeInfo::from_identity(n);
                i.alive = s.alive.contains(&i.name);
                i
            })
            .collect()
    });
    let remote = match (
        &s.speaker.learned,
        s.pools.value(),
        s.own_blocks.value(),
        &infos,
    ) {
        (Some(learned), Some(pools), Some(own), Some(infos)) if s.bgp => {
            let blocks = remote_blocks(learned, infos, pools, own);
            let routed = encap::plan(&blocks, address);
            problems.extend(routed.errors.into_iter().map(Problem::from));
            let inputs = s.pools.is_fresh() && s.nodes.is_fresh() && s.own_blocks.is_fresh();
            let relearned =
                s.speaker.neighbors_set && (s.speaker.synced || s.speaker.age > PRUNE_GRACE);
            Some(RemotePlan {
                want: routed.want,
                holds: routed.holds,
                removals: Removals::when(inputs && relearned),
            })
        }
        _ => None,
    };
    // A tunnel is retired only by a pass that may remove routes (so none
    // it cannot see still goes through it).
    let may_remove = remote
        .as_ref()
        .is_some_and(|r| r.removals == Removals::Allowed);

    // This node's tunnels: which ones the pools use, their addresses and
    // devices, what the other nodes are told.
    // A pool being deleted no longer counts: its tunnel address (which
    // would hold the deletion back) is released after the linger; its
    // pods are to be drained first, as for any pool deletion.
    let used: Option<PerTunnel<bool>> = s.pools.value().map(|pools| {
        PerTunnel::default().map(|t, _: &bool| {
            pools
                .iter()
                .any(|p| !p.deleting && t.used_by(p.encapsulation))
        })
    });
    let (announced, others) = switched(s, used, infos.as_deref());
    let (mut devices, assign_tunnels) =
        tunnel_devices(s, used, may_remove && others, address, me_obj.as_deref());
    let tunnel_filter = tunnel_filter(s, used);
    // A tunnel device is made only once the filter in front of it can be
    // (Nodes listed), so a new node's is not open to every source while the
    // Node list is awaited. One that exists stays as it is.
    if tunnel_filter.is_none() {
        if matches!(devices.vxlan, DevicePlan::Want(_)) {
            devices.vxlan = DevicePlan::Keep;
        }
        if matches!(devices.ipip, DevicePlan::Want(_)) {
            devices.ipip = DevicePlan::Keep;
        }
    }
    let vtep = match devices.vxlan {
        DevicePlan::Want(l) => Some(Vtep {
            mac: l.mac,
            tunnel_ip: l.tunnel_ip,
        }),
        _ => None,
    };
    // A tunnel is announced once its device is ready, and withdrawn once
    // current pools no longer use it.
    let announce = |t: Tunnel| -> Option<bool> {
        match used.map(|u| *u.get(t)) {
            Some(true) if s.tunnels.get(t).ready => Some(true),
            Some(false) if s.pools.is_fresh() => Some(false),
            _ => None,
        }
    };
    let vtep_note = announce(Tunnel::Vxlan).map(|on| vtep.filter(|_| on));
    let ipip_note = announce(Tunnel::Ipip).map(|on| s.tunnels.ipip.ip.filter(|_| on));
    // Name, labels and reflector role from our Node; the rest is what this
    // agent found (its annotations may lag behind).
    let me = me_obj.as_deref().map(|n| NodeInfo {
        address,
        asn: settings.as_ref().map(|s| s.global.asn),
        vtep,
        ..NodeInfo::from_node(n)
    });
    let annotate = match (&me_obj, address, &settings) {
        (Some(obj), Some(addr), Some(st)) => {
            let want = identity_annotations(addr, st.global.asn, vtep_note, ipip_note);
            (!has_annotations(obj, &want)).then_some(want)
        }
        _ => None,
    };
    // Written only once the identities were listed (what is there is
    // known) and when it differs.
    let identity = match (&me_obj, address, &settings, s.nodes.value()) {
        (Some(obj), Some(addr), Some(st), Some(all)) => {
            let have = all.iter().find(|n| n.name_any() == s.node);
            let want = wanted_identity(
                obj,
                have.map(|h| &**h),
                addr,
                st.global.asn,
                vtep_note,
                ipip_note,
            );
            (!have.is_some_and(|h| want.is_written(h))).then_some(want)
        }
        _ => None,
    };

    // The speaker.
    let speaker = speaker_plan(
        s,
        &settings,
        address,
        me.as_ref(),
        &infos,
        &named,
        &mut problems,
    );

    Plan {
        address,
        asn: settings.as_ref().map(|s| s.global.asn),
        me: me_obj,
        annotate,
        identity,
        assign_tunnels,
        devices,
        tunnels_used: used.filter(|_| s.pools.is_fresh()),
        tunnels_announced: announced,
        tunnel_filter,
        speaker,
        remote,
        // Written by the leader only: every agent would write the same.
        valid_configs: if s.leader { valid_configs } else { Vec::new() },
        valid_peers: if s.leader { valid_peers } else { Vec::new() },
        problems,
        unknown,
    }
}

/// Whether `n` announces every tunnel `used` says the pools use.
fn announces(n: &NodeInfo, used: PerTunnel<bool>) -> bool {
    Tunnel::ALL.iter().all(|t| {
        !*used.get(*t)
            || match t {
                Tunnel::Vxlan => n.vtep.is_some(),
                Tunnel::Ipip => n.ipip.is_some(),
            }
    })
}

/// Of the tunnels the pools use now, whether this node's MargayNode as the
/// others read it announces them all, and whether every other node's does:
/// a current list only. A node routes another's blocks through the new
/// tunnel once both its own device is up (in the pass that makes it; it
/// announces it in the next) and the other announces it, so an old tunnel
/// is retired only once the others announce the new one and its linger
/// has passed since this node announced it (the loop's clock). One that
/// never brings it up (a kernel without IPIP) keeps sending through the
/// old one, which then stays. The linger counted from the pool's change
/// alone was not enough where the switch reached some node later.
fn switched(
    s: &Snapshot,
    used: Option<PerTunnel<bool>>,
    infos: Option<&[NodeInfo]>,
) -> (bool, bool) {
    let (Some(used), Some(infos), true) = (used, infos, s.nodes.is_fresh()) else {
        return (false, false);
    };
    let me = infos.iter().any(|n| n.name == s.node && announces(n, used));
    let others = infos
        .iter()
        .filter(|n| n.name != s.node && n.address.is_some())
        .all(|n| announces(n, used));
    (me, others)
}

/// This node's tunnel devices and the tunnel addresses to allocate: a
/// tunnel the pools use needs its address first, then its device; one
/// current pools have not used for [`TUNNEL_LINGER`] is retired by a pass
/// that `may_remove` routes and knows every other node switched (its
/// address as this run allocated it, else as the Node still announces it);
/// anything else is left as it is.
fn tunnel_devices(
    s: &Snapshot,
    used: Option<PerTunnel<bool>>,
    may_remove: bool,
    address: Option<IpNetwork>,
    me: Option<&Node>,
) -> (Devices, Vec<Tunnel>) {
    let mut devices = Devices::default();
    let mut assign = Vec::new();
    let announced = me.map(NodeInfo::from_node);
    for t in Tunnel::ALL {
        let input = s.tunnels.get(t);
        match used.map(|u| *u.get(t)) {
            Some(true) => {
                let Some(ip) = input.ip else {
                    assign.push(t);
                    continue;
                };
                match t {
                    Tunnel::Vxlan => {
                        if let Some(IpAddr::V4(underlay)) = address.map(|a| a.ip()) {
                            devices.vxlan = DevicePlan::Want(LocalVtep {
                                mac: vtep_mac(&s.node),
                                tunnel_ip: ip,
                                underlay,
                                mtu: s.mtu - VXLAN_OVERHEAD,
                            });
                        }
                    }
                    Tunnel::Ipip => {
                        devices.ipip = DevicePlan::Want(LocalIpip {
                            tunnel_ip: ip,
                            mtu: s.mtu - IPIP_OVERHEAD,
                        });
                    }
                }
            }
            Some(false)
                if may_remove
                    && s.pools.is_fresh()
                    && !input.retired
                    && input.unused_for.is_some_and(|d| d >= TUNNEL_LINGER) =>
            {
                match t {
                    Tunnel::Vxlan => devices.vxlan = DevicePlan::Retire(input.ip),
                    Tunnel::Ipip => {
                        let ip = input.ip.or_else(|| announced.as_ref().and_then(|n| n.ipip));
                        devices.ipip = DevicePlan::Retire(ip);
                    }
                }
            }
            _ => {}
        }
    }
    (devices, assign)
}

/// Which addresses this node's tunnels take encapsulated packets from:
/// every known MargayNode's [`tunnel_sources`] (none while they were never
/// listed: the kernel's filter stays as it is), the kernel's others
/// removed only when the list is current. A tunnel the pools (current or
/// stale) use is guarded from the start, before its device exists; one
/// retired is not; one lingering, or whose use is unknown, stays as the
/// kernel has it.
fn tunnel_filter(s: &Snapshot, used: Option<PerTunnel<bool>>) -> Option<FilterPlan> {
    let nodes = s.nodes.value()?;
    Some(FilterPlan {
        nodes: nodes.iter().flat_map(|n| tunnel_sources(n)).collect(),
        removals: Removals::when(s.nodes.is_fresh()),
        guard: PerTunnel::default().map(|t, _: &bool| match used.map(|u| *u.get(t)) {
            Some(true) => Some(true),
            Some(false) if s.tunnels.get(t).retired => Some(false),
            _ => None,
        }),
    })
}

fn speaker_plan(
    s: &Snapshot,
    settings: &Option<Settings>,
    address: Option<IpNetwork>,
    me: Option<&NodeInfo>,
    infos: &Option<Vec<NodeInfo>>,
    named: &Option<Vec<NamedPeer>>,
    problems: &mut Vec<Problem>,
) -> SpeakerPlan {
    if !s.bgp {
        return SpeakerPlan::Off;
    }
    let router_id = match address.map(|a| a.ip()) {
        Some(IpAddr::V4(r)) => r,
        Some(IpAddr::V6(_)) => {
            problems.push(Problem::NeedsIpv4);
            return SpeakerPlan::Keep;
        }
        None => return SpeakerPlan::Keep,
    };
    let Some(settings) = settings else {
        return SpeakerPlan::Keep;
    };
    // The reflector role comes from our Node; while Nodes are unknown the
    // running speaker's stands (no restart for want of knowledge).
    let cluster_id = match (me, &s.speaker.settings) {
        (Some(me), _) => me.rr_cluster_id,
        (None, Some(running)) => running.cluster_id,
        (None, None) => return SpeakerPlan::Keep,
    };
    let settings_now = SpeakerSettings {
        global: settings.global.clone(),
        router_id,
        cluster_id,
    };
    let import = s
        .pools
        .value()
        .map(|pools| prefixes(pools.iter().map(|p| &p.cidr)));
    let originate = s
        .own_blocks
        .value()
        .map(|own| prefixes(own.advertised().chain(settings.prefixes.iter())));
    if (import.is_none() || originate.is_none())
        && s.speaker.settings.as_ref() != Some(&settings_now)
    {
        // (Re)started without a filter it would accept every route; without
        // its own blocks it would tell its peers (End-of-RIB) it has none,
        // and they would drop the routes they keep for it.
        return SpeakerPlan::Keep;
    }
    let neighbors = match (me, infos, named) {
        (Some(me), Some(infos), Some(named))
            if s.me.is_fresh() && s.nodes.is_fresh() && s.peers.is_fresh() =>
        {
            let sessions = neighbors(
                me,
                infos,
                settings,
                named,
                &s.passwords,
                &s.speaker.neighbors,
            );
            problems.extend(sessions.problems);
            Some(sessions.neighbors)
        }
        _ => None,
    };
    SpeakerPlan::Run {
        settings: settings_now,
        live: settings.live.clone(),
        import,
        originate,
        neighbors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::nodes::tests::node;

    #[test]
    fn learned_routes_become_remote_blocks_inside_pools_only() {
        let mut b = node("b", "10.0.0.2/24");
        b.vtep = Some(Vtep {
            mac: vtep_mac("b"),
            tunnel_ip: "10.244.1.0".parse().unwrap(),
        });
        let nodes = [node("a", "10.0.0.1/24"), b];
        let pool = Pool {
            name: "p".into(),
            cidr: "10.244.0.0/16".parse().unwrap(),
            block_size: 26,
            disabled: false,
            deleting: false,
            selector: None,
            uses: vec![],
            encapsulation: Encapsulation::Vxlan,
            nat_outgoing: false,
        };
        let mut learned = LearnedRoutes::new();
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let hops = |s: &str| [s.parse::<IpAddr>().unwrap()].into_iter().collect();
        learned.insert(p("10.244.1.0/26"), hops("10.0.0.2"));
        learned.insert(p("10.244.0.0/26"), hops("10.0.0.2")); // our own block: ignored
        learned.insert(p("10.244.9.0/26"), hops("10.0.0.254")); // via a router
        learned.insert(p("192.168.0.0/24"), hops("10.0.0.2")); // outside pools
        // An address of our block borrowed by b: routed to b.
        learned.insert(p("10.244.0.9/32"), hops("10.0.0.2"));
        let own = Local::blocks(["10.244.0.0/26".parse().unwrap()]);
        let r = remote_blocks(&learned, &nodes, &[pool], &own);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].cidr, "10.244.0.9/32".parse::<IpNetwork>().unwrap());
        assert_eq!(r[0].node, "b");
        let r = r[1..].to_vec();
        assert_eq!(r[0].node, "b");
        assert_eq!(r[0].encap, Encapsulation::Vxlan);
        assert!(r[0].vtep.is_some());
        assert_eq!(r[1].node, "10.0.0.254");
        assert_eq!(r[1].encap, Encapsulation::None);
    }
}
