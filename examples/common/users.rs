//! What the users examples (`axum_users`, `tonic_users`) share: flags, the
//! cluster (given nodes or a LocalCluster), the token codec, and the user
//! cache whose entries are stamped with the LSN their data reflects.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tower_scale::cache::{
    Cache, CacheLayer, CachePolicy, Invalidator, MokaStore, QuickStore, Storable, Windows,
};
use tower_scale::pg::{Cluster, Consistency, Db, DbError, NodeConfig, TokenCodec};
use tower_scale::queue::Queue;
use tower_scale::testing::LocalCluster;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often the users services drain the Prometheus recorder's histograms.
pub const METRICS_UPKEEP: Duration = Duration::from_secs(1);

/// Upper bounds (seconds) of the histogram buckets: timings from 100 µs to 5 s.
pub const METRICS_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 5.0,
];

/// Installs the global Prometheus recorder and keeps what it holds bounded.
///
/// - `install_recorder` starts no upkeep: every histogram sample (one per
///   pool checkout, `tower_scale_db_pool_wait_seconds`, so one or more per
///   write) stays in the recorder's sample buffer until `/metrics` is
///   scraped. Under writes that no one scrapes, that buffer grew by about
///   8 bytes a sample without end (issue 25). A thread drains it every
///   [`METRICS_UPKEEP`]. The drained blocks are freed through
///   crossbeam-epoch, which keeps them in the draining thread's bag until
///   64 drains have piled up (tens of seconds of samples); the thread
///   flushes its bag after each drain, so a few intervals' samples at most
///   are held.
/// - Histograms are kept as [`METRICS_BUCKETS`] (a fixed array of counts
///   per series) rather than the default summaries, whose sketches grow
///   with the spread of the values seen, up to 256 KiB each and three per
///   series.
///
/// The recorder is global and lives as long as the process, and so does
/// the thread.
pub fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, BoxError> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&METRICS_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP);
                upkeep.run_upkeep();
                crossbeam_epoch::pin().flush();
            }
        })?;
    Ok(handle)
}

pub struct Args {
    pub listen: SocketAddr,
    pub primary: Option<String>,
    pub replicas: Vec<String>,
    pub token_key: Option<Vec<u8>>,
    pub redis: Option<String>,
    /// `--http-cache` (axum_users): an HTTP cache outside `DbLayer`.
    pub http_cache: bool,
    /// `--no-change-feed` (axum_users): no change feed from the primary.
    pub no_change_feed: bool,
    /// `--workers N` (axum_users): the welcome worker's concurrency, `None`
    /// for the default ([`DEFAULT_WORKERS`]); 0 runs no worker.
    pub workers: Option<usize>,
    /// `--shards`, `--shard`, `--instance-id`, `--admin-token`
    /// (axum_users): the service on several shards.
    pub sharding: Sharding,
}

/// The sharding flags of `axum_users` (all empty: one cluster, as before).
#[derive(Debug, Clone, Default)]
pub struct Sharding {
    /// `--shards N`: N LocalClusters, one replica each, named `shard-1`...
    pub local: Option<usize>,
    /// `--shard NAME=PRIMARY_URL[,REPLICA_URL...]`, in order.
    pub given: Vec<ShardFlag>,
    /// `--instance-id N` (default 0): the id generator's instance.
    pub instance_id: u16,
    /// `--admin-token TOKEN`: `/admin/*` answers, behind this bearer token.
    pub admin_token: Option<String>,
}

impl Sharding {
    /// Whether the service runs on shards.
    pub fn enabled(&self) -> bool {
        self.local.is_some() || !self.given.is_empty()
    }
}

/// One `--shard NAME=PRIMARY_URL[,REPLICA_URL...]`.
#[derive(Debug, Clone)]
pub struct ShardFlag {
    pub name: String,
    pub primary: String,
    pub replicas: Vec<String>,
}

/// The most `--shards` starts.
pub const MAX_LOCAL_SHARDS: usize = 16;

