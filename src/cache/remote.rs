//! The remote (L2) tier behind the in-process store: consulted only by the
//! request that leads a miss, written after a fill, told about
//! invalidations. [`crate::cache::redis`] implements it on Redis.
//!
//! The trait is an `async-trait` (boxed futures: it is on the miss path
//! only, never on a hit), so it stays object safe.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::engine::clock::Instant;
use super::{Invalidation, Tag};

/// An entry as the remote tier holds it: the response and what is left of
/// its windows.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RemoteEntry<R> {
    /// The response.
    pub response: R,
    /// How much longer it is fresh.
    pub fresh_for: Duration,
    /// Stale-while-revalidate after that.
    pub stale_while_revalidate: Duration,
    /// Stale-if-error after that.
    pub stale_if_error: Duration,
    /// Its version stamp.
    pub version: Option<u64>,
    /// Its tags.
    pub tags: Vec<Tag>,
}

impl<R> RemoteEntry<R> {
    /// An entry fresh for `fresh_for`, no stale windows, no version, no tags.
    pub fn new(response: R, fresh_for: Duration) -> Self {
        Self {
            response,
            fresh_for,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            version: None,
            tags: Vec::new(),
        }
    }
}

/// The answer to a lease request (distributed single-flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lease {
    /// This instance fills the key; the token must come back with the put.
    Acquired {
        /// The lease token.
        token: u64,
        /// The invalidation epoch when the lease was taken: a put after any
        /// later invalidation is refused.
        epoch: u64,
    },
    /// Another instance is filling it: wait for its value.
    Busy,
    /// The tier is unavailable: fill without it.
    Unavailable,
}

/// A shared tier behind the in-process store (fail-open: every method
/// gives up quietly when the tier is down).
///
/// A tier gets a [`RemoteLink`] when it is attached
/// ([`CacheLayer::attach_remote`](super::CacheLayer::attach_remote)): its
/// way to apply other instances' invalidations, to report its own
/// invalidations as applied, and (optionally) to keep the in-process store
/// trusted only while it hears from its fan-out.
#[async_trait::async_trait]
pub trait RemoteTier<K, R>: Send + Sync + 'static
where
    K: Send + Sync + 'static,
    R: Send + 'static,
{
    /// The entry for `key`, if the tier has a valid one.
    async fn get(&self, key: &K) -> Option<RemoteEntry<R>>;
    /// Stores an entry filled under `lease` (refused if the lease was
    /// cancelled by an invalidation meanwhile).
    async fn put(&self, key: &K, entry: RemoteEntry<R>, lease: Lease);
    /// Takes the fill lease for `key`.
    async fn lease(&self, key: &K) -> Lease;
    /// Gives up a lease without a put (the fill failed or was invalidated),
    /// so other instances stop waiting for it. The default does nothing
    /// (the lease then runs out by itself).
    async fn release(&self, key: &K, lease: Lease) {
        let _ = (key, lease);
    }
    /// Queues an invalidation made on this instance, numbered `seq`, for
    /// the tier and the other instances. It must not block and must not
    /// need a runtime (it is called from synchronous code, possibly outside
    /// tokio). The tier applies queued invalidations in `seq` order, keeps
    /// retrying one that fails, and reports each applied one with
    /// [`RemoteLink::applied`]; until then the cache does not take values
    /// the invalidation touches from the tier.
    /// `version` is the write's version, if it has one.
    fn invalidate(&self, seq: u64, what: Invalidation<K>, version: Option<u64>);
    /// How long a request waits for another instance's fill before it
    /// fills the key itself.
    fn lease_wait(&self) -> Duration {
        Duration::from_secs(2)
    }
}

/// What the cache exposes to the shared tier attached to it (and only to
/// it: [`CacheLayer::attach_remote`](super::CacheLayer::attach_remote)
/// hands out one link per cache).
pub struct RemoteLink<K> {
    pub(crate) target: Arc<dyn LinkTarget<K>>,
}

impl<K> Clone for RemoteLink<K> {
    fn clone(&self) -> Self {
        Self {
            target: Arc::clone(&self.target),
        }
    }
}

impl<K> fmt::Debug for RemoteLink<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RemoteLink")
    }
}

/// The cache side of a [`RemoteLink`].
pub(crate) trait LinkTarget<K>: Send + Sync {
    fn apply_remote(&self, what: Invalidation<K>, version: u64);
    fn applied(&self, seq: u64);
    fn isolate(&self, ttl: Duration);
    fn heard(&self, sent_at: Instant);
    fn lost(&self);
    fn now(&self) -> Instant;
}

impl<K> RemoteLink<K> {
    /// Applies an invalidation another instance made to this instance's
    /// in-process store (it is not sent back to the tier).
    /// `version` is the write's version, if it has one.
    pub fn apply_remote(&self, what: Invalidation<K>, version: Option<u64>) {
        self.target.apply_remote(what, version.unwrap_or(0));
    }

