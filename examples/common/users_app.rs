//! The `axum_users` service itself: state, handlers and routers, shared by
//! `examples/axum_users.rs` (which serves it) and `examples/load.rs` (which
//! runs it in-process under load). Both include it with `#[path]` next to
//! `common/users.rs`, which it reaches as `super::users`.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::users::{self, User, UserRead, WelcomeJob};
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_scale::cache::Invalidator;
use tower_scale::http::{CacheHit, HttpCacheLayer};
use tower_scale::pg::DbError;
use tower_scale::pg::layer::MissingDbLayer;
use tower_scale::pg::{ConsistencyToken, DbLayer, RequestDb};
use tower_scale::queue::{Job, NewJob, QueueError, Worker};

#[derive(Serialize)]
struct UserJson<'a> {
    id: i64,
    name: &'a str,
    welcomed: bool,
}

#[derive(Deserialize)]
pub(crate) struct NameJson {
    name: String,
}

/// Axum clones the state for every request: one reference count.
type AppState = Arc<App>;

struct App {
    users: users::BackendUserCache,
    invalidate: Invalidate,
    /// With `--http-cache`, the HTTP cache is the cache: reads go past
    /// the users cache.
    http_cache: bool,
    welcome: tower_scale::queue::Queue,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// `x-served-by` values of the cluster's nodes, built once.
    served_by: ServedBy,
}

/// What a write to a user invalidates: the users cache and, with
/// `--http-cache`, the HTTP cache (by tag). The handlers and the welcome
/// worker write through it alike.
#[derive(Clone)]
pub struct Invalidate {
    /// The users cache.
    users: Option<Invalidator<i64>>,
    http: Option<Invalidator<String>>,
}

impl Invalidate {
    /// After a write to user `id` at `version`: the cached reads of it go.
    fn user(&self, id: i64, version: Option<u64>) {
        if let Some(users) = &self.users {
            users.invalidate_tag_at(format!("user:{id}"), version);
        }
        if let Some(http) = &self.http {
            http.invalidate_tag_at(format!("user:{id}"), version);
        }
    }
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

pub(crate) fn db_error(e: DbError) -> Response {
    if users::unavailable(&e) {
        eprintln!("database unavailable: {e}");
        error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    } else {
        eprintln!("query failed: {e}");
        error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
    }
}

pub(crate) const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// The `x-served-by` values, built when the router is: answering a
/// request clones one (a reference count), it never parses or allocates
/// one. A node the cluster did not list at start (none, today) falls back
/// to building its value.
struct ServedBy {
    nodes: Vec<(Box<str>, HeaderValue)>,
}

impl ServedBy {
    fn new(cluster: &tower_scale::pg::Cluster) -> Self {
        let nodes = cluster
            .status()
            .into_iter()
            .filter_map(|n| {
                let v = HeaderValue::from_str(&n.name).ok()?;
                Some((n.name.into_boxed_str(), v))
            })
            .collect();
        Self { nodes }
    }