fn parse_shard_flag(text: &str) -> Result<ShardFlag, String> {
    let bad = || "--shard must be NAME=PRIMARY_URL[,REPLICA_URL...]".to_string();
    let (name, urls) = text.split_once('=').ok_or_else(bad)?;
    let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if name.is_empty() || name.len() > 64 || !name.bytes().all(valid) {
        return Err("--shard: the name must be 1 to 64 letters, digits, '-' or '_'".into());
    }
    let mut urls = urls.split(',').map(str::to_string);
    let primary = urls.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let replicas: Vec<String> = urls.collect();
    if replicas.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(ShardFlag {
        name: name.to_string(),
        primary,
        replicas,
    })
}

/// The welcome worker's concurrency without `--workers`.
pub const DEFAULT_WORKERS: usize = 2;
/// The most `--workers` accepts (each slot can hold a pooled connection).
pub const MAX_WORKERS: usize = 256;

impl Args {
    /// The welcome worker's concurrency (0: no worker).
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or(DEFAULT_WORKERS)
    }
}

impl Args {
    /// The service on `local`'s nodes, in-process (the tour, the load
    /// report, the soak test): any port, a random token key, no Redis, no
    /// HTTP cache.
    pub fn in_process(local: &LocalCluster) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            primary: Some(local.primary().url()),
            replicas: local.replicas().iter().map(|r| r.url()).collect(),
            token_key: None,
            redis: None,
            http_cache: false,
            no_change_feed: false,
            workers: None,
            sharding: Sharding::default(),
        }
    }
}

impl Args {
    /// `--shards n` in-process (the tour): any port, a random token key.
    pub fn in_process_sharded(n: usize) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            primary: None,
            replicas: Vec::new(),
            token_key: None,
            redis: None,
            http_cache: false,
            no_change_feed: true,
            workers: None,
            sharding: Sharding {
                local: Some(n),
                ..Sharding::default()
            },
        }
    }
}

pub fn usage(name: &str) -> String {
    let http_cache = if name == "axum_users" {
        " [--http-cache] [--no-change-feed] [--workers N]\n       [--shards N | --shard NAME=PRIMARY_URL[,REPLICA_URL...] ...] [--instance-id N] [--admin-token TOKEN]"
    } else {
        ""
    };
    format!(
        "usage: {name} --listen IP:PORT [--primary URL --replica URL ...] [--token-key HEX64] [--redis URL]{http_cache}"
    )
}

pub fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut primary, mut replicas, mut token_key) = (None, None, Vec::new(), None);
    let mut redis = None;
    let mut http_cache = false;
    let mut no_change_feed = false;
    let mut workers = None;
    let mut sharding = Sharding::default();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--primary" => primary = Some(value()?),
            "--redis" => {
                let url = value()?;
                if !url.starts_with("redis://") {
                    return Err("--redis must be a redis:// URL".into());
                }
                redis = Some(url);
            }
            "--replica" => replicas.push(value()?),
            "--http-cache" => http_cache = true,
            "--no-change-feed" => no_change_feed = true,
            "--workers" => {
                let n = value()?
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= MAX_WORKERS)
                    .ok_or_else(|| format!("--workers must be 0 to {MAX_WORKERS}"))?;
                workers = Some(n);
            }
            "--shards" => {
                let n = value()?
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LOCAL_SHARDS).contains(n))
                    .ok_or_else(|| format!("--shards must be 1 to {MAX_LOCAL_SHARDS}"))?;
                sharding.local = Some(n);
            }
            "--shard" => {
                let flag = parse_shard_flag(&value()?)?;
                if sharding.given.iter().any(|s| s.name == flag.name) {
                    return Err(format!("--shard {:?} given twice", flag.name));
                }
                sharding.given.push(flag);
            }
            "--instance-id" => {
                let n = value()?
                    .parse::<u16>()
                    .ok()
                    .filter(|n| *n <= 1023)
                    .ok_or("--instance-id must be 0 to 1023")?;
                sharding.instance_id = n;
            }
            "--admin-token" => {
                let token = value()?;
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err("--admin-token must be printable ASCII without spaces".into());
                }
                sharding.admin_token = Some(token);
            }
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
    if sharding.local.is_some() && (!sharding.given.is_empty() || primary.is_some()) {
        return Err("--shards cannot be given with --shard or --primary".into());
    }
    if !sharding.given.is_empty() && primary.is_some() {
        return Err("--shard cannot be given with --primary".into());
    }
    if !sharding.enabled() && (sharding.instance_id != 0 || sharding.admin_token.is_some()) {
        return Err("--instance-id and --admin-token need --shards or --shard".into());
    }
    if sharding.enabled() && (http_cache || redis.is_some()) {
        return Err("--http-cache and --redis do not work with shards yet".into());
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        primary,
        replicas,
        token_key,
        redis,
        http_cache,
        no_change_feed,
        workers,
        sharding,
    })
}

