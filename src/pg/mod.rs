//! Primary/replica routing with pooling (feature `postgres`): database
//! replication from the playbook, in-process.
//!
//! A [`Cluster`] holds a deadpool-postgres pool per node and a monitor that
//! probes every node (role, timeline, WAL position, lag) every few hundred
//! milliseconds. [`Db`] handles route:
//!
//! - writes and transactions to the primary, each returning a
//!   [`ConsistencyToken`] (the primary's LSN after commit);
//! - reads by [`Consistency`]: `Strong` (primary), `ReadYourWrites(token)`
//!   (a replica that has replayed the token, waiting a bounded time for one,
//!   else the primary), `BoundedStaleness(d)`, `Any` (any healthy replica
//!   within the lag budget);
//! - replicas chosen by power of two choices over in-flight × EWMA latency,
//!   penalised by lag, nearest first: local zone, local region, other
//!   regions, and within each the measured round trip
//!   ([`ClusterBuilder::local_region`] states the rule);
//! - a dead, stalled or over-lagged replica leaves the rotation within about
//!   a second and comes back gradually; a promoted replica becomes the
//!   primary without a restart; a demoted primary (SQLSTATE 25006) triggers
//!   rediscovery at once; of two primaries the higher timeline wins, and a
//!   primary on an older timeline than one the instance has seen is fenced
//!   for good ([`NodeStatus::fenced`]): no writes, no reads.
//!
//! # Guarantees
//!
//! Each is a test against real servers in `tests/pg` (stalls are SIGSTOP).
//!
//! 1. **Every operation has a deadline.** Waiting for a pooled connection
//!    is bounded by the pool's timeouts ([`ClusterBuilder::pool_wait_timeout`],
//!    `pool_create_timeout`, `pool_recycle_timeout`, 5 s each by default);
//!    after that, the server's share by the operation's own bound:
//!    - a read: [`ClusterBuilder::read_timeout`] (5 s), then one retry on
//!      another node, so at most twice checkout + read timeout;
//!    - the read-your-writes catch-up (checkout and queries):
//!      [`ClusterBuilder::read_your_writes_wait`] (500 ms), then the primary
//!      (or, with `fallback_to_primary(false)`, [`DbError::Timeout`] for
//!      [`Operation::CatchUp`]);
//!    - a write with its token query (sent together); `BEGIN`, each
//!      statement of a transaction, and `COMMIT` with its token:
//!      [`ClusterBuilder::write_timeout`] (10 s, its own setting);
//!    - finding a primary after a failover: [`ClusterBuilder::primary_wait`]
//!      (1 s); a monitor probe: [`ClusterBuilder::probe_timeout`] (500 ms);
//!      the cancel request for an abandoned query: the create timeout.
//!
//!    A stalled server yields [`DbError::Timeout`] naming the [`Operation`],
//!    never a hang. A timed-out or dropped query is cancelled and its
//!    session closed, never handed to the next caller.
//! 2. **Waiting for a connection is not server failure.** Pool wait does
//!    not count against the read timeout, never takes a node out of
//!    rotation, and a [`PoolTimeout::Wait`] is not retried on another node.
//!    Only a server that fails to answer (a query timeout, a broken
//!    session) is taken out; a burst of slow queries above the pool size
//!    queues on its replica instead of evicting it or moving to the primary.
//! 3. **A client error is not a connection error.** A missing or extra
//!    parameter or one of the wrong type, SQL text that cannot be sent (a
//!    NUL byte) (raised before anything is sent,
//!    with no SQLSTATE) and a statement the server rejects are
//!    [`DbError::Query`] ([`DbError::is_client_error`] tells the first
//!    kind): the node stays in rotation and the query is not retried
//!    elsewhere.
//! 4. **`Transaction::commit` never reports a rolled-back transaction
//!    committed.** `COMMIT` goes in one round trip behind a `SAVEPOINT`, which
//!    fails in an aborted transaction: after a failed statement (unless a
//!    savepoint recovered it), a failed `COMMIT`, or a statement that timed
//!    out or lost its session, commit returns [`DbError::RolledBack`].
//!    Statements that would end the transaction are refused (guarantee 10);
//!    if a block still ended early, commit returns [`DbError::EndedEarly`]
//!    (may have committed).
//! 5. **A committed write is reported committed.** Every error from a write
//!    or commit means it did not commit, except the two that say the
//!    outcome is unknown ([`DbError::may_have_committed`]: a timeout or a
//!    broken session after the statement or `COMMIT` was sent). A write
//!    through `query_one` that returned another row count committed: its
//!    [`DbError::RowCount`] carries the token and says may-have-committed.
//!    If the
//!    commit succeeded but its position could not be read, the call
//!    succeeds with [`ConsistencyToken::unknown`]: reads presenting it go
//!    straight to the primary (even with `fallback_to_primary(false)`),
//!    without a catch-up wait, until the token expires. A token is never "position 0" because of a failure.
//! 6. Cancel requests go through the cluster's TLS connector
//!    ([`ClusterBuilder::build_with_tls`]).
//! 7. Over HTTP, a token cookie sent quoted (`tower_scale_token="..."`, as
//!    RFC 6265 allows) is accepted ([`layer::DbLayer`], feature `http`).
//! 8. **A write and its token cost one round trip, and the token covers
//!    the commit.** The token query is prepared once per session and sent
//!    right behind the autocommit statement (it runs after the statement's
//!    own `Sync`, so after its commit). The token is the WAL insert
//!    position, never below the commit record's end, also under
//!    `synchronous_commit = off` (where the write position trails commits
//!    not yet written out). It may sit above WAL nobody has flushed yet;
//!    replicas reach it at the next flush, and a read-your-writes read that
//!    cannot wait goes to the primary.
//! 9. **[`ClusterBuilder::pool_size`] is the most pooled sessions an
//!    instance opens to a node** (the monitor's probe is one more); reads
//!    and writes share the pool. A configured replica's sessions are
//!    read-only; a read-write pool replaces them when it is promoted.
//!    [`Cluster::status`] reports each pool ([`PoolStatus`]).
//! 10. **A pooled session never keeps a transaction or a setting.**
//!     Through [`Db`], transaction control (`BEGIN`, `COMMIT`, `ROLLBACK`,
//!     ...), session settings (`SET`, `RESET`, `DISCARD`, `DEALLOCATE`,
//!     `PREPARE`, `LISTEN`) and `COPY ... STDIN/STDOUT` are refused before
//!     anything is sent ([`DbError::Refused`]); inside a [`Transaction`],
//!     the statements that would end it are (savepoints, `ROLLBACK TO` and
//!     `SET LOCAL` are fine).
//!
//! ```no_run
//! use tower_scale::pg::{Cluster, Consistency, NodeConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = Cluster::builder()
//!     .primary(NodeConfig::from_url("postgresql://app@db-1/app")?)
//!     .replica(NodeConfig::from_url("postgresql://app@db-2/app")?)
//!     .build()
//!     .await?;
//! let db = cluster.db();
//! let written = db.execute("UPDATE users SET name = $1 WHERE id = $2", &[&"ada", &7i64]).await?;
//! let read = db
//!     .read_one(Consistency::ReadYourWrites(written.token), "SELECT name FROM users WHERE id = $1", &[&7i64])
//!     .await?;
//! println!("{} from {}", read.value.get::<_, String>(0), read.served_by);
//! # Ok(()) }
//! ```

