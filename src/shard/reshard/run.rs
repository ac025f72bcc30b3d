//! Running a move: its start, the phases in order, the catch-up's probes
//! and the cutover.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::super::cluster::{Shard, ShardedCluster};
use super::super::error::ShardError;
use super::super::map::SlotRange;
use super::super::tables;
use super::catchup::{self, MARKER, StreamStatus};
use super::cleanup::cleanup;
use super::copy;
use super::handle::{MoveHandle, MoveOptions, MovePhase, MoveProgress, MoveReport};
use super::record::{self, MoveRecord};

/// What every step of one move shares.
pub(crate) struct Ctx {
    pub(crate) cluster: ShardedCluster,
    pub(crate) id: String,
    pub(crate) range: SlotRange,
    pub(crate) source: usize,
    pub(crate) target: usize,
    pub(crate) slots: u16,
    pub(crate) slot_name: String,
    pub(crate) options: MoveOptions,
    pub(crate) progress: watch::Sender<MoveProgress>,
    /// Set by [`MoveHandle::cut_over`].
    pub(crate) go: watch::Receiver<bool>,
}

impl Ctx {
    pub(crate) fn source(&self) -> &Shard {
        &self.cluster.inner.shards[self.source]
    }

    pub(crate) fn target(&self) -> &Shard {
        &self.cluster.inner.shards[self.target]
    }

    /// Whether a row's slot (`None`: unknown) is one the move carries.
    pub(crate) fn in_range(&self, slot: Option<u16>) -> bool {
        slot.is_some_and(|s| self.range.slots().contains(&s))
    }

    pub(super) fn phase(&self, phase: MovePhase) {
        self.progress.send_modify(|p| {
            p.phase = phase;
            p.caught_up = false;
            p.estimated_remaining = None;
        });
    }

    fn failed(&self, phase: MovePhase, reason: impl Into<String>) -> ShardError {
        ShardError::MoveFailed {
            id: self.id.clone(),
            phase: phase.as_str(),
            reason: reason.into(),
        }
    }
}

/// The name of a move's publication and slot.
pub(super) fn slot_name(id: &str) -> String {
    format!("tower_scale_move_{id}")
}

/// Takes the move off this instance's running list when its task ends.
struct Running {
    cluster: ShardedCluster,
    id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = crate::sync::lock(&self.cluster.inner.running_moves);
        running.retain(|(id, _)| *id != self.id);
    }
}

impl ShardedCluster {
    /// Starts moving `range` and its rows to shard `to`, online (see
    /// [`reshard`](super)): returns at once with a handle whose
    /// [`wait`](MoveHandle::wait) gives the result. The range must be owned
    /// by one shard other than `to`; at least one table must be declared
    /// ([`table`](super::super::ShardedClusterBuilder::table)), and the
    /// source may have no undeclared table with rows.
    pub async fn move_slots(&self, range: SlotRange, to: &str) -> Result<MoveHandle, ShardError> {
        self.move_slots_with(range, to, MoveOptions::default())
            .await
    }

    /// [`move_slots`](Self::move_slots) with options.
    pub async fn move_slots_with(
        &self,
        range: SlotRange,
        to: &str,
        options: MoveOptions,
    ) -> Result<MoveHandle, ShardError> {
        self.start_move(None, range, to, options).await
    }

