//! The clock freshness is checked against: a coarse clock that costs one
//! atomic load on the hit path, a precise one, or a mock driven by tests.

use std::fmt;
use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How often the coarse clock's ticker thread updates the time.
pub const COARSE_RESOLUTION: Duration = Duration::from_millis(1);

/// A point in time on a [`Clock`]: nanoseconds since the clock's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// Nanoseconds since the clock's origin.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// The instant `nanos` nanoseconds after the clock's origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    #[inline]
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Instant {
    type Output = Instant;
    #[inline]
    fn add(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_add(nanos(rhs)))
    }
}

impl Sub for Instant {
    type Output = Duration;
    fn sub(self, rhs: Instant) -> Duration {
        self.saturating_duration_since(rhs)
    }
}

#[derive(Clone)]
enum Source {
    /// The ticker's time, read through one pointer on the hit path; the
    /// ticker itself is held only to stop its thread with the last clock.
    Coarse {
        state: Arc<TickerState>,
        _ticker: Arc<Ticker>,
    },
    Precise(quanta::Clock, quanta::Instant),
    Mock(Arc<AtomicU64>),
}

/// The clock a cache measures freshness on.
///
/// - [`Clock::coarse`] (the default): a shared ticker thread stores the time
///   every [`COARSE_RESOLUTION`] (1 ms); reading it is one atomic load, which
///   keeps the hit path close to a bare map read. Freshness is then exact to
///   within a millisecond, and fills faster than that measure as instant
///   (they are cheap to recompute, so early refresh leaves them alone). The
///   thread is shared by every coarse clock in the process and stops when
///   the last one is dropped.
/// - [`Clock::precise`]: reads the TSC through `quanta` on every call
///   (about 10 ns here).
/// - [`Clock::mock`]: moves only when a test says so.
///
/// ```
/// use std::time::Duration;
/// use tower_scale::cache::Clock;
///
/// let (clock, mock) = Clock::mock();
/// let start = clock.now();
/// mock.advance(Duration::from_secs(90));
/// assert_eq!(clock.now() - start, Duration::from_secs(90));
/// ```
#[derive(Clone)]
pub struct Clock(Source);

impl Clock {
    /// The default clock: [`Clock::coarse`].
    pub fn new() -> Self {
        Self::coarse()
    }

    /// A millisecond-resolution clock read with one atomic load.
    ///
    /// Falls back to [`Clock::precise`] if the ticker thread cannot be
    /// spawned.
    pub fn coarse() -> Self {
        match Ticker::shared() {
            Some(ticker) => Self(Source::Coarse {
                state: Arc::clone(&ticker.state),
                _ticker: ticker,
            }),
            None => Self::precise(),
        }
    }

    /// A clock read from the TSC on every call.
    pub fn precise() -> Self {
        let clock = quanta::Clock::new();
        let origin = clock.now();
        Self(Source::Precise(clock, origin))
    }

    /// A clock that only moves when the returned [`MockClock`] says so.
    pub fn mock() -> (Self, MockClock) {
        let time = Arc::new(AtomicU64::new(0));
        (Self(Source::Mock(time.clone())), MockClock(time))
    }

    /// Now.
    #[inline]
    pub fn now(&self) -> Instant {
        match &self.0 {
            Source::Coarse { state, .. } => Instant(state.now.load(Ordering::Relaxed)),
            Source::Precise(clock, origin) => Instant(nanos(clock.now() - *origin)),
            Source::Mock(time) => Instant(time.load(Ordering::SeqCst)),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Source::Coarse { .. } => "Clock::Coarse",
            Source::Precise(..) => "Clock::Precise",
            Source::Mock(_) => "Clock::Mock",
        })
    }
}

/// Moves a mock [`Clock`].
#[derive(Clone)]
pub struct MockClock(Arc<AtomicU64>);

impl MockClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(nanos(by), Ordering::SeqCst);
    }
}

impl fmt::Debug for MockClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MockClock({:?})",
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        )
    }
}

struct TickerState {
    now: AtomicU64,
    stop: AtomicBool,
}

/// The coarse clock's thread; stopped when the last clock using it drops.
struct Ticker {
    state: Arc<TickerState>,
}

impl Ticker {
    fn shared() -> Option<Arc<Self>> {
        static SHARED: Mutex<Weak<Ticker>> = Mutex::new(Weak::new());
        let mut shared = crate::sync::lock(&SHARED);
        if let Some(ticker) = shared.upgrade() {
            return Some(ticker);
        }
        let clock = quanta::Clock::new();
        let origin = clock.now();
        let state = Arc::new(TickerState {
            now: AtomicU64::new(nanos(clock.now() - origin)),
            stop: AtomicBool::new(false),
        });
        let thread_state = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("tower-scale-clock".into())
            .spawn(move || {
                while !thread_state.stop.load(Ordering::Relaxed) {
                    thread_state
                        .now
                        .store(nanos(clock.now() - origin), Ordering::Relaxed);
                    std::thread::sleep(COARSE_RESOLUTION);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the coarse clock thread; using the precise clock");
            return None;
        }
        let ticker = Arc::new(Ticker { state });
        *shared = Arc::downgrade(&ticker);
        Some(ticker)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_moves() {
        let clock = Clock::coarse();
        let start = clock.now();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while clock.now() == start {
            assert!(
                std::time::Instant::now() < deadline,
                "the coarse clock did not move"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn coarse_clocks_share_one_ticker() {
        let (a, b) = (Clock::coarse(), Clock::coarse());
        match (&a.0, &b.0) {
            (Source::Coarse { _ticker: x, .. }, Source::Coarse { _ticker: y, .. }) => {
                assert!(Arc::ptr_eq(x, y))
            }
            _ => unreachable!(),
        }
    }
}
