//! Whole routing passes (snapshot → plan → apply) against the fake
//! dataplane, a fake speaker and a fake cluster, with failure injection:
//! an input that is Unknown or stale removes nothing (routes, tunnel
//! devices, the tunnel filter's node addresses), one refused route does
//! not stop the others, and a failing speaker call or filter load is
//! reported.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use margay_api::bgp::{BGPPeer, BGPPeerSpec};
use margay_api::condition::Condition;
use margay_api::identity::{MargayNode, MargayNodeSpec};
use margay_bgp::config::Neighbor;
use margay_bgp::packet::Prefix;
use margay_bgp::speaker::LearnedRoutes;
use margay_ipam::model::Pool;

use super::apply::{Bgp, ClusterWrites, apply};
use super::local::Local;
use super::plan::{Snapshot, SpeakerSettings, SpeakerView, plan};
use super::sessions::Live;
use crate::dataplane::{Dataplane, FakeDataplane, Fault, Tunnel, Via};
use crate::kube::node::Annotations;
use crate::kube::{Known, Op, Why};

/// A speaker that records what it is given and fails on request.
#[derive(Debug, Default)]
struct FakeBgp {
    view: SpeakerView,
    fail: Option<&'static str>,
    calls: Vec<String>,
}

impl FakeBgp {
    fn check(&mut self, what: &'static str) -> margay_bgp::Result<()> {
        self.calls.push(what.to_string());
        if self.fail == Some(what) {
            return Err(margay_bgp::Error::Config(format!(
                "{what} refused (injected)"
            )));
        }
        Ok(())
    }
}

impl Bgp for FakeBgp {
    fn view(&self) -> SpeakerView {
        self.view.clone()
    }

    async fn start(
        &mut self,
        s: &SpeakerSettings,
        live: &Live,
        _import: &[Prefix],
        _originate: &[Prefix],
    ) -> margay_bgp::Result<()> {
        self.check("start")?;
        self.view = SpeakerView {
            settings: Some(s.clone()),
            live: Some(live.clone()),
            learned: Some(LearnedRoutes::new()),
            ..Default::default()
        };
        Ok(())
    }

    async fn set_live(&mut self, live: &Live) -> margay_bgp::Result<()> {
        self.check("live")?;
        self.view.live = Some(live.clone());
        Ok(())
    }

    fn stop(&mut self) {
        self.view = SpeakerView::default();
    }

    async fn set_neighbors(&mut self, n: Vec<Neighbor>) -> margay_bgp::Result<()> {
        self.check("neighbors")?;
        self.view.neighbors = n;
        self.view.neighbors_set = true;
        Ok(())
    }

    async fn set_import(&mut self, _p: Vec<Prefix>) -> margay_bgp::Result<()> {
        self.check("import")
    }

    async fn set_originate(&mut self, _p: Vec<Prefix>) -> margay_bgp::Result<()> {
        self.check("originate")
    }
}

/// A cluster that records every write.
#[derive(Debug, Default)]
struct FakeCluster {
    writes: Mutex<Vec<serde_json::Value>>,
}

/// What the agent of Node `n` would have written as its MargayNode, going
/// by `n`'s annotations, addresses and labels (tests describe nodes as
/// annotated Node objects).
fn identity_of(n: &Node) -> Arc<MargayNode> {
    use margay_api::node::*;
    let ann = n.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| ann.get(k).cloned();
    let spec = MargayNodeSpec {
        bgp_address: get(ANN_ADDRESS),
        as_number: get(ANN_ASN).and_then(|a| a.parse().ok()),
        vxlan_tunnel_address: get(ANN_VXLAN_ADDRESS),
        vxlan_tunnel_mac: get(ANN_VXLAN_MAC),
        ipip_tunnel_address: get(ANN_IPIP_ADDRESS),
        route_reflector_cluster_id: get(ANN_RR_CLUSTER_ID),
        addresses: n
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .map(|a| a.address.clone())
            .collect(),
    };
    let mut m = MargayNode::new(n.metadata.name.as_deref().unwrap_or_default(), spec);
    m.metadata.labels = n.metadata.labels.clone();
    Arc::new(m)
}

/// Node `m`'s object as its annotations would describe it ([`identity_of`] reversed).
fn node_of(m: &MargayNode) -> Arc<Node> {
    use margay_api::node::*;
    let mut n = Node::default();
    n.metadata.name = m.metadata.name.clone();
    n.metadata.labels = m.metadata.labels.clone();
    let s = &m.spec;
    let ann: BTreeMap<String, String> = [
        (ANN_ADDRESS, s.bgp_address.clone()),
        (ANN_ASN, s.as_number.map(|a| a.to_string())),
        (ANN_VXLAN_ADDRESS, s.vxlan_tunnel_address.clone()),
        (ANN_VXLAN_MAC, s.vxlan_tunnel_mac.clone()),
        (ANN_IPIP_ADDRESS, s.ipip_tunnel_address.clone()),
        (ANN_RR_CLUSTER_ID, s.route_reflector_cluster_id.clone()),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?)))
    .collect();
    n.metadata.annotations = Some(ann);
    if !s.addresses.is_empty() {
        n.status = Some(
            serde_json::from_value(serde_json::json!({"addresses": s.addresses.iter()
                .map(|a| serde_json::json!({"type": "InternalIP", "address": a}))
                .collect::<Vec<_>>()}))
            .unwrap(),
        );
    }
    Arc::new(n)
}

/// Sets the snapshot's Nodes: n1's own Node and every node's MargayNode.
fn put(s: &mut Snapshot, nodes: Known<Vec<Arc<Node>>>) {
    let me = s.node.clone();
    s.me = nodes.clone().map(|v| {
        v.into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(me.as_str()))
    });
    s.nodes = nodes.map(|v| v.iter().map(|n| identity_of(n)).collect());
}

