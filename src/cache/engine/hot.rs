//! Hot keys (the celebrity problem): which keys are read most, estimated
//! from a sample of reads without touching the hit path's cost.
//!
//! The hit path already bumps a per-thread counter (the striped hit and
//! miss counters); its new value, mixed with the key's precomputed hash,
//! decides whether this read is sampled: one multiply, one xor, one
//! compare. About one read in `sample_every` is; only those take the
//! sketch's lock, and with `try_lock`, so a read never waits for another
//! (a sample lost to contention is counted in `dropped` and the estimate
//! is low by that much, for every key alike). The mix makes the sampled
//! positions differ per key and per cache (the hash is seeded per cache),
//! so a key read in step with a fixed pattern (every other read, say) is
//! sampled at the same rate as any other.
//!
//! The sketch is Space-Saving: `capacity` slots of (key, count, error);
//! a sampled key not in it replaces the slot with the smallest count and
//! inherits that count as its error. A key read more than one time in
//! `capacity` (of the samples) is always in it, so a flood of distinct
//! keys cannot push a hot key out; the flood's own keys enter with an
//! error as large as their count, and keys are ranked by the count they
//! are guaranteed (count − error), so they rank last. Counts halve every
//! `half_life`, so the report is about recent reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::Duration;

use super::clock::{Instant, nanos};
use crate::cache::key::Hashed;

/// The default number of keys tracked.
pub(crate) const DEFAULT_CAPACITY: usize = 64;
/// The default sampling: one read in this many.
pub(crate) const DEFAULT_SAMPLE_EVERY: u32 = 32;
/// The default half-life of the counts.
pub(crate) const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(60);
/// The default rank within which a key is hot for the policy's
/// [`on_hot_miss`](crate::cache::CachePolicy::on_hot_miss).
pub(crate) const DEFAULT_HOT_RANK: usize = 8;
/// The most keys a sketch may track (each sampled miss of the sketch scans it).
pub(crate) const MAX_CAPACITY: usize = 4096;
/// The sparsest sampling accepted.
pub(crate) const MAX_SAMPLE_EVERY: u32 = 1 << 20;
/// A key needs this many samples (after decay) to count as hot: one
/// sampled read is noise.
const MIN_HOT_SAMPLES: u64 = 2;
/// Ranks published as `tower_scale_cache_hot_key_hits{cache,rank}`.
pub(crate) const METRIC_RANKS: usize = 10;
/// The shortest interval between two periodic publications of the gauges.
const METRIC_INTERVAL: Duration = Duration::from_secs(1);
/// Fibonacci hashing's multiplier: consecutive counts spread over the
/// whole range (a Weyl sequence), so every residue class of them does too.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One of a cache's hottest keys, with an estimate of its recent reads.
///
/// `reads` is an estimate: the sampled reads the key is guaranteed
/// (Space-Saving's lower bound) times the sampling rate, halved every
/// half-life, and low by the samples lost when two threads sampled at the
/// same moment (the sketch's lock is only tried). Hits, misses and misses
/// that waited for another request's fill all count as reads.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::convert::Infallible;
/// use tower::{Service, ServiceExt, service_fn};
/// use tower_scale::cache::CacheLayer;
///
/// let layer = CacheLayer::builder(|id: &u64| Some(*id))
///     .track_hot_keys(64)
///     .hot_key_sample_rate(1) // every read, for the example
///     .build()?;
/// let mut svc = tower::Layer::layer(&layer, service_fn(|id: u64| async move {
///     Ok::<_, Infallible>(id * 2)
/// }));
/// for i in 0..100u64 {
///     let key = if i % 2 == 0 { 7 } else { 1000 + i };
///     svc.ready().await?.call(key).await?;
/// }
/// let hot = layer.hot_keys(3);
/// assert_eq!(hot[0].key, 7);
/// assert_eq!(hot[0].reads, 50);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HotKey<K> {
    /// The key.
    pub key: K,
    /// Estimated recent reads of it (see the type's docs).
    pub reads: u64,
}

/// The hot-key settings of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HotConfig {
    /// Off: nothing sampled, nothing reported.
    pub(crate) on: bool,
    pub(crate) capacity: usize,
    pub(crate) sample_every: u32,
    pub(crate) half_life: Duration,
    pub(crate) hot_rank: usize,
}

