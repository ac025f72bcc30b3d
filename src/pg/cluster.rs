//! The cluster: nodes with their pools and live state, the builder, and the
//! monitor that keeps the state current.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::Notify;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{CancelToken, NoTls, Socket};
use tokio_util::sync::CancellationToken;

use super::balance::ramp_weight;
use super::error::{DbError, PoolTimeout};
use super::lsn::Lsn;
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

/// How one node is reached.
#[derive(Clone)]
pub struct NodeConfig {
    pub(crate) name: Option<String>,
    pub(crate) zone: Option<String>,
    pub(crate) config: tokio_postgres::Config,
}

impl NodeConfig {
    /// A node from a `tokio_postgres::Config`.
    pub fn new(config: tokio_postgres::Config) -> Self {
        Self {
            name: None,
            zone: None,
            config,
        }
    }

    /// A node from a URL (`postgresql://user@host:port/db`) or key-value
    /// string (`host=... port=...`).
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        url.parse::<tokio_postgres::Config>()
            .map(Self::new)
            .map_err(|e| ConfigError::OutOfRange {
                field: "node url",
                reason: e.to_string(),
            })
    }

    /// Names the node (default: `primary`, `replica-1`, ... in order).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Labels the node with a zone; replicas in the cluster's zone are preferred.
    #[must_use]
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
}

impl fmt::Debug for NodeConfig {
    /// Host, port, user and database only: never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeConfig")
            .field("name", &self.name)
            .field("zone", &self.zone)
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("user", &self.config.get_user())
            .field("dbname", &self.config.get_dbname())
            .finish()
    }
}

impl From<tokio_postgres::Config> for NodeConfig {
    fn from(config: tokio_postgres::Config) -> Self {
        Self::new(config)
    }
}

/// Configures a [`Cluster`]. Defaults are listed on each setter.
#[must_use]
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    primary: Option<NodeConfig>,
    replicas: Vec<NodeConfig>,
    zone: Option<String>,
    pool_size: usize,
    wait_timeout: Duration,
    create_timeout: Duration,
    recycle_timeout: Duration,
    recycling: RecyclingMethod,
    statement_timeout: Option<Duration>,
    probe_interval: Duration,
    probe_timeout: Duration,
    lag_budget: Duration,
    readmission_ramp: Duration,
    read_your_writes_wait: Duration,
    primary_wait: Duration,
    fallback_to_primary: bool,
    read_timeout: Duration,
    write_timeout: Duration,
    identity: Option<String>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            zone: None,
            pool_size: 16,
            wait_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(5),
            recycle_timeout: Duration::from_secs(5),
            recycling: RecyclingMethod::Fast,
            statement_timeout: Some(Duration::from_secs(30)),
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(500),
            lag_budget: Duration::from_secs(30),
            readmission_ramp: Duration::from_secs(5),
            read_your_writes_wait: Duration::from_millis(500),
            primary_wait: Duration::from_secs(1),
            fallback_to_primary: true,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            identity: None,
        }
    }
}

impl ClusterBuilder {
    /// The primary (required).
    pub fn primary(mut self, node: impl Into<NodeConfig>) -> Self {
        self.primary = Some(node.into());
        self
    }

    /// Adds a replica.
    pub fn replica(mut self, node: impl Into<NodeConfig>) -> Self {
        self.replicas.push(node.into());
        self
    }

    /// The zone this process runs in: replicas labelled with it are chosen first.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Connections per node (default 16).
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// How long a query waits for a free connection before
    /// [`DbError::PoolTimeout`] (default 5 s; always finite).
    pub fn pool_wait_timeout(mut self, d: Duration) -> Self {
        self.wait_timeout = d;
        self
    }

    /// How long opening a connection may take (default 5 s).
    pub fn pool_create_timeout(mut self, d: Duration) -> Self {
        self.create_timeout = d;
        self
    }

    /// How long checking a returned connection may take (default 5 s).
    pub fn pool_recycle_timeout(mut self, d: Duration) -> Self {
        self.recycle_timeout = d;
        self
    }

