//! The job queue against real servers (LocalCluster): enqueue with the
//! write's transaction, 10,000 jobs each done once, read-your-writes from
//! a delayed replica, retries and dead letters on an injected clock, a
//! SIGKILLed worker process, graceful shutdown under load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::queue::{Job, NewJob, Queue, QueueClock, Worker};
use tower_scale::testing::LocalCluster;

#[path = "../common/mod.rs"]
mod common;

mod attacks;
mod faults;
mod retries;

pub(crate) use common::until;

pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// The cluster every test that does not break it shares (one replica).
pub(crate) fn shared() -> Arc<LocalCluster> {
    LocalCluster::shared("queue", || LocalCluster::builder().replicas(1)).unwrap()
}

pub(crate) async fn connect(local: &LocalCluster) -> Cluster {
    let mut builder = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .probe_interval(Duration::from_millis(50));
    for replica in local.replicas() {
        builder = builder.replica(NodeConfig::new(replica.config()));
    }
    builder.build().await.expect("cluster")
}

/// Each job's id and how many times its handler ran, with the time from
/// enqueue to start.
#[derive(Clone, Default)]
pub(crate) struct Ledger(Arc<Mutex<HashMap<i64, (u32, Duration)>>>);

impl Ledger {
    pub(crate) fn record(&self, job: &Job) {
        let waited = SystemTime::now()
            .duration_since(job.enqueued_at)
            .unwrap_or_default();
        let mut m = self.0.lock().unwrap();
        let e = m.entry(job.id.0).or_insert((0, waited));
        e.0 += 1;
    }
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub(crate) fn runs(&self, id: i64) -> u32 {
        self.0.lock().unwrap().get(&id).map_or(0, |e| e.0)
    }
    pub(crate) fn snapshot(&self) -> HashMap<i64, (u32, Duration)> {
        self.0.lock().unwrap().clone()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_enqueue_never_runs_and_a_committed_one_always_does() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    db.execute(
        "CREATE TABLE IF NOT EXISTS q_users (id bigint PRIMARY KEY, name text)",
        &[],
    )
    .await
    .unwrap();
    let queue = Queue::builder(db.clone(), "txn").build().await.unwrap();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            l.record(&job);
            async { Ok::<(), String>(()) }
        }),
    )
    .start()
    .unwrap();
    let mut committed = Vec::new();
    for i in 0..20i64 {
        let tx = db.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO q_users VALUES ($1, 'x') ON CONFLICT DO NOTHING",
            &[&i],
        )
        .await
        .unwrap();
        let job = queue
            .enqueue_in(&tx, NewJob::new(&serde_json::json!({ "user": i })).unwrap())
            .await
            .unwrap();
        assert!(job.created && job.token.is_none());
        if i % 2 == 0 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.push(job.id.0);
        }
    }
    until("every committed job ran", DEADLINE, async || {
        ledger.len() == committed.len()
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    let ran = ledger.snapshot();
    for id in &committed {
        assert_eq!(ran.get(id).map(|e| e.0), Some(1), "job {id}");
    }
    assert_eq!(ran.len(), committed.len(), "a rolled-back job ran: {ran:?}");
    let depth = queue.depth().await.unwrap();
    assert_eq!(
        (depth.ready, depth.running, depth.scheduled),
        (0, 0, 0),
        "{depth:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_from_eight_tasks_are_each_done_once_by_four_workers() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "bulk").build().await.unwrap();
    let ledger = Ledger::default();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let l = ledger.clone();
            Worker::new(
                queue.clone(),
                tower::service_fn(move |job: Job| {
                    l.record(&job);
                    async { Ok::<(), String>(()) }
                }),
            )
            .concurrency(8)
            .start()
            .unwrap()
        })
        .collect();
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for t in 0..8 {
        let queue = queue.clone();
        producers.spawn(async move {
            let mut ids = Vec::new();
            for i in 0..1250 {
                let job = NewJob::new(&serde_json::json!({ "t": t, "i": i })).unwrap();
                ids.push(queue.enqueue(job).await.unwrap().id.0);
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = producers.join_next().await {
        ids.extend(done.unwrap());
    }
    let enqueued = started.elapsed();
    until("10,000 jobs done", Duration::from_secs(120), async || {
        ledger.len() == 10_000
    })
    .await;
    let total = started.elapsed();
    let (mut processed, mut claims) = (0, 0);
    for w in workers {
        processed += w.stats().processed;
        claims += w.stats().claims;
        let report = w.shutdown(Duration::from_secs(5)).await;
        assert_eq!(report.unsettled, 0, "{report:?}");
    }
    let ran = ledger.snapshot();
    let twice: Vec<_> = ran.iter().filter(|(_, e)| e.0 != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    for id in &ids {
        assert!(ran.contains_key(id), "job {id} never ran");
    }
    let mut waits: Vec<Duration> = ran.values().map(|e| e.1).collect();
    waits.sort();
    println!(
        "10,000 jobs: enqueued in {enqueued:?}, all done after {total:?} ({:.0} jobs/s); \
         enqueue to start p50 {:?}, p99 {:?}; {processed} deleted by the workers so far, \
         {claims} claim statements",
        10_000.0 / total.as_secs_f64(),
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
    );
    until("every done job deleted", DEADLINE, async || {
        let d = queue.depth().await.unwrap();
        d.ready + d.running + d.scheduled == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_enqueues_once_while_the_job_exists() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let clock = QueueClock::manual(SystemTime::now());
    let queue = Queue::builder(db.clone(), "idem")
        .clock(clock)
        .build()
        .await
        .unwrap();
    let job = || {
        NewJob::new(&serde_json::json!({ "n": 1 }))
            .unwrap()
            .idempotency_key("welcome:1")
            .run_after(Duration::from_secs(3600))
    };
    let first = queue.enqueue(job()).await.unwrap();
    let second = queue.enqueue(job()).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.id, second.id);
    let tx = db.transaction().await.unwrap();
    let third = queue.enqueue_in(&tx, job()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((third.id, third.created), (first.id, false));
    let other = queue
        .enqueue(job().idempotency_key("welcome:2"))
        .await
        .unwrap();
    assert!(other.created && other.id != first.id);
    assert_eq!(queue.depth().await.unwrap().scheduled, 2);
    // Bad jobs are refused before reaching the database.
    assert!(queue.enqueue(job().idempotency_key("")).await.is_err());
    assert!(queue.enqueue(job().max_attempts(0)).await.is_err());
    assert!(
        Queue::builder(db.clone(), "x")
            .table("Bad;Name")
            .build()
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_enqueues_wakes_workers_for_every_job_with_fewer_notifications() {
    let local = shared();
    let cluster = connect(&local).await;
    let queue = Queue::builder(cluster.db(), "burst").build().await.unwrap();
    let ledger = Ledger::default();
    let l = ledger.clone();
    // Polling once a minute: every job must be found by a notification,
    // the trailing ones included.
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            l.record(&job);
            async { Ok::<(), String>(()) }
        }),
    )
    .concurrency(8)
    .poll_interval(Duration::from_secs(60))
    .start()
    .unwrap();
    until("the worker listens", DEADLINE, async || worker.listening()).await;
    for round in 0..3 {
        let mut tasks = tokio::task::JoinSet::new();
        for p in 0..4 {
            let queue = queue.clone();
            tasks.spawn(async move {
                let mut ids = Vec::new();
                for i in 0..50 {
                    let job = NewJob::new(&(round * 1000 + p * 100 + i)).unwrap();
                    ids.push(queue.enqueue(job).await.unwrap().id.0);
                }
                ids
            });
        }
        let mut ids = Vec::new();
        while let Some(batch) = tasks.join_next().await {
            ids.extend(batch.unwrap());
        }
        let enqueued = Instant::now();
        until(
            "every job of the burst ran",
            Duration::from_secs(30),
            async || ids.iter().all(|id| ledger.runs(*id) == 1),
        )
        .await;
        println!(
            "a burst of 200 enqueues (round {round}): the last job ran {:?} after the last enqueue; {} claims so far",
            enqueued.elapsed(),
            worker.stats().claims
        );
    }
    let claims = worker.stats().claims;
    worker.shutdown(Duration::from_secs(5)).await;
    assert!(claims < 600, "{claims} claims for 600 jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_wake_on_notify_and_find_jobs_by_polling_without_it() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    for (name, listen) in [("wake-notify", true), ("wake-poll", false)] {
        let queue = Queue::builder(db.clone(), name).build().await.unwrap();
        let ledger = Ledger::default();
        let l = ledger.clone();
        // Notify only: a poll every minute would miss the deadline.
        let poll = if listen {
            Duration::from_secs(60)
        } else {
            Duration::from_millis(50)
        };
        let worker = Worker::new(
            queue.clone(),
            tower::service_fn(move |job: Job| {
                l.record(&job);
                async { Ok::<(), String>(()) }
            }),
        )
        .listen(listen)
        .poll_interval(poll)
        .start()
        .unwrap();
        if listen {
            until("the worker listens", DEADLINE, async || worker.listening()).await;
        }
        let mut latencies = Vec::new();
        for i in 0..20 {
            let enqueued = Instant::now();
            let id = queue.enqueue(NewJob::new(&i).unwrap()).await.unwrap().id.0;
            until(
                &format!("{name}: job {i} ran"),
                Duration::from_secs(20),
                async || ledger.runs(id) == 1,
            )
            .await;
            latencies.push(enqueued.elapsed());
        }
        latencies.sort();
        println!(
            "{name}: enqueue to start p50 {:?}, max {:?}",
            percentile(&latencies, 0.5),
            latencies[latencies.len() - 1]
        );
        worker.shutdown(Duration::from_secs(5)).await;
    }
}
