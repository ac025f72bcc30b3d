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
//!   penalised by lag, same zone first ([`choose_replica`]);
//! - a dead, stalled or over-lagged replica leaves the rotation within about
//!   a second and comes back gradually; a promoted replica becomes the
//!   primary without a restart; a demoted primary (SQLSTATE 25006) triggers
//!   rediscovery at once; of two primaries the higher timeline wins.
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
mod cluster;
mod db;
mod error;
mod lsn;
pub mod token;

pub use self::balance::{Candidate, choose_replica, ramp_weight};
pub use self::cluster::{Cluster, ClusterBuilder, NodeConfig, NodeStatus, Role};
pub use self::db::{Db, Query, QueryOutput, Read, RouteReason, Transaction, Written};
pub use self::error::{DbError, PoolTimeout};
pub use self::lsn::{Consistency, ConsistencyToken, Lsn, LsnParseError};
pub use self::token::{TokenCodec, cluster_identity};
pub use deadpool_postgres::RecyclingMethod;
