//! [`Worker`]: a tower `Service<Job>` run over a queue: claims with
//! `SKIP LOCKED` under a lease it renews, settles in batches, retries with
//! back-off, dead-letters, and shuts down gracefully.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::handle::Queue;
use super::job::{Job, JobDb};
use super::stats::{Counters, WorkerStats};
use super::time::Backoff;
use super::{JobId, QueueError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a `Service<Job>` over a [`Queue`]: up to
/// [`concurrency`](Self::concurrency) jobs at a time, each claimed under a
/// lease the worker renews while the job runs.
///
/// - **At least once**: a job is removed only after its handler returned
///   `Ok`. A worker that dies mid-job stops renewing its lease, and when
///   the lease runs out the job is due again for any worker (an attempt
///   is counted). Make handlers idempotent: key their effects by the
///   job's id (an `INSERT ... ON CONFLICT DO NOTHING` of the id in the
///   same transaction as the effect), or make the effect a state change
///   that is harmless twice (`SET welcomed_at = coalesce(welcomed_at, $now)`).
/// - **Failures**: an `Err` or a panic schedules the job again after a
///   [`Backoff`] (by the queue's clock) until it has had its
///   `max_attempts`; then it is dead, with its last error
///   ([`Queue::dead_jobs`]).
/// - **Wake-ups**: `LISTEN` on the primary for jobs committed as due, and
///   polling every [`poll_interval`](Self::poll_interval) as the fallback
///   (a lost notification or a reconnect never strands a job).
/// - **Shutdown** ([`WorkerHandle::shutdown`]): stops claiming, lets
///   running jobs finish within a grace period, then releases the rest
///   (due again at once, the attempt not counted).
///
/// ```no_run
/// # async fn demo(queue: tower_scale::queue::Queue) -> Result<(), tower_scale::queue::QueueError> {
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower_scale::queue::{Job, Worker};
///
/// let handler = tower::service_fn(|job: Job| async move {
///     println!("job {} attempt {}: {}", job.id, job.attempt, job.payload);
///     Ok::<(), Infallible>(())
/// });
/// let worker = Worker::new(queue, handler).concurrency(4).start()?;
/// // ...
/// let report = worker.shutdown(Duration::from_secs(10)).await;
/// println!("{report:?}");
/// # Ok(()) }
/// ```
#[must_use]
pub struct Worker<S> {
    queue: Queue,
    service: S,
    concurrency: usize,
    batch: usize,
    lease: Duration,
    poll_interval: Duration,
    backoff: Backoff,
    listen: bool,
    metrics_interval: Duration,
    drop_grace: Duration,
}

impl<S> fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue.name())
            .field("concurrency", &self.concurrency)
            .field("batch", &self.batch)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("backoff", &self.backoff)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl<S> Worker<S>
