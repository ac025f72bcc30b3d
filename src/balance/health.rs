//! One upstream's health, as a small state machine over an injected
//! `now`: ejected for a back-off that doubles while it keeps failing,
//! re-admitted by one probe request when the back-off ends (or when the
//! active health check answers), then ramped up over the slow-start
//! window.

use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

/// Connections closed during an upload, in a row, that make an
/// upstream's next request a probe.
pub(crate) const UPLOAD_STRIKES: u32 = 3;

/// The smallest share a re-admitted upstream starts its ramp with.
pub(crate) const RAMP_FLOOR: f64 = 0.1;

/// How health reacts to failures: the balancer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The first ejection's length.
    pub(crate) base: Duration,
    /// The longest ejection.
    pub(crate) max: Duration,
    /// The re-admission ramp's length (zero: none).
    pub(crate) slow_start: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
            slow_start: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The ejection after `failures` ejections in a row (1 for the first):
    /// `base`, doubled each time, at most `max`.
    pub(crate) fn ejection(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The share of traffic an upstream admitted `elapsed` ago takes,
    /// from [`RAMP_FLOOR`] up to 1.0 at the end of the slow start.
    pub(crate) fn ramp(&self, elapsed: Duration) -> f64 {
        if self.slow_start.is_zero() {
            return 1.0;
        }
        (elapsed.as_secs_f64() / self.slow_start.as_secs_f64()).clamp(RAMP_FLOOR, 1.0)
    }
}

/// Where an upstream is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// In rotation; its ramp started at `since`.
    Admitted { since: Instant },
    /// Out of rotation until `until`.
    Ejected { until: Instant },
    /// The back-off is over: the next request is a probe, and no other is
    /// sent while it runs (`in_flight`).
    Probing { in_flight: bool },
}

/// What the balancer may do with the upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Send it a request.
    Ready,
    /// Not now: wait until the instant (the back-off's end), or until
    /// woken (a probe ended).
    Wait(Option<Instant>),
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// The upstream was in rotation and is now ejected for this long.
    Ejected(Duration),
    /// It was already out; its ejection may have been extended.
    AlreadyOut,
    /// The request was sent before an ejection that happened since: it
    /// says nothing new.
    Stale,
}

/// One upstream's health record.
#[derive(Debug)]
pub(crate) struct Health {
    phase: Phase,
    /// Ejections since the last success.
    consecutive: u32,
    /// Connections it closed while a request body was being written, in a
    /// row (reset by any answer): [`UPLOAD_STRIKES`] of them eject it.
    upload_closes: u32,
    /// Ejections ever: a request remembers the count it was sent under, so
    /// that answers to requests sent before an ejection do not move it.
    ejections: u64,
    /// The balancer's endpoint waiting for this record to change.
    waker: Option<Waker>,
}

impl Health {
    /// A new upstream: in rotation, its ramp starting `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Admitted { since: now },
            consecutive: 0,
            upload_closes: 0,
            ejections: 0,
            waker: None,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    pub(crate) fn ejections(&self) -> u64 {
        self.ejections
    }

