//! A job queue on PostgreSQL (feature `queue`): jobs enqueued in the
//! business write's own transaction, workers that are tower Services and
//! read their jobs' writes even from a lagging replica.
//!
//! The guarantees, each tested against real servers (`tests/queue/`):
//!
//! - **Enqueued with the write**: [`Queue::enqueue_in`] inserts the job in
//!   the caller's [`Transaction`](crate::pg::Transaction): the job exists
//!   if and only if that transaction commits. A rolled-back transaction
//!   enqueues nothing.
//! - **Read your job's writes**: a handler's [`Job::db`] reads with
//!   [`ReadYourWrites`](crate::pg::Consistency::ReadYourWrites) at a token
//!   taken by the claim, which commits after the enqueueing transaction
//!   did (the job was visible to it). A read sees everything that
//!   transaction wrote, from a replica that has replayed it, or from the
//!   primary when none has within the cluster's wait.
//! - **At least once**: a job is deleted only after its handler returned
//!   `Ok`; a worker that dies mid-job stops renewing its lease, and the
//!   job is due again when the lease runs out. Handlers must be
//!   idempotent (see [`Worker`]).
//! - **Failures are bounded**: an error or a panic reschedules the job
//!   after a [`Backoff`] until it has had `max_attempts`; then it is dead,
//!   with its last error ([`Queue::dead_jobs`], [`Queue::retry_dead`]).
//! - **Time is the library's**: schedules, claims and leases compare
//!   against a [`QueueClock`] the library passes in, never the database's
//!   `now()`, so tests drive time. With the system clock, the hosts that
//!   run workers must agree on the time to well within the lease (NTP): a
//!   host whose clock runs ahead by more than the lease sees the others'
//!   leases as expired and runs their jobs again.
//!
//! ```no_run
//! # async fn demo(db: tower_scale::pg::Db) -> Result<(), tower_scale::queue::QueueError> {
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower_scale::queue::{Job, NewJob, Queue, Worker};
//!
//! let welcome = Queue::builder(db.clone(), "welcome").build().await?;
//!
//! // Producer: the job commits with the user, or neither does.
//! let tx = db.transaction().await?;
//! tx.execute("INSERT INTO users (id, name) VALUES ($1, $2)", &[&7i64, &"ada"])
//!     .await?;
//! welcome
//!     .enqueue_in(&tx, NewJob::new(&serde_json::json!({"user": 7}))?)
//!     .await?;
//! tx.commit().await?;
//!
//! // Consumer: any tower Service<Job>.
//! let handler = tower::service_fn(|job: Job| async move {
//!     let id = job.payload["user"].as_i64().unwrap_or_default();
//!     // Sees the user even on a replica that is behind.
//!     let user = job.db.read_one("SELECT name FROM users WHERE id = $1", &[&id]).await?;
//!     println!("welcome, {}", user.value.get::<_, String>(0));
//!     Ok::<(), tower_scale::pg::DbError>(())
//! });
//! let worker = Worker::new(welcome, handler).concurrency(4).start()?;
//! worker.shutdown(Duration::from_secs(10)).await;
//! # let _: Option<Infallible> = None;
//! # Ok(()) }
//! ```
//!
//! ## The table
//!
//! One table holds the jobs of every queue (default `tower_scale_jobs`,
//! created if missing): a job is a row `ready` (due at `run_at`),
//! `running` (claimed by a worker `owner` until `lease_until`) or `dead`.
//! A done job is deleted at once, by its worker, in batches (one `DELETE`
//! for the jobs that finished together): the table holds what is waiting,
//! and autovacuum, set to run at 1% dead rows on this table, reclaims the
//! space for reuse (`examples/queue_soak.rs` measures the table's size
//! after a million jobs). Claims take the due jobs of highest priority,
//! oldest first, with `FOR UPDATE SKIP LOCKED`, so workers never wait on
//! each other.
//!
//! ## Metrics
//!
//! Per queue (`queue` label): `tower_scale_queue_processed_total`,
//! `tower_scale_queue_failed_total` (errors and panics),
//! `tower_scale_queue_retried_total`, `tower_scale_queue_dead_total`, the
//! handler time `tower_scale_queue_handler_seconds`, and gauges refreshed
//! by each worker every `metrics_interval`: `tower_scale_queue_jobs`
//! (`state` = `ready`, `scheduled`, `running`, `dead`) and
//! `tower_scale_queue_oldest_ready_seconds`. Each job runs in a `tracing`
//! span `job` with `queue`, `job` and `attempt`.

mod handle;
mod job;
mod notify;
mod run;
mod schema;
mod stats;
mod time;
mod wake;
mod worker;

use std::fmt;

pub use self::handle::{DEFAULT_TABLE, DeadJob, Depth, Enqueued, NewJob, Queue, QueueBuilder};
pub use self::job::{Job, JobDb};
pub use self::stats::WorkerStats;
pub use self::time::{Backoff, QueueClock};
pub use self::worker::{ShutdownReport, Worker, WorkerHandle};

use crate::error::ConfigError;
use crate::pg::DbError;

/// A job's id (the table's `id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What can go wrong with the queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The database call failed (see [`DbError::may_have_committed`] for an
    /// enqueue whose outcome is unknown).
    #[error(transparent)]
    Db(#[from] DbError),
    /// A row did not have the expected shape (the table was altered by
    /// hand?).
    #[error("the jobs table returned an unexpected row: {0}")]
    Row(#[from] tokio_postgres::Error),
    /// The payload could not be serialized to JSON.
    #[error("the job's payload is not serializable to JSON: {0}")]
    Payload(#[source] serde_json::Error),
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A job or setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The job with this idempotency key was deleted (done) while this
    /// enqueue looked for it: enqueue again if another run is wanted.
    #[error("the job with this idempotency key finished while enqueueing; enqueue again if needed")]
    Conflict,
}
