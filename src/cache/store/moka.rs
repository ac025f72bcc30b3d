use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::notification::RemovalCause;

use super::{Capacity, Store};
use crate::cache::entry::Entry;
use crate::cache::key::{Hashed, PassThrough};

/// The default L1: `moka::sync::Cache` with the pass-through hasher.
pub struct MokaStore<K, R, E> {
    cache: moka::sync::Cache<Hashed<K>, Arc<Entry<R, E>>, PassThrough>,
    evictions: Arc<AtomicU64>,
}

impl<K, R, E> MokaStore<K, R, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A store bounded by `capacity`.
    pub fn new(capacity: Capacity) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&evictions);
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(capacity.limit())
            .eviction_listener(move |_key, _value, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        if let Capacity::Weight(_) = capacity {
            builder = builder.weigher(|_key, entry: &Arc<Entry<R, E>>| entry.weight);
        }
        Self {
            cache: builder.build_with_hasher(PassThrough),
            evictions,
        }
    }

    /// The moka cache itself.
    pub fn inner(&self) -> &moka::sync::Cache<Hashed<K>, Arc<Entry<R, E>>, PassThrough> {
        &self.cache
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
        self.cache.insert(key, entry);
    }

    fn remove(&self, key: &Hashed<K>) {
        self.cache.invalidate(key);
    }

    fn clear(&self) {
        self.cache.invalidate_all();
    }

    fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}
