use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::{Lifecycle, Weighter};

use super::{Capacity, Store};
use crate::cache::entry::Entry;
use crate::cache::key::{Hashed, PassThrough};

/// Weighs entries by count (1 each) or by the layer's weigher.
#[derive(Clone, Copy, Debug)]
pub(super) struct EntryWeighter {
    by_weight: bool,
}

impl<K, R, E> Weighter<Hashed<K>, Arc<Entry<R, E>>> for EntryWeighter {
    #[inline]
    fn weight(&self, _key: &Hashed<K>, entry: &Arc<Entry<R, E>>) -> u64 {
        if self.by_weight {
            u64::from(entry.weight)
        } else {
            1
        }
    }
}

/// Counts evictions.
#[derive(Clone, Debug, Default)]
pub(super) struct CountEvictions(Arc<AtomicU64>);

impl<K, V> Lifecycle<K, V> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: K, _val: V) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Inner<K, R, E> = quick_cache::sync::Cache<
    Hashed<K>,
    Arc<Entry<R, E>>,
    EntryWeighter,
    PassThrough,
    CountEvictions,
>;

/// An L1 on `quick_cache::sync::Cache` (feature `quick-cache`), with the
/// pass-through hasher.
pub struct QuickStore<K, R, E> {
    cache: Inner<K, R, E>,
    evictions: CountEvictions,
}

impl<K, R, E> QuickStore<K, R, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A store bounded by `capacity`.
    pub fn new(capacity: Capacity) -> Self {
        let evictions = CountEvictions::default();
        let (items, by_weight) = match capacity {
            Capacity::Entries(n) => (n, false),
            // A guess for the table size; quick_cache grows it if needed.
            Capacity::Weight(w) => ((w / 1024).max(64), true),
        };
        let cache = quick_cache::sync::Cache::with(
            usize::try_from(items).unwrap_or(usize::MAX),
            capacity.limit(),
            EntryWeighter { by_weight },
            PassThrough,
            evictions.clone(),
        );
        Self { cache, evictions }
    }
}

impl<K, R, E> fmt::Debug for QuickStore<K, R, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuickStore")
            .field("entries", &self.cache.len())
            .finish()
    }
}

impl<K, R, E> Store for QuickStore<K, R, E>
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
        self.cache.remove(key);
    }

    fn clear(&self) {
        self.cache.clear();
    }

    fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }

    fn evictions(&self) -> u64 {
        self.evictions.0.load(Ordering::Relaxed)
    }

    fn weighted_size(&self) -> u64 {
        self.cache.weight()
    }
}
