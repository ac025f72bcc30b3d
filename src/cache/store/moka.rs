use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Capacity, Store};
use crate::cache::entry::Entry;
use crate::cache::key::{Hashed, PassThrough};

/// The default L1: `moka::sync::Cache` with the pass-through hasher.
///
/// Evictions are counted without an eviction listener (a listener costs
/// moka about 30 ns on every read here): they are the entries inserted
/// that were neither replaced, removed nor are still present, which is
/// exact once [`Store::run_pending_tasks`] has run and approximate between.
pub struct MokaStore<K, R, E> {
    cache: moka::sync::Cache<Hashed<K>, Arc<Entry<R, E>>, PassThrough>,
    inserted: AtomicU64,
    gone: AtomicU64,
}

impl<K, R, E> MokaStore<K, R, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A store bounded by `capacity`.
    pub fn new(capacity: Capacity) -> Self {
        let mut builder = moka::sync::Cache::builder().max_capacity(capacity.limit());
        if let Capacity::Weight(_) = capacity {
            builder = builder.weigher(|_key, entry: &Arc<Entry<R, E>>| entry.weight);
        }
        Self {
            cache: builder.build_with_hasher(PassThrough),
            inserted: AtomicU64::new(0),
            gone: AtomicU64::new(0),
        }
    }

    /// Calls `f` on every stored entry (a walk of the whole store, for the
    /// HTTP cache's purge counts).
    #[cfg(feature = "http")]
    pub(crate) fn for_each_entry(&self, mut f: impl FnMut(&Hashed<K>, &Arc<Entry<R, E>>)) {
        for (key, entry) in self.cache.iter() {
            f(&key, &entry);
        }
    }
}

impl<K, R, E> fmt::Debug for MokaStore<K, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaStore")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl<K, R, E> Store for MokaStore<K, R, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    type Key = K;
    type Response = R;
    type Error = E;

    #[inline]
    fn get(&self, key: &Hashed<K>) -> Option<Arc<Entry<R, E>>> {
        self.cache.get(key)
    }

    fn insert(&self, key: Hashed<K>, entry: Arc<Entry<R, E>>) {
        if self.cache.contains_key(&key) {
            self.gone.fetch_add(1, Ordering::Relaxed); // replaced, not evicted
        }
        self.inserted.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(key, entry);
    }

    fn remove(&self, key: &Hashed<K>) {
        if self.cache.remove(key).is_some() {
            self.gone.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        self.cache.run_pending_tasks();
        self.gone
            .fetch_add(self.cache.entry_count(), Ordering::Relaxed);
        self.cache.invalidate_all();
    }

    fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    fn evictions(&self) -> u64 {
        let inserted = self.inserted.load(Ordering::Relaxed);
        let gone = self.gone.load(Ordering::Relaxed);
        inserted
            .saturating_sub(gone)
            .saturating_sub(self.cache.entry_count())
    }

    fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}
