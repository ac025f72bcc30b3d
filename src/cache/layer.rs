use std::fmt;
use std::hash::BuildHasher;
#[cfg(any(feature = "moka", feature = "quick-cache"))]
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::BuildError;
use super::CacheStats;
use super::Invalidator;
use super::engine::clock::Clock;
use super::engine::hot::{HotConfig, HotKeys};
use super::engine::log::InvalidationLog;
use super::engine::stats::{Stats, publisher};
use super::key::KeyHasher;
use super::policy::Windows;
use super::service::Cache;
use super::shared::{Config, Shared, Weigh};
use super::store::{Capacity, Store};
use tokio_util::sync::DropGuard;

/// Weighs a response for a weight-bounded store (for example by body bytes).
///
/// Implemented by closures `Fn(&R) -> u32`; `()` weighs everything 1.
pub trait Weigher<R>: Send + Sync + 'static {
    /// The weight of `response`.
    fn weigh(&self, response: &R) -> u32;
}

impl<R> Weigher<R> for () {
    fn weigh(&self, _: &R) -> u32 {
        1
    }
}

impl<R, F: Fn(&R) -> u32 + Send + Sync + 'static> Weigher<R> for F {
    fn weigh(&self, response: &R) -> u32 {
        self(response)
    }
}

/// Puts a read-through cache in front of a service: [`Cache`].
///
/// A `CacheLayer` is configuration plus the cache's shared state: every
/// service it wraps (and every clone of those) shares one store, one
/// single-flight group and one [`Invalidator`]. Build it with
/// [`CacheLayer::builder`].
pub struct CacheLayer<P, St: Store> {
    pub(crate) shared: Arc<Shared<P, St>>,
    pub(crate) life: Arc<DropGuard>,
}

impl<P, St: Store> Clone for CacheLayer<P, St> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            life: Arc::clone(&self.life),
        }
    }
}

impl<P, St: Store + fmt::Debug> fmt::Debug for CacheLayer<P, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("store", &self.shared.store)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<P> CacheLayer<P, NoStore> {
    /// Starts configuring a cache whose keys (and storage decisions) come
    /// from `policy`: a [`CachePolicy`](super::CachePolicy), or a closure
    /// `Fn(&Req) -> Option<Key>`.
    pub fn builder(policy: P) -> CacheLayerBuilder<P> {
        CacheLayerBuilder {
            policy,
            windows: Windows::ttl(Duration::from_secs(60)),
            negative_ttl: None,
            capacity: Capacity::Entries(10_000),
            weigher: (),
            clock: Clock::new(),
            seed: None,
            early_refresh: Some(1.0),
            ttl_jitter: 0.0,
            max_tracked_invalidations: 100_000,
            metrics: None,
            hot: HotConfig::off(),
        }
    }
}

/// A placeholder store type for [`CacheLayer::builder`]: the real store is
/// chosen when the layer is built.
#[derive(Debug)]
#[non_exhaustive]
pub struct NoStore;

impl Store for NoStore {
    type Key = ();
    type Response = ();
    type Error = ();
    fn get(&self, _: &super::Hashed<()>) -> Option<Arc<super::Entry<(), ()>>> {
        None
    }
    fn insert(&self, _: super::Hashed<()>, _: Arc<super::Entry<(), ()>>) {}
    fn remove(&self, _: &super::Hashed<()>) {}
    fn clear(&self) {}
    fn entry_count(&self) -> u64 {
        0
    }
    fn evictions(&self) -> u64 {
        0
    }
}

impl<P, St: Store> CacheLayer<P, St> {
    /// A handle to invalidate entries by key, tag or all.
    pub fn invalidator(&self) -> Invalidator<St::Key>
    where
        P: Send + Sync + 'static,
    {
        Invalidator::new(self.shared.clone())
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.shared.store
    }

