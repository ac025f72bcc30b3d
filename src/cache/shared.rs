//! The state every clone of one cache shares, and the engine's steps on
//! it: lookup with its windows and early refresh, fills from the service and
//! from the shared tier, storing under the invalidation rules, invalidation
//! and the shared tier's link.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::CacheStats;
use super::Invalidation;
use super::engine::clock::{Clock, Instant, nanos};
use super::engine::flight::Flights;
use super::engine::hot::{HotKey, HotKeys};
use super::engine::log::{InvalidateTarget, InvalidationLog};
use super::engine::stats::{Kind, Stats};
use super::entry::{Deadlines, Entry, Freshness};
use super::key::Hashed;
use super::policy::{CachePolicy, Storable, Windows};
use super::remote::{Gate, Lease, LinkTarget, RemoteEntry, RemoteTier};
use super::store::Store;

/// Past this many "recompute times × beta" before expiry the XFetch
/// probability is below e^-20 (about 2e-9): the hit path skips the dice.
pub(super) const XFETCH_CUTOFF: f64 = 20.0;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) windows: Windows,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) early_refresh: Option<f64>,
    pub(crate) ttl_jitter: f64,
}

pub(crate) type Weigh<R> = Box<dyn Fn(&R) -> u32 + Send + Sync>;

/// The state every clone of one cache shares.
pub(crate) struct Shared<P, St: Store> {
    pub(crate) policy: P,
    pub(crate) store: St,
    pub(crate) config: Config,
    pub(super) weigher: Option<Weigh<St::Response>>,
    pub(super) clock: Clock,
    pub(super) log: InvalidationLog<St::Key>,
    pub(super) flights: Arc<Flights<St::Key, St::Response, St::Error>>,
    pub(super) stats: Stats,
    /// Which keys are read most (sampled; off unless configured).
    pub(crate) hot: HotKeys<St::Key>,
    pub(super) rng: crate::random::Random,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the last layer or service handle goes (the parent of
    /// `shutdown`): the shared tier's tasks run until then, so an explicit
    /// `shutdown()` stops refreshes but not the invalidation fan-out.
    pub(crate) closed: CancellationToken,
    /// The shared tier, attached after build.
    pub(crate) remote: OnceLock<Arc<dyn RemoteTier<St::Key, St::Response>>>,
    /// Whether the in-process store and the tier's values may serve (the
    /// heartbeat/isolation state), and the order of this instance's
    /// invalidations for the tier.
    pub(super) gate: Gate,
}

/// What a lookup found.
pub(super) enum Lookup {
    /// Serve it; `refresh` says this request must start the background
    /// refresh; `count` is the thread's count of such hits (for the
    /// hot-key sampler).
    Hit { refresh: bool, count: u64 },
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
        hot: HotKeys<St::Key>,
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
            hot,
            rng: crate::random::Random::new(seed),
            shutdown: closed.child_token(),
            closed,
            remote: OnceLock::new(),
            gate: Gate::new(),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
            .snapshot(self.store.evictions(), self.store.entry_count())
    }

    /// The `k` hottest keys, hottest first (empty when hot keys are not
    /// tracked); also refreshes the hot-key gauges of a named cache.
    pub(crate) fn hot_keys(&self, k: usize) -> Vec<HotKey<St::Key>> {
        let mut top = self
            .hot
            .top(k.max(super::engine::hot::METRIC_RANKS), self.clock.now());
        self.hot.publish(&top);
        top.truncate(k);
        top
    }

    /// A uniform number in (0, 1] from the seeded stream.
    pub(super) fn next_random(&self) -> f64 {
        self.rng.next_unit()
    }

    /// Whether the in-process store may serve at `now` (one atomic load;
    /// read before the store, so a heartbeat that extended the trust also
    /// shows the invalidations applied before it).
    #[inline]
    pub(crate) fn trusted_at(&self, now: Instant) -> bool {
        self.gate.trusted_at(now)
    }

    /// The hit path's first look, run on the entry while the store lends
    /// it: the response when the entry is valid without a look at the log
    /// (nothing invalidated since it was last checked), stamped for the
    /// request's minimum version, and fresh short of its early-refresh point
    /// (which is never after its TTL). `None` sends the request through
    /// [`lookup`](Self::lookup), which decides everything else; where this
    /// answers, `lookup` would have answered a hit without refresh too.
    #[inline]
    pub(super) fn fast_hit(
        &self,
        entry: &Entry<St::Response, St::Error>,
        min_version: Option<u64>,
        now: Instant,
    ) -> Option<Result<St::Response, St::Error>> {
        let usable = now < entry.early_from
            && self.log.validated(entry)
            && min_version.is_none_or(|min| entry.version().is_some_and(|v| v >= min));
        usable.then(|| entry.result.clone())
    }

