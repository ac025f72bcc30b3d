//! Faults: a replica behind by a second, a worker process SIGKILLed
//! mid-job, a shutdown under load.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::queue::{Job, NewJob, Queue, Worker};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, Ledger, connect, shared, until};

/// Enqueues `n` jobs, each in the transaction that inserts the row it
/// names, and runs them; returns how many reads a replica served.
async fn read_your_jobs_writes(cluster: &Cluster, table: &str, n: i64) -> usize {
    let db = cluster.db();
    db.execute(
        &format!("CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, v text)"),
        &[],
    )
    .await
    .unwrap();
    let queue = Queue::builder(db.clone(), table).build().await.unwrap();
    let (seen, by_replica) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, r) = (seen.clone(), by_replica.clone());
    let sql = format!("SELECT v FROM {table} WHERE id = $1");
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            let (s, r, sql) = (s.clone(), r.clone(), sql.clone());
            async move {
                let id = job.payload["id"].as_i64().unwrap_or(-1);
                let read = job
                    .db
                    .read_opt(&sql, &[&id])
                    .await
                    .map_err(|e| e.to_string())?;
                match read.value {
                    Some(row) if row.get::<_, String>(0) == format!("row {id}") => {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    other => panic!("job {id} read {other:?} from {}", read.served_by),
                }
                if !read.served_by.contains("primary") {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<(), String>(())
            }
        }),
    )
    .concurrency(8)
    .start()
    .unwrap();
    for id in 0..n {
        let tx = db.transaction().await.unwrap();
        tx.execute(
            &format!("INSERT INTO {table} VALUES ($1, $2)"),
            &[&id, &format!("row {id}")],
        )
        .await
        .unwrap();
        queue
            .enqueue_in(&tx, NewJob::new(&serde_json::json!({ "id": id })).unwrap())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    until("every job read its row", DEADLINE, async || {
        seen.load(Ordering::SeqCst) == n as usize
    })
    .await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.unsettled, 0);
    let dead = queue.dead_jobs(10).await.unwrap();
    assert!(dead.is_empty(), "{dead:?}");
    by_replica.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sees_its_enqueueing_write_through_a_replica_a_second_behind() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .unwrap();
    let mut builder = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .replica(NodeConfig::new(local.replica(0).config()))
        .probe_interval(Duration::from_millis(50))
        .read_your_writes_wait(Duration::from_millis(50));
    builder = builder.pool_size(16);
    let cluster = builder.build().await.unwrap();
    let by_replica = read_your_jobs_writes(&cluster, "q_delayed", 200).await;
    println!("replica 1 s behind: 200/200 jobs saw their row, {by_replica} read on the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_in_step_most_job_reads_go_to_it() {
    let local = shared();
    let cluster = connect(&local).await;
    let by_replica = read_your_jobs_writes(&cluster, "q_in_step", 200).await;
    println!("replica in step: 200/200 jobs saw their row, {by_replica} read on the replica");
    assert!(
        by_replica >= 160,
        "only {by_replica}/200 reads on the replica"
    );
}

