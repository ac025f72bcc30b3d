//! [`Queue`]: a named queue on a jobs table, enqueueing (standalone or in
//! the caller's transaction) and inspecting.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::schema::Sql;
use super::time::QueueClock;
use super::{JobId, QueueError};
use crate::pg::{ConsistencyToken, Db, Transaction};

/// The default table.
pub const DEFAULT_TABLE: &str = "tower_scale_jobs";

/// A handle on one named queue (cheap to clone). Jobs of every queue
/// live in one table ([`QueueBuilder::table`], default
/// `tower_scale_jobs`), created on [`build`](QueueBuilder::build) if
/// missing.
#[derive(Clone)]
pub struct Queue {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) name: Arc<str>,
    pub(crate) sql: Sql,
    pub(crate) clock: QueueClock,
    pub(crate) max_attempts: u32,
    /// The wake-ups of this queue's workers in this process.
    pub(crate) hub: std::sync::Mutex<std::sync::Weak<super::wake::Hub>>,
    /// Standalone enqueues' notifications, coalesced.
    pub(crate) notify: Arc<super::notify::NotifyGate>,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.inner.name)
            .field("table", &self.inner.sql.table)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`Queue`].
#[derive(Debug)]
#[must_use]
pub struct QueueBuilder {
    db: Db,
    name: String,
    table: String,
    clock: QueueClock,
    max_attempts: u32,
}

impl QueueBuilder {
    /// The jobs table: `name` or `schema.name` (lower-case letters, digits,
    /// `_`). Default `tower_scale_jobs`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The clock schedules, claims and leases are compared against
    /// (default: the system's).
    pub fn clock(mut self, clock: QueueClock) -> Self {
        self.clock = clock;
        self
    }

    /// Attempts a job gets unless it says otherwise (default 5).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Checks the settings and creates the table and its indexes if they
    /// are missing (under an advisory lock, so instances starting together
    /// do not collide).
    pub async fn build(self) -> Result<Queue, QueueError> {
        check_name(&self.name)?;
        if self.max_attempts == 0 || self.max_attempts > i32::MAX as u32 {
            return Err(QueueError::Invalid(
                "max_attempts must be at least 1".into(),
            ));
        }
        let sql = Sql::new(&self.table)?;
        let tx = self.db.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tower_scale_queue:' || $1::text))",
            &[&self.table],
        )
        .await?;
        for statement in &sql.create {
            tx.execute(statement, &[]).await?;
        }
        tx.commit().await?;
        Ok(Queue {
            inner: Arc::new(Inner {
                db: self.db,
                name: self.name.into(),
                sql,
                clock: self.clock,
                max_attempts: self.max_attempts,
                hub: std::sync::Mutex::new(std::sync::Weak::new()),
                notify: Arc::default(),
            }),
        })
    }
}

/// Whether a JSON value holds a NUL in a string or a key.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn check_name(name: &str) -> Result<(), QueueError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        // (control characters include NUL, which text cannot hold)
        return Err(QueueError::Invalid(format!(
            "queue name {name:?}: 1 to 128 bytes, no control characters"
        )));
    }
    Ok(())
}

/// A job to enqueue: a JSON payload and how to run it.
///
/// ```
/// # fn demo() -> Result<(), tower_scale::queue::QueueError> {
/// use std::time::Duration;
/// use tower_scale::queue::NewJob;
///
/// let job = NewJob::new(&serde_json::json!({"user": 12}))?
///     .run_after(Duration::from_secs(30))
///     .priority(5)
///     .max_attempts(3)
///     .idempotency_key("welcome:12");
/// # let _ = job; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct NewJob {
    payload: serde_json::Value,
    run_at: Option<SystemTime>,
    run_after: Option<Duration>,
    priority: i16,
    max_attempts: Option<u32>,
    idempotency_key: Option<String>,
}

impl NewJob {
    /// A job carrying `payload` (serialized to JSON now).
    pub fn new(payload: &impl Serialize) -> Result<Self, QueueError> {
        serde_json::to_value(payload)
            .map(Self::json)
            .map_err(QueueError::Payload)
    }

    /// A job carrying a JSON value.
    pub fn json(payload: serde_json::Value) -> Self {
        Self {
            payload,
            run_at: None,
            run_after: None,
            priority: 0,
            max_attempts: None,
            idempotency_key: None,
        }
    }