/// The snapshot's Nodes as [`put`] takes them (n1 as its own Node, first).
fn nodes_of(s: &Snapshot) -> Known<Vec<Arc<Node>>> {
    let me = s.me.value().cloned().flatten();
    s.nodes.clone().map(|v| {
        let mut out: Vec<Arc<Node>> = me.iter().cloned().collect();
        out.extend(
            v.iter()
                .filter(|m| m.metadata.name.as_deref() != Some(s.node.as_str()))
                .map(|m| node_of(m)),
        );
        out
    })
}

impl ClusterWrites for FakeCluster {
    async fn annotate(&self, a: &Annotations) -> crate::Result<()> {
        self.writes
            .lock()
            .unwrap()
            .push(serde_json::json!({"annotate": a}));
        Ok(())
    }

    async fn identity(&self, w: &margay_api::identity::Wanted) -> crate::Result<()> {
        let m = serde_json::to_value(w.object("n1")).unwrap();
        self.writes
            .lock()
            .unwrap()
            .push(serde_json::json!({ "identity": m }));
        Ok(())
    }

    async fn node_status(&self, patch: &serde_json::Value) -> crate::Result<()> {
        self.writes.lock().unwrap().push(patch.clone());
        Ok(())
    }

    async fn valid_config(&self, _name: &str, _c: &Condition) -> crate::Result<()> {
        Ok(())
    }

    async fn valid_peer(&self, _name: &str, _c: &Condition) -> crate::Result<()> {
        Ok(())
    }

    async fn assign_tunnel(&self, t: Tunnel) -> crate::Result<Option<Ipv4Addr>> {
        self.writes
            .lock()
            .unwrap()
            .push(serde_json::json!({"assign": t.to_string()}));
        Ok(Some(match t {
            Tunnel::Vxlan => "10.244.1.0".parse().unwrap(),
            Tunnel::Ipip => "10.244.1.1".parse().unwrap(),
        }))
    }

    async fn release_tunnel(&self, t: Tunnel) -> crate::Result<usize> {
        self.writes
            .lock()
            .unwrap()
            .push(serde_json::json!({"release": t.to_string()}));
        Ok(1)
    }
}

impl FakeCluster {
    /// The message of the last `MargayReady` written.
    fn condition(&self) -> Option<String> {
        self.writes.lock().unwrap().iter().rev().find_map(|w| {
            w["status"]["conditions"][0]["message"]
                .as_str()
                .map(str::to_string)
        })
    }
}

fn node(name: &str, addr: &str) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {
                "margay.dev/bgp-address": addr, "margay.dev/bgp-asn": "64512"}},
        }))
        .unwrap(),
    )
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn pool() -> Pool {
    Pool {
        name: "p".into(),
        cidr: net("10.244.0.0/16"),
        block_size: 26,
        disabled: false,
        deleting: false,
        selector: None,
        uses: vec![],
        encapsulation: margay_api::ipam::Encapsulation::None,
        nat_outgoing: false,
    }
}

/// Three nodes; n2 and n3 own 10.244.2.0/26 and 10.244.3.0/26, learned
/// over BGP; the speaker runs, has its neighbors and is synced.
fn snapshot() -> Snapshot {
    let mut learned = LearnedRoutes::new();
    for (b, hop) in [("10.244.2.0/26", "10.0.0.2"), ("10.244.3.0/26", "10.0.0.3")] {
        learned.insert(
            b.parse().unwrap(),
            [hop.parse::<IpAddr>().unwrap()].into_iter().collect(),
        );
    }
    let mut s = Snapshot {
        node: "n1".into(),
        node_ip: "10.0.0.1/24".into(),
        bgp: true,
        mtu: 1500,
        me: Known::Unknown(Why::NotRead(None)),
        nodes: Known::Unknown(Why::NotRead(None)),
        alive: BTreeSet::new(),
        configs: Known::Fresh(vec![]),
        peers: Known::Fresh(vec![]),
        pools: Known::Fresh(vec![pool()]),
        own_blocks: Known::Fresh(Local::blocks([net("10.244.1.0/26")])),
        passwords: BTreeMap::new(),
        host: Known::Fresh(vec![("eth0".into(), net("10.0.0.1/24"))]),
        tunnels: Default::default(),
        leader: true,
        speaker: SpeakerView::default(),
        policy_stale: None,
    };
    put(
        &mut s,
        Known::Fresh(vec![
            node("n1", "10.0.0.1/24"),
            node("n2", "10.0.0.2/24"),
            node("n3", "10.0.0.3/24"),
        ]),
    );
    let p = plan(&s);
    let super::plan::SpeakerPlan::Run { settings, live, .. } = p.speaker else {
        panic!("{:?}", p.speaker)
    };
    s.speaker = SpeakerView {
        settings: Some(settings),
        live: Some(live),
        neighbors: vec![],
        neighbors_set: true,
        learned: Some(learned),
        synced: true,
        age: Duration::from_secs(300),
    };
    s
}

async fn pass(s: &Snapshot, dp: &FakeDataplane, bgp: &mut FakeBgp, c: &FakeCluster) -> Vec<String> {
    bgp.view = s.speaker.clone();
    sentences(apply(plan(s), dp, bgp, c).await.status.problems)
}

/// What passes with tunnels run against: the fakes, and the tunnel state
/// one pass leaves the next.
fn with_tunnels() -> (FakeDataplane, FakeBgp, FakeCluster, super::Tunnels) {
    with_tunnels_on(FakeDataplane::default())
}

