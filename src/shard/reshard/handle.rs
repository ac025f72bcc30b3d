//! The handle of a running move: options, progress, result.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::super::error::ShardError;
use super::super::map::SlotRange;

/// How a move runs. `MoveOptions::default()` then by-value setters.
#[derive(Debug, Clone)]
#[must_use]
pub struct MoveOptions {
    pub(crate) copy_rate: u32,
    pub(crate) batch: usize,
    pub(crate) cleanup_rate: u32,
    pub(crate) max_pause: Duration,
    pub(crate) cutover_attempts: u32,
    pub(crate) cutover_lag: Duration,
    pub(crate) catch_up_timeout: Duration,
    pub(crate) timeout: Duration,
    pub(crate) manual_cutover: bool,
}

impl Default for MoveOptions {
    fn default() -> Self {
        Self {
            copy_rate: 20_000,
            batch: 1_000,
            cleanup_rate: 20_000,
            max_pause: Duration::from_secs(1),
            cutover_attempts: 10,
            cutover_lag: Duration::from_millis(100),
            catch_up_timeout: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            manual_cutover: false,
        }
    }
}

impl MoveOptions {
    /// Rows read from the source per second during the copy, at most
    /// (default 20,000; 0: unthrottled). Every row of a declared table is
    /// read (the range is filtered here), so this bounds the load on the
    /// source.
    pub fn copy_rate(mut self, rows_per_second: u32) -> Self {
        self.copy_rate = rows_per_second;
        self
    }

    /// Rows per page read and written (default 1,000).
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// Rows read per second by the cleanup of the source (default
    /// 20,000; 0: unthrottled).
    pub fn cleanup_rate(mut self, rows_per_second: u32) -> Self {
        self.cleanup_rate = rows_per_second;
        self
    }

    /// How long one cutover attempt waits, holding the writes of the
    /// range, for the catch-up to reach its marker (default 1 s): past it
    /// the attempt rolls back and the writes go on at the source. The
    /// lock and the two commits come on top (a few round trips), and so
    /// does the read leases' hold between them (the longest lease a shard
    /// records plus 10%: 1.1 s by default; see
    /// [`read_lease`](crate::shard::ShardedClusterBuilder::read_lease));
    /// an attempt whose marker has arrived commits. Keep it well below the
    /// clusters' write timeout.
    pub fn max_pause(mut self, d: Duration) -> Self {
        self.max_pause = d;
        self
    }

    /// Cutover attempts before the move fails (default 10).
    pub fn cutover_attempts(mut self, n: u32) -> Self {
        self.cutover_attempts = n.max(1);
        self
    }

    /// How far behind the source the catch-up may be when a cutover
    /// attempt starts (default 100 ms): a marker committed on the source
    /// must come through the stream within it. What the attempt then
    /// holds writes for is about this plus the lock and the commits.
    pub fn cutover_lag(mut self, d: Duration) -> Self {
        self.cutover_lag = d;
        self
    }

    /// How long the catch-up may take to come within
    /// [`cutover_lag`](Self::cutover_lag) (default 10 minutes).
    pub fn catch_up_timeout(mut self, d: Duration) -> Self {
        self.catch_up_timeout = d;
        self
    }

    /// Copy and catch up, then keep catching up until
    /// [`MoveHandle::cut_over`] is called, within
    /// [`catch_up_timeout`](Self::catch_up_timeout) (default: cut over as soon as
    /// the catch-up is within [`cutover_lag`](Self::cutover_lag)), as
    /// Vitess's `SwitchTraffic` is a step of its own.
    pub fn manual_cutover(mut self, manual: bool) -> Self {
        self.manual_cutover = manual;
        self
    }

    /// The deadline of each setup step (connecting the replication
    /// session, creating the slot; default 10 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
}

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MovePhase {
    /// Copying the snapshot's rows.
    Copying,
    /// Applying the changes committed since the snapshot.
    CatchingUp,
    /// Holding writes and switching ownership.
    CuttingOver,
    /// Deleting the moved rows from the source.
    CleaningUp,
    /// Finished.
    Done,
    /// Failed (see [`MoveProgress::error`]).
    Failed,
}

