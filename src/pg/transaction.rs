//! [`Transaction`]: statements on one primary session, and a commit that
//! is reported only when it happened.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Object;
use futures_util::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Row, SimpleQueryMessage};

use super::db::{Db, Params};
use super::error::{DbError, Fault, Operation, fault};
use super::lsn::{ConsistencyToken, Lsn};
use super::session::{
    COMMIT_SQL, Mode, Output, Running, exactly_one, prepare, rows, token_position,
};

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
///
/// ```no_run
/// use tower_scale::pg::{Consistency, Db, DbError};
///
/// async fn transfer(db: &Db, from: i64, to: i64, cents: i64) -> Result<(), DbError> {
///     let tx = db.transaction().await?;
///     tx.execute("UPDATE accounts SET cents = cents - $1 WHERE id = $2", &[&cents, &from])
///         .await?;
///     tx.execute("UPDATE accounts SET cents = cents + $1 WHERE id = $2", &[&cents, &to])
///         .await?;
///     // `COMMIT` and the token in one round trip.
///     let token = tx.commit().await?;
///     let balance = db
///         .read_one(
///             Consistency::ReadYourWrites(token),
///             "SELECT cents FROM accounts WHERE id = $1",
///             &[&from],
///         )
///         .await?;
///     println!("balance now {}", balance.value.get::<_, i64>(0));
///     Ok(())
/// }
/// ```
pub struct Transaction {
    pub(super) db: Db,
    pub(super) index: usize,
    pub(super) conn: Option<Object>,
    /// The session cannot be trusted any more (see the type's docs).
    pub(super) broken: AtomicBool,
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
pub(super) struct StatementGuard<'a> {
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

/// Why a transaction begun on a primary fenced since is not committed.
const FENCED: &str = "its primary was fenced (a primary on a newer timeline was seen) \
     before the commit: retry it on the new primary";

pub(super) const BROKEN: &str =
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
        super::statement::check(sql, super::statement::Context::Transaction)?;
        let conn = self.conn()?;
        let write_timeout = self.db.inner.options.write_timeout;
        let mut guard = StatementGuard {
            tx: self,
            armed: true,
        };
        let result = tokio::time::timeout(write_timeout, async {
            let stmt = prepare(conn, &self.db.node(self.index).statement_cache_clears, sql).await?;
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
        // Begun on a primary that this instance has since fenced (a newer
        // timeline's primary was seen): nothing is committed there.
        if node.is_fenced() {
            running.discard();
            return Err(DbError::RolledBack {
                node: name,
                reason: FENCED,
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
                        let at = |i| row.get(i).and_then(|text| text.parse::<Lsn>().ok());
                        lsn = token_position(at(0), at(1), node.wal_layout());
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

#[cfg(feature = "shard")]
impl Db {
    /// Starts a transaction with `begin`, simple-query text that starts
    /// with `BEGIN` and may run more (the shard fence), in one round trip
    /// within the write timeout; returns the rows it answered. If any of
    /// it fails, the session is closed (the server aborts what began).
    pub(crate) async fn transaction_with(
        &self,
        begin: &str,
    ) -> Result<(Transaction, Vec<tokio_postgres::SimpleQueryRow>), DbError> {
        let index = self.primary_index().await?;
        let node = self.node(index);
        let conn = node.connection().await?;
        let running = Running::new(conn, &self.inner.cancel);
        let write_timeout = self.inner.options.write_timeout;
        let begun = tokio::time::timeout(write_timeout, running.conn()?.simple_query(begin)).await;
        match begun {
            Ok(Ok(messages)) => {
                let rows = messages
                    .into_iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(row) => Some(row),
                        _ => None,
                    })
                    .collect();
                let tx = Transaction {
                    db: self.clone(),
                    index,
                    conn: running.into_object(),
                    broken: AtomicBool::new(false),
                };
                Ok((tx, rows))
            }
            Ok(Err(source)) => {
                running.discard();
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
}

/// A transaction begun together with its first statement (see
/// [`Db::transaction_with_statement`]).
#[cfg(feature = "shard")]
pub(crate) struct Begun {
    pub(crate) tx: Transaction,
    /// The rows the begin text answered.
    pub(crate) begin_rows: Vec<tokio_postgres::SimpleQueryRow>,
    /// The statement's rows, or why it failed (the transaction is then
    /// aborted: drop it).
    pub(crate) statement: Result<Vec<Row>, DbError>,
}

#[cfg(feature = "shard")]
impl Db {
    /// Like [`transaction_with`](Self::transaction_with), with the first
    /// statement sent in the same flight, right behind `begin` (the server
    /// runs them in order: the statement after everything `begin` did).
    /// One round trip, plus the statement's preparation the first time a
    /// session sees it. Nothing is committed: the caller commits or drops
    /// the transaction, so no error here means "may have committed".
    pub(crate) async fn transaction_with_statement(
        &self,
        begin: &str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Begun, DbError> {
        super::statement::check(sql, super::statement::Context::Transaction)?;
        let index = self.primary_index().await?;
        let node = self.node(index);
        let conn = node.connection().await?;
        let running = Running::new(conn, &self.inner.cancel);
        let write_timeout = self.inner.options.write_timeout;
        let deadline = tokio::time::Instant::now() + write_timeout;
        let timeout = |operation| DbError::Timeout {
            node: Arc::clone(&node.name),
            operation,
            after: write_timeout,
        };
        let conn = running.conn()?;
        let prepared =
            tokio::time::timeout_at(deadline, prepare(conn, &node.statement_cache_clears, sql))
                .await;
        let statement = match prepared {
            Ok(Ok(statement)) => statement,
            Ok(Err(source)) => {
                // Outside any transaction: the session is as it was.
                running.settle(&source, true);
                return Err(self.write_error(index, source, false, Operation::Statement));
            }
            Err(_) => {
                self.inner.request_reprobe();
                return Err(timeout(Operation::Begin));
            }
        };
        // Polled in this order, so sent in this order. Whatever had not
        // answered by the deadline is `None`.
        let (begin_answer, answer) = {
            let mut begun = std::pin::pin!(conn.simple_query(begin));
            let mut ran = std::pin::pin!(conn.query(&statement, params));
            let (mut begin_answer, mut answer) = (None, None);
            let both = std::future::poll_fn(|cx| {
                if begin_answer.is_none()
                    && let std::task::Poll::Ready(r) = begun.as_mut().poll(cx)
                {
                    begin_answer = Some(r);
                }
                if answer.is_none()
                    && let std::task::Poll::Ready(r) = ran.as_mut().poll(cx)
                {
                    answer = Some(r);
                }
                if begin_answer.is_some() && answer.is_some() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            let _ = tokio::time::timeout_at(deadline, both).await;
            (begin_answer, answer)
        };
        let (Some(begin_answer), Some(answer)) = (begin_answer, answer) else {
            // Dropping `running` cancels what runs and closes the session.
            self.inner.request_reprobe();
            drop(running);
            return Err(timeout(Operation::Statement));
        };
        let begin_rows = match begin_answer {
            Ok(messages) => messages
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .collect(),
            Err(source) => {
                running.discard();
                return Err(self.write_error(index, source, false, Operation::Begin));
            }
        };
        let tx = Transaction {
            db: self.clone(),
            index,
            conn: running.into_object(),
            broken: AtomicBool::new(false),
        };
        let statement = answer.map_err(|source| {
            // The transaction is aborted; commit would say RolledBack.
            tx.broken.store(true, Ordering::Release);
            self.write_error(index, source, false, Operation::Statement)
        });
        Ok(Begun {
            tx,
            begin_rows,
            statement,
        })
    }
}