    /// How returned connections are checked (default `Fast`: only whether
    /// they are closed).
    pub fn recycling_method(mut self, method: RecyclingMethod) -> Self {
        self.recycling = method;
        self
    }

    /// The sessions' `statement_timeout` (default 30 s; `None` for the
    /// server's setting).
    pub fn statement_timeout(mut self, d: Option<Duration>) -> Self {
        self.statement_timeout = d;
        self
    }

    /// How often the monitor probes each node (default 250 ms).
    pub fn probe_interval(mut self, d: Duration) -> Self {
        self.probe_interval = d;
        self
    }

    /// How long one probe may take before the node counts as down
    /// (default 500 ms).
    pub fn probe_timeout(mut self, d: Duration) -> Self {
        self.probe_timeout = d;
        self
    }

    /// The most lag an `Any` read accepts (default 30 s).
    pub fn lag_budget(mut self, d: Duration) -> Self {
        self.lag_budget = d;
        self
    }

    /// How long a node that came back takes to get its full share again
    /// (default 5 s).
    pub fn readmission_ramp(mut self, d: Duration) -> Self {
        self.readmission_ramp = d;
        self
    }

    /// How long a read-your-writes read waits for a replica to catch up
    /// before it goes to the primary (default 500 ms). It bounds the whole
    /// wait: checking out a replica connection and every catch-up query; a
    /// replica that does not answer within it is left for the primary.
    pub fn read_your_writes_wait(mut self, d: Duration) -> Self {
        self.read_your_writes_wait = d;
        self
    }

    /// How long a write waits for a primary to be found (after a failover)
    /// before [`DbError::NoPrimary`] (default 1 s).
    pub fn primary_wait(mut self, d: Duration) -> Self {
        self.primary_wait = d;
        self
    }

    /// Whether reads with no qualifying replica go to the primary (default)
    /// or fail with [`DbError::NoPrimary`]-style errors.
    pub fn fallback_to_primary(mut self, yes: bool) -> Self {
        self.fallback_to_primary = yes;
        self
    }

    /// The name tokens are bound to (default: the primary's hosts, ports
    /// and database as configured). Instances that share clients must agree
    /// on it; another cluster's tokens are then ignored.
    pub fn identity(mut self, name: impl Into<String>) -> Self {
        self.identity = Some(name.into());
        self
    }

    /// How long a read may take on one node before it is retried once
    /// elsewhere and the node leaves the rotation (default 5 s). It counts
    /// from the moment the read has a connection: waiting for a pooled
    /// connection (bounded by [`pool_wait_timeout`](Self::pool_wait_timeout))
    /// does not count. Keep it above your slowest legitimate read.
    pub fn read_timeout(mut self, d: Duration) -> Self {
        self.read_timeout = d;
        self
    }

