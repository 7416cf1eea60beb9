//! Watched inputs: the objects of one kind, kept by a list and a watch,
//! and whether what is held is current. A watch that has not finished its
//! first list knows nothing ([`Known::Unknown`]); one whose watch failed
//! keeps its last contents, which are [`Known::Stale`] until the watch is
//! back. Readers decide what each state allows: "could not read" is never
//! "nothing there".
//!
//! The loop ([`run`]) is client-go's reflector, written out here:
//! - **List**, paginated ([`super::list::list_all`], a consistent read);
//!   what is held is replaced only once the last page arrived, never by a
//!   part of a list.
//! - **Watch** from the list's resourceVersion, with bookmarks; each event
//!   and bookmark moves the resourceVersion on. A watch that ends after its
//!   timeout ([`WATCH_TIMEOUT`]) is opened again at once from there.
//! - **After an error** (the connection lost, the API server restarting or
//!   not answering, an error event other than 410, a watch silent past its
//!   timeout) the watch is opened again **from the last resourceVersion**,
//!   after a back-off (1 s doubling to [`BACKOFF_MAX`]): the events missed
//!   meanwhile are replayed, nothing is listed again.
//! - **410 Gone** ("too old resource version": etcd compacted it, or it is
//!   older than what a restarted API server's cache starts from) is the one
//!   reason to list again: at once (the API answers), unless the version
//!   refused came from a list just made whose watch was never accepted
//!   (then after the back-off, which only an accepted watch resets).
//!
//! What is held becomes current ([`Known::Fresh`]) when a list completes,
//! and again after an error once a watch opened again is accepted: an
//! event or a bookmark arrives on it, or it stays open [`SETTLE`] without
//! an error. An API server refuses a resourceVersion it no longer has at
//! once, with an error event right behind the response headers (seen on
//! 1.20), and replays what changed meanwhile at once, so a watch quiet
//! that long was accepted and missed nothing. Without this a resumed watch
//! on which nothing changes could not be told from a broken one (1.20
//! sends no bookmark for minutes). A watch that ends before it was
//! accepted counts as failed (no tight loop of watches closed at once).
//!
//! kube-runtime's `watcher` resumes the same way, but its stream says
//! nothing when a watch is opened again and swallows bookmarks, so the
//! loop is our own; it still keeps the objects in a kube-runtime
//! reflector store ([`Watched`]), or hands each change to whoever keeps
//! them ([`Change`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::{Notify, watch as channel};

pub use margay_api::known::{Known, Op, Why};

use super::list::{Source, is_gone, list_all};

/// The longest wait between two attempts to watch again: a recovered API
/// is noticed within this (an attempt is one cheap request).
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// How long a watch opened again after an error must stay open without
/// an error (when no event or bookmark says so sooner) before what is
/// held counts as current again.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The server-side timeout of one watch request, in seconds (below the
/// API server's 5-minute cap; kube-runtime's and client-go's default).
pub const WATCH_TIMEOUT: u32 = 290;

/// How long one whole list (every page) may take before it is given up
/// as unanswered and tried again after the back-off: an API server that
/// accepted the connection and froze must not hold the watch forever.
pub const LIST_DEADLINE: Duration = Duration::from_secs(60);

/// How long past [`WATCH_TIMEOUT`] a watch may stay silent before it
/// counts as lost (an API server gone without closing the connection).
const IDLE_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
enum Health {
    /// The first list has not completed (the last attempt's error).
    Listing(Option<Why>),
    /// Watching.
    Current,
    /// The watch failed (since when, why); the loop is retrying.
    Broken(Instant, Why),
}

/// The objects of one kind, as a reflector holds them.
pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    health: HealthTx,
    what: &'static str,
}

type HealthTx = Arc<channel::Sender<Health>>;

impl Health {
    /// Why what is held is not current (`None`: it is).
    fn why_not(&self, what: &'static str) -> Option<Why> {
        match self {
            Health::Listing(last) => Some(Why::NotListed {
                what,
                last: last.clone().map(Box::new),
            }),
            Health::Current => None,
            Health::Broken(since, why) => Some(Why::Broken {
                what,
                secs: since.elapsed().as_secs(),
                cause: Box::new(why.clone()),
            }),
        }
    }
}