/// Parses the flags or exits with status 2 and the usage on stderr.
pub fn args_or_exit(name: &str) -> Args {
    let parsed = parse_args(std::env::args().skip(1)).and_then(|a| {
        if a.http_cache && name != "axum_users" {
            return Err("--http-cache is a flag of axum_users only".into());
        }
        if a.no_change_feed && name != "axum_users" {
            return Err("--no-change-feed is a flag of axum_users only".into());
        }
        if a.workers.is_some() && name != "axum_users" {
            return Err("--workers is a flag of axum_users only".into());
        }
        let s = &a.sharding;
        if (s.enabled() || s.instance_id != 0 || s.admin_token.is_some()) && name != "axum_users" {
            return Err("the sharding flags are flags of axum_users only".into());
        }
        Ok(a)
    });
    match parsed {
        Ok(a) => a,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{name}: {message}");
            }
            eprintln!("{}", usage(name));
            std::process::exit(2);
        }
    }
}

/// A user as the service returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    /// The welcome job has run (`welcomed_at` is set).
    pub welcomed: bool,
}

impl User {
    /// From a row selected as `id, name, welcomed_at IS NOT NULL` (what
    /// every statement of the service returning a user selects).
    pub fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            welcomed: row.try_get(2)?,
        })
    }
}

/// A cached read of one user: the row (or none) and who read it. The
/// service's rows are [`User`]s; `(id, name)` rows are for caches over a
/// stand-in loader (the soak test's), which need nothing more.
pub struct UserRow<U = (i64, String)> {
    pub row: Option<U>,
    pub served_by: Arc<str>,
    pub lsn: u64,
    /// The first request to take this result made the query; later ones
    /// (hits and coalesced waiters) were served by the cache.
    pub taken: AtomicBool,
}

/// What the cache sees: the id and the request's consistency.
pub struct UserRead {
    pub id: i64,
    pub consistency: Consistency,
}

/// The tag every user entry carries besides `user:{id}`.
pub const USERS_WHOLE: &str = "users:*";

/// Keyed by id, tagged `user:{id}`, stamped with the read's LSN; a request
/// with a token skips entries stamped below it.
pub struct UserPolicy;

impl<U: Send + Sync + 'static> CachePolicy<UserRead, Arc<UserRow<U>>> for UserPolicy {
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
    fn storable(&self, id: &i64, row: &Arc<UserRow<U>>, d: &Windows) -> Option<Storable> {
        // `users:*`: what the change feed invalidates when every row may
        // have changed (TRUNCATE, a schema change).
        Some(
            Storable::new(*d)
                .tag(format!("user:{id}"))
                .tag(USERS_WHOLE)
                .version(row.lsn),
        )
    }
}

/// A loader behind a box: what tests plug in (any service will do).
pub type Loader = tower::util::BoxCloneSyncService<UserRead, Arc<UserRow>, DbError>;
/// The users cache over `L`: [`DbLoader`] in a [`Backend`], [`Loader`] for
/// stand-ins.
pub type UserCache<L = Loader, St = MokaStore<i64, Arc<UserRow>, DbError>> =
    Cache<L, UserPolicy, St>;
/// The users cache a [`Backend`] serves from: on quick_cache (S3-FIFO).
/// In the profile of a cached `GET /users/{id}`, moka's hit (its hash,
/// its read log through a channel, its clock) was about 720 instructions
/// of the request's 13,600, the largest single cost after axum and the
/// allocator; quick_cache's is a fraction of that.
pub type BackendUserCache = UserCache<DbLoader, QuickStore<i64, Arc<UserRow<User>>, DbError>>;

/// The loader the cache calls on a miss: one routed read. A handler clones
/// the cache (and so this) on every request, hits included: cloning it is
/// two reference counts, where a boxed service allocates.
#[derive(Clone)]
pub struct DbLoader {
    db: Db,
}

