//! The cluster: its nodes and shared state, and the handle users hold.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::balance::ramp_weight;
use super::config::{ClusterBuilder, Options};
use super::monitor::LagHistory;
use super::node::{Canceller, Node, NodeStatus};

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
    pub(super) history: Mutex<LagHistory>,
    /// The highest commit LSN handed out as a token (the primary is at
    /// least there).
    pub(crate) last_write: AtomicU64,
    /// The highest timeline a primary was seen on: primaries on older ones
    /// are fenced.
    pub(crate) newest_timeline: AtomicU64,
    pub(super) rng: crate::random::Random,
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
        let since = node.healthy_since_ms();
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

/// A PostgreSQL primary and its replicas, with a pool per node and a
/// background monitor; hand out [`Db`](super::Db) handles with [`Cluster::db`].
///
/// The monitor and every background task stop when the last `Cluster` and
/// `Db` handle is dropped, or on [`Cluster::shutdown`].
///
/// ```no_run
/// use std::time::Duration;
/// use tower_scale::pg::{Cluster, NodeConfig, Role};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = Cluster::builder()
///     .primary(NodeConfig::from_url("postgresql://app@10.0.0.1/app")?)
///     .replica(NodeConfig::from_url("postgresql://app@10.0.0.2/app")?.name("replica-a"))
///     .pool_size(16)
///     .read_timeout(Duration::from_secs(2))
///     .build()
///     .await?;
/// for node in cluster.status() {
///     println!(
///         "{} {:?} healthy={} lag={:?} sessions {}/{}",
///         node.name, node.role, node.healthy, node.lag, node.pool.in_use, node.pool.max
///     );
/// }
/// assert!(cluster.status().iter().any(|n| n.role == Role::Primary));
/// let db = cluster.db(); // cheap to clone; hand it to handlers
/// # drop(db);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
    /// Cancels the monitor when the last handle goes.
    pub(crate) life: Arc<DropGuard>,
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

    /// Stops the monitor now; queries fail with [`DbError::Shutdown`](super::DbError::Shutdown)
    /// afterwards only if they need the monitor (they keep their pools).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        for node in &self.inner.nodes {
            node.close();
        }
    }
}
