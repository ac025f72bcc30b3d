//! The HTTP cache on the core's engine: tags (read from a header, stripped,
//! invalidated race-safely), the core's `Invalidator`, evictions counted,
//! the quick_cache store, and a shared tier that still holds what this
//! instance invalidated. In process (no sockets), on a mock clock.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_scale::cache::remote::{AttachRemote, Lease, RemoteEntry, RemoteLink, RemoteTier};
use tower_scale::cache::{Clock, Invalidation, MockClock};
use tower_scale::http::{HttpCache, HttpCacheLayer, HttpCacheLayerBuilder, StoredVariants};

type Origin = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

/// What the origin answers per path: headers and body; counts calls.
#[derive(Default)]
struct Script {
    routes: Mutex<HashMap<String, Vec<(String, HeaderValue)>>>,
    calls: Mutex<HashMap<String, usize>>,
    /// When set, a call waits for a permit before answering.
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl Script {
    fn route(&self, path: &str, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), HeaderValue::from_str(v).unwrap()))
            .collect();
        self.route_raw(path, headers);
    }
    fn route_raw(&self, path: &str, headers: Vec<(String, HeaderValue)>) {
        self.routes.lock().unwrap().insert(path.into(), headers);
    }
    fn calls(&self, path: &str) -> usize {
        self.calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn origin(script: Arc<Script>) -> Origin {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let script = script.clone();
        async move {
            let path = req.uri().path().to_string();
            let n = {
                let mut calls = script.calls.lock().unwrap();
                let n = calls.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            let gate = script.gate.lock().unwrap().clone();
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            let conditional = req.headers().contains_key("if-none-match");
            let headers = script
                .routes
                .lock()
                .unwrap()
                .get(&path)
                .cloned()
                .unwrap_or_default();
            let mut res = Response::new(Full::new(Bytes::from(format!("{path} #{n}"))));
            if conditional {
                *res.status_mut() = StatusCode::NOT_MODIFIED;
            }
            for (k, v) in headers {
                res.headers_mut()
                    .append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v);
            }
            Ok::<_, Infallible>(res)
        }
    }))
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "a.test")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

struct Setup {
    script: Arc<Script>,
    layer: HttpCacheLayer,
    svc: HttpCache<Origin>,
    mock: MockClock,
}

fn setup(configure: impl FnOnce(HttpCacheLayerBuilder) -> HttpCacheLayerBuilder) -> Setup {
    let (clock, mock) = Clock::mock();
    let layer = configure(HttpCacheLayer::builder().clock(clock))
        .build()
        .unwrap();
    let script = Arc::new(Script::default());
    let svc = tower::Layer::layer(&layer, origin(script.clone()));
    Setup {
        script,
        layer,
        svc,
        mock,
    }
}

