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
use crate::cache::Tag;

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
    /// The name a [`DbCache`](super::DbCache) stores this read under, with
    /// its SQL text: it must name the parameters (`users:7` for `id = 7`);
    /// `None`: not cached.
    pub cache_key: Option<Arc<str>>,
    /// The tags of the data: a cached read is stored with them, and a
    /// write through a [`DbCache`](super::DbCache) invalidates them at its
    /// commit position.
    pub tags: Vec<Tag>,
    /// Caches this read by the tables it reads, in a
    /// [`DbCache`](super::DbCache) with feature `change-feed` (see
    /// `Query::cache_by_tables`); ignored otherwise.
    pub cache_by_tables: bool,
    /// Set by `DbCache` on the fill of a hot key.
    pub(crate) route_hint: super::route::RouteHint,
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Query")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .field("access", &self.access)
            .field("cache_key", &self.cache_key)
            .field("tags", &self.tags)
            .field("cache_by_tables", &self.cache_by_tables)
            .finish_non_exhaustive()
    }
}

impl Query {
    /// A read with the given consistency.
    pub fn read(sql: impl Into<Arc<str>>, consistency: Consistency) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
            access: Access::Read(consistency),
            cache_key: None,
            tags: Vec::new(),
            cache_by_tables: false,
            route_hint: super::route::RouteHint::None,
        }
    }

    /// A write on the primary.
    pub fn write(sql: impl Into<Arc<str>>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
            access: Access::Write,
            cache_key: None,
            tags: Vec::new(),
            cache_by_tables: false,
            route_hint: super::route::RouteHint::None,
        }
    }

    /// Caches this read under `key` in a [`DbCache`](super::DbCache) (the
    /// key must name the query and its parameters; on a write it does
    /// nothing).
    #[must_use]
    pub fn cache_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.cache_key = Some(key.into());
        self
    }

    /// Caches this read in a [`DbCache`](super::DbCache) keyed by its
    /// statement and parameters and tagged with the tables it reads, so
    /// the change feed's invalidations reach it: `{table}:{key}` and
    /// `{table}:*` for a lookup of one row by its key, `{table}` for each
    /// table otherwise. A statement that cannot be attributed to base
    /// tables (a view, a function that is not an immutable builtin, a
    /// construct the analysis does not know) is not cached. Only `Any` and
    /// `ReadYourWrites` reads are cached; a [`cache_key`](Self::cache_key)
    /// set on the query wins. See [`ReadCaching`](super::ReadCaching) to
    /// cache every read this way.
    ///
    /// ```
    /// use tower_scale::pg::{Consistency, Query};
    /// let read = Query::read("SELECT name FROM users WHERE id = $1", Consistency::Any)
    ///     .bind(7i64)
    ///     .cache_by_tables();
    /// assert!(read.cache_by_tables);
    /// ```
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
    #[must_use]
    pub fn cache_by_tables(mut self) -> Self {
        self.cache_by_tables = true;
        self
    }

    /// Adds a tag: a cached read is stored with it, a write invalidates it.
    #[must_use]
    pub fn tag(mut self, tag: impl Into<Tag>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// The common case, one row by its key: caches a read under
    /// `"{table}:{id}"` and tags it the same (and `"{table}:*"`, which a
    /// change feed invalidates on `TRUNCATE`); a write invalidates
    /// `"{table}:{id}"`. `id` is written with `Display`, `,` and `\`
    /// escaped with `\`: the change feed's spelling of a one-column key
    /// when `Display` writes what PostgreSQL's text output does (integers,
    /// text; not `bool`, which PostgreSQL writes `t`/`f`).
    ///
    /// ```
    /// use tower_scale::pg::{Consistency, Query};
    /// let read = Query::read("SELECT name FROM users WHERE id = $1", Consistency::Any)
    ///     .bind(7i64)
    ///     .for_key("users", 7);
    /// assert_eq!(read.cache_key.as_deref(), Some("users:7"));
    /// let write = Query::write("UPDATE users SET name = $1 WHERE id = $2")
    ///     .bind("bob")
    ///     .bind(7i64)
    ///     .for_key("users", 7);
    /// assert_eq!(write.tags[0].as_str(), "users:7");
    /// ```
    #[must_use]
    pub fn for_key(self, table: &str, id: impl fmt::Display) -> Self {
        // Spelled as the change feed spells a one-column key: `,` and `\`
        // escaped with `\` (`pg::feed::tags`).
        let mut key = String::new();
        for c in id.to_string().chars() {
            if c == ',' || c == '\\' {
                key.push('\\');
            }
            key.push(c);
        }
        let name = format!("{table}:{key}");
        let query = self.tag(name.as_str());
        match query.access {
            // Also `{table}:*`: what a change feed invalidates when every
            // row of the table may have changed (`TRUNCATE`).
            Access::Read(_) => query.tag(format!("{table}:*")).cache_key(name),
            _ => query,
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
    /// The query's tags.
    pub tags: Arc<[Tag]>,
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

impl QueryFuture {
    pub(crate) fn new(
        fut: impl Future<Output = Result<QueryOutput, DbError>> + Send + 'static,
    ) -> Self {
        Self(Box::pin(fut))
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
        QueryFuture::new(async move {
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
                        tags: q.tags.into(),
                    })
                }
                Access::Read(consistency) => {
                    let r = db
                        .read_hinted(consistency, q.route_hint, &q.sql, &params)
                        .await?;
                    Ok(QueryOutput {
                        rows: Arc::new(r.value),
                        served_by: r.served_by,
                        lsn: r.lsn,
                        token: None,
                        tags: q.tags.into(),
                    })
                }
            }
        })
    }
}
