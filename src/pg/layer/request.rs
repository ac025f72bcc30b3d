//! What handlers use: [`RequestDb`], the per-request view of the database,
//! and the [`Primary`] / [`Replica`] extractors.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response as AxumResponse};
use http::StatusCode;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::db_layer::{DbLayer, Route};
use crate::cache::Store;
use crate::pg::{
    Access, Consistency, ConsistencyToken, Db, DbCache, DbError, Lsn, Query, QueryKey, QueryOutput,
    Read, Written,
};

/// The per-request database view [`DbLayer`](super::DbLayer) puts in the request: reads
/// go where the route and the client's token say, writes go to the
/// primary and their tokens reach the response.
///
/// An axum extractor (a request without `DbLayer` gets a 500,
/// [`MissingDbLayer`]); [`Primary`] and [`Replica`] pin the choice.
///
/// ```no_run
/// use axum::{Json, extract::Path, http::StatusCode};
/// use tower_scale::pg::{Primary, RequestDb};
///
/// // Reads where the route says (replicas for GET), seeing the client's
/// // own writes when it sent its token.
/// async fn user(db: RequestDb, Path(id): Path<i64>) -> Result<String, StatusCode> {
///     let row = db
///         .read_opt("SELECT name FROM users WHERE id = $1", &[&id])
///         .await
///         .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
///     row.value.map(|r| r.get(0)).ok_or(StatusCode::NOT_FOUND)
/// }
///
/// // Always the primary (`Strong`), e.g. a balance before a payment.
/// async fn balance(Primary(db): Primary, Path(id): Path<i64>) -> Result<String, StatusCode> {
///     let row = db
///         .read_one("SELECT cents FROM accounts WHERE id = $1", &[&id])
///         .await
///         .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
///     Ok(row.value.get::<_, i64>(0).to_string())
/// }
///
/// // A write: its token goes back to the client with the response.
/// async fn rename(db: RequestDb, Path(id): Path<i64>, Json(name): Json<String>) -> StatusCode {
///     match db.execute("UPDATE users SET name = $1 WHERE id = $2", &[&name, &id]).await {
///         Ok(w) if w.value == 1 => StatusCode::NO_CONTENT,
///         Ok(_) => StatusCode::NOT_FOUND,
///         Err(e) if e.may_have_committed() => StatusCode::ACCEPTED,
///         Err(_) => StatusCode::SERVICE_UNAVAILABLE,
///     }
/// }
/// # let _ = (user, balance, rename);
/// ```
#[derive(Clone)]
pub struct RequestDb {
    pub(super) state: Arc<RequestState>,
    pub(super) route: Route,
}

/// What a request's [`RequestDb`] (and its clones) share with the
/// response future: one allocation per request.
pub(super) struct RequestState {
    pub(super) layer: DbLayer,
    pub(super) token: Option<ConsistencyToken>,
    written: Mutex<Option<ConsistencyToken>>,
    /// Set once `written` holds a token: a request that wrote nothing (a
    /// read, a cache hit) never takes the lock.
    wrote: AtomicBool,
    /// The data version of the response so far: the lowest position among
    /// the reads and writes made ([`NO_DATA`] until one is).
    data: AtomicU64,
}

/// `data` before any read or write: `Lsn::MAX` is never recorded.
const NO_DATA: u64 = u64::MAX;

impl RequestState {
    /// The token of the request's writes, if it wrote.
    pub(super) fn written(&self) -> Option<ConsistencyToken> {
        if !self.wrote.load(Ordering::Acquire) {
            return None;
        }
        *crate::sync::lock(&self.written)
    }

    /// The lowest position among the request's reads and writes.
    pub(super) fn data_version(&self) -> Option<u64> {
        Some(self.data.load(Ordering::Acquire)).filter(|&v| v != NO_DATA)
    }
}

impl RequestDb {
    /// The view of a request that presented `token`, routed as `route`.
    pub(super) fn new(layer: DbLayer, route: Route, token: Option<ConsistencyToken>) -> Self {
        Self {
            state: Arc::new(RequestState {
                layer,
                token,
                written: Mutex::new(None),
                wrote: AtomicBool::new(false),
                data: AtomicU64::new(NO_DATA),
            }),
            route,
        }
    }
}

