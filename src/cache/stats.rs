//! Cache statistics: striped atomic counters that cost one uncontended
//! atomic add on the hit path, readable in-process and exported through the
//! `metrics` facade.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

const STRIPES: usize = 16;

/// A counter split over cache lines so threads do not fight over one.
pub(crate) struct Counter {
    stripes: Box<[CachePadded<AtomicU64>]>,
}

impl Counter {
    fn new() -> Self {
        Self {
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
        }
    }

    #[inline]
    pub(crate) fn incr(&self) {
        self.add(1);
    }

    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.stripes[stripe()].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.stripes.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

#[inline]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        s.set(v);
        v
    })
}

pub(crate) struct Stats {
    pub(crate) hits: Counter,
    pub(crate) stale_hits: Counter,
    pub(crate) stale_if_error: Counter,
    pub(crate) misses: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) refreshes: Counter,
    pub(crate) early_refreshes: Counter,
    pub(crate) inner_errors: Counter,
    pub(crate) stored: Counter,
    pub(crate) not_stored: Counter,
    pub(crate) invalidations: Counter,
    pub(crate) bypasses: Counter,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            hits: Counter::new(),
            stale_hits: Counter::new(),
            stale_if_error: Counter::new(),
            misses: Counter::new(),
            coalesced: Counter::new(),
            refreshes: Counter::new(),
            early_refreshes: Counter::new(),
            inner_errors: Counter::new(),
            stored: Counter::new(),
            not_stored: Counter::new(),
            invalidations: Counter::new(),
            bypasses: Counter::new(),
        }
    }

    pub(crate) fn snapshot(&self, evictions: u64, entries: u64) -> CacheStats {
        CacheStats {
            hits: self.hits.get(),
            stale_hits: self.stale_hits.get(),
            stale_if_error: self.stale_if_error.get(),
            misses: self.misses.get(),
            coalesced: self.coalesced.get(),
            refreshes: self.refreshes.get(),
            early_refreshes: self.early_refreshes.get(),
            inner_errors: self.inner_errors.get(),
            stored: self.stored.get(),
            not_stored: self.not_stored.get(),
            invalidations: self.invalidations.get(),
            bypasses: self.bypasses.get(),
            evictions,
            entries,
        }
    }
}

/// A snapshot of a cache's counters (all since the cache was built).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests answered from a fresh entry.
    pub hits: u64,
    /// Requests answered from a stale entry inside its stale-while-revalidate window.
    pub stale_hits: u64,
    /// Requests answered from a stale entry because the inner service failed
    /// (stale-if-error).
    pub stale_if_error: u64,
    /// Requests that found no usable entry (including the coalesced ones).
    pub misses: u64,
    /// Misses that waited for another request's inner call instead of making their own.
    pub coalesced: u64,
    /// Background refreshes started (stale-while-revalidate and early refresh).
    pub refreshes: u64,
    /// Of `refreshes`, those started early by the probabilistic (XFetch) rule.
    pub early_refreshes: u64,
    /// Inner calls that returned an error.
    pub inner_errors: u64,
    /// Fills stored.
    pub stored: u64,
    /// Fills returned to their callers but not stored, because an
    /// invalidation happened during the fill or their version was older than
    /// the last invalidation of their key or tags.
    pub not_stored: u64,
    /// Invalidations (by key, tag or all).
    pub invalidations: u64,
    /// Requests the policy sent around the cache.
    pub bypasses: u64,
    /// Entries the store evicted to stay within its capacity.
    pub evictions: u64,
    /// Entries in the store now (approximate for moka).
    pub entries: u64,
}

impl CacheStats {
    /// Records these figures in the [`metrics`] facade as absolute counters
    /// (`tower_scale_cache_hits_total`, `tower_scale_cache_misses_total`, ...)
    /// labelled `cache = name`, and `tower_scale_cache_entries` as a gauge.
    ///
    /// Call it before rendering an exporter (for example in a `/metrics`
    /// handler): the hit path only touches the striped counters.
    pub fn record_metrics(&self, name: &str) {
        let name = name.to_string();
        let counters: [(&'static str, u64); 13] = [
            ("tower_scale_cache_hits_total", self.hits),
            ("tower_scale_cache_stale_hits_total", self.stale_hits),
            (
                "tower_scale_cache_stale_if_error_total",
                self.stale_if_error,
            ),
            ("tower_scale_cache_misses_total", self.misses),
            ("tower_scale_cache_coalesced_total", self.coalesced),
            ("tower_scale_cache_refreshes_total", self.refreshes),
            (
                "tower_scale_cache_early_refreshes_total",
                self.early_refreshes,
            ),
            ("tower_scale_cache_inner_errors_total", self.inner_errors),
            ("tower_scale_cache_stored_total", self.stored),
            ("tower_scale_cache_not_stored_total", self.not_stored),
            ("tower_scale_cache_invalidations_total", self.invalidations),
            ("tower_scale_cache_bypasses_total", self.bypasses),
            ("tower_scale_cache_evictions_total", self.evictions),
        ];
        for (metric, value) in counters {
            metrics::counter!(metric, "cache" => name.clone()).absolute(value);
        }
        metrics::gauge!("tower_scale_cache_entries", "cache" => name).set(self.entries as f64);
    }
}