/// [`with_tunnels`] over the kernel `dp`.
fn with_tunnels_on(dp: FakeDataplane) -> (FakeDataplane, FakeBgp, FakeCluster, super::Tunnels) {
    let (bgp, c, tunnels) = Default::default();
    (dp, bgp, c, tunnels)
}

/// A stale route of Margay's (a block that moved away) and the two the
/// snapshot wants, one of them with a wrong next hop.
async fn kernel_with_history() -> FakeDataplane {
    let dp = FakeDataplane::default();
    for (b, hop) in [("10.244.2.0/26", "10.0.0.9"), ("10.244.9.0/26", "10.0.0.4")] {
        dp.set_remote_route(net(b), Via::Native(hop.parse().unwrap()))
            .await
            .unwrap();
    }
    dp
}

/// What `/status` says of each problem.
fn sentences(problems: Vec<margay_api::status::Problem>) -> Vec<String> {
    problems.into_iter().map(|p| p.message).collect()
}

/// `what` is among the pass's problems and in the Node condition.
fn reported(problems: &[String], c: &FakeCluster, what: &str) {
    assert!(
        problems.iter().any(|p| p.contains(what)),
        "{what}: {problems:?}"
    );
    let cond = c.condition().unwrap_or_default();
    assert!(cond.contains(what), "{what}: {cond}");
}

fn routes(dp: &FakeDataplane) -> BTreeMap<IpNetwork, Via> {
    dp.remote_routes()
}

fn native(s: &str) -> Via {
    Via::Native(s.parse().unwrap())
}

#[tokio::test]
async fn a_complete_synced_pass_installs_and_removes() {
    let dp = kernel_with_history().await;
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    let problems = pass(&snapshot(), &dp, &mut bgp, &c).await;
    assert!(problems.is_empty(), "{problems:?}");
    let want: BTreeMap<_, _> = [
        (net("10.244.2.0/26"), native("10.0.0.2")),
        (net("10.244.3.0/26"), native("10.0.0.3")),
    ]
    .into();
    assert_eq!(routes(&dp), want);
    assert_eq!(c.condition().as_deref(), Some("routing is complete"));
    assert!(bgp.calls.contains(&"neighbors".to_string()));
}

#[tokio::test]
async fn an_unknown_or_stale_input_removes_nothing() {
    type Degrade = fn(&mut Snapshot);
    let cases: [(&str, Degrade); 6] = [
        ("pools unknown", |s| {
            s.pools = Known::Unknown(Why::NotListed {
                what: "IPPools",
                last: None,
            })
        }),
        ("pools stale", |s| {
            s.pools = std::mem::replace(&mut s.pools, Known::Unknown(Why::NotRead(None)))
                .failed(broken("IPPools"))
        }),
        ("nodes unknown", |s| {
            put(
                s,
                Known::Unknown(Why::NotListed {
                    what: "Nodes",
                    last: None,
                }),
            )
        }),
        ("nodes stale", |s| {
            let stale = nodes_of(s).failed(broken("Nodes"));
            put(s, stale)
        }),
        ("blocks unknown", |s| {
            s.own_blocks = Known::Unknown(Why::Local {
                what: "read this node's blocks",
                error: "injected".into(),
            })
        }),
        ("speaker not resynced", |s| {
            s.speaker.synced = false;
            s.speaker.age = Duration::from_secs(5);
        }),
    ];
    for (what, degrade) in cases {
        let dp = kernel_with_history().await;
        let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
        let mut s = snapshot();
        degrade(&mut s);
        let problems = pass(&s, &dp, &mut bgp, &c).await;
        let got = routes(&dp);
        assert!(
            got.contains_key(&net("10.244.9.0/26")),
            "{what}: a route was removed: {got:?}"
        );
        // Where the input still has a value, what it wants is added.
        if s.pools.value().is_some()
            && nodes_of(&s).value().is_some()
            && s.own_blocks.value().is_some()
        {
            assert_eq!(got[&net("10.244.3.0/26")], native("10.0.0.3"), "{what}");
        }
        if !what.starts_with("speaker") {
            assert!(!problems.is_empty(), "{what}: the outage is reported");
            // In the Node condition too, once this node's Node is known.
            if nodes_of(&s).value().is_some() {
                assert!(
                    c.condition().is_some_and(|m| m != "routing is complete"),
                    "{what}"
                );
            }
        }
    }
}

#[tokio::test]
async fn unknown_pools_keep_the_speakers_filter_and_nodes_its_neighbors() {
    let dp = FakeDataplane::default();
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    let mut s = snapshot();
    s.pools = Known::Unknown(Why::NotListed {
        what: "IPPools",
        last: None,
    });
    put(
        &mut s,
        Known::Unknown(Why::NotListed {
            what: "Nodes",
            last: None,
        }),
    );
    pass(&s, &dp, &mut bgp, &c).await;
    assert!(
        !bgp.calls.iter().any(|c| c == "import" || c == "neighbors"),
        "{:?}",
        bgp.calls
    );
    // A speaker that is not running yet is not started without a filter.
    let mut s = snapshot();
    s.pools = Known::Unknown(Why::NotListed {
        what: "IPPools",
        last: None,
    });
    s.speaker = SpeakerView::default();
    let mut bgp = FakeBgp::default();
    pass(&s, &dp, &mut bgp, &c).await;
    assert!(bgp.calls.is_empty(), "{:?}", bgp.calls);
    // Nor before this node's blocks are known: its first End-of-RIB would
    // tell the peers it has none, and they would drop what they keep for it.
    let mut s = snapshot();
    s.own_blocks = Known::Unknown(Why::NotRead(None));
    s.speaker = SpeakerView::default();
    let mut bgp = FakeBgp::default();
    pass(&s, &dp, &mut bgp, &c).await;
    assert!(bgp.calls.is_empty(), "{:?}", bgp.calls);
    s.own_blocks = Known::Fresh(Local::blocks([net("10.244.1.0/26")]));
    pass(&s, &dp, &mut bgp, &c).await;
    assert_eq!(bgp.calls.first().map(String::as_str), Some("start"));
}