mod balance;
#[cfg(any(feature = "moka", feature = "quick-cache"))]
mod cache;
mod cluster;
mod config;
mod db;
mod error;
#[cfg(feature = "change-feed")]
#[cfg_attr(docsrs, doc(cfg(feature = "change-feed")))]
pub mod feed;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod layer;
#[cfg(any(feature = "queue", feature = "shard"))]
mod listen;
#[cfg(any(feature = "queue", feature = "shard"))]
pub(crate) use self::listen::{OnListening, OnNotify};
mod lsn;
mod monitor;
mod node;
mod pool;
mod query;
mod region;
pub(crate) mod route;
mod session;
#[cfg(all(
    feature = "change-feed",
    any(feature = "moka", feature = "quick-cache")
))]
mod sql;
mod statement;
mod status;
pub mod token;
mod transaction;

// Public for the `route` benchmark only: the balancer is internal.
#[doc(hidden)]
pub use self::balance::{Candidate, choose_replica, ramp_weight};
#[cfg(any(feature = "moka", feature = "quick-cache"))]
pub use self::cache::{DbCache, DbCacheBuilder, DefaultStore, QueryKey, QueryPolicy};
pub use self::cluster::Cluster;
pub use self::config::{ClusterBuilder, NodeConfig};
pub use self::db::{Db, Read, RouteReason, Written};
pub use self::error::{DbError, Operation, PoolTimeout};
#[cfg(feature = "http")]
pub use self::layer::{
    DbLayer, DbLayerBuilder, DbRouting, MissingDbLayer, Primary, Replica, RequestDb, Route,
};
pub use self::lsn::{Consistency, ConsistencyToken, Lsn, LsnParseError};
pub use self::node::{NodeStatus, PoolStatus, Role};
pub use self::query::{Access, Query, QueryFuture, QueryOutput};
#[cfg(all(
    feature = "change-feed",
    any(feature = "moka", feature = "quick-cache")
))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(
        feature = "change-feed",
        any(feature = "moka", feature = "quick-cache")
    )))
)]
pub use self::sql::ReadCaching;
#[cfg(feature = "shard")]
pub(crate) use self::statement::query_body;
pub use self::token::{TokenCodec, cluster_identity};
pub use self::transaction::Transaction;
pub use deadpool_postgres::RecyclingMethod;
