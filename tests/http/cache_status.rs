//! RFC 9211 `Cache-Status`: the entry the HTTP cache adds after the
//! origin's (hit with `ttl`, miss, stored, collapsed, stale, request,
//! bypass, the shared tier's `detail=l2`), its name (token, quoted string,
//! refused), the switch that turns it off, and that what is stored never
//! carries it. In process (no sockets), on a mock clock.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_scale::cache::remote::{AttachRemote, Lease, RemoteEntry, RemoteTier};
use tower_scale::cache::{Clock, Invalidation, MockClock};
use tower_scale::http::{HttpCache, HttpCacheLayer, HttpCacheLayerBuilder, StoredVariants};

type Origin = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

/// A status and headers.
type Route = (u16, Vec<(String, HeaderValue)>);

/// Per path: the status and headers the origin answers with (a 304 with
/// the same headers to a request with `If-None-Match` when the route has
/// an `ETag`), and how many calls it got.
#[derive(Default)]
struct Script {
    routes: Mutex<HashMap<String, Route>>,
    calls: Mutex<HashMap<String, usize>>,
    /// When set, a call waits for a permit before answering.
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl Script {
    fn route(&self, path: &str, status: u16, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), HeaderValue::from_str(v).unwrap()))
            .collect();
        self.routes
            .lock()
            .unwrap()
            .insert(path.into(), (status, headers));
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
            let (status, headers) = script
                .routes
                .lock()
                .unwrap()
                .get(&path)
                .cloned()
                .unwrap_or((200, Vec::new()));
            let mut res = Response::new(Full::new(Bytes::from(format!("{path} #{n}"))));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            let validated = req.headers().contains_key("if-none-match")
                && headers.iter().any(|(k, _)| k == "etag");
            if validated && status == 200 {
                *res.status_mut() = StatusCode::NOT_MODIFIED;
                *res.body_mut() = Full::new(Bytes::new());
            }
            for (k, v) in headers {
                res.headers_mut()
                    .append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v);
            }
            Ok::<_, Infallible>(res)
        }
    }))
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

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    /// The `Cache-Status` lines, in order.
    fn lines(&self) -> Vec<&str> {
        self.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }
}

