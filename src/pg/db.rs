//! The query handle: writes and transactions on the primary, reads routed
//! by consistency, tokens after every write.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};
use tracing::Instrument;

use super::balance::{Candidate, choose_replica};
use super::cluster::{Inner, Life, Node, Role};
use super::error::DbError;
use super::lsn::{Consistency, ConsistencyToken, Lsn};

/// Why a read went where it went (in spans and [`Read::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteReason {
    /// `Strong` reads and writes.
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
    pub(crate) life: Arc<Life>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("nodes", &self.inner.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Returns a connection's in-flight query to the pool safely: if the
/// caller drops the future, the server-side query is cancelled and the
/// connection is closed instead of being handed to someone else.
struct Running {
    conn: Option<Object>,
    node_in_flight: Option<Arc<Inner>>,
    node: usize,
}

impl Running {
    fn finish(mut self) -> Object {
        self.release();
        // `conn` is always set until finish or drop.
        self.conn
            .take()
            .unwrap_or_else(|| unreachable!("connection taken twice"))
    }

    fn release(&mut self) {
        if let Some(inner) = self.node_in_flight.take() {
            inner.nodes[self.node]
                .in_flight
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.release();
        if let Some(conn) = self.conn.take() {
            let client = Object::take(conn);
            let cancel = client.cancel_token();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = cancel.cancel_query(NoTls).await;
                    drop(client);
                });
            }
        }
    }
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

impl Db {
    fn node(&self, index: usize) -> &Node {
        &self.inner.nodes[index]
    }

    /// Runs one statement on node `index`, with in-flight accounting,
    /// latency EWMA, metrics, a span, and cancel-on-drop.
    async fn run(
        &self,
        index: usize,
        sql: &str,
        params: Params<'_>,
        mode: Mode,
        write: bool,
    ) -> Result<(Output, Object), DbError> {
        let node = self.node(index);
        let conn = node.connection(write).await?;
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        let running = Running {
            conn: Some(conn),
            node_in_flight: Some(Arc::clone(&self.inner)),
            node: index,
        };
        let Some(conn) = running.conn.as_ref() else {
            return Err(DbError::Shutdown);
        };
        let result = async {
            let stmt = prepare(conn, &node.name, sql).await?;
            // Time the execution only: a first prepare on a new connection
            // must not make a node look slow for long.
            let started = Instant::now();
            let out = match mode {
                Mode::Rows => Output::Rows(conn.query(&stmt, params).await?),
                Mode::Execute => Output::Count(conn.execute(&stmt, params).await?),
            };
            node.record_latency(started.elapsed(), self.inner.started);
            Ok::<_, tokio_postgres::Error>(out)
        }
        .await;
        node.queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tower_scale_db_queries_total", "node" => Arc::clone(&node.name))
            .increment(1);
        let conn = running.finish();
        match result {
            Ok(out) => Ok((out, conn)),
            Err(source) => {
                if super::error::is_connection_failure(&source) {
                    node.mark_down();
                    self.inner.request_reprobe();
                    drop(Object::take(conn));
                    return Err(DbError::Connect {
                        node: Arc::clone(&node.name),
                        source: Arc::new(source),
                    });
                }
                if source.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
                    && node.role() == Role::Primary
                {
                    // Demoted under us: rediscover at once, never reuse this session.
                    node.demote();
                    self.inner.request_reprobe();
                    drop(Object::take(conn));
                    return Err(DbError::ReadOnly {
                        node: Arc::clone(&node.name),
                    });
                }
                Err(DbError::Query {
                    node: Arc::clone(&node.name),
                    source: Arc::new(source),
                })
            }
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
            let (out, conn) = self.run(index, sql, params, mode, true).await?;
            let token = self.token_after_commit(index, &conn).await?;
            Ok(Written {
                value: out,
                token,
                served_by: Arc::clone(&node.name),
            })
        }
        .instrument(span)
        .await
    }

    async fn token_after_commit(
        &self,
        index: usize,
        conn: &Object,
    ) -> Result<ConsistencyToken, DbError> {
        let node = self.node(index);
        let row = conn
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|source| DbError::Query {
                node: Arc::clone(&node.name),
                source: Arc::new(source),
            })?;
        let text: &str = row.get(0);
        let lsn: Lsn = text.parse().unwrap_or_default();
        self.inner.last_write.fetch_max(lsn.0, Ordering::AcqRel);
        node.observe_lsn(lsn);
        Ok(ConsistencyToken::new(lsn))
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

