//! Carrying out a [`Plan`]: thin I/O over three narrow interfaces, so a
//! whole pass runs in unit tests against fakes with failure injection:
//! [`Dataplane`] (the kernel), [`Bgp`] (the speaker) and [`ClusterWrites`]
//! (the Kubernetes API and IPAM). Nothing here decides; every failure
//! becomes a [`Problem`] in the Node condition and `/status`, and the rest
//! of the plan is still carried out.

use std::future::Future;
use std::net::Ipv4Addr;

use margay_api::condition::Condition;
use margay_api::status::RoutingStatus;
use margay_bgp::config::Neighbor;
use margay_bgp::packet::Prefix;
use margay_delta::Removals;

use super::plan::{Plan, RemotePlan, SpeakerPlan, SpeakerSettings, SpeakerView};
use super::problem::Problem;
use super::sessions::Live;
use crate::dataplane::{
    Dataplane, DevicePlan, Devices, Holds, PerTunnel, Remote, Tunnel, TunnelFilter, sync,
    tunnel_filter,
};
use crate::kube::node::Annotations;
use margay_api::identity::Wanted;

/// The speaker, as a pass drives it.
pub trait Bgp: Send {
    /// What the pass may know of it.
    fn view(&self) -> SpeakerView;
    /// (Re)starts it with `settings` and `live`, accepting routes inside
    /// `import` and advertising `originate` from its first session on.
    fn start(
        &mut self,
        settings: &SpeakerSettings,
        live: &Live,
        import: &[Prefix],
        originate: &[Prefix],
    ) -> impl Future<Output = Result<(), margay_bgp::Error>> + Send;
    /// Applies communities and restart time to the running speaker.
    fn set_live(
        &mut self,
        live: &Live,
    ) -> impl Future<Output = Result<(), margay_bgp::Error>> + Send;
    /// Stops it (BGP turned off).
    fn stop(&mut self);
    /// Replaces its neighbors.
    fn set_neighbors(
        &mut self,
        n: Vec<Neighbor>,
    ) -> impl Future<Output = Result<(), margay_bgp::Error>> + Send;
    /// Replaces its import filter.
    fn set_import(
        &mut self,
        p: Vec<Prefix>,
    ) -> impl Future<Output = Result<(), margay_bgp::Error>> + Send;
    /// Replaces what it advertises.
    fn set_originate(
        &mut self,
        p: Vec<Prefix>,
    ) -> impl Future<Output = Result<(), margay_bgp::Error>> + Send;
}

/// The cluster, as a pass writes to it.
pub trait ClusterWrites: Send + Sync {
    /// Publishes this node's identity annotations.
    fn annotate(&self, a: &Annotations) -> impl Future<Output = crate::Result<()>> + Send;
    /// Writes this node's `MargayNode`.
    fn identity(&self, w: &Wanted) -> impl Future<Output = crate::Result<()>> + Send;
    /// Patches this node's status (its condition).
    fn node_status(
        &self,
        patch: &serde_json::Value,
    ) -> impl Future<Output = crate::Result<()>> + Send;
    /// Writes a BGPConfiguration's `Valid` condition.
    fn valid_config(
        &self,
        name: &str,
        c: &Condition,
    ) -> impl Future<Output = crate::Result<()>> + Send;
    /// Writes a BGPPeer's `Valid` condition.
    fn valid_peer(
        &self,
        name: &str,
        c: &Condition,
    ) -> impl Future<Output = crate::Result<()>> + Send;
    /// Allocates this node's tunnel address for `t` (the same one again
    /// when it has one).
    fn assign_tunnel(
        &self,
        t: Tunnel,
    ) -> impl Future<Output = crate::Result<Option<Ipv4Addr>>> + Send;
    /// Releases this node's tunnel address for `t` (none held is success);
    /// how many addresses it held.
    fn release_tunnel(&self, t: Tunnel) -> impl Future<Output = crate::Result<usize>> + Send;
}

