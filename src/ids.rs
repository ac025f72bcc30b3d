//! Ids without a central sequence: 64-bit, time-ordered, unique across
//! instances given distinct instance ids, increasing per instance.
//!
//! When rows live on several primaries (sharding), no single database can
//! hand out ids, and asking one for each insert would put it back on
//! every write path. [`IdGenerator`] makes them in process, as Twitter's
//! Snowflake does.
//!
//! # Bit layout
//!
//! An id is a positive `i64` (the sign bit is always 0, so it fits a
//! PostgreSQL `bigint` and sorts the same as signed or unsigned):
//!
//! ```text
//!  63 | 62 ............ 22 | 21 ...... 12 | 11 ....... 0
//!   0 | milliseconds since | instance id  | sequence
//!     | 2025-01-01 UTC (41)| (10: 0-1023) | (12: 0-4095)
//! ```
//!
//! 41 bits of milliseconds last until 2094; 4,096 ids per millisecond per
//! instance (4 million a second); 1,024 instances.
//!
//! # Guarantees
//!
//! - **Unique**: two generators with different instance ids never make
//!   the same id (the instance id is part of it); one generator never
//!   makes the same id twice, from any number of threads.
//! - **Increasing per generator**: each id is greater than every id the
//!   same generator made before, across threads (one atomic).
//! - **A clock that steps back** (NTP, a VM resumed) is never followed:
//!   the generator keeps its own time, the latest it has seen, and goes
//!   on from there; when a millisecond's 4,096 ids are used up it
//!   borrows the next millisecond instead of waiting. It never blocks
//!   and never repeats an id, at the price of ids that run ahead of the
//!   wall clock while it catches up.
//! - **Across restarts** the generator only knows the clock: a process
//!   restarted on a clock behind the ids it made before could repeat
//!   them. Start it with [`IdGenerator::resuming_after`] and the largest
//!   id the instance made (for example `SELECT max(id)` of its rows), or
//!   make sure instance ids are not reused before the clock has passed
//!   the old ones.
//!
//! ```
//! use tower_scale::ids::{IdGenerator, IdParts};
//!
//! let ids = IdGenerator::new(7)?;
//! let (a, b) = (ids.next_id(), ids.next_id());
//! assert!(b > a);
//! assert_eq!(IdParts::of(a).instance, 7);
//! # Ok::<(), tower_scale::ids::InvalidInstance>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The epoch of the ids' time: 2025-01-01T00:00:00Z, in Unix milliseconds.
pub const EPOCH_UNIX_MS: u64 = 1_735_689_600_000;
/// Bits of the instance id.
pub const INSTANCE_BITS: u32 = 10;
/// Bits of the per-millisecond sequence.
pub const SEQUENCE_BITS: u32 = 12;
/// Bits of the time.
pub const TIME_BITS: u32 = 63 - INSTANCE_BITS - SEQUENCE_BITS;
/// The largest instance id (1023).
pub const MAX_INSTANCE: u16 = (1 << INSTANCE_BITS) - 1;

const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;

/// An instance id over [`MAX_INSTANCE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("instance id {0} is out of range (0 to 1023)")]
pub struct InvalidInstance(pub u64);

/// Milliseconds since [`EPOCH_UNIX_MS`], from the system clock (0 before
/// the epoch).
fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .saturating_sub(EPOCH_UNIX_MS)
}

type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Makes ids: see the [module docs](self) for the layout and the
/// guarantees. Cheap to share (`Arc` it, or clone: clones share the
/// state).
#[derive(Clone)]
pub struct IdGenerator {
    instance: u64,
    /// `time << SEQUENCE_BITS | sequence` of the last id made.
    last: Arc<AtomicU64>,
    clock: Clock,
}

impl fmt::Debug for IdGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdGenerator")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl IdGenerator {
    /// A generator for `instance` (0 to 1023; each process sharing the
    /// ids' space needs its own) on the system clock.
    pub fn new(instance: u64) -> Result<Self, InvalidInstance> {
        Self::with_clock(instance, system_ms)
    }

    /// A generator on `clock`, in milliseconds since [`EPOCH_UNIX_MS`]
    /// (tests drive it).
    pub fn with_clock(
        instance: u64,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self, InvalidInstance> {
        if instance > u64::from(MAX_INSTANCE) {
            return Err(InvalidInstance(instance));
        }
        Ok(Self {
            instance,
            last: Arc::new(AtomicU64::new(0)),
            clock: Arc::new(clock),
        })
    }

    /// Every id it makes from now on is greater than `id` (the largest
    /// this instance made before a restart), whatever the clock says.
    #[must_use]
    pub fn resuming_after(self, id: i64) -> Self {
        let parts = IdParts::of(id);
        let state = (parts.millis << SEQUENCE_BITS) | u64::from(parts.sequence);
        self.last.fetch_max(state, Ordering::AcqRel);
        self
    }

    /// The instance id.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The next id: greater than every id this generator made, unique
    /// across instances. Never blocks.
    pub fn next_id(&self) -> i64 {
        let now = (self.clock)().min(TIME_MASK);
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let (time, sequence) = (last >> SEQUENCE_BITS, last & SEQUENCE_MASK);
            let next = if now > time {
                now << SEQUENCE_BITS
            } else if sequence < SEQUENCE_MASK {
                // The same millisecond, or a clock behind ours: go on.
                last + 1
            } else {
                // This millisecond is used up: borrow the next one.
                (time + 1).min(TIME_MASK) << SEQUENCE_BITS
            };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return self.compose(next),
                Err(seen) => last = seen,
            }
        }
    }

    fn compose(&self, state: u64) -> i64 {
        let (time, sequence) = (state >> SEQUENCE_BITS, state & SEQUENCE_MASK);
        let id =
            (time << (INSTANCE_BITS + SEQUENCE_BITS)) | (self.instance << SEQUENCE_BITS) | sequence;
        // 63 bits at most: the time is masked to 41.
        i64::try_from(id & (u64::MAX >> 1)).unwrap_or(i64::MAX)
    }
}