    /// Puts a shared (L2) tier behind the in-process store, such as
    /// `RedisTier`, and returns the tier's [`RemoteLink`](super::RemoteLink)
    /// to this cache; `None` if a tier is attached already.
    pub fn attach_remote(
        &self,
        tier: Arc<dyn super::RemoteTier<St::Key, St::Response>>,
    ) -> Option<super::RemoteLink<St::Key>>
    where
        P: Send + Sync + 'static,
    {
        self.shared.remote.set(tier).ok()?;
        Some(super::RemoteLink {
            target: self.shared.clone(),
        })
    }

    /// Stops background refreshes now (they also stop when the last layer
    /// and service of this cache are dropped). The cache keeps serving;
    /// stale entries are then refreshed by the next miss instead. A shared
    /// tier keeps delivering invalidations (and heartbeats) until the last
    /// handle goes; then it flushes what is queued, for at most one
    /// isolation window.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

impl<P, St: Store> super::remote::sealed::Sealed for CacheLayer<P, St> {}

impl<P, St> super::remote::AttachRemote for CacheLayer<P, St>
where
    P: Send + Sync + 'static,
    St: Store,
{
    type Key = St::Key;
    type Response = St::Response;

    fn attach_tier(
        &self,
        tier: Arc<dyn super::RemoteTier<St::Key, St::Response>>,
    ) -> Result<super::RemoteLink<St::Key>, BuildError> {
        self.attach_remote(tier)
            .ok_or_else(|| BuildError::OutOfRange {
                field: "shared tier",
                reason: "this cache already has a shared tier attached".into(),
            })
    }

    fn closed_token(&self) -> tokio_util::sync::CancellationToken {
        self.shared.closed.clone()
    }
}

impl<S, P, St: Store> Layer<S> for CacheLayer<P, St> {
    type Service = Cache<S, P, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            shared: Arc::clone(&self.shared),
            life: Arc::clone(&self.life),
        }
    }
}

/// Configures a [`CacheLayer`]; every setter has a documented default and
/// [`build`](Self::build) validates the whole.
#[must_use]
pub struct CacheLayerBuilder<P, W = ()> {
    policy: P,
    windows: Windows,
    negative_ttl: Option<Duration>,
    capacity: Capacity,
    weigher: W,
    clock: Clock,
    seed: Option<u64>,
    early_refresh: Option<f64>,
    ttl_jitter: f64,
    max_tracked_invalidations: usize,
    metrics: Option<(String, Duration)>,
    /// Set in `super::hot`.
    pub(super) hot: HotConfig,
}

impl<P, W> fmt::Debug for CacheLayerBuilder<P, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayerBuilder")
            .field("windows", &self.windows)
            .field("negative_ttl", &self.negative_ttl)
            .field("capacity", &self.capacity)
            .field("early_refresh", &self.early_refresh)
            .field("ttl_jitter", &self.ttl_jitter)
            .field("seed", &self.seed)
            .field("max_tracked_invalidations", &self.max_tracked_invalidations)
            .field("metrics", &self.metrics)
            .field("hot_keys", &self.hot)
            .finish_non_exhaustive()
    }
}