/// What a pass did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every problem: the plan's and the ones met carrying it out.
    pub problems: Vec<Problem>,
    /// Tunnel addresses allocated by this pass (the next pass uses them).
    pub assigned: PerTunnel<Option<Ipv4Addr>>,
    /// Tunnel devices this pass made sure of (the next pass announces them).
    pub ready: PerTunnel<bool>,
    /// Tunnels this pass retired: device gone, address released.
    pub retired: PerTunnel<bool>,
    /// What `/status` shows.
    pub status: RoutingStatus,
}

/// Carries out `plan`.
pub async fn apply<D: Dataplane, B: Bgp, C: ClusterWrites>(
    plan: Plan,
    dp: &D,
    bgp: &mut B,
    cluster: &C,
) -> Outcome {
    let mut problems = plan.problems.clone();
    let mut assigned = PerTunnel::default();
    for &t in &plan.assign_tunnels {
        match cluster.assign_tunnel(t).await {
            Ok(ip) => *assigned.get_mut(t) = ip,
            Err(e) => problems.push(Problem::NoTunnelAddress {
                tunnel: t,
                why: e.to_string(),
            }),
        }
    }
    // Which addresses the tunnels take packets from, before their devices,
    // so a device made below meets its filter already there (a load that
    // fails is reported; the devices are still made, as the kernel's old
    // table, if any, says).
    let mut filter = None;
    if let Some(f) = &plan.tunnel_filter {
        match sync::tunnel_filter(dp, f).await {
            Ok(have) => filter = have,
            Err(e) => problems.push(Problem::TunnelFilter(e.to_string())),
        }
    }
    // Devices, then VXLAN entries, then routes; retired devices last.
    let (mut ready, mut retired) = (PerTunnel::default(), PerTunnel::default());
    let mut remote_routes = 0;
    let remote = plan.remote.clone();
    if remote.is_some() || plan.devices != Devices::default() {
        let r = remote.unwrap_or_else(|| RemotePlan {
            want: Remote::default(),
            holds: Holds::default(),
            removals: Removals::Forbidden,
        });
        remote_routes = r.want.routes.len();
        match sync::remote(dp, &plan.devices, &r.want, &r.holds, r.removals).await {
            Ok(rep) => {
                if !rep.failed.is_empty() {
                    let what: Vec<String> = rep.failed.iter().map(ToString::to_string).collect();
                    problems.push(Problem::Kernel(what.join("; ")));
                }
                ready = rep.ready;
                retired = rep.retired;
            }
            Err(e) => problems.push(Problem::Kernel(e.to_string())),
        }
    }
    // A retired tunnel's address goes back to IPAM once no device holds it.
    for t in Tunnel::ALL {
        if !*retired.get(t) {
            continue;
        }
        match cluster.release_tunnel(t).await {
            Ok(0) => {}
            Ok(_) => tracing::info!(tunnel = %t, "retired the tunnel no pool uses"),
            Err(e) => {
                *retired.get_mut(t) = false;
                problems.push(Problem::NoTunnelAddress {
                    tunnel: t,
                    why: format!("releasing it: {e}"),
                });
            }
        }
    }
    if let Some(a) = &plan.annotate {
        match cluster.annotate(a).await {
            Ok(()) => tracing::info!(address = ?plan.address, "published this node's BGP identity"),
            Err(e) => problems.push(Problem::Publish(e.to_string())),
        }
    }
    if let Some(w) = &plan.identity {
        match cluster.identity(w).await {
            Ok(()) => tracing::info!(address = ?plan.address, "wrote this node's MargayNode"),
            Err(e) => problems.push(Problem::Publish(e.to_string())),
        }
    }
    speaker(&plan.speaker, bgp, &mut problems).await;
    for (name, c) in &plan.valid_configs {
        if let Err(e) = cluster.valid_config(name, c).await {
            tracing::debug!(%name, "{e}");
        }
    }
    for (name, c) in &plan.valid_peers {
        if let Err(e) = cluster.valid_peer(name, c).await {
            tracing::debug!(%name, "{e}");
        }
    }
    let mut rendered: Vec<margay_api::status::Problem> = Vec::new();
    for p in &problems {
        let r = p.report();
        if !rendered.iter().any(|o| o.message == r.message) {
            rendered.push(r);
        }
    }
    let sentences: Vec<String> = rendered.iter().map(|p| p.message.clone()).collect();
    if let Some(me) = &plan.me
        && let Some(patch) = crate::kube::node::condition_patch(me, &sentences)
        && let Err(e) = cluster.node_status(&patch).await
    {
        tracing::warn!("cannot update the Node condition: {e}");
    }
    let view = bgp.view();
    let status = RoutingStatus {
        address: plan.address.map(|a| a.to_string()),
        asn: plan.asn.unwrap_or_default(),
        problems: rendered,
        datastore_ok: plan.complete(),
        unknown_inputs: plan.unknown.clone(),
        bgp_synced: matches!(plan.speaker, SpeakerPlan::Off) || view.synced,
        neighbors: view.neighbors.len(),
        advertised: plan.advertised().iter().map(ToString::to_string).collect(),
        remote_routes,
        tunnels: tunnel_lines(&plan.devices, &ready, filter.as_ref()),
    };
    Outcome {
        problems,
        assigned,
        ready,
        retired,
        status,
    }
}

