//! Kubernetes NetworkPolicy on this node: watches on Pods, Namespaces and
//! NetworkPolicies and this node's endpoints feed the [`engine`], whose
//! changes are loaded into the `inet margay_policy` table (one netlink
//! transaction per batch of changes; the whole table through `nft -f` at
//! start, after a failure and every resync interval).
//!
//! The CNI service registers each pod it wires ([`PolicyHandle::added`])
//! as soon as it has its addresses, so the rules are made while the pod
//! is wired, and its ADD answers only once they are in the kernel (or
//! fails after a bounded wait with the reason), so no pod is reachable
//! outside its policies at any moment after its ADD returns. Start-up
//! registers the pods already wired, from their interfaces' aliases.
//!
//! - [`engine`]: the engine's state, pure (the crate `margay-netpol`);
//! - [`events`]: Kubernetes Events on policies not enforced as written;
//! - [`slices`]: this node's endpoint slices, what the other nodes'
//!   policies know of its pods (the other nodes' are read, while a policy
//!   here names pods, instead of a watch of every Pod).

pub use margay_netpol as engine;
pub mod events;
pub mod slices;

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use tokio::sync::{mpsc, oneshot};

pub use engine::{Endpoint, Engine, Event, Scope};
use margay_api::slice::MargayEndpointSlice;
use margay_policy::PodKey;

use crate::dataplane::ownership::{NFT_POLICY_TABLE, POLICY_TABLE_NAME};
use crate::error::{Error, RulesWait};

/// How long an ADD waits for its pod's rules before it fails.
pub const ADD_WAIT: Duration = Duration::from_secs(20);

enum Msg {
    /// An endpoint, its answer, and a signal that its Pod is not known.
    Added(Endpoint, oneshot::Sender<()>, oneshot::Sender<()>),
    /// What the ADD read of its Pod: the Pod, none (404), or no answer.
    Read(PodKey, PodRead),
    Deleted(String),
    /// A snapshot of the engine's view for `/status` and margayctl.
    Status(oneshot::Sender<Status>),
}

/// What the policy engine reports (`/status`, metrics, the Node
/// condition, Events).
pub use margay_api::status::PolicyStatus as Status;

/// What an ADD read of its Pod.
enum PodRead {
    Found(Box<core::Pod>),
    NotFound,
    Unreadable,
}

/// How long an ADD waits for its rules before it reads its Pod itself
/// (at once when the watch has not shown the Pod).
const WATCH_GRACE: Duration = Duration::from_millis(300);

/// The CNI service's way to the policy engine.
#[derive(Clone)]
pub struct PolicyHandle {
    tx: mpsc::UnboundedSender<Msg>,
    client: kube::Client,
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyHandle")
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Added(e, _, _) => write!(f, "Added({e:?})"),
            Msg::Read(k, _) => write!(f, "Read({k})"),
            Msg::Deleted(i) => write!(f, "Deleted({i})"),
            Msg::Status(_) => f.write_str("Status"),
        }
    }
}