async fn send(
    svc: &HttpCache<Origin>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "a.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = svc
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(svc: &HttpCache<Origin>, path: &str, headers: &[(&str, &str)]) -> Got {
    send(svc, Method::GET, path, headers).await
}

#[tokio::test]
async fn a_miss_that_is_stored_then_hits_with_the_remaining_freshness() {
    let s = setup(|b| b);
    s.script
        .route("/a", 200, &[("cache-control", "max-age=60")]);
    let got = get(&s.svc, "/a", &[]).await;
    assert_eq!(got.lines(), ["tower-scale; fwd=miss; stored"]);
    s.mock.advance(Duration::from_millis(10_500));
    let got = get(&s.svc, "/a", &[]).await;
    assert_eq!(got.body, "/a #1");
    assert_eq!(got.headers["age"], "10");
    assert_eq!(
        got.lines(),
        ["tower-scale; hit; ttl=50"],
        "ttl + Age = max-age"
    );
    // HEAD and a client's own conditional request are answered from storage.
    let head = send(&s.svc, Method::HEAD, "/a", &[]).await;
    assert_eq!(head.lines(), ["tower-scale; hit; ttl=50"]);
    s.script.route(
        "/e",
        200,
        &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
    );
    get(&s.svc, "/e", &[]).await;
    let not_modified = get(&s.svc, "/e", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.lines(), ["tower-scale; hit; ttl=60"]);
    // A request whose `max-stale` accepts a stale response: a hit, ttl < 0.
    s.mock.advance(Duration::from_secs(65));
    let got = get(&s.svc, "/a", &[("cache-control", "max-stale=30")]).await;
    assert_eq!(got.lines(), ["tower-scale; hit; ttl=-15"]);
    assert_eq!(s.script.calls("/a"), 1);
}

#[tokio::test]
async fn a_miss_that_is_not_stored_says_only_miss() {
    let s = setup(|b| b);
    s.script.route("/n", 200, &[("cache-control", "no-store")]);
    s.script
        .route("/p", 200, &[("cache-control", "private, max-age=60")]);
    assert_eq!(
        get(&s.svc, "/n", &[]).await.lines(),
        ["tower-scale; fwd=miss"]
    );
    assert_eq!(
        get(&s.svc, "/p", &[]).await.lines(),
        ["tower-scale; fwd=miss"]
    );
    // A HEAD miss goes upstream and is not stored either.
    s.script
        .route("/h", 200, &[("cache-control", "max-age=60")]);
    let head = send(&s.svc, Method::HEAD, "/h", &[]).await;
    assert_eq!(head.lines(), ["tower-scale; fwd=miss"]);
    // `only-if-cached` with nothing stored: the cache's own 504, no entry.
    let got = get(&s.svc, "/x", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(got.lines().is_empty());
}

#[tokio::test]
async fn stale_entries_revalidated_or_refetched_say_stale() {
    let s = setup(|b| b);
    s.script.route(
        "/v",
        200,
        &[("cache-control", "max-age=10"), ("etag", "\"v1\"")],
    );
    s.script
        .route("/r", 200, &[("cache-control", "max-age=10")]);
    get(&s.svc, "/v", &[]).await;
    get(&s.svc, "/r", &[]).await;
    s.mock.advance(Duration::from_secs(11));
    let got = get(&s.svc, "/v", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "/v #1"));
    assert_eq!(
        got.lines(),
        ["tower-scale; fwd=stale; fwd-status=304; stored"],
        "revalidated with a 304, the stored body freshened"
    );
    assert_eq!(
        get(&s.svc, "/v", &[]).await.lines(),
        ["tower-scale; hit; ttl=10"]
    );
    let got = get(&s.svc, "/r", &[]).await;
    assert_eq!(got.body, "/r #2");
    assert_eq!(
        got.lines(),
        ["tower-scale; fwd=stale; stored"],
        "no validator: refetched"
    );
    // A fresh entry the request refuses (`no-cache`, `max-age=0`): request.
    let got = get(&s.svc, "/v", &[("cache-control", "no-cache")]).await;
    assert_eq!(
        got.lines(),
        ["tower-scale; fwd=request; fwd-status=304; stored"]
    );
    let got = get(&s.svc, "/r", &[("cache-control", "min-fresh=3600")]).await;
    assert_eq!(got.lines(), ["tower-scale; fwd=request; stored"]);
    // A response that says `no-cache` is validated every time: stale.
    s.script.route(
        "/nc",
        200,
        &[("cache-control", "no-cache, max-age=60"), ("etag", "\"n\"")],
    );
    get(&s.svc, "/nc", &[]).await;
    assert_eq!(
        get(&s.svc, "/nc", &[]).await.lines(),
        ["tower-scale; fwd=stale; fwd-status=304; stored"]
    );
}

#[tokio::test]
async fn stale_while_revalidate_is_a_hit_with_a_negative_ttl_and_stale_if_error_a_stale_forward() {
    let s = setup(|b| b);
    s.script.route(
        "/swr",
        200,
        &[("cache-control", "max-age=10, stale-while-revalidate=60")],
    );
    get(&s.svc, "/swr", &[]).await;
    s.mock.advance(Duration::from_secs(13));
    let got = get(&s.svc, "/swr", &[]).await;
    assert_eq!(got.body, "/swr #1");
    assert_eq!(got.lines(), ["tower-scale; hit; ttl=-3"]);

    s.script.route(
        "/sie",
        200,
        &[("cache-control", "max-age=10, stale-if-error=60")],
    );
    get(&s.svc, "/sie", &[]).await;
    s.script.route(
        "/sie",
        503,
        &[("cache-control", "max-age=10, stale-if-error=60")],
    );
    s.mock.advance(Duration::from_secs(20));
    let got = get(&s.svc, "/sie", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "/sie #1"));
    assert_eq!(
        got.lines(),
        ["tower-scale; fwd=stale; fwd-status=503; ttl=-10"]
    );
}