/// An id taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdParts {
    /// Milliseconds since [`EPOCH_UNIX_MS`].
    pub millis: u64,
    /// The instance that made it.
    pub instance: u16,
    /// Its place in that millisecond.
    pub sequence: u16,
}

impl IdParts {
    /// The parts of `id` (a negative id, which no generator makes, is
    /// read as its low 63 bits).
    pub fn of(id: i64) -> Self {
        let id = id.cast_unsigned() & (u64::MAX >> 1);
        Self {
            millis: id >> (INSTANCE_BITS + SEQUENCE_BITS),
            instance: u16::try_from((id >> SEQUENCE_BITS) & u64::from(MAX_INSTANCE))
                .unwrap_or(MAX_INSTANCE),
            sequence: u16::try_from(id & SEQUENCE_MASK).unwrap_or(0),
        }
    }

    /// When the id was made (by its generator's clock).
    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(EPOCH_UNIX_MS.saturating_add(self.millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn a_million_ids_from_four_instances_are_unique_and_increase_per_instance() {
        let handles: Vec<_> = (0..4u64)
            .map(|instance| {
                std::thread::spawn(move || {
                    let ids = IdGenerator::new(instance).unwrap_or_else(|e| panic!("{e}"));
                    let made: Vec<i64> = (0..250_000).map(|_| ids.next_id()).collect();
                    assert!(made.windows(2).all(|w| w[0] < w[1]), "instance {instance}");
                    assert!(
                        made.iter()
                            .all(|id| IdParts::of(*id).instance == instance as u16)
                    );
                    made
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap_or_default() {
                assert!(id > 0);
                assert!(all.insert(id), "duplicate {id}");
            }
        }
        assert_eq!(all.len(), 1_000_000);
    }

    #[test]
    fn threads_sharing_one_generator_never_repeat_and_each_sees_increasing_ids() {
        let ids = IdGenerator::new(3).unwrap_or_else(|e| panic!("{e}"));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = ids.clone();
                std::thread::spawn(move || (0..50_000).map(|_| ids.next_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            let made = h.join().unwrap_or_default();
            assert!(made.windows(2).all(|w| w[0] < w[1]));
            all.extend(made);
        }
        assert_eq!(all.len(), 200_000);
    }

    #[test]
    fn a_clock_stepping_back_never_repeats_an_id_nor_goes_back() {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock = Arc::clone(&now);
        let ids = IdGenerator::with_clock(1, move || clock.load(Ordering::SeqCst))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut made = vec![ids.next_id(), ids.next_id()];
        // Back ten seconds: ids go on from the latest time seen.
        now.store(990_000, Ordering::SeqCst);
        made.extend((0..10_000).map(|_| ids.next_id()));
        // More than a millisecond's worth: it borrowed ahead.
        assert!(IdParts::of(*made.last().unwrap_or(&0)).millis > 1_000_000);
        // The clock comes back past it: the ids follow the clock again.
        now.store(2_000_000, Ordering::SeqCst);
        made.push(ids.next_id());
        assert_eq!(IdParts::of(*made.last().unwrap_or(&0)).millis, 2_000_000);
        assert!(made.windows(2).all(|w| w[0] < w[1]));
        let unique: HashSet<_> = made.iter().collect();
        assert_eq!(unique.len(), made.len());
    }

    #[test]
    fn the_layout_is_pinned() {
        let ids = IdGenerator::with_clock(5, || 123_456_789).unwrap_or_else(|e| panic!("{e}"));
        let first = ids.next_id();
        assert_eq!(first, (123_456_789 << 22) | (5 << 12));
        assert_eq!(ids.next_id(), first + 1);
        let parts = IdParts::of(first + 1);
        assert_eq!(
            (parts.millis, parts.instance, parts.sequence),
            (123_456_789, 5, 1)
        );
        assert_eq!(
            parts.time(),
            UNIX_EPOCH + Duration::from_millis(EPOCH_UNIX_MS + 123_456_789)
        );
        assert_eq!(
            IdGenerator::new(1024).map(|_| ()),
            Err(InvalidInstance(1024))
        );
        assert!(IdGenerator::new(1023).is_ok());
    }

    #[test]
    fn resuming_after_an_id_from_the_future_continues_past_it() {
        let ids = IdGenerator::with_clock(2, || 1_000).unwrap_or_else(|e| panic!("{e}"));
        let before = IdGenerator::with_clock(2, || 5_000)
            .unwrap_or_else(|e| panic!("{e}"))
            .next_id();
        let ids = ids.resuming_after(before);
        assert!(ids.next_id() > before);
    }
}
