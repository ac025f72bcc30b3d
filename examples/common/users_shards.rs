//! The users service on several shards (`axum_users --shards N` or
//! `--shard NAME=PRIMARY_URL[,REPLICA_URL...]`): users are placed by id
//! (`tower_scale::ids`, no central sequence) on a
//! `tower_scale::shard::ShardedCluster`; the routes, headers, status codes
//! and JSON shapes are those of the single-cluster service (the JSON
//! helpers are `users_app`'s), plus `GET /users` (a listing across shards)
//! and `GET /admin/shards` (behind `--admin-token`).
//!
//! The consistency token is a `ShardedToken` (a commit LSN per shard
//! written), carried in the same cookie (`tower_scale_token`) and header
//! (`x-consistency-token`) as the single-cluster token: a write answers
//! with the client's token followed by its own (`ShardedToken::followed_by`:
//! the write's position replaces the client's on its shard, an unknown one
//! from a lost commit answer included), so a client that keeps the cookie
//! reads its writes on every shard, and one failed commit does not pin a
//! shard's reads to its primary for the cookie's lifetime.
//!
//! The welcome job lives on its user's shard: it is enqueued in the
//! insert's shard transaction, and each shard has its own worker.
//!
//! `GET /users/{id}` reads through the users cache of
//! `users_shards_cache.rs` (hot ids spread over their shard's replicas);
//! writes and the welcome worker invalidate it at their commit position,
//! each shard's change feed (unless `--no-change-feed`) does for every
//! other writer, and a slot move for the slot's entries.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, COOKIE, HeaderName, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tower::ServiceExt;

use super::users::{self, BoxError, User, WelcomeJob};
use super::users_app::{self, NameJson};
use super::users_shards_cache::{self, MovedSlots, ShardCaches, ShardUserRead};
use super::users_shards_moves;
use super::users_shards_views;
use tower_scale::ids::IdGenerator;
use tower_scale::pg::{Cluster, Consistency, ConsistencyToken, NodeConfig, TokenCodec};
use tower_scale::queue::{NewJob, Queue, QueueError, Worker, WorkerHandle};
use tower_scale::shard::{
    ShardConsistency, ShardError, ShardedCluster, ShardedToken, ShardedTokenCodec, shard_id,
};
use tower_scale::testing::LocalCluster;

/// The token's cookie and header: the single-cluster service's names.
pub const COOKIE_NAME: &str = "tower_scale_token";
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-consistency-token");
/// How many token values a request may present before the rest are ignored.
const MAX_TOKEN_CANDIDATES: usize = 8;
/// Every request's database work finishes within this, or answers 503.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// `GET /users` without `limit`, and the most it takes.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;

/// Everything the sharded service runs on.
pub struct ShardedBackend {
    /// The sessions holding this instance's `--instance-id`, one per
    /// shard (see `claim_instance_id`); the claim goes with them. First:
    /// fields drop in order, and the servers below must outlive them.
    pub claim: Vec<tokio_postgres::Client>,
    /// Our own clusters with `--shards N`; stopped on drop.
    pub locals: Vec<LocalCluster>,
    pub cluster: ShardedCluster,
    pub codec: ShardedTokenCodec,
    /// The cookie's `Max-Age` (the codec's token lifetime).
    pub lifetime: Duration,
    pub ids: IdGenerator,
    /// Each shard's `welcome` queue, in the shards' order.
    pub queues: Vec<(Arc<str>, Queue)>,
    /// The users caches, one per shard.
    pub users: Arc<ShardCaches>,
    /// Each shard's change feed (none with `--no-change-feed`, or where a
    /// shard cannot run one: a warning said why).
    pub feeds: Vec<(Arc<str>, tower_scale::pg::feed::ChangeFeed)>,
}

/// One shard's nodes, before connecting.
struct ShardNodes {
    name: String,
    primary: NodeConfig,
    /// The primary's connection settings (for the instance id's claim).
    primary_config: tokio_postgres::Config,
    replicas: Vec<NodeConfig>,
}

