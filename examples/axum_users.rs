//! A complete users service: axum + routing over a PostgreSQL primary and
//! replicas + an in-process cache that understands consistency tokens.
//!
//! ```text
//! cargo run --release --features full --example axum_users -- \
//!     --listen 127.0.0.1:PORT [--primary URL --replica URL ...] [--token-key HEX]
//! ```
//!
//! Without `--primary` it starts a LocalCluster (one primary, two
//! replicas) and stops it on exit. Without `--token-key` (64 hex
//! characters) it makes a random key: instances that share clients must be
//! given the same one. When ready it prints `listening on http://IP:PORT`
//! as the first line on stdout; logs go to stderr; SIGTERM or Ctrl-C shut
//! it down cleanly.
//!
//! - `POST /users` `{"name": "..."}` -> 201 `{"id": N, "name": "..."}`
//! - `GET /users/{id}` -> 200 `{"id": N, "name": "..."}` or 404 `{"error": "not found"}`
//! - `PUT /users/{id}` `{"name": "..."}` -> 200 the new row; `DELETE /users/{id}` -> 204
//! - `GET /metrics` -> Prometheus text
//!
//! Every response that read or wrote data says who served it in
//! `x-served-by`: `cache`, or the node that ran the query.

#[path = "common/users.rs"]
pub(crate) mod users;

use std::io::Write;
use std::sync::atomic::Ordering;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_scale::cache::Invalidator;
use tower_scale::pg::DbError;
use tower_scale::pg::{DbLayer, RequestDb};
use users::{UserCache, UserRead};

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
    metrics: metrics_exporter_prometheus::PrometheusHandle,
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
            app.invalidator
                .invalidate_tag_at(format!("user:{id}"), w.token.version());
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
            app.invalidator
                .invalidate_tag_at(format!("user:{id}"), w.token.version());
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
            app.invalidator
                .invalidate_tag_at(format!("user:{id}"), w.token.version());
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
    let state = AppState {
        users: backend.users.clone(),
        invalidator: backend.invalidator.clone(),
        metrics,
    };
    Router::new()
        .route("/users", axum::routing::post(create))
        .route("/users/{id}", get(read).put(update).delete(delete))
        .route("/metrics", get(metrics_text))
        .fallback(fallback)
        .with_state(state)
        .layer(DbLayer::builder(backend.db.clone(), backend.codec.clone()).build())
}

#[tokio::main]
async fn main() {
    let args = users::args_or_exit("axum_users");
    if let Err(e) = run(args).await {
        eprintln!("axum_users: {e}");
        std::process::exit(1);
    }
}

async fn run(args: users::Args) -> Result<(), users::BoxError> {
    let metrics = users::install_metrics()?;
    let backend = users::backend(&args).await?;
    let app = router(&backend, metrics);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    axum::serve(
        axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            let _ = tcp.set_nodelay(true);
        }),
        app,
    )
    .with_graceful_shutdown(users::shutdown_signal())
    .await?;
    eprintln!("axum_users: shutting down");
    backend.cluster.shutdown();
    drop(backend);
    Ok(())
}
