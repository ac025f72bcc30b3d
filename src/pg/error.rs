//! Errors of the PostgreSQL cluster: typed, cloneable (one error can reach
//! several waiters), each saying what to do.

use std::sync::Arc;

/// Which pool timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolTimeout {
    /// Waiting for a free connection (the pool is exhausted).
    Wait,
    /// Opening a new connection.
    Create,
    /// Checking a returned connection before reuse.
    Recycle,
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
    /// A pool timed out.
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
    /// Connecting failed.
    #[error("cannot connect to {node}: {source}")]
    Connect {
        /// The node.
        node: Arc<str>,
        /// The driver's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// The server rejected or failed the query.
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
    /// A read did not answer in time (the server may be stalled).
    #[error("{node} did not answer within {after:?}")]
    Timeout {
        /// The node.
        node: Arc<str>,
        /// The read timeout.
        after: std::time::Duration,
    },
    /// A query expected one row (or at most one) and got another count.
    #[error("expected one row from {node}, got {rows}")]
    RowCount {
        /// The node.
        node: Arc<str>,
        /// How many rows came back.
        rows: usize,
    },
    /// The cluster was shut down.
    #[error("the cluster was shut down")]
    Shutdown,
}

impl DbError {
    /// The SQLSTATE of a server error, if any.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Self::Query { source, .. } | Self::Connect { source, .. } => source.code(),
            _ => None,
        }
    }

    /// True for errors that say nothing about the query itself (connection
    /// lost, pool timeouts): a read may be retried elsewhere.
    pub fn is_connection_error(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::PoolTimeout { .. } | Self::Timeout { .. } => true,
            Self::Query { source, .. } => is_connection_failure(source),
            _ => false,
        }
    }
}

/// Errors that say the session, not the query, failed: closed connections,
/// I/O errors, SQLSTATE class 08 (connection exception) and the server
/// shutting down or starting up (57P01, 57P02, 57P03).
pub(crate) fn is_connection_failure(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
    }
}
