//! [`Worker`]: a tower `Service<Job>` run over a queue: claims with
//! `SKIP LOCKED` under a lease it renews, settles in batches, retries with
//! back-off, dead-letters, and shuts down gracefully.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tower::Service;

use super::QueueError;
use super::handle::Queue;
use super::job::Job;
use super::run::Run;
use super::stats::{Counters, WorkerStats};
use super::time::Backoff;
use super::wake::Hub;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    pub(crate) queue: Queue,
    pub(crate) service: S,
    pub(crate) concurrency: usize,
    pub(crate) batch: usize,
    pub(crate) lease: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) listen: bool,
    pub(crate) metrics_interval: Duration,
    pub(crate) drop_grace: Duration,
    pub(crate) timeout: Option<Duration>,
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
            timeout: None,
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

    /// Fails a handler that has not finished after `limit` (its future is
    /// dropped; the job is retried like any failure). Default: none, a
    /// handler may run as long as it likes while its lease is renewed.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
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
        const DAY: Duration = Duration::from_secs(86_400);
        if self.lease > DAY || self.poll_interval > DAY || self.metrics_interval > DAY {
            return bad("lease, poll_interval and metrics_interval must be at most a day");
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("a handler timeout must be above zero");
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
        let hub = self
            .listen
            .then(|| Hub::of(&self.queue, self.poll_interval, &runtime));
        let run = Run::new(
            self,
            owner,
            counters.clone(),
            hub.clone(),
            stop.clone(),
            grace.clone(),
        );
        let task = runtime.spawn(run.run());
        Ok(WorkerHandle {
            stop,
            grace,
            hub,
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
    hub: Option<Arc<Hub>>,
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
        self.hub
            .as_ref()
            .is_some_and(|h| h.listening.load(Ordering::Acquire))
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
