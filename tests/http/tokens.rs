//! Token-aware HTTP caching, in process against a fake origin that says
//! which version of its data each response was built from
//! (`DataVersion` in the response extensions, as `DbLayer` does): a
//! stored variant answers a request whose token (here the header
//! `x-min-version`) is at or below its stamp, and nothing newer; an
//! invalidation at a version keeps out fills stamped below it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{HeaderValue, Request, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_scale::cache::DataVersion;
use tower_scale::http::{CacheHit, HttpCacheLayer};

type Svc = BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<tower_scale::http::CacheBody<Full<Bytes>>>,
    Infallible,
>;

/// The origin: its data is at `version` (none when `u64::MAX`: the
/// response says nothing), tagged `user:1`, fresh for a minute.
#[derive(Default)]
struct Data {
    version: AtomicU64,
    calls: AtomicUsize,
    /// When set, a call waits for a permit before answering.
    gate: std::sync::Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

const UNSTAMPED: u64 = u64::MAX;

fn cache(data: &Arc<Data>) -> (Svc, HttpCacheLayer) {
    let layer = HttpCacheLayer::builder()
        .mark_hits(true)
        .request_version(|h| h.get("x-min-version")?.to_str().ok()?.parse().ok())
        .build()
        .unwrap();
    let data = data.clone();
    let origin = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let data = data.clone();
        async move {
            let n = data.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let gate = data.gate.lock().unwrap().clone();
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            let v = data.version.load(Ordering::SeqCst);
            let mut res = Response::new(Full::new(Bytes::from(format!("v{v} #{n}"))));
            res.headers_mut()
                .insert("cache-control", HeaderValue::from_static("s-maxage=60"));
            res.headers_mut()
                .insert("surrogate-key", HeaderValue::from_static("user:1"));
            if v != UNSTAMPED {
                res.extensions_mut().insert(DataVersion(v));
            }
            Ok::<_, Infallible>(res)
        }
    });
    let svc = tower::Layer::layer(&layer, origin);
    (BoxCloneSyncService::new(svc), layer)
}

struct Got {
    body: String,
    hit: Option<CacheHit>,
}

async fn get(svc: &Svc, token: Option<&str>) -> Got {
    let mut req = Request::get("/users/1").header("host", "example.com");
    if let Some(t) = token {
        req = req.header("x-min-version", t);
    }
    let res = svc
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let hit = res.extensions().get::<CacheHit>().copied();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got {
        body: String::from_utf8_lossy(&body).into_owned(),
        hit,
    }
}

#[tokio::test]
async fn a_token_at_or_below_the_stamp_hits_and_a_newer_one_refetches() {
    let data = Arc::new(Data::default());
    data.version.store(10, Ordering::SeqCst);
    let (svc, _layer) = cache(&data);
    let first = get(&svc, None).await;
    assert_eq!((first.body.as_str(), first.hit), ("v10 #1", None));
    // Tokenless, older and equal tokens: hits, marked as such.
    for token in [None, Some("1"), Some("9"), Some("10")] {
        let got = get(&svc, token).await;
        assert_eq!(got.body, "v10 #1", "{token:?}");
        assert_eq!(got.hit, Some(CacheHit::Local), "{token:?}");
    }
    // A newer token: the origin, whose answer replaces the entry.
    data.version.store(12, Ordering::SeqCst);
    let newer = get(&svc, Some("11")).await;
    assert_eq!((newer.body.as_str(), newer.hit), ("v12 #2", None));
    for token in [None, Some("10"), Some("11"), Some("12")] {
        assert_eq!(get(&svc, token).await.body, "v12 #2", "{token:?}");
    }
    // The unknown token (u64::MAX) and anything above every stamp: never
    // from the cache.
    for token in [u64::MAX, 13, u64::MAX - 1] {
        let before = data.calls.load(Ordering::SeqCst);
        let got = get(&svc, Some(&token.to_string())).await;
        assert_eq!(got.hit, None, "{token}");
        assert_eq!(data.calls.load(Ordering::SeqCst), before + 1, "{token}");
    }
    // A token the function cannot read counts as none: a hit.
    assert_eq!(get(&svc, Some("garbage")).await.hit, Some(CacheHit::Local));
}

