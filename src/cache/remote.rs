//! The remote (L2) tier behind the in-process store: consulted only by the
//! request that leads a miss, written after a fill, told about
//! invalidations. [`crate::cache::redis`] implements it on Redis.
//!
//! The trait returns boxed futures (it is on the miss path only, never on
//! a hit), so it needs no `async-trait` and stays object safe.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::clock::Instant;
use super::invalidate::{Invalidation, Tag};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
pub trait RemoteTier<K, R>: Send + Sync + 'static {
    /// The entry for `key`, if the tier has a valid one.
    fn get<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Option<RemoteEntry<R>>>;
    /// Stores an entry filled under `lease` (refused if the lease was
    /// cancelled by an invalidation meanwhile).
    fn put<'a>(&'a self, key: &'a K, entry: RemoteEntry<R>, lease: Lease) -> BoxFuture<'a, ()>;
    /// Takes the fill lease for `key`.
    fn lease<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Lease>;
    /// Gives up a lease without a put (the fill failed or was invalidated),
    /// so other instances stop waiting for it. The default does nothing
    /// (the lease then runs out by itself).
    fn release<'a>(&'a self, key: &'a K, lease: Lease) -> BoxFuture<'a, ()> {
        let _ = (key, lease);
        Box::pin(std::future::ready(()))
    }
    /// Queues an invalidation made on this instance, numbered `seq`, for
    /// the tier and the other instances. It must not block and must not
    /// need a runtime (it is called from synchronous code, possibly outside
    /// tokio). The tier applies queued invalidations in `seq` order, keeps
    /// retrying one that fails, and reports each applied one with
    /// [`RemoteLink::applied`]; until then the cache does not take values
    /// the invalidation touches from the tier.
    fn invalidate(&self, seq: u64, what: Invalidation<K>, version: u64);
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
    pub fn apply_remote(&self, what: Invalidation<K>, version: u64) {
        self.target.apply_remote(what, version);
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
