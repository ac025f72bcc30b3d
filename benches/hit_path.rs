//! The tuned core: a cache hit through the layer against a bare concurrent
//! map read, in one run.
//!
//! ```text
//! cargo bench --features full --bench hit_path
//! ```
//!
//! 10,000 keys with 256-byte values, one thread (`hit_path`); the same hits
//! from two threads (`hit_path_2_threads`, wall time per lookup); and 1,000
//! concurrent requests on a cold key (`miss/coalesced_1000`).
//! `layer_quick_hit_hot_keys` is `layer_quick_hit` with hot keys tracked
//! (`track_hot_keys(64)`, one read in 32 sampled).

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dashmap::DashMap;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_scale::cache::CacheLayer;

const KEYS: u64 = 10_000;
const VALUE_BYTES: usize = 256;

fn values() -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..KEYS)
            .map(|k| Bytes::from(vec![(k % 251) as u8; VALUE_BYTES]))
            .collect(),
    )
}

/// The inner service: answers from a prebuilt table, immediately.
fn origin(
    values: Arc<Vec<Bytes>>,
) -> impl Service<
    u64,
    Response = Bytes,
    Error = Infallible,
    Future = std::future::Ready<Result<Bytes, Infallible>>,
> + Clone
+ Send
+ 'static {
    service_fn(move |k: u64| std::future::ready(Ok(values[k as usize].clone())))
}

/// Polls a future that must be ready at once (a hit, or the bare origin).
#[inline]
fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a hit must be ready at once"),
    }
}

fn hit_path(c: &mut Criterion) {
    let values = values();
    let mut group = c.benchmark_group("hit_path");
    group.throughput(Throughput::Elements(1));

    let map: DashMap<u64, Bytes> = (0..KEYS).map(|k| (k, values[k as usize].clone())).collect();
    let mut i = 0u64;
    group.bench_function("raw_hashmap_get", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(map.get(&black_box(i)).map(|v| v.clone()))
        })
    });

    let moka: moka::sync::Cache<u64, Bytes> = moka::sync::Cache::new(2 * KEYS);
    for k in 0..KEYS {
        moka.insert(k, values[k as usize].clone());
    }
    group.bench_function("raw_moka_get", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(moka.get(&black_box(i)))
        })
    });

    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(2 * KEYS)
        .build()
        .expect("config");
    let mut svc = layer.layer(origin(values.clone()));
    for k in 0..KEYS {
        now(svc.call(k)).expect("fill");
    }
    group.bench_function("layer_moka_hit", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(now(svc.call(black_box(i))))
        })
    });
    assert_eq!(svc.stats().misses, KEYS, "every benchmarked call was a hit");

    let quick: quick_cache::sync::Cache<u64, Bytes> =
        quick_cache::sync::Cache::new(2 * KEYS as usize);
    for k in 0..KEYS {
        quick.insert(k, values[k as usize].clone());
    }
    group.bench_function("raw_quick_get", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(quick.get(&black_box(i)))
        })
    });

    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(2 * KEYS)
        .build_quick()
        .expect("config");
    let mut quick_svc = layer.layer(origin(values.clone()));
    for k in 0..KEYS {
        now(quick_svc.call(k)).expect("fill");
    }
    group.bench_function("layer_quick_hit", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(now(quick_svc.call(black_box(i))))
        })
    });
    assert_eq!(
        quick_svc.stats().misses,
        KEYS,
        "every benchmarked call was a hit"
    );

    // The same with hot keys tracked (the default sampling, one read in 32):
    // what tracking costs a hit.
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(2 * KEYS)
        .track_hot_keys(64)
        .build_quick()
        .expect("config");
    let mut hot_svc = layer.layer(origin(values.clone()));
    for k in 0..KEYS {
        now(hot_svc.call(k)).expect("fill");
    }
    group.bench_function("layer_quick_hit_hot_keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(now(hot_svc.call(black_box(i))))
        })
    });
    assert!(!layer.hot_keys(1).is_empty(), "hot keys were sampled");

    let mut inner = origin(values.clone());
    group.bench_function("direct_inner_call", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(now(inner.call(black_box(i))))
        })
    });
    group.finish();
}

