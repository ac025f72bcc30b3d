//! Hot-key settings on [`CacheLayerBuilder`] and the report on
//! [`CacheLayer`]; the sampler and sketch are in `engine::hot`.
//!
//! # What it costs
//!
//! Nothing on a hit that is not sampled: the sampling decision reuses the
//! hit counter's per-thread value (one multiply, one xor, one compare,
//! whether tracking is on or off). A sampled read (one in
//! [`hot_key_sample_rate`](CacheLayerBuilder::hot_key_sample_rate)) tries
//! the sketch's lock and scans its slots; it never waits for the lock. A
//! miss of a hot-capable cache also takes the lock once to ask whether its
//! key is hot. `benches/hit_path.rs` measures it.
//!
//! # Privacy
//!
//! The report holds keys, which may be per-user data: [`CacheLayer::hot_keys`]
//! returns them to the program, but the `tower_scale_cache_hot_key_hits`
//! gauges carry only the rank (`rank="1"` ... `rank="10"`) and the estimated
//! reads, never the key (a key as a label value would also be unbounded
//! cardinality).

use std::time::Duration;

use super::engine::hot::{HotConfig, MAX_CAPACITY, MAX_SAMPLE_EVERY};
use super::{BuildError, CacheLayer, CacheLayerBuilder, HotKey, Store};

impl<P, W> CacheLayerBuilder<P, W> {
    /// Tracks the cache's hottest keys in a sketch of `capacity` slots
    /// (1 to 4,096): [`CacheLayer::hot_keys`] reports them, a
    /// [named](Self::name) cache publishes them as the
    /// `tower_scale_cache_hot_key_hits{cache,rank}` gauges (ranks 1 to 10,
    /// at most once a second, and whenever `hot_keys` is called), and a
    /// miss of one of them calls the policy's
    /// [`on_hot_miss`](super::CachePolicy::on_hot_miss). Default: off for
    /// the core cache, on (64 slots) in `DbCache`.
    ///
    /// Any key read more often than one read in `capacity` is in the
    /// sketch whatever else is read; the counts are estimates from a
    /// sample of the reads ([`HotKey`]). Caches that share a name share
    /// the gauges (the last to publish wins); the gauges keep their last
    /// values after the cache is dropped.
    ///
    /// ```
    /// use tower_scale::cache::CacheLayer;
    /// let layer = CacheLayer::builder(|id: &u64| Some(*id))
    ///     .track_hot_keys(128)
    ///     .hot_key_sample_rate(64)
    ///     .build::<u64, String, ()>()?;
    /// assert!(layer.hot_keys(10).is_empty());
    /// # Ok::<(), tower_scale::ConfigError>(())
    /// ```
    pub fn track_hot_keys(mut self, capacity: usize) -> Self {
        self.hot.on = true;
        self.hot.capacity = capacity;
        self
    }

    /// Stops tracking hot keys (the default of the core cache).
    pub fn no_hot_keys(mut self) -> Self {
        self.hot.on = false;
        self
    }

    /// Samples about one read in `one_in` for the hot-key sketch (1 to
    /// 1,048,576; 1 samples every read). Default: 32. Denser sampling
    /// finds hot keys in less traffic and costs more per read.
    pub fn hot_key_sample_rate(mut self, one_in: u32) -> Self {
        self.hot.sample_every = one_in;
        self
    }

    /// How fast old reads stop counting: every `half_life` the sketch's
    /// counts halve, so the report is about recent traffic. Default: 60 s.
    pub fn hot_key_half_life(mut self, half_life: Duration) -> Self {
        self.hot.half_life = half_life;
        self
    }

    /// A key is hot, for [`on_hot_miss`](super::CachePolicy::on_hot_miss),
    /// while it ranks within the first `k` of the report (and has at least
    /// two sampled reads). Default: 8.
    pub fn hot_key_rank(mut self, k: usize) -> Self {
        self.hot.hot_rank = k;
        self
    }
}

/// Refuses hot-key settings out of range (only when tracking is on).
pub(super) fn validate(hot: &HotConfig) -> Result<(), BuildError> {
    if !hot.on {
        return Ok(());
    }
    if hot.capacity == 0 || hot.capacity > MAX_CAPACITY {
        return Err(BuildError::OutOfRange {
            field: "track_hot_keys",
            reason: format!("must be 1 to {MAX_CAPACITY}, got {}", hot.capacity),
        });
    }
    if hot.sample_every == 0 || hot.sample_every > MAX_SAMPLE_EVERY {
        return Err(BuildError::OutOfRange {
            field: "hot_key_sample_rate",
            reason: format!("must be 1 to {MAX_SAMPLE_EVERY}, got {}", hot.sample_every),
        });
    }
    if hot.half_life.is_zero() {
        return Err(BuildError::ZeroDuration {
            field: "hot_key_half_life",
            value: hot.half_life,
        });
    }
    if hot.hot_rank == 0 {
        return Err(BuildError::Zero {
            field: "hot_key_rank",
        });
    }
    Ok(())
}

impl<P, St: Store> CacheLayer<P, St> {
    /// The `k` most read keys lately, hottest first, with estimated reads
    /// (see [`HotKey`]); empty unless the cache tracks hot keys
    /// ([`CacheLayerBuilder::track_hot_keys`]). Also refreshes the
    /// `tower_scale_cache_hot_key_hits` gauges of a named cache.
    pub fn hot_keys(&self, k: usize) -> Vec<HotKey<St::Key>> {
        self.shared.hot_keys(k)
    }
}

