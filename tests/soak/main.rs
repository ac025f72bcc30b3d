//! Soak checks (issue 25): after a warm-up, a long run of writes or reads
//! must not grow the live heap.
//!
//! A counting global allocator measures the live heap (bytes allocated and
//! not yet freed), not RSS. The count is process-wide, so the tests take
//! turns (one lock) and each runs on its own runtime.
//!
//! Every scenario runs warm-up rounds, then [`ROUNDS`] measured rounds, and
//! reads the live heap after each one at a quiet point (no request in
//! flight). The growth over the second half is the smallest reading among
//! its last [`WINDOW`] rounds minus the smallest among its first
//! [`WINDOW`]: the minimum drops what happens to be allocated at that
//! instant (a moka maintenance buffer, a pool connection's read buffer),
//! while anything kept per operation raises it.
//!
//! The moka stores' pending maintenance is run before each reading (it
//! frees replaced entries in batches).
//!
//! | scenario | operations: all (second half) | bound on growth |
//! |---|---|---|
//! | cache writes: tag (+ key) invalidation, 1 in 8 refilled, 3,000 keys | 240,000 (100,000) | 64 KiB |
//! | cache writes to ever-new keys and tags (marks folded at 10,000) | 120,000 (50,000) | 64 KiB |
//! | cache reads, 3,000 keys | 220,000 (100,000) | 32 KiB |
//! | two caches on one Redis: A writes and reads back, B reads after the fan-out, 300 keys | 3,600 (1,500) | 64 KiB |
//! | HTTP cache: GETs in 4 `Vary` variants, purges by URI, POSTs, 500 URLs | 36,000 (15,000) | 64 KiB |
//! | `Db`: UPDATE + token, tag invalidation, read-your-writes re-read, 300 users | 6,000 (2,500) | 24 KiB |
//! | `axum_users` router in-process: `PUT /users/{id}`, 300 users | 6,000 (2,500) | 12 KiB |
//! | `axum_users` router in-process: `GET /users/{id}` | 22,000 (10,000) | 12 KiB |
//!
//! Every id is written (and read) once before the rounds, so they measure
//! the steady state rather than a store or a log still filling up. The
//! PostgreSQL paths do fewer operations (a write is about a millisecond of
//! CPU in a debug build), so their bounds are tighter: the unscraped
//! Prometheus sample buffer of issue 25 kept about 8 bytes per pool
//! checkout, one per PUT and two per `Db` write and re-read; over these
//! 2,500 writes it grew the live heap by 28 KiB (PUT) and 52-57 KiB (`Db`).
//!
//! One check counts instead of weighing: 600 statements of different text
//! on a one-connection pool leave at most 257 prepared on its session (the
//! per-connection statement cache is bounded at 256).

#[path = "../../examples/axum_users.rs"]
#[allow(dead_code, unreachable_pub)]
mod axum_users;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_scale::cache::{CacheLayer, Invalidator, MokaStore, Store};
use tower_scale::http::HttpCacheLayer;
use tower_scale::pg::{Cluster, Consistency, DbError, NodeConfig};
use tower_scale::testing::{LocalCluster, LocalRedis};

use axum_users::users::{self, Loader, UserCache, UserPolicy, UserRead, UserRow};

/// Counts the bytes allocated and not yet freed, then defers to `System`.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