    /// How long each statement sent to the primary may take (default 10 s):
    /// a write, then separately the query for its token; in a transaction
    /// `BEGIN`, each statement, and `COMMIT` (with its token). Like the
    /// read timeout it counts once a connection is checked out. A write or
    /// `COMMIT` that times out may have committed
    /// ([`DbError::may_have_committed`]); the primary does not leave the
    /// rotation for it (the monitor decides).
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.primary.is_none() {
            return Err(ConfigError::OutOfRange {
                field: "primary",
                reason: "a cluster needs a primary; call .primary(...)".into(),
            });
        }
        if self.pool_size == 0 {
            return Err(ConfigError::Zero { field: "pool_size" });
        }
        for (field, value) in [
            ("pool_wait_timeout", self.wait_timeout),
            ("pool_create_timeout", self.create_timeout),
            ("pool_recycle_timeout", self.recycle_timeout),
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("read_timeout", self.read_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration { field, value });
            }
        }
        Ok(())
    }

    /// Builds the cluster without TLS and runs a first probe of every node
    /// (bounded by the probe timeout; unreachable nodes are not an error
    /// here, queries report them).
    pub async fn build(self) -> Result<Cluster, ConfigError> {
        self.build_with_tls(NoTls).await
    }

    /// Builds the cluster with a TLS connector (for example from
    /// `postgres-native-tls` or `tokio-postgres-rustls`).
    pub async fn build_with_tls<T>(self, tls: T) -> Result<Cluster, ConfigError>
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.validate()?;
        let mut configs = Vec::new();
        if let Some(primary) = self.primary.clone() {
            configs.push((primary, true));
        }
        configs.extend(self.replicas.iter().cloned().map(|r| (r, false)));
        let mut nodes = Vec::new();
        let mut replica_number = 0;
        for (config, is_primary) in configs {
            let name = match (&config.name, is_primary) {
                (Some(name), _) => name.clone(),
                (None, true) => "primary".to_string(),
                (None, false) => {
                    replica_number += 1;
                    format!("replica-{replica_number}")
                }
            };
            nodes.push(Node::new(&self, name, config, is_primary, tls.clone())?);
        }
        let identity = self.identity.clone().unwrap_or_else(|| {
            let c = self.primary.as_ref().map(|p| &p.config);
            format!(
                "{:?}|{:?}|{:?}",
                c.map(|c| c.get_hosts().to_vec()),
                c.map(|c| c.get_ports().to_vec()),
                c.and_then(|c| c.get_dbname())
            )
        });
        let inner = Arc::new(Inner {
            identity: super::token::cluster_identity(&identity),
            nodes,
            primary: AtomicUsize::new(0),
            options: Options {
                zone: self.zone.clone(),
                lag_budget: self.lag_budget,
                readmission_ramp: self.readmission_ramp,
                read_your_writes_wait: self.read_your_writes_wait,
                primary_wait: self.primary_wait,
                fallback_to_primary: self.fallback_to_primary,
                probe_interval: self.probe_interval,
                probe_timeout: self.probe_timeout,
                read_timeout: self.read_timeout,
                write_timeout: self.write_timeout,
            },
            cancel: canceller(tls.clone(), self.create_timeout),
            started: Instant::now(),
            changed: Notify::new(),
            reprobe: Notify::new(),
            history: Mutex::new(VecDeque::new()),
            last_write: AtomicU64::new(0),
            rng: crate::random::Random::new(0x853C_49E6_748F_EA9B),
            shutdown: CancellationToken::new(),
        });
        probe_all(&inner).await;
        tokio::spawn(monitor(Arc::clone(&inner)));
        let life = Arc::new(Life(inner.shutdown.clone()));
        Ok(Cluster { inner, life })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) zone: Option<String>,
    pub(crate) lag_budget: Duration,
    pub(crate) readmission_ramp: Duration,
    pub(crate) read_your_writes_wait: Duration,
    pub(crate) primary_wait: Duration,
    pub(crate) fallback_to_primary: bool,
    pub(crate) probe_interval: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) write_timeout: Duration,
}

/// Sends a cancel request for a query through the cluster's own TLS
/// connector (a cluster that requires TLS refuses plain cancel requests).
pub(crate) type Canceller =
    Arc<dyn Fn(CancelToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn canceller<T>(tls: T, bound: Duration) -> Canceller
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
    pub(crate) zone: Option<String>,
    /// Reads (read-only sessions on configured replicas).
    pub(crate) pool: Pool,
    /// Writes: read-write sessions, so a promoted replica takes writes.
    write_pool: Pool,
    probe_pool: Pool,
    pub(crate) configured_primary: bool,
    role: AtomicU8,
    healthy: AtomicBool,
    /// Replay LSN (replica) or current LSN (primary), as last seen.
    lsn: AtomicU64,
    timeline: AtomicU64,
    lag_nanos: AtomicU64,
    healthy_since_ms: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    latency_ewma_nanos: AtomicU64,
    latency_at_nanos: AtomicU64,
    latency_samples: AtomicU64,
    pub(crate) queries: AtomicU64,
}

/// Samples a node needs before its latency counts in the balance.
const LATENCY_WARMUP: u64 = 8;

