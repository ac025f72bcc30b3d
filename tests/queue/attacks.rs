//! The cases an attack review of the queue tried: a NUL in an error, a
//! lease lost while the handler still runs, a grace longer than the lease,
//! out-of-range settings, a handler that never ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tower_scale::pg::Consistency;
use tower_scale::queue::{Backoff, Job, NewJob, Queue, QueueClock, Worker};

use super::{DEADLINE, Ledger, connect, shared, until};

async fn row(db: &tower_scale::pg::Db, id: i64) -> Option<(String, i32, Option<String>)> {
    db.read_opt(
        Consistency::Strong,
        "SELECT state, attempts, last_error FROM tower_scale_jobs WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .value
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_one_error_does_not_block_the_others() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let clock = QueueClock::manual(SystemTime::now());
    let queue = Queue::builder(db.clone(), "nul")
        .clock(clock)
        .build()
        .await
        .unwrap();
    // jsonb cannot hold a NUL: refused before it reaches the database
    // (inside a caller's transaction, an error there would abort it).
    let err = queue
        .enqueue(NewJob::new(&"a\0b").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
    let a = queue
        .enqueue(NewJob::new(&"nul").unwrap())
        .await
        .unwrap()
        .id
        .0;
    let b = queue
        .enqueue(NewJob::new(&"plain").unwrap())
        .await
        .unwrap()
        .id
        .0;
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(|job: Job| async move {
            let text = job.payload.as_str().unwrap_or("?");
            Err::<(), String>(if text == "nul" {
                "a\0b".into()
            } else {
                text.to_string()
            })
        }),
    )
    .poll_interval(Duration::from_millis(20))
    .start()
    .unwrap();
    until("both rescheduled", DEADLINE, async || {
        matches!(row(&db, a).await, Some((s, 1, _)) if s == "ready")
            && matches!(row(&db, b).await, Some((s, 1, _)) if s == "ready")
    })
    .await;
    assert_eq!(row(&db, a).await.unwrap().2.as_deref(), Some("a\u{FFFD}b"));
    assert_eq!(row(&db, b).await.unwrap().2.as_deref(), Some("plain"));
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_run_cannot_settle_the_live_claim_of_the_same_job() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let clock = QueueClock::manual(SystemTime::now());
    let queue = Queue::builder(db.clone(), "stale")
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let id = queue.enqueue(NewJob::new(&1).unwrap()).await.unwrap().id.0;
    // Each call waits for its own permit and then fails (first) or succeeds.
    let (gates, calls) = (
        Arc::new([Semaphore::new(0), Semaphore::new(0)]),
        Arc::new(AtomicU32::new(0)),
    );
    let (g, c) = (gates.clone(), calls.clone());
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            let (g, n) = (g.clone(), c.fetch_add(1, Ordering::SeqCst) as usize);
            async move {
                let _ = g[n.min(1)].acquire().await;
                if job.attempt == 1 {
                    Err::<(), String>("stale".into())
                } else {
                    Ok(())
                }
            }
        }),
    )
    .concurrency(2)
    // Renewed every 20 s of real time: never within this test.
    .lease(Duration::from_secs(60))
    .poll_interval(Duration::from_millis(20))
    .start()
    .unwrap();
    until("the first run started", DEADLINE, async || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    clock.advance(Duration::from_secs(61));
    until(
        "the lease ran out and the job runs again",
        DEADLINE,
        async || calls.load(Ordering::SeqCst) == 2,
    )
    .await;
    assert_eq!(
        row(&db, id).await.map(|r| (r.0, r.1)),
        Some(("running".into(), 2))
    );
    // The stale run fails: the live claim must stay as it is.
    gates[0].add_permits(1);
    until("the stale failure was settled", DEADLINE, async || {
        worker.stats().failed == 1
    })
    .await;
    let claims = worker.stats().claims;
    until("two more loops", DEADLINE, async || {
        worker.stats().claims >= claims + 2
    })
    .await;
    assert_eq!(
        row(&db, id).await.map(|r| (r.0, r.1)),
        Some(("running".into(), 2))
    );
    // The live run succeeds: the job is done, once.
    gates[1].add_permits(1);
    until("the job is deleted", DEADLINE, async || {
        row(&db, id).await.is_none()
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_longer_than_the_lease_keeps_the_leases() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "grace").build().await.unwrap();
    let ledger = Ledger::default();
    let handler = |ledger: Ledger| {
        tower::service_fn(move |job: Job| {
            ledger.record(&job);
            async {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                Ok::<(), String>(())
            }
        })
    };
    let first = Worker::new(queue.clone(), handler(ledger.clone()))
        .lease(Duration::from_millis(300))
        .concurrency(3)
        .start()
        .unwrap();
    for i in 0..3 {
        queue.enqueue(NewJob::new(&i).unwrap()).await.unwrap();
    }
    until("three jobs started", DEADLINE, async || ledger.len() == 3).await;
    // Another worker watches for expired leases meanwhile.
    let second = Worker::new(queue.clone(), handler(ledger.clone()))
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(20))
        .start()
        .unwrap();
    let report = first.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (report.finished, report.released, report.unsettled),
        (3, 0, 0),
        "{report:?}"
    );
    second.shutdown(Duration::from_secs(5)).await;
    let twice: Vec<_> = ledger
        .snapshot()
        .into_iter()
        .filter(|(_, e)| e.0 > 1)
        .collect();
    assert!(twice.is_empty(), "ran twice during the grace: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_settings_are_errors_and_a_hung_handler_times_out() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "ranges").build().await.unwrap();
    let ok = || tower::service_fn(|_job: Job| async { Ok::<(), String>(()) });
    assert!(
        queue
            .enqueue(NewJob::new(&1).unwrap().run_after(Duration::MAX))
            .await
            .is_err()
    );
    for w in [
        Worker::new(queue.clone(), ok()).poll_interval(Duration::MAX),
        Worker::new(queue.clone(), ok()).lease(Duration::MAX),
        Worker::new(queue.clone(), ok()).concurrency(0),
        Worker::new(queue.clone(), ok()).timeout(Duration::ZERO),
    ] {
        assert!(w.start().is_err());
    }
    let long = format!("{}.{}", "s".repeat(30), "t".repeat(40));
    let err = Queue::builder(db.clone(), "x")
        .table(long)
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("63 bytes"), "{err}");

    let id = queue
        .enqueue(NewJob::new(&"hang").unwrap().max_attempts(1))
        .await
        .unwrap()
        .id;
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(|_job: Job| std::future::pending::<Result<(), String>>()),
    )
    .timeout(Duration::from_millis(100))
    .backoff(Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(10),
    ))
    .start()
    .unwrap();
    until(
        "the hung job is dead",
        DEADLINE,
        async || matches!(row(&db, id.0).await, Some((s, _, _)) if s == "dead"),
    )
    .await;
    let last = row(&db, id.0).await.unwrap().2.unwrap_or_default();
    assert!(last.contains("timed out after 100ms"), "{last}");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_dropped_mid_flight_still_wakes_a_worker_if_it_committed() {
    let local = crate::shared();
    let cluster = crate::connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "dropped_enqueue")
        .build()
        .await
        .unwrap();
    let ran = Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<i64>::new(),
    ));
    let r = ran.clone();
    // Polling once a minute: only a notification can wake it in time.
    let worker = Worker::new(
        queue.clone(),
        tower::service_fn(move |job: Job| {
            r.lock().unwrap().insert(job.payload.as_i64().unwrap_or(-1));
            async { Ok::<(), String>(()) }
        }),
    )
    .poll_interval(Duration::from_secs(60))
    .start()
    .unwrap();
    crate::until("the worker listens", crate::DEADLINE, async || {
        worker.listening()
    })
    .await;
    let (mut cut, mut cut_ran, mut cut_polled) = (0, 0, 0);
    for i in 0..40i64 {
        // The first notifies; the second, sent while the first is in
        // flight and inside the window, owes a trailing notification, and
        // its future is sometimes dropped mid-flight (after its statement
        // was sent, or its commit). (`join!` polls the first first: it
        // asks the gate before the second does.)
        let a = queue.enqueue(NewJob::new(&(i * 2)).unwrap());
        let b = i * 2 + 1;
        let wait = Duration::from_micros(50 * (i as u64 % 10));
        let cut_b = tokio::time::timeout(wait, queue.enqueue(NewJob::new(&b).unwrap()));
        let (a, cut_b) = tokio::join!(a, cut_b);
        a.unwrap();
        let completed = cut_b.is_ok();
        let ran_b = async || ran.lock().unwrap().contains(&b);
        if completed {
            // Answered: it runs on a notification, never left to polling.
            until("an enqueued job ran", Duration::from_secs(10), ran_b).await;
            continue;
        }
        cut += 1;
        let exists = async || {
            db.read_one(
                Consistency::Strong,
                "SELECT count(*) FROM tower_scale_jobs WHERE queue = 'dropped_enqueue' \
                 AND payload = to_jsonb($1::int8)",
                &[&b],
            )
            .await
            .unwrap()
            .value
            .get::<_, i64>(0)
                > 0
        };
        // Cut: if it committed, the owed notification wakes a worker,
        // unless the commit came after it (then polling finds it).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            if ran_b().await {
                cut_ran += 1;
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                if exists().await {
                    cut_polled += 1;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "dropped enqueues: {cut} of 40 cut mid-flight; {cut_ran} of those committed and ran on a \
         notification, {cut_polled} committed after it (left to polling)"
    );
    worker.shutdown(Duration::from_secs(5)).await;
}

