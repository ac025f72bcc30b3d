//! Errors of the PostgreSQL cluster: typed, cloneable (one error can reach
//! several waiters), each saying what to do.

use std::sync::Arc;

/// Which pool timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolTimeout {
    /// Waiting for a free connection (the pool is exhausted). Never counts
    /// against the node: it stays in rotation.
    Wait,
    /// Opening a new connection.
    Create,
    /// Checking a returned connection before reuse.
    Recycle,
}

/// What was running when a [`DbError::Timeout`] or
/// [`DbError::Interrupted`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// A routed read (bounded by the read timeout).
    Read,
    /// The read-your-writes catch-up query on a replica (bounded by the
    /// read-your-writes wait); an error only when reads may not fall back
    /// to the primary.
    CatchUp,
    /// A write outside a transaction (bounded by the write timeout).
    Write,
    /// `BEGIN` of a transaction.
    Begin,
    /// A statement inside a transaction.
    Statement,
    /// `COMMIT`.
    Commit,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::CatchUp => "read-your-writes catch-up query",
            Self::Write => "write",
            Self::Begin => "BEGIN",
            Self::Statement => "statement",
            Self::Commit => "COMMIT",
        })
    }
}

/// An error from [`Db`](super::Db) or [`Cluster`](super::Cluster).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// No node is known to be a writable primary.
    #[error(
        "no primary: tried {tried:?}; check that the primary runs, or promote a replica \
         (the cluster finds the new primary by itself)"
    )]
    NoPrimary {
        /// The nodes tried, with what each said.
        tried: Vec<String>,
    },
    /// A `LISTEN` session ended or could not be opened (the job queue's
    /// wake-ups; its workers poll meanwhile and reconnect).
    #[error("listening on {node}: {reason}")]
    Listen {
        /// The node listened on.
        node: Arc<str>,
        /// What ended the session.
        reason: String,
    },
    /// A pool timed out. Nothing was sent: a write did not commit.
    #[error(
        "connection pool of {node}: {kind:?} timeout; raise the pool size or the timeout, \
         or reduce the load"
    )]
    PoolTimeout {
        /// The node.
        node: Arc<str>,
        /// Which timeout.
        kind: PoolTimeout,
    },
    /// Connecting failed, or the connection broke before a statement was
    /// sent: a write did not commit.
    #[error("cannot connect to {node}: {source}")]
    Connect {
        /// The node.
        node: Arc<str>,
        /// The driver's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// The query failed, and not because of the node: the server rejected
    /// it (a SQLSTATE: syntax, a constraint, a value the server refused...),
    /// or the client could not send or read it as written (no SQLSTATE: a
    /// missing or extra parameter, a parameter of the wrong type, a column
    /// read as the wrong type; see [`DbError::is_client_error`]). Never
    /// retried on another node, and the node stays in rotation. A write
    /// that fails this way did not commit.
    #[error("query on {node} failed: {source}")]
    Query {
        /// The node.
        node: Arc<str>,
        /// The driver's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A write reached a node that is no longer the primary (SQLSTATE
    /// 25006). The cluster rediscovers the primary at once; writes are not
    /// retried automatically, so retry if the write is idempotent.
    #[error("{node} is read-only (no longer the primary); retry once the new primary is found")]
    ReadOnly {
        /// The node.
        node: Arc<str>,
    },
    /// The server did not answer within the operation's bound (stalled,
    /// or the statement is slower than the timeout allows). Waiting for a
    /// pooled connection does not count. After [`Operation::Write`] and
    /// [`Operation::Commit`] the outcome is unknown
    /// ([`DbError::may_have_committed`]); a timed-out statement in a
    /// transaction rolls the transaction back.
    #[error(
        "{node} did not answer the {operation} within {after:?}; raise the timeout if the \
         statement is legitimately that slow"
    )]
    Timeout {
        /// The node.
        node: Arc<str>,
        /// What timed out.
        operation: Operation,
        /// The configured bound that passed.
        after: std::time::Duration,
    },
    /// The connection broke while a write or a `COMMIT` was in flight: it
    /// may or may not have committed ([`DbError::may_have_committed`]).
    /// Check before retrying a write that is not idempotent.
    #[error(
        "the connection to {node} broke during the {operation}; it may have committed: {source}"
    )]
    Interrupted {
        /// The node.
        node: Arc<str>,
        /// What was in flight.
        operation: Operation,
        /// The driver's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// [`Transaction::commit`](super::Transaction::commit) did not commit:
    /// a statement of the transaction had failed (the server would have
    /// answered `COMMIT` with `ROLLBACK`), `COMMIT` itself failed (a
    /// deferred constraint, a serialization failure: see
    /// [`DbError::code`]), or the session was lost or timed out before
    /// `COMMIT` was sent. Nothing of the transaction was written.
    #[error("the transaction on {node} was rolled back, not committed: {reason}")]
    RolledBack {
        /// The node.
        node: Arc<str>,
        /// Why.
        reason: &'static str,
        /// The server's error, when it gave one.
        #[source]
        source: Option<Arc<tokio_postgres::Error>>,
    },
    /// [`Transaction::commit`](super::Transaction::commit) found no
    /// transaction to commit: a statement sent through the transaction
    /// (`COMMIT`, `END`, `ROLLBACK`, `PREPARE TRANSACTION`) had ended it.
    /// Its writes may have been committed, rolled back or prepared:
    /// [`DbError::may_have_committed`] is true. End transactions with
    /// `commit` or `rollback` only.
    #[error(
        "the transaction on {node} had been ended by one of its own statements (COMMIT, \
         ROLLBACK, PREPARE TRANSACTION...); its writes may or may not be committed"
    )]
    EndedEarly {
        /// The node.
        node: Arc<str>,
        /// The server's error for the commit's guard (25P01).
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A query expected one row (or at most one) and got another count.
    /// From [`Db::query_one`](super::Db::query_one) the write had already
    /// committed: `written` holds its token, and
    /// [`DbError::may_have_committed`] is true.
    #[error("expected one row from {node}, got {rows}")]
    RowCount {
        /// The node.
        node: Arc<str>,
        /// How many rows came back.
        rows: usize,
        /// The token of the write that returned them, which committed;
        /// `None` for a read or a statement inside a transaction.
        written: Option<super::ConsistencyToken>,
    },
    /// A statement that would end or change the pooled session for
    /// whoever uses it next was refused before anything was sent:
    /// transaction control outside [`Db::transaction`](super::Db::transaction)
    /// (`BEGIN`, `COMMIT`, `ROLLBACK`, ...), or inside one where it would
    /// end it (use [`commit`](super::Transaction::commit) and
    /// [`rollback`](super::Transaction::rollback); savepoints are fine);
    /// session settings (`SET` but `SET LOCAL`, `RESET`, `DISCARD`,
    /// `DEALLOCATE`, `PREPARE`, `LISTEN`); `COPY ... STDIN`/`STDOUT`, which
    /// the query protocol used here cannot carry. A client error
    /// ([`DbError::is_client_error`]); no node is blamed.
    #[error("`{keyword}` is not allowed here: {hint}")]
    Refused {
        /// The statement's keyword, as the refusal matched it.
        keyword: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// The cluster was shut down.
    #[error("the cluster was shut down")]
    Shutdown,
}

impl DbError {
    /// The SQLSTATE of a server error, if any.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Self::Query { source, .. }
            | Self::Connect { source, .. }
            | Self::Interrupted { source, .. }
            | Self::EndedEarly { source, .. } => source.code(),
            Self::RolledBack {
                source: Some(source),
                ..
            } => source.code(),
            _ => None,
        }
    }

    /// True for errors that say nothing about the query itself (a node
    /// unreachable, stalled or lost, a pool timeout): a read may be retried
    /// later or elsewhere. A write may be retried only if it did not
    /// commit: see [`may_have_committed`](Self::may_have_committed).
    pub fn is_connection_error(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::PoolTimeout { .. }
            | Self::Timeout { .. }
            | Self::Interrupted { .. } => true,
            Self::Query { source, .. } => fault(source) == Fault::Connection,
            _ => false,
        }
    }

    /// True when the call itself was wrong: a missing or extra parameter,
    /// a parameter of the wrong type (both raised before anything was
    /// sent), a column read as the wrong type. Fix the call; retrying
    /// cannot help.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Refused { .. })
            || matches!(self, Self::Query { source, .. } if fault(source) == Fault::Client)
    }

    /// True when a write or `COMMIT` was sent but its answer never came (a
    /// timeout or a broken connection): it may have committed or not; and
    /// for a write that committed but returned the wrong number of rows
    /// ([`DbError::RowCount`] with its token). Any other error from a write
    /// or a commit means it did not commit.
    pub fn may_have_committed(&self) -> bool {
        matches!(
            self,
            Self::Timeout {
                operation: Operation::Write | Operation::Commit,
                ..
            } | Self::Interrupted { .. }
                | Self::EndedEarly { .. }
                | Self::RowCount {
                    written: Some(_),
                    ..
                }
        )
    }
}