    /// Not before this time (by the queue's clock).
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.run_at = Some(at);
        self.run_after = None;
        self
    }

    /// Not before this long after it is enqueued.
    pub fn run_after(mut self, delay: Duration) -> Self {
        self.run_after = Some(delay);
        self.run_at = None;
        self
    }

    /// Higher runs first among due jobs (default 0).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Attempts before the job is dead (default: the queue's).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// While a job with this key exists in the queue (waiting, running or
    /// dead), enqueueing another is a no-op that returns its id.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Enqueued {
    /// The job (the existing one when its idempotency key was taken).
    pub id: JobId,
    /// False when a job with the same idempotency key already existed.
    pub created: bool,
    /// Standalone enqueues: the commit's token (`None` inside a caller's
    /// transaction, whose commit gives it).
    pub token: Option<ConsistencyToken>,
}

/// The values of one enqueue, in statement order.
struct Row {
    payload: serde_json::Value,
    priority: i16,
    run_at: SystemTime,
    max_attempts: i32,
    key: Option<String>,
    now: SystemTime,
    due: bool,
}

impl Row {
    /// The enqueue statement's parameters, in order.
    fn params<'a>(
        &'a self,
        name: &'a &'a str,
        sql: &'a Sql,
    ) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            name,
            &self.payload,
            &self.priority,
            &self.run_at,
            &self.max_attempts,
            &self.key,
            &self.now,
            &self.due,
            &sql.channel,
        ]
    }
}

impl Queue {
    /// Starts configuring the queue `name` on `db`'s cluster.
    ///
    /// ```no_run
    /// # async fn demo(db: tower_scale::pg::Db) -> Result<(), tower_scale::queue::QueueError> {
    /// use tower_scale::queue::{NewJob, Queue};
    ///
    /// let emails = Queue::builder(db.clone(), "emails").build().await?;
    /// // In the business write's own transaction: both commit or neither.
    /// let tx = db.transaction().await?;
    /// tx.execute("INSERT INTO users (id, email) VALUES ($1, $2)", &[&7i64, &"a@example.com"])
    ///     .await?;
    /// emails
    ///     .enqueue_in(&tx, NewJob::new(&serde_json::json!({"user": 7}))?)
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(db: Db, name: impl Into<String>) -> QueueBuilder {
        QueueBuilder {
            db,
            name: name.into(),
            table: DEFAULT_TABLE.into(),
            clock: QueueClock::system(),
            max_attempts: 5,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The queue's clock.
    pub fn clock(&self) -> &QueueClock {
        &self.inner.clock
    }

    /// The cluster handle.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    fn row(&self, job: NewJob) -> Result<Row, QueueError> {
        let now = self.inner.clock.now();
        let run_at = match (job.run_at, job.run_after) {
            (Some(at), _) => at,
            (None, Some(after)) => now.checked_add(after).ok_or_else(|| {
                QueueError::Invalid(format!("run_after({after:?}) is out of range"))
            })?,
            (None, None) => now,
        };
        let max_attempts = job.max_attempts.unwrap_or(self.inner.max_attempts);
        let max_attempts = i32::try_from(max_attempts)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| QueueError::Invalid("max_attempts must be 1 to 2^31-1".into()))?;
        if has_nul(&job.payload) {
            return Err(QueueError::Invalid(
                "the payload holds a NUL character (\\u0000), which jsonb cannot store".into(),
            ));
        }
        if let Some(key) = &job.idempotency_key
            && (key.is_empty() || key.len() > 512 || key.contains('\0'))
        {
            return Err(QueueError::Invalid(
                "an idempotency key must be 1 to 512 bytes".into(),
            ));
        }
        Ok(Row {
            payload: job.payload,
            priority: job.priority,
            due: run_at <= now,
            run_at,
            max_attempts,
            key: job.idempotency_key,
            now,
        })
    }

