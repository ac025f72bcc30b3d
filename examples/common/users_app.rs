//! The `axum_users` service itself: state, handlers and routers, shared by
//! `examples/axum_users.rs` (which serves it) and `examples/load.rs` (which
//! runs it in-process under load). Both include it with `#[path]` next to
//! `common/users.rs`, which it reaches as `super::users`.
#![allow(dead_code)]

use std::sync::atomic::Ordering;

use super::users::{self, UserCache, UserRead};
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_scale::cache::Invalidator;
use tower_scale::http::{CacheHit, HttpCacheLayer};
use tower_scale::pg::DbError;
use tower_scale::pg::{DbLayer, RequestDb};

#[derive(Serialize)]
struct UserJson {
    id: i64,
    name: String,
}

#[derive(Deserialize)]
struct NameJson {
    name: String,
}

#[derive(Clone)]
struct AppState {
    users: UserCache,
    invalidator: Invalidator<i64>,
    /// With `--http-cache`: the HTTP cache's invalidator (by tag).
    http: Option<Invalidator<String>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl AppState {
    /// After a write to user `id` at `version`: the cached reads of it go.
    fn invalidate(&self, id: i64, version: Option<u64>) {
        self.invalidator
            .invalidate_tag_at(format!("user:{id}"), version);
        if let Some(http) = &self.http {
            http.invalidate_tag_at(format!("user:{id}"), version);
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn db_error(e: DbError) -> Response {
    if users::unavailable(&e) {
        eprintln!("database unavailable: {e}");
        error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    } else {
        eprintln!("query failed: {e}");
        error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
    }
}

fn served_by(mut res: Response, by: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(by) {
        res.headers_mut().insert("x-served-by", v);
    }
    res
}

fn user_json(id: i64, name: String) -> Json<UserJson> {
    Json(UserJson { id, name })
}

/// The name from a JSON body, or the 400 message.
fn parse_name(body: Result<Json<NameJson>, JsonRejection>) -> Result<String, String> {
    let Json(NameJson { name }) = body.map_err(|e| e.body_text())?;
    if name.trim().is_empty() || name.len() > 1000 {
        return Err("name must be 1 to 1000 characters".into());
    }
    Ok(name)
}

async fn create(
    State(app): State<AppState>,
    db: RequestDb,
    body: Result<Json<NameJson>, JsonRejection>,
) -> Response {
    let name = match parse_name(body) {
        Ok(n) => n,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match db
        .query_one(
            "INSERT INTO users (name) VALUES ($1) RETURNING id, name",
            &[&name],
        )
        .await
    {
        Ok(w) => {
            let id: i64 = w.value.get(0);
            // A 404 for this id may be cached from before it existed.
            app.invalidate(id, w.token.version());
            let res = (StatusCode::CREATED, user_json(id, w.value.get(1))).into_response();
            served_by(res, &w.served_by)
        }
        Err(e) => db_error(e),
    }
}

async fn read(
    State(app): State<AppState>,
    db: RequestDb,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return error(StatusCode::BAD_REQUEST, "the id must be an integer");
    };
    if app.http.is_some() {
        return read_for_http_cache(&db, id).await;
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
            let by = if user.taken.swap(true, Ordering::SeqCst) {
                "cache"
            } else {
                &*user.served_by
            };
            let res = match &user.row {
                Some((id, name)) => user_json(*id, name.clone()).into_response(),
                None => error(StatusCode::NOT_FOUND, "not found"),
            };
            served_by(res, by)
        }
        Err(e) => db_error(e),
    };
    // Browsers and proxies must not keep what the server may invalidate.
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    res
}

/// `GET /users/{id}` behind the HTTP cache: one read routed for the
/// request (its `DbLayer` records the read's LSN for the cache's stamp),
/// fresh for 30 s in shared caches, tagged `user:{id}`.
async fn read_for_http_cache(db: &RequestDb, id: i64) -> Response {
    let read = db
        .read_opt("SELECT id, name FROM users WHERE id = $1", &[&id])
        .await;
    let mut res = match read {
        Ok(r) => {
            let res = match r.value {
                Some(row) => user_json(row.get(0), row.get(1)).into_response(),
                None => error(StatusCode::NOT_FOUND, "not found"),
            };
            served_by(res, &r.served_by)
        }
        // Not stored: no freshness of its own.
        Err(e) => return db_error(e),
    };
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("s-maxage=30"));
    if let Ok(tag) = HeaderValue::from_str(&format!("user:{id}")) {
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
            "UPDATE users SET name = $1 WHERE id = $2 RETURNING id, name",
            &[&name, &id],
        )
        .await
    {
        Ok(w) => {
            app.invalidate(id, w.token.version());
            let res = match w.value.first() {
                Some(row) => user_json(row.get(0), row.get(1)).into_response(),
                None => error(StatusCode::NOT_FOUND, "not found"),
            };
            served_by(res, &w.served_by)
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
            app.invalidate(id, w.token.version());
            let res = if w.value == 0 {
                error(StatusCode::NOT_FOUND, "not found")
            } else {
                StatusCode::NO_CONTENT.into_response()
            };
            served_by(res, &w.served_by)
        }
        Err(e) => db_error(e),
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    app.metrics.render().into_response()
}

async fn fallback() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// The whole service: routes, the users cache, and `DbLayer` around them
/// (the tour runs it in-process).
pub fn router(
    backend: &users::Backend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Router {
    routes(backend, metrics, None).layer(db_layer(backend))
}

fn db_layer(backend: &users::Backend) -> DbLayer {
    DbLayer::builder(backend.db.clone(), backend.codec.clone()).build()
}

fn routes(
    backend: &users::Backend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    http: Option<Invalidator<String>>,
) -> Router {
    let state = AppState {
        users: backend.users.clone(),
        invalidator: backend.invalidator.clone(),
        http,
        metrics,
    };
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
) -> Result<(Router, Option<HttpTier>), users::BoxError> {
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
    let app = routes(backend, metrics, Some(cache.invalidator()))
        .layer(db_layer)
        .layer(cache)
        .layer(axum::middleware::map_response(served_by_cache));
    Ok((app, tier))
}

/// A response the HTTP cache answered says so: `cache`, or `cache-l2`
/// when it came from the shared tier.
async fn served_by_cache(res: Response) -> Response {
    match res.extensions().get::<CacheHit>() {
        Some(CacheHit::SharedTier) => served_by(res, "cache-l2"),
        Some(_) => served_by(res, "cache"),
        None => res,
    }
}
