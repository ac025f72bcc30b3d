//! The query handle: writes and transactions on the primary, reads routed
//! by consistency, tokens after every write.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::PgLsn;
use tokio_postgres::types::ToSql;
use tracing::Instrument;

use super::cluster::Inner;
use super::error::{DbError, Fault, Operation, PoolTimeout, fault, node_trouble};
use super::lsn::{ConsistencyToken, Lsn};
use super::node::{Node, Role};
use super::session::*;
use super::statement::{self, Context};
use super::transaction::Transaction;
use tokio_util::sync::DropGuard;

/// Why a read went where it went (in spans and [`Read::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteReason {
    /// `Strong` reads, writes, and reads presenting the unknown token.
    Primary,
    /// A replica chosen by the balancer.
    Replica,
    /// A replica that had replayed the token already.
    CaughtUp,
    /// A replica that caught up while the read waited.
    WaitedForReplica,
    /// No replica qualified: the primary.
    FallbackToPrimary,
    /// A hot key's `Any` read (one of a `DbCache`'s hottest keys): any
    /// healthy replica, even one lagging past the lag budget.
    HotKey,
    /// The first choice failed: retried once elsewhere.
    Retried,
    /// A replica of another region: none of the local region could serve
    /// the read's consistency (see
    /// [`ClusterBuilder::local_region`](super::ClusterBuilder::local_region)).
    CrossRegion,
}

/// A read's result with where it came from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Read<T> {
    /// The rows.
    pub value: T,
    /// The node that ran the query.
    pub served_by: Arc<str>,
    /// A WAL position the data reflects at least (a lower bound: the
    /// replica's replay LSN seen before the read, or the primary's).
    pub lsn: Lsn,
    /// Why that node.
    pub reason: RouteReason,
}

/// A write's result with its consistency token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Written<T> {
    /// What the statement returned.
    pub value: T,
    /// Present it on later reads to see this write.
    pub token: ConsistencyToken,
    /// The node that ran it (the primary).
    pub served_by: Arc<str>,
}

pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A cheap-to-clone handle for queries on a [`Cluster`](super::Cluster).
///
/// Statements are prepared once per connection and kept, at most 256 per
/// connection: past that the connection's cache is emptied and refills
/// with the statements in use (`tower_scale_db_statement_cache_clears_total`
/// counts it), so SQL text that varies per request costs re-preparing, not
/// memory.
///
/// Writes run on the primary and return a [`ConsistencyToken`]; a read
/// that presents it sees the write (a replica that has replayed it, else
/// the primary). An autocommit write and its token cost one round trip.
///
/// ```no_run
/// use tower_scale::pg::{Cluster, Consistency, DbError, NodeConfig};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// # let cluster = Cluster::builder()
/// #     .primary(NodeConfig::from_url("postgresql://app@10.0.0.1/app")?)
/// #     .build()
/// #     .await?;
/// let db = cluster.db();
/// let written = db
///     .query_one(
///         "INSERT INTO users (name) VALUES ($1) RETURNING id",
///         &[&"ada"],
///     )
///     .await?;
/// let id: i64 = written.value.get(0);
/// // Read your own write, from a replica that has it or the primary.
/// let read = db
///     .read_one(
///         Consistency::ReadYourWrites(written.token),
///         "SELECT name FROM users WHERE id = $1",
///         &[&id],
///     )
///     .await?;
/// assert_eq!(read.value.get::<_, String>(0), "ada");
/// // A write whose outcome is unknown says so.
/// match db.execute("UPDATE users SET name = $1 WHERE id = $2", &[&"bob", &id]).await {
///     Ok(w) => println!("updated {} row(s), token {:?}", w.value, w.token),
///     Err(e) if e.may_have_committed() => println!("may have committed: {e}"),
///     Err(e) => println!("not committed: {e}"),
/// }
/// # let _: Option<DbError> = None;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Db {
    pub(crate) inner: Arc<Inner>,
    pub(crate) life: Arc<DropGuard>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("nodes", &self.inner.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Db {
    pub(super) fn node(&self, index: usize) -> &Node {
        &self.inner.nodes[index]
    }

    /// One attempt at a statement on node `index`: checkout (bounded by the
    /// pool's own timeouts, not counted in `timeout`), then prepare and run
    /// within `timeout`. The connection comes back with the output, armed.
    ///
    /// A write (`write`) sends the token query right behind the statement,
    /// before reading its answer: statement and token cost one round trip
    /// (both statements' preparation another, once per connection). The
    /// token query runs after the statement's own `Sync`, so after its
    /// implicit transaction committed; its answer comes back as a
    /// [`TokenAnswer`], never as the statement's error.
    pub(super) async fn attempt(
        &self,
        index: usize,
        sql: &str,
        params: Params<'_>,
        mode: Mode,
        write: bool,
        timeout: Duration,
    ) -> Result<Attempt<'_>, Failure> {
        let node = self.node(index);
        let _in_flight = InFlight::new(node);
        let conn = node.connection().await.map_err(Failure::Checkout)?;
        // Not to a primary fenced while the write waited for a connection.
        if write && node.is_fenced() {
            return Err(Failure::Checkout(node.fenced_error()));
        }
        let running = Running::new(conn, &self.inner.cancel);
        let conn = running.conn().map_err(Failure::Checkout)?;
        node.count_query();
        let deadline = tokio::time::Instant::now() + timeout;
        let prepared = if write {
            // Both to the end (not `try_join`): a preparation dropped half
            // way leaves its statement on the server, never closed.
            let both = futures_util::future::join(
                prepare(conn, &node.statement_cache_clears, sql),
                prepare(conn, &node.statement_cache_clears, TOKEN_SQL),
            );
            tokio::time::timeout_at(deadline, both)
                .await
                .map(|(stmt, token)| Ok((stmt?, Some(token?))))
        } else {
            tokio::time::timeout_at(deadline, prepare(conn, &node.statement_cache_clears, sql))
                .await
                .map(|r| r.map(|stmt| (stmt, None)))
        };
        let (stmt, token_stmt) = match prepared {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(source)) => {
                running.settle(&source, write);
                return Err(Failure::Driver {
                    source,
                    sent: false,
                });
            }
            Err(_) => return Err(Failure::Timeout),
        };
        // Time the execution only: a first prepare on a new connection must
        // not make a node look slow for long.
        let started = Instant::now();
        let run = async {
            match mode {
                Mode::Rows => conn.query(&stmt, params).await.map(Output::Rows),
                Mode::Execute => conn.execute(&stmt, params).await.map(Output::Count),
            }
        };
        let (result, token) = match &token_stmt {
            // Polled in this order: the statement goes out first.
            Some(token_stmt) => pipelined(deadline, run, conn.query_one(token_stmt, &[])).await,
            None => (
                tokio::time::timeout_at(deadline, run).await.ok(),
                Some(Ok(TokenAnswer::None)),
            ),
        };
        match result {
            Some(Ok(out)) => {
                if !write {
                    node.record_latency(started.elapsed(), self.inner.started);
                }
                let token = match token {
                    Some(Ok(answer)) => answer,
                    Some(Err(e)) => TokenAnswer::Failed(e),
                    None => TokenAnswer::TimedOut,
                };
                Ok(Attempt {
                    out,
                    running,
                    token,
                })
            }
            Some(Err(source)) => {
                if !write && node_trouble(&source) {
                    node.record_failure(started.elapsed(), self.inner.started);
                }
                // Parameter errors are raised before anything is sent.
                let sent = fault(&source) != Fault::Client;
                match token {
                    // The session is idle again (or broken: settle sees it).
                    Some(Ok(_)) => running.settle(&source, write),
                    // The token query failed too: the session's state is
                    // unknown. Or it is still running: cancel and close.
                    Some(Err(_)) => running.discard(),
                    None => drop(running),
                }
                Err(Failure::Driver { source, sent })
            }
            None => Err(Failure::Timeout),
        }
    }

    /// A read on node `index` within the read timeout. The flag says the
    /// node failed (stalled or lost), so the read may go elsewhere.
    pub(super) async fn read_on(
        &self,
        index: usize,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, (DbError, bool)> {
        let node = self.node(index);
        let read_timeout = self.inner.options.read_timeout;
        match self
            .attempt(index, sql, params, Mode::Rows, false, read_timeout)
            .await
        {
            Ok(done) => {
                done.running.release();
                Ok(rows(done.out))
            }
            Err(Failure::Checkout(e)) => {
                // Waiting for a connection says nothing about the server;
                // failing to open one does (the monitor decides on rotation).
                let failed = matches!(
                    e,
                    DbError::Connect { .. }
                        | DbError::PoolTimeout {
                            kind: PoolTimeout::Create | PoolTimeout::Recycle,
                            ..
                        }
                );
                Err((e, failed))
            }
            Err(Failure::Timeout) => {
                // A stalled server: out of rotation until the monitor sees it answer.
                node.mark_down();
                self.inner.request_reprobe();
                Err((
                    DbError::Timeout {
                        node: Arc::clone(&node.name),
                        operation: Operation::Read,
                        after: read_timeout,
                    },
                    true,
                ))
            }
            Err(Failure::Driver { source, .. }) => {
                let node_name = Arc::clone(&node.name);
                if fault(&source) == Fault::Connection {
                    node.mark_down();
                    self.inner.request_reprobe();
                    return Err((
                        DbError::Connect {
                            node: node_name,
                            source: Arc::new(source),
                        },
                        true,
                    ));
                }
                // A replica cancelled the read for a conflict with
                // recovery (40001, 40P01 on a standby): its replay's doing,
                // not the query's; once elsewhere, no eviction.
                let conflict = node.role() == Role::Replica
                    && source
                        .code()
                        .is_some_and(|c| matches!(c.code(), "40001" | "40P01"));
                // Otherwise the query's fault, not the node's: no retry, no
                // eviction.
                Err((
                    DbError::Query {
                        node: node_name,
                        source: Arc::new(source),
                    },
                    conflict,
                ))
            }
        }
    }

    /// Maps a write's driver error; `sent` says whether the statement (or
    /// `COMMIT`) may have reached the server.
    pub(super) fn write_error(
        &self,
        index: usize,
        source: tokio_postgres::Error,
        sent: bool,
        operation: Operation,
    ) -> DbError {
        let node = self.node(index);
        let name = Arc::clone(&node.name);
        if fault(&source) == Fault::Connection {
            node.mark_down();
            self.inner.request_reprobe();
            return if sent {
                DbError::Interrupted {
                    node: name,
                    operation,
                    source: Arc::new(source),
                }
            } else {
                DbError::Connect {
                    node: name,
                    source: Arc::new(source),
                }
            };
        }
        if source.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
            if node.role() == Role::Primary {
                // Demoted under us: rediscover at once.
                node.demote();
                self.inner.request_reprobe();
            }
            return DbError::ReadOnly { node: name };
        }
        DbError::Query {
            node: name,
            source: Arc::new(source),
        }
    }

    /// The primary's index, waiting a bounded time for one to be found.
    pub(super) async fn primary_index(&self) -> Result<usize, DbError> {
        let deadline = tokio::time::Instant::now() + self.inner.options.primary_wait;
        loop {
            let notified = self.inner.changed.notified();
            let index = self.inner.primary.load(Ordering::Acquire);
            if index < self.inner.nodes.len()
                && self.node(index).is_healthy()
                && !self.node(index).is_fenced()
            {
                return Ok(index);
            }
            self.inner.request_reprobe();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(DbError::NoPrimary {
                    tried: self
                        .inner
                        .nodes
                        .iter()
                        .map(|n| {
                            format!(
                                "{} ({})",
                                n.name,
                                if !n.is_healthy() {
                                    "unreachable"
                                } else if n.role() == Role::Replica {
                                    "replica"
                                } else {
                                    "unknown role"
                                }
                            )
                        })
                        .collect(),
                });
            }
        }
    }

    /// A write on the primary, then its token.
    pub(super) async fn write(
        &self,
        sql: &str,
        params: Params<'_>,
        mode: Mode,
    ) -> Result<Written<Output>, DbError> {
        statement::check(sql, Context::Pooled)?;
        let index = self.primary_index().await?;
        let node = self.node(index);
        let span = tracing::debug_span!("db.write", node = %node.name);
        async {
            let write_timeout = self.inner.options.write_timeout;
            let done = match self
                .attempt(index, sql, params, mode, true, write_timeout)
                .await
            {
                Ok(done) => done,
                Err(Failure::Checkout(e)) => return Err(e),
                Err(Failure::Timeout) => {
                    // A slow write is not a dead primary: the monitor decides.
                    self.inner.request_reprobe();
                    return Err(DbError::Timeout {
                        node: Arc::clone(&node.name),
                        operation: Operation::Write,
                        after: write_timeout,
                    });
                }
                Err(Failure::Driver { source, sent }) => {
                    return Err(self.write_error(index, source, sent, Operation::Write));
                }
            };
            // Committed: from here on the write succeeds, token or not.
            let token = self.token_after_commit(node, done.running, done.token);
            Ok(Written {
                value: done.out,
                token,
                served_by: Arc::clone(&node.name),
            })
        }
        .instrument(span)
        .await
    }

    /// The token from the answer of the query pipelined behind a committed
    /// statement. If it cannot be had, the unknown token: reads that
    /// present it go to the primary.
    fn token_after_commit(
        &self,
        node: &Node,
        running: Running<'_>,
        answer: TokenAnswer,
    ) -> ConsistencyToken {
        match answer {
            TokenAnswer::Row(row) => {
                let at = |i| row.try_get::<_, PgLsn>(i).ok().map(|l| Lsn(u64::from(l)));
                match token_position(at(0), at(1), node.wal_layout()) {
                    Some(lsn) => {
                        running.release();
                        self.commit_token(node, lsn)
                    }
                    None => {
                        tracing::warn!(node = %node.name, "the token query's answer is not a WAL position; the write's token routes reads to the primary");
                        running.discard();
                        ConsistencyToken::unknown()
                    }
                }
            }
            TokenAnswer::None => {
                running.release();
                ConsistencyToken::unknown()
            }
            TokenAnswer::Failed(e) => {
                tracing::warn!(node = %node.name, error = %e, "the token query failed after the commit; the write's token routes reads to the primary");
                // The session's state is unknown: never reuse it.
                running.discard();
                ConsistencyToken::unknown()
            }
            TokenAnswer::TimedOut => {
                tracing::warn!(node = %node.name, "the token query timed out after the commit; the write's token routes reads to the primary");
                self.inner.request_reprobe();
                drop(running);
                ConsistencyToken::unknown()
            }
        }
    }

    pub(super) fn commit_token(&self, node: &Node, lsn: Lsn) -> ConsistencyToken {
        self.inner.last_write.fetch_max(lsn.0, Ordering::AcqRel);
        node.observe_lsn(lsn);
        ConsistencyToken::new(lsn)
    }

    /// Runs a statement on the primary and returns the affected row count
    /// with the write's token.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<Written<u64>, DbError> {
        let w = self.write(sql, params, Mode::Execute).await?;
        Ok(Written {
            value: match w.value {
                Output::Count(n) => n,
                Output::Rows(rows) => rows.len() as u64,
            },
            token: w.token,
            served_by: w.served_by,
        })
    }

    /// Runs a statement on the primary (`INSERT ... RETURNING`, or a
    /// `Strong` read) and returns its rows with a token.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Written<Vec<Row>>, DbError> {
        let w = self.write(sql, params, Mode::Rows).await?;
        Ok(Written {
            value: rows(w.value),
            token: w.token,
            served_by: w.served_by,
        })
    }

    /// Like [`query`](Self::query), for exactly one row. The statement
    /// commits whatever it returns: another row count is a
    /// [`DbError::RowCount`] that carries the write's token and reports
    /// [`may_have_committed`](DbError::may_have_committed).
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Written<Row>, DbError> {
        let w = self.query(sql, params).await?;
        let node = Arc::clone(&w.served_by);
        let row = exactly_one(w.value, &node, Some(w.token))?;
        Ok(Written {
            value: row,
            token: w.token,
            served_by: w.served_by,
        })
    }

    /// Starts a transaction on the primary (`BEGIN` within the write
    /// timeout). Commit returns the token; dropping it uncommitted rolls it
    /// back (the session is closed).
    pub async fn transaction(&self) -> Result<Transaction, DbError> {
        let index = self.primary_index().await?;
        let node = self.node(index);
        let conn = node.connection().await?;
        let running = Running::new(conn, &self.inner.cancel);
        let write_timeout = self.inner.options.write_timeout;
        let begun =
            tokio::time::timeout(write_timeout, running.conn()?.batch_execute("BEGIN")).await;
        match begun {
            Ok(Ok(())) => Ok(Transaction {
                db: self.clone(),
                index,
                conn: running.into_object(),
                broken: AtomicBool::new(false),
            }),
            Ok(Err(source)) => {
                running.settle(&source, true);
                Err(self.write_error(index, source, false, Operation::Begin))
            }
            Err(_) => {
                self.inner.request_reprobe();
                Err(DbError::Timeout {
                    node: Arc::clone(&node.name),
                    operation: Operation::Begin,
                    after: write_timeout,
                })
            }
        }
    }

    /// The identity consistency tokens are bound to.
    pub fn identity(&self) -> u64 {
        self.inner.identity
    }

    /// The names of every node, primary first as configured.
    pub fn node_names(&self) -> Vec<Arc<str>> {
        self.inner
            .nodes
            .iter()
            .map(|n| Arc::clone(&n.name))
            .collect()
    }

    /// The name of the node writes go to now.
    pub fn primary_name(&self) -> Option<Arc<str>> {
        self.inner.primary_node().map(|n| Arc::clone(&n.name))
    }

    /// Stops the monitor (see [`Cluster::shutdown`](super::Cluster::shutdown)).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let _ = &self.life;
    }
}
