//! The `tower::Service` face of [`Db`]: [`Query`] in, [`QueryOutput`] out,
//! so caches and other middleware can sit on top.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::db::Db;
use super::error::DbError;
use super::lsn::{Consistency, ConsistencyToken, Lsn};

/// Whether a [`Query`] writes or reads, and how consistently it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Access {
    /// On the primary; the answer carries the write's token.
    Write,
    /// Routed by the consistency.
    Read(Consistency),
}

impl Access {
    /// The read's consistency (`None` for a write).
    pub fn consistency(self) -> Option<Consistency> {
        match self {
            Self::Read(c) => Some(c),
            Self::Write => None,
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
    /// A write (on the primary, answered with a token) or a read.
    pub access: Access,
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Query")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .field("access", &self.access)
            .finish()
    }
}

impl Query {
    /// A read with the given consistency.
    pub fn read(sql: impl Into<Arc<str>>, consistency: Consistency) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
            access: Access::Read(consistency),
        }
    }

    /// A write on the primary.
    pub fn write(sql: impl Into<Arc<str>>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
            access: Access::Write,
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

/// The future of `Db`'s `Service<Query>`.
///
/// It is a box: the query is one `async` routine across pool checkout,
/// routing, retries and the token read, whose state machine has no name to
/// put here, and the box is one allocation against a network round trip.
pub struct QueryFuture(Pin<Box<dyn Future<Output = Result<QueryOutput, DbError>> + Send>>);

impl fmt::Debug for QueryFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryFuture").finish_non_exhaustive()
    }
}

impl Future for QueryFuture {
    type Output = Result<QueryOutput, DbError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl tower::Service<Query> for Db {
    type Response = QueryOutput;
    type Error = DbError;
    type Future = QueryFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DbError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, q: Query) -> Self::Future {
        let db = self.clone();
        QueryFuture(Box::pin(async move {
            let params: Vec<&(dyn ToSql + Sync)> = q
                .params
                .iter()
                .map(|p| &**p as &(dyn ToSql + Sync))
                .collect();
            match q.access {
                Access::Write => {
                    let w = db.query(&q.sql, &params).await?;
                    Ok(QueryOutput {
                        rows: Arc::new(w.value),
                        served_by: w.served_by,
                        lsn: w.token.lsn(),
                        token: Some(w.token),
                    })
                }
                Access::Read(consistency) => {
                    let r = db.read(consistency, &q.sql, &params).await?;
                    Ok(QueryOutput {
                        rows: Arc::new(r.value),
                        served_by: r.served_by,
                        lsn: r.lsn,
                        token: None,
                    })
                }
            }
        }))
    }
}
