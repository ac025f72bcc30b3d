//! The health monitor: probes every node, learns its role, timeline and
//! LSN, measures replication lag from the primary's LSN history, and elects
//! the primary.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use deadpool_postgres::Object;

use super::cluster::Inner;
use super::lsn::{Lsn, WalLayout};
use super::node::{Node, Role};

/// The monitor task: probe every node each interval (or sooner on request).
pub(super) async fn monitor(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break,
            () = tokio::time::sleep(inner.options.probe_interval) => {}
            () = inner.reprobe.notified() => {}
        }
        probe_all(&inner).await;
    }
    for node in &inner.nodes {
        node.probe_pool.close();
    }
    tracing::debug!("cluster monitor stopped");
}

struct Probe {
    in_recovery: bool,
    lsn: Lsn,
    timeline: u64,
    replay_age: Option<Duration>,
    layout: WalLayout,
    /// The probe query's round trip (the connection's checkout not counted).
    rtt: Duration,
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
    CASE WHEN pg_is_in_recovery() \
         THEN coalesce((SELECT received_tli FROM pg_catalog.pg_stat_wal_receiver), 0)::bigint \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END, \
    CASE WHEN pg_is_in_recovery() \
         THEN extract(epoch FROM (now() - pg_last_xact_replay_timestamp()))::float8 END, \
    current_setting('wal_block_size')::bigint, \
    (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'wal_segment_size')";

async fn probe(node: &Node, timeout: Duration) -> Result<Probe, String> {
    let conn = tokio::time::timeout(timeout, node.probe_pool.get())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // Prepared once per probe session, so the timed query is one round
    // trip: the node's distance (`rtt`).
    let deadline = tokio::time::Instant::now() + timeout;
    let run = async {
        let stmt = conn.prepare_cached(PROBE_SQL).await?;
        let sent = Instant::now();
        let row = conn.query_one(&stmt, &[]).await?;
        Ok::<_, tokio_postgres::Error>((row, sent.elapsed()))
    };
    match tokio::time::timeout_at(deadline, run).await {
        Err(_) => {
            // Never reuse a connection with a query stuck on it.
            drop(Object::take(conn));
            Err("probe timed out".into())
        }
        Ok(Err(e)) => {
            drop(Object::take(conn));
            Err(e.to_string())
        }
        Ok(Ok((row, rtt))) => {
            let lsn: Option<&str> = row.try_get(1).map_err(|e| e.to_string())?;
            Ok(Probe {
                rtt,
                in_recovery: row.try_get(0).map_err(|e| e.to_string())?,
                lsn: lsn.and_then(|s| s.parse().ok()).unwrap_or_default(),
                timeline: u64::try_from(row.try_get::<_, i64>(2).map_err(|e| e.to_string())?)
                    .unwrap_or(0),
                replay_age: row
                    .try_get::<_, Option<f64>>(3)
                    .map_err(|e| e.to_string())?
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64),
                layout: WalLayout {
                    // Pages are 1 kB to 32 kB, segments 1 MB to 1 GB.
                    block: size(row.try_get(4), 1 << 10),
                    segment: size(row.try_get(5), 1 << 20),
                },
            })
        }
    }
}

/// A size setting in bytes, 0 when it is missing, not a power of two, or
/// below `min` (PostgreSQL 10 reports `wal_segment_size` in 8 kB units:
/// 2048, which must not be taken for bytes).
fn size(value: Result<Option<i64>, tokio_postgres::Error>, min: u64) -> u64 {
    match value {
        Ok(Some(n)) => u64::try_from(n)
            .ok()
            .filter(|n| n.is_power_of_two() && *n >= min)
            .unwrap_or(0),
        _ => 0,
    }
}

