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

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_scale::cache::{
    Cache, CacheLayer, CachePolicy, Invalidator, MokaStore, Storable, Windows,
};
use tower_scale::http::{DbLayer, RequestDb};
use tower_scale::pg::{Cluster, Consistency, Db, DbError, NodeConfig, TokenCodec};
use tower_scale::testing::LocalCluster;

const USAGE: &str =
    "usage: axum_users --listen IP:PORT [--primary URL --replica URL ...] [--token-key HEX64]";

struct Args {
    listen: SocketAddr,
    primary: Option<String>,
    replicas: Vec<String>,
    token_key: Option<Vec<u8>>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut primary, mut replicas, mut token_key) = (None, None, Vec::new(), None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--primary" => primary = Some(value()?),
            "--replica" => replicas.push(value()?),
            "--token-key" => {
                let hex = value()?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("--token-key must be 64 hex characters (32 bytes)".into());
                }
                let bytes = (0..32)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|e| format!("--token-key: {e}"))?;
                token_key = Some(bytes);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if primary.is_none() && !replicas.is_empty() {
        return Err("--replica needs --primary".into());
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        primary,
        replicas,
        token_key,
    })
}

#[derive(Serialize)]
struct UserJson {
    id: i64,
    name: String,
}

#[derive(Deserialize)]
struct NameJson {
    name: String,
}

/// A cached read of one user: the row (or none) and who read it.
struct UserRow {
    row: Option<(i64, String)>,
    served_by: Arc<str>,
    lsn: u64,
    /// The first request to take this result made the query; later ones
    /// (hits and coalesced waiters) were served by the cache.
    taken: AtomicBool,
}

/// What the cache sees: the id and the client's minimum LSN.
struct UserRead {
    id: i64,
    consistency: Consistency,
}

struct UserPolicy;

impl CachePolicy<UserRead, Arc<UserRow>> for UserPolicy {
    type Key = i64;
    fn key(&self, req: &UserRead) -> Option<i64> {
        Some(req.id)
    }
    fn min_version(&self, req: &UserRead) -> Option<u64> {
        match req.consistency {
            Consistency::ReadYourWrites(t) => Some(t.lsn().0),
            _ => None,
        }
    }
    fn storable(&self, id: &i64, row: &Arc<UserRow>, d: &Windows) -> Option<Storable> {
        Some(Storable::new(*d).tag(format!("user:{id}")).version(row.lsn))
    }
}

type UserCache = Cache<
    tower::util::BoxCloneSyncService<UserRead, Arc<UserRow>, DbError>,
    UserPolicy,
    MokaStore<i64, Arc<UserRow>, DbError>,
>;

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
    match e {
        DbError::Query { .. } | DbError::RowCount { .. } => {
            eprintln!("query failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
        }
        other => {
            eprintln!("database unavailable: {other}");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
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
                .invalidate_tag_at(format!("user:{id}"), w.token.lsn().0);
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
                .invalidate_tag_at(format!("user:{id}"), w.token.lsn().0);
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
                .invalidate_tag_at(format!("user:{id}"), w.token.lsn().0);
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
    app.users.stats().record_metrics("users");
    app.metrics.render().into_response()
}

async fn fallback() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// The loader the cache calls on a miss: one routed read.
fn loader(db: Db) -> tower::util::BoxCloneSyncService<UserRead, Arc<UserRow>, DbError> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: UserRead| {
        let db = db.clone();
        async move {
            let r = db
                .read_opt(
                    req.consistency,
                    "SELECT id, name FROM users WHERE id = $1",
                    &[&req.id],
                )
                .await?;
            Ok::<_, DbError>(Arc::new(UserRow {
                row: r.value.map(|row| (row.get(0), row.get(1))),
                served_by: r.served_by,
                lsn: r.lsn.0,
                taken: AtomicBool::new(false),
            }))
        }
    }))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("axum_users: {message}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("axum_users: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    // Without --primary: our own cluster, stopped when this returns.
    let local = match &args.primary {
        Some(_) => None,
        None => Some(tokio::task::spawn_blocking(|| LocalCluster::start(2)).await??),
    };
    let (primary, replicas) = match (&args.primary, &local) {
        (Some(p), _) => (
            NodeConfig::from_url(p)?,
            args.replicas
                .iter()
                .map(|r| NodeConfig::from_url(r))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        (None, Some(l)) => (
            NodeConfig::new(l.primary().config()),
            l.replicas()
                .iter()
                .map(|r| NodeConfig::new(r.config()))
                .collect(),
        ),
        (None, None) => return Err("no database".into()),
    };
    let mut builder = Cluster::builder()
        .primary(primary)
        .read_timeout(Duration::from_secs(2));
    for r in replicas {
        builder = builder.replica(r);
    }
    let cluster = builder.build().await?;
    let db = cluster.db();
    db.execute(
        "CREATE TABLE IF NOT EXISTS users (id bigserial primary key, name text not null)",
        &[],
    )
    .await?;
    let key = match args.token_key {
        Some(k) => k,
        None => {
            let mut k = vec![0u8; 32];
            getrandom::fill(&mut k).map_err(|e| format!("random key: {e}"))?;
            k
        }
    };
    let codec = TokenCodec::new(&key, cluster.identity())?;
    let cache_layer = CacheLayer::builder(UserPolicy)
        .time_to_live(Duration::from_secs(60))
        .max_entries(100_000)
        .build()?;
    let invalidator = cache_layer.invalidator();
    let users: UserCache = tower::Layer::layer(&cache_layer, loader(db.clone()));
    let state = AppState {
        users,
        invalidator,
        metrics,
    };
    let app = Router::new()
        .route("/users", axum::routing::post(create))
        .route("/users/{id}", get(read).put(update).delete(delete))
        .route("/metrics", get(metrics_text))
        .fallback(fallback)
        .with_state(state)
        .layer(DbLayer::builder(db.clone(), codec).build());
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    eprintln!("axum_users: shutting down");
    cluster.shutdown();
    drop(local);
    Ok(())
}
