//! One node: its pools, what the monitor last saw of it (role, health,
//! LSN, lag), its latency estimate, and the cancel path for its queries.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{CancelToken, Socket};

use super::config::{ClusterBuilder, NodeConfig};
use super::error::{DbError, PoolTimeout};
use super::lsn::{Lsn, WalLayout};
pub use super::pool::PoolStatus;
use super::pool::PoolTimeouts;
pub use super::status::NodeStatus;
use crate::error::ConfigError;

const ROLE_UNKNOWN: u8 = 0;
const ROLE_PRIMARY: u8 = 1;
const ROLE_REPLICA: u8 = 2;

/// What the monitor last saw a node as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// Not probed yet, or unreachable since start.
    Unknown,
    /// Accepts writes (`pg_is_in_recovery()` is false).
    Primary,
    /// A standby.
    Replica,
}

/// Sends a cancel request for a query through the cluster's own TLS
/// connector (a cluster that requires TLS refuses plain cancel requests).
pub(crate) type Canceller =
    Arc<dyn Fn(CancelToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub(super) fn canceller<T>(tls: T, bound: Duration) -> Canceller
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Arc::new(move |token: CancelToken| {
        let tls = tls.clone();
        Box::pin(async move {
            // Connecting to a stalled server must not hang the task either.
            if tokio::time::timeout(bound, token.cancel_query(tls))
                .await
                .is_err()
            {
                tracing::debug!("cancel request timed out");
            }
        })
    })
}

/// One node: its pools and what the monitor knows of it.
pub(crate) struct Node {
    pub(crate) name: Arc<str>,
    /// `node`, and `cluster` if the cluster is named: every
    /// `tower_scale_db_*` series of this node carries them.
    pub(crate) labels: Vec<metrics::Label>,
    /// `tower_scale_db_statement_cache_clears_total`.
    pub(crate) statement_cache_clears: metrics::Counter,
    /// How to reach the node, as configured (the change feed opens its
    /// replication session with it).
    #[cfg_attr(not(feature = "change-feed"), allow(dead_code))]
    pub(crate) conn: tokio_postgres::Config,
    pub(crate) zone: Option<String>,
    pub(crate) region: Option<String>,
    /// The probe round trip's EWMA in nanoseconds (0: not measured).
    pub(super) rtt_nanos: AtomicU64,
    /// `tower_scale_db_node_rtt_seconds`.
    pub(super) rtt_gauge: metrics::Gauge,
    /// A primary on an older timeline than the newest this instance has
    /// seen: never written to or read from again.
    pub(super) fenced: AtomicBool,
    /// Every query's sessions: read-write on the configured primary,
    /// read-only on a configured replica until it is promoted.
    pool: Pool,
    /// A configured replica's read-write pool, made when the monitor first
    /// sees it promoted; from then on it serves every query on the node
    /// and the read-only pool is closed. So the node never has more than
    /// `pool_size` pooled sessions at a time beyond the promotion's
    /// in-flight queries.
    promoted_pool: OnceLock<Pool>,
    /// Builds the read-write pool of a configured replica.
    make_write_pool: Option<Box<dyn Fn() -> Result<Pool, ConfigError> + Send + Sync>>,
    /// Set by [`close`](Self::close): a pool made after it is closed at once.
    closed: AtomicBool,
    pub(super) probe_pool: Pool,
    pub(crate) configured_primary: bool,
    role: AtomicU8,
    healthy: AtomicBool,
    /// Replay LSN (replica) or current LSN (primary), as last seen.
    lsn: AtomicU64,
    timeline: AtomicU64,
    wal_block: AtomicU64,
    wal_segment: AtomicU64,
    lag_nanos: AtomicU64,
    healthy_since_ms: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    latency_ewma_nanos: AtomicU64,
    latency_at_nanos: AtomicU64,
    latency_samples: AtomicU64,
    pub(crate) queries: AtomicU64,
    /// Registered once: a per-query `counter!` with a label hashes the
    /// label set on every query.
    queries_total: metrics::Counter,
    pool_wait: metrics::Histogram,
    /// `LISTEN` on a session of its own, as the write pool connects.
    #[cfg(any(feature = "queue", feature = "shard"))]
    pub(crate) listen: super::listen::Listen,
}

