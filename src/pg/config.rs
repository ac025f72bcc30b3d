//! How a cluster is configured: each node's connection, and the builder
//! that validates the options, opens the pools and starts the monitor.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::RecyclingMethod;
use tokio::sync::Notify;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{NoTls, Socket};
use tokio_util::sync::CancellationToken;

use super::cluster::{Cluster, Inner};
use super::monitor::{LagHistory, monitor, probe_all};
use super::node::{Node, canceller};
use crate::error::ConfigError;

/// How one node is reached.
#[derive(Clone)]
pub struct NodeConfig {
    pub(crate) name: Option<String>,
    pub(crate) zone: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) config: tokio_postgres::Config,
}

impl NodeConfig {
    /// A node from a `tokio_postgres::Config`.
    pub fn new(config: tokio_postgres::Config) -> Self {
        Self {
            name: None,
            zone: None,
            region: None,
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

    /// Labels the node with a zone; replicas in the cluster's zone are
    /// preferred (see [`ClusterBuilder::local_zone`]).
    #[must_use]
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Labels the node with a region (a data center); replicas in the
    /// cluster's region are preferred over other regions' (see
    /// [`ClusterBuilder::local_region`]).
    #[must_use]
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }
}

impl fmt::Debug for NodeConfig {
    /// Host, port, user and database only: never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeConfig")
            .field("name", &self.name)
            .field("zone", &self.zone)
            .field("region", &self.region)
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
    pub(super) primary: Option<NodeConfig>,
    pub(super) replicas: Vec<NodeConfig>,
    pub(super) zone: Option<String>,
    pub(super) region: Option<String>,
    pub(super) local_wait: Option<Duration>,
    pub(super) pool_size: usize,
    pub(super) wait_timeout: Duration,
    pub(super) create_timeout: Duration,
    pub(super) recycle_timeout: Duration,
    pub(super) recycling: RecyclingMethod,
    pub(super) statement_timeout: Option<Duration>,
    pub(super) probe_interval: Duration,
    pub(super) probe_timeout: Duration,
    pub(super) lag_budget: Duration,
    pub(super) hot_lag_max: Duration,
    pub(super) readmission_ramp: Duration,
    pub(super) read_your_writes_wait: Duration,
    pub(super) primary_wait: Duration,
    pub(super) fallback_to_primary: bool,
    pub(super) read_timeout: Duration,
    pub(super) write_timeout: Duration,
    pub(super) identity: Option<String>,
    pub(super) name: Option<String>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            zone: None,
            region: None,
            local_wait: None,
            pool_size: 16,
            wait_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(5),
            recycle_timeout: Duration::from_secs(5),
            recycling: RecyclingMethod::Fast,
            statement_timeout: Some(Duration::from_secs(30)),
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(500),
            lag_budget: Duration::from_secs(30),
            hot_lag_max: Duration::from_secs(60),
            readmission_ramp: Duration::from_secs(5),
            read_your_writes_wait: Duration::from_millis(500),
            primary_wait: Duration::from_secs(1),
            fallback_to_primary: true,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            identity: None,
            name: None,
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

    /// The zone this process runs in: replicas labelled with it are chosen
    /// first (the same as [`local_zone`](Self::local_zone)).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The zone this process runs in (see [`local_region`](Self::local_region)
    /// for the order replicas are tried in).
    pub fn local_zone(self, zone: impl Into<String>) -> Self {
        self.zone(zone)
    }