impl HotConfig {
    pub(crate) const fn off() -> Self {
        Self {
            on: false,
            capacity: DEFAULT_CAPACITY,
            sample_every: DEFAULT_SAMPLE_EVERY,
            half_life: DEFAULT_HALF_LIFE,
            hot_rank: DEFAULT_HOT_RANK,
        }
    }
}

struct Slot<K> {
    key: Hashed<K>,
    count: u64,
    /// How much of `count` may belong to the keys it replaced.
    error: u64,
}

impl<K> Slot<K> {
    fn guaranteed(&self) -> u64 {
        self.count - self.error
    }
}

struct Sketch<K> {
    slots: Vec<Slot<K>>,
    /// When the counts were last halved (nanoseconds on the cache's clock).
    decayed_at: u64,
}

/// Where the gauges were last published.
struct Published {
    at: Option<std::time::Instant>,
}

/// A cache's hot-key tracker.
pub(crate) struct HotKeys<K> {
    /// A read is sampled when its mixed count is below this: about
    /// `2^64 / sample_every`, or 0 when off (nothing is).
    threshold: u64,
    config: HotConfig,
    half_life_nanos: u64,
    sketch: Mutex<Sketch<K>>,
    /// Samples lost because another thread held the sketch.
    dropped: AtomicU64,
    /// The cache's name for the gauges (empty: none published).
    name: String,
    published: Mutex<Published>,
}

impl<K> HotKeys<K> {
    pub(crate) fn new(config: HotConfig, name: String) -> Self {
        let threshold = match config.sample_every {
            _ if !config.on => 0,
            0 | 1 => u64::MAX,
            n => u64::MAX / u64::from(n) + 1,
        };
        Self {
            threshold,
            config,
            half_life_nanos: nanos(config.half_life).max(1),
            sketch: Mutex::new(Sketch {
                slots: Vec::new(),
                decayed_at: 0,
            }),
            dropped: AtomicU64::new(0),
            name,
            published: Mutex::new(Published { at: None }),
        }
    }