impl tower::Service<UserRead> for DbLoader {
    type Response = Arc<UserRow<User>>;
    type Error = DbError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Arc<UserRow<User>>, DbError>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), DbError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: UserRead) -> Self::Future {
        let db = self.db.clone();
        Box::pin(async move {
            let r = db.read_opt(req.consistency, USER_BY_ID, &[&req.id]).await?;
            let row = r.value.as_ref().map(User::from_row).transpose();
            Ok(Arc::new(UserRow {
                row: row.map_err(|e| row_shape(&r.served_by, e))?,
                served_by: r.served_by,
                lsn: r.lsn.0,
                taken: AtomicBool::new(false),
            }))
        })
    }
}

/// `SELECT` of one user by id (`$1`), as [`User::from_row`] reads it.
pub const USER_BY_ID: &str = "SELECT id, name, welcomed_at IS NOT NULL FROM users WHERE id = $1";

/// A row that is not the shape selected (the table changed under the
/// service): a failed query, as the driver reports a type mismatch.
pub fn row_shape(node: &Arc<str>, e: tokio_postgres::Error) -> DbError {
    DbError::Query {
        node: Arc::clone(node),
        source: Arc::new(e),
    }
}

/// Everything a users service runs on.
pub struct Backend {
    /// Our own cluster when no `--primary` was given; stopped on drop.
    pub local: Option<LocalCluster>,
    pub cluster: Cluster,
    pub db: Db,
    pub codec: TokenCodec,
    pub users: BackendUserCache,
    pub invalidator: Invalidator<i64>,
    /// The shared tier, with `--redis`.
    pub redis: Option<Arc<tower_scale::cache::redis::RedisTier<i64, Arc<UserRow<User>>>>>,
    /// The `welcome` queue: `POST /users` enqueues a job in the insert's
    /// transaction (so, with shards, on the user's shard).
    pub welcome: Queue,
}

pub async fn backend(args: &Args) -> Result<Backend, BoxError> {
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
    // `welcomed_at` came with the welcome job: a database from before it
    // gets the column. Looked up first so that instances starting on a
    // table that has it take no ACCESS EXCLUSIVE lock.
    let has_column = db
        .read_one(
            Consistency::Strong,
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'users'::regclass
                AND attname = 'welcomed_at' AND NOT attisdropped)",
            &[],
        )
        .await?
        .value
        .try_get::<_, bool>(0)?;
    if !has_column {
        db.execute(
            "ALTER TABLE users ADD COLUMN IF NOT EXISTS welcomed_at timestamptz",
            &[],
        )
        .await?;
    }
    let welcome = Queue::builder(db.clone(), WELCOME_QUEUE).build().await?;
    let key = match &args.token_key {
        Some(k) => k.clone(),
        None => {
            let mut k = vec![0u8; 32];
            getrandom::fill(&mut k).map_err(|e| format!("random key: {e}"))?;
            k
        }
    };
    let codec = TokenCodec::new(&key, cluster.identity())?;
    let layer = CacheLayer::builder(UserPolicy)
        .name("users")
        .time_to_live(Duration::from_secs(60))
        .max_entries(100_000)
        .build_quick()?;
    let invalidator = layer.invalidator();
    let redis = match &args.redis {
        Some(url) => Some(
            tower_scale::cache::redis::builder(url.clone())
                .prefix("tower-scale-users")
                .timeout(Duration::from_millis(250))
                .attach(&layer, UserCodec)
                .await?,
        ),
        None => None,
    };
    let users: BackendUserCache = tower::Layer::layer(&layer, DbLoader { db: db.clone() });
    Ok(Backend {
        local,
        cluster,
        db,
        codec,
        users,
        invalidator,
        redis,
        welcome,
    })
}

/// The queue `POST /users` enqueues on; its payload is [`WelcomeJob`].
pub const WELCOME_QUEUE: &str = "welcome";

/// A welcome job's payload.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy)]
pub struct WelcomeJob {
    pub user: i64,
}

/// How user rows travel through Redis: the LSN, then a marker byte and the
/// row. `(id, name)` rows are marked 1 (`[id][name]`), [`User`]s 2
/// (`[id][welcomed][name]`): each kind reads only its own marker and takes
/// the other as undecodable (a miss), so instances from before `welcomed`
/// sharing a tier never read a row without it. A row that comes back from
/// Redis says it was served by `cache-l2`.
pub struct UserCodec;

