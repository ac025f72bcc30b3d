//! Resuming and rolling back a move whose process died or that failed.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::super::cluster::ShardedCluster;
use super::super::error::ShardError;
use super::super::tables;
use super::cleanup::{cleanup, delete_range};
use super::copy;
use super::handle::{MoveHandle, MoveOptions, MovePhase, MoveReport};
use super::record::{self, MoveRecord};
use super::run::{Ctx, finish, initial, slot_name};

impl ShardedCluster {
    /// Resumes move `id` after its process died or it failed: a move cut
    /// over (the target owns the range) or in transit (the source holds
    /// it fenced: the source's side of the cutover committed, the claim
    /// did not) is finished and cleaned up; otherwise the target's
    /// partial rows are deleted and the move starts again from a new
    /// snapshot, under the same id.
    pub async fn resume_move(
        &self,
        id: &str,
        options: MoveOptions,
    ) -> Result<MoveHandle, ShardError> {
        let rec = record::find(self, id).await?;
        self.resumable(&rec, true).await?;
        self.not_running(&rec).await?;
        let target = self.shard_index(&rec.target)?;
        let source = self.shard_index(&rec.source)?;
        let map = self.refresh().await?;
        match map.holders(rec.range).as_slice() {
            [Some((o, false))] if *o == source => {
                delete_range(self, target, rec.range, options.batch, 0, |_| {}).await?;
                self.start_move(Some(rec.id), rec.range, &rec.target, options)
                    .await
            }
            [Some((o, false))] if *o == target => {
                self.finish_cut_over(rec, source, target, options)
            }
            // In transit (fenced by the source), or an earlier release's
            // in transit (nobody lists it): the claim is finished.
            [Some((o, true))] if *o == source => {
                self.finish_fenced(rec.range, &rec.target).await?;
                self.finish_cut_over(rec, source, target, options)
            }
            [None] => {
                self.move_ownership(rec.range, &rec.target).await?;
                self.finish_cut_over(rec, source, target, options)
            }
            _ => Err(ShardError::Setup(format!(
                "move {id}: {} is owned by several shards now: move each part on its own",
                rec.range
            ))),
        }
    }

    /// A cut-over move's end: the cleanup of the source, in the background.
    fn finish_cut_over(
        &self,
        rec: MoveRecord,
        source: usize,
        target: usize,
        options: MoveOptions,
    ) -> Result<MoveHandle, ShardError> {
        let (tx, rx) = watch::channel(initial(&rec.id, rec.range, MovePhase::CleaningUp));
        let (go, go_rx) = watch::channel(true);
        let ctx = Ctx {
            go: go_rx,
            cluster: self.clone(),
            slot_name: slot_name(&rec.id),
            id: rec.id.clone(),
            range: rec.range,
            source,
            target,
            slots: self.inner.slots,
            options,
            progress: tx,
        };
        let task = tokio::spawn(async move {
            let result = async {
                // A publication a dead process left.
                copy::unpublish(&ctx).await?;
                let cleaned = cleanup(&ctx).await?;
                Ok(MoveReport {
                    id: ctx.id.clone(),
                    version: ctx.cluster.map().version(),
                    rows_copied: 0,
                    copy_time: Duration::ZERO,
                    rows_applied: 0,
                    cutover_attempts: 0,
                    pause: Duration::ZERO,
                    cutover: (Instant::now(), Instant::now()),
                    rows_cleaned: cleaned,
                })
            }
            .await;
            finish(&ctx, &result).await;
            result
        });
        Ok(MoveHandle {
            id: rec.id,
            progress: rx,
            task,
            go,
        })
    }

    /// Rolls move `id` back: the source's fence is lifted if its side of
    /// the cutover committed (the target's claim did not: the source's
    /// rows are the range's data, and it serves them again), its
    /// publication is dropped and the target's partial rows deleted (its
    /// temporary slot went with its session: refused while that session
    /// lives, as for a running move). Refused once the move cut over (the
    /// target owns the range: move it back instead).
    pub async fn rollback_move(&self, id: &str) -> Result<(), ShardError> {
        let rec = record::find(self, id).await?;
        self.resumable(&rec, false).await?;
        self.not_running(&rec).await?;
        let source = self.shard_index(&rec.source)?;
        let target = self.shard_index(&rec.target)?;
        let map = self.refresh().await?;
        let holders = map.holders(rec.range);
        if holders.iter().any(|h| h.map(|(i, _)| i) != Some(source)) {
            return Err(ShardError::Setup(format!(
                "move {id}: {} is not held by {} alone any more (cut over): \
                 move the range back",
                rec.range, rec.source
            )));
        }
        if holders.iter().flatten().any(|&(_, fenced)| fenced) {
            self.lift_fence_on(rec.range, source).await?;
        }
        let src = &self.inner.shards[source];
        let name = slot_name(&rec.id);
        let err = |e| ShardError::db(&src.name, e);
        src.db
            .execute(
                &format!("DROP PUBLICATION IF EXISTS {}", tables::ident(&name)),
                &[],
            )
            .await
            .map_err(err)?;
        delete_range(self, target, rec.range, 1_000, 0, |_| {}).await?;
        let tgt = &self.inner.shards[target];
        record::set_phase(&src.db, &src.name, id, "rolled_back", None).await?;
        record::set_phase(&tgt.db, &tgt.name, id, "rolled_back", None).await?;
        Ok(())
    }

    /// Refuses a move that runs: in this instance, or anywhere (its
    /// temporary replication slot lives exactly as long as its session;
    /// one whose process just died is given a few seconds to go).
    /// A move that finished is left alone (its range may have moved on
    /// since: deleting "its" partial rows could delete another move's),
    /// except that one rolled back may start again (`restart`); and so is
    /// one whose range another unfinished move overlaps.
    async fn resumable(&self, rec: &MoveRecord, restart: bool) -> Result<(), ShardError> {
        if rec.finished() && !(restart && rec.rolled_back()) {
            return Err(ShardError::Setup(format!(
                "move {} finished ({}): nothing to resume or roll back",
                rec.id,
                rec.phase_text()
            )));
        }
        if let Some(other) = record::unfinished_overlapping(self, rec.range, Some(&rec.id)).await? {
            return Err(ShardError::MoveConflict { id: other });
        }
        Ok(())
    }

    async fn not_running(&self, rec: &MoveRecord) -> Result<(), ShardError> {
        let conflict = || ShardError::MoveConflict { id: rec.id.clone() };
        if crate::sync::lock(&self.inner.running_moves)
            .iter()
            .any(|(r, _)| *r == rec.id)
        {
            return Err(conflict());
        }
        let source = &self.inner.shards[self.shard_index(&rec.source)?];
        let name = slot_name(&rec.id);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let row = source
                .db
                .read_one(
                    crate::pg::Consistency::Strong,
                    "SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await
                .map_err(|e| ShardError::db(&source.name, e))?;
            if row.value.try_get::<_, i64>(0).unwrap_or(1) == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(conflict());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