/// A `LISTEN` session on `channel` of `local`'s primary (kept while the
/// client lives), counting the notifications it receives.
async fn listen_count(
    local: &tower_scale::testing::LocalCluster,
    channel: &str,
) -> (tokio_postgres::Client, Arc<AtomicU32>) {
    let (client, mut conn) = local
        .primary()
        .config()
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let count = Arc::new(AtomicU32::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if matches!(message, tokio_postgres::AsyncMessage::Notification(_)) {
                c.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("listen");
    (client, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_that_overlaps_another_is_followed_by_a_notification() {
    let local = shared();
    let cluster = connect(&local).await;
    let db = cluster.db();
    let queue = Queue::builder(db.clone(), "overlap")
        .table("overlap_jobs")
        .build()
        .await
        .unwrap();
    let (_session, count) = listen_count(&local, "overlap_jobs").await;
    // A job with key "k" held by an open transaction: a standalone
    // enqueue of the same key waits for it, in flight all along.
    let tx = db.transaction().await.unwrap();
    queue
        .enqueue_in(&tx, NewJob::new(&0).unwrap().idempotency_key("k"))
        .await
        .unwrap();
    let blocked = tokio::spawn({
        let queue = queue.clone();
        async move {
            queue
                .enqueue(NewJob::new(&1).unwrap().idempotency_key("k"))
                .await
        }
    });
    until("the keyed enqueue waits", DEADLINE, async || {
        db.read_one(
            Consistency::Strong,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '%INSERT INTO \"overlap_jobs\"%'",
            &[],
        )
        .await
        .unwrap()
        .value
        .get::<_, i64>(0)
            == 1
    })
    .await;
    // Two enqueues while it is in flight: the first notifies (the window
    // of the keyed one has passed), the second, inside the first's window,
    // owes a trailing notification (past it, it notifies itself): either
    // way one more notification follows its commit.
    let before = count.load(Ordering::SeqCst);
    queue.enqueue(NewJob::new(&2).unwrap()).await.unwrap();
    queue.enqueue(NewJob::new(&3).unwrap()).await.unwrap();
    until("a notification for each", DEADLINE, async || {
        count.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    assert!(
        !blocked.is_finished(),
        "the keyed enqueue was in flight all along"
    );
    tx.rollback().await.unwrap();
    blocked.await.unwrap().unwrap();
}
