//! The change feed (issue 17): how soon a commit on the primary empties
//! the L1 entry it touches, and how many row changes per second the
//! consumer applies with the fan-out on, on a LocalCluster and a
//! LocalRedis.
//!
//! ```text
//! cargo bench --features full --bench feed
//! cargo bench --features full --bench feed -- throughput   # one of the two
//! ```
//!
//! Criterion's per-iteration timing gives neither a latency percentile of
//! an asynchronous pipeline nor a drain rate, so this target has its own
//! `main` (like `cache_memory`): it runs each scenario for a bounded time
//! and prints one line per id. It takes criterion's arguments (a filter,
//! `--exact`, `--list`, `--bench`; the others are ignored); without
//! `--bench` (`cargo test --benches`) each scenario runs for a second only.
//!
//! `feed/commit_to_invalidation`: a writer (4 plain tokio-postgres
//! clients, paced to 1,000 commits/s) fills a cache entry tagged
//! `items:{id}` and `items:*` (an L1-only `CacheLayer` on moka), then runs
//! `BEGIN; UPDATE items ... WHERE id = $1; COMMIT` on that row. A checker
//! thread looks the entry up in the cache every 100 µs (a cache-only
//! lookup: an L1 miss reaches an origin that fails at once, no database)
//! and notes when it is gone. The figures count from just before COMMIT is
//! sent (the commit happens on the server within that round trip); the
//! detail line also gives them from the moment COMMIT returned. The first
//! second is a warm-up and is not counted.
//!
//! `feed/throughput`: the feed invalidates a cache with a Redis tier
//! attached (so every invalidation is also queued for Redis and published,
//! and the slot is confirmed only after that). The primary's own write
//! rate is measured first, with no consumer reading the slot: 4 clients
//! run `UPDATE bulk_items SET v = v + 1 WHERE id BETWEEN $1 AND $1 + 99`
//! (one transaction of 100 rows each) for a fixed time. Those changes wait
//! in the slot; then the feed starts and the bench times how fast it
//! drains them (from its first applied row to the last), which is the
//! consumer's rate unbounded by the writers. A third phase runs the writers
//! with the feed streaming and reports whether it keeps up; a fourth
//! drains a backlog into a cache without the Redis tier, for comparison.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower::{Service, ServiceBuilder, ServiceExt};
use tower_scale::cache::redis::{RedisCodec, RedisTier};
use tower_scale::cache::{CacheLayer, CachePolicy, Storable, Windows};
use tower_scale::pg::feed::{ChangeFeed, FeedStatus, SlotKind};
use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::testing::{LocalCluster, LocalRedis};

const COMMIT_TO_INVALIDATION: &str = "feed/commit_to_invalidation";
const THROUGHPUT: &str = "feed/throughput";
const IDS: [&str; 2] = [COMMIT_TO_INVALIDATION, THROUGHPUT];

/// How long each scenario runs.
#[derive(Clone, Copy)]
struct Timing {
    /// Measured commits at the target rate (after the warm-up).
    latency_window: Duration,
    warm_up: Duration,
    /// Each write phase of the throughput bench.
    write_window: Duration,
}

const BENCH: Timing = Timing {
    latency_window: Duration::from_secs(12),
    warm_up: Duration::from_secs(1),
    write_window: Duration::from_secs(5),
};

const SMOKE: Timing = Timing {
    latency_window: Duration::from_secs(1),
    warm_up: Duration::from_millis(200),
    write_window: Duration::from_secs(1),
};

/// Commits per second of the latency scenario, and its writer clients.
const COMMITS_PER_SECOND: u64 = 1_000;
const LATENCY_WRITERS: u64 = 4;
/// How often the checker looks at the entries it waits for.
const CHECK_EVERY: Duration = Duration::from_micros(100);
/// An entry not gone after this counts as not invalidated.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Rows of the throughput table, writer clients, rows per transaction.
const BULK_ROWS: i64 = 100_000;
const BULK_WRITERS: i64 = 4;
const TX_ROWS: i64 = 100;
/// The backlog's bound, whatever the primary's rate.
const MAX_BACKLOG_ROWS: u64 = 1_500_000;

/// Criterion's command line, as far as this target uses it.
struct Args {
    bench: bool,
    list: bool,
    exact: bool,
    filter: Option<String>,
}

