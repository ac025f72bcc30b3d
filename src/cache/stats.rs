//! [`CacheStats`]: a snapshot of a cache's counters, summable, and their
//! export through the `metrics` facade.

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
    /// Requests answered from a stale entry because the origin could not
    /// be reached (the HTTP cache's RFC 9111 §4.2.4 rule: an inner service
    /// error, or a response marked `http::UpstreamUnreachable`); those
    /// served under `stale-if-error` count in `stale_if_error` instead.
    pub stale_if_unreachable: u64,
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
    /// Misses answered by the shared (L2) tier.
    pub remote_hits: u64,
    /// Values the shared tier returned but that were not used, because an
    /// invalidation made on this instance that touches them had not been
    /// applied to the tier yet (or the tier was just rejoined after an
    /// outage).
    pub remote_fenced: u64,
    /// Requests that skipped the in-process store because this instance
    /// had not heard from the shared tier's invalidation fan-out within its
    /// isolation window.
    pub isolated: u64,
    /// Invalidations made on other instances and applied to this
    /// instance's store through the shared tier's fan-out (a purge of N
    /// tags or URLs elsewhere arrives as N); also counted in
    /// `invalidations`.
    pub remote_invalidations: u64,
    /// Purges taken on this instance (the HTTP cache's `purge` calls, its
    /// purge route's included; always 0 for other caches). Each is applied
    /// here at once and counted in `invalidations` per tag or URL.
    pub purges: u64,
    /// Purge requests the HTTP cache's purge route refused for want of a
    /// valid bearer token (`401`); always 0 for other caches.
    pub purges_refused: u64,
    /// Entries the store evicted to stay within its capacity.
    pub evictions: u64,
    /// Entries in the store now (approximate for moka).
    pub entries: u64,
}

/// Adds two snapshots field by field (every counter and `entries`),
/// saturating at `u64::MAX`: the figures of several caches as one, for
/// example the caches of several layers reported under one name.
///
/// ```
/// use tower_scale::cache::CacheStats;
///
/// let mut total = CacheStats::default();
/// total += CacheStats::default();
/// assert_eq!(total + CacheStats::default(), CacheStats::default());
/// ```
impl std::ops::Add for CacheStats {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        // A struct literal names every field: one added later and missing
        // here fails to compile.
        Self {
            hits: self.hits.saturating_add(other.hits),
            stale_hits: self.stale_hits.saturating_add(other.stale_hits),
            stale_if_error: self.stale_if_error.saturating_add(other.stale_if_error),
            stale_if_unreachable: self
                .stale_if_unreachable
                .saturating_add(other.stale_if_unreachable),
            misses: self.misses.saturating_add(other.misses),
            coalesced: self.coalesced.saturating_add(other.coalesced),
            refreshes: self.refreshes.saturating_add(other.refreshes),
            early_refreshes: self.early_refreshes.saturating_add(other.early_refreshes),
            inner_errors: self.inner_errors.saturating_add(other.inner_errors),
            stored: self.stored.saturating_add(other.stored),
            not_stored: self.not_stored.saturating_add(other.not_stored),
            invalidations: self.invalidations.saturating_add(other.invalidations),
            bypasses: self.bypasses.saturating_add(other.bypasses),
            remote_hits: self.remote_hits.saturating_add(other.remote_hits),
            remote_fenced: self.remote_fenced.saturating_add(other.remote_fenced),
            isolated: self.isolated.saturating_add(other.isolated),
            remote_invalidations: self
                .remote_invalidations
                .saturating_add(other.remote_invalidations),
            purges: self.purges.saturating_add(other.purges),
            purges_refused: self.purges_refused.saturating_add(other.purges_refused),
            evictions: self.evictions.saturating_add(other.evictions),
            entries: self.entries.saturating_add(other.entries),
        }
    }
}

impl std::ops::AddAssign for CacheStats {
    fn add_assign(&mut self, other: Self) {
        *self = *self + other;
    }
}

impl std::iter::Sum for CacheStats {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
    }
}

