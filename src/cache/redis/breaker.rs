//! The circuit breaker: stops calling Redis after repeated failures and
//! lets one call through after a pause to see whether it is back.
//!
//! There is no separate half-open state: while open, the first caller past
//! the pause moves the pause's start to now and goes through (the probe);
//! everyone else waits for the next pause. The probe's success closes the
//! circuit; its failure leaves it open, now counting from the probe.
//! Time is read by the callers ([`Breaker::allow`], [`Breaker::failure`])
//! and passed to the `*_at` methods, which the tests drive directly.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

/// Stops calling Redis after repeated failures; lets one call through
/// after a pause to see whether it is back.
#[derive(Debug)]
pub(super) struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    opened_at_ms: AtomicU64,
    threshold: u32,
    open_for: Duration,
    start: Instant,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures, for `open_for`.
    pub(super) fn new(threshold: u32, open_for: Duration) -> Self {
        Self::starting_at(threshold, open_for, Instant::now())
    }

    /// As [`Breaker::new`], with the breaker's time origin at `start`.
    fn starting_at(threshold: u32, open_for: Duration, start: Instant) -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            threshold,
            open_for,
            start,
        }
    }

    fn ms_at(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// May a call go to Redis now? While open, one call per pause probes.
    pub(super) fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`Breaker::allow`] at `now`.
    fn allow_at(&self, now: Instant) -> bool {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return true;
        }
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        let due = opened + u64::try_from(self.open_for.as_millis()).unwrap_or(u64::MAX);
        let now = self.ms_at(now);
        // The probe: the first caller past the pause moves the clock on.
        now >= due
            && self
                .opened_at_ms
                .compare_exchange(opened, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// A call succeeded: the count starts over and the circuit closes.
    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.state.swap(CLOSED, Ordering::AcqRel) == OPEN {
            tracing::info!("redis tier: circuit closed, Redis answers again");
        }
    }

    /// A call failed: the `threshold`-th in a row opens the circuit.
    pub(super) fn failure(&self, error: &str) {
        self.failure_at(error, Instant::now());
    }

    /// [`Breaker::failure`] at `now`.
    fn failure_at(&self, error: &str, now: Instant) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold && self.state.load(Ordering::Acquire) == CLOSED {
            // The opening time first: an `allow` that sees the state open
            // must not read an older time and let a call through at once.
            self.opened_at_ms.store(self.ms_at(now), Ordering::Release);
            if self.state.swap(OPEN, Ordering::AcqRel) == CLOSED {
                tracing::warn!(error, "redis tier: circuit open, serving without Redis");
            }
        }
    }

    /// True while open (Redis is not called but for probes).
    pub(super) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE: Duration = Duration::from_secs(1);

    /// A breaker opening after 3 failures for [`PAUSE`], and its origin.
    fn breaker() -> (Breaker, Instant) {
        let t0 = Instant::now();
        (Breaker::starting_at(3, PAUSE, t0), t0)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_new_breaker_is_closed_and_allows_calls() {
        let (b, t0) = breaker();
        assert!(!b.is_open());
        for i in 0..10 {
            assert!(b.allow_at(t0 + ms(i)));
        }
    }

    #[test]
    fn it_opens_after_n_consecutive_failures() {
        let (b, t0) = breaker();
        b.failure_at("e", t0);
        b.failure_at("e", t0 + ms(1));
        assert!(!b.is_open(), "two of three failures");
        assert!(b.allow_at(t0 + ms(2)));
        b.failure_at("e", t0 + ms(2));
        assert!(b.is_open());
        assert!(!b.allow_at(t0 + ms(2)));
    }

    #[test]
    fn it_stays_open_for_the_configured_time() {
        let (b, t0) = breaker();
        let opened = t0 + ms(5_000);
        for _ in 0..3 {
            b.failure_at("e", opened);
        }
        for after in [0, 1, 500, 999] {
            assert!(!b.allow_at(opened + ms(after)), "allowed {after} ms in");
        }
        assert!(b.is_open());
        assert!(b.allow_at(opened + PAUSE), "the probe after the pause");
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let (b, t0) = breaker();
        for _ in 0..3 {
            b.failure_at("e", t0);
        }
        let later = t0 + PAUSE + ms(250);
        assert!(b.allow_at(later), "the first caller past the pause probes");
        assert!(
            !b.allow_at(later),
            "a second caller at the same time does not"
        );
        assert!(
            !b.allow_at(later + ms(999)),
            "nor anyone within the next pause"
        );
        assert!(b.is_open(), "a probe alone does not close it");
    }

    #[test]
    fn a_successful_probe_closes_it() {
        let (b, t0) = breaker();
        for _ in 0..3 {
            b.failure_at("e", t0);
        }
        assert!(b.allow_at(t0 + PAUSE));
        b.success();
        assert!(!b.is_open());
        for i in 0..5 {
            assert!(b.allow_at(t0 + PAUSE + ms(i)));
        }
        // And it counts from zero again.
        b.failure_at("e", t0 + PAUSE);
        b.failure_at("e", t0 + PAUSE);
        assert!(!b.is_open());
        b.failure_at("e", t0 + PAUSE);
        assert!(b.is_open());
    }

    #[test]
    fn a_failed_probe_reopens_it_for_another_pause() {
        let (b, t0) = breaker();
        for _ in 0..3 {
            b.failure_at("e", t0);
        }
        let probe = t0 + PAUSE + ms(100);
        assert!(b.allow_at(probe));
        b.failure_at("e", probe);
        assert!(b.is_open());
        // The pause counts from the probe, not from the first opening.
        assert!(!b.allow_at(probe + ms(999)));
        assert!(b.allow_at(probe + PAUSE), "the next probe");
        assert!(!b.allow_at(probe + PAUSE));
    }

    #[test]
    fn successes_in_between_reset_the_count() {
        let (b, t0) = breaker();
        for round in 0..5 {
            let at = t0 + ms(round * 10);
            b.failure_at("e", at);
            b.failure_at("e", at);
            b.success();
            assert!(!b.is_open(), "round {round}");
            assert!(b.allow_at(at));
        }
    }

    #[test]
    fn a_success_while_open_closes_it() {
        // The background publisher calls without asking `allow`: its
        // success closes the circuit at once.
        let (b, t0) = breaker();
        for _ in 0..3 {
            b.failure_at("e", t0);
        }
        assert!(!b.allow_at(t0 + ms(10)));
        b.success();
        assert!(!b.is_open());
        assert!(b.allow_at(t0 + ms(10)));
    }

    #[test]
    fn a_threshold_of_one_opens_on_the_first_failure() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(1, PAUSE, t0);
        b.failure_at("e", t0);
        assert!(b.is_open());
        assert!(!b.allow_at(t0));
    }

    #[test]
    fn a_zero_pause_probes_at_once() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(1, Duration::ZERO, t0);
        b.failure_at("e", t0 + ms(3));
        assert!(b.is_open());
        assert!(b.allow_at(t0 + ms(3)));
    }
}
