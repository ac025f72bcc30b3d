//! The job queue under sustained load: a million jobs enqueued and done,
//! and the jobs table's size along the way (done jobs are deleted in
//! batches; autovacuum, set on the table to run at 1% dead rows, makes
//! the space reusable).
//!
//! ```text
//! cargo run --release --features full --example queue_soak            # 1,000,000 jobs
//! cargo run --release --features full --example queue_soak -- --jobs 200000 --max-seconds 300
//! ```
//!
//! Starts its own PostgreSQL (LocalCluster, no replica), 4 producer tasks
//! enqueueing one job per statement and 4 workers (8 slots each) with an
//! empty handler. Every tenth of the run it prints jobs done, the rate,
//! the table's total size (heap + indexes + TOAST), live and dead rows and
//! autovacuum runs; at the end, the size after a manual `VACUUM` too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower_scale::pg::{Cluster, Consistency, Db, NodeConfig};
use tower_scale::queue::{Job, NewJob, Queue, Worker};
use tower_scale::testing::LocalCluster;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn flag(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()
            .map_err(|e| format!("{name}: {e}")),
    }
}

async fn table_figures(db: &Db) -> Result<String, BoxError> {
    let row = db
        .read_one(
            Consistency::Strong,
            "SELECT pg_total_relation_size('tower_scale_jobs'), n_live_tup, n_dead_tup, \
                    autovacuum_count \
             FROM pg_stat_user_tables WHERE relname = 'tower_scale_jobs'",
            &[],
        )
        .await?
        .value;
    let (size, live, dead, vacuums): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    Ok(format!(
        "table {:.1} MiB, live rows {live}, dead rows {dead}, autovacuums {vacuums}",
        size as f64 / (1 << 20) as f64
    ))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (jobs, max_seconds) = match (
        flag(&args, "--jobs", 1_000_000),
        flag(&args, "--max-seconds", 900),
    ) {
        (Ok(j), Ok(m)) if j > 0 && m > 0 => (j, m),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("queue_soak: {e}\nusage: queue_soak [--jobs N] [--max-seconds S]");
            std::process::exit(2);
        }
        _ => {
            eprintln!("usage: queue_soak [--jobs N>0] [--max-seconds S>0]");
            std::process::exit(2);
        }
    };
    let local = LocalCluster::start(0)?;
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .pool_size(16)
        .build()
        .await?;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "soak").build().await?;
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let done = done.clone();
            Worker::new(
                queue.clone(),
                tower::service_fn(move |_job: Job| {
                    done.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<(), String>(()) }
                }),
            )
            .concurrency(8)
            .start()
        })
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(max_seconds);
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..4u64 {
        let queue = queue.clone();
        producers.spawn(async move {
            let mut i = p;
            while i < jobs && Instant::now() < deadline {
                queue.enqueue(NewJob::new(&i)?).await?;
                i += 4;
            }
            Ok::<(), tower_scale::queue::QueueError>(())
        });
    }
    println!("queue_soak: {jobs} jobs, 4 producers, 4 workers x 8 slots, at most {max_seconds} s");
    let step = (jobs / 10).max(1);
    let mut next = step;
    let mut last = (Instant::now(), 0u64);
    while done.load(Ordering::Relaxed) < jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = done.load(Ordering::Relaxed);
        if n >= next {
            let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
            println!(
                "{n:>9} done after {:>6.1} s ({rate:.0} jobs/s): {}",
                started.elapsed().as_secs_f64(),
                table_figures(&db).await?
            );
            last = (Instant::now(), n);
            next += step;
        }
    }
    while let Some(p) = producers.join_next().await {
        p??;
    }
    for w in workers {
        w.shutdown(Duration::from_secs(10)).await;
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "queue_soak: {n} jobs done in {:.1} s ({:.0} jobs/s overall); {}",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64(),
        table_figures(&db).await?
    );
    db.execute("VACUUM tower_scale_jobs", &[]).await?;
    println!("after VACUUM: {}", table_figures(&db).await?);
    Ok(())
}