/// The same hits from two threads at once: wall time per lookup.
fn hit_path_2_threads(c: &mut Criterion) {
    let values = values();
    let mut group = c.benchmark_group("hit_path_2_threads");
    group.throughput(Throughput::Elements(1));

    /// Each thread makes its own lookup closure (its own service clone)
    /// once, outside the timed loop.
    fn two_threads<L: FnMut(u64)>(iters: u64, make: impl Fn() -> L + Sync) -> Duration {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let make = &make;
                s.spawn(move || {
                    let mut lookup = make();
                    let mut k = t * (KEYS / 2);
                    for _ in 0..iters / 2 {
                        k = (k + 1) % KEYS;
                        lookup(k);
                    }
                });
            }
        });
        start.elapsed()
    }

    let map: DashMap<u64, Bytes> = (0..KEYS).map(|k| (k, values[k as usize].clone())).collect();
    group.bench_function("raw_hashmap_get", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                |k| {
                    black_box(map.get(&k).map(|v| v.clone()));
                }
            })
        })
    });
    let moka: moka::sync::Cache<u64, Bytes> = moka::sync::Cache::new(2 * KEYS);
    for k in 0..KEYS {
        moka.insert(k, values[k as usize].clone());
    }
    group.bench_function("raw_moka_get", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                |k| {
                    black_box(moka.get(&k));
                }
            })
        })
    });
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(2 * KEYS)
        .build()
        .expect("config");
    let svc = layer.layer(origin(values.clone()));
    for k in 0..KEYS {
        now(svc.clone().call(k)).expect("fill");
    }
    group.bench_function("layer_moka_hit", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move |k| {
                    black_box(now(svc.call(k)).ok());
                }
            })
        })
    });
    let quick: quick_cache::sync::Cache<u64, Bytes> =
        quick_cache::sync::Cache::new(2 * KEYS as usize);
    for k in 0..KEYS {
        quick.insert(k, values[k as usize].clone());
    }
    group.bench_function("raw_quick_get", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                |k| {
                    black_box(quick.get(&k));
                }
            })
        })
    });
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(2 * KEYS)
        .build_quick()
        .expect("config");
    let svc = layer.layer(origin(values.clone()));
    for k in 0..KEYS {
        now(svc.clone().call(k)).expect("fill");
    }
    group.bench_function("layer_quick_hit", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move |k| {
                    black_box(now(svc.call(k)).ok());
                }
            })
        })
    });
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(2 * KEYS)
        .track_hot_keys(64)
        .build_quick()
        .expect("config");
    let hot_svc = layer.layer(origin(values.clone()));
    for k in 0..KEYS {
        now(hot_svc.clone().call(k)).expect("fill");
    }
    group.bench_function("layer_quick_hit_hot_keys", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = hot_svc.clone();
                move |k| {
                    black_box(now(svc.call(k)).ok());
                }
            })
        })
    });
    group.finish();
}

/// 1,000 concurrent requests on a cold key: one inner call, 999 waiters.
fn miss(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let value = Bytes::from(vec![7u8; VALUE_BYTES]);
    let mut group = c.benchmark_group("miss");
    group.throughput(Throughput::Elements(1000));
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .time_to_live(Duration::from_secs(3600))
        .max_entries(1_000_000)
        .build()
        .expect("config");
    // The origin yields once, so the other 999 requests join while it runs.
    let svc = layer.layer(service_fn(move |_k: u64| {
        let value = value.clone();
        async move {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(value)
        }
    }));
    let mut key = 0u64;
    group.bench_function("coalesced_1000", |b| {
        b.to_async(&rt).iter(|| {
            key += 1;
            let futures: Vec<_> = (0..1000).map(|_| svc.clone().oneshot(key)).collect();
            async move {
                for r in futures::future::join_all(futures).await {
                    black_box(r.ok());
                }
            }
        })
    });
    let stats = svc.stats();
    assert_eq!(stats.stored, key, "one inner call per cold key");
    group.finish();
}

criterion_group!(benches, hit_path, hit_path_2_threads, miss);
criterion_main!(benches);
