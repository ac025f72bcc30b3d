//! A PostgreSQL primary with streaming replicas, from the installed binaries.

use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::testing::LocalError;
use crate::testing::process::RunAs;

mod network;
mod node;

pub use self::network::ClientGroup;
use self::network::ProxyRuntime;
pub use self::node::Node;

/// How long a server may take to accept connections after it was started.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a node was started as the primary or as a streaming replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeRole {
    /// Accepts writes.
    Primary,
    /// Replays the primary's WAL (read-only until promoted).
    Replica,
}

/// Options for a [`LocalCluster`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct LocalClusterBuilder {
    replicas: usize,
    apply_delays: Vec<(usize, Duration)>,
    extra_conf: Vec<String>,
    client_groups: usize,
    replication_proxies: bool,
}

impl LocalClusterBuilder {
    /// Number of streaming replicas (default 0).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// Delays replay on replica `index` (0-based) by `delay`, through
    /// `recovery_min_apply_delay`: the replica receives WAL at once but
    /// applies each commit only `delay` after it happened, as a lagging
    /// replica would.
    pub fn apply_delay(mut self, index: usize, delay: Duration) -> Self {
        self.apply_delays.push((index, delay));
        self
    }

    /// An extra `postgresql.conf` line for every node (e.g. `"max_connections = 200"`).
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    /// `n` groups of clients, each with its own [`FaultProxy`](crate::testing::FaultProxy)
    /// in front of every node (default 0: clients connect directly). Each
    /// group is an application instance or a data center whose network to
    /// each node is set at runtime; see [`LocalCluster::client_group`].
    pub fn client_groups(mut self, n: usize) -> Self {
        self.client_groups = n;
        self
    }

    /// Whether each replica streams from the primary through a
    /// [`FaultProxy`](crate::testing::FaultProxy) of its own (default
    /// false: directly): its `primary_conninfo` names the proxy, so
    /// replication can be slowed or partitioned at runtime
    /// ([`LocalCluster::replication_proxy`]). The base backup is taken
    /// directly.
    pub fn replication_proxies(mut self, yes: bool) -> Self {
        self.replication_proxies = yes;
        self
    }

    /// Starts the primary, then each replica from a base backup of it.
    ///
    /// Blocks until every node accepts connections (a primary and two
    /// replicas take a few seconds). Safe to call from inside a Tokio
    /// runtime: it does not need one.
    pub fn start(self) -> Result<LocalCluster, LocalError> {
        if let Some((index, _)) = self.apply_delays.iter().find(|(i, _)| *i >= self.replicas) {
            return Err(LocalError::Config(format!(
                "apply_delay names replica {index}, but the cluster has {} replicas (0-based)",
                self.replicas
            )));
        }
        let started = Instant::now();
        let bin = PgBin::find()?;
        let run_as = RunAs::unprivileged()?;
        let primary = Node::init_primary(&bin, run_as, &self.extra_conf)?;
        let network = if self.client_groups > 0 || self.replication_proxies {
            Some(ProxyRuntime::start()?)
        } else {
            None
        };
        let mut replication = Vec::new();
        let mut nodes = vec![primary];
        for i in 0..self.replicas {
            let delay = self
                .apply_delays
                .iter()
                .rev()
                .find(|(index, _)| *index == i)
                .map(|(_, d)| *d);
            let replication_port = match (&network, self.replication_proxies) {
                (Some(network), true) => {
                    let proxy = network.proxy(nodes[0].port())?;
                    let port = proxy.port();
                    replication.push(proxy);
                    port
                }
                _ => nodes[0].port(),
            };
            let replica =
                Node::init_replica(&bin, run_as, &nodes[0], i + 1, delay, replication_port)?;
            nodes.push(replica);
        }
        let mut groups = Vec::new();
        if let Some(network) = &network {
            for _ in 0..self.client_groups {
                groups.push(ClientGroup::new(network, &nodes)?);
            }
        }
        tracing::info!(
            replicas = self.replicas,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "local PostgreSQL cluster started"
        );
        Ok(LocalCluster {
            nodes,
            startup: started.elapsed(),
            groups,
            replication,
            network,
        })
    }
}

/// A PostgreSQL primary and N streaming replicas on free 127.0.0.1 ports,
/// each in its own temp dir, started from the installed server binaries.
///
/// Everything is torn down on drop, also when a test panics: no server
/// process and no temp dir is left behind. Servers of a run that died
/// without dropping (SIGKILL, abort) are swept at the next start.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_scale::testing::LocalCluster;
///
/// let cluster = LocalCluster::builder().replicas(2).start()?;
/// let primary = cluster.primary().connect().await?;
/// primary.batch_execute("CREATE TABLE t (id int)").await?;
/// cluster.wait_for_replicas(std::time::Duration::from_secs(10)).await?;
/// let replica = cluster.replica(0).connect().await?;
/// replica.query("SELECT * FROM t", &[]).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    nodes: Vec<Node>,
    startup: Duration,
    groups: Vec<ClientGroup>,
    /// Replica `i`'s replication proxy, when they were asked for.
    replication: Vec<crate::testing::FaultProxy>,
    /// Where the proxies run; dropped after the servers.
    network: Option<ProxyRuntime>,
}