impl PolicyHandle {
    /// A handle (reading Pods with `client`) and the receiving end [`run`]
    /// takes.
    pub fn new(client: kube::Client) -> (Self, PolicyInbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx, client }, PolicyInbox(rx))
    }

    /// Registers `ep` and waits until its rules are in the kernel (at
    /// most `within`); the error says what it still waits for.
    ///
    /// When the watch has not shown the Pod, no rules are needed if its
    /// namespace has no policy; otherwise (or when the watch has not shown
    /// it within a moment) the Pod is read: found, its labels are used; not found (no Kubernetes Pod),
    /// it has no rules; unreadable, its interface is quarantined (nothing
    /// in or out but replies) until its labels are known. Only an engine
    /// that has never listed (an agent started while the API is down)
    /// makes an ADD fail.
    pub async fn added(&self, ep: Endpoint, within: Duration) -> crate::Result<()> {
        let key = ep.pod.clone();
        let host_if = ep.host_if.clone();
        let (tx, mut rx) = oneshot::channel();
        let (unknown_tx, unknown) = oneshot::channel();
        let t0 = tokio::time::Instant::now();
        self.tx
            .send(Msg::Added(ep, tx, unknown_tx))
            .map_err(|_| Error::PolicyEngineNotRunning)?;
        // Answered, or the engine says it does not know the Pod (then read
        // it now), or neither within a moment (read it too). The engine
        // drops that signal unsent when it knows the Pod: only a sent one
        // counts (a dropped one read every known Pod from the API).
        tokio::select! {
            biased;
            r = &mut rx => return r.map_err(|_| Error::PolicyEngineStopped),
            Ok(()) = unknown => {}
            _ = tokio::time::sleep(WATCH_GRACE) => {}
        }
        // A container that is no Pod has nothing to read: it waits for its
        // interface's sources only.
        let Some(key) = key else {
            return match tokio::time::timeout(within.saturating_sub(t0.elapsed()), rx).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Error::PolicyEngineStopped),
                Err(_) => Err(Error::RulesNotInPlace {
                    host_if,
                    secs: within.as_secs(),
                }),
            };
        };
        let api: Api<core::Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let read = match tokio::time::timeout(Duration::from_secs(3), api.get_opt(&key.name)).await
        {
            Ok(Ok(Some(p))) => PodRead::Found(Box::new(p)),
            Ok(Ok(None)) => PodRead::NotFound,
            Ok(Err(e)) => {
                tracing::info!(pod = %key, "reading the Pod for its rules: {e}");
                PodRead::Unreadable
            }
            Err(_) => PodRead::Unreadable,
        };
        let _ = self.tx.send(Msg::Read(key.clone(), read));
        let left = within.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::PolicyEngineStopped),
            Err(_) => {
                let why = match self.status().await {
                    Some(s) if !s.waiting_for.is_empty() => RulesWait::NotListed(s.waiting_for),
                    Some(Status {
                        last_error: Some(e),
                        ..
                    }) => RulesWait::LoadFailed(e),
                    Some(s) if !s.current => RulesWait::NotCurrent,
                    _ => RulesWait::PodNotSeen(key.to_string()),
                };
                Err(Error::PodRulesNotInPlace {
                    pod: key.to_string(),
                    secs: within.as_secs(),
                    why,
                })
            }
        }
    }

    /// The pod on `host_if` is gone.
    pub fn deleted(&self, host_if: &str) {
        let _ = self.tx.send(Msg::Deleted(host_if.to_string()));
    }

    /// The engine's status (`None` if it is not running).
    pub async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Status(tx)).ok()?;
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .ok()?
            .ok()
    }
}

/// The receiving end of [`PolicyHandle`]s.
#[derive(Debug)]
pub struct PolicyInbox(mpsc::UnboundedReceiver<Msg>);

/// What a test standing in for the engine hears.
#[cfg(test)]
#[derive(Debug)]
pub(crate) enum Heard {
    /// An endpoint registered, and its answer (the engine knows its Pod).
    Added(Endpoint, oneshot::Sender<()>),
    /// The ADD read its Pod from the API itself.
    Read(PodKey),
    /// An interface gone.
    Deleted(String),
}

#[cfg(test)]
impl PolicyInbox {
    /// The next message (`None` once every handle is gone).
    pub(crate) async fn next(&mut self) -> Option<Heard> {
        loop {
            if let Some(h) = Self::heard(self.0.recv().await?) {
                return Some(h);
            }
        }
    }

    /// The next message already sent, if any.
    pub(crate) fn try_next(&mut self) -> Option<Heard> {
        loop {
            if let Some(h) = Self::heard(self.0.try_recv().ok()?) {
                return Some(h);
            }
        }
    }

    fn heard(m: Msg) -> Option<Heard> {
        match m {
            Msg::Added(ep, tx, _) => Some(Heard::Added(ep, tx)),
            Msg::Read(k, _) => Some(Heard::Read(k)),
            Msg::Deleted(i) => Some(Heard::Deleted(i)),
            Msg::Status(_) => None,
        }
    }
}

fn event<K>(ev: watcher::Event<K>) -> Event<K> {
    match ev {
        watcher::Event::Init => Event::Init,
        watcher::Event::InitApply(k) => Event::InitApply(k),
        watcher::Event::InitDone => Event::InitDone,
        watcher::Event::Apply(k) => Event::Apply(k),
        watcher::Event::Delete(k) => Event::Delete(k),
    }
}

/// The policies whose rules make the kernel refuse the whole table: none
/// when it refuses it even with every policy closed (then no policy is
/// why). Each one found costs a binary search of `nft --check` runs over
/// the policies compiled here: a few seconds on a path taken only when
/// the kernel refuses what the compiler made.
async fn refused_policies(engine: &Engine) -> Vec<margay_policy::PolicyKey> {
    let suspects = engine.load_suspects();
    let loads = |closed: Vec<margay_policy::PolicyKey>| {
        let script = engine.script_closing(&closed);
        async move {
            crate::dataplane::nft_script::check(&script, NFT_POLICY_TABLE)
                .await
                .is_ok()
        }
    };
    find_refused(&suspects, loads).await
}