fn size(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds `GlobalAlloc`'s contract; the counter only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see above).
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(size(layout.size()), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(size(layout.size()), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(size(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(size(new_size) - size(layout.size()), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

const ROUNDS: usize = 20;
const WINDOW: usize = 3;
const KIB: i64 = 1024;
const USERS: u64 = 3_000;

/// One test at a time: the live-heap count is process-wide.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The live heap after each measured round of one scenario.
struct Meter {
    name: &'static str,
    ops_per_round: usize,
    bound: i64,
    samples: Vec<i64>,
    started: Instant,
    cpu: f64,
}

impl Meter {
    fn new(name: &'static str, ops_per_round: usize, bound: i64) -> Self {
        Self {
            name,
            ops_per_round,
            bound,
            samples: Vec::with_capacity(ROUNDS),
            started: Instant::now(),
            cpu: Self::cpu_seconds(),
        }
    }

    fn cpu_seconds() -> f64 {
        // utime and stime of this process, in clock ticks (100 a second here).
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
                let ticks: u64 =
                    fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
                Some(ticks as f64 / 100.0)
            })
            .unwrap_or(0.0)
    }

    fn sample(&mut self) {
        self.samples.push(live());
    }

    fn check(self) {
        assert_eq!(self.samples.len(), ROUNDS, "{}: rounds", self.name);
        let half = &self.samples[ROUNDS / 2..];
        let floor = |s: &[i64]| s.iter().copied().min().unwrap_or(0);
        let (start, end) = (floor(&half[..WINDOW]), floor(&half[half.len() - WINDOW..]));
        let growth = end - start;
        let ops = self.ops_per_round * (ROUNDS - ROUNDS / 2);
        eprintln!(
            "soak {}: {} ops in the second half, live heap {:.1} -> {:.1} KiB \
             (growth {:+.1} KiB, bound {} KiB), {:.1?} ({:.1} s of CPU) in all; \
             KiB after each round: {:?}",
            self.name,
            ops,
            start as f64 / 1024.0,
            end as f64 / 1024.0,
            growth as f64 / 1024.0,
            self.bound / KIB,
            self.started.elapsed(),
            Self::cpu_seconds() - self.cpu,
            self.samples.iter().map(|b| b / KIB).collect::<Vec<_>>(),
        );
        assert!(
            growth < self.bound,
            "{}: the live heap grew by {growth} bytes over {ops} operations \
             (bound {} bytes); samples: {:?}",
            self.name,
            self.bound,
            self.samples,
        );
    }
}

/// Runs `warm_up` unmeasured rounds then [`ROUNDS`] measured ones, and
/// reads the live heap after each measured round once `settle` has run the
/// stores' pending maintenance (moka frees replaced entries in batches, so
/// without it the reading depends on where the batch stands).
async fn soak<F, Fut>(mut meter: Meter, warm_up: usize, settle: &dyn Fn(), mut round: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for r in 0..warm_up + ROUNDS {
        round(r as u64).await;
        if r >= warm_up {
            settle();
            meter.sample();
        }
    }
    meter.check();
}

/// xorshift64*: reproducible ids without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// An origin for the users cache without a database: the row, stamped with
/// the version counter.
fn fake_loader(version: Arc<AtomicU64>) -> Loader {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: UserRead| {
        let lsn = version.load(Ordering::SeqCst);
        async move {
            Ok::<_, DbError>(Arc::new(UserRow {
                row: Some((req.id, format!("user {}", req.id))),
                served_by: Arc::from("origin"),
                lsn,
                taken: AtomicBool::new(false),
            }))
        }
    }))
}

type UsersLayer = CacheLayer<UserPolicy, MokaStore<i64, Arc<UserRow>, DbError>>;

fn users_layer(max_marks: usize) -> UsersLayer {
    CacheLayer::builder(UserPolicy)
        .time_to_live(Duration::from_secs(600))
        .max_entries(100_000)
        .max_tracked_invalidations(max_marks)
        .build()
        .expect("cache layer")
}

fn id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn read(cache: &UserCache, n: u64) {
    let req = UserRead {
        id: id(n),
        consistency: Consistency::Any,
    };
    let row = cache.clone().oneshot(req).await.expect("read");
    assert!(row.row.is_some());
}

/// One write's invalidation as the users service sends it: the row's tag
/// (and, for every fourth id, its key too) at the write's version.
fn invalidate(inv: &Invalidator<i64>, version: &AtomicU64, n: u64) -> u64 {
    let v = version.fetch_add(1, Ordering::SeqCst) + 1;
    inv.invalidate_tag_at(format!("user:{n}"), v);
    if n.is_multiple_of(4) {
        inv.invalidate_key_at(&id(n), v);
        2
    } else {
        1
    }
}

/// Every id once: its entry filled and its marks made, so the measured
/// rounds see the steady state (not the first write of an id).
async fn touch_every_id(cache: &UserCache, inv: &Invalidator<i64>, version: &AtomicU64, ids: u64) {
    for n in 1..=ids {
        invalidate(inv, version, n);
        read(cache, n).await;
    }
}

#[test]
fn cache_writes_with_invalidation_keep_the_heap_flat() {
    let _turn = serial();
    runtime().block_on(async {
        let version = Arc::new(AtomicU64::new(1));
        let layer = users_layer(100_000);
        let inv = layer.invalidator();
        let cache: UserCache = layer.layer(fake_loader(version.clone()));
        touch_every_id(&cache, &inv, &version, USERS).await;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // Every write invalidates; one in eight is read back (a refill).
        const PER_ROUND: usize = 10_000;
        let meter = Meter::new("cache writes (3,000 keys)", PER_ROUND, 64 * KIB);
        soak(meter, 4, &|| cache.store().run_pending_tasks(), |_| {
            let (cache, inv, version) = (&cache, &inv, &version);
            let ids: Vec<u64> = (0..PER_ROUND).map(|_| 1 + rng.below(USERS)).collect();
            async move {
                for (i, n) in ids.into_iter().enumerate() {
                    invalidate(inv, version, n);
                    if i % 8 == 0 {
                        read(cache, n).await;
                    }
                }
            }
        })
        .await;
    });
}

#[test]
fn cache_writes_to_ever_new_keys_stay_within_the_mark_bound() {
    let _turn = serial();
    runtime().block_on(async {
        let version = Arc::new(AtomicU64::new(1));
        // A small bound, so the run folds the marks many times.
        let layer = users_layer(10_000);
        let inv = layer.invalidator();
        let cache: UserCache = layer.layer(fake_loader(version.clone()));
        for n in 1..=USERS {
            read(&cache, n).await;
        }
        const PER_ROUND: usize = 5_000;
        let mut next = 1_000_000u64;
        let meter = Meter::new("cache writes (new keys, 10,000 marks)", PER_ROUND, 64 * KIB);
        soak(meter, 4, &|| cache.store().run_pending_tasks(), |_| {
            let start = next;
            next += PER_ROUND as u64;
            let (cache, inv, version) = (&cache, &inv, &version);
            async move {
                for n in start..start + PER_ROUND as u64 {
                    let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                    inv.invalidate_tag_at(format!("user:{n}"), v);
                    inv.invalidate_key_at(&id(n), v);
                    if n % 64 == 0 {
                        read(cache, n % USERS + 1).await;
                    }
                }
            }
        })
        .await;
    });
}

#[test]
fn cache_reads_keep_the_heap_flat() {
    let _turn = serial();
    runtime().block_on(async {
        let version = Arc::new(AtomicU64::new(1));
        let layer = users_layer(100_000);
        let cache: UserCache = layer.layer(fake_loader(version.clone()));
        for n in 1..=USERS {
            read(&cache, n).await;
        }
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        const PER_ROUND: usize = 10_000;
        let meter = Meter::new("cache reads (3,000 keys)", PER_ROUND, 32 * KIB);
        soak(meter, 2, &|| cache.store().run_pending_tasks(), |_| {
            let cache = &cache;
            let ids: Vec<u64> = (0..PER_ROUND).map(|_| 1 + rng.below(USERS)).collect();
            async move {
                for n in ids {
                    read(cache, n).await;
                }
            }
        })
        .await;
    });
}

/// Polls `cond` (a counter the fan-out moves) until it holds, or fails.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn redis_fan_out_keeps_the_heap_flat() {
    let _turn = serial();
    let redis = LocalRedis::start().expect("redis-server");
    runtime().block_on(async {
        const IDS: u64 = 300;
        let version = Arc::new(AtomicU64::new(1));
        let mut instances = Vec::new();
        for _ in 0..2 {
            let layer = users_layer(100_000);
            let tier = tower_scale::cache::redis::builder(redis.url())
                .prefix("soak")
                .timeout(Duration::from_millis(500))
                // A write strands the lease of a fill it overtakes until the
                // lease expires: keep that short, so reads do not wait.
                .lease(Duration::from_millis(100), Duration::from_millis(10))
                .attach(&layer, users::UserCodec)
                .await
                .expect("attach");
            let inv = layer.invalidator();
            let cache: UserCache = layer.layer(fake_loader(version.clone()));
            instances.push((cache, inv, tier));
        }
        until("both subscribed", || {
            instances.iter().all(|(_, _, t)| t.stats().subscribed)
        })
        .await;
        let (a, b) = (&instances[0], &instances[1]);
        let mut sent = 0;
        for n in 1..=IDS {
            sent += invalidate(&a.1, &version, n);
            read(&a.0, n).await;
            read(&b.0, n).await;
        }
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        // A writes (the invalidation goes through Redis to B) and reads
        // back; once B has applied them all, B reads the same ids (from
        // Redis, or from the origin where a later write kept A's fill out).
        const PER_ROUND: usize = 150;
        let meter = Meter::new("redis fan-out (2 instances)", PER_ROUND, 64 * KIB);
        soak(
            meter,
            4,
            &|| {
                instances
                    .iter()
                    .for_each(|(c, _, _)| c.store().run_pending_tasks())
            },
            |_| {
                let ids: Vec<u64> = (0..PER_ROUND).map(|_| 1 + rng.below(IDS)).collect();
                sent += ids
                    .iter()
                    .map(|n| if n % 4 == 0 { 2 } else { 1 })
                    .sum::<u64>();
                let expected = sent;
                let version = &version;
                async move {
                    for &n in &ids {
                        invalidate(&a.1, version, n);
                        read(&a.0, n).await;
                    }
                    until("the fan-out", || b.2.stats().fanout_received >= expected).await;
                    for &n in &ids {
                        read(&b.0, n).await;
                    }
                }
            },
        )
        .await;
        let stats = b.2.stats();
        assert!(stats.hits > 0 && stats.fanout_received > 0, "{stats:?}");
    });
}

fn http_response(path: &str, n: u64) -> Response<Body> {
    let mut res = Response::new(Body::from(format!("{path} #{n}")));
    let headers = res.headers_mut();
    headers.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=600"),
    );
    headers.insert("vary", HeaderValue::from_static("accept-language"));
    res
}