/// Samples a node needs before its latency counts in the balance.
const LATENCY_WARMUP: u64 = 8;

/// A sample counts for at most this many times the current estimate.
const LATENCY_OUTLIER_CAP: u64 = 4;

/// Without new samples a node's latency estimate halves this often.
const LATENCY_HALF_LIFE: Duration = Duration::from_millis(250);

impl Node {
    pub(super) fn new<T>(
        b: &ClusterBuilder,
        name: String,
        config: NodeConfig,
        is_primary: bool,
        tls: T,
    ) -> Result<Self, ConfigError>
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        // Registered once: a query never looks a label set up.
        let mut labels = vec![metrics::Label::new("node", name.clone())];
        if let Some(cluster) = &b.name {
            labels.push(metrics::Label::new("cluster", cluster.clone()));
        }
        let conn = config.config.clone();
        let mut pg = config.config.clone();
        let mut options = String::new();
        if let Some(existing) = pg.get_options() {
            options.push_str(existing);
            options.push(' ');
        }
        if let Some(timeout) = b.statement_timeout {
            options.push_str(&format!("-c statement_timeout={} ", timeout.as_millis()));
        }
        let probe = pg.clone();
        let mut write = pg.clone();
        write.options(options.trim());
        if write.get_application_name().is_none() {
            write.application_name("tower-scale");
        }
        if !is_primary {
            // Replica sessions are read-only; a promoted replica keeps
            // read-only sessions until the pool is recycled, so writes are
            // routed by role, never to a replica's pool.
            options.push_str("-c default_transaction_read_only=on");
        }
        pg.options(options.trim());
        if pg.get_application_name().is_none() {
            pg.application_name("tower-scale");
        }
        let timeouts = PoolTimeouts {
            create: b.create_timeout,
            recycle: b.recycle_timeout,
            recycling: b.recycling.clone(),
        };
        let build_pool = |pg: tokio_postgres::Config, size: usize, wait: Duration| {
            timeouts.build(pg, tls.clone(), size, wait)
        };
        #[cfg(any(feature = "queue", feature = "shard"))]
        let listen = {
            let mut listen = write.clone();
            listen.application_name("tower-scale-listen");
            super::listen::listener(listen, tls.clone(), b.create_timeout)
        };
        let mut probe = probe;
        probe.application_name("tower-scale-monitor");
        probe.connect_timeout(b.probe_timeout);
        Ok(Self {
            conn,
            zone: config.zone,
            region: config.region,
            rtt_nanos: AtomicU64::new(0),
            rtt_gauge: metrics::gauge!("tower_scale_db_node_rtt_seconds", labels.clone()),
            fenced: AtomicBool::new(false),
            pool: build_pool(pg, b.pool_size, b.wait_timeout)?,
            promoted_pool: OnceLock::new(),
            closed: AtomicBool::new(false),
            make_write_pool: if is_primary {
                None
            } else {
                let (size, wait, tls) = (b.pool_size, b.wait_timeout, tls.clone());
                let timeouts = timeouts.clone();
                Some(Box::new(move || {
                    timeouts.build(write.clone(), tls.clone(), size, wait)
                }))
            },
            probe_pool: build_pool(probe, 1, b.probe_timeout)?,
            configured_primary: is_primary,
            role: AtomicU8::new(ROLE_UNKNOWN),
            healthy: AtomicBool::new(false),
            lsn: AtomicU64::new(0),
            timeline: AtomicU64::new(0),
            wal_block: AtomicU64::new(0),
            wal_segment: AtomicU64::new(0),
            lag_nanos: AtomicU64::new(0),
            healthy_since_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            // Unmeasured: as cheap as can be, so it gets tried and measured.
            latency_ewma_nanos: AtomicU64::new(0),
            latency_at_nanos: AtomicU64::new(0),
            latency_samples: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            queries_total: metrics::counter!("tower_scale_db_queries_total", labels.clone()),
            pool_wait: metrics::histogram!("tower_scale_db_pool_wait_seconds", labels.clone()),
            statement_cache_clears: metrics::counter!(
                "tower_scale_db_statement_cache_clears_total",
                labels.clone()
            ),
            labels,
            #[cfg(any(feature = "queue", feature = "shard"))]
            listen,
            name: Arc::from(name),
        })
    }

    pub(crate) fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            ROLE_PRIMARY => Role::Primary,
            ROLE_REPLICA => Role::Replica,
            _ => Role::Unknown,
        }
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn lsn(&self) -> Lsn {
        Lsn(self.lsn.load(Ordering::Acquire))
    }

    /// Raises the known LSN (never lowers it: replay only moves forward).
    pub(crate) fn observe_lsn(&self, lsn: Lsn) {
        self.lsn.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// Why a write is not sent to this node once fenced.
    pub(crate) fn fenced_error(&self) -> super::DbError {
        super::DbError::NoPrimary {
            tried: vec![format!(
                "{} (fenced: on an older timeline than the newest primary's)",
                self.name
            )],
        }
    }

    /// Whether the node is an old primary this instance has fenced off.
    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    pub(crate) fn timeline(&self) -> u64 {
        self.timeline.load(Ordering::Acquire)
    }

    /// The node's WAL layout as last probed (zeros before the first probe).
    pub(crate) fn wal_layout(&self) -> WalLayout {
        WalLayout {
            block: self.wal_block.load(Ordering::Relaxed),
            segment: self.wal_segment.load(Ordering::Relaxed),
        }
    }

    pub(super) fn set_lag(&self, lag: Duration) {
        self.lag_nanos.store(
            u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }

    /// A probe answered: the node's role, LSN and timeline as it reported
    /// them; back in rotation (its ramp starts at `now_ms`) if it was out.
    pub(super) fn observe_probe(
        &self,
        in_recovery: bool,
        lsn: Lsn,
        timeline: u64,
        layout: WalLayout,
        now_ms: u64,
    ) {
        self.wal_block.store(layout.block, Ordering::Relaxed);
        self.wal_segment.store(layout.segment, Ordering::Relaxed);
        if !in_recovery {
            self.promote_pool();
        }
        self.role.store(
            if in_recovery {
                ROLE_REPLICA
            } else {
                ROLE_PRIMARY
            },
            Ordering::Release,
        );
        self.lsn.store(lsn.0, Ordering::Release);
        self.timeline.store(timeline, Ordering::Release);
        if !self.healthy.swap(true, Ordering::AcqRel) {
            self.healthy_since_ms.store(now_ms, Ordering::Release);
            tracing::info!(node = %self.name, "node in rotation");
        }
    }

    /// A probe failed: out of rotation, idle connections dropped.
    pub(super) fn observe_failure(&self, reason: &str) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.name, %reason, "node out of rotation");
        }
        self.drain();
    }

    /// When the node last came back into rotation, in milliseconds since
    /// the cluster started.
    pub(super) fn healthy_since_ms(&self) -> u64 {
        self.healthy_since_ms.load(Ordering::Acquire)
    }

    pub(crate) fn lag(&self) -> Duration {
        Duration::from_nanos(self.lag_nanos.load(Ordering::Acquire))
    }

    /// The latency EWMA, decayed by half every [`LATENCY_HALF_LIFE`] without a
    /// new sample, so a node that was slow once is tried again.
    pub(crate) fn latency(&self, started: Instant) -> Duration {
        if self.latency_samples.load(Ordering::Relaxed) < LATENCY_WARMUP {
            // Not measured enough yet: look cheap, so it gets measured.
            return Duration::ZERO;
        }
        let ewma = self.latency_ewma_nanos.load(Ordering::Relaxed) as f64;
        let last = self.latency_at_nanos.load(Ordering::Relaxed);
        let now = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let age = now.saturating_sub(last) as f64 / LATENCY_HALF_LIFE.as_nanos() as f64;
        Duration::from_nanos((ewma * 0.5f64.powf(age)) as u64)
    }

    /// Folds one observed latency into the EWMA (alpha 0.2). After the
    /// warm-up a sample counts for at most [`LATENCY_OUTLIER_CAP`] times the
    /// estimate, so one outlier (a lock wait, a checkpoint) raises it by at
    /// most 1.6 times and the node is not shunned for long; a node that
    /// really got slower gets there in a few reads.
    pub(crate) fn record_latency(&self, d: Duration, started: Instant) {
        self.latency_at_nanos.store(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let sample = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let old = self.latency_ewma_nanos.load(Ordering::Relaxed);
        let samples = self.latency_samples.fetch_add(1, Ordering::Relaxed);
        let new = if samples < LATENCY_WARMUP {
            // The first queries on a node are slow (cold caches, new
            // sessions): the warm-up keeps the best of them.
            if old == 0 { sample } else { old.min(sample) }
        } else {
            let sample = if old > 0 {
                sample.min(old.saturating_mul(LATENCY_OUTLIER_CAP))
            } else {
                sample
            };
            (old / 5).saturating_mul(4).saturating_add(sample / 5)
        };
        self.latency_ewma_nanos.store(new, Ordering::Relaxed);
    }

    /// A read the node failed for a reason of its own (see
    /// [`node_trouble`](super::error::node_trouble)): it counts as measured
    /// and at least twice as slow as it was (and at least 1 ms), so a node
    /// that fails fast does not draw the reads its quick failures would
    /// otherwise earn it.
    pub(crate) fn record_failure(&self, d: Duration, started: Instant) {
        self.latency_at_nanos.store(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let sample = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let old = self.latency_ewma_nanos.load(Ordering::Relaxed);
        let new = old.saturating_mul(2).max(sample).max(1_000_000);
        self.latency_ewma_nanos.store(new, Ordering::Relaxed);
        self.latency_samples
            .fetch_max(LATENCY_WARMUP, Ordering::Relaxed);
    }

    /// Takes the node out of rotation until the monitor sees it healthy.
    pub(crate) fn mark_down(&self) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.name, "node taken out of rotation");
        }
        self.drain();
    }

    /// A configured replica seen promoted: its read-write pool takes over
    /// (made once), and the read-only one closes (idle sessions at once,
    /// busy ones when their queries end).
    fn promote_pool(&self) {
        let Some(make) = &self.make_write_pool else {
            return;
        };
        if self.promoted_pool.get().is_some() {
            return;
        }
        match make() {
            Ok(pool) => {
                if self.promoted_pool.set(pool).is_ok() {
                    self.pool.close();
                    tracing::info!(node = %self.name, "promoted: read-write sessions from now on");
                }
                // The cluster shut down while this probe ran.
                if self.closed.load(Ordering::Acquire)
                    && let Some(pool) = self.promoted_pool.get()
                {
                    pool.close();
                }
            }
            Err(e) => {
                tracing::error!(node = %self.name, error = %e, "cannot make the promoted node's pool")
            }
        }
    }

    /// The pool every query on the node uses now.
    pub(crate) fn pool(&self) -> &Pool {
        self.promoted_pool.get().unwrap_or(&self.pool)
    }

    /// Closes the node's pools (the cluster shuts down).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.pool.close();
        if let Some(pool) = self.promoted_pool.get() {
            pool.close();
        }
        self.probe_pool.close();
    }

    /// The pooled sessions now (the probe's is not counted).
    pub(crate) fn pool_status(&self) -> PoolStatus {
        let s = self.pool().status();
        PoolStatus {
            max: s.max_size,
            open: s.size,
            in_use: s.size.saturating_sub(s.available),
            idle: s.available,
            waiting: s.waiting,
        }
    }

    /// Drops the idle connections: after a crash or restart they are dead,
    /// and handing them out would fail the next reads.
    pub(crate) fn drain(&self) {
        self.pool().retain(|_, _| false);
    }

    pub(crate) fn demote(&self) {
        self.role.store(ROLE_REPLICA, Ordering::Release);
    }

    /// Checks out a connection, mapping pool errors to typed ones.
    ///
    /// Reads and writes share the node's pool. Writes go to the node the
    /// monitor sees as the primary, whose pool is read-write by then; one
    /// that reaches a replica anyway gets a read-only session and the
    /// server's refusal ([`DbError::ReadOnly`]).
    pub(crate) async fn connection(&self) -> Result<Object, DbError> {
        let started = Instant::now();
        let mut result = self.pool().get().await;
        if matches!(result, Err(deadpool_postgres::PoolError::Closed))
            && let Some(promoted) = self.promoted_pool.get()
        {
            // The read-only pool closed under us: the node was promoted.
            result = promoted.get().await;
        }
        self.pool_wait.record(started.elapsed().as_secs_f64());
        result.map_err(|e| pool_error(&self.name, e))
    }

    /// One more query on this node (its count and the metric).
    pub(crate) fn count_query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.queries_total.increment(1);
    }
}