#[tokio::test]
async fn a_refused_route_does_not_stop_the_rest_and_is_reported() {
    let dp = FakeDataplane::default();
    dp.inject(Fault::RemoteRoute(net("10.244.2.0/26")));
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    let problems = pass(&snapshot(), &dp, &mut bgp, &c).await;
    assert_eq!(routes(&dp)[&net("10.244.3.0/26")], native("10.0.0.3"));
    assert!(!routes(&dp).contains_key(&net("10.244.2.0/26")));
    reported(&problems, &c, "installing route to 10.244.2.0/26");
    // Fixed: the next pass installs it and the condition clears.
    dp.clear();
    let problems = pass(&snapshot(), &dp, &mut bgp, &c).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(routes(&dp).len(), 2);
}

#[tokio::test]
async fn a_failing_speaker_call_is_reported_and_the_rest_goes_on() {
    let dp = FakeDataplane::default();
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    bgp.fail = Some("neighbors");
    let problems = pass(&snapshot(), &dp, &mut bgp, &c).await;
    reported(&problems, &c, "BGP speaker: neighbors");
    assert!(
        bgp.calls.contains(&"originate".to_string()),
        "{:?}",
        bgp.calls
    );
    assert_eq!(routes(&dp).len(), 2, "remote routes still programmed");
}

#[tokio::test]
async fn one_bad_peer_is_contained() {
    let dp = FakeDataplane::default();
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    let mut s = snapshot();
    let mut bad = BGPPeer::new(
        "typo",
        BGPPeerSpec {
            peer_ip: Some("10.0.0.300".into()),
            as_number: Some(65000),
            ..Default::default()
        },
    );
    bad.status = None;
    s.peers = Known::Fresh(vec![Arc::new(bad)]);
    let problems = pass(&s, &dp, &mut bgp, &c).await;
    assert!(
        problems.iter().any(|p| p.contains("BGPPeer typo ignored")),
        "{problems:?}"
    );
    let addrs: BTreeSet<IpAddr> = bgp.view.neighbors.iter().map(|n| n.address).collect();
    assert_eq!(
        addrs,
        ["10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    );
}

/// A BGPPeer's `bfd` (as written in YAML) reaches the speaker's
/// neighbor: `{}` is on with 300 ms × 3, a field overrides its default.
#[tokio::test]
async fn a_peers_bfd_reaches_the_speaker() {
    let dp = FakeDataplane::default();
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    let mut s = snapshot();
    let peer = |name: &str, ip: &str, bfd: serde_json::Value| -> Arc<BGPPeer> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "margay.dev/v1", "kind": "BGPPeer",
                "metadata": {"name": name},
                "spec": {"peerIP": ip, "asNumber": 65000, "bfd": bfd},
            }))
            .unwrap(),
        )
    };
    s.peers = Known::Fresh(vec![
        peer("tor-a", "10.99.0.253", serde_json::json!({})),
        peer(
            "tor-b",
            "10.99.0.252",
            serde_json::json!({"minRxIntervalMs": 100}),
        ),
    ]);
    pass(&s, &dp, &mut bgp, &c).await;
    let bfd = |ip: &str| {
        let ip: IpAddr = ip.parse().unwrap();
        let n = bgp.view.neighbors.iter().find(|n| n.address == ip);
        n.unwrap_or_else(|| panic!("{ip}: {:?}", bgp.view.neighbors))
            .bfd
    };
    let d = margay_bgp::config::BfdSettings::default();
    assert_eq!(bfd("10.99.0.253"), Some(d));
    let fast = margay_bgp::config::BfdSettings {
        min_rx_ms: 100,
        ..d
    };
    assert_eq!(bfd("10.99.0.252"), Some(fast));
    assert_eq!(bfd("10.0.0.2"), None, "node peers: no BFD unless asked");
}

/// A BGPConfiguration named `default` with `spec`.
fn config(spec: serde_json::Value) -> Arc<margay_api::bgp::BGPConfiguration> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "margay.dev/v1", "kind": "BGPConfiguration",
            "metadata": {"name": "default"}, "spec": spec,
        }))
        .unwrap(),
    )
}

#[tokio::test]
async fn communities_and_restart_time_apply_live_while_an_as_change_restarts() {
    let dp = kernel_with_history().await;
    let c = FakeCluster::default();
    // Communities and the restart time: the running speaker takes them.
    let mut s = snapshot();
    s.configs = Known::Fresh(vec![config(
        serde_json::json!({"communities": ["64512:100"], "restartTimeSeconds": 60}),
    )]);
    let mut bgp = FakeBgp::default();
    pass(&s, &dp, &mut bgp, &c).await;
    assert!(bgp.calls.contains(&"live".to_string()), "{:?}", bgp.calls);
    assert!(!bgp.calls.contains(&"start".to_string()), "{:?}", bgp.calls);
    let live = bgp.view.live.clone().unwrap();
    assert_eq!(
        (live.restart_time, live.communities),
        (60, vec!["64512:100".to_string()])
    );
    // The AS: a restart, after which nothing is removed until the new
    // sessions have relearned everything.
    s.configs = Known::Fresh(vec![config(serde_json::json!({"asNumber": 65001}))]);
    let mut bgp = FakeBgp::default();
    pass(&s, &dp, &mut bgp, &c).await;
    assert_eq!(bgp.calls.first().map(String::as_str), Some("start"));
    assert!(!bgp.view.neighbors_set || bgp.view.learned.as_ref().is_some_and(|l| l.is_empty()));
    // The next pass sees the restarted speaker: nothing learned yet, so
    // the kernel keeps every route it had (this one only the old speaker
    // had learned).
    dp.set_remote_route(net("10.244.9.0/26"), native("10.0.0.4"))
        .await
        .unwrap();
    s.speaker = bgp.view.clone();
    s.speaker.synced = false;
    bgp.calls.clear();
    pass(&s, &dp, &mut bgp, &c).await;
    assert!(
        routes(&dp).contains_key(&net("10.244.9.0/26")),
        "{:?}",
        routes(&dp)
    );
    assert!(routes(&dp).contains_key(&net("10.244.2.0/26")));
}