impl LocalCluster {
    /// Options for a new cluster.
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder::default()
    }

    /// Starts a primary with `replicas` undelayed replicas.
    pub fn start(replicas: usize) -> Result<Self, LocalError> {
        Self::builder().replicas(replicas).start()
    }

    /// A cluster shared by every caller that passes the same `name` while
    /// one is alive, for tests that do not break it.
    ///
    /// The cluster lives as long as any returned `Arc` does: when the last
    /// test holding it finishes, it is torn down (a `static` would never be
    /// dropped and would leak its servers). `builder` is used only when no
    /// live cluster has that name.
    pub fn shared(
        name: &str,
        builder: impl FnOnce() -> LocalClusterBuilder,
    ) -> Result<Arc<Self>, LocalError> {
        static SHARED: Mutex<Vec<(String, Weak<LocalCluster>)>> = Mutex::new(Vec::new());
        let mut shared = crate::sync::lock(&SHARED);
        shared.retain(|(_, weak)| weak.strong_count() > 0);
        if let Some(cluster) = shared
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, weak)| weak.upgrade())
        {
            return Ok(cluster);
        }
        let cluster = Arc::new(builder().start()?);
        shared.push((name.to_string(), Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    /// How long [`LocalClusterBuilder::start`] took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The node started as the primary.
    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    /// Replica `index` (0-based, in the order they were started).
    ///
    /// # Panics
    /// If there is no such replica: this is test support, and a wrong index
    /// is a bug in the test.
    pub fn replica(&self, index: usize) -> &Node {
        self.replicas().get(index).unwrap_or_else(|| {
            panic!(
                "no replica {index}: the cluster has {}",
                self.nodes.len() - 1
            )
        })
    }

    /// Every replica, in start order.
    pub fn replicas(&self) -> &[Node] {
        &self.nodes[1..]
    }

    /// Every node: the primary first, then the replicas.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Client group `index`'s proxies (see [`LocalClusterBuilder::client_groups`]).
    ///
    /// # Panics
    /// If there is no such group (a bug in the test).
    pub fn client_group(&self, index: usize) -> &ClientGroup {
        self.groups.get(index).unwrap_or_else(|| {
            panic!(
                "no client group {index}: the cluster has {}",
                self.groups.len()
            )
        })
    }

    /// The proxy replica `index` streams from the primary through, when the
    /// cluster was started with
    /// [`replication_proxies`](LocalClusterBuilder::replication_proxies).
    pub fn replication_proxy(&self, index: usize) -> Option<&crate::testing::FaultProxy> {
        self.replication.get(index)
    }

    /// Waits until replica `index` has replayed the primary's current WAL
    /// position (everything committed before this call).
    pub async fn wait_for_replica(
        &self,
        index: usize,
        timeout: Duration,
    ) -> Result<(), LocalError> {
        let lsn = self.primary().current_lsn().await?;
        self.replica(index).wait_for_replay(lsn, timeout).await
    }

    /// Waits until every running, unpaused replica has replayed the
    /// primary's current WAL position.
    pub async fn wait_for_replicas(&self, timeout: Duration) -> Result<(), LocalError> {
        let lsn = self.primary().current_lsn().await?;
        for replica in self.replicas() {
            if replica.is_running() && !replica.is_paused() {
                replica.wait_for_replay(lsn, timeout).await?;
            }
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Replicas first, so they do not spend the teardown reconnecting.
        for node in self.nodes.iter().rev() {
            node.teardown();
        }
        // Then the proxies: every handle of the cluster's goes first, so
        // their tasks end, then the runtime they run on.
        self.groups.clear();
        self.replication.clear();
        self.network.take();
    }
}

/// The installed PostgreSQL server binaries.
#[derive(Debug, Clone)]
pub(super) struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    fn find() -> Result<Self, LocalError> {
        let has_server =
            |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
        if let Some(dir) = std::env::var_os("TOWER_SCALE_PG_BINDIR").map(PathBuf::from)
            && has_server(&dir)
        {
            return Ok(Self { dir });
        }
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return Ok(Self { dir });
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                let dir = e.path().join("bin");
                has_server(&dir).then_some((version, dir))
            })
            .collect();
        versions.sort();
        match versions.pop() {
            Some((_, dir)) => Ok(Self { dir }),
            None => Err(LocalError::MissingBinary {
                binary: "PostgreSQL server binaries (initdb, postgres, pg_basebackup)".into(),
                package: "postgresql",
            }),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Parses PostgreSQL's `pg_lsn` text form (`16/B374D848`) into a number.
pub fn parse_lsn(text: &str) -> Result<u64, LocalError> {
    crate::lsn_text::parse(text)
        .ok_or_else(|| LocalError::Config(format!("not a pg_lsn: {text:?}")))
}

/// Formats a WAL position as PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    crate::lsn_text::format(lsn)
}