/// The members of `suspects` that must be closed for `loads` to hold,
/// found one at a time by binary search (`loads` holds when more are
/// closed, never less); none when closing them all does not help.
pub async fn find_refused<K, F, Fut>(suspects: &[K], loads: F) -> Vec<K>
where
    K: Clone + PartialEq,
    F: Fn(Vec<K>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if suspects.is_empty() || !loads(suspects.to_vec()).await {
        return Vec::new();
    }
    let mut bad: Vec<K> = Vec::new();
    while !loads(bad.clone()).await {
        let rest: Vec<K> = suspects
            .iter()
            .filter(|k| !bad.contains(k))
            .cloned()
            .collect();
        // The fewest of `rest`, in order, that make it load.
        let (mut lo, mut hi) = (1, rest.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let mut try_closed = bad.clone();
            try_closed.extend_from_slice(&rest[..mid]);
            if loads(try_closed).await {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        match rest.get(lo - 1) {
            Some(k) => bad.push(k.clone()),
            None => break,
        }
    }
    bad
}

/// The engine's status as the loader knows it.
fn status(engine: &Engine, watch: bool, last_error: &Option<String>) -> Status {
    let mut s = engine.status(watch);
    s.current = engine.listed() && engine.is_loaded() && last_error.is_none();
    s.last_error = last_error.clone();
    s
}

/// How long other nodes' endpoint slices stay watched after the last
/// policy with pod peers went (a policy replaced by another is no
/// re-list).
pub const REMOTE_LINGER: Duration = Duration::from_secs(300);

/// A watch of one kind.
type Watch<K> = futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// A watch of `api` (with `config`), or none (not `on`).
fn watched<K>(on: bool, api: Api<K>, config: watcher::Config) -> Option<Watch<K>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    on.then(|| {
        watcher(api, config.page_size(500))
            .default_backoff()
            .boxed()
    })
}

/// The next event of `w`, or never when there is no watch.
async fn next<K>(w: &mut Option<Watch<K>>) -> Option<Result<watcher::Event<K>, watcher::Error>> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// An attachment start-up found wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// What its alias (or IPAM) says of it.
    pub endpoint: Endpoint,
    /// Neither its alias nor IPAM says whose it is (a pod whose alias
    /// could not hold its name, crashed before IPAM recorded it): it is
    /// quarantined until its DEL.
    pub unattributed: bool,
}

