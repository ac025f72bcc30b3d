//! The worker's loop: claims (with the finished jobs deleted in the same
//! round trip), handlers as tasks, settling, lease renewal, reaping
//! expired leases, and the shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::job::{Job, JobDb};
use super::stats::Counters;
use super::wake::Hub;
use super::worker::{BoxError, ShutdownReport, Worker};
use super::{JobId, QueueError};

/// A job being handled.
struct Running {
    id: i64,
    attempt: u32,
}

/// The longest error kept with a job (bytes).
const MAX_ERROR: usize = 8 * 1024;

/// An error as a job keeps it: no NUL (PostgreSQL `text` refuses it, and
/// one bad message would block every reschedule of the batch), at most
/// [`MAX_ERROR`] bytes.
fn clean_error(mut error: String) -> String {
    if error.contains('\0') {
        error = error.replace('\0', "\u{FFFD}");
    }
    if error.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
    }
    error
}

/// Ids and attempts as two arrays (the statements' `unnest` pairs).
fn pairs(items: impl Iterator<Item = (i64, i32)>) -> (Vec<i64>, Vec<i32>) {
    items.unzip()
}

fn attempt(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// What a handler's task returns (its job is the task's entry in
/// `running`).
type Outcome = Result<(), String>;

/// How long a free slot may wait for others before claiming under load.
const CLAIM_LINGER: Duration = Duration::from_millis(2);

pub(crate) struct Run<S> {
    worker: Worker<S>,
    owner: i64,
    counters: Arc<Counters>,
    hub: Option<Arc<Hub>>,
    stop: CancellationToken,
    grace: Arc<AtomicU64>,
    tasks: JoinSet<Outcome>,
    running: HashMap<tokio::task::Id, Running>,
    /// Finished jobs to delete: id, attempt (the claim it was).
    done: Vec<(i64, i32)>,
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
    pub(crate) fn new(
        worker: Worker<S>,
        owner: i64,
        counters: Arc<Counters>,
        hub: Option<Arc<Hub>>,
        stop: CancellationToken,
        grace: Arc<AtomicU64>,
    ) -> Self {
        Self {
            rng: crate::random::Random::new(owner as u64),
            worker,
            owner,
            counters,
            hub,
            stop,
            grace,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            done: Vec::new(),
            failed: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self) -> ShutdownReport {
        let w = &self.worker;
        let (poll, renew) = (w.poll_interval, w.lease / 3);
        let metrics_every = w.metrics_interval;
        // Under load, claim once half the slots are free (or a moment
        // after the first one is): fewer, fuller round trips.
        let threshold = (w.concurrency.min(w.batch) / 2).max(1);
        let start = Instant::now();
        let (mut next_claim, mut next_reap, mut next_metrics) = (start, start, start);
        let mut next_renewal = start + renew;
        let (mut by_notify, mut drained) = (false, false);
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            if !self.failed.is_empty() {
                self.settle_failed().await;
            }
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
            // A notification while another worker of this queue here is
            // claiming: that one claims once more after (the hub remembers),
            // so under load notifications merge into fewer, fuller claims.
            let gated = std::mem::take(&mut by_notify);
            if free > 0 && now >= next_claim {
                next_claim = now + poll;
                // Taken only here, so every begin has its end below.
                if gated && !self.hub.as_ref().is_none_or(|h| h.begin_claim()) {
                    continue;
                }
                let want = free.min(self.worker.batch);
                let claimed = self.claim(want).await;
                if gated && let Some(hub) = &self.hub {
                    hub.end_claim();
                }
                // Fewer than asked: nothing more is due; the next claim
                // waits for a notification (or the poll), not for
                // completions.
                drained = !matches!(claimed, Ok(n) if n == want);
                match claimed {
                    // A full batch and room for more: more may be due.
                    Ok(n) if n == want && want < free => {
                        next_claim = now;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(queue = %self.worker.queue.name(), error = %e, "job queue: claim failed")
                    }
                }
            } else if self.done.len() >= self.worker.batch {
                // All slots busy with long jobs: do not let the done pile up.
                self.settle_done().await;
            }
            let has_room = self.tasks.len() < self.worker.concurrency;
            let mut wake_at = next_renewal.min(next_metrics).min(next_reap);
            if has_room {
                wake_at = wake_at.min(next_claim);
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(joined);
                    while let Some(joined) = self.tasks.try_join_next_with_id() {
                        self.finished(joined);
                    }
                    let free = self.worker.concurrency.saturating_sub(self.tasks.len());
                    let soon = Instant::now() + CLAIM_LINGER;
                    if !drained {
                        next_claim = if free >= threshold { Instant::now() } else { next_claim.min(soon) };
                    }
                }
                () = notified(&self.hub), if has_room => {
                    next_claim = Instant::now();
                    by_notify = true;
                }
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
        let (done_ids, done_attempts) = pairs(self.done.iter().copied());
        let written = match q
            .db
            .query(
                &q.sql.claim,
                &[
                    &name,
                    &now,
                    &limit,
                    &lease_until,
                    &self.owner,
                    &done_ids,
                    &done_attempts,
                ],
            )
            .await
        {
            Ok(written) => written,
            Err(e) => {
                if e.may_have_committed() {
                    // Jobs may be ours that we never started: give them
                    // back now rather than after their lease.
                    self.release_orphans().await;
                }
                return Err(e.into());
            }
        };
        self.counters.claims.fetch_add(1, Ordering::Relaxed);
        // The finished jobs went with the claim.
        self.counters.processed(self.done.len() as u64);
        self.done.clear();
        let token = written.token;
        let jobs: Result<Vec<Job>, tokio_postgres::Error> = written
            .value
            .iter()
            .map(|row| {
                Ok(Job {
                    id: JobId(row.try_get(0)?),
                    queue: q.name.clone(),
                    payload: row.try_get(1)?,
                    attempt: u32::try_from(row.try_get::<_, i32>(2)?).unwrap_or(0),
                    max_attempts: u32::try_from(row.try_get::<_, i32>(3)?).unwrap_or(1),
                    priority: row.try_get(4)?,
                    enqueued_at: row.try_get(5)?,
                    due_at: row.try_get(6)?,
                    db: JobDb::new(q.db.clone(), token),
                })
            })
            .collect();
        match jobs {
            Ok(jobs) => {
                let claimed = jobs.len();
                jobs.into_iter().for_each(|job| self.start(job));
                Ok(claimed)
            }
            Err(e) => {
                // Claimed but not started: give them back now.
                self.release_orphans().await;
                Err(e.into())
            }
        }
    }

    fn start(&mut self, job: Job) {
        let (id, attempt) = (job.id.0, job.attempt);
        let span = tracing::info_span!("job", queue = %job.queue, job = id, attempt);
        let service = self.worker.service.clone();
        let counters = self.counters.clone();
        let timeout = self.worker.timeout;
        let handler = async move {
            let started = std::time::Instant::now();
            let call = service.oneshot(job);
            let result = match timeout {
                None => call.await.map_err(|e| e.into().to_string()),
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok(r) => r.map_err(|e| e.into().to_string()),
                    Err(_) => Err(format!("the handler timed out after {t:?}")),
                },
            };
            counters.handled(started.elapsed());
            result
        }
        .instrument(span);
        let task = self.tasks.spawn(handler);
        self.running.insert(task.id(), Running { id, attempt });
    }

    /// Books a handler's end: done, failed, or panicked (a failure).
    fn finished(&mut self, joined: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
        let (task, outcome) = match joined {
            Ok((task, outcome)) => (task, outcome),
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
            Ok(()) => self.done.push((job.id, attempt(job.attempt))),
            Err(why) => {
                self.counters.failed();
                self.failed.push((job.id, clean_error(why), job.attempt));
            }
        }
    }

    /// Writes finished and failed jobs (one statement each kind); what
    /// cannot be written now is kept, its lease renewed, and tried again.
    async fn settle(&mut self) {
        self.settle_done().await;
        self.settle_failed().await;
    }

    /// Deletes finished jobs (they usually go with the next claim).
    async fn settle_done(&mut self) {
        let q = self.worker.queue.inner.clone();
        if !self.done.is_empty() {
            let (ids, attempts) = pairs(self.done.iter().copied());
            match q
                .db
                .execute(&q.sql.complete, &[&ids, &attempts, &self.owner])
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
    }

    /// Reschedules failed jobs (or makes them dead).
    async fn settle_failed(&mut self) {
        let q = self.worker.queue.inner.clone();
        if !self.failed.is_empty() {
            let now = q.clock.now();
            let ids: Vec<i64> = self.failed.iter().map(|f| f.0).collect();
            let attempts: Vec<i32> = self.failed.iter().map(|f| attempt(f.2)).collect();
            let errors: Vec<&str> = self.failed.iter().map(|f| f.1.as_str()).collect();
            let at: Vec<SystemTime> = self
                .failed
                .iter()
                .map(|f| now + self.worker.backoff.delay(f.2, self.rng.next_unit()))
                .collect();
            match q
                .db
                .query(&q.sql.fail, &[&ids, &errors, &at, &self.owner, &attempts])
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
        let (ids, attempts) = pairs(
            self.running
                .values()
                .map(|r| (r.id, attempt(r.attempt)))
                .chain(self.done.iter().copied())
                .chain(self.failed.iter().map(|f| (f.0, attempt(f.2)))),
        );
        if ids.is_empty() {
            return;
        }
        let q = self.worker.queue.inner.clone();
        let until = q.clock.now() + self.worker.lease;
        match q
            .db
            .query(&q.sql.heartbeat, &[&ids, &self.owner, &until, &attempts])
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

    /// Gives back jobs this worker holds but does not track (a claim whose
    /// answer was lost).
    async fn release_orphans(&mut self) {
        let q = self.worker.queue.inner.clone();
        let tracked: Vec<i64> = self
            .running
            .values()
            .map(|r| r.id)
            .chain(self.done.iter().map(|d| d.0))
            .chain(self.failed.iter().map(|f| f.0))
            .collect();
        let name: &str = &q.name;
        if let Err(e) =
            q.db.execute(&q.sql.orphans, &[&name, &self.owner, &tracked])
                .await
        {
            tracing::warn!(queue = %q.name, error = %e, "job queue: releasing unknown claims failed; their leases will expire");
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
        let far = Instant::now() + Duration::from_secs(365 * 86_400);
        let deadline = Instant::now().checked_add(grace).unwrap_or(far).min(far);
        let renew_every = self.worker.lease / 3;
        let mut report = ShutdownReport::default();
        self.renew().await;
        let mut next_renewal = Instant::now() + renew_every;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(joined) = self.tasks.join_next_with_id() => {
                    self.finished(joined);
                    report.finished += 1;
                }
                // The leases of jobs still running must outlive the grace.
                () = tokio::time::sleep_until(next_renewal) => {
                    self.renew().await;
                    next_renewal = Instant::now() + renew_every;
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.tasks.abort_all();
        // A handler that finished as it was aborted keeps its outcome.
        while let Some(joined) = self.tasks.join_next_with_id().await {
            match joined {
                Err(e) if e.is_cancelled() => {}
                joined => {
                    self.finished(joined);
                    report.finished += 1;
                }
            }
        }
        let (ids, attempts) = pairs(
            self.running
                .drain()
                .map(|(_, r)| (r.id, attempt(r.attempt))),
        );
        let q = self.worker.queue.inner.clone();
        if !ids.is_empty() {
            match q
                .db
                .execute(&q.sql.release, &[&ids, &self.owner, &attempts])
                .await
            {
                Ok(w) => report.released = w.value,
                Err(e) => {
                    tracing::warn!(queue = %q.name, error = %e, "job queue: releasing jobs failed; their leases will expire");
                    report.unsettled += ids.len() as u64;
                }
            }
        }
        self.settle().await;
        report.unsettled += (self.done.len() + self.failed.len()) as u64;
        report
    }
}

/// A notification for this worker's queue (never, without a hub).
async fn notified(hub: &Option<Arc<Hub>>) {
    match hub {
        Some(hub) => hub.notify.notified().await,
        None => std::future::pending().await,
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