impl Args {
    fn parse() -> Self {
        // Criterion's options that take a value (`--opt value`).
        const VALUED: [&str; 20] = [
            "-c",
            "--color",
            "-s",
            "--save-baseline",
            "-b",
            "--baseline",
            "--baseline-lenient",
            "--load-baseline",
            "--format",
            "--profile-time",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--plotting-backend",
            "--output-format",
            "--logfile",
        ];
        let mut args = Args {
            bench: false,
            list: false,
            exact: false,
            filter: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--bench" => args.bench = true,
                "--list" => args.list = true,
                "--exact" => args.exact = true,
                a if VALUED.contains(&a) => {
                    it.next();
                }
                a if a.starts_with('-') => {}
                _ => {
                    if args.filter.is_none() {
                        args.filter = Some(arg);
                    }
                }
            }
        }
        args
    }

    fn selects(&self, id: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) if self.exact => id == f,
            Some(f) => id.contains(f.as_str()),
        }
    }
}

fn main() {
    let args = Args::parse();
    let selected: Vec<&str> = IDS.into_iter().filter(|id| args.selects(id)).collect();
    if args.list {
        for id in selected {
            println!("{id}: benchmark");
        }
        return;
    }
    if selected.is_empty() {
        return;
    }
    let timing = if args.bench { BENCH } else { SMOKE };
    let warnings: &'static Warnings = Box::leak(Box::default());
    tracing::subscriber::set_global_default(warnings).expect("subscriber");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let local = LocalCluster::start(0).expect("LocalCluster");
    let redis = LocalRedis::start().expect("LocalRedis");
    let cluster = rt.block_on(async {
        Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .build()
            .await
            .expect("cluster")
    });
    for id in selected {
        if !args.bench {
            println!("Testing {id}");
        }
        match id {
            COMMIT_TO_INVALIDATION => {
                rt.block_on(commit_to_invalidation(&local, &cluster, timing));
                println!("  warnings: {}", warnings.take());
            }
            _ => rt.block_on(throughput(&local, &cluster, &redis, timing, warnings)),
        }
        if !args.bench {
            println!("Success");
        }
    }
    drop(cluster);
    drop(rt);
    drop(redis);
    drop(local);
}

/// A request to the latency scenario's cache: fill the entry of row `id`,
/// or only look (`fill: false`: an L1 miss reaches an origin that fails at
/// once, so nothing is stored and nothing leaves the process).
#[derive(Clone, Copy)]
struct Probe {
    id: u64,
    fill: bool,
}

/// The latency cache's origin's answer to a look that missed.
#[derive(Debug, Clone, Copy)]
struct NotCached;

/// Key: the row's id; tags: `items:{id}` and `items:*`, as the feed spells
/// a change of that row and one of every row (see `pg::feed::tags`).
struct RowTagged;

impl CachePolicy<Probe, Arc<u64>> for RowTagged {
    type Key = u64;
    fn key(&self, req: &Probe) -> Option<u64> {
        Some(req.id)
    }
    fn storable(&self, key: &u64, _: &Arc<u64>, defaults: &Windows) -> Option<Storable> {
        Some(
            Storable::new(*defaults)
                .tag(format!("items:{key}"))
                .tag("items:*"),
        )
    }
}

async fn plain_client(local: &LocalCluster) -> tokio_postgres::Client {
    local.primary().connect().await.expect("connect")
}

/// Milliseconds with two decimals.
fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// The `q`-quantile of sorted durations (nearest rank).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One measured commit.
struct Commit {
    id: u64,
    scheduled: Instant,
    /// Just before COMMIT was sent.
    sent: Instant,
    /// COMMIT returned.
    returned: Instant,
}

