//! The gRPC cache sharing responses through a real Redis: an L2 hit on
//! another instance (its server not called), invalidation by method on one
//! instance reaching the other, key metadata respected across instances,
//! and values that are corrupt, not storable, or stored under another
//! call's key never served; a frame stripped of its method's tag not kept
//! where an invalidation of the method would miss it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_scale::cache::redis::{RedisTier, builder};
use tower_scale::grpc::{Fetched, GrpcBody, GrpcCache, GrpcCacheLayer, GrpcKey};
use tower_scale::testing::LocalRedis;

use super::until;

const GET: &str = "/users.v1.Users/GetUser";
const LIST: &str = "/users.v1.Users/ListUsers";

type Frames =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Server =
    BoxCloneSyncService<http::Request<GrpcBody<Full<Bytes>>>, http::Response<Frames>, Infallible>;

/// One length-prefixed gRPC message.
fn message(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A gRPC server answering `"{name} #{n} {path} {request} {tenant}"`, one
/// message with `grpc-status: 0`, counting its calls.
fn server(name: &'static str, calls: Arc<AtomicUsize>) -> Server {
    BoxCloneSyncService::new(tower::service_fn(
        move |req: http::Request<GrpcBody<Full<Bytes>>>| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let (parts, body) = req.into_parts();
                let request = body.collect().await.unwrap().to_bytes();
                let tenant = parts
                    .headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                let answer = format!(
                    "{name} #{n} {} {} {tenant}",
                    parts.uri.path(),
                    String::from_utf8_lossy(&request[5..])
                );
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let frames = vec![
                    Ok(Frame::data(message(answer.as_bytes()))),
                    Ok(Frame::trailers(trailers)),
                ];
                let mut res = http::Response::new(StreamBody::new(futures::stream::iter(frames)));
                res.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(res)
            }
        },
    ))
}

struct Instance {
    layer: GrpcCacheLayer,
    svc: GrpcCache<Server>,
    tier: Arc<RedisTier<GrpcKey, Fetched>>,
    calls: Arc<AtomicUsize>,
}

impl Instance {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn layer() -> GrpcCacheLayer {
    GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(600))
        .method(LIST, Duration::from_secs(600))
        .key_metadata("x-tenant")
        .build()
        .unwrap()
}

async fn instance(redis: &LocalRedis, prefix: &str, name: &'static str) -> Instance {
    let layer = layer();
    let tier = builder(redis.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .attach(&layer, layer.redis_codec())
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = tower::Layer::layer(&layer, server(name, calls.clone()));
    let watched = tier.clone();
    until("heard its heartbeat", Duration::from_secs(10), || {
        watched.stats().heartbeats > 0
    })
    .await;
    Instance {
        layer,
        svc,
        tier,
        calls,
    }
}

/// A unary call; the answer's message payload as text.
async fn call(i: &Instance, path: &str, request: &str, tenant: Option<&str>) -> String {
    let mut req = http::Request::post(path).header("content-type", "application/grpc");
    if let Some(t) = tenant {
        req = req.header("x-tenant", t);
    }
    let req = req.body(Full::new(message(request.as_bytes()))).unwrap();
    let res = i.svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    let body = res.into_body().collect().await.unwrap();
    let trailers = body.trailers().cloned().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    let bytes = body.to_bytes();
    String::from_utf8(bytes[5..].to_vec()).unwrap()
}

async fn redis_conn(redis: &LocalRedis) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

async fn entry_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}:e:*"))
        .query_async(conn)
        .await
        .unwrap()
}