/// The advisory lock key of instance id `id` (`tsuser` and the id).
fn claim_key(id: u16) -> i64 {
    0x7473_7573_6572_0000 | i64::from(id)
}

/// Claims `--instance-id` for this process on one shard: a session
/// advisory lock on its primary, held for the process's life (the
/// returned client). Another instance holding it (two instances given one
/// id would make the same ids) refuses the start. The session asks the
/// server to probe the connection every few seconds, so a claim whose
/// process died with its host frees within about 25 s (a restart in
/// between is refused: retry it). The caller claims on every shard: an
/// instance configured with one shard more still meets the claims of the
/// others on the shards they share.
async fn claim_instance_id(
    primary: &tokio_postgres::Config,
    shard: &str,
    id: u16,
) -> Result<tokio_postgres::Client, BoxError> {
    let connect = primary.connect(tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| {
            format!("claiming --instance-id {id} on {shard}: no connection within 5 s")
        })??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!(
                "axum_users: warning: the claim of --instance-id {id} is lost ({e}): \
                 another instance may take the id (an insert refused for a taken id retries)"
            );
        }
    });
    let claimed = tokio::time::timeout(Duration::from_secs(5), async {
        client
            .batch_execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                 SET tcp_keepalives_count = 3",
            )
            .await?;
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&claim_key(id)])
            .await?;
        row.try_get::<_, bool>(0)
    })
    .await
    .map_err(|_| format!("claiming --instance-id {id} on {shard}: no answer within 5 s"))??;
    if !claimed {
        return Err(format!(
            "--instance-id {id} is in use by another instance on these shards \
             (each instance sharing shards needs its own id; a stopped one frees it \
             within about 25 s)"
        )
        .into());
    }
    Ok(client)
}

