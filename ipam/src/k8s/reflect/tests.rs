//! The reflector loop against a scripted API ([`super::super::list::fake`]).

use super::super::list::fake::{Answer, Fake, Open, Request, page, status};
use super::*;
use k8s_openapi::api::core::v1::ConfigMap;

/// Config map `name` at resourceVersion `rv`, with `v` in its data.
fn cm(name: &str, rv: &str, v: &str) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.metadata.namespace = Some("ns".into());
    c.metadata.resource_version = Some(rv.into());
    c.metadata.managed_fields = Some(vec![Default::default()]);
    c.data = Some([("v".to_string(), v.to_string())].into());
    c
}

fn added(c: ConfigMap) -> kube::Result<WatchEvent<ConfigMap>> {
    Ok(WatchEvent::Added(c))
}

fn modified(c: ConfigMap) -> kube::Result<WatchEvent<ConfigMap>> {
    Ok(WatchEvent::Modified(c))
}

fn watch_ok(events: Vec<kube::Result<WatchEvent<ConfigMap>>>, open: Open) -> Answer<ConfigMap> {
    Answer::Watch(Ok(events), open)
}

/// A watch the API server could not be reached to open.
fn refused_watch() -> Answer<ConfigMap> {
    Answer::Watch(
        Err(kube::Error::Service("connection refused".into())),
        Open::Ends,
    )
}

/// A connection that broke under the watch.
fn broken() -> kube::Result<WatchEvent<ConfigMap>> {
    Err(kube::Error::Service("connection reset".into()))
}

struct Bed {
    src: Arc<Fake<ConfigMap>>,
    w: Watched<ConfigMap>,
    _task: margay_task::Owned,
}

impl Source<ConfigMap> for Arc<Fake<ConfigMap>> {
    fn page(
        &self,
        lp: &ListParams,
    ) -> impl Future<Output = kube::Result<kube::api::ObjectList<ConfigMap>>> + Send {
        (**self).page(lp)
    }

    fn watch(
        &self,
        wp: &WatchParams,
        version: &str,
    ) -> impl Future<Output = kube::Result<super::super::list::Events<ConfigMap>>> + Send {
        (**self).watch(wp, version)
    }
}

fn bed(script: Vec<Answer<ConfigMap>>) -> Bed {
    let src = Arc::new(Fake::new(script));
    let (w, task) = watch_source(
        src.clone(),
        watcher::Config::default(),
        "config maps",
        Arc::new(Notify::new()),
        |_| {},
    );
    Bed {
        src,
        w,
        _task: margay_task::Owned::spawn(task),
    }
}