async fn value(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<u8> {
    redis::cmd("HGET")
        .arg(key)
        .arg("v")
        .query_async(conn)
        .await
        .unwrap()
}

async fn set_value(conn: &mut redis::aio::MultiplexedConnection, key: &str, v: &[u8]) {
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg("v")
        .arg(v)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stored_on_a_is_an_l2_hit_on_b_until_a_invalidates_the_method() {
    let redis = LocalRedis::start().unwrap();
    let a = instance(&redis, "grpc-share", "A").await;
    let b = instance(&redis, "grpc-share", "B").await;
    assert_eq!(
        call(&a, GET, "id=1", Some("acme")).await,
        "A #1 /users.v1.Users/GetUser id=1 acme"
    );
    assert_eq!(
        call(&b, GET, "id=1", Some("acme")).await,
        "A #1 /users.v1.Users/GetUser id=1 acme",
        "A's response"
    );
    assert_eq!(b.calls(), 0, "B's server not called");
    assert_eq!(b.layer.stats().remote_hits, 1);
    call(&b, GET, "id=1", Some("acme")).await;
    assert_eq!(b.layer.stats().hits, 1, "then an L1 hit on B");
    // The key's metadata, message and method count on the shared tier too.
    assert_eq!(
        call(&b, GET, "id=1", Some("other")).await,
        "B #1 /users.v1.Users/GetUser id=1 other"
    );
    assert_eq!(
        call(&b, GET, "id=2", Some("acme")).await,
        "B #2 /users.v1.Users/GetUser id=2 acme"
    );
    assert_eq!(
        call(&b, LIST, "id=1", Some("acme")).await,
        "B #3 /users.v1.Users/ListUsers id=1 acme"
    );
    assert_eq!(b.layer.stats().remote_hits, 1);

    let before = b.layer.stats().invalidations;
    a.layer.invalidator().invalidate_tag(GET);
    assert!(
        a.tier.flush(Duration::from_secs(5)).await,
        "delivered to Redis"
    );
    until("B applied it", Duration::from_secs(10), || {
        b.layer.stats().invalidations > before
    })
    .await;
    assert_eq!(
        call(&b, GET, "id=1", Some("acme")).await,
        "B #4 /users.v1.Users/GetUser id=1 acme",
        "B calls its server again"
    );
    // The other method's entry is untouched, on B and in Redis.
    assert_eq!(
        call(&b, LIST, "id=1", Some("acme")).await,
        "B #3 /users.v1.Users/ListUsers id=1 acme"
    );
    assert_eq!(
        call(&a, LIST, "id=1", Some("acme")).await,
        "B #3 /users.v1.Users/ListUsers id=1 acme"
    );
    assert_eq!(a.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_not_storable_values_in_redis_are_misses() {
    let redis = LocalRedis::start().unwrap();
    let mut conn = redis_conn(&redis).await;
    let a = instance(&redis, "grpc-garble", "A").await;
    call(&a, GET, "id=1", None).await;
    call(&a, GET, "id=2", None).await;
    call(&a, GET, "id=3", None).await;
    let keys = entry_keys(&mut conn, "grpc-garble").await;
    assert_eq!(keys.len(), 3);
    // Each value by the call it answers (KEYS comes in any order).
    let mut values = Vec::new();
    for id in 1..=3 {
        let answer = format!("A #{id} /users.v1.Users/GetUser id={id} -");
        let mut found = None;
        for key in &keys {
            let v = value(&mut conn, key).await;
            if let Some(at) = v.windows(answer.len()).position(|w| w == answer.as_bytes()) {
                found = Some((key.clone(), v, at));
            }
        }
        values.push(found.unwrap());
    }
    // The codec's bytes end the frame; the last one is the `0` of the
    // trailers' `grpc-status`.
    assert!(values.iter().all(|(_, v, _)| v.last() == Some(&b'0')));
    // Cut short; a gRPC error status; a byte flipped in the length prefix
    // of the stored message.
    let (key, v, _) = &values[0];
    set_value(&mut conn, key, &v[..v.len() - 1]).await;
    let (key, v, _) = &values[1];
    let mut error = v.clone();
    *error.last_mut().unwrap() = b'2';
    set_value(&mut conn, key, &error).await;
    let (key, v, at) = &values[2];
    let mut flipped = v.clone();
    flipped[at - 1] ^= 0x40;
    set_value(&mut conn, key, &flipped).await;

    let b = instance(&redis, "grpc-garble", "B").await;
    for (n, id) in [(1, "id=1"), (2, "id=2"), (3, "id=3")] {
        assert_eq!(
            call(&b, GET, id, None).await,
            format!("B #{n} /users.v1.Users/GetUser {id} -"),
            "a miss, filled by B"
        );
    }
    assert_eq!(b.layer.stats().remote_hits, 0);
    assert_eq!(b.tier.stats().hits, 0);
    // B's fills replaced them: a third instance gets B's.
    let c = instance(&redis, "grpc-garble", "C").await;
    assert_eq!(
        call(&c, GET, "id=2", None).await,
        "B #2 /users.v1.Users/GetUser id=2 -"
    );
    assert_eq!(c.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_stored_under_another_calls_key_is_never_served() {
    let redis = LocalRedis::start().unwrap();
    let mut conn = redis_conn(&redis).await;
    let a = instance(&redis, "grpc-swap", "A").await;
    call(&a, GET, "id=1", Some("acme")).await;
    let get_key = entry_keys(&mut conn, "grpc-swap").await.pop().unwrap();
    call(&a, LIST, "id=1", Some("acme")).await;
    call(&a, GET, "id=1", Some("other")).await;
    let keys = entry_keys(&mut conn, "grpc-swap").await;
    assert_eq!(keys.len(), 3);
    // Another method's value, and another tenant's, under GetUser/acme's
    // key: each decodes (a well-formed response of a method this cache
    // caches) but is not the answer to this key's call.
    // The genuine entry whole (its value and its metadata), to restore.
    let genuine: Vec<u8> = redis::cmd("DUMP")
        .arg(&get_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut refusers = Vec::new();
    for (other, name) in keys.iter().filter(|k| **k != get_key).zip(["B", "C"]) {
        let stolen = value(&mut conn, other).await;
        set_value(&mut conn, &get_key, &stolen).await;
        let b = instance(&redis, "grpc-swap", name).await;
        assert_eq!(
            call(&b, GET, "id=1", Some("acme")).await,
            format!("{name} #1 /users.v1.Users/GetUser id=1 acme"),
            "never another call's answer"
        );
        // (Asked again at once, the tier may give it once more: the cache
        // fences it while its own invalidation of the key is on the way.)
        assert!(
            b.tier.stats().hits >= 1,
            "Redis gave the value; it was refused"
        );
        assert!(b.layer.stats().invalidations >= 1, "and dropped");
        // Served from B's own fill from now on.
        call(&b, GET, "id=1", Some("acme")).await;
        assert_eq!(b.calls(), 1);
        refusers.push(b);
    }
    // Their invalidations of the key reach Redis in the background: once
    // they have (a late one deleted what was restored next, in CI), the
    // genuine entry goes back whole.
    for r in &refusers {
        assert!(r.tier.flush(Duration::from_secs(10)).await, "delivered");
    }
    let _: () = redis::cmd("RESTORE")
        .arg(&get_key)
        .arg(0)
        .arg(&genuine)
        .arg("REPLACE")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The genuine value is still served across instances.
    let d = instance(&redis, "grpc-swap", "D").await;
    assert_eq!(
        call(&d, GET, "id=1", Some("acme")).await,
        "A #1 /users.v1.Users/GetUser id=1 acme"
    );
    assert_eq!(d.calls(), 0);
}

/// The tier's frame (format, fresh-until, the two stale windows, version
/// flag and version: 34 bytes, then the tags) with no tags.
fn without_tags(frame: &[u8]) -> Vec<u8> {
    let count = u16::from_be_bytes([frame[34], frame[35]]);
    let mut at = 36;
    for _ in 0..count {
        at += 2 + usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    }
    [&frame[..34], &[0, 0], &frame[at..]].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_without_its_methods_tag_is_not_kept_where_invalidations_miss_it() {
    let redis = LocalRedis::start().unwrap();
    let mut conn = redis_conn(&redis).await;
    let a = instance(&redis, "grpc-untagged", "A").await;
    call(&a, GET, "id=1", None).await;
    let key = entry_keys(&mut conn, "grpc-untagged").await.pop().unwrap();
    let framed = value(&mut conn, &key).await;
    set_value(&mut conn, &key, &without_tags(&framed)).await;
    let b = instance(&redis, "grpc-untagged", "B").await;
    for _ in 0..2 {
        // A well-formed answer for this key: served, from Redis each time.
        assert_eq!(
            call(&b, GET, "id=1", None).await,
            "A #1 /users.v1.Users/GetUser id=1 -"
        );
    }
    assert_eq!(b.calls(), 0);
    assert_eq!(b.layer.stats().hits, 0, "not kept in B's store");
    assert_eq!(b.tier.stats().hits, 2);
    // So invalidating the method on A reaches it: Redis's own record of
    // the tag (not the frame's) drops it there.
    let before = b.layer.stats().invalidations;
    a.layer.invalidator().invalidate_tag(GET);
    assert!(a.tier.flush(Duration::from_secs(5)).await);
    until("B applied it", Duration::from_secs(10), || {
        b.layer.stats().invalidations > before
    })
    .await;
    assert_eq!(
        call(&b, GET, "id=1", None).await,
        "B #1 /users.v1.Users/GetUser id=1 -"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_keyed_by_credentials_does_not_take_a_shared_tier() {
    let redis = LocalRedis::start().unwrap();
    let layer = GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(60))
        .key_metadata("Authorization")
        .build()
        .unwrap();
    let attached = builder(redis.url())
        .prefix("grpc-auth")
        .attach(&layer, layer.redis_codec())
        .await;
    assert!(attached.is_err());
}