const LANGUAGES: [&str; 4] = ["en", "fr", "de", "nl"];

async fn http_get(svc: &HttpService, n: u64, lang: &str) {
    let req = Request::get(format!("http://soak.test/items/{n}"))
        .header("host", "soak.test")
        .header("accept-language", lang)
        .body(Body::empty())
        .expect("request");
    let res = svc.clone().oneshot(req).await.expect("get");
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.expect("body");
}

type HttpService = tower_scale::http::HttpCache<
    tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, std::convert::Infallible>,
>;

#[test]
fn http_cache_with_purges_keeps_the_heap_flat() {
    let _turn = serial();
    runtime().block_on(async {
        const URLS: u64 = 500;
        let layer = HttpCacheLayer::builder().build().expect("http cache");
        let calls = Arc::new(AtomicU64::new(0));
        let origin = {
            let calls = calls.clone();
            tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                let path = req.uri().path().to_string();
                async move { Ok::<_, std::convert::Infallible>(http_response(&path, n)) }
            }))
        };
        let svc: HttpService = layer.layer(origin);
        // Every URL in every language: the store holds all its variants.
        for n in 1..=URLS {
            for lang in LANGUAGES {
                http_get(&svc, n, lang).await;
            }
        }
        let mut rng = Rng(0xA076_1D64_78BD_642F);
        // One in eight operations purges the URL, one in eight POSTs to it
        // (an unsafe method invalidates it); the rest are GETs.
        const PER_ROUND: usize = 1_500;
        let meter = Meter::new("http cache with purges", PER_ROUND, 64 * KIB);
        soak(
            meter,
            4,
            &|| {
                layer.stats();
            },
            |_| {
                let ops: Vec<(u64, u64)> = (0..PER_ROUND)
                    .map(|_| (1 + rng.below(URLS), rng.below(8)))
                    .collect();
                let (svc, layer) = (&svc, &layer);
                async move {
                    for (n, what) in ops {
                        match what {
                            0 => layer.invalidate(&format!("http://soak.test/items/{n}")),
                            1 => {
                                let req = Request::post(format!("http://soak.test/items/{n}"))
                                    .body(Body::empty())
                                    .expect("request");
                                let res = svc.clone().oneshot(req).await.expect("post");
                                res.into_body().collect().await.expect("body");
                            }
                            _ => http_get(svc, n, LANGUAGES[(what % 4) as usize]).await,
                        }
                    }
                }
            },
        )
        .await;
        let stats = layer.stats();
        assert!(stats.hits > 0 && stats.invalidations > 0, "{stats:?}");
    });
}

