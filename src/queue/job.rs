//! [`Job`]: what a worker's service is called with, and [`JobDb`], the
//! database as the job should see it.

use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::JobId;
use crate::pg::{Consistency, ConsistencyToken, Db, DbError, Read};

/// A claimed job, handed to the worker's service.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Job {
    /// The job.
    pub id: JobId,
    /// Its queue.
    pub queue: Arc<str>,
    /// Its payload.
    pub payload: serde_json::Value,
    /// This attempt (1 for the first).
    pub attempt: u32,
    /// Attempts it has in all.
    pub max_attempts: u32,
    /// Its priority.
    pub priority: i16,
    /// When it was enqueued (the queue's clock).
    pub enqueued_at: SystemTime,
    /// When it was due (its `run_at`; for a retry, the end of its back-off).
    pub due_at: SystemTime,
    /// The database as this job sees it.
    pub db: JobDb,
}

impl Job {
    /// The payload as `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }

    /// Whether this is the job's last attempt (a failure now makes it dead).
    pub fn last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// The database as a job sees it: reads are
/// [`ReadYourWrites`](Consistency::ReadYourWrites) at a token taken when
/// the job was claimed, after the transaction that enqueued it had
/// committed, so a read sees every write of that transaction, on a
/// replica that has replayed it (or on the primary after a bounded wait
/// for one). Writes go to the primary as on [`Db`].
///
/// ```no_run
/// # async fn demo(job: tower_scale::queue::Job) -> Result<(), tower_scale::pg::DbError> {
/// let user: i64 = job.payload["user"].as_i64().unwrap_or_default();
/// // Sees the user row the enqueueing transaction wrote, even on a lagging replica.
/// let row = job.db.read_one("SELECT email FROM users WHERE id = $1", &[&user]).await?;
/// let email: String = row.value.get(0);
/// job.db.db().execute("UPDATE users SET welcomed_at = now() WHERE id = $1", &[&user]).await?;
/// # let _ = email; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JobDb {
    db: Db,
    token: ConsistencyToken,
}

impl JobDb {
    pub(crate) fn new(db: Db, token: ConsistencyToken) -> Self {
        Self { db, token }
    }

    /// The token reads present.
    pub fn token(&self) -> ConsistencyToken {
        self.token
    }

    /// The cluster handle, for writes and reads of another consistency.
    pub fn db(&self) -> &Db {
        &self.db
    }

    fn consistency(&self) -> Consistency {
        Consistency::ReadYourWrites(self.token)
    }

    /// Rows, read where the job's writes are visible.
    pub async fn read_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Read<Vec<Row>>, DbError> {
        self.db.read_query(self.consistency(), sql, params).await
    }

    /// At most one row, read where the job's writes are visible.
    pub async fn read_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Read<Option<Row>>, DbError> {
        self.db.read_opt(self.consistency(), sql, params).await
    }

    /// Exactly one row, read where the job's writes are visible.
    pub async fn read_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Read<Row>, DbError> {
        self.db.read_one(self.consistency(), sql, params).await
    }
}