/// The response's status, headers and body.
async fn call(svc: &HttpCache<Origin>, path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let res = svc.clone().oneshot(get(path)).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn a_tag_invalidation_removes_every_response_tagged_with_it_and_only_those() {
    let s = setup(|b| b);
    s.script.route(
        "/a",
        &[
            ("cache-control", "max-age=60"),
            ("surrogate-key", "user:1 list"),
        ],
    );
    s.script.route(
        "/b",
        &[
            ("cache-control", "max-age=60"),
            ("surrogate-key", "user:2"),
            ("surrogate-key", "list"),
        ],
    );
    s.script.route("/c", &[("cache-control", "max-age=60")]);
    for path in ["/a", "/b", "/c"] {
        let (_, headers, _) = call(&s.svc, path).await;
        assert!(
            !headers.contains_key("surrogate-key"),
            "the tag header is stripped from a miss"
        );
        let (_, headers, _) = call(&s.svc, path).await;
        assert!(!headers.contains_key("surrogate-key"), "and from a hit");
        assert_eq!(s.script.calls(path), 1);
    }
    let inv = s.layer.invalidator();
    inv.invalidate_tag("user:1");
    for path in ["/a", "/b", "/c"] {
        call(&s.svc, path).await;
    }
    assert_eq!(
        (
            s.script.calls("/a"),
            s.script.calls("/b"),
            s.script.calls("/c")
        ),
        (2, 1, 1),
        "only /a carried user:1"
    );
    inv.invalidate_tag("list");
    for path in ["/a", "/b", "/c"] {
        call(&s.svc, path).await;
    }
    assert_eq!(
        (
            s.script.calls("/a"),
            s.script.calls("/b"),
            s.script.calls("/c")
        ),
        (3, 2, 1),
        "tags on several lines are all read"
    );
    inv.invalidate_key(&"http://a.test/c".to_string());
    call(&s.svc, "/c").await;
    assert_eq!(s.script.calls("/c"), 2, "by key: the cache key string");
    inv.invalidate_all();
    for path in ["/a", "/b", "/c"] {
        call(&s.svc, path).await;
    }
    assert_eq!(
        (
            s.script.calls("/a"),
            s.script.calls("/b"),
            s.script.calls("/c")
        ),
        (4, 3, 3)
    );
    let stats = s.layer.stats();
    assert_eq!(stats.invalidations, 4);
    assert_eq!(stats.hits, 6);
}

#[tokio::test]
async fn the_tag_header_can_be_renamed_and_passed_through() {
    let s = setup(|b| {
        b.tag_header(HeaderName::from_static("x-tags"))
            .pass_tag_header(true)
    });
    s.script.route(
        "/a",
        &[
            ("cache-control", "max-age=60"),
            ("x-tags", "page:a"),
            ("surrogate-key", "not-a-tag-here"),
        ],
    );
    for _ in 0..2 {
        let (_, headers, _) = call(&s.svc, "/a").await;
        assert_eq!(headers["x-tags"], "page:a", "passed on a miss and a hit");
        assert_eq!(headers["surrogate-key"], "not-a-tag-here");
    }
    assert_eq!(s.script.calls("/a"), 1);
    s.layer.invalidator().invalidate_tag("not-a-tag-here");
    call(&s.svc, "/a").await;
    assert_eq!(
        s.script.calls("/a"),
        1,
        "only the configured header holds tags"
    );
    s.layer.invalidator().invalidate_tag("page:a");
    call(&s.svc, "/a").await;
    assert_eq!(s.script.calls("/a"), 2);
}

#[tokio::test]
async fn a_response_whose_tags_cannot_all_be_recorded_is_not_stored() {
    let s = setup(|b| b);
    let many: Vec<String> = (0..=tower_scale::http::MAX_TAGS)
        .map(|i| format!("t{i}"))
        .collect();
    let just_enough = many[..tower_scale::http::MAX_TAGS].join(" ");
    let long = "x".repeat(tower_scale::http::MAX_TAG_LEN + 1);
    let cc = || {
        (
            "cache-control".to_string(),
            HeaderValue::from_static("max-age=60"),
        )
    };
    let tag = |v: HeaderValue| ("surrogate-key".to_string(), v);
    s.script.route_raw(
        "/many",
        vec![cc(), tag(HeaderValue::from_str(&many.join(" ")).unwrap())],
    );
    s.script.route_raw(
        "/enough",
        vec![cc(), tag(HeaderValue::from_str(&just_enough).unwrap())],
    );
    s.script.route_raw(
        "/long",
        vec![cc(), tag(HeaderValue::from_str(&long).unwrap())],
    );
    s.script.route_raw(
        "/obs-text",
        vec![
            cc(),
            tag(HeaderValue::from_bytes(b"caf\xe9 user:1").unwrap()),
        ],
    );
    // Thousands of repeats of one tag are one tag, but reading stops early.
    s.script.route_raw(
        "/repeats",
        vec![
            cc(),
            tag(HeaderValue::from_str(&"r ".repeat(5000)).unwrap()),
        ],
    );
    for path in ["/many", "/long", "/obs-text", "/repeats"] {
        for _ in 0..2 {
            let (status, headers, _) = call(&s.svc, path).await;
            assert_eq!(status, StatusCode::OK);
            assert!(!headers.contains_key("surrogate-key"), "{path}: stripped");
        }
        assert_eq!(s.script.calls(path), 2, "{path}: passed on, not stored");
    }
    call(&s.svc, "/enough").await;
    call(&s.svc, "/enough").await;
    assert_eq!(s.script.calls("/enough"), 1, "MAX_TAGS tags are stored");
    s.layer.invalidator().invalidate_tag("t63");
    call(&s.svc, "/enough").await;
    assert_eq!(s.script.calls("/enough"), 2, "and each one invalidates it");
}

/// Waits (polling, with a deadline) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_began_before_a_tag_invalidation_is_neither_stored_nor_joined() {
    let s = setup(|b| b);
    s.script.route(
        "/a",
        &[("cache-control", "max-age=60"), ("surrogate-key", "t")],
    );
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *s.script.gate.lock().unwrap() = Some(gate.clone());
    let first = tokio::spawn({
        let svc = s.svc.clone();
        async move { call(&svc, "/a").await }
    });
    until("the first fetch reached the origin", || {
        s.script.calls("/a") == 1
    })
    .await;
    s.layer.invalidator().invalidate_tag("t");
    // A request after the invalidation does not join the fetch before it.
    let second = tokio::spawn({
        let svc = s.svc.clone();
        async move { call(&svc, "/a").await }
    });
    until("the second request went upstream itself", || {
        s.script.calls("/a") == 2
    })
    .await;
    gate.add_permits(2);
    let (_, _, body1) = first.await.unwrap();
    let (_, _, body2) = second.await.unwrap();
    assert_eq!(body1, "/a #1", "the first caller still gets its answer");
    assert_eq!(body2, "/a #2");
    *s.script.gate.lock().unwrap() = None;
    let (_, _, body) = call(&s.svc, "/a").await;
    assert_eq!(
        body, "/a #2",
        "only the fetch after the invalidation was stored"
    );
    let stats = s.layer.stats();
    assert_eq!(stats.not_stored, 1);
    assert_eq!(stats.stored, 1);
}

