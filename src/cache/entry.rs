//! What the store holds: a response (or a cached error) with its freshness
//! windows, tags and version stamp.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::Tag;
use super::engine::clock::Instant;

/// One cached response with its metadata, shared (`Arc`) between the store
/// and the requests it answers.
///
/// `repr(C)` keeps the fields a hit reads (validity, the early-refresh
/// point, the response) together at the front, next to the `Arc` counts:
/// fewer cache lines touched per hit. The rest is packed (120 bytes of
/// fields for a 32-byte response: a 136-byte `Arc` allocation, which the
/// allocator serves from a 144-byte chunk) because every entry pays it.
#[repr(C)]
pub struct Entry<R, E> {
    /// The last sequence number this entry was checked valid at; equal to
    /// the current one on the fast path.
    pub(crate) validated_seq: AtomicU64,
    /// From here on, a fresh hit rolls the XFetch dice; never after
    /// `fresh_until` (equal to it when early refresh is off), so before it
    /// the entry is fresh.
    pub(crate) early_from: Instant,
    pub(crate) result: Result<R, E>,
    pub(crate) fresh_until: Instant,
    pub(crate) stale_until: Instant,
    pub(crate) error_until: Instant,
    /// The invalidation sequence number read before the fill began.
    pub(crate) fill_seq: u64,
    /// The version stamp, when `stamped`.
    version: u64,
    pub(crate) tags: Box<[Tag]>,
    pub(crate) weight: u32,
    /// How long the inner call took, in microseconds rounded up
    /// (saturating): XFetch weighs early refresh by it.
    recompute_us: u32,
    /// The TTL it was stored with, in milliseconds rounded up
    /// (`u32::MAX`: that long or longer, or unknown): only
    /// [`useful_for`](Self::useful_for) reads it.
    lifetime_ms: u32,
    /// Set while a background refresh of this entry runs (one per entry).
    pub(crate) refreshing: AtomicBool,
    /// Set once the fill that stored this entry re-checked the invalidation
    /// log after inserting it; until then a reader that sees any newer
    /// invalidation does not serve it.
    pub(crate) confirmed: AtomicBool,
    stamped: bool,
}

/// An entry's freshness windows, as absolute instants on the cache's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// When it was stored.
    pub(crate) stored_at: Instant,
    /// From here on, a fresh hit may refresh early (at most `fresh_until`).
    pub(crate) early_from: Instant,
    pub(crate) fresh_until: Instant,
    pub(crate) stale_until: Instant,
    pub(crate) error_until: Instant,
}

impl<R, E> Entry<R, E> {
    /// A new entry, unconfirmed, valid as of `fill_seq`.
    pub(crate) fn new(
        result: Result<R, E>,
        at: Deadlines,
        fill_seq: u64,
        recompute: Duration,
        version: Option<u64>,
        tags: Box<[Tag]>,
        weight: u32,
    ) -> Self {
        // In u64 (a u128 division is a library call): 2^64 ns is 584 years.
        let round_up = |d: Duration, unit: u64| {
            let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            u32::try_from(nanos.div_ceil(unit)).unwrap_or(u32::MAX)
        };
        let lifetime = at.fresh_until.saturating_duration_since(at.stored_at);
        Self {
            validated_seq: AtomicU64::new(fill_seq),
            early_from: at.early_from.min(at.fresh_until),
            result,
            fresh_until: at.fresh_until,
            stale_until: at.stale_until,
            error_until: at.error_until,
            fill_seq,
            version: version.unwrap_or(0),
            tags,
            weight,
            recompute_us: round_up(recompute, 1_000),
            lifetime_ms: round_up(lifetime, 1_000_000),
            refreshing: AtomicBool::new(false),
            confirmed: AtomicBool::new(false),
            stamped: version.is_some(),
        }
    }

    /// How long the inner call took (to the microsecond, rounded up).
    #[inline]
    pub(crate) fn recompute(&self) -> Duration {
        Duration::from_micros(u64::from(self.recompute_us))
    }
}