/// Starts (`--shards N`) or connects to (`--shard ...`) the shards, makes
/// the schema and the welcome queues on each, and the id generator
/// (resuming after the largest id this instance made before).
pub async fn backend(args: &users::Args) -> Result<ShardedBackend, BoxError> {
    let s = &args.sharding;
    let mut locals = Vec::new();
    let mut nodes = Vec::new();
    if let Some(n) = s.local {
        // All at once: each start is mostly waiting on initdb and a base
        // backup.
        let starts: Vec<_> = (0..n)
            .map(|_| tokio::task::spawn_blocking(|| LocalCluster::start(1)))
            .collect();
        for start in starts {
            locals.push(start.await??);
        }
        for (i, l) in locals.iter().enumerate() {
            nodes.push(ShardNodes {
                name: format!("shard-{}", i + 1),
                primary: NodeConfig::new(l.primary().config()),
                primary_config: l.primary().config(),
                replicas: l
                    .replicas()
                    .iter()
                    .map(|r| NodeConfig::new(r.config()))
                    .collect(),
            });
        }
    } else {
        for flag in &s.given {
            nodes.push(ShardNodes {
                name: flag.name.clone(),
                primary: NodeConfig::from_url(&flag.primary)?,
                primary_config: flag
                    .primary
                    .parse()
                    .map_err(|e| format!("--shard {}: {e}", flag.name))?,
                replicas: flag
                    .replicas
                    .iter()
                    .map(|r| NodeConfig::from_url(r))
                    .collect::<Result<_, _>>()?,
            });
        }
    }
    // The instance id first, on every shard: nothing is set up under a
    // taken one.
    let mut claim = Vec::with_capacity(nodes.len());
    for shard in &nodes {
        claim.push(claim_instance_id(&shard.primary_config, &shard.name, s.instance_id).await?);
    }
    // Entries of a slot that moves go when this instance learns of it.
    let moved = MovedSlots::default();
    // `users` moves with its slots (by `id`); the queue's and the
    // library's own tables (`tower_scale_*`) stay.
    let mut builder = ShardedCluster::builder()
        .table("users", "id")
        .read_all_timeout(Duration::from_secs(2))
        .on_slots_moved(moved.hook());
    let mut queues = Vec::new();
    for shard in nodes {
        let mut b = Cluster::builder()
            .primary(shard.primary)
            .read_timeout(Duration::from_secs(2));
        for r in shard.replicas {
            b = b.replica(r);
        }
        let cluster = b.build().await?;
        let db = cluster.db();
        // Ids come from the generator: no sequence.
        db.execute(
            "CREATE TABLE IF NOT EXISTS users (id bigint primary key, name text not null,
                welcomed_at timestamptz)",
            &[],
        )
        .await?;
        db.execute(
            "ALTER TABLE users ADD COLUMN IF NOT EXISTS welcomed_at timestamptz",
            &[],
        )
        .await?;
        let queue = Queue::builder(db, users::WELCOME_QUEUE).build().await?;
        queues.push((Arc::<str>::from(shard.name.as_str()), queue));
        builder = builder.shard(shard.name, cluster);
    }
    let cluster = builder.build().await?;
    let key = match &args.token_key {
        Some(k) => k.clone(),
        None => {
            let mut k = vec![0u8; 32];
            getrandom::fill(&mut k).map_err(|e| format!("random key: {e}"))?;
            k
        }
    };
    let codec = TokenCodec::new(&key, cluster.identity())?;
    let lifetime = codec.lifetime();
    let ids = IdGenerator::new(u64::from(s.instance_id))?;
    // A restart on a clock behind the ids made before must not repeat
    // them: resume after the largest one of this instance.
    let mine = cluster
        .read_all(
            &ShardConsistency::Strong,
            "SELECT coalesce(max(id), 0)::int8 FROM users WHERE ((id >> 12) & 1023) = $1",
            &[&i64::from(s.instance_id)],
        )
        .await?;
    let last = mine
        .rows()
        .filter_map(|r| r.try_get::<_, i64>(0).ok())
        .max()
        .unwrap_or(0);
    let ids = if last > 0 {
        ids.resuming_after(last)
    } else {
        ids
    };
    let users = Arc::new(users_shards_cache::build(&cluster, &moved)?);
    let feeds = match args.no_change_feed {
        true => Vec::new(),
        false => change_feeds(&cluster, &users).await,
    };
    Ok(ShardedBackend {
        locals,
        cluster,
        codec: ShardedTokenCodec::new(codec),
        lifetime,
        ids,
        queues,
        users,
        claim,
        feeds,
    })
}

/// One change feed per shard for the users table, each feeding its
/// shard's cache: a row changed by any writer invalidates `user:{id}`,
/// `TRUNCATE` or a schema change every entry (`users:*`), at that shard's
/// commit position. Shards that cannot run one get a warning, and their
/// entries live until their TTL.
async fn change_feeds(
    cluster: &ShardedCluster,
    users: &ShardCaches,
) -> Vec<(Arc<str>, tower_scale::pg::feed::ChangeFeed)> {
    use tower_scale::cache::Tag;
    use tower_scale::pg::feed::Change;
    let started = cluster
        .change_feeds(|shard, mut feed| {
            if let Some(invalidator) = users.invalidator(shard) {
                feed = feed.invalidates(invalidator.clone());
            }
            feed.tables(["users"])
                .publication("tower_scale_users")
                .slot("tower_scale_users")
                .map_tags(|change| match change {
                    Change::Row {
                        table: "users",
                        key,
                    } => vec![Tag::from(format!("user:{key}"))],
                    Change::Whole { table: "users" } => vec![Tag::from(users::USERS_WHOLE)],
                    _ => Vec::new(),
                })
        })
        .await;
    match started {
        Ok(feeds) => feeds,
        Err(e) => {
            eprintln!("axum_users: warning: running without the change feeds: {e}");
            Vec::new()
        }
    }
}