impl Bed {
    /// The held objects as (name, data v), sorted, and whether fresh.
    fn held(&self) -> (Vec<(String, String)>, &'static str) {
        let k = self.w.read();
        let state = match &k {
            Known::Fresh(_) => "fresh",
            Known::Stale(..) => "stale",
            Known::Unknown(_) => "unknown",
        };
        let mut v: Vec<(String, String)> = k
            .value()
            .map(|v| {
                v.iter()
                    .map(|c| {
                        assert!(c.metadata.managed_fields.is_none(), "managedFields kept");
                        let d = c.data.as_ref().and_then(|d| d.get("v")).cloned();
                        (c.name_any(), d.unwrap_or_default())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        (v, state)
    }

    /// Waits (virtual time) until what is held is in `state`.
    async fn until(&self, state: &str) {
        let mut rx = self.w.health.subscribe();
        let want = |h: &Health| match state {
            "fresh" => matches!(h, Health::Current),
            "stale" => matches!(h, Health::Broken(..)),
            _ => matches!(h, Health::Listing(Some(_))),
        };
        rx.wait_for(want).await.expect("the loop runs");
    }

    fn lists(&self) -> usize {
        self.src
            .requests()
            .iter()
            .filter(|r| matches!(r, Request::Page { .. }))
            .count()
    }

    fn watches(&self) -> Vec<String> {
        self.src
            .requests()
            .into_iter()
            .filter_map(|r| match r {
                Request::Watch { version, bookmarks } => {
                    assert!(bookmarks, "watches ask for bookmarks");
                    Some(version)
                }
                Request::Page { .. } => None,
            })
            .collect()
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Lets the loop run until it waits on something (no time passes).
async fn idle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_broken_watch_resumes_from_its_version_without_a_list() {
    let b = bed(vec![
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![modified(cm("a", "6", "2")), broken()], Open::Stays),
        // Resumed from 6: quiet (nothing changed meanwhile).
        watch_ok(vec![], Open::Stays),
    ]);
    b.until("stale").await;
    assert_eq!(b.held(), (kv(&[("a", "2")]), "stale"));
    let t0 = tokio::time::Instant::now();
    b.until("fresh").await;
    // One back-off (1 s), then SETTLE with no word on the new watch.
    assert_eq!(t0.elapsed(), Duration::from_secs(1) + SETTLE);
    assert_eq!(b.held(), (kv(&[("a", "2")]), "fresh"));
    assert_eq!(b.lists(), 1, "{:?}", b.src.requests());
    assert_eq!(b.watches(), vec!["5", "6"]);
}

#[tokio::test(start_paused = true)]
async fn an_event_on_a_resumed_watch_makes_it_fresh_at_once() {
    let b = bed(vec![
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![broken()], Open::Stays),
        // What changed while it was away is replayed.
        watch_ok(vec![added(cm("b", "7", "1"))], Open::Stays),
    ]);
    b.until("stale").await;
    let t0 = tokio::time::Instant::now();
    b.until("fresh").await;
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(b.held(), (kv(&[("a", "1"), ("b", "1")]), "fresh"));
    assert_eq!(b.lists(), 1);
    assert_eq!(b.watches(), vec!["5", "5"]);
}

#[tokio::test(start_paused = true)]
async fn a_bookmark_moves_the_version_on() {
    let bm: WatchEvent<ConfigMap> = serde_json::from_value(serde_json::json!({
        "type": "BOOKMARK",
        "object": {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"resourceVersion": "90"}}
    }))
    .unwrap();
    let b = bed(vec![
        page(vec![], "5", None),
        watch_ok(vec![Ok(bm), broken()], Open::Stays),
        watch_ok(vec![], Open::Stays),
    ]);
    b.until("stale").await;
    b.until("fresh").await;
    assert_eq!(b.watches(), vec!["5", "90"]);
}

#[tokio::test(start_paused = true)]
async fn a_watch_ending_after_its_timeout_is_opened_again_at_once_still_fresh() {
    let b = bed(vec![
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![modified(cm("a", "8", "2"))], Open::Ends),
        watch_ok(vec![], Open::Stays),
    ]);
    b.until("fresh").await;
    let t0 = tokio::time::Instant::now();
    idle().await;
    assert_eq!(b.watches(), vec!["5", "8"]);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(b.held(), (kv(&[("a", "2")]), "fresh"));
}

#[tokio::test(start_paused = true)]
async fn gone_lists_again_keeping_the_old_contents_until_the_whole_list_is_in() {
    let b = bed(vec![
        page(vec![cm("a", "4", "1"), cm("b", "4", "1")], "5", None),
        watch_ok(vec![broken()], Open::Stays),
        // Resumed too late: the API server no longer has 5.
        watch_ok(
            vec![Ok(WatchEvent::Error(status(
                410,
                "too old resource version: 5 (9)",
            )))],
            Open::Ends,
        ),
        // The list again: one page of two; the second never comes.
        page(vec![cm("a", "9", "3")], "10", Some("more")),
    ]);
    b.until("stale").await;
    let t0 = tokio::time::Instant::now();
    // Nothing is ever held partly listed: still the old contents, stale.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(b.held(), (kv(&[("a", "1"), ("b", "1")]), "stale"));
    assert_eq!(b.lists(), 3, "{:?}", b.src.requests());
    assert!(t0.elapsed() >= Duration::from_secs(1));
    let why = b.w.read().why().unwrap().to_string();
    assert!(why.contains("no longer has resourceVersion 5"), "{why}");
}

#[tokio::test(start_paused = true)]
async fn gone_after_a_completed_list_is_fresh_with_the_new_list() {
    let b = bed(vec![
        page(vec![cm("a", "4", "1"), cm("b", "4", "1")], "5", None),
        watch_ok(vec![broken()], Open::Stays),
        Answer::Watch(Err(kube::Error::Api(status(410, "gone"))), Open::Ends),
        page(vec![cm("a", "9", "3")], "10", Some("more")),
        page(vec![cm("c", "9", "1")], "10", None),
        watch_ok(vec![], Open::Stays),
    ]);
    b.until("stale").await;
    b.until("fresh").await;
    assert_eq!(b.held(), (kv(&[("a", "3"), ("c", "1")]), "fresh"));
    assert_eq!(b.lists(), 3);
    assert_eq!(b.watches(), vec!["5", "5", "10"]);
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_a_refused_version_is_listed_again_at_once() {
    let gone = || {
        watch_ok(
            vec![Ok(WatchEvent::Error(status(
                410,
                "too old resource version",
            )))],
            Open::Ends,
        )
    };
    let b = bed(vec![
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![modified(cm("a", "6", "1")), broken()], Open::Stays),
        // Down for 1 + 2 + 4 + 8 s, then back with a cache that starts
        // after 6.
        refused_watch(),
        refused_watch(),
        refused_watch(),
        refused_watch(),
        gone(),
        page(vec![cm("a", "9", "2")], "10", None),
        // A list whose version is refused at once, twice: slowed down.
        gone(),
        page(vec![cm("a", "9", "2")], "11", None),
        gone(),
        page(vec![cm("a", "9", "2")], "12", None),
        watch_ok(vec![], Open::Stays),
    ]);
    let t0 = tokio::time::Instant::now();
    b.until("stale").await;
    let mut rx = b.w.health.subscribe();
    // Until the last list's watch is accepted.
    rx.wait_for(|h| matches!(h, Health::Current)).await.unwrap();
    tokio::time::sleep(SETTLE).await;
    assert_eq!(b.held(), (kv(&[("a", "2")]), "fresh"));
    let lists: Vec<Duration> = b
        .src
        .times()
        .into_iter()
        .filter(|(_, r)| matches!(r, Request::Page { .. }))
        .map(|(t, _)| t - t0)
        .collect();
    let s = Duration::from_secs;
    assert_eq!(
        lists,
        vec![
            s(0),
            // Right after the 410 that ended the outage (1 + 2 + 4 + 8
            // + 8 s of back-off), no back-off of its own.
            s(23),
            // Refused at once from fresh lists: 1 s, then 2 s first.
            s(24),
            s(26),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_list_the_api_never_answers_is_given_up_and_tried_again() {
    let b = bed(vec![
        Answer::Hang,
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![], Open::Stays),
    ]);
    let t0 = tokio::time::Instant::now();
    b.until("unknown").await;
    assert_eq!(t0.elapsed(), LIST_DEADLINE);
    assert!(
        matches!(b.w.read(), Known::Unknown(Why::NotListed { last: Some(w), .. }) if *w == Why::NoAnswer),
        "{:?}",
        b.w.read()
    );
    b.until("fresh").await;
    assert_eq!(t0.elapsed(), LIST_DEADLINE + Duration::from_secs(1));
    assert_eq!(b.held(), (kv(&[("a", "1")]), "fresh"));
    assert_eq!(b.lists(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_first_list_that_fails_is_retried_with_back_off_and_unknown_meanwhile() {
    let err = || Answer::Page(Err(kube::Error::Api(status(503, "unavailable"))));
    let b = bed(vec![
        err(),
        err(),
        err(),
        err(),
        err(),
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![], Open::Stays),
    ]);
    b.until("unknown").await;
    assert_eq!(b.held().1, "unknown");
    let t0 = tokio::time::Instant::now();
    b.until("fresh").await;
    // 1 + 2 + 4 + 8 + 8 s (BACKOFF_MAX).
    assert_eq!(t0.elapsed(), Duration::from_secs(23));
    assert_eq!(b.held(), (kv(&[("a", "1")]), "fresh"));
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_cannot_be_opened_is_retried_from_its_version() {
    let b = bed(vec![
        page(vec![cm("a", "4", "1")], "5", None),
        watch_ok(vec![broken()], Open::Stays),
        refused_watch(),
        refused_watch(),
        watch_ok(vec![], Open::Stays),
    ]);
    b.until("stale").await;
    b.until("fresh").await;
    assert_eq!(b.lists(), 1);
    assert_eq!(b.watches(), vec!["5", "5", "5", "5"]);
}