    /// Enqueues in its own transaction; the returned token is the commit's.
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let mut r = self.row(job)?;
        let sql = &self.inner.sql;
        let name: &str = &self.inner.name;
        let gate = &self.inner.notify;
        // Due now, but others in flight and inside the notification
        // window: a trailing one follows the commit (see `notify`). The
        // gate's guard counts this enqueue in flight until it returns.
        let in_flight = r.due.then(|| gate.notify_now());
        let trailing = matches!(in_flight, Some((false, _)));
        r.due &= !trailing;
        // Owed however this ends (an error or a dropped future included:
        // the statement may have committed).
        let _owed = trailing.then(|| super::notify::Trailing {
            gate,
            db: &self.inner.db,
            channel: &sql.channel,
            name,
        });
        let written = self
            .inner
            .db
            .query(&sql.enqueue, &r.params(&name, sql))
            .await?;
        if let Some(row) = written.value.first() {
            return Ok(Enqueued {
                id: JobId(row.try_get(0)?),
                created: true,
                token: Some(written.token),
            });
        }
        let existing = self.inner.db.query(&sql.existing, &[&name, &r.key]).await?;
        match existing.value.first() {
            Some(row) => Ok(Enqueued {
                id: JobId(row.try_get(0)?),
                created: false,
                token: Some(existing.token),
            }),
            None => Err(QueueError::Conflict),
        }
    }

    /// Enqueues in the caller's transaction: the job exists if and only if
    /// the transaction commits (a rollback enqueues nothing), and workers
    /// are notified at that commit.
    pub async fn enqueue_in(&self, tx: &Transaction, job: NewJob) -> Result<Enqueued, QueueError> {
        let r = self.row(job)?;
        let sql = &self.inner.sql;
        let name: &str = &self.inner.name;
        let rows = tx.query(&sql.enqueue, &r.params(&name, sql)).await?;
        let (row, created) = match rows.first() {
            Some(row) => (Some(row.try_get(0)?), true),
            None => {
                let rows = tx.query(&sql.existing, &[&name, &r.key]).await?;
                (rows.first().map(|r| r.try_get(0)).transpose()?, false)
            }
        };
        match row {
            Some(id) => Ok(Enqueued {
                id: JobId(id),
                created,
                token: None,
            }),
            None => Err(QueueError::Conflict),
        }
    }

    /// How many jobs are in each state now (one scan of the queue's rows).
    pub async fn depth(&self) -> Result<Depth, QueueError> {
        let now = self.inner.clock.now();
        let name: &str = &self.inner.name;
        let row = self
            .inner
            .db
            .read_one(
                crate::pg::Consistency::Strong,
                &self.inner.sql.depth,
                &[&name, &now],
            )
            .await?
            .value;
        let count = |i: usize| -> Result<u64, QueueError> {
            Ok(u64::try_from(row.try_get::<_, i64>(i)?).unwrap_or(0))
        };
        let oldest: Option<SystemTime> = row.try_get(4)?;
        Ok(Depth {
            ready: count(0)?,
            scheduled: count(1)?,
            running: count(2)?,
            dead: count(3)?,
            oldest_ready: oldest.map(|t| now.duration_since(t).unwrap_or_default()),
        })
    }

    /// Dead jobs (out of attempts), oldest first, with their last error.
    pub async fn dead_jobs(&self, limit: i64) -> Result<Vec<DeadJob>, QueueError> {
        let name: &str = &self.inner.name;
        let rows = self
            .inner
            .db
            .read_query(
                crate::pg::Consistency::Strong,
                &self.inner.sql.dead,
                &[&name, &limit.max(0)],
            )
            .await?
            .value;
        rows.iter()
            .map(|r| {
                Ok(DeadJob {
                    id: JobId(r.try_get(0)?),
                    payload: r.try_get(1)?,
                    attempts: u32::try_from(r.try_get::<_, i32>(2)?).unwrap_or(0),
                    last_error: r.try_get(3)?,
                    enqueued_at: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Gives a dead job a fresh set of attempts, due now; false if `id` is
    /// not a dead job of this queue.
    pub async fn retry_dead(&self, id: JobId) -> Result<bool, QueueError> {
        let name: &str = &self.inner.name;
        let now = self.inner.clock.now();
        let done = self
            .inner
            .db
            .execute(&self.inner.sql.retry_dead, &[&name, &id.0, &now])
            .await?;
        Ok(done.value == 1)
    }
}

/// Jobs per state ([`Queue::depth`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Depth {
    /// Due and waiting for a worker.
    pub ready: u64,
    /// Waiting for their `run_at` (including retries in back-off).
    pub scheduled: u64,
    /// Claimed by a worker.
    pub running: u64,
    /// Out of attempts.
    pub dead: u64,
    /// How long the oldest due job has been due.
    pub oldest_ready: Option<Duration>,
}

/// A job that ran out of attempts ([`Queue::dead_jobs`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadJob {
    /// The job.
    pub id: JobId,
    /// Its payload.
    pub payload: serde_json::Value,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub enqueued_at: SystemTime,
}