pub(super) async fn probe_all(inner: &Inner) {
    let timeout = inner.options.probe_timeout;
    let results =
        futures_util::future::join_all(inner.nodes.iter().map(|n| probe(n, timeout))).await;
    let now = Instant::now();
    let now_ms = u64::try_from(inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    for (node, result) in inner.nodes.iter().zip(&results) {
        match result {
            Ok(p) => {
                node.record_rtt(p.rtt);
                node.observe_probe(p.in_recovery, p.lsn, p.timeline, p.layout, now_ms);
            }
            Err(reason) => node.observe_failure(reason),
        }
    }
    fence_old_primaries(inner);
    let current = inner.primary.load(Ordering::Acquire);
    let claimants = inner.nodes.iter().enumerate().map(|(i, n)| Claimant {
        index: i,
        claims: n.is_healthy() && n.role() == Role::Primary && !n.is_fenced(),
        timeline: n.timeline(),
        configured_primary: n.configured_primary,
    });
    match elect_primary(claimants, current) {
        Some(i) => {
            if i != current {
                tracing::warn!(node = %inner.nodes[i].name, "new primary");
            }
            inner.primary.store(i, Ordering::Release);
        }
        None => inner.primary.store(usize::MAX, Ordering::Release),
    }
    if let Some(primary) = inner.primary_node() {
        let written = Lsn(inner.last_write.load(Ordering::Acquire));
        let primary_lsn = primary.lsn().max(written);
        let mut history = crate::sync::lock(&inner.history);
        history.record(now, primary_lsn);
        for (node, result) in inner.nodes.iter().zip(&results) {
            let Ok(p) = result else { continue };
            let lag = if p.in_recovery {
                history.lag(now, primary_lsn, p.lsn, p.replay_age)
            } else {
                Duration::ZERO
            };
            node.set_lag(lag);
            // Zero once a node is promoted, so no alert stays stuck on it.
            metrics::gauge!("tower_scale_db_replica_lag_seconds", node.labels.clone())
                .set(lag.as_secs_f64());
        }
    }
    let elected = inner.primary.load(Ordering::Acquire);
    for (i, node) in inner.nodes.iter().enumerate() {
        let (healthy, primary) = (node.is_healthy(), i == elected);
        metrics::gauge!("tower_scale_db_node_healthy", node.labels.clone()).set(if healthy {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("tower_scale_db_node_primary", node.labels.clone())
            .set(if healthy && primary { 1.0 } else { 0.0 });
        metrics::gauge!("tower_scale_db_node_fenced", node.labels.clone())
            .set(if node.is_fenced() { 1.0 } else { 0.0 });
        let pool = node.pool_status();
        for (state, n) in [
            ("max", pool.max),
            ("open", pool.open),
            ("in_use", pool.in_use),
            ("idle", pool.idle),
            ("waiting", pool.waiting),
        ] {
            let mut labels = node.labels.clone();
            labels.push(metrics::Label::new("state", state));
            metrics::gauge!("tower_scale_db_pool_connections", labels).set(n as f64);
        }
    }
    inner.changed.notify_waiters();
}

/// Fences every primary on an older timeline than the newest this
/// instance has seen a primary on (an old primary that came back after a
/// promotion, or that this instance could still reach through a
/// partition): it never gets a write or a read from this instance again,
/// even if the new primary becomes unreachable. Replicas are fenced the
/// same way by the timeline they receive (`pg_stat_wal_receiver`, which
/// needs `pg_read_all_stats` or a superuser; unknown: not fenced): one
/// still following the old primary, or the old primary restarted as a
/// standby without a rewind, serves no read. A fenced node that receives
/// the newest timeline again (rebuilt to follow the new primary) is let
/// back in. Unreachable nodes keep their mark.
fn fence_old_primaries(inner: &Inner) {
    for node in &inner.nodes {
        if node.is_healthy() && node.role() == Role::Primary {
            inner
                .newest_timeline
                .fetch_max(node.timeline(), Ordering::AcqRel);
        }
    }
    let newest = inner.newest_timeline.load(Ordering::Acquire);
    for node in inner.nodes.iter().filter(|n| n.is_healthy()) {
        // A replica whose timeline is unknown (0: not streaming, or a role
        // that may not read it) is not fenced by it.
        let old = match node.role() {
            Role::Primary => node.timeline() < newest,
            _ => node.timeline() != 0 && node.timeline() < newest,
        };
        if node.fenced.swap(old, Ordering::AcqRel) != old {
            if old {
                tracing::error!(
                    node = %node.name,
                    timeline = node.timeline(),
                    newest_timeline = newest,
                    "a node on an older timeline than the newest primary's: fenced (no more writes or reads from this instance); writes an old primary acknowledged after the promotion are not on the new primary"
                );
            } else {
                tracing::info!(node = %node.name, "a fenced node follows the newest timeline now: back in rotation");
            }
        }
    }
}

/// A node as the election sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claimant {
    pub(super) index: usize,
    /// Healthy and not in recovery.
    pub(super) claims: bool,
    pub(super) timeline: u64,
    pub(super) configured_primary: bool,
}

/// The primary: a healthy node that says it is one. Two claimants (an old
/// primary came back after a promotion) are settled by the higher timeline,
/// then by staying with the current one, then by the configured primary.
pub(super) fn elect_primary(
    claimants: impl Iterator<Item = Claimant>,
    current: usize,
) -> Option<usize> {
    claimants
        .filter(|c| c.claims)
        .max_by_key(|c| (c.timeline, c.index == current, c.configured_primary))
        .map(|c| c.index)
}

/// (time, primary LSN) samples, newest last: how long a replica has been
/// missing WAL is the age of the first sample above its replay LSN.
#[derive(Debug, Default)]
pub(super) struct LagHistory {
    samples: VecDeque<(Instant, Lsn)>,
}

/// Samples kept: a few minutes at the default probe interval; older ones
/// only say "lagging at least that long".
pub(super) const LAG_HISTORY: usize = 2048;

impl LagHistory {
    /// Records the primary's LSN at `now` (only when it moved).
    pub(super) fn record(&mut self, now: Instant, primary_lsn: Lsn) {
        if self.samples.back().is_none_or(|(_, l)| *l < primary_lsn) {
            self.samples.push_back((now, primary_lsn));
        }
        while self.samples.len() > LAG_HISTORY {
            self.samples.pop_front();
        }
    }

    /// A replica's lag: zero when it has replayed the primary's LSN, else
    /// how long ago the primary first went past its replay LSN, capped by
    /// the age of its last replayed transaction when known (that age alone
    /// grows on an idle primary; the history is never too small by more
    /// than a probe interval). Never zero while behind.
    pub(super) fn lag(
        &self,
        now: Instant,
        primary_lsn: Lsn,
        replay_lsn: Lsn,
        replay_age: Option<Duration>,
    ) -> Duration {
        if replay_lsn >= primary_lsn {
            return Duration::ZERO;
        }
        let behind_since = self
            .samples
            .iter()
            .find(|(_, l)| *l > replay_lsn)
            .map(|(t, _)| now.saturating_duration_since(*t))
            .unwrap_or_default();
        match replay_age {
            Some(age) => behind_since.min(age),
            None => behind_since,
        }
        .max(Duration::from_nanos(1))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.samples.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimant(index: usize, claims: bool, timeline: u64, configured: bool) -> Claimant {
        Claimant {
            index,
            claims,
            timeline,
            configured_primary: configured,
        }
    }

    #[test]
    fn the_election_prefers_the_higher_timeline_then_the_current_primary() {
        // The old primary (configured, timeline 1) came back after node 1
        // was promoted onto timeline 2: node 1 stays primary.
        let nodes = [claimant(0, true, 1, true), claimant(1, true, 2, false)];
        assert_eq!(elect_primary(nodes.into_iter(), 1), Some(1));
        assert_eq!(elect_primary(nodes.into_iter(), 0), Some(1));
        // Same timeline: no flapping away from the current one.
        let tie = [claimant(0, true, 3, true), claimant(1, true, 3, false)];
        assert_eq!(elect_primary(tie.into_iter(), 1), Some(1));
        // No current claimant: the configured primary wins the tie.
        assert_eq!(elect_primary(tie.into_iter(), usize::MAX), Some(0));
        // Unhealthy or in recovery: no claim.
        let none = [claimant(0, false, 9, true), claimant(1, false, 2, false)];
        assert_eq!(elect_primary(none.into_iter(), 0), None);
    }

    #[test]
    fn lag_is_the_age_of_the_first_write_a_replica_has_not_replayed() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = LagHistory::default();
        h.record(at(0), Lsn(100));
        h.record(at(1_000), Lsn(200));
        h.record(at(1_500), Lsn(200)); // unchanged: not recorded
        h.record(at(2_000), Lsn(300));
        assert_eq!(h.len(), 3);
        // Caught up.
        assert_eq!(h.lag(at(3_000), Lsn(300), Lsn(300), None), Duration::ZERO);
        assert_eq!(h.lag(at(3_000), Lsn(300), Lsn(301), None), Duration::ZERO);
        // Missing 200 since t=1s: 2 s behind at t=3s.
        assert_eq!(
            h.lag(at(3_000), Lsn(300), Lsn(150), None),
            Duration::from_secs(2)
        );
        // The replay timestamp's age caps it.
        assert_eq!(
            h.lag(
                at(3_000),
                Lsn(300),
                Lsn(150),
                Some(Duration::from_millis(400))
            ),
            Duration::from_millis(400)
        );
        // Behind but with no sample above it yet: still not zero.
        assert!(h.lag(at(3_000), Lsn(400), Lsn(300), Some(Duration::ZERO)) > Duration::ZERO);
    }

    #[test]
    fn the_history_is_bounded() {
        let t0 = Instant::now();
        let mut h = LagHistory::default();
        for i in 0..(LAG_HISTORY as u64 + 500) {
            h.record(t0 + Duration::from_millis(i), Lsn(i + 1));
        }
        assert_eq!(h.len(), LAG_HISTORY);
        // The oldest samples went: a replica further behind than the
        // history reaches counts from the oldest kept sample.
        let now = t0 + Duration::from_millis(LAG_HISTORY as u64 + 500);
        assert_eq!(
            h.lag(now, Lsn(LAG_HISTORY as u64 + 500), Lsn(0), None),
            Duration::from_millis(LAG_HISTORY as u64)
        );
    }
}
