//! The invalidation guarantees with the shared tier, against a real
//! redis-server, with and without faults:
//!
//! - same instance, exact: a read that starts after `invalidate_*` returned
//!   never sees older data (also from Redis: no resurrection);
//! - across instances, bounded: a read that starts more than
//!   `isolation_ttl` after the invalidation returned on another instance
//!   never sees older data — while Redis runs, is killed, is stalled, or
//!   refuses writes;
//! - invalidations made outside any runtime reach the other instances.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower::{ServiceBuilder, ServiceExt};
use tower_scale::cache::redis::{RedisCodec, RedisTier, builder};
use tower_scale::cache::{CacheLayer, Invalidator};
use tower_scale::testing::{FaultProxy, LocalRedis};

#[path = "../common/history.rs"]
mod history;

use history::{Model, Svc, TagPolicy, Value};

const ISOLATION: Duration = Duration::from_millis(200);

struct ValueCodec;

impl RedisCodec<u64, Value> for ValueCodec {
    fn encode_key(&self, key: &u64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }
    fn decode_key(&self, bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
    fn encode(&self, r: &Value) -> Vec<u8> {
        let mut out = r.0.to_be_bytes().to_vec();
        out.extend_from_slice(&r.1.to_be_bytes());
        out
    }
    fn decode(&self, bytes: &[u8]) -> Option<Value> {
        let k = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let v = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Arc::new((k, v)))
    }
}

async fn model_instance(
    url: &str,
    model: &Arc<Model>,
    prefix: &str,
) -> (Svc, Invalidator<u64>, Arc<RedisTier<u64, Value>>) {
    // Short windows, so entries go stale and background refreshes (and
    // their puts) race the invalidations too.
    let layer = CacheLayer::builder(TagPolicy)
        .time_to_live(Duration::from_millis(300))
        .stale_while_revalidate(Duration::from_millis(300))
        .build()
        .unwrap();
    let tier = builder(url)
        .prefix(prefix)
        .timeout(Duration::from_millis(100))
        .isolation_ttl(ISOLATION)
        .attach(&layer, ValueCodec)
        .await
        .unwrap();
    let invalidator = layer.invalidator();
    (
        ServiceBuilder::new().layer(layer).service(model.origin()),
        invalidator,
        tier,
    )
}

type Instance = (Svc, Invalidator<u64>, Arc<RedisTier<u64, Value>>);

/// Two instances on one Redis (B through `b_url`), once both heard their
/// own heartbeat back.
async fn pair(a_url: &str, b_url: &str, model: &Arc<Model>, prefix: &str) -> (Instance, Instance) {
    let a = model_instance(a_url, model, prefix).await;
    let b = model_instance(b_url, model, prefix).await;
    until(
        "both heard their heartbeats",
        Duration::from_secs(10),
        || a.2.stats().heartbeats > 0 && b.2.stats().heartbeats > 0,
    )
    .await;
    (a, b)
}

async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    Kill,
    Stall,
    RefuseWrites,
    /// Instance B reaches Redis through a proxy that black-holes it.
    PartitionB,
}