#[tokio::test]
async fn a_304_brings_its_own_tags() {
    let s = setup(|b| b);
    s.script.route(
        "/a",
        &[
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("surrogate-key", "old"),
        ],
    );
    call(&s.svc, "/a").await;
    s.mock.advance(Duration::from_secs(11));
    s.script.route(
        "/a",
        &[
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("surrogate-key", "new"),
        ],
    );
    let (status, headers, body) = call(&s.svc, "/a").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "/a #1"));
    assert!(!headers.contains_key("surrogate-key"));
    assert_eq!(s.script.calls("/a"), 2, "revalidated");
    s.layer.invalidator().invalidate_tag("old");
    call(&s.svc, "/a").await;
    assert_eq!(s.script.calls("/a"), 2, "the 304 replaced the tags");
    s.layer.invalidator().invalidate_tag("new");
    call(&s.svc, "/a").await;
    assert_eq!(s.script.calls("/a"), 3);
}

async fn fill_many(svc: &HttpCache<Origin>, script: &Script, n: usize) {
    for i in 0..n {
        let path = format!("/p{i}");
        script.route(&path, &[("cache-control", "max-age=60")]);
        call(svc, &path).await;
    }
}

#[tokio::test]
async fn evictions_are_counted_within_max_bytes() {
    // Each response weighs its body plus 512 bytes.
    let s = setup(|b| b.max_bytes(8 * 1024));
    fill_many(&s.svc, &s.script, 200).await;
    let stats = s.layer.stats();
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.entries * 512 <= 8 * 1024, "{stats:?}");
    assert_eq!(stats.stored, 200);
}

#[cfg(feature = "quick-cache")]
#[tokio::test]
async fn the_quick_cache_store_counts_evictions_too() {
    let (clock, _mock) = Clock::mock();
    let layer = HttpCacheLayer::builder()
        .clock(clock)
        .max_bytes(8 * 1024)
        .build_quick()
        .unwrap();
    let script = Arc::new(Script::default());
    let svc = tower::Layer::layer(&layer, origin(script.clone()));
    fill_many(&svc, &script, 200).await;
    let stats = layer.stats();
    assert!(stats.evictions > 0, "{stats:?}");
    script.route("/hit", &[("cache-control", "max-age=60")]);
    call(&svc, "/hit").await;
    call(&svc, "/hit").await;
    assert_eq!(script.calls("/hit"), 1, "and serves hits");
}

