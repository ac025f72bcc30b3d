use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

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

/// Counts evictions, and hands the evicted values back so they are dropped
/// after the shard's lock is released (a response's `Drop` is user code).
#[derive(Clone, Debug, Default)]
pub(super) struct CountEvictions(Arc<AtomicU64>);

impl<K, V> Lifecycle<K, V> for CountEvictions {
    type RequestState = Vec<V>;

    fn on_evict(&self, state: &mut Vec<V>, _key: K, val: V) {
        // Counted by the insert that evicted it (a replacement comes
        // through here too and is not an eviction).
        state.push(val);
    }
}

type Shard<K, R, E> = quick_cache::unsync::Cache<
    Hashed<K>,
    Arc<Entry<R, E>>,
    EntryWeighter,
    PassThrough,
    CountEvictions,
>;

/// At least this many items per shard (quick_cache's own rule).
const MIN_SHARD_ITEMS: u64 = 32;

/// An L1 on quick_cache (feature `quick-cache`), with the pass-through
/// hasher.
///
/// The shards are `quick_cache::unsync::Cache`s behind read-write locks,
/// sharded the way `quick_cache::sync::Cache` shards, rather than the sync
/// cache itself: the sync cache's `get` clones the value under its lock,
/// which for an `Arc<Entry>` is an atomic increment and, when the hit is
/// done, an atomic decrement. [`Store::with_entry`] here lends the entry
/// under the shard's read lock instead, so a hit clones only the response.
pub struct QuickStore<K, R, E> {
    shards: Box<[RwLock<Shard<K, R, E>>]>,
    mask: u64,
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
        let weight = capacity.limit();
        // As `quick_cache::sync::Cache` does: four shards per core, fewer
        // when a shard would hold under 32 items.
        let parallelism = std::thread::available_parallelism().map_or(1, usize::from);
        let mut shards = u64::try_from(parallelism.saturating_mul(4))
            .unwrap_or(u64::MAX)
            .checked_next_power_of_two()
            .unwrap_or(1 << 16);
        let per_shard = |total: u64, shards: u64| total.saturating_add(shards - 1) / shards;
        while per_shard(items, shards) < MIN_SHARD_ITEMS && shards > 1 {
            shards /= 2;
        }
        let (shard_items, shard_weight) = (per_shard(items, shards), per_shard(weight, shards));
        let shards = (0..shards)
            .map(|_| {
                let mut options = OptionsBuilder::new();
                options
                    .estimated_items_capacity(usize::try_from(shard_items).unwrap_or(usize::MAX))
                    .weight_capacity(shard_weight);
                // Both settings are in range, so the options always build;
                // `with` takes the same path.
                let shard = match options.build() {
                    Ok(options) => Shard::with_options(
                        options,
                        EntryWeighter { by_weight },
                        PassThrough,
                        evictions.clone(),
                    ),
                    Err(_) => Shard::with(
                        usize::try_from(shard_items).unwrap_or(usize::MAX),
                        shard_weight,
                        EntryWeighter { by_weight },
                        PassThrough,
                        evictions.clone(),
                    ),
                };
                RwLock::new(shard)
            })
            .collect::<Box<[_]>>();
        Self {
            mask: shards.len() as u64 - 1,
            shards,
            evictions,
        }
    }

    /// Calls `f` on every stored entry, one shard's read lock at a time
    /// (a walk of the whole store, for the HTTP cache's purge counts); `f`
    /// must not call back into the store.
    #[cfg(feature = "http")]
    pub(crate) fn for_each_entry(&self, mut f: impl FnMut(&Hashed<K>, &Arc<Entry<R, E>>)) {
        for shard in self.shards.iter() {
            for (key, entry) in crate::sync::read(shard).iter() {
                f(key, entry);
            }
        }
    }

    fn shard(&self, key: &Hashed<K>) -> &RwLock<Shard<K, R, E>> {
        // The middle bits, as quick_cache does: hashbrown probes with the
        // low and the top seven.
        let index = key.hash_value().rotate_right(usize::BITS / 2) & self.mask;
        &self.shards[usize::try_from(index).unwrap_or(0)]
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
            .field("entries", &self.entry_count())
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
        crate::sync::read(self.shard(key)).get(key).cloned()
    }

    #[inline]
    fn with_entry<T>(&self, key: &Hashed<K>, f: impl FnOnce(&Arc<Entry<R, E>>) -> T) -> Option<T> {
        crate::sync::read(self.shard(key)).get(key).map(f)
    }

    fn insert(&self, key: Hashed<K>, entry: Arc<Entry<R, E>>) {
        let mut evicted = Vec::new();
        {
            let mut shard = crate::sync::write(self.shard(&key));
            // quick_cache hands a replaced value to `on_evict` too (keeping
            // the key's place in its queues): a replacement is not an
            // eviction, so it is taken back off the count.
            let replacing = shard.contains_key(&key);
            shard.insert_with_lifecycle(key, entry, &mut evicted);
            let n = evicted.len() - usize::from(replacing && !evicted.is_empty());
            self.evictions.0.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Dropped here, after the lock: a response's `Drop` is user code.
        drop(evicted);
    }

    fn remove(&self, key: &Hashed<K>) {
        // The removed entry is dropped after the lock is released.
        let removed = crate::sync::write(self.shard(key)).remove(key);
        drop(removed);
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            // Taken out under the lock, dropped after it.
            let taken: Vec<_> = crate::sync::write(shard).drain().collect();
            drop(taken);
        }
    }

    fn entry_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| crate::sync::read(s).len() as u64)
            .sum()
    }

    fn evictions(&self) -> u64 {
        self.evictions.0.load(Ordering::Relaxed)
    }

    fn weighted_size(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| crate::sync::read(s).weight())
            .sum()
    }
}