impl MovePhase {
    /// `copying`, `catching_up`, `cutting_over`, `cleaning_up`, `done`,
    /// `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copying => "copying",
            Self::CatchingUp => "catching_up",
            Self::CuttingOver => "cutting_over",
            Self::CleaningUp => "cleaning_up",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for MovePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move's progress ([`MoveHandle::progress`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MoveProgress {
    /// The move's id.
    pub id: String,
    /// The range moved.
    pub range: SlotRange,
    /// The phase.
    pub phase: MovePhase,
    /// Rows of the range copied to the target.
    pub rows_copied: u64,
    /// Rows of the declared tables read on the source by the copy.
    pub rows_scanned: u64,
    /// Rows of the range applied from the stream.
    pub rows_applied: u64,
    /// Bytes of the source's WAL not yet applied (catch-up).
    pub bytes_behind: u64,
    /// Rows deleted from the source by the cleanup.
    pub rows_cleaned: u64,
    /// Catching up, the last probe came through the stream within
    /// [`MoveOptions::cutover_lag`]: a cutover can start (with
    /// [`MoveOptions::manual_cutover`], waiting for
    /// [`MoveHandle::cut_over`]).
    pub caught_up: bool,
    /// Estimated time to the end of the current phase, when known.
    pub estimated_remaining: Option<Duration>,
    /// The error, once failed.
    pub error: Option<String>,
}

/// What a finished move did ([`MoveHandle::wait`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MoveReport {
    /// The move's id.
    pub id: String,
    /// The map version the cutover created.
    pub version: u64,
    /// Rows copied from the snapshot.
    pub rows_copied: u64,
    /// How long the copy took.
    pub copy_time: Duration,
    /// Rows applied from the stream.
    pub rows_applied: u64,
    /// Cutover attempts made (the last one succeeded).
    pub cutover_attempts: u32,
    /// How long the successful attempt held the range's writes, from
    /// taking the lock to the target's claim.
    pub pause: Duration,
    /// When the successful cutover attempt began and ended (for matching
    /// client-side latencies).
    pub cutover: (std::time::Instant, std::time::Instant),
    /// Rows deleted from the source.
    pub rows_cleaned: u64,
}

/// A move running in the background (it goes on if the handle is
/// dropped): watch its [`progress`](Self::progress), [`wait`](Self::wait)
/// for its result.
pub struct MoveHandle {
    pub(crate) id: String,
    pub(crate) progress: watch::Receiver<MoveProgress>,
    pub(crate) task: JoinHandle<Result<MoveReport, ShardError>>,
    pub(crate) go: watch::Sender<bool>,
}

impl fmt::Debug for MoveHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MoveHandle")
            .field("id", &self.id)
            .field("progress", &*self.progress.borrow())
            .finish()
    }
}

impl MoveHandle {
    /// The move's id (for [`resume_move`](super::super::ShardedCluster::resume_move)
    /// and [`rollback_move`](super::super::ShardedCluster::rollback_move)).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The progress now.
    pub fn progress(&self) -> MoveProgress {
        self.progress.borrow().clone()
    }

    /// Lets a move started with [`MoveOptions::manual_cutover`] cut over
    /// once caught up (no effect otherwise).
    pub fn cut_over(&self) {
        self.go.send_replace(true);
    }

    /// A receiver that sees every progress update.
    pub fn subscribe(&self) -> watch::Receiver<MoveProgress> {
        self.progress.clone()
    }

    /// Stops the move's task where it is, as if its process had died: the
    /// replication session (and its temporary slot) ends, the map is
    /// unchanged unless the cutover had committed, the target's partial
    /// copy stays marked by the move's record until
    /// [`resume_move`](super::super::ShardedCluster::resume_move) or
    /// [`rollback_move`](super::super::ShardedCluster::rollback_move).
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Waits for the move to end.
    pub async fn wait(self) -> Result<MoveReport, ShardError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ShardError::MoveFailed {
                id: self.id,
                phase: "unknown",
                reason: format!("the move's task ended abnormally: {e}"),
            }),
        }
    }
}
