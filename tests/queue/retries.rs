//! Failures on an injected clock: back-off by the configuration, dead
//! letters with the last error, panics counted as failures, a dead job
//! retried, scheduled jobs waiting for their time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use tower_scale::queue::{Backoff, Job, NewJob, Queue, QueueClock, Worker};

use super::{DEADLINE, connect, shared, until};

/// The job's `run_at` and attempts, as stored.
async fn stored(db: &tower_scale::pg::Db, id: i64) -> (SystemTime, i32, String) {
    let row = db
        .read_one(
            tower_scale::pg::Consistency::Strong,
            "SELECT run_at, attempts, state FROM tower_scale_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .value;
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_back_off_by_the_configuration_then_die_with_their_last_error() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    // Whole milliseconds: timestamptz keeps microseconds.
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let clock = QueueClock::manual(start);
    let queue = Queue::builder(db.clone(), "retries")
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if job.payload == "panic" {
                    panic!("boom at attempt {}", job.attempt);
                }
                Err::<(), String>(format!("failed attempt {}", job.attempt))
            }
        }),
    )
    .backoff(Backoff::new(Duration::from_secs(10), Duration::from_secs(25)).without_jitter())
    .poll_interval(Duration::from_millis(20))
    .start()
    .unwrap();
    let id = queue
        .enqueue(NewJob::new(&"fail").unwrap().max_attempts(3))
        .await
        .unwrap()
        .id;
    // Attempt n fails; the next is due 10 s · 2^(n-1) later (at most 25 s).
    let mut now = start;
    for (attempt, wait) in [(1, 10), (2, 20)] {
        until(
            "the attempt failed and was rescheduled",
            DEADLINE,
            async || {
                stored(&db, id.0).await
                    == (now + Duration::from_secs(wait), attempt, "ready".into())
            },
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), attempt as u32);
        // Not due a microsecond early: polls come and go, nothing runs.
        clock.advance(Duration::from_secs(wait) - Duration::from_micros(1));
        let claims = worker.stats().claims;
        until("three more polls", DEADLINE, async || {
            worker.stats().claims >= claims + 3
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), attempt as u32, "ran early");
        clock.advance(Duration::from_micros(1));
        now += Duration::from_secs(wait);
    }
    until("the last attempt made it dead", DEADLINE, async || {
        stored(&db, id.0).await.2 == "dead"
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let dead = queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error.as_deref(), Some("failed attempt 3"));
    let s = worker.stats();
    assert_eq!(
        (s.failed, s.retried, s.dead, s.processed),
        (3, 2, 1, 0),
        "{s:?}"
    );

    // A panic is a failure like any other.
    let p = queue
        .enqueue(NewJob::new(&"panic").unwrap().max_attempts(1))
        .await
        .unwrap()
        .id;
    until("the panicking job is dead", DEADLINE, async || {
        stored(&db, p.0).await.2 == "dead"
    })
    .await;
    let dead = queue.dead_jobs(10).await.unwrap();
    let panicked = dead.iter().find(|d| d.id == p).unwrap();
    assert_eq!(
        panicked.last_error.as_deref(),
        Some("the handler panicked: boom at attempt 1")
    );

    // A dead job retried gets its attempts back and runs at once.
    assert!(queue.retry_dead(id).await.unwrap());
    assert!(!queue.retry_dead(id).await.unwrap(), "no longer dead");
    until("the retried job ran", DEADLINE, async || {
        calls.load(Ordering::SeqCst) == 5
    })
    .await;
    assert_eq!(stored(&db, id.0).await.1, 1, "attempts counted afresh");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_waits_for_its_time_and_priority_orders_due_jobs() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let clock = QueueClock::manual(start);
    let queue = Queue::builder(db.clone(), "scheduled")
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let later = queue
        .enqueue(
            NewJob::new(&"later")
                .unwrap()
                .run_after(Duration::from_secs(60)),
        )
        .await
        .unwrap()
        .id;
    for (name, priority) in [("low", -1), ("high", 5), ("mid", 0)] {
        queue
            .enqueue(NewJob::new(&name).unwrap().priority(priority))
            .await
            .unwrap();
    }
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = order.clone();
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            o.lock()
                .unwrap()
                .push(job.payload.as_str().unwrap_or("?").to_string());
            async { Ok::<(), String>(()) }
        }),
    )
    .concurrency(1)
    .batch(1)
    .poll_interval(Duration::from_millis(20))
    .start()
    .unwrap();
    until("the due jobs ran", DEADLINE, async || {
        order.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(*order.lock().unwrap(), ["high", "mid", "low"]);
    let (run_at, _, state) = stored(&db, later.0).await;
    assert_eq!(
        (run_at, state.as_str()),
        (start + Duration::from_secs(60), "ready")
    );
    clock.advance(Duration::from_secs(60));
    until("the scheduled job ran", DEADLINE, async || {
        order.lock().unwrap().len() == 4
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
}