    /// Whether it may take a request now: in rotation, due its probe, or
    /// at the end of its back-off. Not while its probe runs: a request
    /// waiting for a probe to a black hole would wait the whole upstream
    /// timeout, where an answer at once lets a cache serve stale.
    pub(crate) fn admissible(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Ejected { until } => now >= until,
            Phase::Admitted { .. } | Phase::Probing { in_flight: false } => true,
            Phase::Probing { in_flight: true } => false,
        }
    }

    /// Whether it may take a request now; ends a finished back-off. With
    /// `waker`, one that must wait is woken when the record changes.
    pub(crate) fn admit(&mut self, now: Instant, waker: Option<&Waker>) -> Admit {
        let admit = match self.phase {
            Phase::Ejected { until } if now >= until => {
                self.phase = Phase::Probing { in_flight: false };
                Admit::Ready
            }
            Phase::Ejected { until } => Admit::Wait(Some(until)),
            Phase::Probing { in_flight: true } => Admit::Wait(None),
            Phase::Admitted { .. } | Phase::Probing { in_flight: false } => Admit::Ready,
        };
        if let (Admit::Wait(_), Some(waker)) = (admit, waker) {
            match &self.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => self.waker = Some(waker.clone()),
            }
        }
        admit
    }

    /// A request is sent: the probe, if one is due. Returns the ejection
    /// count it is sent under.
    pub(crate) fn dispatch(&mut self) -> u64 {
        if let Phase::Probing { in_flight } = &mut self.phase {
            *in_flight = true;
        }
        self.ejections
    }

    /// A request sent under `sent_under` got a response.
    pub(crate) fn succeeded(&mut self, now: Instant, sent_under: u64) {
        self.upload_closes = 0;
        if sent_under != self.ejections {
            return;
        }
        self.consecutive = 0;
        if let Phase::Probing { .. } = self.phase {
            self.phase = Phase::Admitted { since: now };
            self.wake();
        }
    }

    /// A request sent under `sent_under` failed (refused, reset, timed
    /// out); `None` for an active check, which always counts.
    pub(crate) fn failed(
        &mut self,
        now: Instant,
        sent_under: Option<u64>,
        backoff: &Backoff,
    ) -> Failed {
        if sent_under.is_some_and(|n| n != self.ejections) {
            return Failed::Stale;
        }
        let was_out = matches!(self.phase, Phase::Ejected { .. });
        if !was_out {
            self.consecutive = self.consecutive.saturating_add(1);
            self.ejections += 1;
        } else if sent_under.is_none() {
            // An active check failed while it was out: it keeps failing,
            // so its back-off grows (without being a new ejection).
            self.consecutive = self.consecutive.saturating_add(1);
        }
        let length = backoff.ejection(self.consecutive.max(1));
        let until = match self.phase {
            Phase::Ejected { until } => until.max(now + length),
            _ => now + length,
        };
        self.phase = Phase::Ejected { until };
        self.wake();
        if was_out {
            Failed::AlreadyOut
        } else {
            Failed::Ejected(length)
        }
    }

    /// The connection closed while the body of a request sent under
    /// `sent_under` was being written: how servers refuse a body (a `413`
    /// and a close), so it never ejects (a client could eject upstreams at
    /// will with bodies they refuse). [`UPLOAD_STRIKES`] in a row with no
    /// answer between make the next request a probe: an upstream that
    /// drops every connection fails it (and is ejected) as soon as that
    /// probe has no body; one that answers is back at once. A probe cut
    /// this way says nothing: the probe is due again. True when it became
    /// due a probe.
    pub(crate) fn closed_during_upload(&mut self, sent_under: u64) -> bool {
        if sent_under != self.ejections {
            return false;
        }
        match self.phase {
            Phase::Admitted { .. } => {
                self.upload_closes = self.upload_closes.saturating_add(1);
                if self.upload_closes < UPLOAD_STRIKES {
                    return false;
                }
                self.upload_closes = 0;
                self.phase = Phase::Probing { in_flight: false };
                self.wake();
                true
            }
            Phase::Probing { .. } => {
                self.abandoned(sent_under);
                false
            }
            Phase::Ejected { .. } => false,
        }
    }

    /// A request sent under `sent_under` ended without an answer either
    /// way (the client went away): a probe it was is due again.
    pub(crate) fn abandoned(&mut self, sent_under: u64) {
        if sent_under == self.ejections
            && let Phase::Probing { in_flight: true } = self.phase
        {
            self.phase = Phase::Probing { in_flight: false };
            self.wake();
        }
    }

    /// When its back-off ends, if it is ejected.
    pub(crate) fn ejected_until(&self) -> Option<Instant> {
        match self.phase {
            Phase::Ejected { until } => Some(until),
            Phase::Admitted { .. } | Phase::Probing { .. } => None,
        }
    }

    /// Panic mode (every upstream is ejected): ends the back-off early and
    /// sends the probe at once. Returns the ejection count it is sent
    /// under; `None` if it is not ejected. No other request is sent while
    /// the probe runs, as for any probe.
    pub(crate) fn panic_probe(&mut self) -> Option<u64> {
        let Phase::Ejected { .. } = self.phase else {
            return None;
        };
        self.phase = Phase::Probing { in_flight: true };
        self.wake();
        Some(self.ejections)
    }

    /// The active health check answered: an ejected upstream's back-off
    /// ends now (its next request is the probe).
    pub(crate) fn check_passed(&mut self) {
        if let Phase::Ejected { .. } = self.phase {
            self.phase = Phase::Probing { in_flight: false };
            self.wake();
        }
    }

    /// Its share of traffic now (1.0 unless ramping up).
    pub(crate) fn weight(&self, now: Instant, backoff: &Backoff) -> f64 {
        match self.phase {
            Phase::Admitted { since } => backoff.ramp(now.saturating_duration_since(since)),
            Phase::Ejected { .. } | Phase::Probing { .. } => RAMP_FLOOR,
        }
    }

    /// Wakes the endpoint (removed from the balancer, or changed).
    pub(crate) fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            slow_start: Duration::from_secs(10),
        }
    }

    #[test]
    fn back_off_doubles_up_to_the_max() {
        let b = backoff();
        let got: Vec<u128> = (1..=7).map(|n| b.ejection(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.ejection(u32::MAX), Duration::from_secs(2));
        assert_eq!(b.ejection(0), Duration::from_millis(100));
    }

    #[test]
    fn ramp_goes_from_the_floor_to_one() {
        let b = backoff();
        assert_eq!(b.ramp(Duration::ZERO), RAMP_FLOOR);
        assert!((b.ramp(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(b.ramp(Duration::from_secs(60)), 1.0);
        let none = Backoff {
            slow_start: Duration::ZERO,
            ..b
        };
        assert_eq!(none.ramp(Duration::ZERO), 1.0);
    }

    #[test]
    fn a_failure_ejects_and_the_back_off_grows_while_it_keeps_failing() {
        let b = backoff();
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let sent = h.dispatch();
        assert_eq!(h.failed(t0, Some(sent), &b), Failed::Ejected(b.base));
        assert_eq!(h.admit(t0, None), Admit::Wait(Some(t0 + b.base)));
        // A second request sent before the ejection fails too: no change.
        assert_eq!(h.failed(t0, Some(sent), &b), Failed::Stale);
        // The back-off ends: one probe, nothing else while it runs.
        let t1 = t0 + b.base;
        assert_eq!(h.admit(t1, None), Admit::Ready);
        let probe = h.dispatch();
        assert_eq!(h.admit(t1, None), Admit::Wait(None));
        // The probe fails: ejected for twice as long.
        assert_eq!(h.failed(t1, Some(probe), &b), Failed::Ejected(b.base * 2));
        assert_eq!(h.consecutive_failures(), 2);
        let t2 = t1 + b.base * 2;
        assert_eq!(h.admit(t2, None), Admit::Ready);
        let probe = h.dispatch();
        h.succeeded(t2, probe);
        assert_eq!(h.phase(), Phase::Admitted { since: t2 });
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!(h.ejections(), 2);
        // Re-admitted gradually: the ramp starts at the floor.
        assert_eq!(h.weight(t2, &b), RAMP_FLOOR);
        assert_eq!(h.weight(t2 + b.slow_start, &b), 1.0);
    }

    #[test]
    fn an_answer_to_a_request_sent_before_the_ejection_does_not_readmit() {
        let b = backoff();
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let old = h.dispatch();
        let failing = h.dispatch();
        h.failed(t0, Some(failing), &b);
        h.succeeded(t0, old);
        assert!(matches!(h.phase(), Phase::Ejected { .. }));
    }

    #[test]
    fn an_abandoned_probe_is_due_again_and_a_passed_check_ends_the_back_off() {
        let b = backoff();
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let sent = h.dispatch();
        h.failed(t0, Some(sent), &b);
        assert!(!h.admissible(t0));
        h.check_passed();
        assert!(h.admissible(t0));
        let probe = h.dispatch();
        assert!(!h.admissible(t0), "not while its probe runs");
        assert_eq!(h.admit(t0, None), Admit::Wait(None));
        h.abandoned(probe);
        assert_eq!(h.admit(t0, None), Admit::Ready);
    }

    #[test]
    fn a_panic_probe_ends_the_back_off_and_is_the_only_request() {
        let b = backoff();
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert_eq!(h.panic_probe(), None, "only an ejected upstream");
        let sent = h.dispatch();
        h.failed(t0, Some(sent), &b);
        assert_eq!(h.ejected_until(), Some(t0 + b.base));
        let probe = h.panic_probe();
        assert_eq!(probe, Some(1));
        assert_eq!(h.admit(t0, None), Admit::Wait(None));
        assert_eq!(h.panic_probe(), None, "one probe at a time");
        // It fails: ejected again, for longer.
        assert_eq!(h.failed(t0, probe, &b), Failed::Ejected(b.base * 2));
        // The next one answers: back in rotation.
        let probe = h.panic_probe().unwrap_or_default();
        h.succeeded(t0, probe);
        assert_eq!(h.phase(), Phase::Admitted { since: t0 });
    }

    #[test]
    fn uploads_cut_never_eject_three_in_a_row_make_the_next_request_a_probe() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        for _ in 0..2 {
            let sent = h.dispatch();
            assert!(!h.closed_during_upload(sent));
        }
        // An answer between: the count starts again.
        let sent = h.dispatch();
        h.succeeded(t0, sent);
        for _ in 0..2 {
            let sent = h.dispatch();
            assert!(!h.closed_during_upload(sent));
        }
        let sent = h.dispatch();
        assert!(h.closed_during_upload(sent));
        assert_eq!(h.phase(), Phase::Probing { in_flight: false });
        assert_eq!(h.ejections(), 0);
        // A probe cut the same way says nothing: due again.
        let probe = h.dispatch();
        assert!(!h.closed_during_upload(probe));
        assert_eq!(h.phase(), Phase::Probing { in_flight: false });
        // The next answer re-admits it.
        let probe = h.dispatch();
        h.succeeded(t0, probe);
        assert!(matches!(h.phase(), Phase::Admitted { .. }));
    }

    #[test]
    fn a_failed_check_while_ejected_grows_the_back_off_without_a_new_ejection() {
        let b = backoff();
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert_eq!(h.failed(t0, None, &b), Failed::Ejected(b.base));
        let later = t0 + Duration::from_millis(50);
        assert_eq!(h.failed(later, None, &b), Failed::AlreadyOut);
        assert_eq!(h.consecutive_failures(), 2);
        assert_eq!(h.ejections(), 1);
        assert_eq!(h.admit(later, None), Admit::Wait(Some(later + b.base * 2)));
    }
}
