//! Paginated LISTs: every list Margay makes of the Kubernetes API goes
//! through [`list_all`], [`PAGE`] objects a request, never one response
//! holding a whole kind (what an unpaginated LIST of every Pod of a large
//! cluster costs the API server and etcd, at once).
//!
//! Each list is a consistent read (no `resourceVersion`): the API server
//! reads etcd page by page at the first page's revision. `resourceVersion=0`
//! (its cache, "any version") is never asked for: the 1.20 API server
//! answers that from its cache whole, ignoring the limit. A continue token
//! that has expired (410: the revision was compacted between two pages)
//! starts the list over, a few times, never unpaginated.
//!
//! [`Source`] is where objects come from (an [`Api`], or a fake in tests):
//! a page of a list and a watch from a resourceVersion. An
//! `Api<PartialObjectMeta<K>>` asks for metadata only (kube sends the
//! `as=PartialObjectMetadata` Accept header for it, lists and watches).

use std::future::Future;

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::Resource;
use kube::api::{Api, ListParams, ObjectList, WatchEvent, WatchParams};

/// Objects per page.
pub const PAGE: u32 = 500;

/// How many times a list whose continue token expired is started over.
const RESTARTS: usize = 3;

/// A stream of watch events.
pub type Events<K> = BoxStream<'static, kube::Result<WatchEvent<K>>>;

/// Where the objects of one kind come from: one page of a list, and a
/// watch from a resourceVersion.
pub trait Source<K: Clone>: Send + Sync {
    /// One page (`lp.limit`, `lp.continue_token`).
    fn page(&self, lp: &ListParams) -> impl Future<Output = kube::Result<ObjectList<K>>> + Send;

    /// Events after `version`.
    fn watch(
        &self,
        wp: &WatchParams,
        version: &str,
    ) -> impl Future<Output = kube::Result<Events<K>>> + Send;
}

impl<K> Source<K> for Api<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    fn page(&self, lp: &ListParams) -> impl Future<Output = kube::Result<ObjectList<K>>> + Send {
        self.list(lp)
    }

    async fn watch(&self, wp: &WatchParams, version: &str) -> kube::Result<Events<K>> {
        Ok(Api::watch(self, wp, version).await?.boxed())
    }
}

/// A whole list: every object, and the resourceVersion it was read at
/// (where a watch of the same objects starts).
#[derive(Debug, Clone)]
pub struct Listed<K> {
    /// The objects.
    pub items: Vec<K>,
    /// The list's resourceVersion.
    pub resource_version: String,
}

/// Whether `e` says a resourceVersion or continue token is no longer
/// there (410 Gone, "Expired").
pub fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// Every object `lp` selects, [`PAGE`] a request (or `lp.limit` when
/// set), collected. `lp`'s resourceVersion and continue token are not
/// used: the list is a consistent read from its first page.
pub async fn list_all<K: Clone, S: Source<K>>(src: &S, lp: &ListParams) -> kube::Result<Listed<K>> {
    let mut restarts = 0;
    'list: loop {
        let mut lp = ListParams {
            limit: Some(lp.limit.unwrap_or(PAGE)),
            continue_token: None,
            resource_version: None,
            version_match: None,
            ..lp.clone()
        };
        let mut items = Vec::new();
        let mut version = None;
        loop {
            let page = match src.page(&lp).await {
                Ok(p) => p,
                Err(e) if is_gone(&e) && lp.continue_token.is_some() && restarts < RESTARTS => {
                    restarts += 1;
                    tracing::debug!("list continue token expired, listing again: {e}");
                    continue 'list;
                }
                Err(e) => return Err(e),
            };
            // Every page carries the first page's resourceVersion.
            version = version.or(page.metadata.resource_version.filter(|v| !v.is_empty()));
            items.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp.continue_token = Some(c),
                None => break,
            }
        }
        return Ok(Listed {
            items,
            resource_version: version.unwrap_or_default(),
        });
    }
}

/// [`list_all`]'s objects only.
pub async fn list_items<K: Clone, S: Source<K>>(src: &S, lp: &ListParams) -> kube::Result<Vec<K>> {
    list_all(src, lp).await.map(|l| l.items)
}