/// Without new samples a node's latency estimate halves this often.
const LATENCY_HALF_LIFE: Duration = Duration::from_millis(250);

impl Node {
    fn new<T>(
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
        let build_pool = |pg: tokio_postgres::Config, size: usize, wait: Duration| {
            let manager = Manager::from_config(
                pg,
                tls.clone(),
                ManagerConfig {
                    recycling_method: b.recycling.clone(),
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(wait))
                .create_timeout(Some(b.create_timeout))
                .recycle_timeout(Some(b.recycle_timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| ConfigError::OutOfRange {
                    field: "pool",
                    reason: e.to_string(),
                })
        };
        let mut probe = probe;
        probe.application_name("tower-scale-monitor");
        probe.connect_timeout(b.probe_timeout);
        Ok(Self {
            name: Arc::from(name),
            zone: config.zone,
            pool: build_pool(pg, b.pool_size, b.wait_timeout)?,
            write_pool: build_pool(write, b.pool_size, b.wait_timeout)?,
            probe_pool: build_pool(probe, 1, b.probe_timeout)?,
            configured_primary: is_primary,
            role: AtomicU8::new(ROLE_UNKNOWN),
            healthy: AtomicBool::new(false),
            lsn: AtomicU64::new(0),
            timeline: AtomicU64::new(0),
            lag_nanos: AtomicU64::new(0),
            healthy_since_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            // Unmeasured: as cheap as can be, so it gets tried and measured.
            latency_ewma_nanos: AtomicU64::new(0),
            latency_at_nanos: AtomicU64::new(0),
            latency_samples: AtomicU64::new(0),
            queries: AtomicU64::new(0),
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

    /// Folds one observed latency into the EWMA (alpha 0.2).
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
            (old / 5).saturating_mul(4).saturating_add(sample / 5)
        };
        self.latency_ewma_nanos.store(new, Ordering::Relaxed);
    }

    /// Takes the node out of rotation until the monitor sees it healthy.
    pub(crate) fn mark_down(&self) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.name, "node taken out of rotation");
        }
        self.drain();
    }

    /// Drops the idle connections: after a crash or restart they are dead,
    /// and handing them out would fail the next reads.
    pub(crate) fn drain(&self) {
        self.pool.retain(|_, _| false);
        self.write_pool.retain(|_, _| false);
    }

    pub(crate) fn demote(&self) {
        self.role.store(ROLE_REPLICA, Ordering::Release);
    }

    /// Checks out a connection, mapping pool errors to typed ones.
    pub(crate) async fn connection(&self, write: bool) -> Result<Object, DbError> {
        let started = Instant::now();
        let pool = if write && !self.configured_primary {
            &self.write_pool
        } else {
            &self.pool
        };
        let result = pool.get().await;
        metrics::histogram!("tower_scale_db_pool_wait_seconds", "node" => Arc::clone(&self.name))
            .record(started.elapsed().as_secs_f64());
        result.map_err(|e| pool_error(&self.name, e))
    }

    fn snapshot(&self, started: Instant, ramp: Duration) -> NodeStatus {
        let since = self.healthy_since_ms.load(Ordering::Acquire);
        let now_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        NodeStatus {
            name: self.name.to_string(),
            zone: self.zone.clone(),
            role: self.role(),
            healthy: self.is_healthy(),
            lsn: self.lsn(),
            timeline: self.timeline.load(Ordering::Acquire),
            lag: self.lag(),
            weight: if self.is_healthy() {
                ramp_weight(Duration::from_millis(now_ms.saturating_sub(since)), ramp)
            } else {
                0.0
            },
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queries: self.queries.load(Ordering::Relaxed),
        }
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

/// What [`Cluster::status`] reports per node.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// Its zone label.
    pub zone: Option<String>,
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
}

/// Shared state of one cluster.
pub(crate) struct Inner {
    pub(crate) identity: u64,
    pub(crate) nodes: Vec<Node>,
    /// Index of the node routed writes go to (`usize::MAX`: none).
    pub(crate) primary: AtomicUsize,
    pub(crate) options: Options,
    pub(crate) started: Instant,
    /// Woken after every probe round.
    pub(crate) changed: Notify,
    /// Wakes the monitor early.
    pub(crate) reprobe: Notify,
    /// (time, primary LSN) samples, newest last: how long a replica has
    /// been missing WAL is the age of the first sample above its replay LSN.
    history: Mutex<VecDeque<(Instant, Lsn)>>,
    /// The highest commit LSN handed out as a token (the primary is at
    /// least there).
    pub(crate) last_write: AtomicU64,
    rng: crate::random::Random,
    pub(crate) shutdown: CancellationToken,
    pub(crate) cancel: Canceller,
}

impl Inner {
    pub(crate) fn random(&self) -> u64 {
        self.rng.next_u64()
    }