/// One welcome worker per shard, `slots` jobs at a time each (none for 0).
pub fn start_workers(
    backend: &ShardedBackend,
    slots: usize,
) -> Result<Vec<WorkerHandle>, BoxError> {
    if slots == 0 {
        return Ok(Vec::new());
    }
    let mut handles = Vec::new();
    for (shard, queue) in &backend.queues {
        let invalidator = backend
            .users
            .invalidator(shard)
            .ok_or_else(|| format!("no users cache for {shard}"))?;
        let welcome = users_app::Welcome::with_users(invalidator.clone());
        let worker = Worker::new(queue.clone(), welcome);
        handles.push(worker.concurrency(slots).start()?);
    }
    Ok(handles)
}

pub(crate) struct App {
    pub(crate) cluster: ShardedCluster,
    pub(crate) codec: ShardedTokenCodec,
    pub(crate) lifetime: Duration,
    pub(crate) ids: IdGenerator,
    pub(crate) queues: Vec<(Arc<str>, Queue)>,
    pub(crate) users: Arc<ShardCaches>,
    /// The moves started through `POST /admin/shards/move`.
    pub(crate) moves: users_shards_moves::Moves,
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub(crate) admin_token: Option<String>,
}

pub(crate) type AppState = Arc<App>;

/// The sharded service's router (`/admin/*` only with an admin token).
pub fn router(
    backend: &ShardedBackend,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    admin_token: Option<String>,
) -> Router {
    let with_admin = admin_token.is_some();
    let state = Arc::new(App {
        cluster: backend.cluster.clone(),
        codec: backend.codec.clone(),
        lifetime: backend.lifetime,
        ids: backend.ids.clone(),
        queues: backend.queues.clone(),
        users: Arc::clone(&backend.users),
        moves: users_shards_moves::Moves::default(),
        metrics,
        admin_token,
    });
    let mut router = Router::new()
        .route("/users", get(users_shards_views::list).post(create))
        .route("/users/{id}", get(read).put(update).delete(delete))
        .route("/metrics", get(metrics_text));
    if with_admin {
        router = router
            .route("/admin/shards", get(users_shards_views::admin_shards))
            .route(
                "/admin/shards/move",
                axum::routing::post(users_shards_moves::start),
            )
            .route("/admin/shards/moves/{id}", get(users_shards_moves::status));
    }
    router.fallback(users_app::fallback).with_state(state)
}

/// Cookie values of `name` on one `Cookie` line (quotes stripped), pair
/// by pair on the raw bytes: one cookie with a non-ASCII value does not
/// hide the others (as `DbLayer` reads them).
fn cookie_values<'a>(line: &'a HeaderValue, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    line.as_bytes()
        .split(|&b| b == b';')
        .filter_map(move |pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.is_ascii())?;
            let (k, v) = pair.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim() == name).then_some(v)
        })
}

