//! The shared tier against a real redis-server (LocalRedis): one origin
//! call across four instances, invalidation fan-out, Redis killed under
//! load, a dropped subscription, a corrupt value; the invalidation
//! guarantees under faults (`faults.rs`); the HTTP and gRPC caches
//! sharing responses (`http.rs`, `grpc.rs`).

#[cfg(all(feature = "http", feature = "purge"))]
#[path = "../common/mod.rs"]
mod common;
mod faults;
#[cfg(all(feature = "http", feature = "purge"))]
mod fleet;
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "http")]
mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower::{ServiceBuilder, ServiceExt};
use tower_scale::cache::redis::{RedisCodec, RedisTier, builder};
use tower_scale::cache::{Cache, CacheLayer, MokaStore};
use tower_scale::testing::LocalRedis;

type Resp = Arc<String>;

struct Codec;

impl RedisCodec<u64, Resp> for Codec {
    fn encode_key(&self, key: &u64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }
    fn decode_key(&self, bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
    fn encode(&self, r: &Resp) -> Vec<u8> {
        r.as_bytes().to_vec()
    }
    fn decode(&self, bytes: &[u8]) -> Option<Resp> {
        String::from_utf8(bytes.to_vec()).ok().map(Arc::new)
    }
}

type Origin = tower::util::BoxCloneSyncService<u64, Resp, String>;
type Instance = Cache<Origin, fn(&u64) -> Option<u64>, MokaStore<u64, Resp, String>>;

fn key_of(k: &u64) -> Option<u64> {
    Some(*k)
}

/// An origin counting calls (shared by every instance), slow enough that
/// concurrent requests overlap.
fn origin(calls: Arc<AtomicUsize>) -> Origin {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |k: u64| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, String>(Arc::new(format!("{k}#{n}")))
        }
    }))
}