    pub(crate) fn primary_node(&self) -> Option<&Node> {
        self.nodes.get(self.primary.load(Ordering::Acquire))
    }

    pub(crate) fn weight(&self, node: &Node) -> f64 {
        let since = node.healthy_since_ms.load(Ordering::Acquire);
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        ramp_weight(
            Duration::from_millis(now_ms.saturating_sub(since)),
            self.options.readmission_ramp,
        )
    }

    pub(crate) fn request_reprobe(&self) {
        self.reprobe.notify_one();
    }
}

/// Cancels the monitor when the last handle goes.
#[derive(Debug)]
pub(crate) struct Life(CancellationToken);

impl Drop for Life {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A PostgreSQL primary and its replicas, with a pool per node and a
/// background monitor; hand out [`Db`](super::Db) handles with [`Cluster::db`].
///
/// The monitor and every background task stop when the last `Cluster` and
/// `Db` handle is dropped, or on [`Cluster::shutdown`].
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
    pub(crate) life: Arc<Life>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.status())
            .finish()
    }
}

impl Cluster {
    /// Starts configuring a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A handle for queries.
    pub fn db(&self) -> super::Db {
        super::Db {
            inner: Arc::clone(&self.inner),
            life: Arc::clone(&self.life),
        }
    }

    /// What the monitor knows of every node, primary first.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.inner
            .nodes
            .iter()
            .map(|n| n.snapshot(self.inner.started, self.inner.options.readmission_ramp))
            .collect()
    }

    /// The identity consistency tokens are bound to (see
    /// [`ClusterBuilder::identity`]).
    pub fn identity(&self) -> u64 {
        self.inner.identity
    }

    /// The name of the node writes go to now.
    pub fn primary_name(&self) -> Option<String> {
        self.inner.primary_node().map(|n| n.name.to_string())
    }

    /// Waits for the monitor's next probe round.
    pub async fn next_probe(&self) {
        let notified = self.inner.changed.notified();
        self.inner.request_reprobe();
        notified.await;
    }

    /// Stops the monitor now; queries fail with [`DbError::Shutdown`]
    /// afterwards only if they need the monitor (they keep their pools).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        for node in &self.inner.nodes {
            node.pool.close();
            node.write_pool.close();
            node.probe_pool.close();
        }
    }
}

/// The monitor task: probe every node each interval (or sooner on request).
async fn monitor(inner: Arc<Inner>) {
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
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
    CASE WHEN pg_is_in_recovery() THEN 0::bigint \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END, \
    CASE WHEN pg_is_in_recovery() \
         THEN extract(epoch FROM (now() - pg_last_xact_replay_timestamp()))::float8 END";

async fn probe(node: &Node, timeout: Duration) -> Result<Probe, String> {
    let conn = tokio::time::timeout(timeout, node.probe_pool.get())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, conn.query_one(PROBE_SQL, &[])).await {
        Err(_) => {
            // Never reuse a connection with a query stuck on it.
            drop(Object::take(conn));
            Err("probe timed out".into())
        }
        Ok(Err(e)) => {
            drop(Object::take(conn));
            Err(e.to_string())
        }
        Ok(Ok(row)) => {
            let lsn: Option<&str> = row.try_get(1).map_err(|e| e.to_string())?;
            Ok(Probe {
                in_recovery: row.try_get(0).map_err(|e| e.to_string())?,
                lsn: lsn.and_then(|s| s.parse().ok()).unwrap_or_default(),
                timeline: u64::try_from(row.try_get::<_, i64>(2).map_err(|e| e.to_string())?)
                    .unwrap_or(0),
                replay_age: row
                    .try_get::<_, Option<f64>>(3)
                    .map_err(|e| e.to_string())?
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64),
            })
        }
    }
}

