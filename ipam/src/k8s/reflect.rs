//! Watched inputs: a kube-runtime reflector per resource kind, and whether
//! what it holds is current. A reflector that has not finished its first
//! list knows nothing ([`Known::Unknown`]); one whose watch failed keeps
//! its last contents, which are [`Known::Stale`] until the watch is back.
//! Readers decide what each state allows: "could not read" is never
//! "nothing there".

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tokio::sync::{Notify, watch as channel};

/// The longest wait between two attempts to watch again: a recovered API
/// is noticed within this (an attempt is one cheap request).
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// One input of a decision: current, last known, or not known at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known<T> {
    /// Read and current: decisions may add and remove.
    Fresh(T),
    /// The last value read; the source cannot be read now (why): decisions
    /// may add from it, never remove because of it.
    Stale(T, String),
    /// Never read (why): nothing is decided from it.
    Unknown(String),
}

impl<T> Known<T> {
    /// The value, fresh or stale.
    pub fn value(&self) -> Option<&T> {
        match self {
            Known::Fresh(v) | Known::Stale(v, _) => Some(v),
            Known::Unknown(_) => None,
        }
    }

    /// Whether it is current.
    pub fn is_fresh(&self) -> bool {
        matches!(self, Known::Fresh(_))
    }

    /// Why it is not current.
    pub fn why(&self) -> Option<&str> {
        match self {
            Known::Fresh(_) => None,
            Known::Stale(_, w) | Known::Unknown(w) => Some(w),
        }
    }

    /// The same knowledge of another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Known<U> {
        match self {
            Known::Fresh(v) => Known::Fresh(f(v)),
            Known::Stale(v, w) => Known::Stale(f(v), w),
            Known::Unknown(w) => Known::Unknown(w),
        }
    }

    /// By reference.
    pub fn as_ref(&self) -> Known<&T> {
        match self {
            Known::Fresh(v) => Known::Fresh(v),
            Known::Stale(v, w) => Known::Stale(v, w.clone()),
            Known::Unknown(w) => Known::Unknown(w.clone()),
        }
    }

    /// A failed read: the last value becomes stale (or stays unknown).
    pub fn failed(self, why: String) -> Self {
        match self {
            Known::Fresh(v) | Known::Stale(v, _) => Known::Stale(v, why),
            Known::Unknown(_) => Known::Unknown(why),
        }
    }
}

#[derive(Debug, Clone)]
enum Health {
    /// The first list has not completed (the last attempt's error).
    Listing(Option<String>),
    /// Watching.
    Current,
    /// The watch failed (since when, why); the watcher is retrying.
    Broken(Instant, String),
}

/// The objects of one kind, as a reflector holds them.
pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    health: Arc<channel::Sender<Health>>,
    what: &'static str,
}

impl<K: Resource + Clone + 'static> Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// Every object, and whether that is current.
    pub fn read(&self) -> Known<Vec<Arc<K>>> {
        match &*self.health.borrow() {
            Health::Listing(None) => Known::Unknown(format!("{} not listed yet", self.what)),
            Health::Listing(Some(e)) => {
                Known::Unknown(format!("{} not listed yet: {e}", self.what))
            }
            Health::Current => Known::Fresh(self.store.state()),
            Health::Broken(since, why) => Known::Stale(
                self.store.state(),
                format!(
                    "cannot watch {} for {}s: {why}",
                    self.what,
                    since.elapsed().as_secs()
                ),
            ),
        }
    }
}

impl<K: Resource + Clone + 'static> Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
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

/// A reflector on `api`: the objects, and the task that keeps them (it
/// pokes `poke` on every change and when the watch is current again; it
/// never ends: whoever runs it owns it).
///
/// After a failed watch the watcher is started again from a fresh list
/// (with back-off, 1 s doubling to [`BACKOFF_MAX`]), so a recovered API always ends in
/// a completed list, which makes the contents current again even when
/// nothing changed meanwhile. The store keeps its last contents until that
/// list completes.
pub fn watch<K>(
    api: Api<K>,
    what: &'static str,
    poke: Arc<Notify>,
) -> (
    Watched<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watch_with(api, watcher::Config::default(), what, poke)
}

/// Like [`watch`], with a watcher configuration (a field selector for one
/// object, ...).
pub fn watch_with<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    poke: Arc<Notify>,
) -> (
    Watched<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, mut writer) = reflector::store();
    let health = Arc::new(channel::Sender::new(Health::Listing(None)));
    let h = health.clone();
    let task = async move {
        let mut warned: Option<Instant> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            let stream = watcher(api.clone(), config.clone());
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Err(e) => {
                        // Say so once a minute (e.g. a CRD not installed,
                        // RBAC missing, the API unreachable).
                        if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            tracing::warn!("cannot watch {what} (retrying): {e}");
                            warned = Some(Instant::now());
                        }
                        // Stale from now on (no pass is woken for it: what
                        // the store holds is unchanged, only its age).
                        h.send_if_modified(|g| match g {
                            Health::Current => {
                                *g = Health::Broken(Instant::now(), e.to_string());
                                true
                            }
                            Health::Listing(last) => {
                                *last = Some(e.to_string());
                                true
                            }
                            Health::Broken(..) => false,
                        });
                        break;
                    }
                    Ok(ev) => {
                        writer.apply_watcher_event(&ev);
                        if matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
                            continue;
                        }
                        backoff = Duration::from_secs(1);
                        let was = h.send_replace(Health::Current);
                        if matches!(was, Health::Broken(..)) {
                            tracing::info!("watching {what} again");
                        }
                        poke.notify_one();
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    };
    (
        Watched {
            store: reader,
            health,
            what,
        },
        task,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knowledge_degrades_and_maps() {
        let k = Known::Fresh(vec![1, 2]);
        assert!(k.is_fresh() && k.why().is_none());
        let s = k.clone().failed("down".into());
        assert_eq!(s.value(), Some(&vec![1, 2]));
        assert!(!s.is_fresh());
        assert_eq!(s.why(), Some("down"));
        assert_eq!(s.map(|v| v.len()), Known::Stale(2, "down".into()));
        let u: Known<u8> = Known::Unknown("never".into());
        assert_eq!(u.clone().failed("x".into()), Known::Unknown("x".into()));
        assert_eq!(u.value(), None);
    }
}
