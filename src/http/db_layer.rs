//! Per-request database routing for HTTP services, with consistency tokens
//! that travel with the client (features `http` and `postgres`).
//!
//! [`DbLayer`] puts a [`RequestDb`] into every request's extensions:
//! safe methods (GET, HEAD, OPTIONS) read from replicas, unsafe ones go to
//! the primary, and a per-route override can change that. The client's
//! token (cookie `tower_scale_token`, its value plain or in double quotes
//! as RFC 6265 allows, or header `x-consistency-token`; when both are valid
//! the newer wins) turns replica reads into read-your-writes reads; a write
//! whose commit position could not be learned hands out a token that sends
//! the client's reads to the primary until it expires. When a request wrote, its response carries the new token in both
//! (`HttpOnly`, `SameSite=Lax`, `Path=/`, `Max-Age` = the token lifetime,
//! `Secure` as an option), so any instance can serve the client's next
//! request. Forged, malformed, oversized, expired or far-future tokens are
//! ignored: the request gets the default consistency.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response as AxumResponse};
use http::header::{COOKIE, HeaderName, HeaderValue, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tower::{Layer, Service};

use crate::pg::{Consistency, ConsistencyToken, Db, DbError, Read, TokenCodec, Written};

/// Where a route's queries go by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// By method: safe methods read from replicas, unsafe ones the primary.
    ByMethod,
    /// Everything on the primary.
    Primary,
    /// Reads from replicas, whatever the method.
    Replicas,
}

#[derive(Debug)]
struct Settings {
    cookie: String,
    header: HeaderName,
    secure: bool,
    overrides: Vec<(String, Route)>,
    /// gRPC mode: the method paths that read; every other one writes.
    grpc_reads: Option<std::collections::HashSet<String>>,
}

/// Configures and builds a [`DbLayer`].
#[must_use]
#[derive(Debug)]
pub struct DbLayerBuilder {
    db: Db,
    codec: TokenCodec,
    settings: Settings,
}

impl DbLayerBuilder {
    /// The cookie name (default `tower_scale_token`).
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.settings.cookie = name.into();
        self
    }

    /// The header name (default `x-consistency-token`).
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.settings.header = name;
        self
    }

    /// Marks the cookie `Secure` (HTTPS only).
    pub fn secure_cookie(mut self, yes: bool) -> Self {
        self.settings.secure = yes;
        self
    }

    /// Routes requests whose path starts with `prefix` as `route`
    /// (the longest matching prefix wins).
    pub fn route(mut self, prefix: impl Into<String>, route: Route) -> Self {
        self.settings.overrides.push((prefix.into(), route));
        self.settings
            .overrides
            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        self
    }

    /// gRPC mode, for tonic servers: the token travels in the metadata key
    /// (`x-consistency-token` unless [`header_name`](Self::header_name)
    /// says otherwise), no cookie is set, and requests are classified by
    /// method path: the ones listed read from replicas, every other (and
    /// unknown) method goes to the primary.
    pub fn grpc<I, P>(mut self, read_methods: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.settings.grpc_reads = Some(read_methods.into_iter().map(Into::into).collect());
        self
    }

    /// Builds the layer.
    pub fn build(self) -> DbLayer {
        DbLayer {
            db: self.db,
            codec: Arc::new(self.codec),
            settings: Arc::new(self.settings),
        }
    }
}

/// Puts a per-request [`RequestDb`] into the request extensions and the
/// consistency token into responses; see the [module docs](self).
#[derive(Clone)]
pub struct DbLayer {
    db: Db,
    codec: Arc<TokenCodec>,
    settings: Arc<Settings>,
}

impl fmt::Debug for DbLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbLayer")
            .field("codec", &self.codec)
            .field("settings", &self.settings)
            .finish()
    }
}

impl DbLayer {
    /// A layer routing through `db`, with tokens from `codec`.
    pub fn builder(db: Db, codec: TokenCodec) -> DbLayerBuilder {
        DbLayerBuilder {
            db,
            codec,
            settings: Settings {
                cookie: "tower_scale_token".into(),
                header: HeaderName::from_static("x-consistency-token"),
                secure: false,
                overrides: Vec::new(),
                grpc_reads: None,
            },
        }
    }
}

impl<S> Layer<S> for DbLayer {
    type Service = DbRouting<S>;
    fn layer(&self, inner: S) -> DbRouting<S> {
        DbRouting {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`DbLayer`] makes.
#[derive(Clone)]
pub struct DbRouting<S> {
    inner: S,
    layer: DbLayer,
}

impl<S> fmt::Debug for DbRouting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbRouting")
            .field("layer", &self.layer)
            .finish()
    }
}

/// Cookie values of `name` in the request (all `Cookie` header lines). A
/// value may be sent in double quotes (RFC 6265 `cookie-value`); the quotes
/// are not part of it.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        // Pair by pair on the raw bytes: one cookie with a non-ASCII value
        // must not hide the others on the line.
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            if !pair.is_ascii() {
                return None;
            }
            let pair = std::str::from_utf8(pair).ok()?;
            let (k, v) = pair.split_once('=')?;
            (k.trim() == name).then_some(unquote(v.trim()))
        })
}