pub(crate) async fn probe_all(inner: &Inner) {
    let timeout = inner.options.probe_timeout;
    let results =
        futures_util::future::join_all(inner.nodes.iter().map(|n| probe(n, timeout))).await;
    let now = Instant::now();
    let now_ms = u64::try_from(inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    for (node, result) in inner.nodes.iter().zip(&results) {
        match result {
            Ok(p) => {
                node.role.store(
                    if p.in_recovery {
                        ROLE_REPLICA
                    } else {
                        ROLE_PRIMARY
                    },
                    Ordering::Release,
                );
                node.lsn.store(p.lsn.0, Ordering::Release);
                node.timeline.store(p.timeline, Ordering::Release);
                if !node.healthy.swap(true, Ordering::AcqRel) {
                    node.healthy_since_ms.store(now_ms, Ordering::Release);
                    tracing::info!(node = %node.name, "node in rotation");
                }
            }
            Err(reason) => {
                if node.healthy.swap(false, Ordering::AcqRel) {
                    tracing::warn!(node = %node.name, %reason, "node out of rotation");
                }
                node.drain();
            }
        }
    }
    // The primary: a healthy node that says so; two claimants (an old
    // primary came back) are settled by the higher timeline.
    let current = inner.primary.load(Ordering::Acquire);
    let best = inner
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.is_healthy() && n.role() == Role::Primary)
        .max_by_key(|(i, n)| {
            (
                n.timeline.load(Ordering::Acquire),
                *i == current,
                n.configured_primary,
            )
        })
        .map(|(i, _)| i);
    match best {
        Some(i) => {
            if i != current {
                tracing::warn!(node = %inner.nodes[i].name, "new primary");
            }
            inner.primary.store(i, Ordering::Release);
        }
        None => inner.primary.store(usize::MAX, Ordering::Release),
    }
    if let Some(primary) = inner.primary_node() {
        let mut primary_lsn = primary.lsn();
        let written = Lsn(inner.last_write.load(Ordering::Acquire));
        if written > primary_lsn {
            primary_lsn = written;
        }
        let mut history = inner.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.back().is_none_or(|(_, l)| *l < primary_lsn) {
            history.push_back((now, primary_lsn));
        }
        // Keep a few minutes of samples; older ones say "lagging at least that long".
        while history.len() > 2048 {
            history.pop_front();
        }
        for (node, result) in inner.nodes.iter().zip(&results) {
            let Ok(p) = result else { continue };
            if !p.in_recovery {
                node.lag_nanos.store(0, Ordering::Release);
                continue;
            }
            let lag = if p.lsn >= primary_lsn {
                Duration::ZERO
            } else {
                let behind_since = history
                    .iter()
                    .find(|(_, l)| *l > p.lsn)
                    .map(|(t, _)| now.saturating_duration_since(*t))
                    .unwrap_or_default();
                // The replay timestamp's age alone grows on an idle primary;
                // the history bound is never too small by more than a probe
                // interval: take the smaller.
                match p.replay_age {
                    Some(age) => behind_since.min(age).max(Duration::from_nanos(1)),
                    None => behind_since.max(Duration::from_nanos(1)),
                }
            };
            node.lag_nanos.store(
                u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Release,
            );
            metrics::gauge!("tower_scale_db_replica_lag_seconds", "node" => node.name.to_string())
                .set(lag.as_secs_f64());
        }
    }
    inner.changed.notify_waiters();
}