    /// Samples lost to contention so far.
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<K: PartialEq + Clone> HotKeys<K> {
    /// Counts a read of `key`, the `n`-th this thread counted of its kind
    /// (the value the striped counter returned), if it falls in the sample.
    #[inline]
    pub(crate) fn sample(&self, n: u64, key: &Hashed<K>, now: Instant) {
        if n.wrapping_mul(GOLDEN) ^ key.hash_value() < self.threshold {
            self.record(key, now);
        }
    }

    /// Adds one sampled read, unless another thread holds the sketch.
    #[cold]
    #[inline(never)]
    fn record(&self, key: &Hashed<K>, now: Instant) {
        let mut sketch = match self.sketch.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.decay(&mut sketch, now);
        if let Some(slot) = sketch.slots.iter_mut().find(|s| s.key == *key) {
            slot.count = slot.count.saturating_add(1);
            return;
        }
        if sketch.slots.len() < self.config.capacity {
            sketch.slots.push(Slot {
                key: key.clone(),
                count: 1,
                error: 0,
            });
            return;
        }
        // Space-Saving: the newcomer takes the smallest slot and its count.
        if let Some(slot) = sketch.slots.iter_mut().min_by_key(|s| s.count) {
            slot.key = key.clone();
            slot.error = slot.count;
            slot.count = slot.count.saturating_add(1);
        }
    }

    /// Halves the counts once per half-life gone by since the last time.
    fn decay(&self, sketch: &mut Sketch<K>, now: Instant) {
        let now = now.as_nanos();
        if sketch.decayed_at == 0 {
            sketch.decayed_at = now.max(1);
            return;
        }
        let periods = now.saturating_sub(sketch.decayed_at) / self.half_life_nanos;
        if periods == 0 {
            return;
        }
        let shift = u32::try_from(periods).unwrap_or(u32::MAX).min(63);
        for slot in &mut sketch.slots {
            slot.count >>= shift;
            slot.error >>= shift;
        }
        sketch.slots.retain(|s| s.count > 0);
        sketch.decayed_at = sketch
            .decayed_at
            .saturating_add(periods.saturating_mul(self.half_life_nanos));
    }

    /// The `k` hottest keys, hottest first (ties: the larger raw count).
    pub(crate) fn top(&self, k: usize, now: Instant) -> Vec<HotKey<K>> {
        if !self.config.on || k == 0 {
            return Vec::new();
        }
        let mut ranked: Vec<(u64, u64, K)> = {
            let mut sketch = crate::sync::lock(&self.sketch);
            self.decay(&mut sketch, now);
            sketch
                .slots
                .iter()
                .filter(|s| s.guaranteed() > 0)
                .map(|s| (s.guaranteed(), s.count, s.key.key().clone()))
                .collect()
        };
        ranked.sort_unstable_by_key(|r| std::cmp::Reverse((r.0, r.1)));
        ranked.truncate(k);
        let rate = u64::from(self.config.sample_every.max(1));
        ranked
            .into_iter()
            .map(|(samples, _, key)| HotKey {
                key,
                reads: samples.saturating_mul(rate),
            })
            .collect()
    }

    /// Whether `key` ranks within the hot rank now (with at least two
    /// samples). Takes the lock: for the miss path, not the hit path.
    pub(crate) fn is_hot(&self, key: &Hashed<K>, now: Instant) -> bool {
        if !self.config.on {
            return false;
        }
        let mut sketch = crate::sync::lock(&self.sketch);
        self.decay(&mut sketch, now);
        let Some(mine) = sketch
            .slots
            .iter()
            .find(|s| s.key == *key)
            .map(Slot::guaranteed)
        else {
            return false;
        };
        if mine < MIN_HOT_SAMPLES {
            return false;
        }
        let above = sketch
            .slots
            .iter()
            .filter(|s| s.guaranteed() > mine)
            .count();
        above < self.config.hot_rank
    }

    /// Sets the `tower_scale_cache_hot_key_hits{cache,rank}` gauges from
    /// `top` (ranks without a key read 0), if the cache is named.
    pub(crate) fn publish(&self, top: &[HotKey<K>]) {
        if self.name.is_empty() || !self.config.on {
            return;
        }
        crate::sync::lock(&self.published).at = Some(std::time::Instant::now());
        for rank in 0..METRIC_RANKS {
            let reads = top.get(rank).map_or(0, |h| h.reads);
            metrics::gauge!(
                "tower_scale_cache_hot_key_hits",
                "cache" => self.name.clone(),
                "rank" => (rank + 1).to_string(),
            )
            .set(reads as f64);
        }
    }

    /// The publisher's periodic call: at most once a second.
    pub(crate) fn publish_periodic(&self, now: Instant) {
        if self.name.is_empty() || !self.config.on {
            return;
        }
        let due = crate::sync::lock(&self.published)
            .at
            .is_none_or(|at| at.elapsed() >= METRIC_INTERVAL);
        if due {
            self.publish(&self.top(METRIC_RANKS, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KeyHasher;

    fn tracker(capacity: usize, sample_every: u32) -> HotKeys<u64> {
        HotKeys::new(
            HotConfig {
                on: true,
                capacity,
                sample_every,
                half_life: Duration::from_secs(60),
                hot_rank: 3,
            },
            String::new(),
        )
    }

    fn at(secs: u64) -> Instant {
        Instant::from_nanos(1 + secs * 1_000_000_000)
    }

    #[test]
    fn every_read_sampled_counts_exactly() {
        let hasher = KeyHasher::new();
        let hot = tracker(8, 1);
        for n in 0..1000u64 {
            let key = if n % 4 == 0 { 1 } else { 2 + n % 3 };
            hot.sample(n, &hasher.hashed(key), at(0));
        }
        let top = hot.top(4, at(0));
        assert_eq!(top[0], HotKey { key: 1, reads: 250 });
        assert_eq!(top.iter().map(|h| h.reads).sum::<u64>(), 1000);
    }

    /// A key read every other time, sampled one read in 32 by the thread's
    /// count: the rate is the same as for any key (no aliasing with the
    /// sampling period), within 10 %.
    #[test]
    fn periodic_reads_are_sampled_at_the_nominal_rate() {
        let hasher = KeyHasher::new();
        for period in [2u64, 4, 32, 64] {
            let hot = tracker(64, 32);
            let reads = 320_000u64;
            for n in 0..reads {
                let key = if n % period == 0 { 0 } else { 1 + n % 7 };
                hot.sample(n, &hasher.hashed(key), at(0));
            }
            let top = hot.top(8, at(0));
            let hot_reads = top.iter().find(|h| h.key == 0).map_or(0, |h| h.reads);
            let truth = reads / period;
            let off = hot_reads.abs_diff(truth) as f64 / truth as f64;
            assert!(off < 0.1, "period {period}: {hot_reads} vs {truth}");
        }
    }

    /// The sampler's counter wraps: no overflow, sampling goes on.
    #[test]
    fn the_count_wraps_without_overflow() {
        let hasher = KeyHasher::new();
        let hot = tracker(8, 1);
        let key = hasher.hashed(5);
        for n in [u64::MAX - 1, u64::MAX, 0, 1] {
            hot.sample(n, &key, at(0));
        }
        assert_eq!(hot.top(1, at(0))[0].reads, 4);
    }

    /// A hostile client reading a stream of distinct keys does not push a
    /// hot key out, and its keys rank below it.
    #[test]
    fn a_flood_of_distinct_keys_keeps_the_hot_key_on_top() {
        let hasher = KeyHasher::new();
        let hot = tracker(16, 1);
        for i in 0..100_000u64 {
            // One read in 10 is the hot key; the rest never repeat.
            let key = if i % 10 == 0 { 0 } else { 1_000_000 + i };
            hot.sample(i, &hasher.hashed(key), at(0));
        }
        let top = hot.top(16, at(0));
        assert_eq!(top[0].key, 0, "{top:?}");
        assert!(top[0].reads >= 9_000, "{top:?}");
        assert!(
            top.iter().skip(1).all(|h| h.reads <= 2),
            "flood keys are guaranteed almost nothing: {top:?}"
        );
        assert!(hot.is_hot(&hasher.hashed(0), at(0)));
        assert!(!hot.is_hot(&hasher.hashed(1_000_001), at(0)));
        assert!(crate::sync::lock(&hot.sketch).slots.len() <= 16);
    }

    #[test]
    fn counts_halve_every_half_life_and_old_heat_fades() {
        let hasher = KeyHasher::new();
        let hot = tracker(8, 1);
        for n in 0..64 {
            hot.sample(n, &hasher.hashed(1), at(0));
        }
        assert_eq!(hot.top(1, at(59))[0].reads, 64);
        assert_eq!(hot.top(1, at(60))[0].reads, 32);
        assert_eq!(hot.top(1, at(180))[0].reads, 8);
        // A new key read now overtakes the old one.
        for n in 0..20 {
            hot.sample(n, &hasher.hashed(2), at(180));
        }
        assert_eq!(hot.top(1, at(180))[0].key, 2);
        // Long idle: everything fades out.
        assert!(hot.top(8, at(100_000)).is_empty());
    }

    #[test]
    fn is_hot_needs_rank_and_two_samples() {
        let hasher = KeyHasher::new();
        let hot = tracker(16, 1);
        for (key, reads) in [(1u64, 50), (2, 40), (3, 30), (4, 20), (5, 1)] {
            for n in 0..reads {
                hot.sample(n, &hasher.hashed(key), at(0));
            }
        }
        let is_hot = |k: u64| hot.is_hot(&hasher.hashed(k), at(0));
        assert!(is_hot(1) && is_hot(2) && is_hot(3));
        assert!(!is_hot(4), "rank 4 with a hot rank of 3");
        assert!(!is_hot(5) && !is_hot(99));
    }

    #[test]
    fn off_samples_nothing() {
        let hasher = KeyHasher::new();
        let hot: HotKeys<u64> = HotKeys::new(HotConfig::off(), String::new());
        for n in 0..10_000 {
            hot.sample(n, &hasher.hashed(1), at(0));
        }
        assert!(hot.top(5, at(0)).is_empty());
        assert!(!hot.is_hot(&hasher.hashed(1), at(0)));
    }

    /// Two threads sampling every read of the same keys: the sketch's lock
    /// is only tried, so nobody waits; what is lost is counted, and the
    /// rest adds up.
    #[test]
    fn two_threads_never_wait_and_lose_only_what_they_count() {
        let hasher = KeyHasher::new();
        let hot = tracker(8, 1);
        let per_thread = 200_000u64;
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (hot, hasher) = (&hot, &hasher);
                s.spawn(move || {
                    for n in 0..per_thread {
                        hot.sample(n, &hasher.hashed((n + t) % 4), at(0));
                    }
                });
            }
        });
        let counted: u64 = hot.top(8, at(0)).iter().map(|h| h.reads).sum();
        assert_eq!(counted + hot.dropped(), 2 * per_thread);
        eprintln!(
            "2 threads, every read sampled: {} of {} samples lost to contention",
            hot.dropped(),
            2 * per_thread
        );
    }
}
