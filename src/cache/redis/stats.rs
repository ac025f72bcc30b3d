//! The tier's counters ([`RedisStats`]), their snapshot
//! ([`RedisStatsSnapshot`]) and how a snapshot is recorded in the
//! `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the shared tier (also in the `metrics` facade as
/// `tower_scale_cache_l2_*`).
#[derive(Debug, Default)]
pub struct RedisStats {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) fanout_received: AtomicU64,
    pub(super) lease_waits: AtomicU64,
    pub(super) subscriptions: AtomicU64,
    pub(super) refused_writes: AtomicU64,
    pub(super) heartbeats: AtomicU64,
}

/// A snapshot of [`RedisStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStatsSnapshot {
    /// L1 misses answered by Redis.
    pub hits: u64,
    /// L1 misses Redis did not have.
    pub misses: u64,
    /// Failed or timed-out Redis calls.
    pub errors: u64,
    /// Invalidations received from other instances.
    pub fanout_received: u64,
    /// Fills that waited for another instance's lease.
    pub lease_waits: u64,
    /// True while the circuit is open (Redis not called).
    pub circuit_open: bool,
    /// True while subscribed to the invalidation channel.
    pub subscribed: bool,
    /// Successful subscriptions so far (more than one: it was lost and regained).
    pub subscriptions: u64,
    /// Writes Redis refused (out of memory under `noeviction`): fills not
    /// stored, generation bumps replaced by deletes.
    pub refused_writes: u64,
    /// This instance's heartbeats heard back through the subscription.
    pub heartbeats: u64,
    /// This instance's invalidations waiting for Redis now.
    pub queued_invalidations: u64,
}

impl RedisStats {
    /// The counters now, with the tier's state that is not a counter.
    pub(super) fn snapshot(
        &self,
        circuit_open: bool,
        subscribed: bool,
        queued_invalidations: u64,
    ) -> RedisStatsSnapshot {
        RedisStatsSnapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            fanout_received: self.fanout_received.load(Ordering::Relaxed),
            lease_waits: self.lease_waits.load(Ordering::Relaxed),
            circuit_open,
            subscribed,
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            refused_writes: self.refused_writes.load(Ordering::Relaxed),
            heartbeats: self.heartbeats.load(Ordering::Relaxed),
            queued_invalidations,
        }
    }
}

impl RedisStatsSnapshot {
    /// Records the snapshot in the `metrics` facade, labelled with the
    /// tier's `prefix`.
    pub(super) fn record(&self, prefix: &str) {
        let s = self;
        for (name, v) in [
            ("tower_scale_cache_l2_redis_hits_total", s.hits),
            ("tower_scale_cache_l2_misses_total", s.misses),
            ("tower_scale_cache_l2_errors_total", s.errors),
            (
                "tower_scale_cache_l2_fanout_received_total",
                s.fanout_received,
            ),
            ("tower_scale_cache_l2_lease_waits_total", s.lease_waits),
            (
                "tower_scale_cache_l2_refused_writes_total",
                s.refused_writes,
            ),
            ("tower_scale_cache_l2_heartbeats_total", s.heartbeats),
        ] {
            metrics::counter!(name, "prefix" => prefix.to_owned()).absolute(v);
        }
        metrics::gauge!("tower_scale_cache_l2_circuit_open", "prefix" => prefix.to_owned())
            .set(if s.circuit_open { 1.0 } else { 0.0 });
        metrics::gauge!("tower_scale_cache_l2_queued_invalidations", "prefix" => prefix.to_owned())
            .set(s.queued_invalidations as f64);
    }
}
