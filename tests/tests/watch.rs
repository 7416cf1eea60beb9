//! Watches against a real etcd + kube-apiserver: a watch whose connection
//! is lost resumes from its resourceVersion (the changes made meanwhile
//! arrive, nothing is listed again), a resourceVersion the API server no
//! longer has (it restarted, and its cache starts after it) is listed
//! again, and the leader's Node and Pod watches are metadata only.
//!
//! The watch reaches the API server through a relay the test can cut
//! (every connection dropped, new ones refused) while another client keeps
//! changing objects. LISTs are counted by the API server itself
//! (`apiserver_request_total`).

// A test's own helper tasks, ended with the test (clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use margay_api::ipam::{IPPool, IPPoolSpec};
use margay_harness::kube::{ADMIN_TOKEN, ApiServer, client_from, kubeconfig_yaml};
use margay_harness::wait;
use margay_ipam::k8s::{Watched, watch};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch as channel};

const T: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// A TCP relay to the API server that can be cut: every connection
/// through it dropped, new ones closed as they come, until restored.
struct Relay {
    port: u16,
    open: channel::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Dropping the accept loop drops the pipes it spawned (each one
        // ends when `open` is gone).
        self.task.abort();
    }
}

impl Relay {
    async fn start(to: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, _) = channel::channel(true);
        let open2 = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                if !*open2.borrow() {
                    drop(down);
                    continue;
                }
                let mut cut = open2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut.wait_for(|o| !*o) => {}
                    }
                });
            }
        });
        Self { port, open, task }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }
}

/// A client of `api` through `relay`.
async fn client_via(api: &ApiServer, relay: &Relay) -> kube::Client {
    let path = api.dir().join(format!("kubeconfig-relay-{}", relay.port));
    std::fs::write(&path, kubeconfig_yaml(relay.port, ADMIN_TOKEN)).unwrap();
    client_from(&path).await.unwrap()
}

/// Requests the API server counted for `resource` with `verb`.
async fn requests(client: &kube::Client, verb: &str, resource: &str) -> u64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("metrics");
    let (verb, resource) = (
        format!("verb=\"{verb}\""),
        format!("resource=\"{resource}\""),
    );
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains(&verb) && l.contains(&resource))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn add_pool(client: &kube::Client, name: &str, cidr: &str) {
    Api::<IPPool>::all(client.clone())
        .create(
            &PostParams::default(),
            &IPPool::new(name, IPPoolSpec::with_cidr(cidr, Some(26))),
        )
        .await
        .expect("pool");
}

async fn disable_pool(client: &kube::Client, name: &str) {
    let api = Api::<IPPool>::all(client.clone());
    let mut p = api.get(name).await.unwrap();
    p.spec.disabled = true;
    api.replace(name, &PostParams::default(), &p).await.unwrap();
}

/// What the watch holds: (pool, disabled), sorted, and whether fresh,
/// stale or unknown.
fn held(w: &Watched<IPPool>) -> (Vec<(String, bool)>, &'static str) {
    let k = w.read();
    let (state, pools) = match (k.is_fresh(), k.value()) {
        (true, v) => ("fresh", v),
        (false, Some(v)) => ("stale", Some(v)),
        (false, None) => ("unknown", None),
    };
    let mut v: Vec<(String, bool)> = pools
        .map(|v| v.iter().map(|p| (p.name_any(), p.spec.disabled)).collect())
        .unwrap_or_default();
    v.sort();
    (v, state)
}

async fn until_held(w: &Watched<IPPool>, want: &[(&str, bool)], state: &str) {
    let want: Vec<(String, bool)> = want.iter().map(|(n, d)| (n.to_string(), *d)).collect();
    wait::until_async(
        &format!("the watch to hold {want:?}, {state}"),
        T,
        POLL,
        || {
            let now = held(w);
            let ok = now.0 == want && now.1 == state;
            async move {
                if ok {
                    Ok(Some(()))
                } else {
                    Err(format!("{now:?}").into())
                }
            }
        },
    )
    .await
    .unwrap();
}

async fn until_stale(w: &Watched<IPPool>) {
    wait::until_async("the watch to notice the cut", T, POLL, || {
        let now = held(w);
        async move {
            if now.1 == "stale" {
                Ok(Some(()))
            } else {
                Err(format!("{now:?}").into())
            }
        }
    })
    .await
    .unwrap();
}

/// An API server with Margay's CRDs, a relay to it, a client each way,
/// and a watch of IPPools through the relay (its task ends with the
/// returned handle).
async fn bed() -> (
    ApiServer,
    kube::Client,
    Relay,
    Watched<IPPool>,
    tokio::task::JoinHandle<()>,
) {
    let api = ApiServer::start().await.expect("apiserver");
    let direct = api.client().await.unwrap();
    margay_harness::kube::crds::install(&direct)
        .await
        .expect("CRDs");
    let relay = Relay::start(api.port()).await;
    let via = client_via(&api, &relay).await;
    add_pool(&direct, "a", "10.1.0.0/16").await;
    let (w, task) = watch(Api::<IPPool>::all(via), "IPPools", Arc::new(Notify::new()));
    let task = tokio::spawn(task);
    until_held(&w, &[("a", false)], "fresh").await;
    (api, direct, relay, w, task)
}

