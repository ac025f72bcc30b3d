//! The queue's clock (wall time the library passes to every claim and
//! schedule, so tests can drive it) and the retry back-off.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The wall clock claims, leases and schedules are compared against: the
/// library passes `now` to every statement instead of using the
/// database's `now()`, so a test can drive time with
/// [`manual`](Self::manual) and [`advance`](Self::advance).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_scale::queue::QueueClock;
///
/// let clock = QueueClock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_005));
/// ```
#[derive(Clone, Default)]
pub struct QueueClock {
    manual: Option<Arc<Mutex<SystemTime>>>,
}

impl fmt::Debug for QueueClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("QueueClock(system)"),
            Some(_) => write!(f, "QueueClock(manual at {:?})", self.now()),
        }
    }
}

impl QueueClock {
    /// The system's wall clock (the default).
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that stands still at `start` until [`advance`](Self::advance)d
    /// (clones share it).
    pub fn manual(start: SystemTime) -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        match &self.manual {
            None => SystemTime::now(),
            Some(t) => *crate::sync::lock(t),
        }
    }

    /// Moves a manual clock forward; returns false (and does nothing) on
    /// the system clock.
    pub fn advance(&self, by: Duration) -> bool {
        match &self.manual {
            None => false,
            Some(t) => {
                let mut t = crate::sync::lock(t);
                *t += by;
                true
            }
        }
    }
}

/// How long a failed job waits before its next attempt: `base · 2^(n-1)`
/// after the n-th failure, at most `max`, with jitter: the wait is drawn
/// uniformly from its upper half (`[d/2, d]`), so failures that happened
/// together do not retry together.
///
/// ```
/// use std::time::Duration;
/// use tower_scale::queue::Backoff;
///
/// let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// assert_eq!(b.ceiling(3), Duration::from_secs(4));
/// assert_eq!(b.ceiling(30), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: bool,
}

impl Default for Backoff {
    /// 1 s doubling up to 10 minutes, with jitter.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(600))
    }
}

impl Backoff {
    /// `base` doubling up to `max` (at most a year), with jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        let year = Duration::from_secs(365 * 86_400);
        let base = base.min(year);
        Self {
            base,
            max: max.max(base).min(year),
            jitter: true,
        }
    }

    /// Without jitter: exactly the ceiling (for tests and for callers that
    /// add their own).
    #[must_use]
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// The longest wait after the `failures`-th failure (1-based).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let nanos = self.base.as_nanos().saturating_mul(u128::from(factor));
        let capped = nanos.min(self.max.as_nanos());
        Duration::from_nanos(u64::try_from(capped).unwrap_or(u64::MAX))
    }

    /// The wait after the `failures`-th failure; `unit` in `[0, 1)` draws
    /// the jitter.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(failures);
        if !self.jitter {
            return ceiling;
        }
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_the_upper_half() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
        for unit in [0.0, 0.3, 0.999] {
            let d = b.delay(3, unit);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
        assert_eq!(b.without_jitter().delay(3, 0.0), Duration::from_millis(400));
        let huge = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        assert_eq!(huge.ceiling(40), Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn the_manual_clock_moves_only_when_advanced() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let c = QueueClock::manual(start);
        let c2 = c.clone();
        assert_eq!(c.now(), start);
        assert!(c2.advance(Duration::from_secs(1)));
        assert_eq!(c.now(), start + Duration::from_secs(1));
        assert!(!QueueClock::system().advance(Duration::from_secs(1)));
    }
}