/// `"value"` → `value`; anything else as it is.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

impl DbLayer {
    /// The newest valid token a request presents.
    pub fn token_of(&self, headers: &HeaderMap) -> Option<ConsistencyToken> {
        let from_header = headers
            .get_all(&self.settings.header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| self.codec.decode(v));
        let from_cookie =
            cookies(headers, &self.settings.cookie).filter_map(|v| self.codec.decode(v));
        from_header.chain(from_cookie).max()
    }

    fn route_of(&self, path: &str, method: &Method) -> Route {
        if let Some(reads) = &self.settings.grpc_reads {
            return if reads.contains(path) {
                Route::Replicas
            } else {
                Route::Primary
            };
        }
        let route = self
            .settings
            .overrides
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(Route::ByMethod, |(_, r)| *r);
        match route {
            Route::ByMethod if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) => {
                Route::Replicas
            }
            Route::ByMethod => Route::Primary,
            other => other,
        }
    }

    fn set_token(&self, headers: &mut HeaderMap, token: ConsistencyToken) {
        let encoded = self.codec.encode(token);
        if self.settings.grpc_reads.is_some() {
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                headers.insert(self.settings.header.clone(), v);
            }
            return;
        }
        let max_age = self.codec.lifetime().as_secs();
        let cookie = format!(
            "{}={encoded}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}{}",
            self.settings.cookie,
            if self.settings.secure { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            headers.append(SET_COOKIE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            headers.insert(self.settings.header.clone(), v);
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DbRouting<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let token = self.layer.token_of(req.headers());
        let route = self.layer.route_of(req.uri().path(), req.method());
        let written = Arc::new(Mutex::new(None));
        let request_db = RequestDb {
            db: self.layer.db.clone(),
            route,
            token,
            written: Arc::clone(&written),
        };
        req.extensions_mut().insert(request_db);
        let fut = self.inner.call(req);
        let layer = self.layer.clone();
        Box::pin(async move {
            let mut res = fut.await?;
            let wrote = *written.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(token) = wrote {
                layer.set_token(res.headers_mut(), token);
            }
            Ok(res)
        })
    }
}

/// The per-request database view [`DbLayer`] puts in the request: reads
/// go where the route and the client's token say, writes go to the
/// primary and their tokens reach the response.
#[derive(Clone)]
pub struct RequestDb {
    db: Db,
    route: Route,
    token: Option<ConsistencyToken>,
    written: Arc<Mutex<Option<ConsistencyToken>>>,
}

impl fmt::Debug for RequestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestDb")
            .field("route", &self.route)
            .field("token", &self.token)
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
        let own = *self.written.lock().unwrap_or_else(|p| p.into_inner());
        match (self.token, own) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The client's token, as presented.
    pub fn client_token(&self) -> Option<ConsistencyToken> {
        self.token
    }

    /// The underlying handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Records a write's token so the response carries it.
    pub fn record_write(&self, token: ConsistencyToken) {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        *w = Some(w.map_or(token, |t| t.max(token)));
    }

    /// A read routed for this request.
    pub async fn read_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Option<Row>>, DbError> {
        self.db.read_opt(self.consistency(), sql, params).await
    }

    /// A read of exactly one row, routed for this request.
    pub async fn read_one(&self, sql: &str, params: Params<'_>) -> Result<Read<Row>, DbError> {
        self.db.read_one(self.consistency(), sql, params).await
    }

    /// A read of many rows, routed for this request.
    pub async fn read_query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        self.db.read_query(self.consistency(), sql, params).await
    }

    /// A write on the primary; its token reaches the response.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<Written<u64>, DbError> {
        let w = self
            .db
            .execute(sql, params)
            .await
            .inspect_err(|e| self.record_failed_write(e))?;
        self.record_write(w.token);
        Ok(w)
    }

    /// A write returning rows; its token reaches the response.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Written<Vec<Row>>, DbError> {
        let w = self
            .db
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
        match self.db.query_one(sql, params).await {
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

/// Rejection of the extractors when no [`DbLayer`] is in front.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(cookie_lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in cookie_lines {
            headers.append(COOKIE, HeaderValue::from_str(line).unwrap());
        }
        headers
    }

    #[test]
    fn cookie_values_plain_and_quoted() {
        let name = "tower_scale_token";
        let h = request(&[
            "a=1; tower_scale_token=plain",
            r#"tower_scale_token="quoted"; b=2"#,
            r#"tower_scale_token = "spaced" "#,
        ]);
        let values: Vec<&str> = cookies(&h, name).collect();
        assert_eq!(values, ["plain", "quoted", "spaced"]);
        // Unbalanced or lone quotes are left alone (and then fail to decode).
        let h = request(&[r#"tower_scale_token="open"#, r#"tower_scale_token=""#]);
        let values: Vec<&str> = cookies(&h, name).collect();
        assert_eq!(values, [r#""open"#, r#"""#]);
        // Only the cookie of that name; an empty quoted value is empty.
        let h = request(&[r#"other="x"; tower_scale_token="""#]);
        let values: Vec<&str> = cookies(&h, name).collect();
        assert_eq!(values, [""]);
    }
}