    #[inline]
    pub(super) fn lookup(
        &self,
        entry: &Entry<St::Response, St::Error>,
        min_version: Option<u64>,
        now: Instant,
    ) -> Lookup {
        if !self.log.still_valid(entry) {
            return Lookup::Dead;
        }
        if let Some(min) = min_version
            && entry.version().is_none_or(|v| v < min)
        {
            return Lookup::Skip;
        }
        match entry.freshness(now) {
            Freshness::Fresh => {
                let count = self.stats.incr(Kind::Hits);
                Lookup::Hit {
                    refresh: self.early_refresh_due(entry, now),
                    count,
                }
            }
            Freshness::Stale => {
                let count = self.stats.incr(Kind::StaleHits);
                Lookup::Hit {
                    refresh: entry.claim_refresh(),
                    count,
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
    pub(super) fn early_refresh_due(
        &self,
        entry: &Entry<St::Response, St::Error>,
        now: Instant,
    ) -> bool {
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
        let scale = entry.recompute().as_secs_f64() * beta;
        self.early_refresh_roll(entry, remaining, scale)
    }

    #[cold]
    pub(super) fn early_refresh_roll(
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
    pub(super) fn fresh_entry(
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
            && min_version.is_none_or(|min| entry.version().is_some_and(|v| v >= min))
            && entry.freshness(now) == Freshness::Fresh;
        usable.then_some(entry)
    }

    /// An entry from the shared tier, stored in L1 (unless an invalidation
    /// since `fill_seq`, or at a higher version, keeps it out) and returned.
    pub(super) async fn fill_from_remote(
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
        if !self.gate.remote_usable(now) {
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        // Read before the round trip: what was applied by then is in the
        // tier's answer; anything later may not be.
        let applied = self.gate.applied_seq();
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
    pub(super) fn or_fallback(
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
    pub(super) async fn finish_remote(
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
    pub(super) fn remote_pending_touches(
        &self,
        key: &Hashed<St::Key>,
        tags: &[super::Tag],
        applied: u64,
    ) -> bool {
        self.gate.pending_after(applied) && self.log.newest_touching(key, tags) > applied
    }

    /// Whether the store holds a good response for `key` that a window may
    /// still serve (stale-while-revalidate or stale-if-error): a cached
    /// error must not replace it.
    pub(super) fn has_servable_stale(&self, key: &Hashed<St::Key>) -> bool {
        let now = self.clock.now();
        self.store.get(key).is_some_and(|entry| {
            entry.result.is_ok()
                && now < entry.stale_until.max(entry.error_until)
                && self.log.still_valid(&entry)
        })
    }

    /// Calls the inner service (after its readiness) and stores the result
    /// if the policy and the invalidation log allow.
    pub(super) async fn fill<S, Req>(
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
        let mut req = req;
        if self.hot.is_hot(key, started) {
            self.policy.on_hot_miss(key.key(), &mut req);
        }
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

    pub(super) fn store_fill(
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
            // No early refresh: the point is the TTL itself (never later,
            // so `now < early_from` alone says fresh on the hit path).
            _ => fresh_until,
        };
        let at = Deadlines {
            stored_at: now,
            early_from,
            fresh_until,
            stale_until: fresh_until + windows.stale_while_revalidate,
            error_until: fresh_until + windows.stale_if_error,
        };
        let entry = Arc::new(Entry::new(
            result,
            at,
            fill_seq,
            recompute,
            version,
            tags.into_boxed_slice(),
            weight,
        ));
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
    pub(super) fn apply_local(&self, what: Invalidation<St::Key>, version: u64) -> u64 {
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
                let seq = self.log.mark_all(version);
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
        let _order = self.gate.order();
        let seq = self.apply_local(what.clone(), version);
        self.gate.queued(seq);
        tier.invalidate(seq, what, (version != 0).then_some(version));
    }
    fn shared_gate(&self) -> Option<&super::remote::Gate> {
        self.remote.get().map(|_| &self.gate)
    }
}

impl<P, St> LinkTarget<St::Key> for Shared<P, St>
where
    P: Send + Sync + 'static,
    St: Store,
{
    fn apply_remote(&self, what: Invalidation<St::Key>, version: u64) {
        self.stats
            .incr_rare(crate::cache::engine::stats::Rare::RemoteInvalidations);
        self.apply_local(what, version);
    }

    fn applied(&self, seq: u64) {
        self.gate.applied(seq);
    }

    fn isolate(&self, ttl: Duration) {
        self.gate.isolate(ttl);
    }

    fn heard(&self, sent_at: Instant) {
        // After a gap, invalidations may have been missed: empty the store
        // (and fence fills in flight) before trusting it again.
        self.gate.heard(sent_at, self.clock.now(), || {
            self.log.mark_all(0);
            self.store.clear();
        });
    }

    fn lost(&self) {
        self.gate.lost();
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }
}