/// Where an entry stands at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    Fresh,
    /// Past its TTL, inside stale-while-revalidate: serve and refresh.
    Stale,
    /// Past both, inside stale-if-error: only a fallback if the service fails.
    ErrorFallback,
    Expired,
}

impl<R, E> Entry<R, E> {
    #[inline]
    pub(crate) fn freshness(&self, now: Instant) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.stale_until {
            Freshness::Stale
        } else if now < self.error_until {
            Freshness::ErrorFallback
        } else {
            Freshness::Expired
        }
    }

    /// Claims the right to refresh this entry; true for exactly one caller.
    #[inline]
    pub(crate) fn claim_refresh(&self) -> bool {
        !self.refreshing.load(Ordering::Relaxed)
            && self
                .refreshing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// The weight the store counts this entry as (1 unless a weigher is set).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The version stamp (for example the database LSN the data reflects).
    #[inline]
    pub fn version(&self) -> Option<u64> {
        self.stamped.then_some(self.version)
    }

    /// The tags the entry was stored with.
    pub fn tags(&self) -> &[Tag] {
        &self.tags
    }

    /// True for a cached error (negative caching).
    pub fn is_error(&self) -> bool {
        self.result.is_err()
    }

    /// The cached response, or `None` for a cached error.
    pub fn response(&self) -> Option<&R> {
        self.result.as_ref().ok()
    }

    /// The time between storing and the end of the last window in which the
    /// entry can still be used: stores may drop it after that. Exact to the
    /// millisecond, rounded up (never shorter than the truth).
    pub fn useful_for(&self) -> Duration {
        let end = self.stale_until.max(self.error_until);
        // The TTL is kept in whole milliseconds, rounded up: the storing
        // instant found from it is never later than the real one.
        let stored_at = if self.lifetime_ms == u32::MAX {
            Instant::from_nanos(0)
        } else {
            let lifetime = u64::from(self.lifetime_ms) * 1_000_000;
            Instant::from_nanos(self.fresh_until.as_nanos().saturating_sub(lifetime))
        };
        end.saturating_duration_since(stored_at)
    }
}

impl<R, E> fmt::Debug for Entry<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("is_error", &self.result.is_err())
            .field("version", &self.version())
            .field("tags", &self.tags)
            .field("weight", &self.weight)
            .field("fill_seq", &self.fill_seq)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stored_at: u64, ttl: Duration, recompute: Duration) -> Entry<[u64; 4], ()> {
        let stored_at = Instant::from_nanos(stored_at);
        let fresh_until = stored_at + ttl;
        let at = Deadlines {
            stored_at,
            early_from: fresh_until,
            fresh_until,
            stale_until: fresh_until + Duration::from_secs(5),
            error_until: fresh_until,
        };
        Entry::new(Ok([0; 4]), at, 7, recompute, Some(0), Box::new([]), 1)
    }

    #[test]
    fn the_fields_stay_packed() {
        // A 32-byte response (a `Bytes`) plus 88 bytes of metadata.
        assert_eq!(
            std::mem::size_of::<Entry<[u64; 4], std::convert::Infallible>>(),
            120
        );
    }

    #[test]
    fn compact_fields_read_back() {
        let e = entry(
            1_000_000_123,
            Duration::from_millis(1500),
            Duration::from_nanos(1),
        );
        assert_eq!(e.version(), Some(0), "a zero stamp is still a stamp");
        assert_eq!(
            e.recompute(),
            Duration::from_micros(1),
            "rounded up, never zero"
        );
        assert_eq!(e.useful_for(), Duration::from_millis(6500));
        let odd = entry(5, Duration::from_nanos(1_000_001), Duration::ZERO);
        assert!(
            odd.useful_for() >= Duration::from_nanos(1_000_001) + Duration::from_secs(5),
            "never shorter than the truth"
        );
        let long = entry(5, Duration::from_secs(100 * 24 * 3600), Duration::MAX);
        assert!(long.useful_for() >= Duration::from_secs(100 * 24 * 3600));
        assert_eq!(long.recompute(), Duration::from_micros(u64::from(u32::MAX)));
    }
}
