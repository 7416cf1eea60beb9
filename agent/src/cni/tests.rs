//! The CNI service over the fake dataplane and an in-memory store.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    dp.add_pod(&plan::pod_spec(&r, &old, addrs, 1500))
        .await
        .unwrap();
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