async fn commit_to_invalidation(local: &LocalCluster, cluster: &Cluster, timing: Timing) {
    let total =
        (timing.warm_up + timing.latency_window).as_millis() as u64 * COMMITS_PER_SECOND / 1_000;
    let setup = plain_client(local).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE items (id int8 PRIMARY KEY, v int8 NOT NULL DEFAULT 0);
             INSERT INTO items (id) SELECT g FROM generate_series(1, {total}) g;"
        ))
        .await
        .expect("setup");

    let layer = CacheLayer::builder(RowTagged)
        .time_to_live(Duration::from_secs(3600))
        .no_early_refresh()
        .max_entries(4 * total)
        .build()
        .expect("cache");
    let feed = ChangeFeed::builder(cluster)
        .tables(["items"])
        .publication("bench_latency")
        .slot("bench_latency")
        .invalidates(layer.invalidator())
        .start()
        .await
        .expect("feed");
    assert!(
        feed.streaming(Duration::from_secs(30)).await,
        "{:?}",
        feed.status()
    );
    let cache = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|p: Probe| {
            std::future::ready(if p.fill {
                Ok(Arc::new(p.id))
            } else {
                Err(NotCached)
            })
        }));

    // The checker: a thread of its own, since tokio's timers tick in
    // milliseconds; the cache's hit path needs no runtime, its miss path
    // one entered.
    let waiting: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (waiting, stop) = (Arc::clone(&waiting), Arc::clone(&stop));
        let mut cache = cache.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let _entered = runtime.enter();
            let mut gone: HashMap<u64, Instant> = HashMap::new();
            let mut since: HashMap<u64, Instant> = HashMap::new();
            let mut lost = 0u64;
            let mut look = Vec::new();
            loop {
                look.clear();
                look.extend_from_slice(&crate::lock(&waiting));
                if look.is_empty() && stop.load(Ordering::Acquire) {
                    break;
                }
                for &id in &look {
                    let present = futures::executor::block_on(async {
                        cache.ready().await?.call(Probe { id, fill: false }).await
                    })
                    .is_ok();
                    let now = Instant::now();
                    let first = *since.entry(id).or_insert(now);
                    if !present || now - first > GIVE_UP {
                        if present {
                            lost += 1;
                        } else {
                            gone.insert(id, now);
                        }
                        since.remove(&id);
                        crate::lock(&waiting).retain(|w| *w != id);
                    }
                }
                std::thread::sleep(CHECK_EVERY);
            }
            (gone, lost)
        })
    };

    let start = Instant::now() + Duration::from_millis(20);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..LATENCY_WRITERS {
        let client = plain_client(local).await;
        let mut cache = cache.clone();
        let waiting = Arc::clone(&waiting);
        writers.spawn(async move {
            let update = client
                .prepare("UPDATE items SET v = v + 1 WHERE id = $1")
                .await
                .expect("prepare");
            let mut done = Vec::new();
            let mut i = w;
            while i < total {
                let id = i + 1;
                let scheduled = start + Duration::from_micros(i * 1_000_000 / COMMITS_PER_SECOND);
                tokio::time::sleep_until(scheduled.into()).await;
                // The entry exists before the commit.
                let filled = cache.ready().await.expect("ready");
                filled.call(Probe { id, fill: true }).await.expect("fill");
                let there = cache.ready().await.expect("ready");
                there
                    .call(Probe { id, fill: false })
                    .await
                    .expect("the entry is cached");
                client.batch_execute("BEGIN").await.expect("begin");
                let key = id as i64;
                let n = client.execute(&update, &[&key]).await.expect("update");
                assert_eq!(n, 1);
                crate::lock(&waiting).push(id);
                let sent = Instant::now();
                client.batch_execute("COMMIT").await.expect("commit");
                let returned = Instant::now();
                done.push(Commit {
                    id,
                    scheduled,
                    sent,
                    returned,
                });
                i += LATENCY_WRITERS;
            }
            done
        });
    }
    let mut commits = Vec::new();
    while let Some(done) = writers.join_next().await {
        commits.extend(done.expect("writer"));
    }
    stop.store(true, Ordering::Release);
    let (gone, lost) = tokio::task::spawn_blocking(move || checker.join().expect("checker"))
        .await
        .expect("join");
    let status = feed.status();
    feed.shutdown();

    let measured_from = start + timing.warm_up;
    commits.retain(|c| c.scheduled >= measured_from);
    commits.sort_by_key(|c| c.scheduled);
    let mut from_sent = Vec::with_capacity(commits.len());
    let mut from_returned = Vec::with_capacity(commits.len());
    let mut before_return = 0u64;
    let mut late = Duration::ZERO;
    for c in &commits {
        late = late.max(c.sent.saturating_duration_since(c.scheduled));
        if let Some(&t) = gone.get(&c.id) {
            from_sent.push(t.saturating_duration_since(c.sent));
            if t < c.returned {
                before_return += 1;
            }
            from_returned.push(t.saturating_duration_since(c.returned));
        }
    }
    from_sent.sort();
    from_returned.sort();
    let n = commits.len();
    let span = match (commits.first(), commits.last()) {
        (Some(a), Some(b)) => b.returned.saturating_duration_since(a.sent),
        _ => Duration::ZERO,
    };
    let rate = if span.is_zero() {
        0.0
    } else {
        n as f64 / span.as_secs_f64()
    };
    let not_gone = n - from_sent.len();
    println!(
        "{COMMIT_TO_INVALIDATION}: p50 {} ms p99 {} ms ({n} commits at {rate:.0}/s)",
        ms(quantile(&from_sent, 0.50)),
        ms(quantile(&from_sent, 0.99)),
    );
    println!(
        "  from just before COMMIT was sent (above): p50 {} p90 {} p99 {} p99.9 {} max {} ms",
        ms(quantile(&from_sent, 0.50)),
        ms(quantile(&from_sent, 0.90)),
        ms(quantile(&from_sent, 0.99)),
        ms(quantile(&from_sent, 0.999)),
        ms(quantile(&from_sent, 1.0)),
    );
    println!(
        "  from COMMIT returned: p50 {} p90 {} p99 {} p99.9 {} max {} ms; gone before COMMIT returned: {before_return}",
        ms(quantile(&from_returned, 0.50)),
        ms(quantile(&from_returned, 0.90)),
        ms(quantile(&from_returned, 0.99)),
        ms(quantile(&from_returned, 0.999)),
        ms(quantile(&from_returned, 1.0)),
    );
    println!(
        "  not gone within {GIVE_UP:?}: {not_gone} ({lost} given up by the checker); writer at most {} ms behind schedule; feed: {} transactions, {} rows",
        ms(late),
        status.transactions,
        status.rows
    );
}