where
    S: Service<Job, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// A worker running `service` over `queue`.
    pub fn new(queue: Queue, service: S) -> Self {
        Self {
            queue,
            service,
            concurrency: 4,
            batch: 16,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            backoff: Backoff::default(),
            listen: true,
            metrics_interval: Duration::from_secs(5),
            drop_grace: Duration::from_secs(30),
        }
    }

    /// Jobs run at once (default 4).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// At most this many jobs per claim (default 16).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n;
        self
    }

    /// How long a claim lasts without renewal (default 30 s, by the
    /// queue's clock); renewed every third of it while the job runs. A
    /// dead worker's jobs are due again this long after its last renewal.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often the worker looks for due jobs without a notification,
    /// and for expired leases (default 1 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// The wait before a failed job's next attempt (default 1 s doubling
    /// to 10 minutes, with jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Whether to wake on `LISTEN/NOTIFY` (default on); off, the worker
    /// only polls.
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }

    /// How often the queue's depth gauges are refreshed (default 5 s; one
    /// scan of the queue's rows each time).
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        self.metrics_interval = every;
        self
    }

    /// The grace period running jobs get when the handle is dropped
    /// without [`WorkerHandle::shutdown`] (default 30 s).
    pub fn drop_grace(mut self, grace: Duration) -> Self {
        self.drop_grace = grace;
        self
    }

    /// Checks the settings and starts the worker on the current Tokio
    /// runtime.
    pub fn start(self) -> Result<WorkerHandle, QueueError> {
        let bad = |what: &str| Err(QueueError::Invalid(what.into()));
        if self.concurrency == 0 || self.batch == 0 {
            return bad("concurrency and batch must be at least 1");
        }
        if self.lease < Duration::from_millis(30) {
            return bad("the lease must be at least 30 ms");
        }
        if self.poll_interval.is_zero() || self.metrics_interval.is_zero() {
            return bad("poll_interval and metrics_interval must be above zero");
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| QueueError::Invalid("start a worker inside a Tokio runtime".into()))?;
        let stop = CancellationToken::new();
        let grace = Arc::new(AtomicU64::new(nanos(self.drop_grace)));
        let owner = i64::from_ne_bytes(
            crate::random::mix(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64
                    ^ u64::from(std::process::id())
                    ^ (Arc::as_ptr(&grace) as u64),
            )
            .to_ne_bytes(),
        );
        let counters = Arc::new(Counters::new(self.queue.name()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let listening = Arc::new(AtomicBool::new(false));
        if self.listen {
            runtime.spawn(listen(
                self.queue.clone(),
                wake.clone(),
                stop.clone(),
                self.poll_interval,
                listening.clone(),
            ));
        }
        let run = Run {
            rng: crate::random::Random::new(owner as u64),
            worker: self,
            owner,
            counters: counters.clone(),
            wake,
            stop: stop.clone(),
            grace: grace.clone(),
            tasks: JoinSet::new(),
            running: HashMap::new(),
            done: Vec::new(),
            failed: Vec::new(),
        };
        let task = runtime.spawn(run.run());
        Ok(WorkerHandle {
            stop,
            grace,
            listening,
            task: Some(task),
            counters,
            owner,
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A running [`Worker`]. Dropping it shuts the worker down in the
/// background with its [`drop_grace`](Worker::drop_grace).
#[derive(Debug)]
pub struct WorkerHandle {
    stop: CancellationToken,
    grace: Arc<AtomicU64>,
    listening: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<ShutdownReport>>,
    counters: Arc<Counters>,
    owner: i64,
}

impl WorkerHandle {
    /// Stops claiming, waits up to `grace` for running jobs, releases the
    /// rest (due again at once, the attempt not counted) and settles what
    /// finished.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        self.grace.store(nanos(grace), Ordering::Relaxed);
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => ShutdownReport::default(),
        }
    }

    /// The worker's counters so far.
    pub fn stats(&self) -> WorkerStats {
        self.counters.snapshot()
    }

    /// Whether the worker's `LISTEN` session is up now (without it the
    /// worker still finds jobs by polling).
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// The owner id the worker's claims carry (the `owner` column).
    pub fn owner(&self) -> i64 {
        self.owner
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Jobs that finished within the grace period.
    pub finished: u64,
    /// Jobs still running at its end, released for another worker.
    pub released: u64,
    /// Jobs whose outcome could not be written before the worker stopped
    /// (the database was unreachable): their leases expire and they run
    /// again.
    pub unsettled: u64,
}

/// Keeps a `LISTEN` session on the primary, waking the worker for each
/// notification of its queue, reconnecting after a pause when it ends.
async fn listen(
    queue: Queue,
    wake: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    pause: Duration,
    flag: Arc<AtomicBool>,
) {
    let name = queue.inner.name.clone();
    loop {
        let (w, n) = (wake.clone(), name.clone());
        let on_notify: crate::pg::OnNotify = Arc::new(move |payload: &str| {
            if payload == &*n {
                w.notify_one();
            }
        });
        let (w, f) = (wake.clone(), flag.clone());
        let listening: crate::pg::OnListening = Arc::new(move |on| {
            f.store(on, Ordering::Release);
            if on {
                // Jobs committed while no session listened: look once more.
                w.notify_one();
            }
        });
        tokio::select! {
            () = stop.cancelled() => return,
            ended = queue.inner.db.listen(queue.inner.sql.channel.clone(), on_notify, listening) => {
                if let Err(e) = ended {
                    tracing::debug!(queue = %name, error = %e, "job queue: listening again");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// A job being handled.
struct Running {
    id: i64,
    attempt: u32,
}

/// What a handler's task returns.
type Outcome = (i64, Result<(), String>);

struct Run<S> {
    worker: Worker<S>,
    owner: i64,
    counters: Arc<Counters>,
    wake: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    grace: Arc<AtomicU64>,
    tasks: JoinSet<Outcome>,
    running: HashMap<tokio::task::Id, Running>,
    /// Finished jobs to delete.
    done: Vec<i64>,
    /// Failed jobs to reschedule: id, error, attempt.
    failed: Vec<(i64, String, u32)>,
    rng: crate::random::Random,
}

impl<S> Run<S>
where
    S: Service<Job, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    async fn run(mut self) -> ShutdownReport {
        let w = &self.worker;
        let (poll, renew) = (w.poll_interval, w.lease / 3);
        let metrics_every = w.metrics_interval;
        let mut next_poll = Instant::now();
        let mut next_renewal = Instant::now() + renew;
        let mut next_metrics = Instant::now();
        let mut next_reap = Instant::now();
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            self.settle().await;
            let now = Instant::now();
            if now >= next_reap {
                self.reap().await;
                next_reap = now + poll;
            }
            if now >= next_renewal {
                self.renew().await;
                next_renewal = now + renew;
            }
            if now >= next_metrics {
                self.publish_depth().await;
                next_metrics = now + metrics_every;
            }
            let free = self.worker.concurrency.saturating_sub(self.tasks.len());
            if free > 0 {
                let want = free.min(self.worker.batch);
                next_poll = now + poll;
                match self.claim(want).await {
                    // A full batch: more may be due.
                    Ok(n) if n == want && self.tasks.len() < self.worker.concurrency => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(queue = %self.worker.queue.name(), error = %e, "job queue: claim failed")
                    }
                }
            }
            let wake_at = next_poll.min(next_renewal).min(next_metrics);
            let has_room = self.tasks.len() < self.worker.concurrency;
            tokio::select! {
                () = self.stop.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(joined);
                    while let Some(joined) = self.tasks.try_join_next_with_id() {
                        self.finished(joined);
                    }
                }
                () = self.wake.notified(), if has_room => next_poll = Instant::now(),
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
        self.shut_down().await
    }

    /// Claims up to `want` due jobs and starts them; how many it got.
    async fn claim(&mut self, want: usize) -> Result<usize, QueueError> {
        let q = self.worker.queue.inner.clone();
        let now = q.clock.now();
        let lease_until = now + self.worker.lease;
        let name: &str = &q.name;
        let limit = i64::try_from(want).unwrap_or(i64::MAX);
        let written =
            q.db.query(
                &q.sql.claim,
                &[&name, &now, &limit, &lease_until, &self.owner],
            )
            .await?;
        self.counters.claims.fetch_add(1, Ordering::Relaxed);
        let token = written.token;
        let claimed = written.value.len();
        for row in written.value {
            let job = Job {
                id: JobId(row.try_get(0)?),
                queue: q.name.clone(),
                payload: row.try_get(1)?,
                attempt: u32::try_from(row.try_get::<_, i32>(2)?).unwrap_or(0),
                max_attempts: u32::try_from(row.try_get::<_, i32>(3)?).unwrap_or(1),
                priority: row.try_get(4)?,
                enqueued_at: row.try_get(5)?,
                due_at: row.try_get(6)?,
                db: JobDb::new(q.db.clone(), token),
            };
            self.start(job);
        }
        Ok(claimed)
    }

    fn start(&mut self, job: Job) {
        let (id, attempt) = (job.id.0, job.attempt);
        let span = tracing::info_span!("job", queue = %job.queue, job = id, attempt);
        let service = self.worker.service.clone();
        let counters = self.counters.clone();
        let handler = async move {
            let started = std::time::Instant::now();
            let result = service.oneshot(job).await.map_err(|e| e.into().to_string());
            counters.handled(started.elapsed());
            (id, result)
        }
        .instrument(span);
        let task = self.tasks.spawn(handler);
        self.running.insert(task.id(), Running { id, attempt });
    }

    /// Books a handler's end: done, failed, or panicked (a failure).
    fn finished(&mut self, joined: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
        let (task, outcome) = match joined {
            Ok((task, (_, outcome))) => (task, outcome),
            Err(e) => {
                let task = e.id();
                let why = if e.is_panic() {
                    format!("the handler panicked: {}", panic_message(e.into_panic()))
                } else {
                    "the handler was cancelled".into()
                };
                (task, Err(why))
            }
        };
        let Some(job) = self.running.remove(&task) else {
            return;
        };
        match outcome {
            Ok(()) => self.done.push(job.id),
            Err(why) => {
                self.counters.failed();
                self.failed.push((job.id, why, job.attempt));
            }
        }
    }

    /// Writes finished and failed jobs (one statement each kind); what
    /// cannot be written now is kept, its lease renewed, and tried again.
    async fn settle(&mut self) {
        let q = self.worker.queue.inner.clone();
        if !self.done.is_empty() {
            match q
                .db
                .execute(&q.sql.complete, &[&self.done, &self.owner])
                .await
            {
                Ok(w) => {
                    self.counters.processed(w.value);
                    self.done.clear();
                }
                Err(e) => {
                    tracing::warn!(queue = %q.name, error = %e, "job queue: completing jobs failed; retrying")
                }
            }
        }
        if !self.failed.is_empty() {
            let now = q.clock.now();
            let ids: Vec<i64> = self.failed.iter().map(|f| f.0).collect();
            let errors: Vec<&str> = self.failed.iter().map(|f| f.1.as_str()).collect();
            let at: Vec<SystemTime> = self
                .failed
                .iter()
                .map(|f| now + self.worker.backoff.delay(f.2, self.rng.next_unit()))
                .collect();
            match q
                .db
                .query(&q.sql.fail, &[&ids, &errors, &at, &self.owner])
                .await
            {
                Ok(w) => {
                    for row in &w.value {
                        self.counters
                            .rescheduled(row.try_get::<_, &str>(0).unwrap_or("ready"));
                    }
                    self.failed.clear();
                }
                Err(e) => {
                    tracing::warn!(queue = %q.name, error = %e, "job queue: rescheduling failed jobs failed; retrying")
                }
            }
        }
    }

    /// Renews the leases of every job this worker holds.
    async fn renew(&mut self) {
        let ids: Vec<i64> = self
            .running
            .values()
            .map(|r| r.id)
            .chain(self.done.iter().copied())
            .chain(self.failed.iter().map(|f| f.0))
            .collect();
        if ids.is_empty() {
            return;
        }
        let q = &self.worker.queue.inner;
        let until = q.clock.now() + self.worker.lease;
        match q
            .db
            .query(&q.sql.heartbeat, &[&ids, &self.owner, &until])
            .await
        {
            Ok(w) if w.value.len() < ids.len() => {
                let lost = (ids.len() - w.value.len()) as u64;
                self.counters.leases_lost.fetch_add(lost, Ordering::Relaxed);
                tracing::warn!(queue = %q.name, lost, "job queue: leases lost (renewed too late); those jobs may run twice");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(queue = %q.name, error = %e, "job queue: renewing leases failed")
            }
        }
    }

    /// Makes jobs whose lease ran out due again (or dead).
    async fn reap(&mut self) {
        let q = &self.worker.queue.inner;
        let now = q.clock.now();
        let name: &str = &q.name;
        match q.db.query(&q.sql.reap, &[&name, &now]).await {
            Ok(w) => {
                for row in &w.value {
                    self.counters
                        .rescheduled(row.try_get::<_, &str>(0).unwrap_or("ready"));
                }
                if !w.value.is_empty() {
                    tracing::info!(queue = %q.name, jobs = w.value.len(), "job queue: leases expired; jobs due again");
                }
            }
            Err(e) => tracing::debug!(queue = %q.name, error = %e, "job queue: reaping failed"),
        }
    }

    async fn publish_depth(&mut self) {
        match self.worker.queue.depth().await {
            Ok(depth) => self.counters.depth(&depth),
            Err(e) => {
                tracing::debug!(queue = %self.worker.queue.name(), error = %e, "job queue: depth failed")
            }
        }
    }

    async fn shut_down(mut self) -> ShutdownReport {
        let grace = Duration::from_nanos(self.grace.load(Ordering::Relaxed));
        let deadline = Instant::now() + grace;
        let mut report = ShutdownReport::default();
        self.renew().await;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(joined) = self.tasks.join_next_with_id() => {
                    self.finished(joined);
                    report.finished += 1;
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.tasks.abort_all();
        let left: Vec<i64> = self.running.drain().map(|(_, r)| r.id).collect();
        while self.tasks.join_next().await.is_some() {}
        let q = self.worker.queue.inner.clone();
        if !left.is_empty() {
            match q.db.execute(&q.sql.release, &[&left, &self.owner]).await {
                Ok(w) => report.released = w.value,
                Err(e) => {
                    tracing::warn!(queue = %q.name, error = %e, "job queue: releasing jobs failed; their leases will expire");
                    report.unsettled += left.len() as u64;
                }
            }
        }
        self.settle().await;
        report.unsettled += (self.done.len() + self.failed.len()) as u64;
        report
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(not a string)".into()
    }
}
