//! The query handle: writes and transactions on the primary, reads routed
//! by consistency, tokens after every write.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use deadpool_postgres::{ClientWrapper, Object};
use futures_util::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage, Statement};
use tracing::Instrument;

use super::balance::{Candidate, choose_replica};
use super::cluster::Inner;
use super::error::{DbError, Fault, Operation, PoolTimeout, fault};
use super::lsn::{Consistency, ConsistencyToken, Lsn};
use super::node::{Canceller, Node, Role};
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
    /// The first choice failed: retried once elsewhere.
    Retried,
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

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A cheap-to-clone handle for queries on a [`Cluster`](super::Cluster).
///
/// Statements are prepared once per connection and kept, at most 256 per
/// connection: past that the connection's cache is emptied and refills
/// with the statements in use (`tower_scale_db_statement_cache_clears_total`
/// counts it), so SQL text that varies per request costs re-preparing, not
/// memory.
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

/// A checked-out connection that may have a statement in flight. Dropped
/// armed (a deadline passed, the caller gave up on the future), it cancels
/// the server-side statement through the cluster's TLS connector and closes
/// the session instead of handing it to someone else.
struct Running<'a> {
    conn: Option<Object>,
    cancel: &'a Canceller,
}

impl<'a> Running<'a> {
    fn new(conn: Object, cancel: &'a Canceller) -> Self {
        Self {
            conn: Some(conn),
            cancel,
        }
    }

    fn conn(&self) -> Result<&Object, DbError> {
        // Always set until release, discard or drop.
        self.conn.as_ref().ok_or(DbError::Shutdown)
    }

    /// The statement finished and the session is sound: back to the pool.
    fn release(mut self) {
        drop(self.conn.take());
    }

    /// The session is broken or in an unknown state: close it, no cancel.
    fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }

    /// Keeps the session out of the pool and hands it over (a transaction).
    fn into_object(mut self) -> Option<Object> {
        self.conn.take()
    }

    /// After a driver error: sessions that failed, or that a demoted
    /// primary answered, are closed; the others go back to the pool.
    fn settle(self, e: &tokio_postgres::Error, write: bool) {
        if fault(e) == Fault::Connection
            || (write && e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION))
        {
            self.discard();
        } else {
            self.release();
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            cancel_and_close(Object::take(conn), self.cancel);
        }
    }
}

/// Cancels whatever runs on `client` and closes it, in the background.
fn cancel_and_close(client: ClientWrapper, cancel: &Canceller) {
    let request = cancel(client.cancel_token());
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                request.await;
                drop(client);
            });
        }
        Err(_) => drop(client),
    }
}

/// Counts a query against its node from before the pool checkout (so the
/// balancer sees queued work) until it ends, however it ends.
struct InFlight<'a>(&'a Node);