impl fmt::Debug for RequestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestDb")
            .field("route", &self.route)
            .field("token", &self.state.token)
            .finish()
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl RequestDb {
    /// The consistency reads of this request get: `Strong` on the primary
    /// route; otherwise read-your-writes with the newest of the client's
    /// token and this request's own writes, or `Any`.
    pub fn consistency(&self) -> Consistency {
        if self.route == Route::Primary {
            return Consistency::Strong;
        }
        match self.min_token() {
            Some(t) => Consistency::ReadYourWrites(t),
            None => Consistency::Any,
        }
    }

    /// The newest token this request must see: the client's or its own writes'.
    pub fn min_token(&self) -> Option<ConsistencyToken> {
        let own = self.state.written();
        match (self.state.token, own) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The client's token, as presented.
    pub fn client_token(&self) -> Option<ConsistencyToken> {
        self.state.token
    }

    /// The underlying handle.
    pub fn db(&self) -> &Db {
        self.state.layer.db()
    }

    /// Records a write's token so the response carries it (and, when its
    /// position is known, counts it in the response's
    /// [`DataVersion`](crate::cache::DataVersion), like
    /// [`record_read`](Self::record_read)).
    pub fn record_write(&self, token: ConsistencyToken) {
        {
            let mut w = crate::sync::lock(&self.state.written);
            *w = Some(w.map_or(token, |t| t.max(token)));
            self.state.wrote.store(true, Ordering::Release);
        }
        if let Some(lsn) = token.known_lsn() {
            self.record_read(lsn);
        }
    }

    /// Records that the response is built from data read at `lsn` (a
    /// lower bound, like [`Read::lsn`]). The read methods of this type do
    /// it themselves; call it for data read another way (through the
    /// underlying [`Db`], or from a cache whose entry is stamped with the
    /// LSN it reflects), or the response's data version will claim more
    /// than that data reflects.
    ///
    /// The response then carries [`DataVersion`](crate::cache::DataVersion)
    /// in its extensions: the **lowest** position recorded, the one every
    /// part of the response reflects at least (a read from a lagging
    /// replica next to a newer read or write pulls it down). An HTTP cache
    /// outside [`DbLayer`](super::DbLayer) stamps what it stores with it.
    pub fn record_read(&self, lsn: Lsn) {
        if lsn == Lsn::MAX {
            // Not a position (the unknown token's): nothing is known.
            return;
        }
        self.state.data.fetch_min(lsn.0, Ordering::AcqRel);
    }

    /// The data version recorded so far (see [`record_read`](Self::record_read)).
    pub fn data_version(&self) -> Option<crate::cache::DataVersion> {
        self.state.data_version().map(crate::cache::DataVersion)
    }

    fn recorded<T>(&self, read: Result<Read<T>, DbError>) -> Result<Read<T>, DbError> {
        if let Ok(r) = &read {
            self.record_read(r.lsn);
        }
        read
    }

    /// A read routed for this request.
    pub async fn read_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Option<Row>>, DbError> {
        self.recorded(self.db().read_opt(self.consistency(), sql, params).await)
    }

    /// A read of exactly one row, routed for this request.
    pub async fn read_one(&self, sql: &str, params: Params<'_>) -> Result<Read<Row>, DbError> {
        self.recorded(self.db().read_one(self.consistency(), sql, params).await)
    }

    /// A read of many rows, routed for this request.
    pub async fn read_query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        self.recorded(self.db().read_query(self.consistency(), sql, params).await)
    }

    /// A write on the primary; its token reaches the response.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<Written<u64>, DbError> {
        let w = self
            .db()
            .execute(sql, params)
            .await
            .inspect_err(|e| self.record_failed_write(e))?;
        self.record_write(w.token);
        Ok(w)
    }

    /// Runs `query` through `cache` for this request, recording what it
    /// read or wrote as this type's own methods do: a read goes with this
    /// request's [`consistency`](Self::consistency) (whatever the query
    /// said) and its data version is recorded (a hit's stamp included); a
    /// write's token is recorded for the response (the unknown token when
    /// it may have committed). Calling `cache.query` directly from a
    /// handler skips both, and the client silently loses read-your-writes.
    ///
    /// ```no_run
    /// use tower_scale::pg::{DbCache, DbError, Query, RequestDb};
    ///
    /// async fn name(db: RequestDb, users: DbCache, id: i64) -> Result<Option<String>, DbError> {
    ///     let query = Query::read("SELECT name FROM users WHERE id = $1", db.consistency())
    ///         .bind(id)
    ///         .for_key("users", id);
    ///     let out = db.cached(&users, query).await?;
    ///     Ok(out.rows.first().map(|row| row.get(0)))
    /// }
    /// ```
    pub async fn cached<St>(
        &self,
        cache: &DbCache<St>,
        mut query: Query,
    ) -> Result<QueryOutput, DbError>
    where
        St: Store<Key = QueryKey, Response = QueryOutput, Error = DbError>,
    {
        let write = query.access == Access::Write;
        if !write {
            query.access = Access::Read(self.consistency());
        }
        match cache.query(query).await {
            Ok(out) => {
                if write {
                    self.record_write(out.token.unwrap_or(ConsistencyToken::unknown()));
                } else {
                    self.record_read(out.lsn);
                }
                Ok(out)
            }
            Err(e) => {
                if write {
                    self.record_failed_write(&e);
                }
                Err(e)
            }
        }
    }

    /// A write returning rows; its token reaches the response.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Written<Vec<Row>>, DbError> {
        let w = self
            .db()
            .query(sql, params)
            .await
            .inspect_err(|e| self.record_failed_write(e))?;
        self.record_write(w.token);
        Ok(w)
    }

    /// A write returning one row; its token reaches the response.
    /// A write that committed but returned another row count still
    /// records its token (see [`DbError::RowCount`]).
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Written<Row>, DbError> {
        match self.db().query_one(sql, params).await {
            Ok(w) => {
                self.record_write(w.token);
                Ok(w)
            }
            Err(e) => {
                self.record_failed_write(&e);
                Err(e)
            }
        }
    }

    /// A failed write that committed, or may have, still reaches the
    /// response: its token, or the unknown one (reads go to the primary).
    fn record_failed_write(&self, e: &DbError) {
        if let DbError::RowCount {
            written: Some(token),
            ..
        } = e
        {
            self.record_write(*token);
        } else if e.may_have_committed() {
            self.record_write(ConsistencyToken::unknown());
        }
    }
}

