//! The worker's counters and the queue's metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::handle::Depth;

/// A worker's counters ([`WorkerHandle::stats`](super::WorkerHandle::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Jobs done and removed.
    pub processed: u64,
    /// Handler failures (errors and panics).
    pub failed: u64,
    /// Failed jobs scheduled for another attempt (after a failure or an
    /// expired lease).
    pub retried: u64,
    /// Jobs that ran out of attempts.
    pub dead: u64,
    /// Jobs whose lease this worker found taken when renewing (it renewed
    /// too late; they may run twice).
    pub leases_lost: u64,
    /// Claim statements run (each looks for due jobs).
    pub claims: u64,
}

/// Counters and their metric handles, registered once per worker.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) claims: AtomicU64,
    m_processed: metrics::Counter,
    m_failed: metrics::Counter,
    m_retried: metrics::Counter,
    m_dead: metrics::Counter,
    m_handler: metrics::Histogram,
    m_depth: [metrics::Gauge; 4],
    m_oldest: metrics::Gauge,
}

impl Counters {
    pub(crate) fn new(queue: &str) -> Self {
        let q = queue.to_string();
        let depth = |state: &'static str| metrics::gauge!("tower_scale_queue_jobs", "queue" => q.clone(), "state" => state);
        Self {
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            m_processed: metrics::counter!("tower_scale_queue_processed_total", "queue" => q.clone()),
            m_failed: metrics::counter!("tower_scale_queue_failed_total", "queue" => q.clone()),
            m_retried: metrics::counter!("tower_scale_queue_retried_total", "queue" => q.clone()),
            m_dead: metrics::counter!("tower_scale_queue_dead_total", "queue" => q.clone()),
            m_handler: metrics::histogram!("tower_scale_queue_handler_seconds", "queue" => q.clone()),
            m_depth: [
                depth("ready"),
                depth("scheduled"),
                depth("running"),
                depth("dead"),
            ],
            m_oldest: metrics::gauge!("tower_scale_queue_oldest_ready_seconds", "queue" => q),
        }
    }

    pub(crate) fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            processed: self.processed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            leases_lost: self.leases_lost.load(Ordering::Relaxed),
            claims: self.claims.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn handled(&self, took: Duration) {
        self.m_handler.record(took.as_secs_f64());
    }

    pub(crate) fn processed(&self, n: u64) {
        self.processed.fetch_add(n, Ordering::Relaxed);
        self.m_processed.increment(n);
    }

    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.m_failed.increment(1);
    }

    /// A failed or expired job's new state: `ready` (retried) or `dead`.
    pub(crate) fn rescheduled(&self, state: &str) {
        if state == "dead" {
            self.dead.fetch_add(1, Ordering::Relaxed);
            self.m_dead.increment(1);
        } else {
            self.retried.fetch_add(1, Ordering::Relaxed);
            self.m_retried.increment(1);
        }
    }

    pub(crate) fn depth(&self, d: &Depth) {
        for (gauge, n) in self
            .m_depth
            .iter()
            .zip([d.ready, d.scheduled, d.running, d.dead])
        {
            gauge.set(n as f64);
        }
        self.m_oldest
            .set(d.oldest_ready.map_or(0.0, |age| age.as_secs_f64()));
    }
}