/// `n` with `ann` added to its annotations.
fn annotated(n: &Arc<Node>, ann: &[(&str, &str)]) -> Arc<Node> {
    let mut n = (**n).clone();
    let a = n.metadata.annotations.get_or_insert_with(Default::default);
    for (k, v) in ann {
        a.insert((*k).into(), (*v).into());
    }
    Arc::new(n)
}

/// Runs passes as the routing loop does (its tunnel memory carried from
/// one to the next, another pass at once while it asks for one).
async fn settle(
    s: &mut Snapshot,
    tunnels: &mut super::Tunnels,
    dp: &FakeDataplane,
    bgp: &mut FakeBgp,
    c: &FakeCluster,
) -> Vec<String> {
    for _ in 0..5 {
        s.tunnels = tunnels.inputs();
        bgp.view = s.speaker.clone();
        let p = plan(s);
        let (used, announced) = (p.tunnels_used, p.tunnels_announced);
        let out = apply(p, dp, bgp, c).await;
        // This node's Node and MargayNode as the next pass would read them.
        for w in c.writes.lock().unwrap().iter() {
            if let Some(a) = w.get("annotate").and_then(|a| a.as_object()) {
                s.me = s.me.clone().map(|me| {
                    me.map(|n| {
                        let mut n = (*n).clone();
                        let ann = n.metadata.annotations.get_or_insert_with(Default::default);
                        for (k, v) in a {
                            match v.as_str() {
                                Some(v) => ann.insert(k.clone(), v.into()),
                                None => ann.remove(k),
                            };
                        }
                        Arc::new(n)
                    })
                });
            }
            if let Some(m) = w.get("identity") {
                let m: Arc<MargayNode> = Arc::new(serde_json::from_value(m.clone()).unwrap());
                let mut all: Vec<_> = s.nodes.value().cloned().unwrap_or_default();
                all.retain(|n| n.metadata.name != m.metadata.name);
                all.insert(0, m);
                s.nodes = Known::Fresh(all);
            }
        }
        if !tunnels.update(used, announced, &out) {
            return sentences(out.status.problems);
        }
    }
    panic!("the passes did not settle");
}

/// What n1's Node says under `key`; its MargayNode must say the same.
fn n1_annotation(s: &Snapshot, key: &str) -> Option<String> {
    let me = s.me.value().cloned().flatten().unwrap();
    let said = me
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key).cloned());
    let written = identity_of(&me);
    let mine = s
        .nodes
        .value()
        .unwrap()
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("n1"))
        .cloned();
    assert_eq!(
        mine.map(|m| m.spec.clone()),
        Some(written.spec.clone()),
        "n1's MargayNode and annotations differ"
    );
    said
}

fn with_encap(s: &mut Snapshot, e: margay_api::ipam::Encapsulation) {
    let mut p = pool();
    p.encapsulation = e;
    s.pools = Known::Fresh(vec![p]);
}