pub(crate) fn pool_error(node: &Arc<str>, e: deadpool_postgres::PoolError) -> DbError {
    use deadpool_postgres::{PoolError, TimeoutType};
    match e {
        PoolError::Timeout(kind) => DbError::PoolTimeout {
            node: Arc::clone(node),
            kind: match kind {
                TimeoutType::Wait => PoolTimeout::Wait,
                TimeoutType::Create => PoolTimeout::Create,
                TimeoutType::Recycle => PoolTimeout::Recycle,
            },
        },
        PoolError::Backend(source) => DbError::Connect {
            node: Arc::clone(node),
            source: Arc::new(source),
        },
        _ => DbError::Shutdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        let config = NodeConfig::new(tokio_postgres::Config::new());
        let built = Node::new(
            &ClusterBuilder::default(),
            "n".into(),
            config,
            false,
            tokio_postgres::NoTls,
        );
        built.unwrap_or_else(|e| panic!("node: {e}"))
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    #[test]
    fn one_outlier_moves_the_estimate_by_at_most_sixty_percent() {
        let (n, started) = (node(), Instant::now());
        for _ in 0..LATENCY_WARMUP {
            n.record_latency(Duration::from_millis(1), started);
        }
        n.record_latency(Duration::from_secs(1), started);
        let after = ms(n.latency(started));
        assert!((1.5..=1.61).contains(&after), "{after} ms");
        // A node that really got slower gets there in a few reads.
        for _ in 0..12 {
            n.record_latency(Duration::from_millis(50), started);
        }
        assert!(ms(n.latency(started)) > 40.0, "{:?}", n.latency(started));
    }

    #[test]
    fn a_node_that_fails_fast_does_not_look_cheap() {
        let (n, started) = (node(), Instant::now());
        // Unmeasured: looks free, so it gets measured.
        assert_eq!(n.latency(started), Duration::ZERO);
        n.record_failure(Duration::from_micros(20), started);
        assert!(ms(n.latency(started)) >= 0.99, "{:?}", n.latency(started));
        for _ in 0..LATENCY_WARMUP {
            n.record_latency(Duration::from_millis(2), started);
        }
        let before = ms(n.latency(started));
        n.record_failure(Duration::from_micros(20), started);
        assert!(ms(n.latency(started)) >= 1.9 * before, "{before} ms");
    }
}