/// Before a reading: the users cache's pending maintenance, and the
/// recorder's upkeep run here and now (the example's upkeep thread drains
/// once a second, which would make the readings a sawtooth whose phase
/// decides the verdict).
fn settle_users(backend: &users::Backend) {
    backend.users.store().run_pending_tasks();
    metrics().run_upkeep();
    crossbeam_epoch::pin().flush();
}

/// The process-wide Prometheus recorder, installed the way `axum_users`
/// installs it (with its upkeep).
fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| users::install_metrics().expect("install the recorder"))
        .clone()
}

async fn send(app: &axum::Router, req: Request<Body>) -> StatusCode {
    let res = app.clone().oneshot(req).await.expect("router");
    let status = res.status();
    res.into_body().collect().await.expect("body");
    status
}

async fn put(app: &axum::Router, n: u64, name: &str) {
    let req = Request::put(format!("/users/{n}"))
        .header("content-type", "application/json")
        .body(Body::from(format!("{{\"name\":\"{name}\"}}")))
        .expect("request");
    assert_eq!(send(app, req).await, StatusCode::OK);
}

/// One write through `Db` as the handlers make it, then a read of it
/// through the users cache with the write's token.
async fn db_write(backend: &users::Backend, n: u64, name: &str) {
    let w = backend
        .db
        .query(
            "UPDATE users SET name = $1 WHERE id = $2 RETURNING id",
            &[&name, &id(n)],
        )
        .await
        .expect("update");
    backend
        .invalidator
        .invalidate_tag_at(format!("user:{n}"), w.token.version());
    let row = backend
        .users
        .clone()
        .oneshot(UserRead {
            id: id(n),
            consistency: Consistency::ReadYourWrites(w.token),
        })
        .await
        .expect("read");
    assert!(row.lsn >= w.token.lsn().0);
}