    /// Reports that this instance's invalidations up to `seq` (as given to
    /// [`RemoteTier::invalidate`]) are applied to the tier.
    pub fn applied(&self, seq: u64) {
        self.target.applied(seq);
    }

    /// From now on the in-process store serves hits only while the tier
    /// reports, through [`heard`](Self::heard), heartbeats sent less than
    /// `isolation_ttl` ago. Until the first one it serves none.
    pub fn require_heartbeats(&self, isolation_ttl: Duration) {
        self.target.isolate(isolation_ttl);
    }

    /// A heartbeat this instance sent at `sent_at` (on [`now`](Self::now)'s
    /// clock) came back through the fan-out: every invalidation the tier
    /// had accepted before it has been applied here. The store is trusted
    /// until `sent_at + isolation_ttl`; after a gap it is emptied first.
    pub fn heard(&self, sent_at: Instant) {
        self.target.heard(sent_at);
    }

    /// The fan-out is lost: stop serving from the in-process store now.
    pub fn lost(&self) {
        self.target.lost();
    }

    /// The cache's clock (heartbeats carry it).
    pub fn now(&self) -> Instant {
        self.target.now()
    }
}

/// A cache a shared tier can be attached to: [`CacheLayer`](super::CacheLayer),
/// `HttpCacheLayer` (feature `http`) and `GrpcCacheLayer` (feature `grpc`).
/// Sealed: the methods are
/// the tier's plumbing, not an extension point.
pub trait AttachRemote: sealed::Sealed {
    /// The cache's key type.
    type Key;
    /// The value the cache stores and the tier carries.
    type Response;

    /// Puts `tier` behind the cache's in-process store and returns the
    /// tier's link to the cache; an error if the cache cannot take one (a
    /// tier is attached already, or the cache must not share).
    #[doc(hidden)]
    fn attach_tier(
        &self,
        tier: Arc<dyn RemoteTier<Self::Key, Self::Response>>,
    ) -> Result<RemoteLink<Self::Key>, crate::error::ConfigError>;

    /// Cancelled when the last handle of the cache goes (the tier's tasks
    /// run until then).
    #[doc(hidden)]
    fn closed_token(&self) -> tokio_util::sync::CancellationToken;
}

pub(crate) mod sealed {
    /// Only this crate's caches take a shared tier.
    pub trait Sealed {}
}

/// The state between an in-process store and a shared tier: whether the
/// store may serve (heartbeats), whether the tier's values may be used
/// (rejoin fence), and which of this instance's invalidations the tier has
/// applied. A cache that owns one forwards its [`LinkTarget`] calls here.
///
/// Shared by the core cache and the HTTP cache.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The store serves hits only before this instant (nanos on the
    /// cache's clock): `u64::MAX` without a tier that requires heartbeats,
    /// otherwise the last heartbeat's send time plus the isolation window.
    trusted_until: std::sync::atomic::AtomicU64,
    /// The isolation window in nanos (0: heartbeats not required).
    isolation: std::sync::atomic::AtomicU64,
    /// Values from the tier are not used before this instant: after
    /// rejoining, other instances may still be flushing what they queued.
    remote_from: std::sync::atomic::AtomicU64,
    /// Set by the first heartbeat: later gaps are rejoins.
    joined: std::sync::atomic::AtomicBool,
    /// The highest sequence number of this instance's invalidations queued
    /// for the tier, and the highest the tier reported applied.
    queued: std::sync::atomic::AtomicU64,
    applied: std::sync::atomic::AtomicU64,
    /// `applied`, for those who wait for it ([`Gate::published`]).
    applied_watch: tokio::sync::watch::Sender<u64>,
    /// Orders "mark, then queue for the tier".
    order: std::sync::Mutex<()>,
}