impl<'a> InFlight<'a> {
    fn new(node: &'a Node) -> Self {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(node)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one attempt at a statement failed.
enum Failure {
    /// No connection: nothing was sent.
    Checkout(DbError),
    /// The server did not answer in time (for a write, counted as possibly
    /// committed even when only the preparation was pending).
    Timeout,
    /// The driver's error; `sent` once the statement itself (not only its
    /// preparation) may have reached the server.
    Driver {
        source: tokio_postgres::Error,
        sent: bool,
    },
}

/// How a read-your-writes catch-up ended.
enum CatchUp {
    Replayed,
    /// Still behind at the deadline, or no connection in time.
    Behind,
    /// The replica did not answer within the wait.
    NoAnswer,
}

/// Statements kept prepared per connection. deadpool-postgres's statement
/// cache has no limit of its own: SQL text built per request (an `IN` list
/// of varying length, values spliced into the text) would grow it, and the
/// server's prepared statements with it, for as long as the connection
/// lives. Past this many the connection's cache is emptied (its statements
/// are closed on the server) and refills with the statements in use.
pub(crate) const MAX_CACHED_STATEMENTS: usize = 256;

/// `prepare_cached`, keeping the connection's cache within
/// [`MAX_CACHED_STATEMENTS`].
async fn prepare(
    conn: &Object,
    node: &Arc<str>,
    sql: &str,
) -> Result<Statement, tokio_postgres::Error> {
    let stmt = conn.prepare_cached(sql).await?;
    if conn.statement_cache.size() > MAX_CACHED_STATEMENTS {
        conn.statement_cache.clear();
        metrics::counter!("tower_scale_db_statement_cache_clears_total", "node" => Arc::clone(node))
            .increment(1);
    }
    Ok(stmt)
}

enum Mode {
    Rows,
    Execute,
}

enum Output {
    Rows(Vec<Row>),
    Count(u64),
}

/// The token query: schema-qualified, so no `search_path` can redirect it.
/// The simple protocol answers it in one round trip.
const TOKEN_SQL: &str = "SELECT pg_catalog.pg_current_wal_lsn()::text";

/// Read-your-writes catch-up: how far a replica has replayed.
const REPLAY_SQL: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()::text";

/// `COMMIT` with its guard and its token in one round trip. The guard
/// `SAVEPOINT` fails in a failed transaction (25P02), and outside a
/// transaction block (25P01: a statement of the transaction ended it, a
/// `COMMIT`, `ROLLBACK` or `PREPARE TRANSACTION` sent through it); the
/// server then skips the rest, so neither is ever taken for our commit.
/// After `COMMIT`'s own completion the commit is certain, whatever happens
/// to the token query.
const COMMIT_SQL: &str =
    "SAVEPOINT tower_scale_guard; COMMIT; SELECT pg_catalog.pg_current_wal_lsn()::text";

/// The WAL position in a token query's answer, if it is one.
fn parse_lsn(messages: &[SimpleQueryMessage]) -> Option<Lsn> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).and_then(|text| text.parse().ok()),
        _ => None,
    })
}

impl Db {
    fn node(&self, index: usize) -> &Node {
        &self.inner.nodes[index]
    }