impl App {
    /// Every valid token the request presents (cookie or header), merged:
    /// the newest position of each shard. At most
    /// [`MAX_TOKEN_CANDIDATES`] values are decoded.
    fn token_of(&self, headers: &HeaderMap) -> Option<ShardedToken> {
        let mut merged: Option<ShardedToken> = None;
        let mut candidates = Vec::new();
        for line in headers.get_all(COOKIE) {
            candidates.extend(cookie_values(line, COOKIE_NAME));
        }
        candidates.extend(
            headers
                .get_all(TOKEN_HEADER)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        for text in candidates.into_iter().take(MAX_TOKEN_CANDIDATES) {
            if let Some(t) = self.codec.decode(text) {
                match &mut merged {
                    Some(m) => m.merge(&t),
                    None => merged = Some(t),
                }
            }
        }
        merged
    }

    pub(crate) fn consistency(&self, headers: &HeaderMap) -> ShardConsistency {
        match self.token_of(headers) {
            Some(t) => ShardConsistency::ReadYourWrites(t),
            None => ShardConsistency::Any,
        }
    }

    /// The response carries the request's token followed by `written`
    /// (its positions replace the request's on the shards it lists, an
    /// unknown one included), in the cookie and the header (as `DbLayer`
    /// writes them).
    fn with_token(
        &self,
        mut res: Response,
        headers: &HeaderMap,
        written: &ShardedToken,
    ) -> Response {
        let mut token = self.token_of(headers).unwrap_or_default();
        token.followed_by(written);
        let encoded = self.codec.encode(&token);
        let cookie = format!(
            "{COOKIE_NAME}={encoded}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}",
            self.lifetime.as_secs()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(SET_COOKIE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            res.headers_mut().insert(TOKEN_HEADER, v);
        }
        res
    }

    /// After a write to user `id` on `shard` answered with `token`: the
    /// cached reads of it go, at that shard's commit position (everything
    /// now when the position is unknown).
    fn invalidate_user(&self, id: i64, shard: &str, token: &ShardedToken) {
        let version = match token.for_shard(shard_id(shard)) {
            Consistency::ReadYourWrites(t) => t.version(),
            _ => None,
        };
        match (self.users.invalidator(shard), version) {
            (Some(invalidator), Some(_)) => {
                invalidator.invalidate_tag_at(format!("user:{id}"), version);
            }
            _ => self.users.forget(id),
        }
    }

    /// `sql` on user `id`'s shard within [`REQUEST_DEADLINE`]. A failure
    /// that may have committed (an error after the commit was sent, or no
    /// answer in time) drops the id's cached reads now and answers with a
    /// token that sends the client's reads of that shard to its primary.
    async fn write_user(
        &self,
        headers: &HeaderMap,
        id: i64,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tower_scale::shard::ShardWritten<Vec<tokio_postgres::Row>>, Response> {
        let (res, maybe) = match tokio::time::timeout(
            REQUEST_DEADLINE,
            self.cluster.write(&id, sql, params),
        )
        .await
        {
            Ok(Ok(w)) => return Ok(w),
            Ok(Err(e)) => {
                let maybe = e.may_have_committed();
                (shard_error(e), maybe)
            }
            Err(_) => (unavailable(), true),
        };
        if !maybe {
            return Err(res);
        }
        self.users.forget(id);
        match self.cluster.shard_for(&id).and_then(|shard| {
            self.cluster
                .token_for(&shard, ConsistencyToken::unknown())
                .ok()
        }) {
            Some(unknown) => Err(self.with_token(res, headers, &unknown)),
            None => Err(res),
        }
    }

    /// `NAME/node` for `x-served-by`.
    fn served_by(shard: &str, node: &str) -> Option<HeaderValue> {
        HeaderValue::from_str(&format!("{shard}/{node}")).ok()
    }

    /// `NAME/primary` (the name of the shard's primary node).
    fn primary_of(&self, shard: &str) -> Option<HeaderValue> {
        let node = self
            .cluster
            .shard(shard)
            .ok()
            .and_then(|c| c.db().primary_name())
            .unwrap_or_else(|| Arc::from("primary"));
        Self::served_by(shard, &node)
    }
}

fn shard_error(e: ShardError) -> Response {
    let unavailable = match &e {
        ShardError::Db { source, .. } => users::unavailable(source),
        ShardError::Combine(_) => false,
        _ => true,
    };
    if unavailable {
        eprintln!("database unavailable: {e}");
        users_app::error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    } else {
        eprintln!("query failed: {e}");
        users_app::error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
    }
}

/// `work` within [`REQUEST_DEADLINE`]; past it, 503.
pub(crate) async fn within<T>(
    work: impl Future<Output = Result<T, ShardError>>,
) -> Result<T, Response> {
    within_at(tokio::time::Instant::now() + REQUEST_DEADLINE, work).await
}

/// `work` by `deadline` (one deadline over several steps); past it, 503.
async fn within_at<T>(
    deadline: tokio::time::Instant,
    work: impl Future<Output = Result<T, ShardError>>,
) -> Result<T, Response> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(r) => r.map_err(shard_error),
        Err(_) => Err(unavailable()),
    }
}

pub(crate) fn row_error(e: tokio_postgres::Error) -> Response {
    eprintln!("query failed: {e}");
    users_app::error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
}

fn bad_id() -> Response {
    users_app::error(StatusCode::BAD_REQUEST, "the id must be an integer")
}

/// `POST /users`: a new id, the insert and its welcome job in one
/// transaction on the id's shard.
async fn create(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NameJson>, JsonRejection>,
) -> Response {
    let name = match users_app::parse_name(body) {
        Ok(n) => n,
        Err(message) => return users_app::error(StatusCode::BAD_REQUEST, message),
    };
    // An id taken already (the instance's claim of its `--instance-id`
    // lost to a network failure and the id taken by another instance, in
    // the same millisecond) gets a fresh one: the insert refused it,
    // nothing was written.
    let mut attempt = 0;
    let outcome = loop {
        let id = app.ids.next_id();
        match insert_and_enqueue(&app, id, &name).await {
            Err((_, Taken::Id)) if attempt < 2 => attempt += 1,
            other => break other.map_err(|(res, taken)| (res, id, taken)),
        }
    };
    match outcome.map_err(|(res, id, taken)| (res, taken.token().map(|t| (id, t)))) {
        Ok((user, shard, token)) => {
            // A 404 for this id may be cached from before it existed.
            app.invalidate_user(user.id, &shard, &token);
            let res = (StatusCode::CREATED, users_app::user_response(&user)).into_response();
            let res = users_app::served_by(res, app.primary_of(&shard));
            app.with_token(res, &headers, &token)
        }
        Err((res, Some((id, unknown)))) => {
            app.users.forget(id);
            app.with_token(res, &headers, &unknown)
        }
        Err((res, None)) => res,
    }
}

/// The insert, the job and the commit; on a failure, the response and,
/// when the commit may have happened, a token that sends the client's
/// next reads of that shard to its primary.
/// What else a failed insert says: nothing, that its id was taken (try
/// another), or a token for a commit that may have happened.
enum Taken {
    No,
    Id,
    Maybe(ShardedToken),
}

impl Taken {
    fn token(self) -> Option<ShardedToken> {
        match self {
            Self::Maybe(token) => Some(token),
            Self::No | Self::Id => None,
        }
    }
}

async fn insert_and_enqueue(
    app: &App,
    id: i64,
    name: &str,
) -> Result<(User, Arc<str>, ShardedToken), (Response, Taken)> {
    let fail = |r: Response| (r, Taken::No);
    // One deadline for the whole request, not one per step.
    let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
    let tx = within_at(deadline, app.cluster.transaction(&id))
        .await
        .map_err(fail)?;
    let shard = Arc::clone(tx.shard());
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &name];
    let insert = tx.query_one(
        "INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id, name, welcomed_at IS NOT NULL",
        &params,
    );
    let row = match tokio::time::timeout_at(deadline, insert).await {
        Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            return Err((users_app::db_error(e), Taken::Id));
        }
        Ok(r) => r.map_err(|e| fail(users_app::db_error(e)))?,
        Err(_) => return Err(fail(unavailable())),
    };
    let user = User::from_row(&row).map_err(|e| fail(row_error(e)))?;
    let queue = app.queues.iter().find(|(n, _)| *n == shard).map(|(_, q)| q);
    let Some(queue) = queue else {
        eprintln!("no welcome queue for {shard}");
        return Err(fail(users_app::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "query failed",
        )));
    };
    let job = NewJob::new(&WelcomeJob { user: id }).map_err(|e| fail(queue_error(e)))?;
    match tokio::time::timeout_at(deadline, queue.enqueue_in(&tx, job)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(fail(queue_error(e))),
        Err(_) => return Err(fail(unavailable())),
    }
    match tokio::time::timeout_at(deadline, tx.commit()).await {
        Ok(Ok(token)) => Ok((user, shard, token)),
        Ok(Err(e)) => {
            // The client's next read must not miss it if it did commit.
            let unknown = e
                .may_have_committed()
                .then(|| {
                    app.cluster
                        .token_for(&shard, ConsistencyToken::unknown())
                        .ok()
                })
                .flatten();
            Err((shard_error(e), unknown.map_or(Taken::No, Taken::Maybe)))
        }
        Err(_) => {
            let unknown = app
                .cluster
                .token_for(&shard, ConsistencyToken::unknown())
                .ok();
            Err((unavailable(), unknown.map_or(Taken::No, Taken::Maybe)))
        }
    }
}

