//! Cache statistics: per-thread counter stripes that cost a plain load
//! and store on the hit path (no locked instruction), readable in-process and exported through the
//! `metrics` facade.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::cache::CacheStats;

/// Stripes owned by one live thread each; threads beyond them share one
/// more stripe through atomic adds.
const OWNED_STRIPES: usize = 64;
const KINDS: usize = 16;

/// What a counter counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Hits,
    StaleHits,
    StaleIfError,
    StaleIfUnreachable,
    Misses,
    Coalesced,
    Refreshes,
    EarlyRefreshes,
    InnerErrors,
    Stored,
    NotStored,
    Invalidations,
    Bypasses,
    RemoteHits,
    RemoteFenced,
    Isolated,
}

/// Which stripe this thread writes: its own (plain load and store, no
/// locked instruction: exact, because it is the only writer), or the
/// shared overflow stripe (atomic add).
struct Slot {
    index: usize,
}

static FREE_SLOTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT_SLOT: AtomicU64 = AtomicU64::new(0);

impl Slot {
    fn claim() -> Self {
        let reused = crate::sync::lock(&FREE_SLOTS).pop();
        let index = reused.unwrap_or_else(|| {
            let next = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
            usize::try_from(next)
                .unwrap_or(usize::MAX)
                .min(OWNED_STRIPES)
        });
        Self { index }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Later writes from this thread's teardown go to the shared stripe.
        let _ = SLOT_INDEX.try_with(|c| c.set(OWNED_STRIPES));
        if self.index < OWNED_STRIPES {
            // The mutex orders our last writes before the next owner's reads.
            crate::sync::lock(&FREE_SLOTS).push(self.index);
        }
    }
}

thread_local! {
    static SLOT: Slot = Slot::claim();
    static SLOT_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn slot() -> usize {
    let cached = SLOT_INDEX.with(Cell::get);
    if cached != usize::MAX {
        return cached;
    }
    // During thread teardown the slot may be gone: use the shared stripe.
    let index = SLOT.try_with(|s| s.index).unwrap_or(OWNED_STRIPES);
    SLOT_INDEX.with(|c| c.set(index));
    index
}

pub(crate) struct Stats {
    stripes: Box<[CachePadded<[AtomicU64; KINDS]>]>,
    /// Rare events (admin actions, fan-out), kept out of the stripes so a
    /// stripe stays one padded line: plain atomic adds.
    rare: [AtomicU64; RARE],
}

const RARE: usize = 3;

/// What a rare counter counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rare {
    RemoteInvalidations,
    Purges,
    PurgesRefused,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            stripes: (0..=OWNED_STRIPES)
                .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            rare: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts a rare event.
    pub(crate) fn incr_rare(&self, rare: Rare) {
        self.rare[rare as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one event and returns this stripe's new count of its kind
    /// (the hot-key sampler's per-thread count, at no extra cost; it wraps
    /// instead of overflowing).
    #[inline]
    pub(crate) fn incr(&self, kind: Kind) -> u64 {
        let index = slot();
        let counter = &self.stripes[index.min(OWNED_STRIPES)][kind as usize];
        if index < OWNED_STRIPES {
            let n = counter.load(Ordering::Relaxed).wrapping_add(1);
            counter.store(n, Ordering::Relaxed);
            n
        } else {
            counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
        }
    }

    fn get(&self, kind: Kind) -> u64 {
        self.stripes
            .iter()
            .map(|s| s[kind as usize].load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn snapshot(&self, evictions: u64, entries: u64) -> CacheStats {
        CacheStats {
            hits: self.get(Kind::Hits),
            stale_hits: self.get(Kind::StaleHits),
            stale_if_error: self.get(Kind::StaleIfError),
            stale_if_unreachable: self.get(Kind::StaleIfUnreachable),
            misses: self.get(Kind::Misses),
            coalesced: self.get(Kind::Coalesced),
            refreshes: self.get(Kind::Refreshes),
            early_refreshes: self.get(Kind::EarlyRefreshes),
            inner_errors: self.get(Kind::InnerErrors),
            stored: self.get(Kind::Stored),
            not_stored: self.get(Kind::NotStored),
            invalidations: self.get(Kind::Invalidations),
            bypasses: self.get(Kind::Bypasses),
            remote_hits: self.get(Kind::RemoteHits),
            remote_fenced: self.get(Kind::RemoteFenced),
            isolated: self.get(Kind::Isolated),
            remote_invalidations: self.rare[Rare::RemoteInvalidations as usize]
                .load(Ordering::Relaxed),
            purges: self.rare[Rare::Purges as usize].load(Ordering::Relaxed),
            purges_refused: self.rare[Rare::PurgesRefused as usize].load(Ordering::Relaxed),
            evictions,
            entries,
        }
    }
}

/// Publishing a named cache's statistics through the `metrics` facade.
pub(crate) mod publisher {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use crate::cache::CacheStats;
    use crate::error::ConfigError;

    /// The shortest interval between two publications.
    pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(10);

    /// Refuses an interval below [`MIN_INTERVAL`] for a named cache (an
    /// unnamed one publishes nothing, whatever its interval).
    pub(crate) fn validate(name: &str, every: Duration) -> Result<(), ConfigError> {
        if !name.is_empty() && every < MIN_INTERVAL {
            return Err(ConfigError::OutOfRange {
                field: "metrics_interval",
                reason: format!("{every:?} is below the {MIN_INTERVAL:?} minimum"),
            });
        }
        Ok(())
    }

    /// Starts publishing what `read` returns every `every`, under `name`,
    /// until `read` returns `None` (the cache is gone) or `closed` is
    /// cancelled; a configuration error outside a Tokio runtime. An empty
    /// name publishes nothing.
    pub(crate) fn spawn(
        name: String,
        every: Duration,
        closed: CancellationToken,
        read: impl Fn() -> Option<CacheStats> + Send + 'static,
    ) -> Result<(), ConfigError> {
        if name.is_empty() {
            return Ok(());
        }
        validate(&name, every)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| ConfigError::OutOfRange {
                field: "name",
                reason: "a named cache publishes its metrics from a task: build it inside a \
                         Tokio runtime (or leave it unnamed and call \
                         CacheStats::record_metrics yourself)"
                    .into(),
            })?;
        runtime.spawn(publish(read, closed, name, every));
        Ok(())
    }

    /// Publishes every `every` as increments (caches that share a name add
    /// up); the entries gauge leaves with the cache.
    async fn publish(
        read: impl Fn() -> Option<CacheStats>,
        closed: CancellationToken,
        name: String,
        every: Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut published = CacheStats::default();
        loop {
            let closing = tokio::select! {
                () = closed.cancelled() => true,
                _ = tick.tick() => false,
            };
            let Some(now) = read() else {
                break;
            };
            now.record_metrics_since(&published, &name);
            published = now;
            if closing {
                break;
            }
        }
        CacheStats {
            entries: 0,
            ..published
        }
        .record_metrics_since(&published, &name);
    }
}