/// The throughput cache's key and response, as Redis stores them.
struct Codec;

impl RedisCodec<u64, Arc<u64>> for Codec {
    fn encode_key(&self, key: &u64) -> Vec<u8> {
        key.to_be_bytes().to_vec()
    }
    fn decode_key(&self, bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
    fn encode(&self, r: &Arc<u64>) -> Vec<u8> {
        r.to_be_bytes().to_vec()
    }
    fn decode(&self, bytes: &[u8]) -> Option<Arc<u64>> {
        Some(Arc::new(u64::from_be_bytes(bytes.try_into().ok()?)))
    }
}

/// Runs the bulk writers until `until` or until `max_rows` rows were
/// written; returns the rows written and the time it took.
async fn write_bulk(local: &LocalCluster, until: Duration, max_rows: u64) -> (u64, Duration) {
    let rows = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..BULK_WRITERS {
        let client = plain_client(local).await;
        let update = client
            .prepare("UPDATE bulk_items SET v = v + 1 WHERE id BETWEEN $1 AND $1 + 99")
            .await
            .expect("prepare");
        clients.push((client, update));
    }
    let started = Instant::now();
    let deadline = started + until;
    let mut writers = tokio::task::JoinSet::new();
    for (w, (client, update)) in clients.into_iter().enumerate() {
        let rows = Arc::clone(&rows);
        writers.spawn(async move {
            // Each writer has its own share of the table: no lock waits.
            let share = BULK_ROWS / BULK_WRITERS;
            let first = w as i64 * share + 1;
            let mut offset = 0;
            while Instant::now() < deadline && rows.load(Ordering::Relaxed) < max_rows {
                let from = first + offset;
                let n = client.execute(&update, &[&from]).await.expect("update");
                assert_eq!(n, TX_ROWS as u64);
                rows.fetch_add(n, Ordering::Relaxed);
                offset = (offset + TX_ROWS) % share;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    (rows.load(Ordering::Relaxed), started.elapsed())
}

fn per_second(rows: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        rows as f64 / d.as_secs_f64()
    }
}

/// Polls `status` every millisecond until `done` holds (or `within`
/// passed); returns when the first row was applied and when `done` held.
async fn watch(
    status: impl Fn() -> FeedStatus,
    rows_before: u64,
    within: Duration,
    done: impl Fn(&FeedStatus) -> bool,
) -> (Option<Instant>, Option<Instant>) {
    let deadline = Instant::now() + within;
    let mut first = None;
    loop {
        let s = status();
        let now = Instant::now();
        if first.is_none() && s.rows > rows_before {
            first = Some(now);
        }
        if done(&s) {
            return (first, Some(now));
        }
        if now > deadline {
            return (first, None);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Starts a feed of `bulk_items` into `layer`'s invalidator on the bench's
/// permanent slot.
fn bulk_feed(
    cluster: &Cluster,
    invalidator: tower_scale::cache::Invalidator<u64>,
) -> impl Future<Output = ChangeFeed> {
    let builder = ChangeFeed::builder(cluster)
        .tables(["bulk_items"])
        .publication("bench_bulk")
        .slot("bench_bulk")
        .slot_kind(SlotKind::Permanent)
        .row_limit(1_000_000)
        .lease_poll(Duration::from_millis(20))
        .invalidates(invalidator);
    async move { builder.start().await.expect("feed") }
}

async fn throughput(
    local: &LocalCluster,
    cluster: &Cluster,
    redis: &LocalRedis,
    timing: Timing,
    warnings: &Warnings,
) {
    let setup = plain_client(local).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE bulk_items (id int8 PRIMARY KEY, v int8 NOT NULL DEFAULT 0);
             INSERT INTO bulk_items (id) SELECT g FROM generate_series(1, {BULK_ROWS}) g;"
        ))
        .await
        .expect("setup");
    setup
        .batch_execute("VACUUM ANALYZE bulk_items")
        .await
        .expect("vacuum");
    let layer = CacheLayer::builder(|p: &u64| Some(*p))
        .time_to_live(Duration::from_secs(3600))
        .build::<u64, Arc<u64>, NotCached>()
        .expect("cache");
    let tier: Arc<RedisTier<u64, Arc<u64>>> = tower_scale::cache::redis::builder(redis.url())
        .prefix("bench-feed")
        .attach(&layer, Codec)
        .await
        .expect("attach");
    while tier.stats().heartbeats == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The permanent slot is made by a first start (the fan-out makes the
    // feed take one); then no one reads it while the primary writes alone.
    let first = bulk_feed(cluster, layer.invalidator()).await;
    assert!(
        first.streaming(Duration::from_secs(30)).await,
        "{:?}",
        first.status()
    );
    first.shutdown();
    drop(first);
    let setup_warnings = warnings.take();

    // 1. The primary on its own.
    eprintln!("{THROUGHPUT}: the primary writes, no one reads the slot");
    let (written, took) = write_bulk(local, timing.write_window, MAX_BACKLOG_ROWS).await;
    let primary_rate = per_second(written, took);

    // 2. The consumer drains what the primary wrote.
    eprintln!("{THROUGHPUT}: the feed drains the slot");
    let feed = bulk_feed(cluster, layer.invalidator()).await;
    let max_queued = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (tier, max_queued) = (Arc::clone(&tier), Arc::clone(&max_queued));
        tokio::spawn(async move {
            loop {
                max_queued.fetch_max(tier.stats().queued_invalidations, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let drained_backlog = drain(&feed, written, &setup).await;
    let status = feed.status();
    let drained = drained_backlog.drained;
    let drain_time = drained_backlog.took;
    let applied_rate = per_second(status.rows, drain_time);
    let (_, confirmed) = watch(
        || feed.status(),
        0,
        Duration::from_secs(60),
        |s| s.confirmed >= status.applied,
    )
    .await;
    let drain_queued = max_queued.swap(0, Ordering::Relaxed);
    let drain_warnings = warnings.take();
    println!(
        "{THROUGHPUT}: {applied_rate:.0} rows/s applied (primary wrote {primary_rate:.0} rows/s)"
    );
    println!(
        "  drain: {} rows in {} transactions applied in {} ms (the primary wrote them in {} ms); confirmed (published to Redis) {} ms after the last was applied; most invalidations waiting for Redis: {drain_queued}",
        status.rows,
        status.transactions,
        drain_time.as_millis(),
        took.as_millis(),
        since(confirmed, drained),
    );
    println!("  drain CPU per row applied: {}", drained_backlog.cpu);
    println!("  warnings while setting up: {setup_warnings}");
    println!("  warnings while draining: {drain_warnings}");

    // 3. The writers with the feed streaming: does it keep up?
    eprintln!("{THROUGHPUT}: the primary writes, the feed streams");
    let before = feed.status().rows;
    let (written, took) = write_bulk(local, timing.write_window, u64::MAX).await;
    let stopped = Instant::now();
    let during = feed.status().rows - before;
    let (_, caught_up) = watch(
        || feed.status(),
        0,
        Duration::from_secs(120),
        |s| s.rows >= before + written,
    )
    .await;
    let applied = feed.status().applied;
    let (_, confirmed) = watch(
        || feed.status(),
        0,
        Duration::from_secs(60),
        |s| s.confirmed >= applied,
    )
    .await;
    sampler.abort();
    println!(
        "  with the feed streaming: primary wrote {:.0} rows/s ({written} rows), the feed applied {:.0} rows/s meanwhile, caught up {} ms after the writers stopped, confirmed {} ms after; most invalidations waiting for Redis: {}",
        per_second(written, took),
        per_second(during, took),
        since(caught_up, stopped),
        since(confirmed, stopped),
        max_queued.load(Ordering::Relaxed),
    );
    println!("  warnings while streaming: {}", warnings.take());
    println!("  tier: {:?}", tier.stats());
    feed.shutdown();
    drop(feed);

    // 4. For comparison: the same drain into a cache without the fan-out.
    eprintln!("{THROUGHPUT}: the primary writes, no one reads the slot (L1 only)");
    let (written, took) = write_bulk(local, timing.write_window, MAX_BACKLOG_ROWS).await;
    eprintln!("{THROUGHPUT}: the feed drains the slot (L1 only)");
    let l1_only = CacheLayer::builder(|p: &u64| Some(*p))
        .time_to_live(Duration::from_secs(3600))
        .build::<u64, Arc<u64>, NotCached>()
        .expect("cache");
    let feed = bulk_feed(cluster, l1_only.invalidator()).await;
    let drained_backlog = drain(&feed, written, &setup).await;
    let status = feed.status();
    println!(
        "  the same drain without the fan-out (L1 only): {:.0} rows/s applied ({} rows in {} ms; the primary wrote them at {:.0} rows/s); CPU per row: {}",
        per_second(status.rows, drained_backlog.took),
        status.rows,
        drained_backlog.took.as_millis(),
        per_second(written, took),
        drained_backlog.cpu,
    );
    feed.shutdown();
}

/// A drained backlog: from the first row applied to the last.
struct Drained {
    took: Duration,
    drained: Instant,
    /// CPU per row of this process (the feed, the tier) and of the
    /// walsender that decodes the slot.
    cpu: String,
}

/// Waits until `feed` applied `rows` rows, timing it from the first; also
/// what each side of the stream spent in CPU per row meanwhile.
async fn drain(feed: &ChangeFeed, rows: u64, primary: &tokio_postgres::Client) -> Drained {
    let (first_row, _) = watch(|| feed.status(), 0, Duration::from_secs(60), |s| s.rows > 0).await;
    let first_row = first_row.expect("the feed applied nothing in 60 s");
    let walsender = primary
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'bench_bulk'",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .and_then(|p| u32::try_from(p).ok());
    let me = std::process::id();
    let cpu_before = (cpu_time(me), walsender.and_then(cpu_time));
    let rows_before = feed.status().rows;
    let (_, drained) = watch(
        || feed.status(),
        0,
        Duration::from_secs(120),
        |s| s.rows >= rows,
    )
    .await;
    let cpu_after = (cpu_time(me), walsender.and_then(cpu_time));
    let drained = drained.unwrap_or_else(|| {
        panic!(
            "the feed did not drain the backlog in 120 s: {:?}",
            feed.status()
        )
    });
    let counted = feed.status().rows.saturating_sub(rows_before).max(1);
    let per_row = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) => format!(
            "{:.2} µs",
            a.saturating_sub(b).as_secs_f64() * 1e6 / counted as f64
        ),
        _ => "unknown".into(),
    };
    Drained {
        took: drained - first_row,
        drained,
        cpu: format!(
            "bench process (feed, tier) {}, walsender {} ({counted} rows)",
            per_row(cpu_before.0, cpu_after.0),
            per_row(cpu_before.1, cpu_after.1),
        ),
    }
}

/// The CPU time (user and system) a process used so far, from
/// `/proc/PID/stat` (Linux; in USER_HZ ticks of 10 ms).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Milliseconds from `from` to `to`, or "never".
fn since(to: Option<Instant>, from: Instant) -> String {
    to.map_or_else(
        || "never".into(),
        |t| t.saturating_duration_since(from).as_millis().to_string(),
    )
}

/// Counts the warnings and errors the library logs (by message), so the
/// bench can say whether, say, the Redis queue collapsed into an
/// invalidation of everything.
#[derive(Default)]
struct Warnings(Mutex<HashMap<String, u64>>);

impl Warnings {
    /// The messages counted since the last call, and their counts.
    fn take(&self) -> String {
        let counted = std::mem::take(&mut *lock(&self.0));
        if counted.is_empty() {
            return "none".into();
        }
        let mut all: Vec<_> = counted.into_iter().collect();
        all.sort();
        all.iter()
            .map(|(m, n)| format!("{n} x {m:?}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for &'static Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::WARN)
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        *lock(&self.0).entry(message.0).or_default() += 1;
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A mutex that a panicking holder did not poison for the others.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