/// The tunnel devices in use and the filter in front of them, for
/// `/status`.
fn tunnel_lines(
    d: &Devices,
    ready: &PerTunnel<bool>,
    filter: Option<&TunnelFilter>,
) -> Vec<String> {
    use crate::dataplane::ownership::{IPIP_DEV, VXLAN_DEV};
    let wanted = [
        match d.vxlan {
            DevicePlan::Want(l) => Some((Tunnel::Vxlan, VXLAN_DEV, l.tunnel_ip, l.mtu)),
            _ => None,
        },
        match d.ipip {
            DevicePlan::Want(l) => Some((Tunnel::Ipip, IPIP_DEV, l.tunnel_ip, l.mtu)),
            _ => None,
        },
    ];
    let mut v: Vec<String> = wanted
        .into_iter()
        .flatten()
        .map(|(t, dev, ip, mtu)| {
            let up = if *ready.get(t) { "" } else { ", not up" };
            format!("{t} {dev} {ip} MTU {mtu}{up}")
        })
        .collect();
    if let Some(f) = filter {
        v.push(format!("filter: {}", tunnel_filter::describe(f)));
    }
    v
}

async fn speaker<B: Bgp>(p: &SpeakerPlan, bgp: &mut B, problems: &mut Vec<Problem>) {
    let (settings, live, import, originate, neighbors) = match p {
        SpeakerPlan::Off => {
            bgp.stop();
            return;
        }
        SpeakerPlan::Keep => return,
        SpeakerPlan::Run {
            settings,
            live,
            import,
            originate,
            neighbors,
        } => (settings, live, import, originate, neighbors),
    };
    let mut fail =
        |what: &str, e: margay_bgp::Error| problems.push(Problem::Speaker(format!("{what}: {e}")));
    if bgp.view().settings.as_ref() != Some(settings) {
        // The plan starts it only with both known.
        let filter = import.clone().unwrap_or_default();
        let own = originate.clone().unwrap_or_default();
        if let Err(e) = bgp.start(settings, live, &filter, &own).await {
            fail("start", e);
            return;
        }
    } else if bgp.view().live.as_ref() != Some(live)
        && let Err(e) = bgp.set_live(live).await
    {
        fail("communities and restart time", e);
    }
    if let Some(n) = neighbors
        && let Err(e) = bgp.set_neighbors(n.clone()).await
    {
        fail("neighbors", e);
    }
    if let Some(i) = import
        && let Err(e) = bgp.set_import(i.clone()).await
    {
        fail("import filter", e);
    }
    if let Some(o) = originate
        && let Err(e) = bgp.set_originate(o.clone()).await
    {
        fail("advertisements", e);
    }
}