#[cfg(all(test, feature = "moka"))]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt, service_fn};

    use super::super::{CacheLayer, CachePolicy, Clock};

    /// Keys are `(id, hot)`: the policy's `on_hot_miss` sets `hot` on the
    /// request, and the inner service counts the requests that arrive so.
    struct Marking;

    impl CachePolicy<(u64, bool), u64> for Marking {
        type Key = u64;
        fn key(&self, req: &(u64, bool)) -> Option<u64> {
            Some(req.0)
        }
        fn on_hot_miss(&self, _key: &u64, req: &mut (u64, bool)) {
            req.1 = true;
        }
    }

    #[tokio::test]
    async fn hits_misses_and_coalesced_waits_all_count_and_hot_misses_are_marked() {
        let (clock, mock) = Clock::mock();
        let layer = CacheLayer::builder(Marking)
            .time_to_live(Duration::from_millis(100))
            .track_hot_keys(16)
            .hot_key_sample_rate(1)
            .hot_key_rank(1)
            .clock(clock)
            .build()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let marked = Arc::new(AtomicUsize::new(0));
        let (c, m) = (calls.clone(), marked.clone());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let svc = layer.layer(service_fn(move |(id, hot): (u64, bool)| {
            let (c, m, g) = (c.clone(), m.clone(), g.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if hot {
                    m.fetch_add(1, Ordering::SeqCst);
                }
                if id == 1 {
                    // Held until released: concurrent misses pile up.
                    let _permit = g.acquire().await;
                }
                Ok::<_, Infallible>(id)
            }
        }));
        // Key 7: 10 misses-then-hits. Key 1 (cold): one read.
        for _ in 0..10 {
            svc.clone().oneshot((7, false)).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // 16 concurrent reads of key 1: one inner call, 15 coalesced, all
        // counted as reads.
        let waiting: Vec<_> = (0..16)
            .map(|_| tokio::spawn(svc.clone().oneshot((1, false))))
            .collect();
        while layer.stats().misses < 17 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(100);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "single-flight held");
        let top = layer.hot_keys(2);
        assert_eq!((top[0].key, top[0].reads), (1, 16), "{top:?}");
        assert_eq!((top[1].key, top[1].reads), (7, 10), "{top:?}");
        assert_eq!(marked.load(Ordering::SeqCst), 0, "no miss of a hot key yet");
        // Key 1 expires; it is rank 1 now: its next fill is marked. Eight
        // concurrent misses of it still make one call.
        mock.advance(Duration::from_millis(150));
        let waiting: Vec<_> = (0..8)
            .map(|_| tokio::spawn(svc.clone().oneshot((1, false))))
            .collect();
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3, "one call for 8 hot misses");
        assert_eq!(marked.load(Ordering::SeqCst), 1, "the hot fill was marked");
        // Key 7 (rank 2 with a hot rank of 1) is not marked.
        svc.clone().oneshot((7, false)).await.unwrap();
        assert_eq!(marked.load(Ordering::SeqCst), 1);
        drop(svc);
    }

    /// The gauges carry the rank and the estimate, never the key (which
    /// may be per-user data), and ranks without a key read 0.
    #[tokio::test]
    async fn gauges_by_rank_without_the_key() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let layer = CacheLayer::builder(|k: &String| Some(k.clone()))
            .name("users")
            .track_hot_keys(8)
            .hot_key_sample_rate(1)
            .build::<String, u64, Infallible>()
            .unwrap();
        let mut svc = layer.layer(service_fn(|_: String| async { Ok::<_, Infallible>(1) }));
        for i in 0..30 {
            let key = if i % 3 == 0 { "user:alice" } else { "user:bob" };
            svc.ready()
                .await
                .unwrap()
                .call(key.to_string())
                .await
                .unwrap();
        }
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let top = metrics::with_local_recorder(&recorder, || layer.hot_keys(1));
        assert_eq!(top.len(), 1);
        assert_eq!((top[0].key.as_str(), top[0].reads), ("user:bob", 20));
        let snapshot = snapshotter.snapshot().into_vec();
        let rank = |r: &str| {
            snapshot
                .iter()
                .find(|(key, ..)| {
                    key.key().name() == "tower_scale_cache_hot_key_hits"
                        && key
                            .key()
                            .labels()
                            .any(|l| l.key() == "rank" && l.value() == r)
                })
                .map(|(.., v)| v)
        };
        assert_eq!(rank("1"), Some(&DebugValue::Gauge(20.0.into())));
        assert_eq!(rank("2"), Some(&DebugValue::Gauge(10.0.into())));
        assert_eq!(rank("3"), Some(&DebugValue::Gauge(0.0.into())));
        assert_eq!(rank("10"), Some(&DebugValue::Gauge(0.0.into())));
        for (key, ..) in &snapshot {
            for label in key.key().labels() {
                assert!(!label.value().contains("user:"), "a key leaked: {key:?}");
            }
        }
    }

    #[tokio::test]
    async fn off_by_default_and_bad_settings_refused() {
        let layer = CacheLayer::builder(|k: &u64| Some(*k))
            .build::<u64, u64, Infallible>()
            .unwrap();
        let mut svc = layer.layer(service_fn(|k: u64| async move { Ok::<_, Infallible>(k) }));
        for _ in 0..1000 {
            svc.ready().await.unwrap().call(3).await.unwrap();
        }
        assert!(layer.hot_keys(5).is_empty());
        let key = |k: &u64| Some(*k);
        let bad = [
            CacheLayer::builder(key).track_hot_keys(0),
            CacheLayer::builder(key).track_hot_keys(5000),
            CacheLayer::builder(key)
                .track_hot_keys(8)
                .hot_key_sample_rate(0),
            CacheLayer::builder(key)
                .track_hot_keys(8)
                .hot_key_half_life(Duration::ZERO),
            CacheLayer::builder(key).track_hot_keys(8).hot_key_rank(0),
        ];
        for b in bad {
            assert!(b.build::<u64, u64, Infallible>().is_err());
        }
    }
}