impl<P, W> CacheLayerBuilder<P, W> {
    /// How long a stored response is fresh. Default: 60 s. The policy may
    /// choose per response.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.windows.ttl = ttl;
        self
    }

    /// How long after its TTL a stale response is still served while one
    /// background refresh runs. Default: zero (off).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.windows.stale_while_revalidate = window;
        self
    }

    /// How long after its TTL a stale response stands in when the service
    /// fails. Default: zero (off).
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.windows.stale_if_error = window;
        self
    }

    /// Caches errors for `ttl` (negative caching). Default: errors are
    /// never stored; they reach every waiting caller and nothing else.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Bounds the store to `n` entries. Default: 10,000 entries.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.capacity = Capacity::Entries(n);
        self
    }

    /// Bounds the store by total weight, each response weighing what
    /// `weigher` says (for example its body length in bytes).
    pub fn max_weight<W2>(self, max: u64, weigher: W2) -> CacheLayerBuilder<P, W2> {
        CacheLayerBuilder {
            policy: self.policy,
            windows: self.windows,
            negative_ttl: self.negative_ttl,
            capacity: Capacity::Weight(max),
            weigher,
            clock: self.clock,
            seed: self.seed,
            early_refresh: self.early_refresh,
            ttl_jitter: self.ttl_jitter,
            max_tracked_invalidations: self.max_tracked_invalidations,
            metrics: self.metrics,
            hot: self.hot,
        }
    }

    /// Names the cache and publishes its statistics as the
    /// `tower_scale_cache_*` metrics (labelled `cache="NAME"`, see the
    /// README's metrics table) through the [`metrics`] facade, once a
    /// second ([`metrics_interval`](Self::metrics_interval)), for as long as
    /// the cache lives. Default: no name, no metrics unless you call
    /// [`CacheStats::record_metrics`](super::CacheStats::record_metrics)
    /// yourself.
    ///
    /// The publisher is a task on the Tokio runtime `build` runs in; building
    /// a named cache outside a runtime is a configuration error. Names
    /// become label values: use a fixed set (never a key or a user).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::cache::CacheLayer;
    /// let layer = CacheLayer::builder(|id: &u64| Some(*id))
    ///     .name("users")
    ///     .build::<u64, String, ()>()?;
    /// # drop(layer); Ok(()) }
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let every = self
            .metrics
            .as_ref()
            .map_or(Duration::from_secs(1), |m| m.1);
        self.metrics = Some((name.into(), every));
        self
    }

    /// How often a [named](Self::name) cache publishes its metrics.
    /// Default: 1 s, at least 10 ms. No effect without a name.
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        if let Some(m) = self.metrics.as_mut() {
            m.1 = every;
        } else {
            self.metrics = Some((String::new(), every));
        }
        self
    }

    /// The clock freshness is measured on. Default: [`Clock::new`]; tests
    /// pass [`Clock::mock`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Seeds the randomness of early refresh and TTL jitter, for
    /// reproducible tests. Default: a random seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Probabilistic early refresh (XFetch): a fresh hit refreshes in the
    /// background with a probability that rises as expiry nears, weighted
    /// by how long the last fill took, times `beta` (higher refreshes
    /// earlier). Keeps popular keys from all expiring at once. Default:
    /// on, `beta = 1.0`.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh = Some(beta);
        self
    }

    /// Turns probabilistic early refresh off.
    pub fn no_early_refresh(mut self) -> Self {
        self.early_refresh = None;
        self
    }

    /// Shortens each entry's TTL by a random fraction up to `fraction`
    /// (in `0.0..1.0`), spreading expiries. Default: 0 (off).
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = fraction;
        self
    }

    /// How many key and tag invalidations are remembered (each for its own
    /// kind) before the oldest half is folded into a conservative floor.
    /// Default: 100,000.
    ///
    /// Past the bound, entries and fills older than the floor are treated
    /// as invalidated: a miss, never a stale hit. What the bound costs: two
    /// hash tables (keys, tags) of `n × 8 / 7` slots rounded up to a power of
    /// two, each slot the key (with its 8-byte hash) or the tag handle, plus
    /// 16 bytes; plus each remembered tag's text. At the default, with
    /// `i64` keys, that is 4 MiB per table and about 3 MiB of `user:N`
    /// tags (a fold copies the newer half to a fresh table, so for a moment
    /// one kind has two).
    pub fn max_tracked_invalidations(mut self, n: usize) -> Self {
        self.max_tracked_invalidations = n;
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        if let Some((name, every)) = &self.metrics {
            publisher::validate(name, *every)?;
        }
        if self.windows.ttl.is_zero() {
            return Err(BuildError::ZeroDuration {
                field: "time_to_live",
                value: self.windows.ttl,
            });
        }
        if let Some(ttl) = self.negative_ttl.filter(|t| t.is_zero()) {
            return Err(BuildError::ZeroDuration {
                field: "negative_ttl",
                value: ttl,
            });
        }
        if self.capacity.limit() == 0 {
            return Err(BuildError::Zero {
                field: match self.capacity {
                    Capacity::Weight(_) => "max_weight",
                    _ => "max_entries",
                },
            });
        }
        if let Some(beta) = self.early_refresh
            && !(beta.is_finite() && beta > 0.0)
        {
            return Err(BuildError::OutOfRange {
                field: "early_refresh",
                reason: format!("beta must be a positive finite number, got {beta}"),
            });
        }
        if !(0.0..1.0).contains(&self.ttl_jitter) {
            return Err(BuildError::OutOfRange {
                field: "ttl_jitter",
                reason: format!("must be in 0.0..1.0, got {}", self.ttl_jitter),
            });
        }
        super::hot::validate(&self.hot)?;
        if self.max_tracked_invalidations < 2 {
            return Err(BuildError::OutOfRange {
                field: "max_tracked_invalidations",
                reason: "must be at least 2".into(),
            });
        }
        Ok(())
    }

    /// Builds the layer on the default store, moka (feature `moka`).
    ///
    /// The key, response and error types are usually inferred from the
    /// service the layer wraps.
    #[cfg(feature = "moka")]
    #[cfg_attr(docsrs, doc(cfg(feature = "moka")))]
    pub fn build<K, R, E>(self) -> Result<CacheLayer<P, super::MokaStore<K, R, E>>, BuildError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        R: Clone + Send + Sync + 'static,
        E: Clone + Send + Sync + 'static,
        W: Weigher<R>,
        P: Send + Sync + 'static,
    {
        self.validate()?;
        let store = super::MokaStore::new(self.capacity);
        self.build_with_store(store)
    }

    /// Builds the layer on a quick_cache store (feature `quick-cache`).
    ///
    /// A hit clones the response while the store lends the entry under its
    /// shard's read lock (sparing two atomic count updates), so the
    /// response's (and a cached error's) `Clone` must be cheap (an `Arc`,
    /// `Bytes`) and must never call into the same cache: a deep copy holds
    /// up the shard's writers, and a `Clone` that invalidates would wait for
    /// itself. Evicted and replaced entries are dropped after the lock.
    #[cfg(feature = "quick-cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "quick-cache")))]
    pub fn build_quick<K, R, E>(
        self,
    ) -> Result<CacheLayer<P, super::QuickStore<K, R, E>>, BuildError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        R: Clone + Send + Sync + 'static,
        E: Clone + Send + Sync + 'static,
        W: Weigher<R>,
        P: Send + Sync + 'static,
    {
        self.validate()?;
        let store = super::QuickStore::new(self.capacity);
        self.build_with_store(store)
    }

    /// Builds the layer on a store of your own (its capacity is its own).
    pub fn build_with_store<St: Store>(self, store: St) -> Result<CacheLayer<P, St>, BuildError>
    where
        W: Weigher<St::Response>,
        P: Send + Sync + 'static,
    {
        self.validate()?;
        let seed = self
            .seed
            .unwrap_or_else(|| std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64));
        let weigher: Option<Weigh<St::Response>> = match self.capacity {
            Capacity::Weight(_) => {
                let w = self.weigher;
                Some(Box::new(move |r| w.weigh(r)))
            }
            _ => None,
        };
        let shared = Shared::new(
            self.policy,
            store,
            Config {
                windows: self.windows,
                negative_ttl: self.negative_ttl,
                early_refresh: self.early_refresh,
                ttl_jitter: self.ttl_jitter,
            },
            weigher,
            self.clock,
            InvalidationLog::new(KeyHasher::new(), self.max_tracked_invalidations),
            Stats::new(),
            HotKeys::new(
                self.hot,
                self.metrics
                    .as_ref()
                    .map(|m| m.0.clone())
                    .unwrap_or_default(),
            ),
            seed,
        );
        let shared = Arc::new(shared);
        if let Some((name, every)) = self.metrics {
            let weak = Arc::downgrade(&shared);
            publisher::spawn(name, every, shared.closed.clone(), move || {
                weak.upgrade().map(|s| {
                    s.hot.publish_periodic(s.clock.now());
                    s.stats()
                })
            })?;
        }
        let life = Arc::new(shared.closed.clone().drop_guard());
        Ok(CacheLayer { shared, life })
    }
}
