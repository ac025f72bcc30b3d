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
/// `repr(C)` keeps the fields a hit reads (validity, freshness, the
/// response) together at the front, next to the `Arc` counts: fewer cache
/// lines touched per hit.
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
    pub(crate) version: Option<u64>,
    pub(crate) stale_until: Instant,
    pub(crate) error_until: Instant,
    /// How long the inner call took: XFetch weighs early refresh by it.
    pub(crate) recompute: Duration,
    /// Set while a background refresh of this entry runs (one per entry).
    pub(crate) refreshing: AtomicBool,
    /// Set once the fill that stored this entry re-checked the invalidation
    /// log after inserting it; until then a reader that sees any newer
    /// invalidation does not serve it.
    pub(crate) confirmed: AtomicBool,
    pub(crate) weight: u32,
    /// The invalidation sequence number read before the fill began.
    pub(crate) fill_seq: u64,
    pub(crate) stored_at: Instant,
    pub(crate) tags: Box<[Tag]>,
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
    pub fn version(&self) -> Option<u64> {
        self.version
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
    /// entry can still be used: stores may drop it after that.
    pub fn useful_for(&self) -> Duration {
        let end = self.stale_until.max(self.error_until);
        end.saturating_duration_since(self.stored_at)
    }
}

impl<R, E> fmt::Debug for Entry<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("is_error", &self.result.is_err())
            .field("version", &self.version)
            .field("tags", &self.tags)
            .field("weight", &self.weight)
            .field("fill_seq", &self.fill_seq)
            .finish_non_exhaustive()
    }
}
