//! Coalescing the wake-up notifications of standalone enqueues.
//!
//! PostgreSQL serialises committing transactions that sent a `NOTIFY`
//! (one lock on the notification queue, held to the end of the commit),
//! and every notification wakes the listening sessions and a worker that
//! then claims: under a burst of enqueues, one notification per job is
//! both a serial section and a claim per job. So while enqueues of a
//! queue handle overlap, it notifies at most once per [`WINDOW`] from
//! this process: an enqueue inside the window that started while another
//! was in flight commits without one, and leaves a **trailing**
//! notification, sent once the window ends and always after that enqueue
//! committed. An enqueue with none other in flight notifies itself: a
//! producer enqueuing one job at a time (a request that enqueues one
//! job, a low rate) is no burst, and its jobs should not wait for a
//! window (they did, 5 ms each, back to back: `queue/enqueue_to_start`).
//! A job therefore wakes a worker at most one window after its commit;
//! polling stays the fallback if a notification is lost. The price: a
//! task enqueueing many jobs one after the other sends a notification
//! per job (each is alone in flight); enqueue them in one transaction
//! ([`Queue::enqueue_in`](super::Queue::enqueue_in)), whose identical
//! notifications PostgreSQL folds into one at the commit, or from
//! several tasks.
//!
//! Jobs enqueued in a caller's transaction always notify at its commit:
//! a trailing notification could run before that commit, which is the
//! caller's to make.
//!
//! Where the trailing notification can miss (the workers' polling then
//! finds the job, within `poll_interval`): an enqueue whose answer was
//! lost (a timeout) may commit after the notification; a process that
//! exits, or drops its runtime, within the window of its last enqueues
//! never sends it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::pg::Db;
use crate::sync::lock;

/// The shortest time between two notifications of one queue handle.
pub(crate) const WINDOW: Duration = Duration::from_millis(5);

/// Owed by an enqueue that did not notify: sends the trailing
/// notification when dropped, however the enqueue ended (answered,
/// failed, or its future dropped while the statement may still commit).
pub(crate) struct Trailing<'a> {
    pub(crate) gate: &'a Arc<NotifyGate>,
    pub(crate) db: &'a Db,
    pub(crate) channel: &'a str,
    pub(crate) name: &'a str,
}

impl Drop for Trailing<'_> {
    fn drop(&mut self) {
        self.gate.suppressed(self.db, self.channel, self.name);
    }
}

#[derive(Debug, Default)]
pub(crate) struct NotifyGate {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last notification went out (in an enqueue, or trailing).
    last: Option<Instant>,
    /// A trailing notification is scheduled and not yet sent.
    trailing: bool,
    /// Enqueues of due jobs asking [`NotifyGate::notify_now`] whose
    /// statements have not ended.
    in_flight: u32,
}

/// An enqueue counted in flight until dropped.
pub(crate) struct InFlight<'a>(&'a NotifyGate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

impl NotifyGate {
    /// Whether the enqueue about to be sent notifies itself (no other is
    /// in flight, or the window is over); if not, the caller calls
    /// [`suppressed`](Self::suppressed) once it committed. The enqueue
    /// counts as in flight while the returned guard lives.
    pub(crate) fn notify_now(&self) -> (bool, InFlight<'_>) {
        let now = Instant::now();
        let mut s = lock(&self.state);
        let alone = s.in_flight == 0;
        s.in_flight = s.in_flight.saturating_add(1);
        if !alone && s.last.is_some_and(|last| now < last + WINDOW) {
            return (false, InFlight(self));
        }
        s.last = Some(now);
        (true, InFlight(self))
    }

    /// An enqueue that did not notify has committed: a notification must
    /// follow. One scheduled and not yet sent will do (it is sent after
    /// this point, so after that commit); otherwise one is scheduled at
    /// the window's end.
    pub(crate) fn suppressed(self: &Arc<Self>, db: &Db, channel: &str, name: &str) {
        let at = {
            let mut s = lock(&self.state);
            if s.trailing {
                return;
            }
            s.trailing = true;
            s.last.map_or_else(Instant::now, |last| last + WINDOW)
        };
        let (gate, db) = (Arc::clone(self), db.clone());
        let (channel, name) = (channel.to_owned(), name.to_owned());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (the enqueue ran on one, so this does not
            // happen): the workers' polling finds the job.
            lock(&self.state).trailing = false;
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            {
                // Cleared before it is sent: an enqueue that still sees it
                // set committed before this notification goes out.
                let mut s = lock(&gate.state);
                s.trailing = false;
                s.last = Some(Instant::now());
            }
            if let Err(e) = db
                .execute("SELECT pg_catalog.pg_notify($1, $2)", &[&channel, &name])
                .await
            {
                tracing::debug!(queue = %name, error = %e, "job queue: trailing notification failed; workers poll");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The clock paused: the window never runs out between two calls.
    #[tokio::test(start_paused = true)]
    async fn a_lone_enqueue_notifies_and_overlapping_ones_share_a_window() {
        let gate = NotifyGate::default();
        // Alone: notifies.
        let (first, first_guard) = gate.notify_now();
        assert!(first);
        // Another while the first is in flight, inside the window: not.
        let (second, second_guard) = gate.notify_now();
        assert!(!second);
        drop(first_guard);
        // Still one in flight (the second): not.
        let (third, third_guard) = gate.notify_now();
        assert!(!third);
        drop((second_guard, third_guard));
        // None in flight, inside the window: a lone enqueue notifies.
        let (lone, guard) = gate.notify_now();
        assert!(lone);
        assert_eq!(lock(&gate.state).in_flight, 1);
        // Past the window, an enqueue overlapping another notifies too.
        tokio::time::advance(WINDOW).await;
        let (late, _late_guard) = gate.notify_now();
        assert!(late);
        drop(guard);
    }
}