#[tokio::test]
async fn stale_if_error_after_a_service_error_has_no_fwd_status() {
    let (clock, mock) = Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let down = Arc::new(AtomicBool::new(false));
    let inner = tower::service_fn({
        let down = down.clone();
        move |_: Request<Full<Bytes>>| {
            let down = down.load(Ordering::SeqCst);
            async move {
                if down {
                    return Err(std::io::Error::other("down"));
                }
                let mut res = Response::new(Full::new(Bytes::from_static(b"up")));
                let cc = HeaderValue::from_static("max-age=10, stale-if-error=60");
                res.headers_mut().insert("cache-control", cc);
                Ok(res)
            }
        }
    });
    let svc = tower::Layer::layer(&layer, inner);
    let call = || {
        let req = Request::get("/a").header("host", "a.test");
        svc.clone()
            .oneshot(req.body(Full::new(Bytes::new())).unwrap())
    };
    call().await.unwrap();
    down.store(true, Ordering::SeqCst);
    mock.advance(Duration::from_secs(25));
    let res = call()
        .await
        .expect("the stale response stands in for the error");
    assert_eq!(
        res.headers()["cache-status"],
        "tower-scale; fwd=stale; ttl=-15"
    );
}

#[tokio::test]
async fn requests_the_cache_does_not_take_say_bypass() {
    let s = setup(|b| b);
    s.script
        .route("/a", 200, &[("cache-control", "max-age=60")]);
    let post = send(&s.svc, Method::POST, "/a", &[]).await;
    assert_eq!(post.lines(), ["tower-scale; fwd=bypass"]);
    let options = send(&s.svc, Method::OPTIONS, "/a", &[]).await;
    assert_eq!(options.lines(), ["tower-scale; fwd=bypass"]);
    let no_store = get(&s.svc, "/a", &[("cache-control", "no-store")]).await;
    assert_eq!(no_store.lines(), ["tower-scale; fwd=bypass"]);
    // Two `Host` lines: not keyed, not stored, not answered from storage.
    let two_hosts = get(&s.svc, "/a", &[("host", "b.test")]).await;
    assert_eq!(two_hosts.lines(), ["tower-scale; fwd=bypass"]);
    // Once stored, a `no-store` request is answered from storage: a hit.
    get(&s.svc, "/a", &[]).await;
    let no_store = get(&s.svc, "/a", &[("cache-control", "no-store")]).await;
    assert_eq!(no_store.lines(), ["tower-scale; hit; ttl=60"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_that_reused_a_concurrent_ones_response_says_collapsed() {
    let s = setup(|b| b);
    s.script
        .route("/c", 200, &[("cache-control", "max-age=60")]);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *s.script.gate.lock().unwrap() = Some(gate.clone());
    let lead = tokio::spawn({
        let svc = s.svc.clone();
        async move { get(&svc, "/c", &[]).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.script.calls("/c") < 1 {
        assert!(std::time::Instant::now() < deadline, "the lead never left");
        tokio::task::yield_now().await;
    }
    let waiter = tokio::spawn({
        let svc = s.svc.clone();
        async move { get(&svc, "/c", &[]).await }
    });
    while s.layer.stats().coalesced < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never joined"
        );
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    let (lead, waiter) = (lead.await.unwrap(), waiter.await.unwrap());
    assert_eq!(lead.lines(), ["tower-scale; fwd=miss; stored"]);
    assert_eq!(waiter.body, "/c #1");
    assert_eq!(waiter.lines(), ["tower-scale; fwd=miss; collapsed"]);
    assert_eq!(s.script.calls("/c"), 1);
}

#[tokio::test]
async fn the_switch_turns_it_off() {
    let s = setup(|b| b.cache_status(false));
    s.script.route(
        "/a",
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cache-status", "origin; hit"),
        ],
    );
    for _ in 0..2 {
        assert_eq!(get(&s.svc, "/a", &[]).await.lines(), ["origin; hit"]);
    }
    assert!(send(&s.svc, Method::POST, "/a", &[]).await.lines() == ["origin; hit"]);
    assert_eq!(s.script.calls("/a"), 2);
}

#[tokio::test]
async fn the_entry_goes_after_the_origins_and_is_never_stored() {
    let s = setup(|b| b.name("edge-1"));
    s.script.route(
        "/a",
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cache-status", "OriginCache; hit; ttl=1100"),
            ("cache-status", "\"Inner CDN\"; fwd=uri-miss; stored"),
        ],
    );
    let miss = get(&s.svc, "/a", &[]).await;
    assert_eq!(
        miss.lines(),
        [
            "OriginCache; hit; ttl=1100",
            "\"Inner CDN\"; fwd=uri-miss; stored",
            "edge-1; fwd=miss; stored",
        ],
        "the first member is the closest to the origin (RFC 9211 §2)"
    );
    s.mock.advance(Duration::from_secs(5));
    for _ in 0..3 {
        let hit = get(&s.svc, "/a", &[]).await;
        assert_eq!(
            hit.lines(),
            [
                "OriginCache; hit; ttl=1100",
                "\"Inner CDN\"; fwd=uri-miss; stored",
                "edge-1; hit; ttl=55",
            ],
            "the stored response carries the origin's members only"
        );
    }
    // A 304's `Cache-Status` replaces the stored one (a stored header
    // updated by a 304, RFC 9111 §3.2); ours still comes last.
    s.script.route(
        "/v",
        200,
        &[
            ("cache-control", "max-age=10"),
            ("etag", "\"v\""),
            ("cache-status", "origin; fwd=miss"),
        ],
    );
    get(&s.svc, "/v", &[]).await;
    s.script.route(
        "/v",
        200,
        &[
            ("cache-control", "max-age=10"),
            ("etag", "\"v\""),
            ("cache-status", "origin; hit"),
        ],
    );
    s.mock.advance(Duration::from_secs(11));
    let got = get(&s.svc, "/v", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.lines(),
        ["origin; hit", "edge-1; fwd=stale; fwd-status=304; stored"]
    );
    assert_eq!(
        get(&s.svc, "/v", &[]).await.lines(),
        ["origin; hit", "edge-1; hit; ttl=10"]
    );
}

#[tokio::test]
async fn a_hostile_origin_value_is_kept_as_is_and_never_read_into_ours() {
    let s = setup(|b| b);
    let hostile = [
        "tower-scale; hit; ttl=999999",
        "tower-scale; fwd=bypass, \"unterminated; x=",
        ",,;;=\"\\",
    ];
    s.script.route(
        "/a",
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cache-status", hostile[0]),
            ("cache-status", hostile[1]),
            ("cache-status", hostile[2]),
        ],
    );
    let miss = get(&s.svc, "/a", &[]).await;
    let mut want = hostile.to_vec();
    want.push("tower-scale; fwd=miss; stored");
    assert_eq!(miss.lines(), want);
    let hit = get(&s.svc, "/a", &[]).await;
    want[3] = "tower-scale; hit; ttl=60";
    assert_eq!(hit.lines(), want);
    // Bytes that are not UTF-8 pass through too.
    let raw = HeaderValue::from_bytes(b"caf\xe9; hit").unwrap();
    s.script.routes.lock().unwrap().insert(
        "/b".into(),
        (
            200,
            vec![
                (
                    "cache-control".into(),
                    HeaderValue::from_static("max-age=60"),
                ),
                ("cache-status".into(), raw.clone()),
            ],
        ),
    );
    for ours in ["tower-scale; fwd=miss; stored", "tower-scale; hit; ttl=60"] {
        let got = get(&s.svc, "/b", &[]).await;
        let all: Vec<&HeaderValue> = got.headers.get_all("cache-status").iter().collect();
        assert_eq!(all, [&raw, &HeaderValue::from_static(ours)]);
    }
}

#[tokio::test]
async fn names_are_tokens_or_quoted_strings_and_unwritable_ones_fail_the_build() {
    let s = setup(|b| b.name("My \"edge\" cache"));
    s.script
        .route("/a", 200, &[("cache-control", "max-age=60")]);
    assert_eq!(
        get(&s.svc, "/a", &[]).await.lines(),
        ["\"My \\\"edge\\\" cache\"; fwd=miss; stored"]
    );
    let s = setup(|b| b.name("cache-3.example.com"));
    s.script
        .route("/a", 200, &[("cache-control", "max-age=60")]);
    assert_eq!(
        get(&s.svc, "/a", &[]).await.lines(),
        ["cache-3.example.com; fwd=miss; stored"]
    );
    for bad in ["caché", "tab\there", "new\nline"] {
        let err = HttpCacheLayer::builder().name(bad).build().unwrap_err();
        assert!(err.to_string().contains("Cache-Status"), "{err}");
        HttpCacheLayer::builder()
            .name(bad)
            .cache_status(false)
            .build()
            .expect("no entry, no constraint on the name");
    }
}

/// A shared tier in memory: what it is given, whatever happens.
#[derive(Default)]
struct MemoryTier {
    held: Mutex<HashMap<String, RemoteEntry<StoredVariants>>>,
}

#[async_trait::async_trait]
impl RemoteTier<String, StoredVariants> for MemoryTier {
    async fn get(&self, key: &String) -> Option<RemoteEntry<StoredVariants>> {
        self.held.lock().unwrap().get(key).cloned()
    }
    async fn put(&self, key: &String, entry: RemoteEntry<StoredVariants>, _lease: Lease) {
        self.held.lock().unwrap().insert(key.clone(), entry);
    }
    async fn lease(&self, _key: &String) -> Lease {
        Lease::Acquired { token: 1, epoch: 1 }
    }
    fn invalidate(&self, _seq: u64, _what: Invalidation<String>, _version: Option<u64>) {}
}

#[tokio::test]
async fn a_shared_tier_hit_is_a_hit_with_detail_l2() {
    let (clock, mock) = Clock::mock();
    let tier = Arc::new(MemoryTier::default());
    let script = Arc::new(Script::default());
    script.route(
        "/a",
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cache-status", "origin; fwd=miss"),
        ],
    );
    let instance = || {
        let layer = HttpCacheLayer::builder()
            .clock(clock.clone())
            .build()
            .unwrap();
        layer.attach_tier(tier.clone()).unwrap();
        let svc = tower::Layer::layer(&layer, origin(script.clone()));
        (layer, svc)
    };
    let (_a, a) = instance();
    let (b_layer, b) = instance();
    assert_eq!(
        get(&a, "/a", &[]).await.lines(),
        ["origin; fwd=miss", "tower-scale; fwd=miss; stored"]
    );
    mock.advance(Duration::from_secs(7));
    let got = get(&b, "/a", &[]).await;
    assert_eq!(got.body, "/a #1");
    assert_eq!(
        got.lines(),
        ["origin; fwd=miss", "tower-scale; hit; ttl=53; detail=l2"],
        "what the tier holds carries the origin's members only"
    );
    assert_eq!(b_layer.stats().remote_hits, 1);
    // Now in B's own store: a plain hit.
    assert_eq!(
        get(&b, "/a", &[]).await.lines(),
        ["origin; fwd=miss", "tower-scale; hit; ttl=53"]
    );
    assert_eq!(script.calls("/a"), 1);
}
