//! The in-process (L1) stores behind the cache: synchronous, no boxing.
//!
//! A [`Store`] maps a [`Hashed`] key to a shared [`Entry`]. The key carries
//! its hash, so stores are built with the [`PassThrough`] hasher and never
//! hash a key twice; equality still compares the whole key.
//!
//! - [`MokaStore`] (feature `moka`, the default): `moka::sync::Cache`,
//!   TinyLFU admission, bounded by entries or by weight.
//! - [`QuickStore`] (feature `quick-cache`): sharded `quick_cache`
//!   caches, S3-FIFO-like, a shorter hit path (the entry is lent, not cloned).
//!
//! [`PassThrough`]: super::PassThrough

#[cfg(feature = "moka")]
mod moka;
#[cfg(feature = "quick-cache")]
mod quick;

#[cfg(feature = "moka")]
#[cfg_attr(docsrs, doc(cfg(feature = "moka")))]
pub use self::moka::MokaStore;
#[cfg(feature = "quick-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "quick-cache")))]
pub use self::quick::QuickStore;

use std::hash::Hash;
use std::sync::Arc;

use super::entry::Entry;
use super::key::Hashed;

/// How a store is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Capacity {
    /// At most this many entries.
    Entries(u64),
    /// At most this total weight; each entry weighs what the layer's
    /// weigher says (for example its body size in bytes).
    Weight(u64),
}

impl Capacity {
    /// The bound, whatever it counts.
    pub fn limit(&self) -> u64 {
        match *self {
            Self::Entries(n) | Self::Weight(n) => n,
        }
    }
}

/// A synchronous, concurrent map from keys to shared entries: the L1.
///
/// Every method is called with no lock held by the cache and must not
/// block for long; `get` is on the hit path.
pub trait Store: Send + Sync + 'static {
    /// The policy's key type.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;
    /// The inner service's response type.
    type Response: Clone + Send + Sync + 'static;
    /// The inner service's error type.
    type Error: Clone + Send + Sync + 'static;

    /// The entry for `key`, if present.
    fn get(&self, key: &Hashed<Self::Key>) -> Option<Arc<Entry<Self::Response, Self::Error>>>;

    /// Runs `f` on the entry for `key`, if present, and returns what it
    /// returns: the hit path. A store that can lend the entry under its own
    /// lock (such as [`QuickStore`]) does so, sparing the hit the `Arc`'s
    /// two atomic count updates; `f` must be short and must not call back
    /// into the store. Default: [`get`](Self::get), then `f`.
    #[inline]
    fn with_entry<T>(
        &self,
        key: &Hashed<Self::Key>,
        f: impl FnOnce(&Arc<Entry<Self::Response, Self::Error>>) -> T,
    ) -> Option<T>
    where
        Self: Sized,
    {
        self.get(key).map(|entry| f(&entry))
    }

    /// Stores `entry` under `key`, replacing any previous one.
    fn insert(&self, key: Hashed<Self::Key>, entry: Arc<Entry<Self::Response, Self::Error>>);

    /// Removes the entry for `key`.
    fn remove(&self, key: &Hashed<Self::Key>);

    /// Removes every entry.
    fn clear(&self);

    /// Number of entries (may be approximate).
    fn entry_count(&self) -> u64;

    /// Entries evicted to stay within capacity, since the store was built.
    fn evictions(&self) -> u64;

    /// The stored entries' total weight when the store is bounded by
    /// weight, their number otherwise (may be approximate). Default:
    /// [`entry_count`](Self::entry_count).
    fn weighted_size(&self) -> u64 {
        self.entry_count()
    }

    /// Runs deferred maintenance (eviction, counts) now, for tests and
    /// statistics. Default: nothing to do.
    fn run_pending_tasks(&self) {}
}