    pub(super) async fn start_move(
        &self,
        id: Option<String>,
        range: SlotRange,
        to: &str,
        options: MoveOptions,
    ) -> Result<MoveHandle, ShardError> {
        self.check_range(range)?;
        let target = self.shard_index(to)?;
        if self.inner.tables.is_empty() {
            return Err(ShardError::Setup(
                "no table is declared (ShardedClusterBuilder::table): a move would carry no rows"
                    .into(),
            ));
        }
        let map = self.refresh().await?;
        let mut owners: Vec<Option<usize>> = range.slots().map(|s| map.owner_index(s)).collect();
        owners.dedup();
        let source = match owners.as_slice() {
            [Some(o)] if *o == target => {
                return Err(ShardError::Setup(format!("{to} already owns {range}")));
            }
            [Some(o)] => *o,
            [None] => return Err(ShardError::Unowned { slot: range.first }),
            _ => {
                return Err(ShardError::Setup(format!(
                    "{range} spans several owners: move each owner's part on its own"
                )));
            }
        };
        let src = &self.inner.shards[source];
        if let Some(table) = tables::undeclared_with_rows(
            &src.db,
            &src.name,
            &self.inner.tables,
            &self.inner.local_tables,
        )
        .await?
        {
            return Err(ShardError::Setup(format!(
                "{} has rows in {table}, which is neither declared (table) nor local \
                 (local_table): a move could not tell which of its rows to carry",
                src.name
            )));
        }
        let id = id.unwrap_or_else(|| {
            // The clock and the cluster's generator: unique across
            // processes and restarts.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            format!(
                "{:012x}{:04x}",
                now & 0xffff_ffff_ffff,
                src.cluster.inner.random() & 0xffff
            )
        });
        // The checks and the records under the move lock: two instances
        // starting overlapping moves at once (both checks before either
        // record) would otherwise both start.
        let (_, serial) = self.lock_moves().await?;
        if let Some(other) = record::unfinished_overlapping(self, range, Some(&id)).await? {
            return Err(ShardError::MoveConflict { id: other });
        }
        for shard in [&src.name, &self.inner.shards[target].name] {
            if let Some(other) = record::unfinished_on(self, shard, Some(&id)).await? {
                return Err(ShardError::MoveConflict { id: other });
            }
        }
        {
            let mut running = crate::sync::lock(&self.inner.running_moves);
            if let Some((other, _)) = running
                .iter()
                .find(|(_, r)| r.first <= range.last && range.first <= r.last)
            {
                return Err(ShardError::MoveConflict { id: other.clone() });
            }
            running.push((id.clone(), range));
        }
        let guard = Running {
            cluster: self.clone(),
            id: id.clone(),
        };
        let rec = MoveRecord {
            id: id.clone(),
            range,
            source: src.name.to_string(),
            target: to.to_owned(),
            phases: (None, None),
        };
        let tgt = &self.inner.shards[target];
        record::insert(&src.db, &src.name, &rec, "source", "copying").await?;
        record::insert(&tgt.db, &tgt.name, &rec, "target", "copying").await?;
        // It wrote nothing: however it ends, the lock goes with it.
        let _ = serial.rollback().await;
        let (tx, rx) = watch::channel(initial(&id, range, MovePhase::Copying));
        let (go, go_rx) = watch::channel(false);
        let ctx = Ctx {
            go: go_rx,
            cluster: self.clone(),
            slot_name: slot_name(&id),
            id: id.clone(),
            range,
            source,
            target,
            slots: self.inner.slots,
            options,
            progress: tx,
        };
        let task = tokio::spawn(async move {
            let _running = guard;
            let result = run(&ctx).await;
            finish(&ctx, &result).await;
            result
        });
        Ok(MoveHandle {
            id,
            progress: rx,
            task,
            go,
        })
    }
}

pub(super) fn initial(id: &str, range: SlotRange, phase: MovePhase) -> MoveProgress {
    MoveProgress {
        id: id.to_owned(),
        range,
        phase,
        rows_copied: 0,
        rows_scanned: 0,
        rows_applied: 0,
        bytes_behind: 0,
        rows_cleaned: 0,
        caught_up: false,
        estimated_remaining: None,
        error: None,
    }
}

/// Records the end (best effort: the move's result is what counts) and
/// drops the publication.
pub(super) async fn finish(ctx: &Ctx, result: &Result<MoveReport, ShardError>) {
    let _ = copy::unpublish(ctx).await;
    let (phase, error) = match result {
        Ok(_) => ("done", None),
        Err(e) => ("failed", Some(e.to_string())),
    };
    for shard in [ctx.source(), ctx.target()] {
        let _ = record::set_phase(&shard.db, &shard.name, &ctx.id, phase, error.as_deref()).await;
    }
    ctx.progress.send_modify(|p| {
        p.phase = if error.is_some() {
            MovePhase::Failed
        } else {
            MovePhase::Done
        };
        p.error = error;
        p.estimated_remaining = None;
    });
}

async fn run(ctx: &Ctx) -> Result<MoveReport, ShardError> {
    copy::publish(ctx).await?;
    let exported = copy::export(ctx).await?;
    let copy_started = Instant::now();
    let rows_copied = copy::copy(ctx, &exported.snapshot).await?;
    let copy_time = copy_started.elapsed();
    ctx.phase(MovePhase::CatchingUp);
    for shard in [ctx.source(), ctx.target()] {
        record::set_phase(&shard.db, &shard.name, &ctx.id, "catching_up", None).await?;
    }
    let mut session = exported.session;
    let within = ctx.options.timeout;
    session
        .0
        .start()
        .await
        .map_err(|e| ctx.failed(MovePhase::CatchingUp, e.to_string()))?;
    tokio::time::timeout(within, session.0.wait_started())
        .await
        .map_err(|_| ctx.failed(MovePhase::CatchingUp, "START_REPLICATION timed out"))?
        .map_err(|e| ctx.failed(MovePhase::CatchingUp, e.to_string()))?;
    let (status_tx, mut status) = watch::channel(StreamStatus {
        applied: exported.consistent_point,
        ..StreamStatus::default()
    });
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    let stream = async { catchup::stream(ctx, session, status_tx, stop).await };
    let drive = async {
        let result = drive(ctx, &mut status).await;
        stopper.cancel();
        result
    };
    let (streamed, driven) = tokio::join!(stream, drive);
    let (version, attempts, cutover) = driven?;
    streamed?;
    let rows_applied = status.borrow().rows_applied;
    let rows_cleaned = cleanup(ctx).await?;
    Ok(MoveReport {
        id: ctx.id.clone(),
        version,
        rows_copied,
        copy_time,
        rows_applied,
        cutover_attempts: attempts,
        pause: cutover.1 - cutover.0,
        cutover,
        rows_cleaned,
    })
}

