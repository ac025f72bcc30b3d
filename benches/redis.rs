//! The shared tier: an L1 miss served from Redis against the client's own
//! GET, on one LocalRedis.
//!
//! ```text
//! cargo bench --features full --bench redis
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis::AsyncCommands;
use tower::{ServiceBuilder, ServiceExt};
use tower_scale::cache::redis::{RedisCodec, builder};
use tower_scale::cache::{CacheLayer, Entry, Hashed, Store};
use tower_scale::testing::LocalRedis;

struct Codec;

impl RedisCodec<u64, Arc<Vec<u8>>> for Codec {
    fn encode_key(&self, key: &u64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }
    fn decode_key(&self, bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
    fn encode(&self, r: &Arc<Vec<u8>>) -> Vec<u8> {
        r.to_vec()
    }
    fn decode(&self, bytes: &[u8]) -> Option<Arc<Vec<u8>>> {
        Some(Arc::new(bytes.to_vec()))
    }
}

/// An in-process store that keeps nothing: every lookup misses L1 and is
/// answered by Redis.
struct Forget;

impl Store for Forget {
    type Key = u64;
    type Response = Arc<Vec<u8>>;
    type Error = String;
    fn get(&self, _: &Hashed<u64>) -> Option<Arc<Entry<Arc<Vec<u8>>, String>>> {
        None
    }
    fn insert(&self, _: Hashed<u64>, _: Arc<Entry<Arc<Vec<u8>>, String>>) {}
    fn remove(&self, _: &Hashed<u64>) {}
    fn clear(&self) {}
    fn entry_count(&self) -> u64 {
        0
    }
    fn evictions(&self) -> u64 {
        0
    }
}

fn l2(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = LocalRedis::start().expect("redis");
    let value = vec![7u8; 256];
    let (mut conn, svc, tier) = rt.block_on(async {
        let client = redis::Client::open(redis.url()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: () = conn.set("raw:key", value.clone()).await.expect("set");
        let layer = CacheLayer::builder(|k: &u64| Some(*k))
            .time_to_live(Duration::from_secs(3600))
            .build_with_store(Forget)
            .expect("config");
        let tier = builder(redis.url())
            .prefix("bench")
            .attach(&layer, Codec)
            .await
            .expect("attach");
        while tier.stats().heartbeats == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let v = value.clone();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(tower::service_fn(move |_k: u64| {
                let v = v.clone();
                async move { Ok::<_, String>(Arc::new(v)) }
            }));
        svc.clone().oneshot(1).await.expect("fill");
        (conn, svc, tier)
    });
    // Every call below misses L1 (its store keeps nothing) and is answered by Redis.

    let mut group = c.benchmark_group("l2");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_redis_get", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            async move {
                let v: Vec<u8> = conn.get("raw:key").await.expect("get");
                black_box(v)
            }
        })
    });
    group.bench_function("layer_l2_hit", |b| {
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move { black_box(svc.oneshot(1).await.expect("hit")) }
        })
    });
    group.finish();
    let stats = svc.stats();
    eprintln!(
        "layer stats: hits {} remote_hits {} misses {}; tier {:?}",
        stats.hits,
        stats.remote_hits,
        stats.misses,
        tier.stats()
    );
    assert!(
        stats.remote_hits > stats.hits,
        "the layer was served by Redis"
    );
    let _: Option<()> = rt.block_on(async { conn.del("raw:key").await.ok() });
}

criterion_group!(benches, l2);
criterion_main!(benches);
