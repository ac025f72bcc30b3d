use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::CacheStats;
use super::engine::clock::{Clock, Instant, nanos};
use super::engine::flight::{Flights, Join, Leader};
use super::engine::log::{InvalidateTarget, InvalidationLog};
use super::engine::stats::{Kind, Stats};
use super::entry::{Entry, Freshness};
use super::future::ResponseFuture;
use super::key::Hashed;
use super::policy::{CachePolicy, Storable, Windows};
use super::remote::{Lease, LinkTarget, RemoteEntry, RemoteTier};
use super::store::Store;
use super::{Invalidation, Invalidator};

/// Past this many "recompute times × beta" before expiry the XFetch
/// probability is below e^-20 (about 2e-9): the hit path skips the dice.
const XFETCH_CUTOFF: f64 = 20.0;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) windows: Windows,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) early_refresh: Option<f64>,
    pub(crate) ttl_jitter: f64,
}

/// Cancels background work when the last layer or service handle goes.
#[derive(Debug)]
pub(crate) struct Life {
    shutdown: CancellationToken,
}

impl Life {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown }
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) type Weigh<R> = Box<dyn Fn(&R) -> u32 + Send + Sync>;

/// The state every clone of one cache shares.
pub(crate) struct Shared<P, St: Store> {
    pub(crate) policy: P,
    pub(crate) store: St,
    pub(crate) config: Config,
    weigher: Option<Weigh<St::Response>>,
    clock: Clock,
    log: InvalidationLog<St::Key>,
    flights: Arc<Flights<St::Key, St::Response, St::Error>>,
    stats: Stats,
    rng: crate::random::Random,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the last layer or service handle goes (the parent of
    /// `shutdown`): the shared tier's tasks run until then, so an explicit
    /// `shutdown()` stops refreshes but not the invalidation fan-out.
    pub(crate) closed: CancellationToken,
    /// The shared tier, attached after build.
    pub(crate) remote: OnceLock<Arc<dyn RemoteTier<St::Key, St::Response>>>,
    /// The in-process store serves hits only before this instant (nanos on
    /// `clock`): `u64::MAX` without a tier that requires heartbeats,
    /// otherwise the last heartbeat's send time plus the isolation window.
    trusted_until: AtomicU64,
    /// The isolation window in nanos (0: heartbeats not required).
    isolation: AtomicU64,
    /// Values from the shared tier are not used before this instant: after
    /// rejoining the fan-out, other instances may still be flushing the
    /// invalidations they queued during the same outage.
    remote_from: AtomicU64,
    /// Set by the first heartbeat: later gaps are rejoins.
    joined: AtomicBool,
    /// The highest sequence number of this instance's invalidations queued
    /// for the tier, and the highest the tier reported applied.
    remote_queued: AtomicU64,
    remote_applied: AtomicU64,
    /// Orders "mark, then queue for the tier", so the tier sees this
    /// instance's invalidations in sequence order.
    remote_order: Mutex<()>,
}

/// What a lookup found.
enum Lookup {
    /// Serve it; `refresh` says this request must start the background refresh.
    Hit { refresh: bool },
    /// Past its windows but usable if the service fails.
    Fallback,
    /// Not usable for this request (too old a version), but left in place.
    Skip,
    /// Invalidated or expired: remove it.
    Dead,
}

impl<P, St: Store> Shared<P, St> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        policy: P,
        store: St,
        config: Config,
        weigher: Option<Weigh<St::Response>>,
        clock: Clock,
        log: InvalidationLog<St::Key>,
        stats: Stats,
        seed: u64,
    ) -> Self {
        let closed = CancellationToken::new();
        Self {
            policy,
            store,
            config,
            weigher,
            clock,
            log,
            flights: Arc::new(Flights::new()),
            stats,
            rng: crate::random::Random::new(seed),
            shutdown: closed.child_token(),
            closed,
            remote: OnceLock::new(),
            trusted_until: AtomicU64::new(u64::MAX),
            isolation: AtomicU64::new(0),
            remote_from: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            remote_queued: AtomicU64::new(0),
            remote_applied: AtomicU64::new(0),
            remote_order: Mutex::new(()),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
            .snapshot(self.store.evictions(), self.store.entry_count())
    }

    /// A uniform number in (0, 1] from the seeded stream.
    fn next_random(&self) -> f64 {
        self.rng.next_unit()
    }

    /// Whether the in-process store may serve at `now` (one atomic load;
    /// read before the store, so a heartbeat that extended the trust also
    /// shows the invalidations applied before it).
    #[inline]
    pub(crate) fn trusted_at(&self, now: Instant) -> bool {
        now.as_nanos() < self.trusted_until.load(Ordering::Acquire)
    }

    #[inline]
    fn lookup(
        &self,
        entry: &Entry<St::Response, St::Error>,
        min_version: Option<u64>,
        now: Instant,
    ) -> Lookup {
        if !self.log.still_valid(entry) {
            return Lookup::Dead;
        }
        if let Some(min) = min_version
            && entry.version.is_none_or(|v| v < min)
        {
            return Lookup::Skip;
        }
        match entry.freshness(now) {
            Freshness::Fresh => {
                self.stats.incr(Kind::Hits);
                Lookup::Hit {
                    refresh: self.early_refresh_due(entry, now),
                }
            }
            Freshness::Stale => {
                self.stats.incr(Kind::StaleHits);
                Lookup::Hit {
                    refresh: entry.claim_refresh(),
                }
            }
            Freshness::ErrorFallback if entry.result.is_ok() => Lookup::Fallback,
            Freshness::ErrorFallback | Freshness::Expired => Lookup::Dead,
        }
    }

    /// XFetch: refresh when `now - recompute × beta × ln(u) ≥ expiry`.
    /// Before `early_from` the probability is below e^-20 and the dice are
    /// not rolled (one comparison on the hit path).
    #[inline]
    fn early_refresh_due(&self, entry: &Entry<St::Response, St::Error>, now: Instant) -> bool {
        if now < entry.early_from {
            return false;
        }
        let Some(beta) = self.config.early_refresh else {
            return false;
        };
        let remaining = entry
            .fresh_until
            .saturating_duration_since(now)
            .as_secs_f64();
        let scale = entry.recompute.as_secs_f64() * beta;
        self.early_refresh_roll(entry, remaining, scale)
    }

    #[cold]
    fn early_refresh_roll(
        &self,
        entry: &Entry<St::Response, St::Error>,
        remaining: f64,
        scale: f64,
    ) -> bool {
        let u = self.next_random();
        if scale * -u.ln() >= remaining && entry.claim_refresh() {
            self.stats.incr(Kind::EarlyRefreshes);
            true
        } else {
            false
        }
    }

    /// Is there a fresh, valid entry for this key now? (The leader's
    /// re-check after winning the flight.)
    fn fresh_entry(
        &self,
        key: &Hashed<St::Key>,
        min_version: Option<u64>,
    ) -> Option<Arc<Entry<St::Response, St::Error>>> {
        let now = self.clock.now();
        if !self.trusted_at(now) {
            return None;
        }
        let entry = self.store.get(key)?;
        let usable = self.log.still_valid(&entry)
            && min_version.is_none_or(|min| entry.version.is_some_and(|v| v >= min))
            && entry.freshness(now) == Freshness::Fresh;
        usable.then_some(entry)
    }

    /// An entry from the shared tier, stored in L1 (unless an invalidation
    /// since `fill_seq`, or at a higher version, keeps it out) and returned.
    async fn fill_from_remote(
        &self,
        tier: &dyn RemoteTier<St::Key, St::Response>,
        key: &Hashed<St::Key>,
        min_version: Option<u64>,
        fill_seq: u64,
    ) -> Option<Result<St::Response, St::Error>> {
        let now = self.clock.now();
        // Not while isolated after having joined (other instances may have
        // invalidations queued that this one cannot learn of), nor for one
        // window after rejoining (they may still be flushing them).
        let isolated = !self.trusted_at(now) && self.joined.load(Ordering::Acquire);
        if isolated || now.as_nanos() < self.remote_from.load(Ordering::Acquire) {
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        // Read before the round trip: what was applied by then is in the
        // tier's answer; anything later may not be.
        let applied = self.remote_applied.load(Ordering::Acquire);
        let entry = tier.get(key.key()).await?;
        if min_version.is_some_and(|min| entry.version.is_none_or(|v| v < min)) {
            return None;
        }
        if self.remote_pending_touches(key, &entry.tags, applied) {
            // The tier may still hold what a local invalidation removed.
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        let mut storable = Storable::new(Windows {
            ttl: entry.fresh_for,
            stale_while_revalidate: entry.stale_while_revalidate,
            stale_if_error: entry.stale_if_error,
        })
        .tags(entry.tags);
        if let Some(v) = entry.version {
            storable = storable.version(v);
        }
        // A value the local log keeps out (invalidated since this lookup
        // began, or stamped below an invalidation's version) is not used.
        if !self.store_fill(
            key,
            Ok(entry.response.clone()),
            storable,
            fill_seq,
            Duration::ZERO,
        ) {
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        self.stats.incr(Kind::RemoteHits);
        Some(Ok(entry.response))
    }

    /// A failed result replaced by the stale entry inside its
    /// stale-if-error window (if it is still valid and trusted).
    fn or_fallback(
        &self,
        result: Result<St::Response, St::Error>,
        fallback: Option<&Entry<St::Response, St::Error>>,
    ) -> Result<St::Response, St::Error> {
        let (Err(_), Some(entry)) = (&result, fallback) else {
            return result;
        };
        let now = self.clock.now();
        if now < entry.error_until && self.trusted_at(now) && self.log.still_valid(entry) {
            self.stats.incr(Kind::StaleIfError);
            return entry.result.clone();
        }
        result
    }

    /// Writes a fill to the shared tier under its lease, or gives the lease
    /// up when there is nothing to write.
    async fn finish_remote(
        &self,
        key: &Hashed<St::Key>,
        remote: Option<RemoteEntry<St::Response>>,
        lease: Lease,
    ) {
        let Some(tier) = self.remote.get() else {
            return;
        };
        match (remote, lease) {
            (Some(entry), Lease::Acquired { .. }) => tier.put(key.key(), entry, lease).await,
            (None, Lease::Acquired { .. }) => tier.release(key.key(), lease).await,
            _ => {}
        }
    }

    /// Whether an invalidation made here and not applied to the tier when
    /// `applied` was read touches `key` or `tags`.
    fn remote_pending_touches(
        &self,
        key: &Hashed<St::Key>,
        tags: &[super::Tag],
        applied: u64,
    ) -> bool {
        let queued = self.remote_queued.load(Ordering::Acquire);
        queued > applied && self.log.newest_touching(key, tags) > applied
    }

    /// Whether the store holds a good response for `key` that a window may
    /// still serve (stale-while-revalidate or stale-if-error): a cached
    /// error must not replace it.
    fn has_servable_stale(&self, key: &Hashed<St::Key>) -> bool {
        let now = self.clock.now();
        self.store.get(key).is_some_and(|entry| {
            entry.result.is_ok()
                && now < entry.stale_until.max(entry.error_until)
                && self.log.still_valid(&entry)
        })
    }

    /// Calls the inner service (after its readiness) and stores the result
    /// if the policy and the invalidation log allow.
    async fn fill<S, Req>(
        &self,
        svc: S,
        req: Req,
        key: &Hashed<St::Key>,
    ) -> (
        Result<St::Response, St::Error>,
        Option<RemoteEntry<St::Response>>,
    )
    where
        S: Service<Req, Response = St::Response, Error = St::Error>,
        P: CachePolicy<Req, St::Response, Key = St::Key>,
    {
        // Read before the call: an invalidation from here on wins over this fill.
        let fill_seq = self.log.current();
        let started = self.clock.now();
        let result = svc.oneshot(req).await;
        let recompute = self.clock.now().saturating_duration_since(started);
        let mut remote = None;
        match &result {
            Ok(response) => {
                if let Some(storable) =
                    self.policy
                        .storable(key.key(), response, &self.config.windows)
                {
                    if self.remote.get().is_some() {
                        remote = Some(RemoteEntry {
                            response: response.clone(),
                            fresh_for: storable.windows.ttl,
                            stale_while_revalidate: storable.windows.stale_while_revalidate,
                            stale_if_error: storable.windows.stale_if_error,
                            version: storable.version,
                            tags: storable.tags.clone(),
                        });
                    }
                    if !self.store_fill(key, Ok(response.clone()), storable, fill_seq, recompute) {
                        // Invalidated during the fill: not for the shared tier either.
                        remote = None;
                    }
                }
            }
            Err(error) => {
                self.stats.incr(Kind::InnerErrors);
                if let Some(ttl) = self.config.negative_ttl {
                    // Negative caching never replaces a good entry that
                    // stale-while-revalidate or stale-if-error may serve.
                    if !self.has_servable_stale(key) {
                        let storable = Storable::new(Windows::ttl(ttl));
                        self.store_fill(key, Err(error.clone()), storable, fill_seq, recompute);
                    }
                }
            }
        }
        (result, remote)
    }

    fn store_fill(
        &self,
        key: &Hashed<St::Key>,
        result: Result<St::Response, St::Error>,
        storable: Storable,
        fill_seq: u64,
        recompute: Duration,
    ) -> bool {
        let Storable {
            windows,
            tags,
            version,
        } = storable;
        if windows.ttl.is_zero() {
            return false;
        }
        if !self.log.may_store(key, &tags, fill_seq, version) {
            self.stats.incr(Kind::NotStored);
            return false;
        }
        let ttl = if self.config.ttl_jitter > 0.0 {
            let u = self.next_random();
            windows.ttl.mul_f64(1.0 - self.config.ttl_jitter * u)
        } else {
            windows.ttl
        };
        let weight = match (&result, &self.weigher) {
            (Ok(response), Some(weigh)) => weigh(response).max(1),
            _ => 1,
        };
        let now = self.clock.now();
        let fresh_until = now + ttl;
        let early_from = match self.config.early_refresh {
            Some(beta) if !recompute.is_zero() && result.is_ok() => {
                let window = recompute.mul_f64(beta * XFETCH_CUTOFF);
                Instant::from_nanos(fresh_until.as_nanos().saturating_sub(nanos(window)))
            }
            _ => Instant::from_nanos(u64::MAX),
        };
        let entry = Arc::new(Entry {
            early_from,
            result,
            stored_at: now,
            fresh_until,
            stale_until: fresh_until + windows.stale_while_revalidate,
            error_until: fresh_until + windows.stale_if_error,
            recompute,
            version,
            tags: tags.into_boxed_slice(),
            fill_seq,
            validated_seq: AtomicU64::new(fill_seq),
            refreshing: AtomicBool::new(false),
            confirmed: AtomicBool::new(false),
            weight,
        });
        self.store.insert(key.clone(), Arc::clone(&entry));
        // Insert, then check again: an invalidation that marked in between
        // either sees our entry (and removes it) or is seen here.
        if !self.log.may_store(key, &entry.tags, fill_seq, version) {
            self.store.remove(key);
            self.stats.incr(Kind::NotStored);
            return false;
        }
        entry.confirmed.store(true, Ordering::Release);
        self.stats.incr(Kind::Stored);
        true
    }
}

impl<P, St: Store> Shared<P, St> {
    /// Marks and removes locally; returns the invalidation's sequence number.
    fn apply_local(&self, what: Invalidation<St::Key>, version: u64) -> u64 {
        self.stats.incr(Kind::Invalidations);
        match what {
            Invalidation::Key(key) => {
                let key = self.log.hasher.hashed(key);
                // Mark first, remove second (see the module docs).
                let seq = self.log.mark_key(key.clone(), version);
                self.store.remove(&key);
                seq
            }
            Invalidation::Tag(tag) => self.log.mark_tag(tag, version),
            Invalidation::All => {
                let seq = self.log.mark_all();
                self.store.clear();
                seq
            }
        }
    }
}

impl<P, St> InvalidateTarget<St::Key> for Shared<P, St>
where
    P: Send + Sync + 'static,
    St: Store,
{
    fn invalidate(&self, what: Invalidation<St::Key>, version: u64) {
        let Some(tier) = self.remote.get() else {
            self.apply_local(what, version);
            return;
        };
        // Mark and queue under one lock: the tier gets this instance's
        // invalidations in sequence order, and before this returns the
        // invalidation is queued, so the L2 read path sees it pending.
        let _order = crate::sync::lock(&self.remote_order);
        let seq = self.apply_local(what.clone(), version);
        self.remote_queued.fetch_max(seq, Ordering::AcqRel);
        tier.invalidate(seq, what, version);
    }
}

impl<P, St> LinkTarget<St::Key> for Shared<P, St>
where
    P: Send + Sync + 'static,
    St: Store,
{
    fn apply_remote(&self, what: Invalidation<St::Key>, version: u64) {
        self.apply_local(what, version);
    }

    fn applied(&self, seq: u64) {
        self.remote_applied.fetch_max(seq, Ordering::AcqRel);
    }

    fn isolate(&self, ttl: Duration) {
        self.isolation.store(nanos(ttl).max(1), Ordering::Release);
        self.trusted_until.store(0, Ordering::Release);
    }

    fn heard(&self, sent_at: Instant) {
        let ttl = self.isolation.load(Ordering::Acquire);
        if ttl == 0 {
            return;
        }
        let now = self.clock.now();
        // A heartbeat cannot have been sent in the future.
        let until = sent_at.min(now).as_nanos().saturating_add(ttl);
        if self.trusted_until.load(Ordering::Acquire) <= now.as_nanos() {
            if until <= now.as_nanos() {
                return; // an old heartbeat: still isolated
            }
            // Rejoining after a gap: invalidations may have been missed.
            // Keep the tier's values out for one more window while other
            // instances flush what they queued during the outage (set
            // first, so no fill from the tier slips in between), then
            // empty the store (and fence fills in flight) before trusting it.
            if self.joined.swap(true, Ordering::AcqRel) {
                self.remote_from
                    .store(now.as_nanos().saturating_add(ttl), Ordering::Release);
            }
            self.log.mark_all();
            self.store.clear();
            self.trusted_until.store(until, Ordering::Release);
        } else {
            self.trusted_until.fetch_max(until, Ordering::AcqRel);
        }
    }

    fn lost(&self) {
        if self.isolation.load(Ordering::Acquire) != 0 {
            self.trusted_until.store(0, Ordering::Release);
        }
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }
}

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
    pub(crate) life: Arc<Life>,
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
            shared.store.get(&key)
        } else {
            shared.stats.incr(Kind::Isolated);
            None
        };
        if let Some(entry) = l1 {
            match shared.lookup(&entry, min_version, now) {
                Lookup::Hit { refresh } => {
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
        shared.stats.incr(Kind::Misses);
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