fn unavailable() -> Response {
    eprintln!("database unavailable: no answer within {REQUEST_DEADLINE:?}");
    users_app::error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::Db(e) => users_app::db_error(e),
        e => {
            eprintln!("enqueueing the welcome job failed: {e}");
            users_app::error(StatusCode::INTERNAL_SERVER_ERROR, "query failed")
        }
    }
}

/// `GET /users/{id}` on the id's shard, at the request's token.
async fn read(
    State(app): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return bad_id();
    };
    let read = ShardUserRead {
        id,
        consistency: app.consistency(&headers),
        hot: false,
    };
    // The cache of the id's shard; none while its slot has no owner.
    let user = match app.users.for_id(id) {
        Some(cache) => within(cache.clone().oneshot(read)).await,
        None => within(app.users.uncached().oneshot(read)).await,
    };
    let user = match user {
        Ok(user) => user,
        Err(res) => return res,
    };
    // A hit reads the flag without writing it.
    let by = if user.taken.load(Ordering::Acquire) || user.taken.swap(true, Ordering::SeqCst) {
        Some(HeaderValue::from_static("cache"))
    } else {
        HeaderValue::from_str(&user.served_by).ok()
    };
    let mut res = match &user.row {
        Some(u) => users_app::user_response(u),
        None => users_app::error(StatusCode::NOT_FOUND, "not found"),
    };
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    users_app::served_by(res, by)
}

