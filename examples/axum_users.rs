//! A complete users service: axum + routing over a PostgreSQL primary and
//! replicas + an in-process cache that understands consistency tokens.
//!
//! ```text
//! cargo run --release --features full --example axum_users -- \
//!     --listen 127.0.0.1:PORT [--primary URL --replica URL ...] [--token-key HEX] \
//!     [--redis URL] [--http-cache] [--no-change-feed] [--workers N]
//! cargo run --release --features full --example axum_users -- \
//!     --listen 127.0.0.1:PORT (--shards N | --shard NAME=PRIMARY_URL[,REPLICA_URL...] ...) \
//!     [--instance-id N] [--admin-token TOKEN] [--token-key HEX] [--workers N]
//! ```
//!
//! With `--shards N` (N LocalClusters, one replica each, `shard-1`...) or
//! `--shard` (given servers) the users live on a sharded cluster, placed
//! by id (`examples/common/users_shards.rs` and `users_shards_views.rs`):
//! the same routes and shapes, plus `GET /users?limit=N&after=ID` (a
//! listing in id order across shards) and `GET /admin/shards` (the slot
//! map, with `Authorization: Bearer TOKEN` of `--admin-token`; without
//! that flag every `/admin/*` path is 404).
//!
//! Without `--primary` it starts a LocalCluster (one primary, two
//! replicas) and stops it on exit. Without `--token-key` (64 hex
//! characters) it makes a random key: instances that share clients must be
//! given the same one. When ready it prints `listening on http://IP:PORT`
//! as the first line on stdout; logs go to stderr; SIGTERM or Ctrl-C shut
//! it down cleanly.
//!
//! - `POST /users` `{"name": "..."}` -> 201 `{"id": N, "name": "...", "welcomed": false}`
//! - `GET /users/{id}` -> 200 `{"id": N, "name": "...", "welcomed": B}` or 404 `{"error": "not found"}`
//! - `PUT /users/{id}` `{"name": "..."}` -> 200 the new row; `DELETE /users/{id}` -> 204
//! - `GET /metrics` -> Prometheus text
//!
//! `POST /users` enqueues a `welcome` job (`tower_scale::queue`) in the
//! insert's own transaction: the job exists if and only if the user does
//! (with shards, it will live on the user's shard). A worker in the same
//! process (`--workers N` jobs at a time, default 2; 0 runs none) reads the
//! user from a replica at the job's token, sets `welcomed_at` (added with
//! `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` to a table from before it)
//! and invalidates `user:{id}` like any write; users answer with
//! `"welcomed": true` from then on. A worker killed mid-job loses its
//! lease and the job runs again (the update is idempotent). SIGTERM stops
//! the worker with the server, giving running jobs 5 s.
//!
//! The cache hears every write to `users`, by any writer: a change feed
//! from the primary's logical replication stream (`tower_scale::pg::feed`)
//! invalidates `user:{id}` when the row changes, so an `UPDATE users SET
//! name = ... WHERE id = ...` from `psql` is seen by tokenless reads within
//! milliseconds (with `--redis`, on every instance: one holds the feed, the
//! others hear it through Redis). `--no-change-feed` turns it off; a
//! primary without `wal_level = logical` gets one warning on stderr and the
//! service runs without it.
//!
//! Every response that read or wrote data says who served it in
//! `x-served-by`: `cache`, or the node that ran the query.
//!
//! With `--http-cache`, an `HttpCacheLayer` sits outside `DbLayer` and is
//! the cache: `GET /users/{id}` reads through the request's `RequestDb`
//! (no in-process user cache) and answers with `Cache-Control:
//! s-maxage=30` and the tag `user:{id}` in `surrogate-key` (the cache
//! strips it); writes invalidate that tag at their commit LSN. The cache
//! stamps each stored response with the LSN its data reflects (the
//! `DataVersion` `DbLayer` records) and answers a request carrying a
//! token only from a response stamped at or above it, so the cookie or
//! header still gives read-your-writes; a tokenless client sees data at
//! most 30 s plus replica lag old. A response the HTTP cache answered says
//! `x-served-by: cache` (`cache-l2` when it came from Redis, with
//! `--redis`, which then shares the HTTP cache's responses too).

#[path = "common/users.rs"]
pub(crate) mod users;
#[path = "common/users_app.rs"]
pub(crate) mod users_app;
#[path = "common/users_shards.rs"]
pub(crate) mod users_shards;
#[path = "common/users_shards_cache.rs"]
pub(crate) mod users_shards_cache;
#[path = "common/users_shards_moves.rs"]
pub(crate) mod users_shards_moves;
#[path = "common/users_shards_views.rs"]
pub(crate) mod users_shards_views;

use std::io::Write;

pub use users_app::{http_cached_router, router};

#[tokio::main]
async fn main() {
    let args = users::args_or_exit("axum_users");
    if let Err(e) = run(args).await {
        eprintln!("axum_users: {e}");
        std::process::exit(1);
    }
}

/// Announces `addr` and serves `app` until SIGTERM or Ctrl-C.
async fn serve<S>(
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    app: S,
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
    // Handlers in place before the announcement (a SIGTERM right after it
    // must shut down cleanly).
    let shutdown = users::shutdown_signal();
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    users_app::serve_until(listener, app, shutdown).await
}

/// How long running welcome jobs get to finish at shutdown (the rest are
/// released for another instance).
const WORKER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The welcome worker, unless `--workers 0`.
fn start_worker(
    args: &users::Args,
    backend: &users::Backend,
    http: Option<tower_scale::cache::Invalidator<String>>,
) -> Result<Option<tower_scale::queue::WorkerHandle>, users::BoxError> {
    match args.workers() {
        0 => Ok(None),
        n => Ok(Some(users_app::welcome_worker(backend, http, n).start()?)),
    }
}

async fn run(args: users::Args) -> Result<(), users::BoxError> {
    let metrics = users::install_metrics()?;
    if args.sharding.enabled() {
        return run_sharded(args, metrics).await;
    }
    let backend = users::backend(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let (_tier, worker) = if args.http_cache {
        let (app, tier, http) =
            http_cached_router(&backend, metrics, args.redis.as_deref()).await?;
        let worker = start_worker(&args, &backend, Some(http.clone()))?;
        let _feed = match args.no_change_feed {
            false => users::change_feed("axum_users", &backend, Some(http)).await,
            true => None,
        };
        serve(listener, addr, app).await?;
        (tier, worker)
    } else {
        let worker = start_worker(&args, &backend, None)?;
        let _feed = match args.no_change_feed {
            false => users::change_feed("axum_users", &backend, None).await,
            true => None,
        };
        serve(listener, addr, users_app::service(&backend, metrics)).await?;
        (None, worker)
    };
    eprintln!("axum_users: shutting down");
    if let Some(worker) = worker {
        let report = worker.shutdown(WORKER_GRACE).await;
        eprintln!("axum_users: welcome worker stopped: {report:?}");
    }
    backend.cluster.shutdown();
    drop(backend);
    Ok(())
}

/// `--shards N` or `--shard ...`: the service on a sharded cluster.
async fn run_sharded(
    args: users::Args,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Result<(), users::BoxError> {
    let backend = users_shards::backend(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let workers = users_shards::start_workers(&backend, args.workers())?;
    let app = users_shards::router(&backend, metrics, args.sharding.admin_token.clone());
    serve(listener, addr, app).await?;
    eprintln!("axum_users: shutting down");
    for worker in workers {
        let report = worker.shutdown(WORKER_GRACE).await;
        eprintln!("axum_users: welcome worker stopped: {report:?}");
    }
    drop(backend);
    Ok(())
}
