//! The clock freshness is checked against: cheap in production, driven by
//! hand in tests.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A point in time on a [`Clock`].
pub type Instant = quanta::Instant;

/// A cheap monotonic clock ([`quanta`]: the TSC where it is reliable, the
/// OS monotonic clock elsewhere), or a mock one for tests.
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
pub struct Clock(quanta::Clock);

impl Clock {
    /// The real clock.
    pub fn new() -> Self {
        Self(quanta::Clock::new())
    }

    /// A clock that only moves when the returned [`MockClock`] says so.
    pub fn mock() -> (Self, MockClock) {
        let (clock, mock) = quanta::Clock::mock();
        (Self(clock), MockClock(mock))
    }

    /// Now.
    #[inline]
    pub fn now(&self) -> Instant {
        self.0.now()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Moves a mock [`Clock`].
#[derive(Clone)]
pub struct MockClock(Arc<quanta::Mock>);

impl MockClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.increment(by);
    }
}

impl fmt::Debug for MockClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MockClock")
    }
}