/// A row kind [`UserCodec`] carries.
pub trait RowBytes: Sized + Send + Sync + 'static {
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(bytes: &[u8]) -> Option<Self>;
}

impl RowBytes for (i64, String) {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(1);
        out.extend_from_slice(&self.0.to_be_bytes());
        out.extend_from_slice(self.1.as_bytes());
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        if *bytes.first()? != 1 {
            return None;
        }
        let id = i64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?);
        Some((id, String::from_utf8(bytes.get(9..)?.to_vec()).ok()?))
    }
}

impl RowBytes for User {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(2);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(u8::from(self.welcomed));
        out.extend_from_slice(self.name.as_bytes());
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        if *bytes.first()? != 2 {
            return None;
        }
        Some(User {
            id: i64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?),
            welcomed: match *bytes.get(9)? {
                0 => false,
                1 => true,
                _ => return None,
            },
            name: String::from_utf8(bytes.get(10..)?.to_vec()).ok()?,
        })
    }
}

impl<U: RowBytes> tower_scale::cache::redis::RedisCodec<i64, Arc<UserRow<U>>> for UserCodec {
    fn encode_key(&self, key: &i64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }
    fn decode_key(&self, bytes: &[u8]) -> Option<i64> {
        Some(i64::from_be_bytes(bytes.try_into().ok()?))
    }
    fn encode(&self, row: &Arc<UserRow<U>>) -> Vec<u8> {
        let mut out = row.lsn.to_be_bytes().to_vec();
        match &row.row {
            Some(r) => r.encode(&mut out),
            None => out.push(0),
        }
        out
    }
    fn decode(&self, bytes: &[u8]) -> Option<Arc<UserRow<U>>> {
        let lsn = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let row = match *bytes.get(8)? {
            0 => None,
            _ => Some(U::decode(bytes.get(8..)?)?),
        };
        Some(Arc::new(UserRow {
            row,
            served_by: Arc::from("cache-l2"),
            lsn,
            taken: AtomicBool::new(false),
        }))
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT). The handlers are installed when
/// this is called, not when the future is first polled: a signal that
/// arrives right after "listening on" is printed must not find the
/// default action (death by signal) still in place.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(term) => {}
            () = wait(int) => {}
        }
    }
}

/// Whether a database error means "unavailable" (503 / UNAVAILABLE).
pub fn unavailable(e: &DbError) -> bool {
    !matches!(e, DbError::Query { .. } | DbError::RowCount { .. })
}

/// The change feed for the users table: a row changed by any writer (a
/// migration, `psql`, another service) invalidates `user:{id}` in the user
/// cache and in `http` (the HTTP cache, with `--http-cache`); `TRUNCATE` or
/// a schema change invalidates every user. With `--redis` one instance
/// holds the feed (a lease) and the others hear its invalidations through
/// Redis; without it each instance reads its own temporary slot.
///
/// A primary that cannot run it (`wal_level` not `logical`, a role without
/// `REPLICATION`) gets one warning on stderr naming the reason, and the
/// service runs without it (entries then live until their TTL).
#[allow(dead_code)]
pub async fn change_feed(
    name: &str,
    backend: &Backend,
    http: Option<Invalidator<String>>,
) -> Option<tower_scale::pg::feed::ChangeFeed> {
    use tower_scale::cache::Tag;
    use tower_scale::pg::feed::{Change, ChangeFeed};
    let mut builder = ChangeFeed::builder(&backend.cluster)
        .tables(["users"])
        .publication("tower_scale_users")
        .slot("tower_scale_users")
        .invalidates(backend.invalidator.clone())
        .map_tags(|change| match change {
            Change::Row {
                table: "users",
                key,
            } => vec![Tag::from(format!("user:{key}"))],
            Change::Whole { table: "users" } => vec![Tag::from(USERS_WHOLE)],
            _ => Vec::new(),
        });
    if let Some(http) = http {
        builder = builder.invalidates(http);
    }
    match builder.start().await {
        Ok(feed) => Some(feed),
        Err(e) => {
            eprintln!("{name}: warning: running without the change feed: {e}");
            None
        }
    }
}