/// Two instances on one Redis, writers and readers on both, and `fault`
/// from 0.6 s to 1.8 s of a 2.6 s run; checks both guarantees.
async fn two_instances_under(fault: Fault) {
    let redis = LocalRedis::start().unwrap();
    let model = Model::new(6, 42);
    let prefix = format!("model-{fault:?}");
    let proxy = FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], redis.port())))
        .await
        .unwrap();
    let b_url = match fault {
        Fault::PartitionB => format!("redis://127.0.0.1:{}", proxy.port()),
        _ => redis.url(),
    };
    let (a, b) = pair(&redis.url(), &b_url, &model, &prefix).await;
    let instances = [(a.0.clone(), a.1.clone()), (b.0.clone(), b.1.clone())];
    let injector = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        match fault {
            Fault::None => {}
            Fault::Kill => redis.kill().unwrap(),
            Fault::Stall => redis.pause().unwrap(),
            Fault::RefuseWrites => refuse_writes(&redis.url()).await,
            Fault::PartitionB => proxy.black_hole(),
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        match fault {
            Fault::Kill => redis.start_again().unwrap(),
            Fault::Stall => redis.resume().unwrap(),
            Fault::PartitionB => proxy.restore(),
            _ => {}
        }
    };
    // The cross-instance window counts from when an invalidation reached
    // Redis (the tier's documented guarantee; `flush` waits for it).
    let tiers = [Arc::clone(&a.2), Arc::clone(&b.2)];
    let delivered: history::Delivered = Arc::new(move |i: usize| {
        let tier = Arc::clone(&tiers[i]);
        Box::pin(async move { tier.flush(Duration::from_secs(5)).await })
    });
    let (run, ()) = tokio::join!(
        history::run_delivered(
            &model,
            &instances,
            history::Load {
                seed: 42,
                readers: 6,
                writers: 2,
                reads_each: 100_000,
                writes_each: 100_000,
                max_time: Duration::from_millis(2600),
                write_pause: Duration::from_millis(10),
            },
            Some(delivered),
        ),
        injector
    );
    let verdict = history::check(&run, Some(ISOLATION));
    let (sa, sb) = (a.0.stats(), b.0.stats());
    eprintln!(
        "{fault:?}: {} reads checked ({} against another instance's invalidation), {} invalidations, {} failed; \
         A: hits {} l2 {} fenced {} isolated {}; B: hits {} l2 {} fenced {} isolated {}; tiers {:?} / {:?}",
        verdict.checked,
        verdict.checked_across,
        run.invalidations.len(),
        run.failed,
        sa.hits,
        sa.remote_hits,
        sa.remote_fenced,
        sa.isolated,
        sb.hits,
        sb.remote_hits,
        sb.remote_fenced,
        sb.isolated,
        a.2.stats(),
        b.2.stats(),
    );
    assert_eq!(run.failed, 0, "{fault:?}: no request fails");
    assert!(
        verdict.violations.is_empty(),
        "{fault:?}: {} reads saw data older than an invalidation, e.g. {:?}",
        verdict.violations.len(),
        &verdict.violations[..verdict.violations.len().min(5)]
    );
    assert!(
        verdict.checked_across > 0,
        "reads were checked across instances"
    );
    if let Fault::RefuseWrites = fault {
        assert!(
            a.2.stats().refused_writes + b.2.stats().refused_writes > 0,
            "Redis refused writes"
        );
    }
}