    /// One attempt at a statement on node `index`: checkout (bounded by the
    /// pool's own timeouts, not counted in `timeout`), then prepare and run
    /// within `timeout`. The connection comes back with the output, armed.
    async fn attempt(
        &self,
        index: usize,
        sql: &str,
        params: Params<'_>,
        mode: Mode,
        write: bool,
        timeout: Duration,
    ) -> Result<(Output, Running<'_>), Failure> {
        let node = self.node(index);
        let _in_flight = InFlight::new(node);
        let conn = node.connection(write).await.map_err(Failure::Checkout)?;
        let running = Running::new(conn, &self.inner.cancel);
        let conn = running.conn().map_err(Failure::Checkout)?;
        node.queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tower_scale_db_queries_total", "node" => Arc::clone(&node.name))
            .increment(1);
        let deadline = tokio::time::Instant::now() + timeout;
        let stmt = match tokio::time::timeout_at(deadline, prepare(conn, &node.name, sql)).await {
            Ok(Ok(stmt)) => stmt,
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
        let result = match mode {
            Mode::Rows => tokio::time::timeout_at(deadline, conn.query(&stmt, params))
                .await
                .map(|r| r.map(Output::Rows)),
            Mode::Execute => tokio::time::timeout_at(deadline, conn.execute(&stmt, params))
                .await
                .map(|r| r.map(Output::Count)),
        };
        match result {
            Ok(Ok(out)) => {
                node.record_latency(started.elapsed(), self.inner.started);
                Ok((out, running))
            }
            Ok(Err(source)) => {
                // Parameter errors are raised before anything is sent.
                let sent = fault(&source) != Fault::Client;
                running.settle(&source, write);
                Err(Failure::Driver { source, sent })
            }
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// A read on node `index` within the read timeout. The flag says the
    /// node failed (stalled or lost), so the read may go elsewhere.
    async fn read_on(
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
            Ok((out, running)) => {
                running.release();
                Ok(rows(out))
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
                // The query's fault, not the node's: no retry, no eviction.
                Err((
                    DbError::Query {
                        node: node_name,
                        source: Arc::new(source),
                    },
                    false,
                ))
            }
        }
    }

    /// Maps a write's driver error; `sent` says whether the statement (or
    /// `COMMIT`) may have reached the server.
    fn write_error(
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
    async fn primary_index(&self) -> Result<usize, DbError> {
        let deadline = tokio::time::Instant::now() + self.inner.options.primary_wait;
        loop {
            let notified = self.inner.changed.notified();
            let index = self.inner.primary.load(Ordering::Acquire);
            if index < self.inner.nodes.len() && self.node(index).is_healthy() {
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
    async fn write(
        &self,
        sql: &str,
        params: Params<'_>,
        mode: Mode,
    ) -> Result<Written<Output>, DbError> {
        let index = self.primary_index().await?;
        let node = self.node(index);
        let span = tracing::debug_span!("db.write", node = %node.name);
        async {
            let write_timeout = self.inner.options.write_timeout;
            let (out, running) = match self
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
            let token = self.token_after_commit(index, running).await;
            Ok(Written {
                value: out,
                token,
                served_by: Arc::clone(&node.name),
            })
        }
        .instrument(span)
        .await
    }

    /// The primary's WAL position after a commit, on the session that
    /// committed, within the write timeout. If it cannot be had, the
    /// unknown token: reads that present it go to the primary.
    async fn token_after_commit(&self, index: usize, running: Running<'_>) -> ConsistencyToken {
        let node = self.node(index);
        let Ok(conn) = running.conn() else {
            return ConsistencyToken::unknown();
        };
        let answer = tokio::time::timeout(
            self.inner.options.write_timeout,
            conn.simple_query(TOKEN_SQL),
        )
        .await;
        match answer {
            Ok(Ok(messages)) => match parse_lsn(&messages) {
                Some(lsn) => {
                    running.release();
                    self.commit_token(node, lsn)
                }
                None => {
                    tracing::warn!(node = %node.name, "the token query's answer is not a WAL position; the write's token routes reads to the primary");
                    running.discard();
                    ConsistencyToken::unknown()
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(node = %node.name, error = %e, "the token query failed after the commit; the write's token routes reads to the primary");
                // The session's state is unknown: never reuse it.
                running.discard();
                ConsistencyToken::unknown()
            }
            Err(_) => {
                tracing::warn!(node = %node.name, "the token query timed out after the commit; the write's token routes reads to the primary");
                self.inner.request_reprobe();
                drop(running);
                ConsistencyToken::unknown()
            }
        }
    }

    fn commit_token(&self, node: &Node, lsn: Lsn) -> ConsistencyToken {
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
        let conn = node.connection(true).await?;
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

    /// Candidates for a read, with their node indices.
    fn replicas(&self, accept: impl Fn(&Node) -> bool) -> Vec<(usize, Candidate)> {
        let zone = self.inner.options.zone.as_deref();
        self.inner
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_healthy() && n.role() == Role::Replica && accept(n))
            .map(|(i, n)| {
                (
                    i,
                    Candidate {
                        in_flight: n.in_flight.load(Ordering::Relaxed),
                        latency: n.latency(self.inner.started),
                        lag: n.lag(),
                        weight: self.inner.weight(n),
                        same_zone: zone.is_some() && n.zone.as_deref() == zone,
                    },
                )
            })
            .collect()
    }

    fn pick(&self, candidates: &[(usize, Candidate)]) -> Option<usize> {
        let only: Vec<Candidate> = candidates.iter().map(|(_, c)| *c).collect();
        choose_replica(&only, self.inner.random()).map(|i| candidates[i].0)
    }

    /// Where a read goes, and the LSN its data reflects at least.
    async fn route(
        &self,
        consistency: Consistency,
        exclude: Option<usize>,
    ) -> Result<(usize, Lsn, RouteReason), DbError> {
        let not_excluded = |i: &(usize, Candidate)| Some(i.0) != exclude;
        let budget = self.inner.options.lag_budget;
        // A replica that did not answer the catch-up query in time.
        let mut stalled = None;
        let choice = match consistency {
            Consistency::Strong => None,
            Consistency::Any => {
                let c: Vec<_> = self
                    .replicas(|n| n.lag() <= budget)
                    .into_iter()
                    .filter(not_excluded)
                    .collect();
                self.pick(&c).map(|i| (i, RouteReason::Replica))
            }
            Consistency::BoundedStaleness(bound) => {
                let c: Vec<_> = self
                    .replicas(|n| n.lag() <= bound)
                    .into_iter()
                    .filter(not_excluded)
                    .collect();
                self.pick(&c).map(|i| (i, RouteReason::Replica))
            }
            // A commit whose position is unknown: no replica can be shown
            // to have it, and none is waited for.
            Consistency::ReadYourWrites(token) if token.is_unknown() => None,
            Consistency::ReadYourWrites(token) => {
                let ready: Vec<_> = self
                    .replicas(|n| n.lsn() >= token.lsn())
                    .into_iter()
                    .filter(not_excluded)
                    .collect();
                match self.pick(&ready) {
                    Some(i) => Some((i, RouteReason::CaughtUp)),
                    None => {
                        // Waiting only helps on a replica that is not far behind.
                        let wait = self.inner.options.read_your_writes_wait;
                        let c: Vec<_> = self
                            .replicas(|n| n.lag() <= wait)
                            .into_iter()
                            .filter(not_excluded)
                            .collect();
                        match self.pick(&c) {
                            Some(i) => match self.wait_for_replay(i, token.lsn()).await {
                                CatchUp::Replayed => Some((i, RouteReason::WaitedForReplica)),
                                CatchUp::Behind => None,
                                CatchUp::NoAnswer => {
                                    stalled = Some(i);
                                    None
                                }
                            },
                            None => None,
                        }
                    }
                }
            }
        };
        if let Some((i, reason)) = choice {
            return Ok((i, self.node(i).lsn(), reason));
        }
        // Strong reads and the unknown token belong on the primary: not a
        // fallback, so `fallback_to_primary(false)` does not refuse them.
        let primary_by_rule = match consistency {
            Consistency::Strong => true,
            Consistency::ReadYourWrites(token) => token.is_unknown(),
            _ => false,
        };
        if !self.inner.options.fallback_to_primary && !primary_by_rule {
            if let Some(i) = stalled {
                return Err(DbError::Timeout {
                    node: Arc::clone(&self.node(i).name),
                    operation: Operation::CatchUp,
                    after: self.inner.options.read_your_writes_wait,
                });
            }
            return Err(DbError::NoPrimary {
                tried: vec!["no replica qualifies and fallback_to_primary is off".into()],
            });
        }
        let i = self.primary_index().await?;
        let lsn = self
            .node(i)
            .lsn()
            .max(Lsn(self.inner.last_write.load(Ordering::Acquire)));
        let reason = if primary_by_rule {
            RouteReason::Primary
        } else {
            RouteReason::FallbackToPrimary
        };
        Ok((i, lsn, reason))
    }

    /// Polls replica `index` until it has replayed `lsn`, within the
    /// read-your-writes wait, which bounds everything here: the checkout
    /// and every query. A replica that does not answer in time is left to
    /// the monitor (a wait for a pooled connection is not held against it).
    async fn wait_for_replay(&self, index: usize, lsn: Lsn) -> CatchUp {
        let node = self.node(index);
        let wait = self.inner.options.read_your_writes_wait;
        let deadline = tokio::time::Instant::now() + wait;
        let Ok(Ok(conn)) = tokio::time::timeout_at(deadline, node.connection(false)).await else {
            return CatchUp::Behind;
        };
        let running = Running::new(conn, &self.inner.cancel);
        let Ok(conn) = running.conn() else {
            return CatchUp::Behind;
        };
        let mut pause = Duration::from_millis(1);
        loop {
            match tokio::time::timeout_at(deadline, conn.simple_query(REPLAY_SQL)).await {
                Ok(Ok(messages)) => {
                    if let Some(replayed) = parse_lsn(&messages) {
                        node.observe_lsn(replayed);
                        if replayed >= lsn {
                            running.release();
                            return CatchUp::Replayed;
                        }
                    }
                }
                Ok(Err(e)) => {
                    running.settle(&e, false);
                    return CatchUp::Behind;
                }
                Err(_) => {
                    // Dropping `running` cancels the query and closes the session.
                    tracing::debug!(node = %node.name, ?wait, "replica did not answer the catch-up query");
                    self.inner.request_reprobe();
                    return CatchUp::NoAnswer;
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                running.release();
                return CatchUp::Behind;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    async fn read(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        let (index, lsn, reason) = self.route(consistency, None).await?;
        let node = self.node(index);
        let span = tracing::debug_span!(
            "db.read",
            node = %node.name,
            reason = ?reason,
            lag_ms = node.lag().as_millis() as u64,
        );
        match self.read_on(index, sql, params).instrument(span).await {
            Ok(rows) => Ok(Read {
                value: rows,
                served_by: Arc::clone(&node.name),
                lsn,
                reason,
            }),
            // A replica that failed (not the query): once elsewhere.
            Err((e, true)) if index != self.inner.primary.load(Ordering::Acquire) => {
                tracing::warn!(node = %node.name, error = %e, "read failed on a replica; retrying elsewhere");
                // Nowhere else to go: the first error is the one that says why.
                let Ok((index, lsn, _)) = self.route(consistency, Some(index)).await else {
                    return Err(e);
                };
                let rows = self.read_on(index, sql, params).await.map_err(|(e, _)| e)?;
                Ok(Read {
                    value: rows,
                    served_by: Arc::clone(&self.node(index).name),
                    lsn,
                    reason: RouteReason::Retried,
                })
            }
            Err((e, _)) => Err(e),
        }
    }

    /// A read routed by `consistency`.
    pub async fn read_query(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        self.read(consistency, sql, params).await
    }

    /// A read of at most one row routed by `consistency`.
    pub async fn read_opt(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Option<Row>>, DbError> {
        let r = self.read(consistency, sql, params).await?;
        let mut rows = r.value;
        if rows.len() > 1 {
            return Err(DbError::RowCount {
                node: Arc::clone(&r.served_by),
                rows: rows.len(),
                written: None,
            });
        }
        Ok(Read {
            value: rows.pop(),
            served_by: r.served_by,
            lsn: r.lsn,
            reason: r.reason,
        })
    }

    /// A read of exactly one row routed by `consistency`.
    pub async fn read_one(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Row>, DbError> {
        let r = self.read(consistency, sql, params).await?;
        let row = exactly_one(r.value, &r.served_by, None)?;
        Ok(Read {
            value: row,
            served_by: r.served_by,
            lsn: r.lsn,
            reason: r.reason,
        })
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

fn rows(out: Output) -> Vec<Row> {
    match out {
        Output::Rows(rows) => rows,
        Output::Count(_) => Vec::new(),
    }
}

/// The one row; otherwise a [`DbError::RowCount`] carrying `written`, the
/// token of a write that committed anyway.
fn exactly_one(
    mut rows: Vec<Row>,
    node: &Arc<str>,
    written: Option<ConsistencyToken>,
) -> Result<Row, DbError> {
    if rows.len() != 1 {
        return Err(DbError::RowCount {
            node: Arc::clone(node),
            rows: rows.len(),
            written,
        });
    }
    rows.pop().ok_or_else(|| DbError::RowCount {
        node: Arc::clone(node),
        rows: 0,
        written,
    })
}

/// A transaction on the primary. [`commit`](Self::commit) returns the
/// token; dropping it uncommitted rolls back (the session is closed, so the
/// server aborts it).
///
/// Every statement, and `COMMIT`, is bounded by the write timeout. A
/// statement that times out, loses its connection or whose future is
/// dropped mid-flight leaves the transaction unusable: its query is
/// cancelled, later statements fail, and `commit` reports
/// [`DbError::RolledBack`]. So does `commit` after a statement the server
/// rejected (unless a savepoint recovered it): a rolled-back transaction is
/// never reported committed.
pub struct Transaction {
    db: Db,
    index: usize,
    conn: Option<Object>,
    /// The session cannot be trusted any more (see the type's docs).
    broken: AtomicBool,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("node", &self.db.node(self.index).name)
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .finish()
    }
}

/// Marks the transaction broken and cancels its statement if the statement
/// future is dropped before it ends.
struct StatementGuard<'a> {
    tx: &'a Transaction,
    armed: bool,
}

impl Drop for StatementGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.tx.break_session(true);
        }
    }
}

const BROKEN: &str =
    "the session was lost, or a statement timed out or was abandoned, before COMMIT";

impl Transaction {
    fn node_name(&self) -> Arc<str> {
        Arc::clone(&self.db.node(self.index).name)
    }

    fn conn(&self) -> Result<&Object, DbError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(DbError::RolledBack {
                node: self.node_name(),
                reason: BROKEN,
                source: None,
            });
        }
        self.conn.as_ref().ok_or(DbError::Shutdown)
    }

    /// From now on the transaction can only roll back; with `cancel`, the
    /// statement running on it is cancelled.
    fn break_session(&self, cancel: bool) {
        if self.broken.swap(true, Ordering::AcqRel) || !cancel {
            return;
        }
        if let Some(conn) = &self.conn {
            let request = (self.db.inner.cancel)(conn.cancel_token());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(request);
            }
        }
    }

    async fn statement(
        &self,
        sql: &str,
        params: Params<'_>,
        mode: Mode,
    ) -> Result<Output, DbError> {
        let conn = self.conn()?;
        let write_timeout = self.db.inner.options.write_timeout;
        let mut guard = StatementGuard {
            tx: self,
            armed: true,
        };
        let result = tokio::time::timeout(write_timeout, async {
            let stmt = prepare(conn, &self.db.node(self.index).name, sql).await?;
            match mode {
                Mode::Rows => conn.query(&stmt, params).await.map(Output::Rows),
                Mode::Execute => conn.execute(&stmt, params).await.map(Output::Count),
            }
        })
        .await;
        guard.armed = false;
        match result {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(source)) => {
                if fault(&source) == Fault::Connection {
                    self.break_session(false);
                }
                // Nothing of the transaction can have committed.
                Err(self
                    .db
                    .write_error(self.index, source, false, Operation::Statement))
            }
            Err(_) => {
                self.break_session(true);
                self.db.inner.request_reprobe();
                Err(DbError::Timeout {
                    node: self.node_name(),
                    operation: Operation::Statement,
                    after: write_timeout,
                })
            }
        }
    }

    /// Runs a statement; returns its rows.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        self.statement(sql, params, Mode::Rows).await.map(rows)
    }

    /// Runs a statement for exactly one row.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        let rows = self.query(sql, params).await?;
        exactly_one(rows, &self.db.node(self.index).name, None)
    }

    /// Runs a statement; returns the affected row count.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        match self.statement(sql, params, Mode::Execute).await? {
            Output::Count(n) => Ok(n),
            Output::Rows(rows) => Ok(rows.len() as u64),
        }
    }

    /// Commits and returns the token of the commit, in one round trip
    /// within the write timeout.
    ///
    /// - [`DbError::RolledBack`]: nothing was committed (a statement had
    ///   failed, `COMMIT` failed, or the session was broken before it).
    /// - [`DbError::EndedEarly`]: a statement sent through the transaction
    ///   (`COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION`...) had ended it; what
    ///   it wrote may be committed.
    /// - [`DbError::Timeout`] / [`DbError::Interrupted`] for
    ///   [`Operation::Commit`]: `COMMIT` was sent and no answer came; the
    ///   outcome is unknown.
    /// - `Ok`: committed. If the token could not be had after `COMMIT`,
    ///   the unknown token ([`ConsistencyToken::unknown`]), never an error.
    pub async fn commit(mut self) -> Result<ConsistencyToken, DbError> {
        let node = self.db.node(self.index);
        let name = Arc::clone(&node.name);
        let conn = self.conn.take().ok_or(DbError::Shutdown)?;
        let running = Running::new(conn, &self.db.inner.cancel);
        if self.broken.load(Ordering::Acquire) {
            running.discard();
            return Err(DbError::RolledBack {
                node: name,
                reason: BROKEN,
                source: None,
            });
        }
        let write_timeout = self.db.inner.options.write_timeout;
        let deadline = tokio::time::Instant::now() + write_timeout;
        // Statements completed: 1 after the guard, 2 after COMMIT.
        let mut completed = 0;
        let mut lsn = None;
        let conn = running.conn()?;
        let answer = tokio::time::timeout_at(deadline, async {
            let stream = conn.simple_query_raw(COMMIT_SQL).await.map_err(Some)?;
            futures_util::pin_mut!(stream);
            while let Some(message) = stream.next().await {
                match message.map_err(Some)? {
                    SimpleQueryMessage::CommandComplete(_) => completed += 1,
                    SimpleQueryMessage::Row(row) if completed == 2 => {
                        lsn = row.get(0).and_then(|text| text.parse::<Lsn>().ok());
                    }
                    _ => {}
                }
            }
            Ok::<_, Option<tokio_postgres::Error>>(())
        })
        .await;
        match answer {
            Err(_) if completed >= 2 => {
                // Committed; only the token query is stuck.
                self.db.inner.request_reprobe();
                drop(running);
                Ok(ConsistencyToken::unknown())
            }
            Err(_) => {
                self.db.inner.request_reprobe();
                drop(running);
                Err(DbError::Timeout {
                    node: name,
                    operation: Operation::Commit,
                    after: write_timeout,
                })
            }
            Ok(Ok(())) if completed >= 2 => match lsn {
                Some(lsn) => {
                    running.release();
                    Ok(self.db.commit_token(node, lsn))
                }
                None => {
                    tracing::warn!(node = %name, "no WAL position after COMMIT; the token routes reads to the primary");
                    running.discard();
                    Ok(ConsistencyToken::unknown())
                }
            },
            Ok(Err(Some(e))) if completed >= 2 => {
                tracing::warn!(node = %name, error = %e, "the token query failed after COMMIT; the token routes reads to the primary");
                running.discard();
                Ok(ConsistencyToken::unknown())
            }
            Ok(Err(Some(e))) if fault(&e) == Fault::Connection => {
                // The server may have run COMMIT before the session broke.
                running.discard();
                Err(self.db.write_error(self.index, e, true, Operation::Commit))
            }
            Ok(Err(Some(e)))
                if completed == 0 && e.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION) =>
            {
                // The user's own COMMIT, ROLLBACK or PREPARE TRANSACTION
                // ended the block: what it wrote may be committed.
                running.discard();
                Err(DbError::EndedEarly {
                    node: name,
                    source: Arc::new(e),
                })
            }
            Ok(Err(Some(e))) => {
                let reason = if completed == 0 {
                    "a statement of the transaction failed, so the server would answer COMMIT with ROLLBACK"
                } else {
                    "COMMIT failed"
                };
                // Whatever is left of the transaction ends with the session.
                running.discard();
                Err(DbError::RolledBack {
                    node: name,
                    reason,
                    source: Some(Arc::new(e)),
                })
            }
            // The server ended the answer early without an error: not a
            // commit we can vouch for.
            Ok(Ok(())) | Ok(Err(None)) => {
                running.discard();
                Err(DbError::Timeout {
                    node: name,
                    operation: Operation::Commit,
                    after: write_timeout,
                })
            }
        }
    }

    /// Rolls back, within the write timeout. Always succeeds in effect: if
    /// `ROLLBACK` cannot be sent or answered, the session is closed, which
    /// makes the server abort the transaction.
    pub async fn rollback(mut self) -> Result<(), DbError> {
        let conn = self.conn.take().ok_or(DbError::Shutdown)?;
        let running = Running::new(conn, &self.db.inner.cancel);
        if self.broken.load(Ordering::Acquire) {
            running.discard();
            return Ok(());
        }
        let write_timeout = self.db.inner.options.write_timeout;
        match tokio::time::timeout(write_timeout, running.conn()?.batch_execute("ROLLBACK")).await {
            Ok(Ok(())) => running.release(),
            Ok(Err(_)) => running.discard(),
            Err(_) => drop(running),
        }
        Ok(())
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Never return a session with an open transaction to the pool.
            drop(Object::take(conn));
        }
    }
}

