//! [`Cache`], the read-through service, and its miss and background
//! refresh paths.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::DropGuard;
use tower::Service;

use super::CacheStats;
use super::Invalidator;
use super::engine::flight::{Join, Leader};
use super::engine::stats::Kind;
use super::entry::Entry;
use super::future::ResponseFuture;
use super::key::Hashed;
use super::policy::CachePolicy;
use super::remote::Lease;
use super::store::Store;

use super::shared::{Lookup, Shared};

/// A read-through cache in front of the service `S`; see the [module
/// docs](super) and [`CacheLayer`](super::CacheLayer).
///
/// # Readiness
///
/// `poll_ready` is always ready: hits never wait for the inner service, so
/// they are served even while it applies backpressure. A miss (or a bypassed
/// request) clones the inner service and waits for that clone's readiness
/// inside its own future before calling it, as tower's guidance for layers
/// that must stay ready asks; backpressure therefore delays misses, not the
/// caller of `poll_ready`. Put a concurrency limit or load shedding inside
/// the cache if misses must be bounded.
pub struct Cache<S, P, St: Store> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared<P, St>>,
    /// Cancels background work when the last layer or service handle goes.
    pub(crate) life: Arc<DropGuard>,
}

impl<S: Clone, P, St: Store> Clone for Cache<S, P, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            life: Arc::clone(&self.life),
        }
    }
}

impl<S: fmt::Debug, P, St: Store + fmt::Debug> fmt::Debug for Cache<S, P, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("store", &self.shared.store)
            .finish_non_exhaustive()
    }
}

impl<S, P, St: Store> Cache<S, P, St> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

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

    /// The `k` most read keys lately, hottest first, with estimated reads
    /// (see [`HotKey`](super::HotKey)); empty unless the cache tracks hot
    /// keys ([`CacheLayerBuilder::track_hot_keys`](super::CacheLayerBuilder::track_hot_keys)).
    /// Also refreshes the `tower_scale_cache_hot_key_hits` gauges of a
    /// named cache.
    pub fn hot_keys(&self, k: usize) -> Vec<super::HotKey<St::Key>> {
        self.shared.hot_keys(k)
    }

    /// Inner calls in flight (one per key being filled).
    pub fn in_flight(&self) -> usize {
        self.shared.flights.len()
    }

    /// Stops background refreshes now; see [`CacheLayer::shutdown`](super::CacheLayer::shutdown).
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

impl<S, P, St, Req> Service<Req> for Cache<S, P, St>
where
    S: Service<Req, Response = St::Response, Error = St::Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    P: CachePolicy<Req, St::Response, Key = St::Key>,
    St: Store,
    Req: Send + 'static,
{
    type Response = St::Response;
    type Error = St::Error;
    type Future = ResponseFuture<S, Req>;

    /// Always ready: see "Readiness" on [`Cache`].
    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &*self.shared;
        let Some(key) = shared.policy.key(&req) else {
            shared.stats.incr(Kind::Bypasses);
            return ResponseFuture::bypass(self.inner.clone(), req);
        };
        let key = shared.log.hasher.hashed(key);
        let min_version = shared.policy.min_version(&req);
        let mut fallback = None;
        let now = shared.clock.now();
        let l1 = if shared.trusted_at(now) {
            // The common hit is answered while the store lends the entry
            // (no reference count taken); anything else takes the entry out
            // and goes through the full lookup.
            shared.store.with_entry(&key, |entry| {
                match shared.fast_hit(entry, min_version, now) {
                    Some(result) => Probe::Hit(result),
                    None => Probe::Look(Arc::clone(entry)),
                }
            })
        } else {
            shared.stats.incr(Kind::Isolated);
            None
        };
        let l1 = match l1 {
            Some(Probe::Hit(result)) => {
                let count = shared.stats.incr(Kind::Hits);
                shared.hot.sample(count, &key, now);
                return ResponseFuture::ready(result);
            }
            Some(Probe::Look(entry)) => Some(entry),
            None => None,
        };
        if let Some(entry) = l1 {
            match shared.lookup(&entry, min_version, now) {
                Lookup::Hit { refresh, count } => {
                    shared.hot.sample(count, &key, now);
                    if refresh {
                        self.spawn_refresh(req, key, min_version);
                    }
                    return ResponseFuture::ready(entry.result.clone());
                }
                Lookup::Fallback => fallback = Some(entry),
                Lookup::Skip => {}
                Lookup::Dead => shared.store.remove(&key),
            }
        }
        // A miss is a read of the key too (the coalesced ones included).
        let count = shared.stats.incr(Kind::Misses);
        shared.hot.sample(count, &key, now);
        ResponseFuture::miss(Box::pin(miss(
            Arc::clone(&self.shared),
            self.inner.clone(),
            req,
            key,
            min_version,
            fallback,
        )))
    }
}

/// What the hit path's first look at a lent entry found.
enum Probe<R, E> {
    /// A fresh, valid hit: the response.
    Hit(Result<R, E>),
    /// Something to look at closely: the entry, taken out of the store.
    Look(Arc<Entry<R, E>>),
}

