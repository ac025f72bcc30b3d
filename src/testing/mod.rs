//! Real servers for tests, examples and benchmarks (feature `local-cluster`).
//!
//! [`LocalCluster`] starts a PostgreSQL primary and streaming replicas, and
//! [`LocalRedis`] a `redis-server`, from the binaries installed on the
//! machine (Debian packages `postgresql` and `redis-server`), each in its own
//! temp dir on a free 127.0.0.1 port. They never touch servers already
//! running on the default ports.
//!
//! - As root, PostgreSQL runs as the `postgres` user (it refuses root), and
//!   its temp dirs are handed over to that user.
//! - Everything is stopped and removed on drop, also when a test panics.
//!   Temp dirs carry a mark naming the process that made them; a later start
//!   sweeps the dirs (and servers) of processes that died without cleaning up.
//! - Faults for tests: clean stop, start, SIGKILL, pause/resume
//!   (SIGSTOP/SIGCONT), promotion, replay delay (`recovery_min_apply_delay`).
//! - Network faults: a [`FaultProxy`] between a client group and a server
//!   adds latency and jitter, drops new connections, resets live ones, or
//!   black-holes them, controlled at runtime.
//!   [`LocalClusterBuilder::client_groups`] puts one in front of every
//!   node per client group (an application instance, a data center:
//!   [`ClientGroup`]), and [`LocalClusterBuilder::replication_proxies`] one
//!   on each replica's replication connection, so distances and partitions
//!   between regions are built and changed at runtime.
//!
//! Environment overrides: `TOWER_SCALE_PG_BINDIR` (where `initdb` and
//! `postgres` are), `TOWER_SCALE_TMPDIR` (where temp dirs go; as root it must
//! be enterable by `postgres`).

mod postgres;
mod process;
mod proxy;
mod redis;

pub use self::postgres::{
    ClientGroup, LocalCluster, LocalClusterBuilder, Node, NodeRole, format_lsn, parse_lsn,
};
pub use self::proxy::{FaultMode, FaultProxy, ProxyStats};
pub use self::redis::LocalRedis;

/// What went wrong starting or driving a local server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// A server binary is not installed.
    #[error(
        "{binary} not found; install it with `apt-get update && apt-get install -y {package}` \
         (or run scripts/setup)"
    )]
    MissingBinary {
        /// What was looked for.
        binary: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper command (`initdb`, `pg_basebackup`, `pg_ctl`) failed.
    #[error("{command} failed ({status}):\n{output}")]
    CommandFailed {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A server did not come up; the end of its log says why.
    #[error("{node} did not start: {reason}\n--- last lines of its log ---\n{log}")]
    StartFailed {
        /// The node (`primary`, `replica-1`, `redis`).
        node: String,
        /// Why we gave up.
        reason: String,
        /// The end of the server log.
        log: String,
    },
    /// An operation needs a running server.
    #[error("{node} is not running; start it first")]
    NotRunning {
        /// The node.
        node: String,
    },
    /// A query to a local server failed.
    #[error("query to a local server failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// A wait did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The options or a server's answer made no sense.
    #[error("{0}")]
    Config(String),
}