/// Runs the engine of node `node` until the process ends: `initial` are
/// the attachments wired before start (from their aliases and IPAM),
/// `resync` the full reload interval. Without `watch` (NetworkPolicy
/// disabled) nothing is watched and no policy enforced, but every
/// workload interface's sources are still checked.
pub async fn run(
    client: kube::Client,
    node: String,
    inbox: PolicyInbox,
    initial: Vec<Restored>,
    resync: Duration,
    watch: bool,
    report: tokio::sync::watch::Sender<Status>,
) -> crate::Result<()> {
    let mut inbox = inbox.0;
    let mut engine = Engine::on_node(&node);
    for r in initial {
        if r.unattributed {
            engine.endpoint_unattributed(&r.endpoint.host_if, r.endpoint.ips);
        } else {
            engine.endpoint_added(r.endpoint);
        }
    }
    let here = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    // This node's pods published for the other nodes' policies.
    let mut local = slices::LocalPods::default();
    let (publish, published) = tokio::sync::watch::channel(None);
    let _writer = watch
        .then(|| margay_task::Owned::spawn(slices::run(client.clone(), node.clone(), published)));
    let mut pods = watched(watch, Api::<core::Pod>::all(client.clone()), here);
    let mut namespaces = watched(
        watch,
        Api::<core::Namespace>::all(client.clone()),
        watcher::Config::default(),
    );
    let mut policies = watched(
        watch,
        Api::<net::NetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    // The other nodes' pods, from their endpoint slices: watched while a
    // policy has pod or namespace peers, dropped once none has for
    // REMOTE_LINGER.
    let mut remote: Option<Watch<MargayEndpointSlice>> = None;
    let mut unneeded_since: Option<tokio::time::Instant> = None;
    if !watch {
        // Nothing to list: every kind is known empty.
        engine.pod_event(Event::Init);
        engine.pod_event(Event::InitDone);
        engine.namespace_event(Event::Init);
        engine.namespace_event(Event::InitDone);
        engine.policy_event(Event::Init);
        engine.policy_event(Event::InitDone);
    }
    // Each ADD waiting, and since when (for the debug log).
    let mut waiters: Vec<(Endpoint, oneshot::Sender<()>, std::time::Instant)> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut next_full = tokio::time::Instant::now() + resync;
    let mut retry: Option<tokio::time::Instant> = None;
    let mut netlink: Option<margay_nftnl::Socket> = None;
    let warn = |what: &str, e: &watcher::Error| {
        tracing::warn!("NetworkPolicy: cannot watch {what} (retrying): {e}");
    };
    // The status is published when the table's currency changes, else
    // at most once a second (building it lists the unenforced policies).
    let mut published = tokio::time::Instant::now();
    let mut unpublished = true;
    loop {
        let mut wake = retry.map_or(next_full, |r| r.min(next_full));
        if let Some(since) = unneeded_since {
            wake = wake.min(since + REMOTE_LINGER);
        }
        if unpublished {
            wake = wake.min(published + Duration::from_secs(1));
        }
        tokio::select! {
            Some(ev) = next(&mut pods) => match ev {
                Ok(ev) => {
                    let ev = event(ev);
                    local.event(&ev);
                    engine.pod_event_in(Scope::Local, ev);
                }
                Err(e) => warn("this node's Pods", &e),
            },
            Some(ev) = next(&mut remote) => match ev {
                Ok(ev) => engine.slice_event(event(ev)),
                Err(e) => warn("other nodes' endpoint slices", &e),
            },
            Some(ev) = next(&mut namespaces) => match ev {
                Ok(ev) => engine.namespace_event(event(ev)),
                Err(e) => warn("Namespaces", &e),
            },
            Some(ev) = next(&mut policies) => match ev {
                Ok(ev) => engine.policy_event(event(ev)),
                Err(e) => warn("NetworkPolicies", &e),
            },
            Some(msg) = inbox.recv() => match msg {
                Msg::Added(ep, tx, unknown) => {
                    let t = std::time::Instant::now();
                    engine.endpoint_added(ep.clone());
                    tracing::debug!(host_if = %ep.host_if, pod = ?ep.pod, ms = t.elapsed().as_secs_f64() * 1e3, "NetworkPolicy: endpoint compiled");
                    if let Some(k) = &ep.pod
                        && !engine.knows_pod(k)
                    {
                        if engine.namespace_has_no_policy(k) {
                            engine.unresolved(k);
                        } else {
                            let _ = unknown.send(());
                        }
                    }
                    waiters.push((ep, tx, t));
                }
                Msg::Deleted(i) => engine.endpoint_deleted(&i),
                Msg::Read(key, read) => match read {
                    PodRead::Found(p) => engine.pod_read(*p),
                    PodRead::NotFound | PodRead::Unreadable => engine.unresolved(&key),
                },
                Msg::Status(tx) => {
                    let _ = tx.send(status(&engine, watch, &last_error));
                }
            },
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= next_full {
                    engine.resync();
                    next_full = tokio::time::Instant::now() + resync;
                }
                retry = None;
            }
        }
        // Everything already waiting joins this batch: one transaction.
        for _ in 0..4096 {
            let mut any = false;
            if let Some(Some(Ok(ev))) = next(&mut pods).now_or_never() {
                let ev = event(ev);
                local.event(&ev);
                engine.pod_event_in(Scope::Local, ev);
                any = true;
            }
            if let Some(Some(Ok(ev))) = next(&mut remote).now_or_never() {
                engine.slice_event(event(ev));
                any = true;
            }
            if let Some(Some(Ok(ev))) = next(&mut namespaces).now_or_never() {
                engine.namespace_event(event(ev));
                any = true;
            }
            if let Some(Some(Ok(ev))) = next(&mut policies).now_or_never() {
                engine.policy_event(event(ev));
                any = true;
            }
            if !any {
                break;
            }
        }
        if let Some(p) = local.take() {
            publish.send_replace(Some(p));
        }
        // Remote pods watched as long as a policy needs them.
        match (engine.needs_remote_pods(), remote.is_some()) {
            (true, false) => {
                tracing::info!(
                    "NetworkPolicy: a policy has pod peers: watching other nodes' endpoint slices"
                );
                remote = watched(
                    true,
                    Api::<MargayEndpointSlice>::all(client.clone()),
                    watcher::Config::default(),
                );
                engine.remote_pods(true);
            }
            (true, true) => unneeded_since = None,
            (false, true) => {
                let now = tokio::time::Instant::now();
                let since = *unneeded_since.get_or_insert(now);
                if now >= since + REMOTE_LINGER {
                    tracing::info!(
                        "NetworkPolicy: no policy has pod peers: other nodes' endpoint slices no longer watched"
                    );
                    remote = None;
                    unneeded_since = None;
                    engine.remote_pods(false);
                }
            }
            (false, false) => {}
        }
        let t = std::time::Instant::now();
        if retry.is_none()
            && let Some(load) = engine.take_load()
        {
            let whole = matches!(load, engine::Load::Script(_));
            let (how, done) = match load {
                engine::Load::Batch(b) => {
                    // One socket kept across batches (closing one costs
                    // the kernel an RCU grace period); dropped on error.
                    // A batch too large for one write goes to nft.
                    let sock = netlink.take();
                    let r = tokio::task::spawn_blocking(move || {
                        let mut s = match sock {
                            Some(s) => s,
                            None => margay_nftnl::Socket::open()?,
                        };
                        let sent = s.apply(POLICY_TABLE_NAME, &b)?;
                        Ok((s, sent, b))
                    })
                    .await
                    .unwrap_or_else(|j| {
                        Err(crate::dataplane::Error::Nft(format!("netlink task: {j}")))
                    });
                    match r {
                        Ok((s, sent, b)) => {
                            netlink = Some(s);
                            match sent {
                                margay_nftnl::Sent::Applied => ("netlink", Ok(())),
                                margay_nftnl::Sent::TooLarge => (
                                    "nft",
                                    crate::dataplane::nft_script::load(
                                        &b.script(),
                                        NFT_POLICY_TABLE,
                                    )
                                    .await,
                                ),
                            }
                        }
                        Err(e) => ("netlink", Err(e)),
                    }
                }
                engine::Load::Script(script) => (
                    "nft",
                    crate::dataplane::nft_script::load(&script, NFT_POLICY_TABLE).await,
                ),
            };
            match done {
                Ok(()) => {
                    engine.loaded(true);
                    last_error = None;
                    tracing::debug!(
                        how,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        "NetworkPolicy rules loaded"
                    );
                }
                Err(e) => {
                    tracing::warn!("NetworkPolicy: {e} (reloading the whole table in 1s)");
                    engine.loaded(false);
                    last_error = Some(e.to_string());
                    retry = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    // The whole table refused: if some policies' rules are
                    // why, they are enforced fail closed and the rest loads.
                    if whole {
                        let bad = refused_policies(&engine).await;
                        if !bad.is_empty() {
                            engine.kernel_refused(&bad, &e.to_string());
                            retry = None;
                        }
                    }
                }
            }
        }
        let (done, wait): (Vec<_>, Vec<_>) = waiters
            .into_iter()
            .partition(|(ep, _, _)| engine.programmed(&ep.host_if));
        for (ep, tx, since) in done {
            tracing::debug!(host_if = %ep.host_if, ms = since.elapsed().as_secs_f64() * 1e3, "NetworkPolicy: ADD answered");
            let _ = tx.send(());
        }
        waiters = wait
            .into_iter()
            .filter(|(_, tx, _)| !tx.is_closed())
            .collect();
        unpublished = true;
        let current = engine.listed() && engine.is_loaded() && last_error.is_none();
        let now = tokio::time::Instant::now();
        if current != report.borrow().current || now >= published + Duration::from_secs(1) {
            let s = status(&engine, watch, &last_error);
            report.send_if_modified(|old| {
                let changed = *old != s;
                *old = s;
                changed
            });
            published = now;
            unpublished = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policies the kernel refuses are found, each by a binary
    /// search; closing them all is what makes it load.
    #[tokio::test]
    async fn the_policies_a_refused_load_is_about_are_found() {
        let suspects: Vec<u32> = (0..100).collect();
        let culprits = [17, 64, 99];
        let checks = std::sync::atomic::AtomicUsize::new(0);
        let loads = |closed: Vec<u32>| {
            checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ok = culprits.iter().all(|c| closed.contains(c));
            async move { ok }
        };
        let mut found = find_refused(&suspects, loads).await;
        found.sort_unstable();
        assert_eq!(found, culprits);
        let n = checks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n <= 2 + 4 * 8, "{n} checks: a binary search per culprit");
        // Not the policies' fault (refused even with all closed): none.
        assert!(
            find_refused(&suspects, |_| async { false })
                .await
                .is_empty()
        );
        // Nothing to find.
        assert!(find_refused(&suspects, |_| async { true }).await.is_empty());
    }
}
