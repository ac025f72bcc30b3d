//! The job queue (issue 20) against a local primary, in one run:
//!
//! - `queue/throughput`: jobs enqueued (4 producer tasks, one `INSERT` per
//!   job through [`Queue::enqueue`]) and completed end to end by 4
//!   [`Worker`]s (concurrency 16 each: like a raw consumer, each holds
//!   at most 16 claimed jobs) with an empty handler;
//! - `queue/raw_skip_locked`: the same jobs, the same table layout and
//!   the same producers, consumed by a minimal hand-written loop: 4 tasks
//!   each claiming up to 16 due jobs (`UPDATE ... FROM (SELECT ... FOR
//!   UPDATE SKIP LOCKED)`) and deleting them (`DELETE ... WHERE id =
//!   ANY`), woken in-process by the producers: the limit the queue is
//!   measured against;
//! - `queue/enqueue_to_start`: one job enqueued with an idle worker
//!   listening; the time until its handler starts.
//!
//! ```text
//! cargo bench --features full --bench queue
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tower_scale::pg::{Cluster, Db, NodeConfig};
use tower_scale::queue::{Job, NewJob, Queue, Worker, WorkerHandle};
use tower_scale::testing::LocalCluster;

/// Jobs per measured iteration of the throughput benches.
const BATCH: u64 = 400;
const PRODUCERS: u64 = 4;
/// Rounds of the interleaved comparison.
const INTERLEAVED_ROUNDS: usize = 30;

struct Setup {
    _local: LocalCluster,
    _cluster: Cluster,
    db: Db,
    queue: Queue,
    raw: Queue,
}

fn setup(rt: &Runtime) -> Setup {
    let local = LocalCluster::start(0).expect("local primary");
    rt.block_on(async {
        let cluster = Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .pool_size(24)
            .build()
            .await
            .expect("cluster");
        let db = cluster.db();
        let queue = Queue::builder(db.clone(), "bench")
            .table("bench_jobs")
            .build()
            .await
            .expect("queue");
        let raw = Queue::builder(db.clone(), "raw")
            .table("bench_raw")
            .build()
            .await
            .expect("raw");
        Setup {
            _local: local,
            _cluster: cluster,
            db,
            queue,
            raw,
        }
    })
}

