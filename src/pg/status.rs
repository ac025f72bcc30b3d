//! What [`Cluster::status`](super::Cluster::status) reports per node, and
//! the node's distance: the monitor's probe round trip, smoothed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::balance::ramp_weight;
use super::lsn::Lsn;
use super::node::{Node, PoolStatus, Role};

/// Weight of a new round-trip sample in the estimate.
const RTT_ALPHA: f64 = 0.3;

impl Node {
    /// The probe round trip, smoothed (zero until the first probe answered).
    pub(crate) fn rtt(&self) -> Duration {
        Duration::from_nanos(self.rtt_nanos.load(Ordering::Relaxed))
    }

    /// Folds one probe's round trip into the estimate (the first sample is
    /// taken as it is) and publishes it as `tower_scale_db_node_rtt_seconds`.
    pub(super) fn record_rtt(&self, sample: Duration) {
        let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
        let old = self.rtt_nanos.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old as f64 * (1.0 - RTT_ALPHA) + sample as f64 * RTT_ALPHA) as u64
        }
        .max(1);
        self.rtt_nanos.store(new, Ordering::Relaxed);
        self.rtt_gauge.set(new as f64 / 1e9);
    }

    pub(super) fn snapshot(&self, started: Instant, ramp: Duration) -> NodeStatus {
        let since = self.healthy_since_ms();
        let now_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        NodeStatus {
            name: self.name.to_string(),
            zone: self.zone.clone(),
            region: self.region.clone(),
            rtt: self.rtt(),
            fenced: self.is_fenced(),
            role: self.role(),
            healthy: self.is_healthy(),
            lsn: self.lsn(),
            timeline: self.timeline(),
            lag: self.lag(),
            weight: if self.is_healthy() {
                ramp_weight(Duration::from_millis(now_ms.saturating_sub(since)), ramp)
            } else {
                0.0
            },
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queries: self.queries.load(Ordering::Relaxed),
            pool: self.pool_status(),
        }
    }
}

/// What [`Cluster::status`](super::Cluster::status) reports per node.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// Its zone label.
    pub zone: Option<String>,
    /// Its region label.
    pub region: Option<String>,
    /// The monitor's probe round trip, smoothed (zero until measured):
    /// how far the node is from this instance.
    pub rtt: Duration,
    /// A primary on an older timeline than one this instance has seen (an
    /// old primary after a promotion elsewhere): it gets no writes and no
    /// reads from this instance again
    /// (`tower_scale_db_node_fenced` is 1 for it).
    pub fenced: bool,
    /// Its role as last probed.
    pub role: Role,
    /// In rotation.
    pub healthy: bool,
    /// Replay LSN (replica) or current LSN (primary), as last seen.
    pub lsn: Lsn,
    /// The primary's timeline (0 for replicas).
    pub timeline: u64,
    /// Replication lag (zero when caught up).
    pub lag: Duration,
    /// Its share of reads during re-admission (0 when out, 1 when full).
    pub weight: f64,
    /// Queries running now, or waiting for one of its pooled connections
    /// (the balancer steers away from queued work too).
    pub in_flight: u64,
    /// Queries served since start.
    pub queries: u64,
    /// Its pooled sessions.
    pub pool: PoolStatus,
}