impl<K: Resource + Clone + 'static> Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// Every object, and whether that is current.
    pub fn read(&self) -> Known<Vec<Arc<K>>> {
        let health = self.health.borrow();
        match (&*health, health.why_not(self.what)) {
            (Health::Listing(_), Some(why)) => Known::Unknown(why),
            (_, None) => Known::Fresh(self.store.state()),
            (_, Some(why)) => Known::Stale(self.store.state(), why),
        }
    }

    /// Like [`Watched::read`], but while the first list is still under
    /// way (an agent just started) waits up to `within` for it.
    pub async fn read_listed(&self, within: Duration) -> Known<Vec<Arc<K>>> {
        let mut rx = self.health.subscribe();
        let listed = rx.wait_for(|h| !matches!(h, Health::Listing(None)));
        let _ = tokio::time::timeout(within, listed).await;
        self.read()
    }
}

impl<K: Resource + 'static> std::fmt::Debug for Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("what", &self.what)
            .field("health", &*self.health.borrow())
            .finish()
    }
}

/// `pub trait $name: $bounds {}`, implemented for every type within them
/// (a name for a set of bounds, written once).
macro_rules! bounds {
    ($(#[$doc:meta])* $name:ident = $($bound:tt)+) => {
        $(#[$doc])*
        pub trait $name: $($bound)+ {}
        impl<T: $($bound)+> $name for T {}
    };
}

bounds! {
    /// What a kind of object must be for [`watch`] and its variants to
    /// keep it: a resource read from the API whose dynamic type has a
    /// default.
    Kind = Resource<DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
}

/// A watch of `api`: the objects, and the task that keeps them (it pokes
/// `poke` on every change and when what it holds is current again; it
/// never ends: whoever runs it owns it). See the module's documentation
/// for how it recovers.
pub fn watch<K: Kind>(
    api: Api<K>,
    what: &'static str,
    poke: Arc<Notify>,
) -> (Watched<K>, impl Future<Output = ()> + Send + 'static) {
    watch_with(api, watcher::Config::default(), what, poke)
}

/// Like [`watch`], with a watcher configuration: its label and field
/// selectors (a field selector for one object, ...), page size and
/// watch timeout are used; lists are always consistent reads.
pub fn watch_with<K: Kind>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    poke: Arc<Notify>,
) -> (Watched<K>, impl Future<Output = ()> + Send + 'static) {
    watch_slim(api, config, what, poke, |_| {})
}

/// Like [`watch_with`], keeping each object as `slim` leaves it (what
/// its readers need of it). Its `metadata.managedFields` are always
/// dropped: nothing here reads them, and they are often most of an
/// object's metadata.
pub fn watch_slim<K: Kind>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    poke: Arc<Notify>,
    slim: fn(&mut K),
) -> (Watched<K>, impl Future<Output = ()> + Send + 'static) {
    watch_source(api, config, what, poke, slim)
}