/// `maxmemory 1mb` with `noeviction`, then filled past it: SET and INCR are
/// refused; DEL and PUBLISH still work.
async fn refuse_writes(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query_async(&mut conn)
        .await
        .unwrap();
    let junk = vec![b'x'; 64 * 1024];
    for i in 0..64 {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("junk:{i}"))
            .arg(&junk)
            .query_async(&mut conn)
            .await;
        if r.is_err() {
            break;
        }
    }
    let refused: redis::RedisResult<i64> =
        redis::cmd("INCR").arg("probe").query_async(&mut conn).await;
    assert!(refused.is_err(), "Redis refuses writes now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_the_guarantees() {
    two_instances_under(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_the_guarantees_through_a_redis_kill() {
    two_instances_under(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_the_guarantees_through_a_redis_stall() {
    two_instances_under(Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_the_guarantees_while_one_is_partitioned_from_redis() {
    two_instances_under(Fault::PartitionB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_the_guarantees_while_redis_refuses_writes() {
    two_instances_under(Fault::RefuseWrites).await;
}

/// Guarantee 3: `invalidate_key` then a read on the same instance never
/// brings the old value back from Redis (before, the Redis delete was
/// spawned, and the read's Redis GET usually overtook it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_value_never_comes_back_from_redis() {
    let redis = LocalRedis::start().unwrap();
    let model = Model::new(1, 7);
    let (svc, inv, tier) = model_instance(&redis.url(), &model, "resurrect").await;
    until("heard", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    let mut stale = 0;
    for round in 0..200u64 {
        let before = svc.clone().oneshot(0).await.unwrap().1;
        let version = model_bump(&model);
        if round % 2 == 0 {
            inv.invalidate_key(&0);
        } else {
            inv.invalidate_tag("k:0");
        }
        let after = svc.clone().oneshot(0).await.unwrap().1;
        assert!(after >= before);
        if after < version {
            stale += 1;
        }
    }
    eprintln!(
        "resurrection: {stale} of 200 reads stale; {:?}",
        svc.stats()
    );
    assert_eq!(
        stale, 0,
        "reads after invalidate got the old value back from Redis"
    );
}

fn model_bump(model: &Arc<Model>) -> u64 {
    model.bump(0)
}

/// Guarantee 6: an invalidation made on a thread with no tokio runtime is
/// not dropped: it reaches Redis and the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_from_outside_a_runtime_reaches_the_other_instance() {
    let redis = LocalRedis::start().unwrap();
    let model = Model::new(2, 9);
    let (a, b) = pair(&redis.url(), &redis.url(), &model, "outside").await;
    let first = b.0.clone().oneshot(1).await.unwrap().1;
    assert_eq!(
        b.0.clone().oneshot(1).await.unwrap().1,
        first,
        "an L1 hit on B"
    );
    let version = model.bump(1);
    let inv = a.1.clone();
    std::thread::spawn(move || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        inv.invalidate_key(&1);
    })
    .join()
    .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    until(
        "B applied the invalidation",
        Duration::from_secs(10),
        || {
            received.store(b.2.stats().fanout_received, Ordering::Relaxed);
            b.2.stats().fanout_received > 0
        },
    )
    .await;
    assert_eq!(b.0.clone().oneshot(1).await.unwrap().1, version);
}

/// Guarantee 4 in detail: while Redis refuses writes, a tag invalidation
/// on A still reaches B, B's Redis reads do not return the tag's entries
/// (the refused bump became a delete of the generation), and fills are not
/// stored in Redis; refused writes are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_still_invalidate_everywhere() {
    let redis = LocalRedis::start().unwrap();
    let model = Model::new(4, 11);
    let (a, b) = pair(&redis.url(), &redis.url(), &model, "oom").await;
    // Key 2 in Redis (filled by A) and in B's L1.
    a.0.clone().oneshot(2).await.unwrap();
    let loads = model.loads.load(Ordering::SeqCst);
    let on_b = b.0.clone().oneshot(2).await.unwrap();
    assert_eq!(
        model.loads.load(Ordering::SeqCst),
        loads,
        "B got it from Redis"
    );
    refuse_writes(&redis.url()).await;
    // Out of memory is not read-only: heartbeats (whose write falls back
    // to a DEL) go on, so the L1s stay trusted.
    let beats = a.2.stats().heartbeats;
    until("A's heartbeats go on", Duration::from_secs(10), || {
        a.2.stats().heartbeats >= beats + 2
    })
    .await;
    let version = model.bump(2);
    a.1.invalidate_tag("g:0");
    until("B applied it", Duration::from_secs(10), || {
        b.2.stats().fanout_received > 0
    })
    .await;
    // B misses its L1, Redis does not give the old value back: the origin does.
    let got = b.0.clone().oneshot(2).await.unwrap();
    assert!(got.1 >= version && got.1 > on_b.1, "B saw {got:?}");
    assert!(
        a.2.stats().refused_writes > 0,
        "the refused bump was counted"
    );
    // A fill on A is not stored in Redis: B's next miss goes to the origin.
    let loads = model.loads.load(Ordering::SeqCst);
    a.0.clone().oneshot(3).await.unwrap();
    b.0.clone().oneshot(3).await.unwrap();
    assert_eq!(model.loads.load(Ordering::SeqCst), loads + 2);
    assert!(a.2.stats().heartbeats > 0);
}

/// `shutdown()` stops background work, but what was invalidated is still
/// delivered first (and invalidations made after it too, while the tier's
/// flush lasts): another instance sees them. `flush` waits for delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_are_flushed_before_shutdown_and_on_request() {
    let redis = LocalRedis::start().unwrap();
    let model = Model::new(2, 13);
    let (a, b) = pair(&redis.url(), &redis.url(), &model, "flush").await;
    let first = b.0.clone().oneshot(0).await.unwrap().1;
    let version = model.bump(0);
    a.1.invalidate_key(&0);
    assert!(a.2.flush(Duration::from_secs(5)).await, "delivered");
    until("B applied it", Duration::from_secs(10), || {
        b.2.stats().fanout_received > 0
    })
    .await;
    let got = b.0.clone().oneshot(0).await.unwrap().1;
    assert!(got >= version && got > first);
    // Shut A down, then invalidate on it: still delivered.
    a.0.shutdown();
    let received = b.2.stats().fanout_received;
    let version = model.bump(1);
    a.1.invalidate_key(&1);
    until(
        "B got the invalidation made at shutdown",
        Duration::from_secs(10),
        || b.2.stats().fanout_received > received,
    )
    .await;
    assert!(b.0.clone().oneshot(1).await.unwrap().1 >= version);
}

/// The tier and the cache do not keep each other alive: once every handle
/// is dropped, the tier is freed (its tasks end with the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cache_frees_the_tier() {
    let redis = LocalRedis::start().unwrap();
    let model = Model::new(1, 17);
    let (svc, inv, tier) = model_instance(&redis.url(), &model, "drop").await;
    until("heard", Duration::from_secs(10), || {
        tier.stats().heartbeats > 0
    })
    .await;
    svc.clone().oneshot(0).await.unwrap();
    let weak = Arc::downgrade(&tier);
    drop((svc, inv, tier));
    until("the tier was freed", Duration::from_secs(10), || {
        weak.upgrade().is_none()
    })
    .await;
}