/// The worker process `a_worker_killed_mid_job...` starts and kills: it
/// claims one job and hangs in it. Runs only when started by that test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_worker_killed_mid_job_loses_its_lease_and_the_job_runs_again"]
async fn child_worker() {
    let Ok(url) = std::env::var("TOWER_SCALE_QUEUE_CHILD") else {
        return;
    };
    let cluster = Cluster::builder()
        .primary(NodeConfig::from_url(&url).unwrap())
        .build()
        .await
        .unwrap();
    let queue = Queue::builder(cluster.db(), "killed")
        .build()
        .await
        .unwrap();
    let _worker = Worker::new(
        queue,
        tower::service_fn(|job: Job| async move {
            println!("started job {} attempt {}", job.id, job.attempt);
            std::future::pending::<Result<(), String>>().await
        }),
    )
    .lease(Duration::from_secs(1))
    .poll_interval(Duration::from_millis(20))
    .start()
    .unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_its_lease_and_the_job_runs_again() {
    let local = shared();
    let cluster = connect(&local).await;
    let queue = Queue::builder(cluster.db(), "killed")
        .build()
        .await
        .unwrap();
    let id = queue
        .enqueue(NewJob::new(&"work").unwrap())
        .await
        .unwrap()
        .id;
    /// Kills the child however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "faults::child_worker",
            "--ignored",
            "--nocapture",
        ])
        .env("TOWER_SCALE_QUEUE_CHILD", local.primary().url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = Kill(child);
    let expected = format!("started job {id} attempt 1");
    let started = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line == expected)
        }),
    )
    .await
    .expect("the child started the job in time")
    .unwrap();
    assert!(started, "the child never started the job");
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let killed = Instant::now();

    let ledger = Ledger::default();
    let l = ledger.clone();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            l.record(&job);
            a.store(job.attempt as usize, Ordering::SeqCst);
            async { Ok::<(), String>(()) }
        }),
    )
    .poll_interval(Duration::from_millis(50))
    .start()
    .unwrap();
    until("the job ran again", DEADLINE, async || {
        ledger.runs(id.0) == 1
    })
    .await;
    println!(
        "worker SIGKILLed mid-job: the job ran again {:?} later (lease 1 s)",
        killed.elapsed()
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "the lost attempt counted"
    );
    worker.shutdown(Duration::from_secs(5)).await;
    let d = queue.depth().await.unwrap();
    assert_eq!((d.ready, d.running, d.dead), (0, 0, 0), "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_under_load_leaves_no_job_claimed_without_an_owner() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "shutdown")
        .build()
        .await
        .unwrap();
    for i in 0..300u64 {
        queue.enqueue(NewJob::new(&i).unwrap()).await.unwrap();
    }
    let ledger = Ledger::default();
    let handler = |ledger: Ledger| {
        tower::service_fn(move |job: Job| {
            ledger.record(&job);
            // Work of 0 to 40 ms, fixed per job.
            let ms = (job.id.0 as u64).wrapping_mul(0x9E37_79B9) % 41;
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<(), String>(())
            }
        })
    };
    let first = Worker::new(queue.clone(), handler(ledger.clone()))
        .concurrency(8)
        .start()
        .unwrap();
    until("some jobs done", DEADLINE, async || {
        first.stats().processed >= 40
    })
    .await;
    let owner = first.owner();
    let stopped = first.shutdown(Duration::from_millis(10)).await;
    println!("shutdown under load: {stopped:?}");
    let report = stopped;
    assert_eq!(report.unsettled, 0);
    let held: i64 = db
        .read_one(
            tower_scale::pg::Consistency::Strong,
            "SELECT count(*) FROM tower_scale_jobs WHERE owner = $1",
            &[&owner],
        )
        .await
        .unwrap()
        .value
        .get(0);
    assert_eq!(held, 0, "jobs still claimed by the stopped worker");
    // Another worker, with time to finish: every job done, none lost.
    let second = Worker::new(queue.clone(), handler(ledger.clone()))
        .concurrency(8)
        .start()
        .unwrap();
    until("every job done", DEADLINE, async || ledger.len() == 300).await;
    let last = second.shutdown(Duration::from_secs(10)).await;
    assert_eq!((last.released, last.unsettled), (0, 0), "{last:?}");
    until("every job deleted", DEADLINE, async || {
        let d = queue.depth().await.unwrap();
        d.ready + d.running == 0
    })
    .await;
    let again: usize = ledger.snapshot().values().filter(|e| e.0 > 1).count();
    assert!(
        again as u64 <= report.released + 8,
        "{again} jobs ran twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_workers_wake_on_the_new_primarys_notifications() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "failover_wake")
        .build()
        .await
        .unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    // Polling once a minute: only a notification can wake it in time.
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |_job: Job| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), String>(()) }
        }),
    )
    .poll_interval(Duration::from_secs(60))
    .start()
    .unwrap();
    until("the worker listens", DEADLINE, async || worker.listening()).await;
    queue.enqueue(NewJob::new(&0).unwrap()).await.unwrap();
    until("the first job ran", DEADLINE, async || {
        ran.load(Ordering::SeqCst) == 1
    })
    .await;
    // The old primary stalls (its listening session stays open, silent)
    // and the replica is promoted: the monitor moves the primary.
    local.primary().pause().unwrap();
    local.replica(0).promote().await.unwrap();
    until(
        "the promoted replica is the primary",
        DEADLINE,
        async || {
            cluster.status().iter().any(|n| {
                n.name == "replica-1" && n.healthy && n.role == tower_scale::pg::Role::Primary
            })
        },
    )
    .await;
    let moved = Instant::now();
    until("the worker listens again", DEADLINE, async || {
        worker.listening()
    })
    .await;
    let enqueued = Instant::now();
    queue.enqueue(NewJob::new(&1).unwrap()).await.unwrap();
    // The old session's own check would end it after 10 s and more: the
    // move ends it at once.
    until(
        "the job enqueued on the new primary ran",
        Duration::from_secs(8),
        async || ran.load(Ordering::SeqCst) == 2,
    )
    .await;
    println!(
        "after a failover: listening again {:?} after the move, a job started {:?} after its enqueue",
        enqueued - moved,
        enqueued.elapsed()
    );
    local.primary().resume().unwrap();
    worker.shutdown(Duration::from_secs(5)).await;
}
