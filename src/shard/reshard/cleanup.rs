//! Deleting a range's rows from a shard that does not own it: the
//! source's copies after a move, the target's partial copy on a rollback.

use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::types::ToSql;

use super::super::cluster::ShardedCluster;
use super::super::error::ShardError;
use super::super::map::SlotRange;
use super::super::ownership;
use super::copy::throttle;
use super::handle::MovePhase;
use super::rows::{self, TextRow};
use super::run::Ctx;

/// Deletes every row of the declared tables whose slot is in `range` from
/// shard `index`, in batches of `batch` rows read, `rate` rows read per
/// second at most. Each batch runs in a transaction that locks the
/// shard's ownership table in `SHARE` mode (no claim or release can
/// commit meanwhile; writes, which only lock rows, go on) and first checks
/// that the shard owns no slot of the range: it never deletes a row its
/// shard owns. `progress` gets the running count.
pub(crate) async fn delete_range(
    cluster: &ShardedCluster,
    index: usize,
    range: SlotRange,
    batch: usize,
    rate: u32,
    progress: impl Fn(u64),
) -> Result<u64, ShardError> {
    let shard = &cluster.inner.shards[index];
    let name: &Arc<str> = &shard.name;
    let err = |e| ShardError::db(name, e);
    let slots = cluster.inner.slots;
    let started = Instant::now();
    let (mut scanned, mut deleted) = (0u64, 0u64);
    let (first, last) = (i32::from(range.first), i32::from(range.last));
    for spec in &cluster.inner.tables {
        let mut after: Option<Vec<String>> = None;
        loop {
            let tx = shard.db.transaction().await.map_err(err)?;
            tx.execute("LOCK TABLE tower_scale_shard_slots IN SHARE MODE", &[])
                .await
                .map_err(err)?;
            // Keys read as text are hashed here: one text form of bytea
            // whatever the database's default (`escape` would hide every
            // key from the slot hash and delete nothing).
            tx.execute("SET LOCAL bytea_output = 'hex'", &[])
                .await
                .map_err(err)?;
            let owned: i64 = tx
                .query_one(
                    "SELECT count(*) FROM tower_scale_shard_slots WHERE slot BETWEEN $1 AND $2",
                    &[&first, &last],
                )
                .await
                .map_err(err)?
                .try_get(0)
                .unwrap_or(1);
            if owned > 0 {
                let _ = tx.rollback().await;
                return Err(ShardError::Setup(format!(
                    "{name} owns {owned} slots of {range}: its rows there are not deleted"
                )));
            }
            let sql = rows::page_sql(spec, after.is_some(), batch);
            let params: Vec<&(dyn ToSql + Sync)> = after
                .iter()
                .flatten()
                .map(|k| k as &(dyn ToSql + Sync))
                .collect();
            let page = tx.query(&sql, &params).await.map_err(err)?;
            let page = rows::text_rows(&page, name)?;
            let Some(last_row) = page.last() else {
                let _ = tx.rollback().await;
                break;
            };
            after = Some(rows::key_of(spec, last_row).ok_or_else(|| {
                ShardError::Setup(format!("{}: a NULL primary key", spec.qualified()))
            })?);
            let doomed: Vec<&TextRow> = page
                .iter()
                .filter(|r| {
                    spec.slot_of_row(r, slots)
                        .is_some_and(|s| range.slots().contains(&s))
                })
                .collect();
            deleted += rows::delete_rows(&tx, name, spec, &doomed).await?;
            tx.commit().await.map_err(err)?;
            scanned += page.len() as u64;
            progress(deleted);
            throttle(started, scanned, rate).await;
            if page.len() < batch {
                break;
            }
        }
    }
    Ok(deleted)
}

/// The cleanup phase: the source's copies of the range deleted.
pub(super) async fn cleanup(ctx: &Ctx) -> Result<u64, ShardError> {
    ctx.phase(MovePhase::CleaningUp);
    // The source's fenced rows, if the cutover could not delete them:
    // leftovers below the target's grant (the version the map shows it at).
    let map = ctx.cluster.refresh().await?;
    let granted = ctx
        .range
        .slots()
        .map(|s| match map.holder_index(s) {
            Some((o, false)) if o == ctx.target => map.slot_version(s),
            _ => 0,
        })
        .min()
        .unwrap_or(0);
    if granted > 0 {
        let source = &ctx.cluster.inner.shards[ctx.source];
        ownership::forget(&source.db, &source.name, ctx.range, granted).await?;
    }
    let progress = &ctx.progress;
    delete_range(
        &ctx.cluster,
        ctx.source,
        ctx.range,
        ctx.options.batch,
        ctx.options.cleanup_rate,
        |n| progress.send_modify(|p| p.rows_cleaned = n),
    )
    .await
}