#[tokio::test]
async fn a_watch_whose_connection_is_lost_resumes_without_listing_again() {
    let (api, direct, relay, w, task) = bed().await;
    let lists = requests(&direct, "LIST", "ippools").await;
    let watches = requests(&direct, "WATCH", "ippools").await;
    assert_eq!(lists, 1, "the first list");

    relay.cut();
    until_stale(&w).await;
    // The outage keeps what was held.
    assert_eq!(held(&w), (vec![("a".into(), false)], "stale"));
    // Changes while the watch is away.
    add_pool(&direct, "b", "10.2.0.0/16").await;
    disable_pool(&direct, "a").await;
    relay.restore();

    until_held(&w, &[("a", true), ("b", false)], "fresh").await;
    assert_eq!(
        requests(&direct, "LIST", "ippools").await,
        lists,
        "the watch resumed from its resourceVersion: no LIST"
    );
    assert!(requests(&direct, "WATCH", "ippools").await > watches);

    // A resumed watch on which nothing changes becomes current too.
    relay.cut();
    until_stale(&w).await;
    relay.restore();
    until_held(&w, &[("a", true), ("b", false)], "fresh").await;
    assert_eq!(requests(&direct, "LIST", "ippools").await, lists);
    task.abort();
    drop(api);
}

#[tokio::test]
async fn a_version_a_restarted_api_server_no_longer_has_is_listed_again() {
    let (mut api, direct, relay, w, task) = bed().await;
    relay.cut();
    until_stale(&w).await;
    // A change, then the API server restarts: its cache starts after the
    // change, so the watch's resourceVersion is too old for it (410).
    add_pool(&direct, "b", "10.2.0.0/16").await;
    api.stop_apiserver().unwrap();
    api.start_apiserver().await.unwrap();
    let direct = api.client().await.unwrap();
    // The restarted API server counts from zero.
    assert_eq!(requests(&direct, "LIST", "ippools").await, 0);
    relay.restore();

    until_held(&w, &[("a", false), ("b", false)], "fresh").await;
    assert_eq!(
        requests(&direct, "LIST", "ippools").await,
        1,
        "410 Gone: listed again, once"
    );
    task.abort();
}

/// `Api<PartialObjectMeta<_>>` (what the leader's store watches Nodes and
/// Pods through) asks for metadata only, lists and watches: the API
/// server answers `PartialObjectMetadata`, with managedFields (which the
/// store drops).
#[tokio::test]
async fn partial_object_meta_lists_and_watches_are_metadata_only() {
    let api = ApiServer::start().await.expect("apiserver");
    let client = api.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n1"},
                "status": {"capacity": {"cpu": "2"}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let meta: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
    let list = margay_ipam::k8s::list_all(&meta, &Default::default())
        .await
        .unwrap();
    let n = &list.items[0];
    assert_eq!(n.types.as_ref().unwrap().kind, "PartialObjectMetadata");
    assert!(n.metadata.managed_fields.is_some(), "the API sends them");

    use futures::StreamExt;
    let mut events = meta
        .watch(&WatchParams::default(), &list.resource_version)
        .await
        .unwrap()
        .boxed();
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "n2"}})).unwrap(),
        )
        .await
        .unwrap();
    match tokio::time::timeout(T, events.next()).await.unwrap() {
        Some(Ok(WatchEvent::Added(n))) => {
            assert_eq!(n.name_any(), "n2");
            assert_eq!(n.types.unwrap().kind, "PartialObjectMetadata");
        }
        other => panic!("{other:?}"),
    }
}

/// A node's IPAM view is kept by its watch of the blocks: other nodes'
/// changes come in by it and nothing is listed again, not even before
/// answering `Exhausted` (the allocators used to list every block at
/// start and before each "no").
#[tokio::test]
async fn a_nodes_ipam_view_is_kept_by_its_watch_without_lists() {
    use margay_api::ipam::{AllowedUse, IPAMConfigurationSpec, PodRef};
    use margay_ipam::k8s::KubeStore;
    use margay_ipam::{Allocator, Assign, Error, Options};

    let (_api, client) = margay_tests::cluster(
        &["n1", "n2"],
        "10.90.0.0/28",
        28,
        IPAMConfigurationSpec {
            max_blocks_per_node: 1,
            ..Default::default()
        },
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    let mut node = |name: &str| {
        let (store, watches) = KubeStore::watched(client.clone(), name, Arc::new(Notify::new()));
        tasks.spawn(watches);
        Allocator::start(Arc::new(store), name, Options::default())
    };
    let (a, b) = (node("n1"), node("n2"));
    let req = |h: &str| Assign {
        handle: h.to_string(),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: h.to_string(),
            uid: format!("uid-{h}"),
        }),
        use_: AllowedUse::Workload,
    };
    assert_eq!(b.blocks().await.unwrap(), vec![], "n2's view, listed");
    for i in 0..16 {
        a.assign(req(&format!("a{i}"))).await.unwrap();
    }
    let e = a.assign(req("a16")).await.unwrap_err();
    assert!(matches!(e, Error::Exhausted { .. }), "{e}");
    // n1 frees an address: n2 learns it from its watch and borrows it.
    let freed = a.release("a3").await.unwrap();
    let got = wait::until_async("n2 to borrow the freed address", T, POLL, || {
        let b = b.clone();
        let req = req("b0");
        async move {
            match b.assign(req).await {
                Ok(n) => Ok(Some(n)),
                Err(e @ Error::Exhausted { .. }) => Err(e.to_string().into()),
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got[0].ip(), freed[0]);
    assert!(matches!(
        b.assign(req("b1")).await.unwrap_err(),
        Error::Exhausted { .. }
    ));
    assert_eq!(
        requests(&client, "LIST", "ipamblocks").await,
        2,
        "one list per node's watch, none after"
    );
}
