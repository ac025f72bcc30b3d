//! Peak-EWMA load, computed as `tower::load::PeakEwma` computes it (the
//! same estimate, peak, decay and cost), with fewer clock reads.
//!
//! tower's reads the clock twice for each load p2c compares (two per
//! pick), once when the request is sent and twice when it is answered:
//! seven reads per request, each 30–40 ns on a virtual machine, over 1% of
//! a loopback round trip. Here one instant serves a whole pick
//! ([`PickClock`]: read once by the picker, then both loads, the send time
//! and the request's deadline use it), and one the answer (its round trip
//! and the upstream's health): two reads per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;

/// The instant of the pick under way, read once by the picker (under its
/// lock) for everything the pick needs to know the time for.
#[derive(Debug)]
pub(crate) struct PickClock {
    base: Instant,
    /// Nanoseconds from `base`.
    at: AtomicU64,
}

impl PickClock {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            at: AtomicU64::new(0),
        }
    }

    /// Reads the clock for a pick.
    pub(crate) fn start(&self) {
        let since = Instant::now().saturating_duration_since(self.base);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.at.store(nanos, Ordering::Relaxed);
    }

    /// The instant the pick under way started.
    pub(crate) fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.at.load(Ordering::Relaxed))
    }
}

/// One upstream's peak-EWMA estimate of its response time.
#[derive(Debug)]
pub(crate) struct PeakEwma {
    estimate: Arc<Mutex<Estimate>>,
    decay_ns: f64,
}

#[derive(Debug)]
struct Estimate {
    update_at: Instant,
    rtt_ns: f64,
}

/// A request in flight: the estimate takes its response time when it is
/// finished (answered or failed) or dropped (abandoned), and it counts as
/// pending until then.
#[derive(Debug)]
pub(crate) struct Handle {
    sent_at: Instant,
    decay_ns: f64,
    estimate: Arc<Mutex<Estimate>>,
    finished: bool,
}

impl PeakEwma {
    /// `default_rtt` stands in until the first response.
    pub(crate) fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate: Arc::new(Mutex::new(Estimate {
                update_at: now,
                rtt_ns: nanos(default_rtt),
            })),
            decay_ns: nanos(decay),
        }
    }

    /// The cost p2c compares at `now`: the estimate decayed to `now`, times
    /// the requests in flight plus one.
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        // Every handle holds one reference.
        let pending = Arc::strong_count(&self.estimate) - 1;
        let estimate = lock(&self.estimate).update(now, now, now, self.decay_ns);
        estimate * (pending + 1) as f64
    }

    /// A request sent at `sent_at`.
    pub(crate) fn handle(&self, sent_at: Instant) -> Handle {
        Handle {
            sent_at,
            decay_ns: self.decay_ns,
            estimate: Arc::clone(&self.estimate),
            finished: false,
        }
    }
}

impl Handle {
    /// When the request was sent.
    pub(crate) fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// The upstream answered (or failed) at `now`.
    pub(crate) fn finish(mut self, now: Instant) {
        self.finished = true;
        lock(&self.estimate).update(self.sent_at, now, now, self.decay_ns);
    }

    /// The request ended for the client's reasons (its body failed or
    /// trickled, it went away): the time says nothing of the upstream, and
    /// a slow client's 30 s would be the upstream's peak for minutes.
    pub(crate) fn discard(mut self) {
        self.finished = true;
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.finished {
            let now = Instant::now();
            lock(&self.estimate).update(self.sent_at, now, now, self.decay_ns);
        }
    }
}

impl Estimate {
    /// tower's `RttEstimate::update`: a response time above the estimate
    /// replaces it (the peak); one below moves it by the weight the time
    /// since the last update gives it. A load read is a zero response time
    /// (the estimate decays towards zero while nothing is answered).
    fn update(&mut self, sent_at: Instant, recv_at: Instant, now: Instant, decay_ns: f64) -> f64 {
        let rtt = nanos(recv_at.saturating_duration_since(sent_at));
        self.rtt_ns = if self.rtt_ns < rtt {
            rtt
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.update_at));
            let decay = (-elapsed / decay_ns).exp();
            self.rtt_ns * decay + rtt * (1.0 - decay)
        };
        self.update_at = self.update_at.max(now);
        self.rtt_ns
    }
}

/// tower's conversion.
fn nanos(d: Duration) -> f64 {
    const NANOS_PER_SEC: u64 = 1_000_000_000;
    let n = f64::from(d.subsec_nanos());
    let s = d.as_secs().saturating_mul(NANOS_PER_SEC) as f64;
    n + s
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn a_discarded_measure_leaves_the_estimate_alone() {
        let t0 = Instant::now() - Duration::from_secs(30);
        let ewma = PeakEwma::new(Duration::from_millis(1), DECAY, t0);
        // Sent 30 s ago (a trickled upload): discarded, not a 30 s peak.
        ewma.handle(t0).discard();
        assert_eq!(lock(&ewma.estimate).rtt_ns, 1e6);
        // Dropped unfinished: counted (a lower bound of the answer).
        drop(ewma.handle(t0));
        assert!(lock(&ewma.estimate).rtt_ns >= 29e9);
    }

    #[test]
    fn a_slower_response_is_the_estimate_at_once_and_a_faster_one_moves_it_slowly() {
        let t0 = Instant::now();
        let ewma = PeakEwma::new(Duration::from_millis(1), DECAY, t0);
        assert_eq!(ewma.cost(t0), 1e6);
        let h = ewma.handle(t0);
        assert_eq!(ewma.cost(t0), 2e6, "one in flight doubles the cost");
        let mut estimate = lock(&ewma.estimate);
        estimate.update(
            h.sent_at(),
            t0 + Duration::from_millis(5),
            t0,
            DECAY.as_secs_f64() * 1e9,
        );
        assert_eq!(estimate.rtt_ns, 5e6, "the peak");
        let later = t0 + Duration::from_secs(1);
        let rtt = estimate.update(later, later, later, DECAY.as_secs_f64() * 1e9);
        let expected = 5e6 * (-0.1f64).exp();
        assert!((rtt - expected).abs() < 1.0, "{rtt} decays to {expected}");
        drop(estimate);
        drop(h);
        assert_eq!(Arc::strong_count(&ewma.estimate), 1);
    }

    #[test]
    fn the_pick_clock_gives_back_the_instant_it_read() {
        let clock = PickClock::new();
        clock.start();
        let at = clock.now();
        assert!(at <= Instant::now());
        assert_eq!(clock.now(), at);
    }
}