    fn value(&self, by: &str) -> Option<HeaderValue> {
        match by {
            "cache" => Some(HeaderValue::from_static("cache")),
            "cache-l2" => Some(HeaderValue::from_static("cache-l2")),
            _ => self
                .nodes
                .iter()
                .find(|(name, _)| **name == *by)
                .map(|(_, v)| v.clone())
                .or_else(|| HeaderValue::from_str(by).ok()),
        }
    }
}

pub(crate) fn served_by(mut res: Response, by: Option<HeaderValue>) -> Response {
    if let Some(v) = by {
        res.headers_mut().insert(X_SERVED_BY, v);
    }
    res
}

/// `{"id":N,"name":"...","welcomed":B}`, as `Json(UserJson { .. })`
/// writes it, without its generic response building: the body in one
/// allocation, the content type a static value.
fn user_json(id: i64, name: &str, welcomed: bool) -> Response {
    let mut body = Vec::with_capacity(name.len() + 56);
    body.extend_from_slice(b"{\"id\":");
    body.extend_from_slice(itoa_i64(id, &mut [0; 20]));
    body.extend_from_slice(b",\"name\":");
    if name.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        // Nothing to escape (names are mostly plain): copied as it is.
        body.push(b'"');
        body.extend_from_slice(name.as_bytes());
        body.push(b'"');
    } else if serde_json::to_writer(&mut body, name).is_err() {
        // Writing to a Vec does not fail; this keeps the old path if it did.
        return Json(UserJson { id, name, welcomed }).into_response();
    }
    body.extend_from_slice(match welcomed {
        true => b",\"welcomed\":true}",
        false => b",\"welcomed\":false}",
    });
    let mut res = Response::new(axum::body::Body::from(body));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `n` in decimal, written at the end of `buf`.
fn itoa_i64(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// The name from a JSON body, or the 400 message.
pub(crate) fn parse_name(body: Result<Json<NameJson>, JsonRejection>) -> Result<String, String> {
    let Json(NameJson { name }) = body.map_err(|e| e.body_text())?;
    if name.trim().is_empty() || name.len() > 1000 {
        return Err("name must be 1 to 1000 characters".into());
    }
    Ok(name)
}

pub(crate) fn user_response(user: &User) -> Response {
    user_json(user.id, &user.name, user.welcomed)
}

/// `POST /users`: the insert and its welcome job in one transaction (the
/// job exists if and only if the user does), answered like any write: 201,
/// the user, and the commit's token in the cookie.
async fn create(
    State(app): State<AppState>,
    db: RequestDb,
    body: Result<Json<NameJson>, JsonRejection>,
) -> Response {
    let name = match parse_name(body) {
        Ok(n) => n,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let (user, token) = match insert_and_enqueue(&app, &db, &name).await {
        Ok(done) => done,
        Err(e) => return e,
    };
    db.record_write(token);
    // A 404 for this id may be cached from before it existed.
    app.invalidate.user(user.id, token.version());
    let res = (StatusCode::CREATED, user_response(&user)).into_response();
    let by = db.db().primary_name();
    served_by(res, by.and_then(|by| app.served_by.value(&by)))
}

async fn insert_and_enqueue(
    app: &App,
    db: &RequestDb,
    name: &str,
) -> Result<(User, ConsistencyToken), Response> {
    let tx = db.db().transaction().await.map_err(db_error)?;
    let row = tx
        .query_one(
            "INSERT INTO users (name) VALUES ($1) RETURNING id, name, welcomed_at IS NOT NULL",
            &[&name],
        )
        .await
        .map_err(db_error)?;
    let user = User::from_row(&row).map_err(|e| {
        eprintln!("query failed: {e}");
        error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
    })?;
    let job = NewJob::new(&WelcomeJob { user: user.id }).map_err(queue_error)?;
    app.welcome
        .enqueue_in(&tx, job)
        .await
        .map_err(queue_error)?;
    match tx.commit().await {
        Ok(token) => Ok((user, token)),
        Err(e) => {
            if e.may_have_committed() {
                // The client's next read must not miss it if it did.
                db.record_write(ConsistencyToken::unknown());
            }
            Err(db_error(e))
        }
    }
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::Db(e) => db_error(e),
        e => {
            eprintln!("enqueueing the welcome job failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
        }
    }
}

/// What `GET /users/{id}` reads from the request, in one extractor: its
/// `RequestDb` and the id (`None`: not an integer).
struct ReadRequest {
    db: RequestDb,
    id: Option<i64>,
}

impl<S: Send + Sync> FromRequestParts<S> for ReadRequest {
    type Rejection = MissingDbLayer;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, MissingDbLayer> {
        let db = RequestDb::from_request_parts(parts, state).await?;
        // An id of plain digits (what clients send) is read from the path
        // as it is: percent-decoding leaves it unchanged, and `Path`'s
        // deserializer costs more than the rest of a cache hit's handler.
        // Anything else goes through `Path`, as before.
        let plain = parts
            .uri
            .path()
            .strip_prefix("/users/")
            .filter(|id| {
                let digits = id.strip_prefix('-').unwrap_or(id);
                (1..=18).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|id| id.parse().ok());
        let id = match plain {
            Some(id) => Some(id),
            None => Path::<i64>::from_request_parts(parts, state)
                .await
                .ok()
                .map(|Path(id)| id),
        };
        Ok(Self { db, id })
    }
}

async fn read(State(app): State<AppState>, ReadRequest { db, id }: ReadRequest) -> Response {
    let Some(id) = id else {
        return error(StatusCode::BAD_REQUEST, "the id must be an integer");
    };
    if app.http_cache {
        // Boxed: its query future would make this handler's future (boxed
        // and moved on every request, hits included) 3 KB instead of a
        // few hundred bytes. This branch reads the database anyway.
        return Box::pin(read_for_http_cache(&app, &db, id)).await;
    }
    let result = app
        .users
        .clone()
        .oneshot(UserRead {
            id,
            consistency: db.consistency(),
        })
        .await;
    let mut res = match result {
        Ok(user) => {
            // A hit reads the flag without writing it (no cache-line
            // ping-pong between cores on a hot key).
            let by =
                if user.taken.load(Ordering::Acquire) || user.taken.swap(true, Ordering::SeqCst) {
                    Some(HeaderValue::from_static("cache"))
                } else {
                    app.served_by.value(&user.served_by)
                };
            let res = match &user.row {
                Some(u) => user_response(u),
                None => error(StatusCode::NOT_FOUND, "not found"),
            };
            served_by(res, by)
        }
        Err(e) => db_error(e),
    };
    // Browsers and proxies must not keep what the server may invalidate.
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// `GET /users/{id}` behind the HTTP cache: one read routed for the
/// request (its `DbLayer` records the read's LSN for the cache's stamp),
/// fresh for 30 s in shared caches, tagged `user:{id}`.
async fn read_for_http_cache(app: &App, db: &RequestDb, id: i64) -> Response {
    let read = db.read_opt(users::USER_BY_ID, &[&id]).await;
    let mut res = match read {
        Ok(r) => {
            let user = r.value.as_ref().map(User::from_row).transpose();
            let res = match user {
                Ok(Some(u)) => user_response(&u),
                Ok(None) => error(StatusCode::NOT_FOUND, "not found"),
                Err(e) => return db_error(users::row_shape(&r.served_by, e)),
            };
            served_by(res, app.served_by.value(&r.served_by))
        }
        // Not stored: no freshness of its own.
        Err(e) => return db_error(e),
    };
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("s-maxage=30"));
    if let Ok(tag) = HeaderValue::from_str(&format!("user:{id} {}", users::USERS_WHOLE)) {
        res.headers_mut().insert("surrogate-key", tag);
    }
    res
}

async fn update(
    State(app): State<AppState>,
    db: RequestDb,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<NameJson>, JsonRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return error(StatusCode::BAD_REQUEST, "the id must be an integer");
    };
    let name = match parse_name(body) {
        Ok(n) => n,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match db
        .query(
            "UPDATE users SET name = $1 WHERE id = $2 RETURNING id, name, welcomed_at IS NOT NULL",
            &[&name, &id],
        )
        .await
    {
        Ok(w) => {
            app.invalidate.user(id, w.token.version());
            let res = match w.value.first().map(User::from_row) {
                Some(Ok(u)) => user_response(&u),
                Some(Err(e)) => return db_error(users::row_shape(&w.served_by, e)),
                None => error(StatusCode::NOT_FOUND, "not found"),
            };
            served_by(res, app.served_by.value(&w.served_by))
        }
        Err(e) => db_error(e),
    }
}

async fn delete(
    State(app): State<AppState>,
    db: RequestDb,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return error(StatusCode::BAD_REQUEST, "the id must be an integer");
    };
    match db.execute("DELETE FROM users WHERE id = $1", &[&id]).await {
        Ok(w) => {
            app.invalidate.user(id, w.token.version());
            let res = if w.value == 0 {
                error(StatusCode::NOT_FOUND, "not found")
            } else {
                StatusCode::NO_CONTENT.into_response()
            };
            served_by(res, app.served_by.value(&w.served_by))
        }
        Err(e) => db_error(e),
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    app.metrics.render().into_response()
}

pub(crate) async fn fallback() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// The whole service as a `Router`: routes, the users cache, and `DbLayer`
/// around each route (the tour and the soak test run it in-process).
pub fn router(
    backend: &users::Backend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Router {
    routes(backend, metrics, None).layer(db_layer(backend))
}

/// The same service as `axum_users` serves it: `DbLayer` once around the
/// whole router rather than around each route. It answers exactly as
/// [`router`] does; `Router::layer` puts the layer inside every route's
/// boxed, cloned-per-request service, which cost the cached GET two more
/// allocations and a boxed future per request.
pub fn service(
    backend: &users::Backend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> tower_scale::pg::DbRouting<Router> {
    tower::Layer::layer(&db_layer(backend), routes(backend, metrics, None))
}

/// Serves `app` on `listener` until `shutdown` resolves, with the users
/// service's server settings (`TCP_NODELAY` on every connection). The load
/// report serves its bare ceiling router through this too, so both run
/// with the same settings.
pub async fn serve_until<S>(
    listener: tokio::net::TcpListener,
    app: S,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    axum::serve(
        axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            let _ = tcp.set_nodelay(true);
        }),
        axum::ServiceExt::<axum::extract::Request>::into_make_service(app),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

fn db_layer(backend: &users::Backend) -> DbLayer {
    DbLayer::builder(backend.db.clone(), backend.codec.clone()).build()
}

fn routes(
    backend: &users::Backend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    http: Option<Invalidator<String>>,
) -> Router {
    let state = Arc::new(App {
        users: backend.users.clone(),
        http_cache: http.is_some(),
        invalidate: Invalidate {
            users: Some(backend.invalidator.clone()),
            http,
        },
        welcome: backend.welcome.clone(),
        metrics,
        served_by: ServedBy::new(&backend.cluster),
    });
    Router::new()
        .route("/users", axum::routing::post(create))
        .route("/users/{id}", get(read).put(update).delete(delete))
        .route("/metrics", get(metrics_text))
        .fallback(fallback)
        .with_state(state)
}

/// The HTTP cache's Redis tier.
pub type HttpTier =
    std::sync::Arc<tower_scale::cache::redis::RedisTier<String, tower_scale::http::StoredVariants>>;

/// `--http-cache`: the HTTP cache (shared through Redis with `--redis`)
/// outside `DbLayer`, honouring the tokens `DbLayer` reads. Returns the
/// service and the Redis tier to keep alive.
pub async fn http_cached_router(
    backend: &users::Backend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    redis: Option<&str>,
) -> Result<(Router, Option<HttpTier>, Invalidator<String>), users::BoxError> {
    let db_layer = db_layer(backend);
    let cache = HttpCacheLayer::builder()
        .mark_hits(true)
        .name("users-http")
        .request_version_from(&db_layer)
        .build()?;
    let tier = match redis {
        Some(url) => Some(
            tower_scale::cache::redis::builder(url.to_string())
                .prefix("tower-scale-users-http")
                .timeout(std::time::Duration::from_millis(250))
                .attach(&cache, cache.redis_codec())
                .await?,
        ),
        None => None,
    };
    let invalidator = cache.invalidator();
    let app = routes(backend, metrics, Some(cache.invalidator()))
        .layer(db_layer)
        .layer(cache)
        .layer(axum::middleware::map_response(served_by_cache));
    Ok((app, tier, invalidator))
}

/// A response the HTTP cache answered says so: `cache`, or `cache-l2`
/// when it came from the shared tier.
async fn served_by_cache(res: Response) -> Response {
    match res.extensions().get::<CacheHit>() {
        Some(CacheHit::SharedTier) => served_by(res, Some(HeaderValue::from_static("cache-l2"))),
        Some(_) => served_by(res, Some(HeaderValue::from_static("cache"))),
        None => res,
    }
}

/// The welcome job's handler: reads the user where the job's writes are
/// visible (a replica that has replayed the insert, at the job's token),
/// marks it welcomed, and invalidates `user:{id}` at the update's token as
/// every write of the service does. Idempotent: a second run (a worker
/// killed after the update) keeps the first `welcomed_at`. A user deleted
/// before its job ran is skipped.
#[derive(Clone)]
pub struct Welcome {
    invalidate: Invalidate,
}

impl tower::Service<Job> for Welcome {
    type Response = ();
    type Error = users::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), users::BoxError>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), users::BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, job: Job) -> Self::Future {
        let invalidate = self.invalidate.clone();
        Box::pin(async move {
            let WelcomeJob { user: id } = job.payload_as()?;
            let read = job.db.read_opt(users::USER_BY_ID, &[&id]).await?;
            let Some(row) = read.value else {
                // Deleted before its welcome: nothing to do.
                return Ok(());
            };
            let user = User::from_row(&row)?;
            // The welcome itself (an email...) would go here.
            tracing::debug!(user = id, name = %user.name, attempt = job.attempt, "welcome");
            // The mark even when the read saw it set: a run that died
            // between its update and its invalidation left caches to
            // invalidate.
            let w = job
                .db
                .db()
                .execute(
                    "UPDATE users SET welcomed_at = coalesce(welcomed_at, now()) WHERE id = $1",
                    &[&id],
                )
                .await?;
            invalidate.user(id, w.token.version());
            Ok(())
        })
    }
}

impl Welcome {
    /// The handler for `backend`'s service, invalidating its users cache
    /// and `http` (the HTTP cache, with `--http-cache`).
    pub fn new(backend: &users::Backend, http: Option<Invalidator<String>>) -> Self {
        Self {
            invalidate: Invalidate {
                users: Some(backend.invalidator.clone()),
                http,
            },
        }
    }

    /// The handler for the sharded mode: it invalidates `users` (the
    /// sharded users cache) at its shard's commit position.
    pub fn with_users(users: Invalidator<i64>) -> Self {
        Self {
            invalidate: Invalidate {
                users: Some(users),
                http: None,
            },
        }
    }
}

/// The welcome worker for `backend`'s queue, `slots` jobs at a time (one
/// `Worker`, one claim loop, `slots` handlers at once). Not started: the
/// caller may tune it first.
pub fn welcome_worker(
    backend: &users::Backend,
    http: Option<Invalidator<String>>,
    slots: usize,
) -> Worker<Welcome> {
    Worker::new(backend.welcome.clone(), Welcome::new(backend, http)).concurrency(slots)
}