#[tokio::test]
async fn a_pool_switched_between_encapsulations_never_breaks_a_route_first() {
    use margay_api::ipam::Encapsulation;
    use margay_api::node::{ANN_IPIP_ADDRESS, ANN_VXLAN_ADDRESS, ANN_VXLAN_MAC};
    let (dp, mut bgp, c, mut tunnels) = with_tunnels();
    let mut s = snapshot();
    let b2 = net("10.244.2.0/26");
    // n1 as the passes left it; n2 and n3 announcing `ann` (only).
    let nodes_with = |s: &Snapshot, ann: &[&[(&str, &str)]; 2]| {
        let bare = nodes_of(&snapshot()).value().unwrap().clone();
        Known::Fresh(vec![
            nodes_of(s).value().unwrap()[0].clone(),
            annotated(&bare[1], ann[0]),
            annotated(&bare[2], ann[1]),
        ])
    };
    // IPIP: tunl0 first (address allocated, device up), then announced;
    // the others' blocks through tunl0 once they announce theirs.
    with_encap(&mut s, Encapsulation::Ipip);
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(
        dp.remote.lock().unwrap().ipip.map(|l| (l.tunnel_ip, l.mtu)),
        Some(("10.244.1.1".parse().unwrap(), 1480))
    );
    assert_eq!(
        n1_annotation(&s, ANN_IPIP_ADDRESS).as_deref(),
        Some("10.244.1.1")
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("has not published its tunl0 address"))
    );
    assert!(
        routes(&dp).is_empty(),
        "nothing sent where it cannot arrive"
    );
    let n = nodes_with(
        &s,
        &[
            &[(ANN_IPIP_ADDRESS, "10.244.2.1")],
            &[(ANN_IPIP_ADDRESS, "10.244.3.1")],
        ],
    );
    put(&mut s, n);
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(routes(&dp)[&b2], Via::Ipip("10.0.0.2".parse().unwrap()));
    let guarded = |dp: &FakeDataplane| filter(dp).map(|f| (f.guard.vxlan, f.guard.ipip));
    assert_eq!(guarded(&dp), Some((false, true)), "IPIP only");

    // Switched to VXLAN: this node's VTEP first; the others' blocks keep
    // their IPIP routes until they announce theirs, tunl0 lingers.
    with_encap(&mut s, Encapsulation::Vxlan);
    // tunl0's linger starts only once n1 is seen announcing its VTEP (the
    // others route n1's blocks IPIP until then).
    s.tunnels = tunnels.inputs();
    bgp.view = s.speaker.clone();
    let p = plan(&s);
    let (used, announced) = (p.tunnels_used, p.tunnels_announced);
    assert!(!announced, "n1's VTEP is not listed yet");
    let out = apply(p, &dp, &mut bgp, &c).await;
    tunnels.update(used, announced, &out);
    assert_eq!(
        tunnels.unused_since.ipip, None,
        "lingering before announced"
    );
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    // The watch brings n1's own MargayNode back: the next pass starts it.
    assert!(plan(&s).tunnels_announced);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(
        tunnels.unused_since.ipip.is_some(),
        "lingering once announced"
    );
    assert!(dp.remote.lock().unwrap().vxlan.is_some());
    assert_eq!(
        n1_annotation(&s, ANN_VXLAN_ADDRESS).as_deref(),
        Some("10.244.1.0")
    );
    assert_eq!(
        n1_annotation(&s, ANN_IPIP_ADDRESS),
        None,
        "no longer announced"
    );
    assert_eq!(
        routes(&dp)[&b2],
        Via::Ipip("10.0.0.2".parse().unwrap()),
        "kept"
    );
    assert!(dp.remote.lock().unwrap().ipip.is_some(), "lingers");
    // Past the linger, but the others do not announce VXLAN yet, so they
    // still send this node's blocks IPIP: tunl0 stays.
    tunnels.unused_since.ipip = Some(std::time::Instant::now() - super::plan::TUNNEL_LINGER);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(
        dp.remote.lock().unwrap().ipip.is_some(),
        "retired before the others switched"
    );
    tunnels.unused_since.ipip = Some(std::time::Instant::now());
    let vtep2 = [
        (ANN_VXLAN_ADDRESS, "10.244.2.0"),
        (ANN_VXLAN_MAC, "66:00:00:00:00:02"),
    ];
    let vtep3 = [
        (ANN_VXLAN_ADDRESS, "10.244.3.0"),
        (ANN_VXLAN_MAC, "66:00:00:00:00:03"),
    ];
    let n = nodes_with(&s, &[&vtep2, &vtep3]);
    put(&mut s, n);
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(routes(&dp)[&b2], Via::Vxlan("10.244.2.0".parse().unwrap()));
    assert!(dp.remote.lock().unwrap().ipip.is_some(), "still lingers");
    assert_eq!(
        guarded(&dp),
        Some((true, true)),
        "tunl0 still takes packets"
    );
    assert!(
        !c.writes
            .lock()
            .unwrap()
            .iter()
            .any(|w| w.get("release").is_some())
    );
    // After the linger: tunl0's address goes, and then back to IPAM.
    tunnels.unused_since.ipip = Some(std::time::Instant::now() - super::plan::TUNNEL_LINGER);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(dp.remote.lock().unwrap().ipip.is_none());
    assert_eq!(guarded(&dp), Some((true, false)), "tunl0 retired");
    let releases: Vec<_> = c
        .writes
        .lock()
        .unwrap()
        .iter()
        .filter_map(|w| w.get("release").cloned())
        .collect();
    assert_eq!(releases, [serde_json::json!("IPIP")]);
    assert!(tunnels.next_wake(Duration::from_secs(30)) == Duration::from_secs(30));

    // And back to IPIP: the VXLAN routes stay until tunl0 is up again and
    // the others announce theirs.
    with_encap(&mut s, Encapsulation::Ipip);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(
        routes(&dp)[&b2],
        Via::Vxlan("10.244.2.0".parse().unwrap()),
        "kept"
    );
    assert!(dp.remote.lock().unwrap().ipip.is_some());
    let n = nodes_with(
        &s,
        &[
            &[(ANN_IPIP_ADDRESS, "10.244.2.1")],
            &[(ANN_IPIP_ADDRESS, "10.244.3.1")],
        ],
    );
    put(&mut s, n);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(routes(&dp)[&b2], Via::Ipip("10.0.0.2".parse().unwrap()));
    // A node with no blocks (no route of n1's goes to it) that has not
    // brought tunl0 up still sends n1's blocks VXLAN: the VXLAN device
    // stays past its linger until it announces tunl0.
    let mut with_n4 = nodes_of(&s).value().unwrap().clone();
    with_n4.push(node("n4", "10.0.0.4/24"));
    put(&mut s, Known::Fresh(with_n4.clone()));
    tunnels.unused_since.vxlan = Some(std::time::Instant::now() - super::plan::TUNNEL_LINGER);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(
        dp.remote.lock().unwrap().vxlan.is_some(),
        "retired before n4 switched"
    );
    let n4 = with_n4.pop().unwrap();
    with_n4.push(annotated(&n4, &[(ANN_IPIP_ADDRESS, "10.244.4.1")]));
    put(&mut s, Known::Fresh(with_n4));
    tunnels.unused_since.vxlan = Some(std::time::Instant::now() - super::plan::TUNNEL_LINGER);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(dp.remote.lock().unwrap().vxlan.is_none(), "retired");
    assert_eq!(n1_annotation(&s, ANN_VXLAN_ADDRESS), None);
}