impl CacheStats {
    /// Every counter with its metric name.
    fn counters(&self) -> [(&'static str, u64); 20] {
        [
            ("tower_scale_cache_hits_total", self.hits),
            ("tower_scale_cache_stale_hits_total", self.stale_hits),
            (
                "tower_scale_cache_stale_if_error_total",
                self.stale_if_error,
            ),
            (
                "tower_scale_cache_stale_if_unreachable_total",
                self.stale_if_unreachable,
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
            ("tower_scale_cache_l2_hits_total", self.remote_hits),
            ("tower_scale_cache_l2_fenced_total", self.remote_fenced),
            ("tower_scale_cache_isolated_total", self.isolated),
            (
                "tower_scale_cache_remote_invalidations_total",
                self.remote_invalidations,
            ),
            ("tower_scale_cache_purges_total", self.purges),
            (
                "tower_scale_cache_purges_refused_total",
                self.purges_refused,
            ),
            ("tower_scale_cache_evictions_total", self.evictions),
        ]
    }

    /// Records these figures in the [`metrics`] facade as absolute counters
    /// (`tower_scale_cache_hits_total`, `tower_scale_cache_misses_total`, ...)
    /// labelled `cache = name`, and `tower_scale_cache_entries` as a gauge.
    ///
    /// Call it before rendering an exporter (for example in a `/metrics`
    /// handler): the hit path only touches the striped counters.
    pub fn record_metrics(&self, name: &str) {
        let name = name.to_string();
        for (metric, value) in self.counters() {
            metrics::counter!(metric, "cache" => name.clone()).absolute(value);
        }
        metrics::gauge!("tower_scale_cache_entries", "cache" => name).set(self.entries as f64);
    }

    /// Records what changed since `before` as increments, so caches that
    /// share a name add up (and a cache rebuilt under the same name carries
    /// the count on) instead of overwriting each other's totals.
    pub(crate) fn record_metrics_since(&self, before: &CacheStats, name: &str) {
        for ((metric, now), (_, was)) in self.counters().into_iter().zip(before.counters()) {
            if now > was {
                metrics::counter!(metric, "cache" => name.to_string()).increment(now - was);
            }
        }
        if self.entries != before.entries {
            metrics::gauge!("tower_scale_cache_entries", "cache" => name.to_string())
                .increment(self.entries as f64 - before.entries as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CacheStats;

    /// A snapshot whose every field is distinct: `base + i` for the i-th.
    fn numbered(base: u64) -> CacheStats {
        let mut n = base;
        let mut next = || {
            n += 1;
            n
        };
        CacheStats {
            hits: next(),
            stale_hits: next(),
            stale_if_error: next(),
            stale_if_unreachable: next(),
            misses: next(),
            coalesced: next(),
            refreshes: next(),
            early_refreshes: next(),
            inner_errors: next(),
            stored: next(),
            not_stored: next(),
            invalidations: next(),
            bypasses: next(),
            remote_hits: next(),
            remote_fenced: next(),
            isolated: next(),
            remote_invalidations: next(),
            purges: next(),
            purges_refused: next(),
            evictions: next(),
            entries: next(),
        }
    }

    #[test]
    fn add_sums_every_field() {
        let a = numbered(0);
        let b = numbered(100);
        let sum = a + b;
        assert_eq!(sum.hits, a.hits + b.hits, "hits");
        assert_eq!(sum.stale_hits, a.stale_hits + b.stale_hits, "stale_hits");
        assert_eq!(
            sum.stale_if_error,
            a.stale_if_error + b.stale_if_error,
            "stale_if_error"
        );
        assert_eq!(
            sum.stale_if_unreachable,
            a.stale_if_unreachable + b.stale_if_unreachable,
            "stale_if_unreachable"
        );
        assert_eq!(sum.misses, a.misses + b.misses, "misses");
        assert_eq!(sum.coalesced, a.coalesced + b.coalesced, "coalesced");
        assert_eq!(sum.refreshes, a.refreshes + b.refreshes, "refreshes");
        assert_eq!(
            sum.early_refreshes,
            a.early_refreshes + b.early_refreshes,
            "early_refreshes"
        );
        assert_eq!(
            sum.inner_errors,
            a.inner_errors + b.inner_errors,
            "inner_errors"
        );
        assert_eq!(sum.stored, a.stored + b.stored, "stored");
        assert_eq!(sum.not_stored, a.not_stored + b.not_stored, "not_stored");
        assert_eq!(
            sum.invalidations,
            a.invalidations + b.invalidations,
            "invalidations"
        );
        assert_eq!(sum.bypasses, a.bypasses + b.bypasses, "bypasses");
        assert_eq!(
            sum.remote_hits,
            a.remote_hits + b.remote_hits,
            "remote_hits"
        );
        assert_eq!(
            sum.remote_fenced,
            a.remote_fenced + b.remote_fenced,
            "remote_fenced"
        );
        assert_eq!(sum.isolated, a.isolated + b.isolated, "isolated");
        assert_eq!(
            sum.remote_invalidations,
            a.remote_invalidations + b.remote_invalidations,
            "remote_invalidations"
        );
        assert_eq!(sum.purges, a.purges + b.purges, "purges");
        assert_eq!(
            sum.purges_refused,
            a.purges_refused + b.purges_refused,
            "purges_refused"
        );
        assert_eq!(sum.evictions, a.evictions + b.evictions, "evictions");
        assert_eq!(sum.entries, a.entries + b.entries, "entries");
        let mut acc = a;
        acc += b;
        assert_eq!(acc, sum);
        assert_eq!([a, b].into_iter().sum::<CacheStats>(), sum);
        assert_eq!(a + CacheStats::default(), a);
    }

    #[test]
    fn add_saturates() {
        let max = CacheStats {
            hits: u64::MAX,
            ..CacheStats::default()
        };
        assert_eq!((max + numbered(0)).hits, u64::MAX);
    }
}