/// Rejection of the extractors when no [`DbLayer`](super::DbLayer) is in front.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MissingDbLayer;

impl IntoResponse for MissingDbLayer {
    fn into_response(self) -> AxumResponse {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "DbLayer is not installed in front of this route",
        )
            .into_response()
    }
}

impl<St: Send + Sync> FromRequestParts<St> for RequestDb {
    type Rejection = MissingDbLayer;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &St,
    ) -> Result<Self, MissingDbLayer> {
        parts
            .extensions
            .get::<RequestDb>()
            .cloned()
            .ok_or(MissingDbLayer)
    }
}

/// An extractor for the primary, whatever the route: `Strong` reads.
#[derive(Debug, Clone)]
pub struct Primary(pub RequestDb);

/// An extractor for replicas, whatever the method: reads honour the
/// client's token (read-your-writes) or go to any replica.
#[derive(Debug, Clone)]
pub struct Replica(pub RequestDb);

impl<St: Send + Sync> FromRequestParts<St> for Primary {
    type Rejection = MissingDbLayer;
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &St,
    ) -> Result<Self, MissingDbLayer> {
        let mut db = RequestDb::from_request_parts(parts, state).await?;
        db.route = Route::Primary;
        Ok(Self(db))
    }
}

impl<St: Send + Sync> FromRequestParts<St> for Replica {
    type Rejection = MissingDbLayer;
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &St,
    ) -> Result<Self, MissingDbLayer> {
        let mut db = RequestDb::from_request_parts(parts, state).await?;
        db.route = Route::Replicas;
        Ok(Self(db))
    }
}