#[tokio::test]
async fn unknown_pools_retire_nothing_and_a_kernel_without_ipip_keeps_its_routes() {
    use margay_api::ipam::Encapsulation;
    use margay_api::node::ANN_IPIP_ADDRESS;
    let (dp, mut bgp, c, mut tunnels) = with_tunnels_on(kernel_with_history().await);
    let mut s = snapshot();
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    let before = routes(&dp);
    // No IPIP in this kernel: said on the Node, nothing announced, the
    // native routes stay.
    dp.inject(Fault::Ipip);
    with_encap(&mut s, Encapsulation::Ipip);
    let all = nodes_of(&s).value().unwrap().clone();
    put(
        &mut s,
        Known::Fresh(vec![
            all[0].clone(),
            annotated(&all[1], &[(ANN_IPIP_ADDRESS, "10.244.2.1")]),
            annotated(&all[2], &[(ANN_IPIP_ADDRESS, "10.244.3.1")]),
        ]),
    );
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    reported(&problems, &c, "cannot do IPIP");
    assert_eq!(n1_annotation(&s, ANN_IPIP_ADDRESS), None);
    assert_eq!(routes(&dp), before);
    // The kernel gets IPIP: routes move to tunl0.
    dp.clear();
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(
        routes(&dp)[&net("10.244.3.0/26")],
        Via::Ipip("10.0.0.3".parse().unwrap())
    );
    // The IPIP pool being deleted: tunl0 retires after the linger, so its
    // address does not hold the deletion back.
    let mut deleting = pool();
    deleting.encapsulation = Encapsulation::Ipip;
    deleting.deleting = true;
    let mut p2 = pool();
    p2.encapsulation = Encapsulation::None;
    p2.cidr = net("10.245.0.0/16");
    s.pools = Known::Fresh(vec![deleting, p2]);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(
        tunnels.unused_since.ipip.is_some(),
        "a deleting pool uses no tunnel"
    );
    tunnels.unused_since.ipip = Some(std::time::Instant::now() - super::plan::TUNNEL_LINGER);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(dp.remote.lock().unwrap().ipip.is_none());
    assert!(
        c.writes
            .lock()
            .unwrap()
            .iter()
            .any(|w| w["release"] == "IPIP")
    );
    // Back in use, then pools unreadable long after: tunl0 and its
    // address stay.
    with_encap(&mut s, Encapsulation::Ipip);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(dp.remote.lock().unwrap().ipip.is_some());
    with_encap(&mut s, Encapsulation::None);
    s.pools = std::mem::replace(&mut s.pools, Known::Unknown(Why::NotRead(None)))
        .failed(broken("IPPools"));
    tunnels.unused_since.ipip = Some(std::time::Instant::now() - super::plan::TUNNEL_LINGER * 3);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(dp.remote.lock().unwrap().ipip.is_some());
    assert_eq!(
        n1_annotation(&s, ANN_IPIP_ADDRESS).as_deref(),
        Some("10.244.1.1")
    );
}

/// `n` with `addrs` ((type, address)) as its status addresses.
fn with_addresses(n: &Arc<Node>, addrs: &[(&str, &str)]) -> Arc<Node> {
    let mut n = (**n).clone();
    n.status = Some(
        serde_json::from_value(serde_json::json!({
            "addresses": addrs
                .iter()
                .map(|(t, a)| serde_json::json!({"type": t, "address": a}))
                .collect::<Vec<_>>(),
        }))
        .unwrap(),
    );
    Arc::new(n)
}

fn ips(a: &[&str]) -> BTreeSet<IpAddr> {
    a.iter().map(|s| s.parse().unwrap()).collect()
}

fn filter(dp: &FakeDataplane) -> Option<crate::dataplane::TunnelFilter> {
    dp.tunnel_filter.lock().unwrap().clone()
}

fn loads(dp: &FakeDataplane) -> usize {
    *dp.filter_loads.lock().unwrap()
}

#[tokio::test]
async fn the_tunnel_filter_takes_known_nodes_and_forgets_them_only_from_a_current_list() {
    use crate::dataplane::{PerTunnel, TunnelFilter};
    use margay_api::ipam::Encapsulation;
    let (dp, mut bgp, c, mut tunnels) = with_tunnels();
    // What an earlier run of the agent left: a node since gone.
    let earlier = TunnelFilter::new(
        ips(&["10.0.0.1", "10.0.0.2", "10.0.0.9"]),
        PerTunnel {
            vxlan: true,
            ipip: false,
        },
    );
    *dp.tunnel_filter.lock().unwrap() = Some(earlier.clone());
    let mut s = snapshot();
    with_encap(&mut s, Encapsulation::Vxlan);
    // Before Nodes are listed, the kernel's filter is left as it is.
    put(
        &mut s,
        Known::Unknown(Why::NotListed {
            what: "Nodes",
            last: None,
        }),
    );
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(filter(&dp), Some(earlier.clone()), "{problems:?}");
    assert_eq!(loads(&dp), 0);
    // Nor is a tunnel device made without its filter.
    assert!(dp.remote.lock().unwrap().vxlan.is_none());

    // Listed: every Node's announced, internal and external address; the
    // one no Node has any more goes.
    let all = nodes_of(&snapshot()).value().unwrap().clone();
    let n2 = with_addresses(
        &all[1],
        &[
            ("InternalIP", "192.168.0.2"),
            ("ExternalIP", "fd00::2"),
            ("Hostname", "n2"),
        ],
    );
    put(
        &mut s,
        Known::Fresh(vec![all[0].clone(), n2.clone(), all[2].clone()]),
    );
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    let want = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "192.168.0.2", "fd00::2"]);
    let f = filter(&dp).unwrap();
    assert_eq!(f.nodes, want);
    assert_eq!(
        f.guard,
        PerTunnel {
            vxlan: true,
            ipip: false
        },
        "only the tunnel this node uses"
    );
    assert_eq!(loads(&dp), 1);
    assert!(dp.remote.lock().unwrap().vxlan.is_some());
    // Nothing changed: nothing loaded.
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(loads(&dp), 1);

    // The watch breaks (stale list), then n3 is deleted and n4 joins: what
    // the stale list adds is taken, nothing is forgotten.
    let n4 = node("n4", "10.0.0.4/24");
    put(
        &mut s,
        Known::Stale(
            vec![all[0].clone(), n2.clone(), n4.clone()],
            broken("Nodes"),
        ),
    );
    // (Single passes: `settle` takes its own annotations as a fresh list.)
    let problems = pass(&s, &dp, &mut bgp, &c).await;
    assert!(!problems.is_empty(), "the outage is reported");
    let mut kept = want.clone();
    kept.insert("10.0.0.4".parse().unwrap());
    assert_eq!(filter(&dp).unwrap().nodes, kept);
    // Unknown again (the lists are gone): untouched.
    put(
        &mut s,
        Known::Unknown(Why::Failed {
            op: Some(Op::List),
            error: "Nodes".into(),
        }),
    );
    let before = loads(&dp);
    pass(&s, &dp, &mut bgp, &c).await;
    assert_eq!(filter(&dp).unwrap().nodes, kept);
    assert_eq!(loads(&dp), before);
    // Current again: n3 goes.
    put(&mut s, Known::Fresh(vec![all[0].clone(), n2, n4]));
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(
        filter(&dp).unwrap().nodes,
        ips(&["10.0.0.1", "10.0.0.2", "10.0.0.4", "192.168.0.2", "fd00::2"])
    );

    // A table someone changed is loaded again.
    dp.tunnel_filter.lock().unwrap().as_mut().unwrap().intact = false;
    let before = loads(&dp);
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(loads(&dp), before + 1);
    assert!(filter(&dp).unwrap().intact);
}

