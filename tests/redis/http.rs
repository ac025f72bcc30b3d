//! The HTTP cache sharing responses through a real Redis: an L2 hit on
//! another instance (its origin not called), tag invalidation fan-out,
//! per-user responses never shared, `Vary` respected on both tiers, ages
//! carried over, garbled values a miss.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_scale::cache::redis::{RedisTier, builder};
use tower_scale::http::{HttpCache, HttpCacheLayer, StoredVariants};
use tower_scale::testing::LocalRedis;

use super::until;

type Origin = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

/// The headers every origin answers with, per path; each instance has its
/// own origin counting its own calls.
type Routes = Arc<Mutex<HashMap<String, Vec<(&'static str, &'static str)>>>>;

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, usize>>>);

impl Calls {
    fn of(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

fn origin(name: &'static str, routes: Routes, calls: Calls) -> Origin {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let (routes, calls) = (routes.clone(), calls.clone());
        async move {
            let path = req.uri().path().to_string();
            let n = {
                let mut calls = calls.0.lock().unwrap();
                let n = calls.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            let who = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("anon")
                .to_string();
            let lang = req
                .headers()
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let mut res = Response::new(Full::new(Bytes::from(format!(
                "{path} from {name} #{n} for {who} in {lang}"
            ))));
            let headers = routes.lock().unwrap().get(&path).cloned();
            for (k, v) in headers.unwrap_or_default() {
                res.headers_mut()
                    .append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            Ok::<_, Infallible>(res)
        }
    }))
}

struct Instance {
    layer: HttpCacheLayer,
    svc: HttpCache<Origin>,
    tier: Arc<RedisTier<String, StoredVariants>>,
    calls: Calls,
}

async fn instance(
    redis: &LocalRedis,
    prefix: &str,
    name: &'static str,
    routes: &Routes,
) -> Instance {
    instance_with(redis, prefix, name, routes, |b| b).await
}

async fn instance_with(
    redis: &LocalRedis,
    prefix: &str,
    name: &'static str,
    routes: &Routes,
    configure: impl FnOnce(
        tower_scale::http::HttpCacheLayerBuilder,
    ) -> tower_scale::http::HttpCacheLayerBuilder,
) -> Instance {
    let layer = configure(HttpCacheLayer::builder()).build().unwrap();
    let tier = builder(redis.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .attach(&layer, layer.redis_codec())
        .await
        .unwrap();
    let calls = Calls::default();
    let svc = tower::Layer::layer(&layer, origin(name, routes.clone(), calls.clone()));
    let instance = Instance {
        layer,
        svc,
        tier,
        calls,
    };
    let tier = instance.tier.clone();
    until("heard its heartbeat", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    instance
}

async fn call(
    i: &Instance,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::get(path).header("host", "a.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = i
        .svc
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

fn routes(list: &[(&str, Vec<(&'static str, &'static str)>)]) -> Routes {
    Arc::new(Mutex::new(
        list.iter()
            .map(|(p, h)| (p.to_string(), h.clone()))
            .collect(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stored_on_a_is_an_l2_hit_on_b_until_a_tag_invalidation_on_a() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[(
        "/users/1",
        vec![
            ("cache-control", "max-age=600"),
            ("surrogate-key", "user:1 users"),
            ("age", "30"),
        ],
    )]);
    let a = instance(&redis, "http-share", "A", &routes).await;
    let b = instance(&redis, "http-share", "B", &routes).await;
    let (_, headers, body) = call(&a, "/users/1", &[]).await;
    assert_eq!(body, "/users/1 from A #1 for anon in -");
    assert!(!headers.contains_key("surrogate-key"));
    let (status, headers, body) = call(&b, "/users/1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "/users/1 from A #1 for anon in -", "A's response");
    assert_eq!(b.calls.total(), 0, "B's origin not called");
    assert!(!headers.contains_key("surrogate-key"));
    let age: u64 = headers["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 30, "the age carries over from A (got {age})");
    assert_eq!(b.layer.stats().remote_hits, 1);
    call(&b, "/users/1", &[]).await;
    assert_eq!(b.layer.stats().hits, 1, "then an L1 hit on B");

    let before = b.layer.stats().invalidations;
    a.layer.invalidator().invalidate_tag("user:1");
    assert!(
        a.tier.flush(Duration::from_secs(5)).await,
        "delivered to Redis"
    );
    until("B applied it", Duration::from_secs(10), || {
        b.layer.stats().invalidations > before
    })
    .await;
    let (_, _, body) = call(&b, "/users/1", &[]).await;
    assert_eq!(
        body, "/users/1 from B #1 for anon in -",
        "B calls its origin"
    );
    assert_eq!(b.calls.of("/users/1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_responses_never_reach_another_instance() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[
        // For a request with `Authorization`: not shareable without `public`.
        ("/auth", vec![("cache-control", "max-age=600")]),
        ("/private", vec![("cache-control", "private, max-age=600")]),
        (
            "/cookie",
            vec![
                ("cache-control", "max-age=600"),
                ("set-cookie", "session=alice"),
            ],
        ),
        (
            "/tagged-private",
            vec![
                ("cache-control", "private, max-age=600"),
                ("surrogate-key", "user:alice"),
            ],
        ),
    ]);
    let a = instance(&redis, "http-private", "A", &routes).await;
    let b = instance(&redis, "http-private", "B", &routes).await;
    let paths = ["/auth", "/private", "/cookie", "/tagged-private"];
    for path in paths {
        let (_, _, body) = call(&a, path, &[("authorization", "Bearer alice")]).await;
        assert!(body.contains("for Bearer alice"));
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("http-private:e:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "nothing of alice's in Redis: {keys:?}");
    for path in paths {
        for who in [&[][..], &[("authorization", "Bearer bob")][..]] {
            let (_, _, body) = call(&b, path, who).await;
            assert!(!body.contains("alice"), "{path}: {body}");
            assert!(body.contains("from B"), "{path}: {body}");
        }
    }
    assert_eq!(b.layer.stats().remote_hits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_is_respected_on_both_tiers() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[(
        "/v",
        vec![
            ("cache-control", "max-age=600"),
            ("vary", "accept-language"),
        ],
    )]);
    let a = instance(&redis, "http-vary", "A", &routes).await;
    let b = instance(&redis, "http-vary", "B", &routes).await;
    let (_, _, body) = call(&a, "/v", &[("accept-language", "fr")]).await;
    assert_eq!(body, "/v from A #1 for anon in fr");
    let (_, _, body) = call(&b, "/v", &[("accept-language", "en")]).await;
    assert_eq!(
        body, "/v from B #1 for anon in en",
        "A's variant is not B's"
    );
    let (_, _, body) = call(&b, "/v", &[("accept-language", "fr")]).await;
    assert_eq!(
        body, "/v from A #1 for anon in fr",
        "A's variant, kept by B"
    );
    let (_, _, body) = call(&b, "/v", &[]).await;
    assert_eq!(body, "/v from B #2 for anon in -");
    assert_eq!(b.calls.of("/v"), 2);
    // A fill writes only the variant it fetched, never the others its
    // instance holds (they were read before its lease, and an invalidation
    // it has not heard of yet may have removed them everywhere else): the
    // tier holds the last variant filled, B's "-". A third instance gets
    // that one from Redis and fills the others itself, each in its own
    // language.
    let c = instance(&redis, "http-vary", "C", &routes).await;
    for (lang, from) in [(Some("fr"), "C #1"), (Some("en"), "C #2"), (None, "B #2")] {
        let headers: Vec<(&str, &str)> = lang.map(|l| ("accept-language", l)).into_iter().collect();
        let (_, _, body) = call(&c, "/v", &headers).await;
        assert!(body.contains(from), "{lang:?}: {body}");
        assert!(
            body.ends_with(&format!("in {}", lang.unwrap_or("-"))),
            "{body}"
        );
    }
    assert_eq!(c.calls.of("/v"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_value_is_a_miss_and_an_invalidated_one_is_never_served() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[(
        "/g",
        vec![("cache-control", "max-age=600"), ("surrogate-key", "g")],
    )]);
    let a = instance(&redis, "http-garble", "A", &routes).await;
    call(&a, "/g", &[]).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("http-garble:e:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    let value: Vec<u8> = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Cut short: the codec's part (at the end of the frame) no longer parses.
    let _: () = redis::cmd("HSET")
        .arg(&keys[0])
        .arg("v")
        .arg(&value[..value.len() - 1])
        .query_async(&mut conn)
        .await
        .unwrap();
    let b = instance(&redis, "http-garble", "B", &routes).await;
    let (_, _, body) = call(&b, "/g", &[]).await;
    assert_eq!(body, "/g from B #1 for anon in -", "a miss, filled by B");
    assert_eq!(b.layer.stats().remote_hits, 0);

    // An invalidation on B, then at once a request on B: whether or not it
    // has reached Redis yet, B's old response is not served.
    let a_stats = a.layer.stats().invalidations;
    b.layer.invalidator().invalidate_tag("g");
    let (_, _, body) = call(&b, "/g", &[]).await;
    assert_eq!(body, "/g from B #2 for anon in -");
    // Nor does A (which still holds A #1 in L1) serve its own after the
    // fan-out, nor another instance get B #1 from Redis.
    assert!(b.tier.flush(Duration::from_secs(5)).await);
    until("A applied it", Duration::from_secs(10), || {
        a.layer.stats().invalidations > a_stats
    })
    .await;
    let (_, _, body) = call(&a, "/g", &[]).await;
    assert!(!body.contains("#1"), "{body}");
}

/// A response that varies on credentials is cached per credential on the
/// instance that fetched it, but never written to Redis: its `Vary` values
/// (the session cookie) would be stored there in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_varying_on_credentials_stays_off_the_shared_tier() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[(
        "/s",
        vec![("cache-control", "public, max-age=600"), ("vary", "cookie")],
    )]);
    let a = instance(&redis, "http-secret", "A", &routes).await;
    let b = instance(&redis, "http-secret", "B", &routes).await;
    call(&a, "/s", &[("cookie", "session=alice")]).await;
    let (_, _, again) = call(&a, "/s", &[("cookie", "session=alice")]).await;
    assert!(again.contains("from A #1"), "a local hit: {again}");
    let (_, _, body) = call(&b, "/s", &[("cookie", "session=alice")]).await;
    assert!(body.contains("from B #1"), "not from Redis: {body}");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("http-secret:e:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_answered_from_the_shared_tier() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[("/file", vec![("cache-control", "max-age=600")])]);
    let a = instance(&redis, "http-range", "A", &routes).await;
    let b = instance(&redis, "http-range", "B", &routes).await;
    let (_, _, body) = call(&a, "/file", &[]).await;
    assert_eq!(body, "/file from A #1 for anon in -");
    let (status, headers, body) = call(&b, "/file", &[("range", "bytes=6-9")]).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, "from", "a slice of A's response");
    assert_eq!(headers["content-range"], "bytes 6-9/29");
    let cache_status = headers["cache-status"].to_str().unwrap();
    assert!(cache_status.contains("detail=l2"), "{cache_status}");
    assert_eq!(b.calls.total(), 0, "B's origin not called");
    let (status, headers, _) = call(&b, "/file", &[("range", "bytes=29-")]).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "then an L1 hit");
    assert_eq!(headers["content-range"], "bytes */29");
    assert_eq!(b.calls.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_key_with_parts_is_invalidated_by_its_url_on_every_tier() {
    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[("/p", vec![("cache-control", "max-age=600")])]);
    let device = |b: tower_scale::http::HttpCacheLayerBuilder| {
        b.cache_key(|_req, key| {
            key.push("device", "desktop");
            true
        })
    };
    let a = instance_with(&redis, "http-ck", "A", &routes, device).await;
    let b = instance_with(&redis, "http-ck", "B", &routes, device).await;
    let (_, _, body) = call(&a, "/p", &[]).await;
    assert_eq!(body, "/p from A #1 for anon in -");
    let (_, _, body) = call(&b, "/p", &[]).await;
    assert_eq!(body, "/p from A #1 for anon in -", "an L2 hit on B");
    assert_eq!(b.calls.total(), 0);
    let before = b.layer.stats().invalidations;
    a.layer.invalidate("http://a.test/p");
    assert!(a.tier.flush(Duration::from_secs(5)).await);
    // Two invalidations travel: the URL's key and its tag (which reaches
    // the keys with parts); wait for both.
    until("B applied both", Duration::from_secs(10), || {
        b.layer.stats().invalidations >= before + 2
    })
    .await;
    let (_, _, body) = call(&b, "/p", &[]).await;
    assert_eq!(body, "/p from B #1 for anon in -", "not B's L1, not L2");
    // A new instance reads nothing old from the tier either.
    let c = instance_with(&redis, "http-ck", "C", &routes, device).await;
    let (_, _, body) = call(&c, "/p", &[]).await;
    assert!(
        !body.contains("from A"),
        "the invalidated value came back from Redis: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_by_tag_on_a_makes_b_miss() {
    use tower_scale::http::Purge;

    let redis = LocalRedis::start().unwrap();
    let routes = routes(&[
        (
            "/users/1",
            vec![
                ("cache-control", "max-age=600"),
                ("surrogate-key", "user:1 users"),
            ],
        ),
        (
            "/users/2",
            vec![
                ("cache-control", "max-age=600"),
                ("surrogate-key", "user:2 users"),
            ],
        ),
    ]);
    let a = instance(&redis, "http-purge", "A", &routes).await;
    let b = instance(&redis, "http-purge", "B", &routes).await;
    for path in ["/users/1", "/users/2"] {
        call(&a, path, &[]).await;
        call(&b, path, &[]).await;
        call(&b, path, &[]).await;
    }
    assert_eq!(b.calls.total(), 0, "B filled from the shared tier");
    assert_eq!(b.layer.stats().hits, 2, "then L1 hits on B");

    let before = b.layer.stats().invalidations;
    let started = std::time::Instant::now();
    let purged = a.layer.purge(&Purge::Tags(vec!["user:1".into()]));
    let returned = started.elapsed();
    assert_eq!(purged, 1, "A's entry for /users/1");
    let applied = until("B applied the purge", Duration::from_secs(10), || {
        b.layer.stats().invalidations > before
    })
    .await;
    let applied = returned + applied;
    println!("purge on A: returned after {returned:?}, applied on B after {applied:?}");
    let (a_stats, b_stats) = (a.layer.stats(), b.layer.stats());
    assert_eq!((a_stats.purges, b_stats.purges), (1, 0), "taken on A only");
    assert_eq!(
        a_stats.remote_invalidations, 0,
        "A's own purge is not remote"
    );
    assert_eq!(b_stats.remote_invalidations, 1, "one tag fanned in to B");
    let (_, _, body) = call(&b, "/users/1", &[]).await;
    assert_eq!(body, "/users/1 from B #1 for anon in -", "B misses");
    assert_eq!(b.calls.of("/users/1"), 1);
    let (_, _, body) = call(&b, "/users/2", &[]).await;
    assert_eq!(body, "/users/2 from A #1 for anon in -", "the other stays");
    assert_eq!(b.calls.of("/users/2"), 0);
    let (_, _, body) = call(&a, "/users/1", &[]).await;
    assert_eq!(
        body, "/users/1 from B #1 for anon in -",
        "A's purged response is gone: A gets B's refill from the tier"
    );
    assert_eq!(a.calls.of("/users/1"), 1);
}

/// A `304` merged into a stale body is stored here but never written to
/// Redis: the body was read before the fill's lease, so an invalidation
/// from another instance that this one has not heard yet could have
/// removed it everywhere, and the put would bring it back for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_merge_is_not_written_to_redis() {
    let redis = LocalRedis::start().unwrap();
    let layer = HttpCacheLayer::builder().build().unwrap();
    let tier = builder(redis.url())
        .prefix("http-merge")
        .timeout(Duration::from_millis(500))
        .attach(&layer, layer.redis_codec())
        .await
        .unwrap();
    until("heard its heartbeat", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    let origin: Origin =
        BoxCloneSyncService::new(tower::service_fn(|req: Request<Full<Bytes>>| async move {
            let res = Response::builder()
                .header("cache-control", "max-age=60")
                .header("etag", "\"v1\"");
            let res = if req.headers().contains_key("if-none-match") {
                res.status(StatusCode::NOT_MODIFIED)
                    .body(Full::new(Bytes::new()))
            } else {
                res.body(Full::new(Bytes::from_static(b"v1")))
            };
            Ok::<_, Infallible>(res.unwrap())
        }));
    let svc = tower::Layer::layer(&layer, origin);
    let get = |headers: &'static [(&'static str, &'static str)]| {
        let svc = svc.clone();
        async move {
            let mut req = Request::get("/m").header("host", "a.test");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let res = svc
                .oneshot(req.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        }
    };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut entries = async || -> Vec<String> {
        redis::cmd("KEYS")
            .arg("http-merge:e:*")
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(get(&[]).await, "v1");
    let stored = entries().await;
    assert_eq!(stored.len(), 1, "the 200 is shared");
    let _: () = redis::cmd("DEL")
        .arg(&stored[0])
        .query_async(&mut client.get_multiplexed_async_connection().await.unwrap())
        .await
        .unwrap();
    // Revalidated (`no-cache`): the origin answers 304, the merge is kept
    // here (the put, if any, is done before the response is).
    assert_eq!(get(&[("cache-control", "no-cache")]).await, "v1");
    assert_eq!(layer.stats().refreshes, 1, "a 304 merge");
    assert!(entries().await.is_empty(), "the merge reached Redis");
}