    /// The region (data center) this process runs in. Reads then go, among
    /// the healthy replicas that can serve their consistency, to the
    /// nearest tier that has one: the local zone, then the rest of the
    /// local region, then the other regions (a node with no region label
    /// counts as another region's). Within a tier the monitor's measured
    /// probe round trip ([`NodeStatus::rtt`](super::NodeStatus::rtt))
    /// decides first: replicas more than twice as far as the nearest one
    /// (plus 2 ms) are left out, and a replica's estimated cost is never
    /// below its round trip; the balancer's power of two choices picks
    /// among the rest. While the nearer tier's replicas are being
    /// re-admitted ([`readmission_ramp`](Self::readmission_ramp)) after an
    /// outage, part of the reads stay on the next tier, in the ratio of
    /// their weights, so traffic comes back gradually.
    /// A read that leaves the local region says so
    /// ([`RouteReason::CrossRegion`](super::RouteReason::CrossRegion)).
    /// Without it (the default) every replica counts as local.
    pub fn local_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// How long a read-your-writes read waits for a replica of the local
    /// region to replay its token before it looks further (default: the
    /// [`read_your_writes_wait`](Self::read_your_writes_wait)). Then it
    /// goes to the nearest replica of another region that has replayed the
    /// token, or waits for the nearest one that is not far behind (within
    /// the read-your-writes wait), and only then to the primary.
    pub fn local_wait(mut self, d: Duration) -> Self {
        self.local_wait = Some(d);
        self
    }

    /// The most pooled connections an instance opens to one node (default
    /// 16), reads and writes together; the monitor's probe is one more.
    /// Plan `max_connections` on each server as instances times
    /// `pool_size + 1`, plus whatever else connects. A configured replica's sessions are
    /// read-only; when it is promoted, a read-write pool of the same size
    /// replaces them (the old sessions close as their queries end).
    /// [`Cluster::status`](super::Cluster::status) and the
    /// `tower_scale_db_pool_connections` gauges report each pool.
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// How long a query waits for a free connection before
    /// [`DbError::PoolTimeout`](super::DbError::PoolTimeout) (default 5 s; always finite).
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

    /// The most lag a hot key's `Any` fill accepts (default 60 s, and never
    /// less than [`lag_budget`](Self::lag_budget)): a hot key's reads go to
    /// a healthy replica even past the lag budget, so that one celebrity
    /// key does not land on the primary, but not to one this far behind (a
    /// replica whose replay stopped would serve older and older data).
    pub fn hot_lag_max(mut self, d: Duration) -> Self {
        self.hot_lag_max = d;
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
    /// before [`DbError::NoPrimary`](super::DbError::NoPrimary) (default 1 s).
    pub fn primary_wait(mut self, d: Duration) -> Self {
        self.primary_wait = d;
        self
    }

    /// Whether reads with no qualifying replica go to the primary (default)
    /// or fail with [`DbError::NoPrimary`](super::DbError::NoPrimary)-style errors.
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

    /// The cluster's name in metrics: every `tower_scale_db_*` series of
    /// its nodes gets a `cluster` label with it, so two clusters in one
    /// process whose nodes have the same names (the shards of a
    /// `ShardedCluster`, each with a `primary`) keep separate series.
    /// Without it, the series carry `node` alone, as before.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
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
    /// ([`DbError::may_have_committed`](super::DbError::may_have_committed)); the primary does not leave the
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
                region: self.region.clone(),
                local_wait: self.local_wait.unwrap_or(self.read_your_writes_wait),
                lag_budget: self.lag_budget,
                hot_lag_max: self.hot_lag_max.max(self.lag_budget),
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
            history: Mutex::new(LagHistory::default()),
            last_write: AtomicU64::new(0),
            newest_timeline: AtomicU64::new(0),
            rng: crate::random::Random::new(0x853C_49E6_748F_EA9B),
            shutdown: CancellationToken::new(),
        });
        probe_all(&inner).await;
        tokio::spawn(monitor(Arc::clone(&inner)));
        let life = Arc::new(inner.shutdown.clone().drop_guard());
        Ok(Cluster { inner, life })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) zone: Option<String>,
    /// The local region (`None`: every node is local).
    pub(crate) region: Option<String>,
    /// A read-your-writes read's wait for a local replica.
    pub(crate) local_wait: Duration,
    pub(crate) lag_budget: Duration,
    /// The most lag a hot key's `Any` fill accepts (at least `lag_budget`).
    pub(crate) hot_lag_max: Duration,
    pub(crate) readmission_ramp: Duration,
    pub(crate) read_your_writes_wait: Duration,
    pub(crate) primary_wait: Duration,
    pub(crate) fallback_to_primary: bool,
    pub(crate) probe_interval: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) write_timeout: Duration,
}