/// Enqueues `n` jobs through the queue from [`PRODUCERS`] tasks.
async fn produce(queue: &Queue, n: u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let queue = queue.clone();
        tasks.spawn(async move {
            for i in (p..n).step_by(PRODUCERS as usize) {
                let job = NewJob::new(&i).expect("payload");
                queue.enqueue(job).await.expect("enqueue");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Enqueues `n` rows into the raw table with plain `INSERT`s.
async fn produce_raw(db: &Db, n: u64, wake: &tokio::sync::Notify) {
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let db = db.clone();
        tasks.spawn(async move {
            for i in (p..n).step_by(PRODUCERS as usize) {
                let now = SystemTime::now();
                let payload = serde_json::json!(i);
                db.execute(
                    "INSERT INTO bench_raw (queue, payload, priority, run_at, max_attempts, enqueued_at) \
                     VALUES ('raw', $1, 0, $2, 5, $2)",
                    &[&payload, &now],
                )
                .await
                .expect("insert");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    wake.notify_waiters();
}

/// The hand-written consumer: claim up to 16, delete them, count.
async fn raw_consumer(db: Db, done: Arc<AtomicU64>, wake: Arc<tokio::sync::Notify>, owner: i64) {
    loop {
        let now = SystemTime::now();
        let until = now + Duration::from_secs(30);
        let claimed = db
            .query(
                "WITH c AS (SELECT id FROM bench_raw WHERE queue = 'raw' AND state = 'ready' \
                 AND run_at <= $1 ORDER BY priority DESC, run_at, id LIMIT 16 FOR UPDATE SKIP LOCKED) \
                 UPDATE bench_raw AS j SET state = 'running', attempts = j.attempts + 1, \
                 lease_until = $2, owner = $3 FROM c WHERE j.id = c.id RETURNING j.id, j.payload",
                &[&now, &until, &owner],
            )
            .await
            .expect("claim")
            .value;
        if claimed.is_empty() {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            continue;
        }
        let ids: Vec<i64> = claimed.iter().map(|r| r.get(0)).collect();
        db.execute(
            "DELETE FROM bench_raw WHERE id = ANY($1) AND owner = $2",
            &[&ids, &owner],
        )
        .await
        .expect("delete");
        done.fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
}

async fn wait_for(done: &AtomicU64, target: u64) {
    while done.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = setup(&rt);
    let mut group = c.benchmark_group("queue");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(BATCH));

    // The queue: 4 workers, an empty handler counting starts.
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<WorkerHandle> = rt.block_on(async {
        (0..4)
            .map(|_| {
                let done = done.clone();
                Worker::new(
                    s.queue.clone(),
                    tower::service_fn(move |_job: Job| {
                        done.fetch_add(1, Ordering::Relaxed);
                        async { Ok::<(), String>(()) }
                    }),
                )
                .concurrency(16)
                .start()
                .expect("worker")
            })
            .collect()
    });
    group.bench_function("throughput", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (queue, done) = (s.queue.clone(), done.clone());
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    let target = done.load(Ordering::Relaxed) + BATCH;
                    produce(&queue, BATCH).await;
                    wait_for(&done, target).await;
                }
                started.elapsed()
            }
        })
    });
    let (claims, processed) = workers.iter().fold((0, 0), |(c, p), w| {
        let s = w.stats();
        (c + s.claims, p + s.processed)
    });
    println!(
        "queue/throughput: {claims} claim statements for {processed} jobs ({:.2} jobs per claim)",
        processed as f64 / claims.max(1) as f64
    );
    // The raw loop on the same layout (the queue's workers idle meanwhile,
    // waiting for notifications).
    let raw_done = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(tokio::sync::Notify::new());
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            rt.spawn(raw_consumer(
                s.db.clone(),
                raw_done.clone(),
                wake.clone(),
                1_000 + i,
            ))
        })
        .collect();
    let _ = &s.raw;
    group.bench_function("raw_skip_locked", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (db, done, wake) = (s.db.clone(), raw_done.clone(), wake.clone());
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    let target = done.load(Ordering::Relaxed) + BATCH;
                    produce_raw(&db, BATCH, &wake).await;
                    wait_for(&done, target).await;
                }
                started.elapsed()
            }
        })
    });
    // Interleaved: a batch through the queue, then one through the raw
    // loop, and so on, both consumers alive all along: the ratio under the
    // same machine state (the two criterion functions run one after the
    // other on a shared machine, minutes apart).
    let mut ratios = Vec::new();
    rt.block_on(async {
        for _ in 0..INTERLEAVED_ROUNDS {
            let started = Instant::now();
            let target = done.load(Ordering::Relaxed) + BATCH;
            produce(&s.queue, BATCH).await;
            wait_for(&done, target).await;
            let queue = started.elapsed();
            let started = Instant::now();
            let target = raw_done.load(Ordering::Relaxed) + BATCH;
            produce_raw(&s.db, BATCH, &wake).await;
            wait_for(&raw_done, target).await;
            let raw = started.elapsed();
            // Throughput ratio: queue jobs/s over raw jobs/s.
            ratios.push(raw.as_secs_f64() / queue.as_secs_f64());
        }
    });
    ratios.sort_by(f64::total_cmp);
    let q = |p: f64| ratios[((ratios.len() - 1) as f64 * p).round() as usize];
    println!(
        "queue/throughput / queue/raw_skip_locked, interleaved ({INTERLEAVED_ROUNDS} rounds of {BATCH}): \
         median {:.3} (quartiles {:.3}, {:.3})",
        q(0.5),
        q(0.25),
        q(0.75)
    );
    for c in consumers {
        c.abort();
    }
    rt.block_on(async {
        for w in workers {
            w.shutdown(Duration::from_secs(5)).await;
        }
    });

    // Enqueue to start, one idle worker listening.
    group.throughput(Throughput::Elements(1));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let worker = rt.block_on(async {
        let w = Worker::new(
            s.queue.clone(),
            tower::service_fn(move |_job: Job| {
                let _ = tx.send(Instant::now());
                async { Ok::<(), String>(()) }
            }),
        )
        .concurrency(1)
        .poll_interval(Duration::from_secs(5))
        .start()
        .expect("worker");
        while !w.listening() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w
    });
    // Every latency measured, for the percentiles the issue names (p50).
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    group.bench_function("enqueue_to_start", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (queue, rx, latencies) = (s.queue.clone(), rx.clone(), latencies.clone());
            async move {
                let mut total = Duration::ZERO;
                let mut rx = rx.lock().await;
                for i in 0..iters {
                    let sent = Instant::now();
                    queue
                        .enqueue(NewJob::new(&i).expect("payload"))
                        .await
                        .expect("enqueue");
                    let started = rx.recv().await.expect("the handler ran");
                    let latency = started.duration_since(sent);
                    total += latency;
                    latencies.lock().expect("latencies").push(latency);
                }
                total
            }
        })
    });
    group.finish();
    let mut all = std::mem::take(&mut *latencies.lock().expect("latencies"));
    all.sort();
    if !all.is_empty() {
        let q = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize];
        println!(
            "queue/enqueue_to_start over {} jobs (warm-up included): p50 {:?}, p90 {:?}, p99 {:?}",
            all.len(),
            q(0.5),
            q(0.9),
            q(0.99)
        );
    }
    rt.block_on(worker.shutdown(Duration::from_secs(5)));
}

criterion_group!(queue, benches);
criterion_main!(queue);