/// Whose fault a driver error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The session or the server failed: closed connections, I/O errors,
    /// SQLSTATE class 08 (connection exception), the server shutting down
    /// or starting up (57P01, 57P02, 57P03), unreadable protocol.
    Connection,
    /// The call was wrong: raised by the driver with no SQLSTATE, before
    /// anything was sent (parameters) or after a complete answer (columns).
    Client,
    /// The server answered with an error about the statement.
    Server,
}

/// A statement error that says something about the node rather than the
/// statement: SQLSTATE classes 40 (serialization failures, recovery
/// conflicts on a replica), 53 (insufficient resources), 55 (object not in
/// prerequisite state), 57 other than our own cancel (57014) and the
/// shutdown codes that [`fault`] already counts as connection failures, 58
/// (system error) and XX (internal error). Data, syntax and permission
/// errors (the caller's statement) are not: a client's bad query must not
/// steer the balancer.
pub(crate) fn node_trouble(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        let code = code.code();
        let class = code.get(..2).unwrap_or("");
        matches!(class, "40" | "53" | "55" | "58" | "XX") || (class == "57" && code != "57014")
    })
}

/// Classifies a driver error.
pub(crate) fn fault(e: &tokio_postgres::Error) -> Fault {
    if e.is_closed() {
        return Fault::Connection;
    }
    if let Some(code) = e.code() {
        let code = code.code();
        return if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03") {
            Fault::Connection
        } else {
            Fault::Server
        };
    }
    if is_client_side(e) {
        Fault::Client
    } else {
        Fault::Connection
    }
}

/// tokio-postgres does not expose its error kinds; the client-side ones
/// (`ToSql`, `FromSql`, `Column`, `ColumnCount`, `Parameters`, `RowCount`,
/// and `Encode`, which alone has an I/O source) carry no I/O source and name themselves in their message. Anything else
/// without a SQLSTATE counts as a connection failure, the cautious side for
/// an error nobody recognises. (`tests/pg` checks these messages against
/// the driver in use.)
fn is_client_side(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    let message = e.to_string();
    // `Kind::Encode`: the message could not be built (a NUL byte in the
    // SQL text, say); it carries an I/O source, but nothing was sent.
    if message.starts_with("error encoding message to server") {
        return true;
    }
    if e.source().is_some_and(|s| s.is::<std::io::Error>()) {
        return false;
    }
    message.starts_with("error serializing parameter")
        || message.starts_with("error deserializing column")
        || message.starts_with("invalid column")
        || message.starts_with("query returned an unexpected number of")
        || (message.starts_with("expected ") && message.contains(" parameters but got "))
}