async fn instance(
    redis: &LocalRedis,
    calls: &Arc<AtomicUsize>,
    prefix: &str,
) -> (
    Instance,
    Arc<RedisTier<u64, Resp>>,
    tower_scale::cache::Invalidator<u64>,
) {
    let layer = CacheLayer::builder(key_of as fn(&u64) -> Option<u64>)
        .time_to_live(Duration::from_secs(60))
        .build()
        .unwrap();
    let tier = builder(redis.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .attach(&layer, Codec)
        .await
        .unwrap();
    let inv = layer.invalidator();
    (
        ServiceBuilder::new()
            .layer(layer)
            .service(origin(calls.clone())),
        tier,
        inv,
    )
}

async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_make_one_origin_call_and_see_each_others_invalidations() {
    let redis = LocalRedis::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(instance(&redis, &calls, "four").await);
    }
    until(
        "all heard their heartbeats",
        Duration::from_secs(10),
        || instances.iter().all(|(_, t, _)| t.stats().heartbeats > 0),
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for (svc, _, _) in &instances {
        for _ in 0..100 {
            let svc = svc.clone();
            tasks.spawn(async move { svc.oneshot(7).await });
        }
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap().as_str(), "7#1");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "4 x 100 concurrent requests, one origin call"
    );
    // Everyone has it in L1 now; an invalidation on one reaches the others.
    for (svc, _, _) in &instances {
        svc.clone().oneshot(7).await.unwrap();
    }
    let before: Vec<u64> = instances
        .iter()
        .map(|(s, _, _)| s.stats().invalidations)
        .collect();
    let sent = Instant::now();
    instances[0].2.invalidate_key(&7);
    let took = until("the other three saw it", Duration::from_secs(10), || {
        instances[1..]
            .iter()
            .zip(&before[1..])
            .all(|((s, _, _), b)| s.stats().invalidations > *b)
    })
    .await;
    eprintln!(
        "invalidation fan-out reached 3 instances in {took:?} (target 100 ms); {:?} since sent",
        sent.elapsed()
    );
    for (svc, _, _) in &instances[1..] {
        assert_ne!(
            svc.clone().oneshot(7).await.unwrap().as_str(),
            "7#1",
            "the stale L1 entry is gone"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refilled once after the invalidation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_nothing_and_recovers() {
    let redis = LocalRedis::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (svc, tier, _) = instance(&redis, &calls, "kill").await;
    until("subscribed", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    for k in 0..20 {
        svc.clone().oneshot(k).await.unwrap();
    }
    redis.kill().unwrap();
    let mut failures = 0;
    let started = Instant::now();
    let hits_before = svc.stats().hits;
    while started.elapsed() < Duration::from_secs(4) {
        for k in 0..5 {
            if svc.clone().oneshot(k).await.is_err() {
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 0, "Redis down never fails a request");
    // Without heartbeats the L1 is off after the isolation window (1 s):
    // another instance's invalidation could not reach it.
    let s = svc.stats();
    assert!(s.isolated > 0, "L1 skipped while Redis is down: {s:?}");
    let hits = s.hits;
    assert!(hits >= hits_before);
    for k in 0..5 {
        svc.clone().oneshot(k).await.unwrap();
    }
    assert_eq!(svc.stats().hits, hits, "no L1 hit while isolated");
    until("the circuit opens", Duration::from_secs(10), || {
        tier.stats().circuit_open
    })
    .await;
    let heard_before_restart = tier.stats().heartbeats;
    redis.start_again().unwrap();
    let back = Instant::now();
    let mut k = 1000;
    // Traffic lets the breaker probe Redis again.
    while tier.stats().circuit_open {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the circuit did not close"
        );
        k += 1;
        svc.clone().oneshot(k).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New fills reach Redis again: a second instance gets them from L2.
    let (other, other_tier, _) = instance(&redis, &calls, "kill").await;
    until("rejoined", Duration::from_secs(10), || {
        tier.stats().heartbeats > heard_before_restart && other_tier.stats().heartbeats > 0
    })
    .await;
    k += 1;
    svc.clone().oneshot(k).await.unwrap();
    let before = calls.load(Ordering::SeqCst);
    other.clone().oneshot(k).await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "served from L2 after recovery: {:?} {:?} / {:?} {:?}",
        svc.stats(),
        tier.stats(),
        other.stats(),
        other_tier.stats()
    );
    eprintln!("recovered {:?} after the restart", back.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_distrusts_l1_until_resubscribed() {
    let redis = LocalRedis::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (svc, tier, _) = instance(&redis, &calls, "pubsub").await;
    until("subscribed", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    svc.clone().oneshot(1).await.unwrap();
    svc.clone().oneshot(1).await.unwrap();
    let l1_hits = svc.stats().hits;
    assert!(l1_hits >= 1);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(killed >= 1);
    let heartbeats = tier.stats().heartbeats;
    until(
        "lost, resubscribed and heard again",
        Duration::from_secs(10),
        || {
            let s = tier.stats();
            s.subscribed && s.subscriptions >= 2 && s.heartbeats > heartbeats
        },
    )
    .await;
    // The L1 was emptied before it was trusted again: the next read is not
    // an L1 hit (it goes to the origin: Redis values wait one isolation
    // window after a rejoin).
    let hits_before = svc.stats().hits;
    svc.clone().oneshot(1).await.unwrap();
    assert_eq!(
        svc.stats().hits,
        hits_before,
        "L1 was not trusted across the gap"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_value_is_a_miss() {
    let redis = LocalRedis::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, tier, _) = instance(&redis, &calls, "corrupt").await;
    until("subscribed", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    a.clone().oneshot(5).await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("corrupt:e:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    let _: () = redis::cmd("HSET")
        .arg(&keys[0])
        .arg("v")
        .arg(b"\xff\x00garbage".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    let (b, tier_b, _) = instance(&redis, &calls, "corrupt").await;
    until("subscribed", Duration::from_secs(10), || {
        tier_b.stats().heartbeats > 0
    })
    .await;
    let got = b.clone().oneshot(5).await.unwrap();
    assert_eq!(got.as_str(), "5#2", "a miss, filled from the origin");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_a_fill_keeps_it_out_of_redis() {
    let redis = LocalRedis::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, tier_a, inv_a) = instance(&redis, &calls, "lease").await;
    let (b, tier_b, _) = instance(&redis, &calls, "lease").await;
    until("subscribed", Duration::from_secs(10), || {
        tier_a.stats().heartbeats > 0 && tier_b.stats().heartbeats > 0
    })
    .await;
    // A fills key 3 (the origin takes 50 ms); the data changes meanwhile.
    let fill = tokio::spawn(a.clone().oneshot(3));
    until(
        "A's fill reached the origin",
        Duration::from_secs(10),
        || calls.load(Ordering::SeqCst) == 1,
    )
    .await;
    inv_a.invalidate_key(&3);
    assert_eq!(
        fill.await.unwrap().unwrap().as_str(),
        "3#1",
        "A's caller still gets its answer"
    );
    // The stale fill was not stored: B goes to the origin.
    let got = b.clone().oneshot(3).await.unwrap();
    assert_eq!(got.as_str(), "3#2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_bypassed_quickly() {
    let redis = LocalRedis::start().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (svc, tier, _) = instance(&redis, &calls, "slow").await;
    until("subscribed", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    redis.pause().unwrap();
    let started = Instant::now();
    for k in 0..20 {
        svc.clone()
            .oneshot(k)
            .await
            .expect("a stalled Redis never fails a request");
    }
    let took = started.elapsed();
    eprintln!(
        "20 misses with Redis stalled took {took:?}; circuit open: {}",
        tier.stats().circuit_open
    );
    assert!(
        tier.stats().circuit_open,
        "repeated timeouts open the circuit"
    );
    redis.resume().unwrap();
}