/// A source that answers from a script, for tests of what reads it.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// One scripted answer to a page or a watch request.
    #[derive(Debug)]
    pub enum Answer<K: Clone> {
        Page(kube::Result<ObjectList<K>>),
        /// A page request the API never answers (a frozen server).
        Hang,
        Watch(kube::Result<Vec<kube::Result<WatchEvent<K>>>>, Open),
    }

    /// What a scripted watch stream does after its events.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Open {
        /// Ends (the server closed it).
        Ends,
        /// Stays open, silent.
        Stays,
    }

    /// The requests a fake source got.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request {
        Page {
            limit: Option<u32>,
            continue_token: Option<String>,
        },
        Watch {
            version: String,
            bookmarks: bool,
        },
    }

    /// A scripted [`Source`]: answers in order, records each request.
    #[derive(Debug)]
    pub struct Fake<K: Clone> {
        pub script: Mutex<VecDeque<Answer<K>>>,
        pub seen: Mutex<Vec<(tokio::time::Instant, Request)>>,
    }

    impl<K: Clone> Fake<K> {
        pub fn new(script: Vec<Answer<K>>) -> Self {
            Self {
                script: Mutex::new(script.into()),
                seen: Mutex::new(Vec::new()),
            }
        }

        pub fn push(&self, a: Answer<K>) {
            self.script.lock().unwrap().push_back(a);
        }

        pub fn requests(&self) -> Vec<Request> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .map(|(_, r)| r.clone())
                .collect()
        }

        /// When each request came (tokio's clock).
        pub fn times(&self) -> Vec<(tokio::time::Instant, Request)> {
            self.seen.lock().unwrap().clone()
        }

        fn record(&self, r: Request) {
            self.seen
                .lock()
                .unwrap()
                .push((tokio::time::Instant::now(), r));
        }

        fn next(&self) -> Option<Answer<K>> {
            self.script.lock().unwrap().pop_front()
        }
    }

    /// A page of `items` at `version`, continued by `next`.
    pub fn page<K: Clone>(items: Vec<K>, version: &str, next: Option<&str>) -> Answer<K> {
        Answer::Page(Ok(ObjectList {
            types: Default::default(),
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta {
                resource_version: Some(version.to_string()),
                continue_: next.map(str::to_string),
                ..Default::default()
            },
            items,
        }))
    }

    /// An API error with `code`.
    pub fn status(code: u16, msg: &str) -> Box<kube::core::Status> {
        Box::new(kube::core::Status {
            code,
            message: msg.to_string(),
            reason: if code == 410 { "Expired" } else { "" }.to_string(),
            ..Default::default()
        })
    }

    impl<K: Clone + Send + Sync + 'static> Source<K> for Fake<K> {
        async fn page(&self, lp: &ListParams) -> kube::Result<ObjectList<K>> {
            self.record(Request::Page {
                limit: lp.limit,
                continue_token: lp.continue_token.clone(),
            });
            match self.next() {
                Some(Answer::Page(r)) => r,
                Some(Answer::Hang) => futures::future::pending().await,
                Some(Answer::Watch(..)) => panic!("a page asked for, a watch scripted"),
                // Past the script: the API does not answer.
                None => futures::future::pending().await,
            }
        }

        async fn watch(&self, wp: &WatchParams, version: &str) -> kube::Result<Events<K>> {
            self.record(Request::Watch {
                version: version.to_string(),
                bookmarks: wp.bookmarks,
            });
            match self.next() {
                Some(Answer::Watch(r, open)) => {
                    let events = futures::stream::iter(r?);
                    Ok(match open {
                        Open::Ends => events.boxed(),
                        Open::Stays => events.chain(futures::stream::pending()).boxed(),
                    })
                }
                Some(Answer::Page(_) | Answer::Hang) => {
                    panic!("a watch asked for, a page scripted")
                }
                None => futures::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn pages_are_collected_at_the_first_pages_version() {
        let src = Fake::new(vec![
            page(vec![1, 2], "10", Some("c1")),
            page(vec![3], "10", Some("c2")),
            page(vec![4], "10", None),
        ]);
        let l = run(list_all(&src, &ListParams::default())).unwrap();
        assert_eq!(l.items, vec![1, 2, 3, 4]);
        assert_eq!(l.resource_version, "10");
        let pages: Vec<_> = src
            .requests()
            .into_iter()
            .map(|r| match r {
                Request::Page {
                    limit,
                    continue_token,
                } => (limit, continue_token),
                w => panic!("{w:?}"),
            })
            .collect();
        assert_eq!(
            pages,
            vec![
                (Some(PAGE), None),
                (Some(PAGE), Some("c1".into())),
                (Some(PAGE), Some("c2".into())),
            ]
        );
    }

    #[test]
    fn an_expired_continue_token_lists_again_from_the_start() {
        let src = Fake::new(vec![
            page(vec![1], "10", Some("c1")),
            Answer::Page(Err(kube::Error::Api(status(410, "continue too old")))),
            page(vec![1, 2], "12", Some("c9")),
            page(vec![3], "12", None),
        ]);
        let l = run(list_all(&src, &ListParams::default().limit(1))).unwrap();
        assert_eq!(l.items, vec![1, 2, 3]);
        assert_eq!(l.resource_version, "12");
        assert!(
            src.requests()
                .iter()
                .all(|r| matches!(r, Request::Page { limit: Some(1), .. }))
        );
    }

    #[test]
    fn other_errors_and_a_gone_first_page_are_the_callers() {
        let src: Fake<u8> = Fake::new(vec![Answer::Page(Err(kube::Error::Api(status(
            410, "gone",
        ))))]);
        assert!(is_gone(
            &run(list_all(&src, &ListParams::default())).unwrap_err()
        ));
        let src: Fake<u8> = Fake::new(vec![
            page(vec![1], "3", Some("c")),
            Answer::Page(Err(kube::Error::Api(status(500, "boom")))),
        ]);
        let e = run(list_all(&src, &ListParams::default())).unwrap_err();
        assert!(!is_gone(&e), "{e}");
    }
}
