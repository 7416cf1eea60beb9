//! The bench's own watches: the changes of the fake pods and of every
//! Node as a watcher gets them, what the apiserver's watch events are
//! divided by.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};

/// The changes of the fake pods (their namespace) and of every Node, as a
/// watcher gets them: what the apiserver's watch events are divided by.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    pub pods: Arc<AtomicU64>,
    pub nodes: Arc<AtomicU64>,
}

impl Seen {
    /// (Pod changes, Node changes) so far.
    pub(crate) fn snapshot(&self) -> (u64, u64) {
        (
            self.pods.load(Ordering::Relaxed),
            self.nodes.load(Ordering::Relaxed),
        )
    }

    /// Watches `api` until `stop`, counting its objects' changes into
    /// `count`, resuming from the last version seen (from the current one
    /// after an error that cannot be resumed): for its owner to run, and
    /// abort.
    pub(crate) async fn watch<K>(api: Api<K>, count: Arc<AtomicU64>, stop: Arc<AtomicBool>)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let mut rv: Option<String> = None;
        while !stop.load(Ordering::Relaxed) {
            let from = match rv.clone() {
                Some(v) => v,
                None => match api.list_metadata(&ListParams::default().limit(1)).await {
                    Ok(l) => l.metadata.resource_version.unwrap_or_default(),
                    Err(e) => {
                        eprintln!("scale: listing to watch: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let stream = match api.watch(&WatchParams::default().timeout(290), &from).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("scale: watching: {e}");
                    rv = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut s = std::pin::pin!(stream);
            rv = Some(from);
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        rv = o.meta().resource_version.clone().or(rv);
                    }
                    Ok(WatchEvent::Bookmark(b)) => rv = Some(b.metadata.resource_version),
                    Ok(WatchEvent::Error(e)) => {
                        eprintln!("scale: watch: {e}; resuming from now");
                        rv = None;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
