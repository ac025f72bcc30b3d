//! One statement on one session: the checkout that cancels and closes on
//! abandonment, the in-flight count, the bounded statement cache, and the
//! SQL the write path sends after a statement (token, replay position, commit).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use deadpool_postgres::{ClientWrapper, Object};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Row, SimpleQueryMessage, Statement};

use super::error::{DbError, Fault, fault};
use super::lsn::{ConsistencyToken, Lsn, WalLayout};
use super::node::{Canceller, Node};

/// A checked-out connection that may have a statement in flight. Dropped
/// armed (a deadline passed, the caller gave up on the future), it cancels
/// the server-side statement through the cluster's TLS connector and closes
/// the session instead of handing it to someone else.
pub(super) struct Running<'a> {
    conn: Option<Object>,
    cancel: &'a Canceller,
}

impl<'a> Running<'a> {
    pub(super) fn new(conn: Object, cancel: &'a Canceller) -> Self {
        Self {
            conn: Some(conn),
            cancel,
        }
    }

    pub(super) fn conn(&self) -> Result<&Object, DbError> {
        // Always set until release, discard or drop.
        self.conn.as_ref().ok_or(DbError::Shutdown)
    }

    /// The statement finished and the session is sound: back to the pool.
    pub(super) fn release(mut self) {
        drop(self.conn.take());
    }

    /// The session is broken or in an unknown state: close it, no cancel.
    pub(super) fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }

    /// Keeps the session out of the pool and hands it over (a transaction).
    pub(super) fn into_object(mut self) -> Option<Object> {
        self.conn.take()
    }

    /// After a driver error: sessions that failed, or that a demoted
    /// primary answered, are closed; the others go back to the pool.
    pub(super) fn settle(self, e: &tokio_postgres::Error, write: bool) {
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
pub(super) fn cancel_and_close(client: ClientWrapper, cancel: &Canceller) {
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
pub(super) struct InFlight<'a>(&'a Node);

impl<'a> InFlight<'a> {
    pub(super) fn new(node: &'a Node) -> Self {
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
pub(super) enum Failure {
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

/// A statement that ran: its output, the session (armed until released),
/// and the answer of the token query pipelined behind it.
pub(super) struct Attempt<'a> {
    pub(super) out: Output,
    pub(super) running: Running<'a>,
    pub(super) token: TokenAnswer,
}

/// The token query's answer, for a statement that succeeded.
pub(super) enum TokenAnswer {
    /// No token query was sent (a read).
    None,
    /// The token row: insert and write positions.
    Row(Row),
    /// It failed: the session's state is unknown.
    Failed(tokio_postgres::Error),
    /// No answer by the deadline: the session has a query in flight.
    TimedOut,
}

/// Runs `statement` and `token` together until both answer or `deadline`
/// passes, polling the statement first (so its request is sent first:
/// tokio-postgres sends a request when its future is first polled, and
/// the server answers them in order). `None` for whichever had not
/// answered by the deadline.
pub(super) async fn pipelined<S, T>(
    deadline: tokio::time::Instant,
    statement: S,
    token: T,
) -> (
    Option<Result<Output, tokio_postgres::Error>>,
    Option<Result<TokenAnswer, tokio_postgres::Error>>,
)
where
    S: Future<Output = Result<Output, tokio_postgres::Error>>,
    T: Future<Output = Result<Row, tokio_postgres::Error>>,
{
    let mut statement = std::pin::pin!(statement);
    let mut token = std::pin::pin!(token);
    let mut ran = None;
    let mut answered = None;
    let both = std::future::poll_fn(|cx| {
        if ran.is_none()
            && let Poll::Ready(r) = statement.as_mut().poll(cx)
        {
            ran = Some(r);
        }
        if answered.is_none()
            && let Poll::Ready(r) = token.as_mut().poll(cx)
        {
            answered = Some(r.map(TokenAnswer::Row));
        }
        if ran.is_some() && answered.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    // On timeout, whatever answered stays recorded.
    let _ = tokio::time::timeout_at(deadline, both).await;
    (ran, answered)
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
pub(super) async fn prepare(
    conn: &Object,
    clears: &metrics::Counter,
    sql: &str,
) -> Result<Statement, tokio_postgres::Error> {
    let stmt = conn.prepare_cached(sql).await?;
    if conn.statement_cache.size() > MAX_CACHED_STATEMENTS {
        conn.statement_cache.clear();
        clears.increment(1);
    }
    Ok(stmt)
}

pub(super) enum Mode {
    Rows,
    Execute,
}

pub(super) enum Output {
    Rows(Vec<Row>),
    Count(u64),
}

/// The token query, pipelined behind every autocommit write (prepared
/// once per connection, sent before the write's answer is read, so the
/// write and its token cost one round trip): the WAL insert position and
/// the write position (see [`WalLayout`](super::lsn::WalLayout) for why
/// both). Schema-qualified, so no `search_path` can redirect it; it runs
/// after the write's implicit transaction has committed (its own `Sync`).
pub(super) const TOKEN_SQL: &str =
    "SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.pg_current_wal_lsn()";

/// Read-your-writes catch-up: how far a replica has replayed.
pub(super) const REPLAY_SQL: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()::text";

/// `COMMIT` with its guard and its token in one round trip. The guard
/// `SAVEPOINT` fails in a failed transaction (25P02), and outside a
/// transaction block (25P01: a statement of the transaction ended it, a
/// `COMMIT`, `ROLLBACK` or `PREPARE TRANSACTION` sent through it); the
/// server then skips the rest, so neither is ever taken for our commit.
/// After `COMMIT`'s own completion the commit is certain, whatever happens
/// to the token query.
pub(super) const COMMIT_SQL: &str = "SAVEPOINT tower_scale_guard; COMMIT; \
    SELECT pg_catalog.pg_current_wal_insert_lsn()::text, pg_catalog.pg_current_wal_lsn()::text";

/// The commit position in a token row (insert and write positions), if
/// it holds one.
pub(super) fn token_position(
    insert: Option<Lsn>,
    written: Option<Lsn>,
    layout: WalLayout,
) -> Option<Lsn> {
    Some(layout.commit_position(insert?, written.unwrap_or_default()))
}

/// The WAL position in a replay query's answer, if it is one.
pub(super) fn parse_lsn(messages: &[SimpleQueryMessage]) -> Option<Lsn> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).and_then(|text| text.parse().ok()),
        _ => None,
    })
}

pub(super) fn rows(out: Output) -> Vec<Row> {
    match out {
        Output::Rows(rows) => rows,
        Output::Count(_) => Vec::new(),
    }
}

/// The one row; otherwise a [`DbError::RowCount`] carrying `written`, the
/// token of a write that committed anyway.
pub(super) fn exactly_one(
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