/// `Db` writes, then `PUT /users/{id}` and `GET /users/{id}` through the
/// whole `axum_users` router (`DbLayer`, handlers, the request metrics),
/// over one LocalCluster (a primary alone: replicas add nothing to what is
/// measured here).
#[test]
fn db_writes_and_the_users_router_keep_the_heap_flat() {
    let _turn = serial();
    let local = LocalCluster::start(0).expect("LocalCluster");
    runtime().block_on(async {
        const IDS: u64 = 300;
        const TASKS: usize = 5;
        let metrics = metrics();
        let args = users::Args::in_process(&local);
        let backend = Arc::new(users::backend(&args).await.expect("backend"));
        backend
            .db
            .execute(
                "INSERT INTO users (name) SELECT 'user ' || g FROM generate_series(1, 300) g",
                &[],
            )
            .await
            .expect("users");
        let app = axum_users::router(&backend, metrics);
        // Every id written once, through `Db` and through the router.
        for n in 1..=IDS {
            db_write(&backend, n, "first").await;
            put(&app, n, "first").await;
        }
        let mut rng = Rng(0x8CB9_2BA7_2F3D_8DD7);

        // Writes through `Db` and the cache's invalidation, as the handlers do.
        const DB_PER_ROUND: usize = 250;
        let meter = Meter::new("Db writes + invalidation", DB_PER_ROUND, 24 * KIB);
        soak(meter, 4, &|| settle_users(&backend), |r| {
            let ids: Vec<u64> = (0..DB_PER_ROUND).map(|_| 1 + rng.below(IDS)).collect();
            let backend = &backend;
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                for chunk in ids.chunks(DB_PER_ROUND / TASKS) {
                    let (chunk, backend) = (chunk.to_vec(), Arc::clone(backend));
                    tasks.spawn(async move {
                        for n in chunk {
                            db_write(&backend, n, &format!("db {r}")).await;
                        }
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done.expect("writer");
                }
            }
        })
        .await;

        // `PUT /users/{id}` through the whole router (DbLayer, handlers),
        // TASKS at a time. The clients run as futures on this thread
        // rather than as spawned tasks: the request histograms they
        // record pin crossbeam's epoch, and a thread that pins also
        // collects, retiring the global garbage queue's nodes (about
        // 2 KiB each) into its own bag, which it hands on only when 64
        // are in it. On a worker thread that bag is out of the reading's
        // reach (`settle` flushes this thread's), so the readings would
        // climb by a node every few rounds and fall back by 64 (a
        // sawtooth of about 250 KiB, measured over 500 rounds of 100
        // PUTs): bounded by crossbeam's design, but it would hide
        // what this check looks for.
        const PUT_PER_ROUND: usize = 250;
        let meter = Meter::new("axum_users PUT", PUT_PER_ROUND, 12 * KIB);
        soak(meter, 4, &|| settle_users(&backend), |r| {
            let ids: Vec<u64> = (0..PUT_PER_ROUND).map(|_| 1 + rng.below(IDS)).collect();
            let app = &app;
            async move {
                let name = format!("put {r}");
                let clients = ids.chunks(PUT_PER_ROUND / TASKS).map(|chunk| {
                    let name = &name;
                    async move {
                        for &n in chunk {
                            put(app, n, name).await;
                        }
                    }
                });
                futures::future::join_all(clients).await;
            }
        })
        .await;

        // `GET /users/{id}`: cache hits, and a miss after each write above.
        const GET_PER_ROUND: usize = 1_000;
        let meter = Meter::new("axum_users GET", GET_PER_ROUND, 12 * KIB);
        soak(meter, 2, &|| settle_users(&backend), |_| {
            let ids: Vec<u64> = (0..GET_PER_ROUND).map(|_| 1 + rng.below(IDS)).collect();
            let app = &app;
            async move {
                for n in ids {
                    let req = Request::get(format!("/users/{n}"))
                        .body(Body::empty())
                        .expect("request");
                    assert_eq!(send(app, req).await, StatusCode::OK);
                }
            }
        })
        .await;
        backend.cluster.shutdown();

        // SQL text that changes per request: the connection's statement
        // cache, and the server's prepared statements, stay within 256.
        let cluster = Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .pool_size(1)
            .build()
            .await
            .expect("cluster");
        let db = cluster.db();
        for n in 0..600 {
            let r = db
                .read_one(Consistency::Strong, &format!("SELECT {n}::int8"), &[])
                .await
                .expect("select");
            assert_eq!(r.value.get::<_, i64>(0), n);
        }
        let prepared: i64 = db
            .read_one(
                Consistency::Strong,
                "SELECT count(*) FROM pg_prepared_statements",
                &[],
            )
            .await
            .expect("count")
            .value
            .get(0);
        assert!(
            prepared <= 257,
            "{prepared} statements prepared on the one session after 600 distinct ones"
        );
        cluster.shutdown();
    });
    drop(local);
}