    /// Like [`query`](Self::query), for exactly one row.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Written<Row>, DbError> {
        let w = self.query(sql, params).await?;
        let node = Arc::clone(&w.served_by);
        let row = exactly_one(w.value, &node)?;
        Ok(Written {
            value: row,
            token: w.token,
            served_by: w.served_by,
        })
    }

    /// Starts a transaction on the primary. Commit returns the token;
    /// dropping it uncommitted rolls it back (the session is closed).
    pub async fn transaction(&self) -> Result<Transaction, DbError> {
        let index = self.primary_index().await?;
        let node = self.node(index);
        let conn = node.connection(true).await?;
        conn.batch_execute("BEGIN")
            .await
            .map_err(|source| DbError::Query {
                node: Arc::clone(&node.name),
                source: Arc::new(source),
            })?;
        Ok(Transaction {
            db: self.clone(),
            index,
            conn: Some(conn),
        })
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
                            Some(i) if self.wait_for_replay(i, token.lsn()).await => {
                                Some((i, RouteReason::WaitedForReplica))
                            }
                            _ => None,
                        }
                    }
                }
            }
        };
        if let Some((i, reason)) = choice {
            return Ok((i, self.node(i).lsn(), reason));
        }
        if !self.inner.options.fallback_to_primary && consistency != Consistency::Strong {
            return Err(DbError::NoPrimary {
                tried: vec!["no replica qualifies and fallback_to_primary is off".into()],
            });
        }
        let i = self.primary_index().await?;
        let lsn = self
            .node(i)
            .lsn()
            .max(Lsn(self.inner.last_write.load(Ordering::Acquire)));
        let reason = if consistency == Consistency::Strong {
            RouteReason::Primary
        } else {
            RouteReason::FallbackToPrimary
        };
        Ok((i, lsn, reason))
    }

    /// Polls replica `index` until it has replayed `lsn`, within the
    /// read-your-writes wait. True if it did.
    async fn wait_for_replay(&self, index: usize, lsn: Lsn) -> bool {
        let node = self.node(index);
        let deadline = Instant::now() + self.inner.options.read_your_writes_wait;
        let Ok(conn) = node.connection(false).await else {
            return false;
        };
        let mut pause = Duration::from_millis(1);
        loop {
            let Ok(row) = conn
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
            else {
                return false;
            };
            let replayed: Option<&str> = row.get(0);
            if let Some(replayed) = replayed.and_then(|s| s.parse::<Lsn>().ok()) {
                node.observe_lsn(replayed);
                if replayed >= lsn {
                    return true;
                }
            }
            if Instant::now() + pause > deadline {
                return false;
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
        let read_timeout = self.inner.options.read_timeout;
        let first = match tokio::time::timeout(
            read_timeout,
            self.run(index, sql, params, Mode::Rows, false)
                .instrument(span),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                // A stalled server: out of rotation until the monitor sees it answer.
                node.mark_down();
                self.inner.request_reprobe();
                Err(DbError::Timeout {
                    node: Arc::clone(&node.name),
                    after: read_timeout,
                })
            }
        };
        match first {
            Ok((out, _conn)) => Ok(Read {
                value: rows(out),
                served_by: Arc::clone(&node.name),
                lsn,
                reason,
            }),
            // A replica that failed for a connection reason: once elsewhere.
            Err(e)
                if e.is_connection_error()
                    && index != self.inner.primary.load(Ordering::Acquire) =>
            {
                tracing::warn!(node = %node.name, error = %e, "read failed on a replica; retrying elsewhere");
                let (index, lsn, _) = self.route(consistency, Some(index)).await?;
                let (out, _conn) = self.run(index, sql, params, Mode::Rows, false).await?;
                Ok(Read {
                    value: rows(out),
                    served_by: Arc::clone(&self.node(index).name),
                    lsn,
                    reason: RouteReason::Retried,
                })
            }
            Err(e) => Err(e),
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
        let row = exactly_one(r.value, &r.served_by)?;
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

fn exactly_one(mut rows: Vec<Row>, node: &Arc<str>) -> Result<Row, DbError> {
    if rows.len() != 1 {
        return Err(DbError::RowCount {
            node: Arc::clone(node),
            rows: rows.len(),
        });
    }
    rows.pop().ok_or_else(|| DbError::RowCount {
        node: Arc::clone(node),
        rows: 0,
    })
}

/// A transaction on the primary. [`commit`](Self::commit) returns the
/// token; dropping it uncommitted rolls back (the session is closed, so the
/// server aborts it).
pub struct Transaction {
    db: Db,
    index: usize,
    conn: Option<Object>,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("node", &self.db.node(self.index).name)
            .finish()
    }
}

impl Transaction {
    fn conn(&self) -> Result<&Object, DbError> {
        self.conn.as_ref().ok_or(DbError::Shutdown)
    }

    fn err(&self, source: tokio_postgres::Error) -> DbError {
        let node = self.db.node(self.index);
        if source.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
            node.demote();
            self.db.inner.request_reprobe();
            return DbError::ReadOnly {
                node: Arc::clone(&node.name),
            };
        }
        DbError::Query {
            node: Arc::clone(&node.name),
            source: Arc::new(source),
        }
    }

    /// Runs a statement; returns its rows.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        let conn = self.conn()?;
        let node = &self.db.node(self.index).name;
        let stmt = prepare(conn, node, sql).await.map_err(|e| self.err(e))?;
        conn.query(&stmt, params).await.map_err(|e| self.err(e))
    }

    /// Runs a statement for exactly one row.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        let rows = self.query(sql, params).await?;
        exactly_one(rows, &self.db.node(self.index).name)
    }

    /// Runs a statement; returns the affected row count.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        let conn = self.conn()?;
        let node = &self.db.node(self.index).name;
        let stmt = prepare(conn, node, sql).await.map_err(|e| self.err(e))?;
        conn.execute(&stmt, params).await.map_err(|e| self.err(e))
    }

    /// Commits and returns the token of the commit.
    pub async fn commit(mut self) -> Result<ConsistencyToken, DbError> {
        let conn = self.conn.take().ok_or(DbError::Shutdown)?;
        if let Err(e) = conn.batch_execute("COMMIT").await {
            drop(Object::take(conn));
            return Err(self.err(e));
        }
        self.db.token_after_commit(self.index, &conn).await
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<(), DbError> {
        let conn = self.conn.take().ok_or(DbError::Shutdown)?;
        if let Err(e) = conn.batch_execute("ROLLBACK").await {
            drop(Object::take(conn));
            return Err(self.err(e));
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