/// [`watch_slim`] of any [`Source`].
fn watch_source<K, S>(
    src: S,
    config: watcher::Config,
    what: &'static str,
    poke: Arc<Notify>,
    slim: fn(&mut K),
) -> (Watched<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    S: Source<K> + 'static,
{
    let (reader, mut writer) = reflector::store();
    let health = Arc::new(channel::Sender::new(Health::Listing(None)));
    let trim = move |o: &mut K| {
        o.meta_mut().managed_fields = None;
        slim(o);
    };
    let keep = move |c: Change<K>| match c {
        Change::Listed(items) => {
            writer.apply_watcher_event(&watcher::Event::Init);
            for mut o in items {
                trim(&mut o);
                writer.apply_watcher_event(&watcher::Event::InitApply(o));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        Change::Applied(mut o) => {
            trim(&mut o);
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        Change::Deleted(o) => writer.apply_watcher_event(&watcher::Event::Delete(o)),
    };
    let task = run(src, config, Tell::new(what, health.clone(), poke), keep);
    (
        Watched {
            store: reader,
            health,
            what,
        },
        task,
    )
}

/// Whether what a watch handed on ([`follow`]) is current.
#[derive(Debug, Clone)]
pub struct Freshness {
    health: channel::Receiver<Health>,
    what: &'static str,
}

impl Freshness {
    /// Why what was handed on may not be current (`None`: it is).
    pub fn stale(&self) -> Option<Why> {
        self.health.borrow().why_not(self.what)
    }
}

/// A watch of `api` whose changes go to `keep` (whoever keeps the objects
/// in a shape of its own) rather than to a store here: whether they are
/// current, and the task (it never ends: whoever runs it owns it).
pub fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    keep: impl FnMut(Change<K>) + Send + 'static,
) -> (Freshness, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let health = Arc::new(channel::Sender::new(Health::Listing(None)));
    let fresh = Freshness {
        health: health.subscribe(),
        what,
    };
    let tell = Tell::new(what, health, Arc::new(Notify::new()));
    (fresh, run(api, config, tell, keep))
}

/// A change to the objects a watch keeps, as [`run`] hands it on.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<K> {
    /// A whole list: replaces everything held (handed on only once its
    /// last page arrived).
    Listed(Vec<K>),
    /// An object created or changed.
    Applied(K),
    /// An object deleted (its last state).
    Deleted(K),
}

/// Where a watch loop says how it is doing: the health its readers see,
/// `poke` on every change, a warning at most once a minute.
pub(crate) struct Tell {
    what: &'static str,
    health: HealthTx,
    poke: Arc<Notify>,
    warned: Option<Instant>,
}

impl Tell {
    fn new(what: &'static str, health: HealthTx, poke: Arc<Notify>) -> Self {
        Self {
            what,
            health,
            poke,
            warned: None,
        }
    }

    /// What is held is current (again).
    fn current(&mut self) {
        let mut was_broken = false;
        let changed = self.health.send_if_modified(|h| {
            was_broken = matches!(h, Health::Broken(..));
            let changed = !matches!(h, Health::Current);
            *h = Health::Current;
            changed
        });
        if was_broken {
            tracing::info!("watching {} again", self.what);
        }
        if changed {
            self.poke.notify_one();
        }
    }

    /// What is held changed.
    fn changed(&self) {
        self.poke.notify_one();
    }

    /// The list or the watch failed: stale from now on (no pass is woken
    /// for it: what is held is unchanged, only its age).
    fn failed(&mut self, why: Why) {
        // Say so once a minute (a CRD not installed, RBAC missing, the
        // API unreachable).
        if self
            .warned
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            tracing::warn!("cannot watch {} (retrying): {why}", self.what);
            self.warned = Some(Instant::now());
        }
        self.health.send_if_modified(|g| match g {
            Health::Current => {
                *g = Health::Broken(Instant::now(), why);
                true
            }
            Health::Listing(last) => {
                *last = Some(why);
                true
            }
            // Still broken since then: the latest reason is the one told.
            Health::Broken(_, last) => {
                *last = why;
                false
            }
        });
    }
}

/// How one watch request ended.
#[derive(Debug)]
enum End {
    /// The server closed it (its timeout): open it again at once from here.
    Closed(String),
    /// It failed (why): open it again from here after a back-off.
    Failed(String, Why),
    /// The API no longer has the resourceVersion (why): list again.
    Gone(Why),
}

/// Lists and watches `src` forever (see the module's documentation),
/// handing every change to `keep` and saying how it goes through `tell`.
pub(crate) async fn run<K, S>(
    src: S,
    config: watcher::Config,
    mut tell: Tell,
    mut keep: impl FnMut(Change<K>) + Send,
) where
    K: Resource + Clone + Send,
    S: Source<K>,
{
    let lp = ListParams {
        label_selector: config.label_selector.clone(),
        field_selector: config.field_selector.clone(),
        limit: config.page_size,
        ..Default::default()
    };
    let wp = WatchParams {
        label_selector: config.label_selector.clone(),
        field_selector: config.field_selector.clone(),
        timeout: Some(config.timeout.unwrap_or(WATCH_TIMEOUT)),
        bookmarks: true,
        send_initial_events: false,
    };
    let mut version: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    // A list made, and no watch from it accepted yet.
    let mut just_listed = false;
    loop {
        let from = match version.take() {
            Some(v) => v,
            None => match tokio::time::timeout(LIST_DEADLINE, list_all(&src, &lp)).await {
                Ok(Ok(l)) => {
                    keep(Change::Listed(l.items));
                    tell.changed();
                    tell.current();
                    // The back-off is reset once a watch from it is
                    // accepted (a list refused at once keeps doubling it).
                    just_listed = true;
                    l.resource_version
                }
                failed => {
                    tell.failed(match failed {
                        Ok(Err(e)) => why_of(Some(Op::List), &e),
                        _ => Why::NoAnswer,
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let (end, accepted) = watch_once(&src, &wp, from, &mut tell, &mut keep).await;
        if accepted {
            backoff = Duration::from_secs(1);
            just_listed = false;
        }
        match end {
            End::Closed(v) => version = Some(v),
            End::Failed(v, why) => {
                tell.failed(why);
                version = Some(v);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            End::Gone(why) => {
                tell.failed(why);
                if just_listed {
                    // Refused from a list just made: no tight loop of
                    // lists and refusals.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                } else {
                    // The API answers (it came back after an outage, its
                    // cache starting after this version): list at once.
                    backoff = Duration::from_secs(1);
                }
            }
        }
    }
}

/// One watch request from `version`, until it ends; whether the server
/// was seen to accept it (an event, a bookmark, or [`SETTLE`] open
/// without an error: see the module's documentation).
async fn watch_once<K, S>(
    src: &S,
    wp: &WatchParams,
    mut version: String,
    tell: &mut Tell,
    keep: &mut impl FnMut(Change<K>),
) -> (End, bool)
where
    K: Resource + Clone,
    S: Source<K>,
{
    let gone = |version: &str, why: &dyn std::fmt::Display| {
        End::Gone(Why::Gone {
            version: version.to_string(),
            error: why.to_string(),
        })
    };
    let mut stream = match src.watch(wp, &version).await {
        Ok(s) => s,
        Err(e) if is_gone(&e) => return (gone(&version, &e), false),
        Err(e) => return (End::Failed(version, why_of(Some(Op::Watch), &e)), false),
    };
    let settled = tokio::time::Instant::now() + SETTLE;
    // What is held stays current while a watch is opened again after the
    // last one ended (its timeout): only an error makes it stale.
    let mut accepted = false;
    let idle = Duration::from_secs(u64::from(wp.timeout.unwrap_or(WATCH_TIMEOUT))) + IDLE_MARGIN;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(idle, stream.next()) => next,
            () = tokio::time::sleep_until(settled), if !accepted => {
                accepted = true;
                tell.current();
                continue;
            }
        };
        let ev = match next {
            Err(_) => {
                let why = Why::Silent {
                    secs: idle.as_secs(),
                };
                return (End::Failed(version, why), accepted);
            }
            Ok(None) if accepted => return (End::Closed(version), true),
            // Closed at once, with nothing said: not opened again in a
            // tight loop.
            Ok(None) => return (End::Failed(version, Why::EndedEarly), false),
            // The connection broke, or an event could not be read (it is
            // not skipped: what is held would be wrong without a word).
            Ok(Some(Err(e))) => {
                return (End::Failed(version, why_of(Some(Op::Watch), &e)), accepted);
            }
            Ok(Some(Ok(ev))) => ev,
        };
        match ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                version = o.resource_version().unwrap_or(version);
                keep(Change::Applied(o));
                tell.changed();
            }
            WatchEvent::Deleted(o) => {
                version = o.resource_version().unwrap_or(version);
                keep(Change::Deleted(o));
                tell.changed();
            }
            WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
            WatchEvent::Error(s) if s.code == 410 => {
                let end = gone(&version, &s.message);
                return (end, accepted);
            }
            WatchEvent::Error(s) => {
                let why = refusal(
                    Some(Op::Watch),
                    s.code,
                    format!("{} ({})", s.message, s.reason),
                );
                return (End::Failed(version, why), accepted);
            }
        }
        if !accepted {
            accepted = true;
            tell.current();
        }
    }
}

/// Why a request (`op`, when it is to be said) failed, from the client's error: the API's status
/// typed (403 is [`Why::Forbidden`]), the text as the client says it.
pub fn why_of(op: Option<Op>, e: &kube::Error) -> Why {
    match e {
        kube::Error::Api(s) => refusal(op, s.code, e.to_string()),
        kube::Error::SerdeError(_) => Why::Decode {
            op,
            error: e.to_string(),
        },
        _ => Why::Failed {
            op,
            error: e.to_string(),
        },
    }
}

/// The API's refusal with HTTP status `code`.
fn refusal(op: Option<Op>, code: u16, error: String) -> Why {
    match code {
        403 => Why::Forbidden { op, error },
        code => Why::Refused { op, code, error },
    }
}

#[cfg(test)]
mod tests;