/// `PUT /users/{id}` on the id's shard's primary.
async fn update(
    State(app): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<NameJson>, JsonRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return bad_id();
    };
    let name = match users_app::parse_name(body) {
        Ok(n) => n,
        Err(message) => return users_app::error(StatusCode::BAD_REQUEST, message),
    };
    let sql =
        "UPDATE users SET name = $1 WHERE id = $2 RETURNING id, name, welcomed_at IS NOT NULL";
    let w = match app.write_user(&headers, id, sql, &[&name, &id]).await {
        Ok(w) => w,
        Err(res) => return res,
    };
    app.invalidate_user(id, &w.shard, &w.token);
    let res = match w.value.first().map(User::from_row) {
        Some(Ok(u)) => users_app::user_response(&u),
        Some(Err(e)) => return row_error(e),
        None => users_app::error(StatusCode::NOT_FOUND, "not found"),
    };
    let res = users_app::served_by(res, app.primary_of(&w.shard));
    app.with_token(res, &headers, &w.token)
}

/// `DELETE /users/{id}` on the id's shard's primary.
async fn delete(
    State(app): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return bad_id();
    };
    let sql = "DELETE FROM users WHERE id = $1 RETURNING id";
    let w = match app.write_user(&headers, id, sql, &[&id]).await {
        Ok(w) => w,
        Err(res) => return res,
    };
    app.invalidate_user(id, &w.shard, &w.token);
    let res = if w.value.is_empty() {
        users_app::error(StatusCode::NOT_FOUND, "not found")
    } else {
        StatusCode::NO_CONTENT.into_response()
    };
    let res = users_app::served_by(res, app.primary_of(&w.shard));
    app.with_token(res, &headers, &w.token)
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    app.metrics.render().into_response()
}