#[tokio::test]
async fn no_filter_without_a_tunnel_and_one_that_cannot_load_is_reported_and_retried() {
    use margay_api::ipam::Encapsulation;
    let (dp, mut bgp, c, mut tunnels) = with_tunnels_on(kernel_with_history().await);
    // Native routing: no tunnel, no table.
    let mut s = snapshot();
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(filter(&dp), None);
    // VXLAN, and nft refuses the table: said on the Node, the routes and
    // devices still made.
    dp.inject(Fault::TunnelFilter);
    with_encap(&mut s, Encapsulation::Vxlan);
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    reported(&problems, &c, "the tunnel filter (inet margay_tunnel)");
    assert_eq!(filter(&dp), None);
    assert!(dp.remote.lock().unwrap().vxlan.is_some());
    // Fixed: the next pass loads it and the condition clears.
    dp.clear();
    let problems = settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert!(
        !problems.iter().any(|p| p.contains("tunnel filter")),
        "{problems:?}"
    );
    assert!(filter(&dp).is_some_and(|f| f.guard.vxlan && f.nodes.len() == 3));
    assert!(
        c.condition().is_some_and(|m| !m.contains("tunnel filter")),
        "{:?}",
        c.condition()
    );
}

#[tokio::test]
async fn this_nodes_margaynode_is_written_once_and_again_only_on_change() {
    let (dp, mut bgp, c, mut tunnels) = with_tunnels();
    let mut s = snapshot();
    let identities = |c: &FakeCluster| {
        c.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.get("identity").is_some())
            .count()
    };
    // The fixture's n1 has what annotations said but no owner: written.
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(identities(&c), 1);
    let mine = s.nodes.value().unwrap()[0].clone();
    assert_eq!(mine.spec.bgp_address.as_deref(), Some("10.0.0.1/24"));
    // Nothing changed (the Node's status rewritten, say): nothing written.
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(identities(&c), 1);
    // The Node is labelled: the MargayNode carries the label (BGPPeer
    // selectors on other nodes match it).
    s.me = s.me.clone().map(|me| {
        me.map(|n| {
            let mut n = (*n).clone();
            n.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert("rack".into(), "r1".into());
            Arc::new(n)
        })
    });
    settle(&mut s, &mut tunnels, &dp, &mut bgp, &c).await;
    assert_eq!(identities(&c), 2);
    assert_eq!(
        kube::ResourceExt::labels(&*s.nodes.value().unwrap()[0])["rack"],
        "r1"
    );
    // MargayNodes not listed: nothing is written (what is there is not known).
    s.nodes = Known::Unknown(Why::NotListed {
        what: "MargayNodes",
        last: None,
    });
    s.me = s.me.clone().map(|me| {
        me.map(|n| {
            let mut n = (*n).clone();
            n.metadata.labels = None;
            Arc::new(n)
        })
    });
    pass(&s, &dp, &mut bgp, &c).await;
    assert_eq!(identities(&c), 2);
}

#[tokio::test]
async fn a_node_without_a_margaynode_is_not_peered_with() {
    let dp = FakeDataplane::default();
    let (mut bgp, c) = (FakeBgp::default(), FakeCluster::default());
    let mut s = snapshot();
    // n3's agent has not written its MargayNode yet (its Node alone is not
    // read: the others do not watch Nodes).
    s.nodes = s.nodes.clone().map(|v| {
        v.into_iter()
            .filter(|n| n.metadata.name.as_deref() != Some("n3"))
            .collect()
    });
    pass(&s, &dp, &mut bgp, &c).await;
    let peers: Vec<String> = bgp
        .view
        .neighbors
        .iter()
        .map(|n| n.address.to_string())
        .collect();
    assert_eq!(peers, ["10.0.0.2"]);
}

/// The watch of `what` broken (the API unreachable).
fn broken(what: &'static str) -> Why {
    Why::Broken {
        what,
        secs: 0,
        cause: Box::new(Why::NoAnswer),
    }
}