impl Gate {
    pub(crate) fn new() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        Self {
            trusted_until: AtomicU64::new(u64::MAX),
            isolation: AtomicU64::new(0),
            remote_from: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            applied_watch: tokio::sync::watch::Sender::new(0),
            order: std::sync::Mutex::new(()),
        }
    }

    /// Whether the in-process store may serve at `now` (one atomic load).
    #[inline]
    pub(crate) fn trusted_at(&self, now: Instant) -> bool {
        now.as_nanos()
            < self
                .trusted_until
                .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether values from the tier may be used at `now`: not while
    /// isolated after having joined, nor for one window after rejoining.
    pub(crate) fn remote_usable(&self, now: Instant) -> bool {
        use std::sync::atomic::Ordering;
        let isolated = !self.trusted_at(now) && self.joined.load(Ordering::Acquire);
        !isolated && now.as_nanos() >= self.remote_from.load(Ordering::Acquire)
    }

    /// The highest of this instance's invalidations the tier has applied.
    pub(crate) fn applied_seq(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether invalidations queued after `applied` are still pending.
    pub(crate) fn pending_after(&self, applied: u64) -> bool {
        self.queued.load(std::sync::atomic::Ordering::Acquire) > applied
    }

    /// Holds the "mark, then queue" order.
    pub(crate) fn order(&self) -> std::sync::MutexGuard<'_, ()> {
        crate::sync::lock(&self.order)
    }

    /// This instance's invalidation `seq` is queued for the tier.
    pub(crate) fn queued(&self, seq: u64) {
        self.queued
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
    }

    /// The tier applied this instance's invalidations up to `seq`.
    pub(crate) fn applied(&self, seq: u64) {
        self.applied
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
        self.applied_watch.send_if_modified(|a| {
            let raised = seq > *a;
            *a = (*a).max(seq);
            raised
        });
    }

    /// How many of this instance's invalidations the tier has not applied.
    #[cfg_attr(not(feature = "change-feed"), allow(dead_code))]
    pub(crate) fn backlog(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.queued
            .load(Ordering::Acquire)
            .saturating_sub(self.applied.load(Ordering::Acquire))
    }

    /// Waits until the tier applied every invalidation queued before the
    /// call, for at most `within`; true if it did.
    pub(crate) fn published(
        &self,
        within: Duration,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let target = self.queued.load(std::sync::atomic::Ordering::Acquire);
        let mut applied = self.applied_watch.subscribe();
        async move {
            tokio::time::timeout(within, applied.wait_for(|a| *a >= target))
                .await
                .is_ok_and(|r| r.is_ok())
        }
    }

    /// From now on the store serves only while heartbeats come back.
    pub(crate) fn isolate(&self, ttl: Duration) {
        use std::sync::atomic::Ordering;
        let nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        self.isolation.store(nanos.max(1), Ordering::Release);
        self.trusted_until.store(0, Ordering::Release);
    }

    /// A heartbeat sent at `sent_at` came back at `now`. After a gap,
    /// `reset` runs (empty the store, fence fills in flight) before the
    /// store is trusted again.
    pub(crate) fn heard(&self, sent_at: Instant, now: Instant, reset: impl FnOnce()) {
        use std::sync::atomic::Ordering;
        let ttl = self.isolation.load(Ordering::Acquire);
        if ttl == 0 {
            return;
        }
        // A heartbeat cannot have been sent in the future.
        let until = sent_at.min(now).as_nanos().saturating_add(ttl);
        if self.trusted_until.load(Ordering::Acquire) <= now.as_nanos() {
            if until <= now.as_nanos() {
                return; // an old heartbeat: still isolated
            }
            // Rejoining after a gap: keep the tier's values out for one
            // more window (set first), then reset before trusting.
            if self.joined.swap(true, Ordering::AcqRel) {
                self.remote_from
                    .store(now.as_nanos().saturating_add(ttl), Ordering::Release);
            }
            reset();
            self.trusted_until.store(until, Ordering::Release);
        } else {
            self.trusted_until.fetch_max(until, Ordering::AcqRel);
        }
    }

    /// The fan-out is lost: stop serving from the store now.
    pub(crate) fn lost(&self) {
        use std::sync::atomic::Ordering;
        if self.isolation.load(Ordering::Acquire) != 0 {
            self.trusted_until.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn the_gate_trusts_the_store_only_between_heartbeats() {
        let gate = Gate::new();
        assert!(gate.trusted_at(at(0)), "no tier: always trusted");
        gate.isolate(Duration::from_millis(100));
        assert!(!gate.trusted_at(at(0)), "until the first heartbeat");
        assert!(gate.remote_usable(at(0)), "the tier is, before joining");
        let mut resets = 0;
        gate.heard(at(10), at(20), || resets += 1);
        assert_eq!(resets, 1, "the store is emptied before it is trusted");
        assert!(gate.trusted_at(at(109)));
        assert!(!gate.trusted_at(at(110)), "sent_at + ttl");
        // A heartbeat from the future counts from now.
        gate.heard(at(500), at(50), || resets += 1);
        assert!(gate.trusted_at(at(149)) && !gate.trusted_at(at(150)));
        assert_eq!(resets, 1, "no gap: no reset");
        gate.lost();
        assert!(!gate.trusted_at(at(60)));
        assert!(!gate.remote_usable(at(60)), "isolated after joining");
        // An old heartbeat does not end the isolation.
        gate.heard(at(0), at(200), || resets += 1);
        assert!(!gate.trusted_at(at(200)));
        // Rejoining: reset, and the tier's values wait one more window.
        gate.heard(at(195), at(200), || resets += 1);
        assert_eq!(resets, 2);
        assert!(gate.trusted_at(at(200)));
        gate.heard(at(290), at(294), || resets += 1);
        assert_eq!(resets, 2);
        assert!(!gate.remote_usable(at(299)));
        assert!(gate.remote_usable(at(300)));
    }

    #[test]
    fn the_gate_tracks_pending_invalidations() {
        let gate = Gate::new();
        assert!(!gate.pending_after(gate.applied_seq()));
        gate.queued(3);
        assert!(gate.pending_after(gate.applied_seq()));
        gate.applied(2);
        assert!(gate.pending_after(gate.applied_seq()));
        gate.applied(3);
        gate.applied(1); // never goes back
        assert_eq!(gate.applied_seq(), 3);
        assert!(!gate.pending_after(3));
    }
}