/// A shared tier that keeps what it is given and applies no invalidation
/// until told: a tier that still holds what this instance invalidated.
#[derive(Default)]
struct SlowTier {
    held: Mutex<HashMap<String, RemoteEntry<StoredVariants>>>,
    queued: AtomicU64,
}

#[async_trait::async_trait]
impl RemoteTier<String, StoredVariants> for SlowTier {
    async fn get(&self, key: &String) -> Option<RemoteEntry<StoredVariants>> {
        self.held.lock().unwrap().get(key).cloned()
    }
    async fn put(&self, key: &String, entry: RemoteEntry<StoredVariants>, _lease: Lease) {
        self.held.lock().unwrap().insert(key.clone(), entry);
    }
    async fn lease(&self, _key: &String) -> Lease {
        Lease::Acquired { token: 1, epoch: 1 }
    }
    fn invalidate(&self, seq: u64, _what: Invalidation<String>, _version: Option<u64>) {
        self.queued.fetch_max(seq, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_shared_tier_value_is_not_used_while_a_local_invalidation_touching_it_is_pending() {
    let s = setup(|b| b);
    let tier = Arc::new(SlowTier::default());
    let link: RemoteLink<String> = s.layer.attach_tier(tier.clone()).unwrap();
    assert!(
        s.layer.attach_tier(tier.clone()).is_err(),
        "one tier per cache"
    );
    s.script.route(
        "/a",
        &[("cache-control", "max-age=60"), ("surrogate-key", "t")],
    );
    call(&s.svc, "/a").await;
    assert!(
        tier.held.lock().unwrap().contains_key("http://a.test/a"),
        "a miss writes the tier"
    );
    s.layer.invalidator().invalidate_tag("t");
    let (_, _, body) = call(&s.svc, "/a").await;
    assert_eq!(
        body, "/a #2",
        "the tier's copy is older than the invalidation"
    );
    assert_eq!(s.layer.stats().remote_fenced, 1);
    // By key too; once the tier reports it applied, its values count again.
    s.layer.invalidate("http://a.test/a");
    call(&s.svc, "/a").await;
    assert_eq!(s.script.calls("/a"), 3);
    link.applied(tier.queued.load(Ordering::SeqCst));
    s.layer.invalidate("http://a.test/a");
    link.applied(tier.queued.load(Ordering::SeqCst));
    let (_, _, body) = call(&s.svc, "/a").await;
    assert_eq!(body, "/a #3", "an L2 hit");
    assert_eq!(s.layer.stats().remote_hits, 1);
    assert_eq!(s.script.calls("/a"), 3);
}

#[tokio::test]
async fn a_private_cache_takes_no_shared_tier() {
    let s = setup(|b| b.private());
    assert!(s.layer.attach_tier(Arc::new(SlowTier::default())).is_err());
}

#[tokio::test]
async fn stale_hits_revalidate_once_in_the_background() {
    let s = setup(|b| b);
    s.script.route(
        "/a",
        &[
            ("cache-control", "max-age=10, stale-while-revalidate=60"),
            ("etag", "\"v1\""),
        ],
    );
    call(&s.svc, "/a").await;
    s.mock.advance(Duration::from_secs(11));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *s.script.gate.lock().unwrap() = Some(gate.clone());
    for _ in 0..50 {
        let (status, _, body) = call(&s.svc, "/a").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "/a #1"));
    }
    until("the background revalidation reached the origin", || {
        s.script.calls("/a") == 2
    })
    .await;
    gate.add_permits(1);
    until("it freshened the entry", || s.layer.stats().refreshes >= 2).await;
    assert_eq!(
        s.script.calls("/a"),
        2,
        "one revalidation for 50 stale hits"
    );
    assert_eq!(s.layer.stats().stale_hits, 50);
}