/// A query for the `tower::Service` face of [`Db`].
#[derive(Clone)]
pub struct Query {
    /// The SQL.
    pub sql: Arc<str>,
    /// Its parameters.
    pub params: Vec<Arc<dyn ToSql + Send + Sync>>,
    /// `None` for a write (on the primary, returns a token); else a read.
    pub consistency: Option<Consistency>,
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Query")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .field("consistency", &self.consistency)
            .finish()
    }
}

impl Query {
    /// A read with the given consistency.
    pub fn read(sql: impl Into<Arc<str>>, consistency: Consistency) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
            consistency: Some(consistency),
        }
    }

    /// A write on the primary.
    pub fn write(sql: impl Into<Arc<str>>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
            consistency: None,
        }
    }

    /// Adds a parameter.
    #[must_use]
    pub fn bind(mut self, param: impl ToSql + Send + Sync + 'static) -> Self {
        self.params.push(Arc::new(param));
        self
    }
}

/// What the `Service` face of [`Db`] answers: shareable, so a cache can
/// sit on top.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueryOutput {
    /// The rows.
    pub rows: Arc<Vec<Row>>,
    /// The node that ran the query.
    pub served_by: Arc<str>,
    /// The WAL position the data reflects at least.
    pub lsn: Lsn,
    /// For writes, the token.
    pub token: Option<ConsistencyToken>,
}

impl tower::Service<Query> for Db {
    type Response = QueryOutput;
    type Error = DbError;
    type Future = Pin<Box<dyn Future<Output = Result<QueryOutput, DbError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DbError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, q: Query) -> Self::Future {
        let db = self.clone();
        Box::pin(async move {
            let params: Vec<&(dyn ToSql + Sync)> = q
                .params
                .iter()
                .map(|p| &**p as &(dyn ToSql + Sync))
                .collect();
            match q.consistency {
                None => {
                    let w = db.query(&q.sql, &params).await?;
                    Ok(QueryOutput {
                        rows: Arc::new(w.value),
                        served_by: w.served_by,
                        lsn: w.token.lsn(),
                        token: Some(w.token),
                    })
                }
                Some(consistency) => {
                    let r = db.read(consistency, &q.sql, &params).await?;
                    Ok(QueryOutput {
                        rows: Arc::new(r.value),
                        served_by: r.served_by,
                        lsn: r.lsn,
                        token: None,
                    })
                }
            }
        })
    }
}
