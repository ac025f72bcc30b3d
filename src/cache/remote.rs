//! The remote (L2) tier behind the in-process store: consulted only by the
//! request that leads a miss, written after a fill, told about
//! invalidations. [`crate::cache::redis`] implements it on Redis.
//!
//! The trait returns boxed futures (it is on the miss path only, never on
//! a hit), so it needs no `async-trait` and stays object safe.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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
pub trait RemoteTier<K, R>: Send + Sync + 'static {
    /// The entry for `key`, if the tier has a valid one.
    fn get<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Option<RemoteEntry<R>>>;
    /// Stores an entry filled under `lease` (refused if the lease was
    /// cancelled by an invalidation meanwhile).
    fn put<'a>(&'a self, key: &'a K, entry: RemoteEntry<R>, lease: Lease) -> BoxFuture<'a, ()>;
    /// Takes the fill lease for `key`.
    fn lease<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Lease>;
    /// Applies an invalidation to the tier and tells the other instances.
    fn invalidate<'a>(&'a self, what: &'a Invalidation<K>, version: u64) -> BoxFuture<'a, ()>;
    /// How long a request waits for another instance's fill before it
    /// fills the key itself.
    fn lease_wait(&self) -> Duration {
        Duration::from_secs(2)
    }
}