/// The source's WAL position now.
async fn source_lsn(ctx: &Ctx) -> Result<u64, ShardError> {
    let source = ctx.source();
    let row = source
        .db
        .read_one(
            crate::pg::Consistency::Strong,
            "SELECT pg_catalog.pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .map_err(|e| ShardError::db(&source.name, e))?;
    let text: String = row.value.try_get(0).unwrap_or_default();
    Ok(text.parse::<crate::pg::Lsn>().map(|l| l.0).unwrap_or(0))
}

/// Catches up to within the cutover lag, then cuts over; returns the new
/// map version, the attempts and when the successful one held writes.
async fn drive(
    ctx: &Ctx,
    status: &mut watch::Receiver<StreamStatus>,
) -> Result<(u64, u32, (Instant, Instant)), ShardError> {
    let mut attempt = 0u32;
    loop {
        catch_up(ctx, status).await?;
        attempt += 1;
        ctx.phase(MovePhase::CuttingOver);
        if let Some(held) = cutover(ctx, status, attempt).await? {
            return Ok((held.0, attempt, (held.1, held.2)));
        }
        tracing::info!(id = %ctx.id, attempt, "move: the cutover attempt ran past the pause bound; writes released, catching up");
        if attempt >= ctx.options.cutover_attempts {
            return Err(ShardError::CutoverTimeout {
                id: ctx.id.clone(),
                attempts: attempt,
            });
        }
        ctx.phase(MovePhase::CatchingUp);
    }
}

fn stream_failed(ctx: &Ctx, status: &StreamStatus) -> Option<ShardError> {
    status
        .error
        .as_ref()
        .map(|e| ctx.failed(MovePhase::CatchingUp, e.clone()))
}

/// Waits until the stream is within the cutover lag of the source.
async fn catch_up(ctx: &Ctx, status: &mut watch::Receiver<StreamStatus>) -> Result<(), ShardError> {
    let deadline = Instant::now() + ctx.options.catch_up_timeout;
    let started = Instant::now();
    let first_behind = source_lsn(ctx)
        .await?
        .saturating_sub(status.borrow().applied);
    let mut probe = 0u64;
    let mut ready = false;
    loop {
        // Manual cutover asked for while caught up: at once.
        if ready && *ctx.go.borrow() {
            return Ok(());
        }
        let now = source_lsn(ctx).await?;
        let seen = status.borrow().clone();
        if let Some(e) = stream_failed(ctx, &seen) {
            return Err(e);
        }
        let behind = now.saturating_sub(seen.applied);
        let done = first_behind.saturating_sub(behind) as f64;
        let rate = done / started.elapsed().as_secs_f64().max(1e-3);
        ctx.progress.send_modify(|p| {
            p.bytes_behind = behind;
            p.rows_applied = seen.rows_applied;
            p.estimated_remaining =
                (rate > 0.0).then(|| Duration::from_secs_f64((behind as f64 / rate).min(1e7)));
        });
        // How far behind in time: a marker committed now, and how long it
        // takes to come through (WAL the stream skips, such as vacuum's,
        // counts in the bytes but not here).
        probe += 1;
        let sent = Instant::now();
        let name = format!("{}:probe:{probe}", ctx.id);
        let arrived = if ready && ctx.options.manual_cutover {
            // Caught up and waiting to be told: told while this probe is
            // out (the stream may be slow now), the cutover starts at once
            // (its attempt is bounded whatever the lag).
            let mut go = ctx.go.clone();
            tokio::select! {
                arrived = marker(ctx, status, &name, deadline) => arrived?,
                Ok(_) = go.wait_for(|go| *go) => return Ok(()),
            }
        } else {
            marker(ctx, status, &name, deadline).await?
        };
        let lag = sent.elapsed();
        ready = arrived && lag <= ctx.options.cutover_lag;
        ctx.progress.send_modify(|p| p.caught_up = ready);
        if ready && (!ctx.options.manual_cutover || *ctx.go.borrow()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = if ready {
                format!(
                    "caught up, but MoveHandle::cut_over was not called within {:?}",
                    ctx.options.catch_up_timeout
                )
            } else {
                format!(
                    "still {behind} bytes ({lag:?}) behind after {:?}",
                    ctx.options.catch_up_timeout
                )
            };
            return Err(ctx.failed(MovePhase::CatchingUp, why));
        }
        if ready {
            // Manual cutover, caught up: look again in a while.
            let _ =
                tokio::time::timeout(Duration::from_millis(100), ctx.go.clone().changed()).await;
        }
    }
}

/// Commits marker `name` through the source's WAL and waits until the
/// stream applied everything before it (false: not by `deadline`).
async fn marker(
    ctx: &Ctx,
    status: &mut watch::Receiver<StreamStatus>,
    name: &str,
    deadline: Instant,
) -> Result<bool, ShardError> {
    let source = ctx.source();
    source
        .db
        .execute(
            "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)",
            &[&MARKER, &name],
        )
        .await
        .map_err(|e| ShardError::db(&source.name, e))?;
    // The outcome, with the watch's guard gone before anything awaits.
    let outcome: Result<bool, Option<String>> = match tokio::time::timeout_at(
        tokio::time::Instant::from_std(deadline),
        status.wait_for(|s| s.marker.as_deref() == Some(name) || s.error.is_some()),
    )
    .await
    {
        Ok(Ok(s)) => match &s.error {
            None => Ok(true),
            Some(e) => Err(Some(e.clone())),
        },
        Ok(Err(_)) => Err(None),
        Err(_) => Ok(false),
    };
    outcome.map_err(|e| {
        ctx.failed(
            MovePhase::CatchingUp,
            e.unwrap_or_else(|| "the stream ended".into()),
        )
    })
}

/// One cutover attempt: `None` if it ran past the pause bound (rolled
/// back, nothing changed); else the new version and when writes were held.
async fn cutover(
    ctx: &Ctx,
    status: &mut watch::Receiver<StreamStatus>,
    attempt: u32,
) -> Result<Option<(u64, Instant, Instant)>, ShardError> {
    let (source, target) = (ctx.source(), ctx.target());
    let held = Instant::now();
    let deadline = held + ctx.options.max_pause;
    let to = target.name.to_string();
    // The wait for the range's ownership rows (writes in flight hold them)
    // counts in the bound: past it, this attempt gives up.
    let mv = match ctx
        .cluster
        .begin_move_within(ctx.range, &to, Some(ctx.options.max_pause), false)
        .await
    {
        Ok(mv) => mv,
        Err(ShardError::Db { source, .. })
            if source.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Some(release) = mv.source() else {
        return Err(ctx.failed(
            MovePhase::CuttingOver,
            "the source let go of the range meanwhile",
        ));
    };
    record::set_phase_in(release, &source.name, &ctx.id, "released").await?;
    record::set_phase_in(mv.target(), &target.name, &ctx.id, "cleaning_up").await?;
    let reached = marker(ctx, status, &format!("{}:{attempt}", ctx.id), deadline).await;
    match reached {
        Ok(true) => {}
        // Past the bound: dropping the move rolls both sides back.
        Ok(false) => {
            drop(mv);
            return Ok(None);
        }
        Err(e) => {
            drop(mv);
            return Err(e);
        }
    }
    let version = match mv.commit().await {
        Ok(version) => version,
        Err(e) => match resolve(ctx).await? {
            Some(version) => version,
            None => {
                tracing::warn!(id = %ctx.id, error = %e, "move: the cutover's commit failed before the release; the source still owns the range");
                return Ok(None);
            }
        },
    };
    let released = Instant::now();
    ctx.progress.send_modify(|p| p.bytes_behind = 0);
    Ok(Some((version, held, released)))
}

/// After a cutover commit that failed (or whose outcome is unknown): the
/// range as the ownership tables now have it. The target holds it: done.
/// The source holds it fenced (its fence committed, the claim did not):
/// the claim is finished now, so the range does not stay unserved. The
/// source holds it unfenced: `None` (the attempt changed nothing).
async fn resolve(ctx: &Ctx) -> Result<Option<u64>, ShardError> {
    let map = ctx.cluster.refresh().await?;
    match map.holders(ctx.range).as_slice() {
        [Some((o, false))] if *o == ctx.target => Ok(Some(map.version())),
        [Some((o, false))] if *o == ctx.source => Ok(None),
        [Some((o, true))] if *o == ctx.source => {
            let to = ctx.target().name.to_string();
            Ok(Some(ctx.cluster.finish_fenced(ctx.range, &to).await?))
        }
        [None] => {
            let to = ctx.target().name.to_string();
            Ok(Some(ctx.cluster.move_ownership(ctx.range, &to).await?))
        }
        _ => Err(ctx.failed(
            MovePhase::CuttingOver,
            format!(
                "{} is split between owners after a failed commit",
                ctx.range
            ),
        )),
    }
}