impl<S, P, St: Store> Cache<S, P, St> {
    /// Starts the one background refresh of an entry (SWR or early).
    #[cold]
    fn spawn_refresh<Req>(&self, req: Req, key: Hashed<St::Key>, min_version: Option<u64>)
    where
        S: Service<Req, Response = St::Response, Error = St::Error> + Clone + Send + 'static,
        S::Future: Send + 'static,
        P: CachePolicy<Req, St::Response, Key = St::Key>,
        Req: Send + 'static,
    {
        let shared = &self.shared;
        if shared.shutdown.is_cancelled() {
            return;
        }
        // Without a runtime there is nothing to run it on: the stale entry
        // is served until its window ends, then a miss refreshes it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        shared.stats.incr(Kind::Refreshes);
        let shared = Arc::clone(shared);
        let svc = self.inner.clone();
        let shutdown = shared.shutdown.clone();
        runtime.spawn(async move {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = refresh(shared, svc, req, key, min_version) => {}
            }
        });
    }
}

async fn refresh<S, P, St, Req>(
    shared: Arc<Shared<P, St>>,
    svc: S,
    req: Req,
    key: Hashed<St::Key>,
    min_version: Option<u64>,
) where
    S: Service<Req, Response = St::Response, Error = St::Error>,
    P: CachePolicy<Req, St::Response, Key = St::Key>,
    St: Store,
{
    // A miss already filling this key does the refresh's work.
    if let Join::Lead(leader) = shared.flights.join_fenced(&key, min_version, &shared.log) {
        // Only a fill under a lease taken before it reads may write the
        // shared tier (the lease carries the invalidation epoch).
        let lease = match shared.remote.get() {
            Some(tier) => tier.lease(key.key()).await,
            None => Lease::Unavailable,
        };
        let (result, remote) = shared.fill(svc, req, &key).await;
        shared.finish_remote(&key, remote, lease).await;
        leader.complete(&result);
    }
}

/// Gives `result` to the waiters of `leader` (if this request led) and back.
fn hand_over<K, R, E>(leader: Option<Leader<K, R, E>>, result: Result<R, E>) -> Result<R, E>
where
    K: std::hash::Hash + Eq,
    R: Clone,
    E: Clone,
{
    if let Some(leader) = leader {
        leader.complete(&result);
    }
    result
}

/// The miss path: join the key's flight (or lead it), fill, fall back to a
/// stale entry if the service fails inside stale-if-error.
async fn miss<S, P, St, Req>(
    shared: Arc<Shared<P, St>>,
    svc: S,
    req: Req,
    key: Hashed<St::Key>,
    min_version: Option<u64>,
    fallback: Option<Arc<Entry<St::Response, St::Error>>>,
) -> Result<St::Response, St::Error>
where
    S: Service<Req, Response = St::Response, Error = St::Error>,
    P: CachePolicy<Req, St::Response, Key = St::Key>,
    St: Store,
{
    let mut counted = false;
    let leader = loop {
        match shared.flights.join_fenced(&key, min_version, &shared.log) {
            Join::Lead(leader) => break Some(leader),
            Join::Alone => break None,
            Join::Wait(flight) => {
                if !counted {
                    shared.stats.incr(Kind::Coalesced);
                    counted = true;
                }
                if let Some(result) = flight.wait().await {
                    // A leader without this request's stale-if-error
                    // fallback (a background refresh, say) may have failed.
                    return shared.or_fallback(result, fallback.as_deref());
                }
                // The leader was cancelled: take over (one waiter wins the
                // next join, the others wait for it).
            }
        }
    };
    if leader.is_some()
        && let Some(entry) = shared.fresh_entry(&key, min_version)
    {
        // Filled between our lookup and winning the flight.
        return hand_over(leader, entry.result.clone());
    }
    let mut lease = Lease::Unavailable;
    if let (Some(tier), true) = (shared.remote.get(), leader.is_some()) {
        // An L1 miss: one round trip to the shared tier.
        let fill_seq = shared.log.current();
        if let Some(result) = shared
            .fill_from_remote(tier.as_ref(), &key, min_version, fill_seq)
            .await
        {
            return hand_over(leader, result);
        }
        // Distributed single-flight: one instance fills, the others wait.
        lease = tier.lease(key.key()).await;
        if lease == Lease::Busy {
            shared.stats.incr(Kind::Coalesced);
            let deadline = tokio::time::Instant::now() + tier.lease_wait();
            let mut pause = Duration::from_millis(2);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
                if let Some(result) = shared
                    .fill_from_remote(tier.as_ref(), &key, min_version, fill_seq)
                    .await
                {
                    return hand_over(leader, result);
                }
                // The holder gave up (or its put was refused): take over
                // rather than wait out the lease.
                lease = tier.lease(key.key()).await;
                if lease != Lease::Busy {
                    break;
                }
            }
            if lease == Lease::Busy {
                lease = Lease::Unavailable;
            }
        }
    }
    let (mut result, remote) = shared.fill(svc, req, &key).await;
    shared.finish_remote(&key, remote, lease).await;
    result = shared.or_fallback(result, fallback.as_deref());
    hand_over(leader, result)
}