#[tokio::test]
async fn an_unstamped_response_answers_only_requests_without_a_token() {
    let data = Arc::new(Data::default());
    data.version.store(UNSTAMPED, Ordering::SeqCst);
    let (svc, _layer) = cache(&data);
    get(&svc, None).await;
    assert_eq!(get(&svc, None).await.hit, Some(CacheHit::Local));
    for token in ["0", "1", "5"] {
        let got = get(&svc, Some(token)).await;
        assert_eq!(
            got.hit, None,
            "an unstamped entry never answers token {token}"
        );
    }
    assert_eq!(data.calls.load(Ordering::SeqCst), 4);
    // Its own fetch replaced the entry (still unstamped): tokenless hits.
    assert_eq!(get(&svc, None).await.hit, Some(CacheHit::Local));
    // Once the origin stamps, the token holder's fetch is stored stamped.
    data.version.store(7, Ordering::SeqCst);
    assert_eq!(get(&svc, Some("5")).await.body, "v7 #5");
    assert_eq!(get(&svc, Some("7")).await.hit, Some(CacheHit::Local));
}

#[tokio::test]
async fn an_invalidation_at_a_version_keeps_older_fills_out() {
    let data = Arc::new(Data::default());
    data.version.store(5, Ordering::SeqCst);
    let (svc, layer) = cache(&data);
    get(&svc, None).await;
    assert_eq!(get(&svc, None).await.hit, Some(CacheHit::Local));
    // A write at 10; the origin (a lagging replica) still reads at 5.
    layer.invalidator().invalidate_tag_at("user:1", Some(10));
    for n in 2..5 {
        let got = get(&svc, None).await;
        assert_eq!(got.body, format!("v5 #{n}"), "answered, never stored");
        assert_eq!(got.hit, None);
    }
    // The replica caught up: stored again.
    data.version.store(10, Ordering::SeqCst);
    assert_eq!(get(&svc, None).await.body, "v10 #5");
    let got = get(&svc, Some("10")).await;
    assert_eq!(
        (got.body.as_str(), got.hit),
        ("v10 #5", Some(CacheHit::Local))
    );
    // A response that says nothing of its version is kept out only by
    // invalidations after its fetch began (it answers no token holder).
    layer.invalidator().invalidate_tag_at("user:1", Some(20));
    data.version.store(UNSTAMPED, Ordering::SeqCst);
    get(&svc, None).await;
    assert_eq!(get(&svc, None).await.hit, Some(CacheHit::Local));
    assert_eq!(get(&svc, Some("20")).await.hit, None);
}

#[tokio::test]
async fn a_token_holder_does_not_take_an_older_tokens_fetch() {
    let data = Arc::new(Data::default());
    data.version.store(10, Ordering::SeqCst);
    let (svc, _layer) = cache(&data);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *data.gate.lock().unwrap() = Some(gate.clone());
    // A leader with token 5 is fetching (its answer will be at 10) ...
    let leader = tokio::spawn({
        let svc = svc.clone();
        async move { get(&svc, Some("5")).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while data.calls.load(Ordering::SeqCst) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the leader never called"
        );
        tokio::task::yield_now().await;
    }
    // ... a request with token 20 does not wait for it: it calls itself.
    let newer = tokio::spawn({
        let svc = svc.clone();
        async move { get(&svc, Some("20")).await }
    });
    while data.calls.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the token-20 request waited"
        );
        tokio::task::yield_now().await;
    }
    // ... while one with token 5 waits and takes the leader's response.
    let follower = tokio::spawn({
        let svc = svc.clone();
        async move { get(&svc, Some("5")).await }
    });
    gate.add_permits(2);
    // A third call would wait for a permit for ever: bounded.
    let all = async { (leader.await, newer.await, follower.await) };
    let (leader, newer, follower) = tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("a third call to the origin");
    let (leader, newer, follower) = (leader.unwrap(), newer.unwrap(), follower.unwrap());
    assert_eq!(leader.hit, None);
    assert_eq!(newer.hit, None);
    assert_eq!(follower.hit, Some(CacheHit::Local), "{}", follower.body);
    assert_eq!(data.calls.load(Ordering::SeqCst), 2);
}
