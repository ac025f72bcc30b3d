//! The copy phase: the publication, the temporary slot exported with its
//! snapshot on a replication session, and the snapshot's rows of the range
//! written on the target in throttled batches.

use std::time::{Duration, Instant};

use pgwire_replication::ReplicationClient;
use tokio_postgres::types::ToSql;

use super::super::error::ShardError;
use super::super::tables::ident;
use super::rows::{self, TextRow};
use super::run::Ctx;

/// The replication session of a move; ends (and so drops its temporary
/// slot) however its owner leaves.
pub(super) struct Session(pub(super) ReplicationClient);

impl Drop for Session {
    fn drop(&mut self) {
        self.0.stop();
        self.0.abort();
    }
}

/// A string literal that means the same whatever
/// `standard_conforming_strings` is.
pub(super) fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// What creating the slot answered.
pub(super) struct Exported {
    pub(super) session: Session,
    /// Every transaction committing after it is streamed.
    pub(super) consistent_point: u64,
    /// The snapshot of everything committed before it (valid while the
    /// session runs no other command).
    pub(super) snapshot: String,
}

/// Creates the publication of the declared tables (replacing a leftover
/// of the same name).
pub(super) async fn publish(ctx: &Ctx) -> Result<(), ShardError> {
    let source = ctx.source();
    let tables: Vec<String> = ctx
        .cluster
        .inner
        .tables
        .iter()
        .map(|t| format!("ONLY {}", t.qualified()))
        .collect();
    for sql in [
        format!("DROP PUBLICATION IF EXISTS {}", ident(&ctx.slot_name)),
        format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            ident(&ctx.slot_name),
            tables.join(", ")
        ),
    ] {
        source
            .db
            .execute(&sql, &[])
            .await
            .map_err(|e| ShardError::db(&source.name, e))?;
    }
    Ok(())
}

/// Drops the move's publication (if there).
pub(super) async fn unpublish(ctx: &Ctx) -> Result<(), ShardError> {
    let source = ctx.source();
    source
        .db
        .execute(
            &format!("DROP PUBLICATION IF EXISTS {}", ident(&ctx.slot_name)),
            &[],
        )
        .await
        .map_err(|e| ShardError::db(&source.name, e))?;
    Ok(())
}

fn failed(ctx: &Ctx, what: &str, e: impl std::fmt::Display) -> ShardError {
    ShardError::MoveFailed {
        id: ctx.id.clone(),
        phase: "copying",
        reason: format!("{what}: {e}"),
    }
}

/// Opens the replication session on the source's primary and creates the
/// temporary slot, exporting its snapshot.
pub(super) async fn export(ctx: &Ctx) -> Result<Exported, ShardError> {
    let source = ctx.source();
    let within = ctx.options.timeout;
    let config = crate::pg::feed::primary_replication_config(
        &source.cluster,
        &ctx.slot_name,
        &ctx.slot_name,
        Duration::from_secs(30),
    )
    .map_err(|e| failed(ctx, "the replication session's settings", e))?;
    let client = tokio::time::timeout(within, ReplicationClient::connect_gated(config))
        .await
        .map_err(|_| failed(ctx, "connecting the replication session", "timed out"))?
        .map_err(|e| failed(ctx, "connecting the replication session", e))?;
    let mut session = Session(client);
    let sql = format!(
        "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
        ident(&ctx.slot_name)
    );
    let rows = tokio::time::timeout(within, session.0.simple_query(&sql))
        .await
        .map_err(|_| failed(ctx, "creating the replication slot", "timed out"))?
        .map_err(|e| failed(ctx, "creating the replication slot", e))?;
    let text = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let consistent_point = text(1)
        .and_then(|t| t.parse::<crate::pg::Lsn>().ok())
        .ok_or_else(|| failed(ctx, "creating the replication slot", "no consistent point"))?;
    let snapshot =
        text(2).ok_or_else(|| failed(ctx, "creating the replication slot", "no snapshot"))?;
    Ok(Exported {
        session,
        consistent_point: consistent_point.0,
        snapshot,
    })
}

/// An estimate of the rows the copy reads (the planner's).
async fn estimate(ctx: &Ctx) -> u64 {
    let source = ctx.source();
    let mut total = 0u64;
    for spec in &ctx.cluster.inner.tables {
        let qualified = spec.qualified();
        let row = source
            .db
            .read_one(
                crate::pg::Consistency::Strong,
                "SELECT greatest(reltuples, 0)::int8 FROM pg_catalog.pg_class \
                 WHERE oid = pg_catalog.to_regclass($1)",
                &[&qualified],
            )
            .await;
        if let Ok(row) = row {
            total += u64::try_from(row.value.try_get::<_, i64>(0).unwrap_or(0)).unwrap_or(0);
        }
    }
    total
}

/// Copies the snapshot's rows of the range to the target; returns the rows
/// copied.
pub(super) async fn copy(ctx: &Ctx, snapshot: &str) -> Result<u64, ShardError> {
    let (source, target) = (ctx.source(), ctx.target());
    let serr = |e| ShardError::db(&source.name, e);
    let total = estimate(ctx).await;
    let begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}; \
         SET LOCAL bytea_output = 'hex'; SET LOCAL datestyle = 'ISO'; \
         SET LOCAL timezone = 'UTC'; SET LOCAL extra_float_digits = 3; \
         SET LOCAL intervalstyle = 'postgres'",
        literal(snapshot)
    );
    let (tx, _) = source.db.transaction_with(&begin).await.map_err(serr)?;
    let started = Instant::now();
    let (mut scanned, mut copied) = (0u64, 0u64);
    for spec in &ctx.cluster.inner.tables {
        let mut after: Option<Vec<String>> = None;
        loop {
            let sql = rows::page_sql(spec, after.is_some(), ctx.options.batch);
            let params: Vec<&(dyn ToSql + Sync)> = after
                .iter()
                .flatten()
                .map(|k| k as &(dyn ToSql + Sync))
                .collect();
            let page = tx.query(&sql, &params).await.map_err(serr)?;
            let page = rows::text_rows(&page, &source.name)?;
            let Some(last) = page.last() else { break };
            after = Some(rows::key_of(spec, last).ok_or_else(|| {
                failed(
                    ctx,
                    "paging",
                    format!("{}: a NULL primary key", spec.qualified()),
                )
            })?);
            let moving: Vec<&TextRow> = page
                .iter()
                .filter(|r| ctx.in_range(spec.slot_of_row(r, ctx.slots)))
                .collect();
            if !moving.is_empty() {
                let ttx = target
                    .db
                    .transaction()
                    .await
                    .map_err(|e| ShardError::db(&target.name, e))?;
                rows::upsert(&ttx, &target.name, spec, &moving).await?;
                ttx.commit()
                    .await
                    .map_err(|e| ShardError::db(&target.name, e))?;
            }
            scanned += page.len() as u64;
            copied += moving.len() as u64;
            let rate = scanned as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let remaining = (total.saturating_sub(scanned) as f64 / rate.max(1.0)).min(1e7);
            ctx.progress.send_modify(|p| {
                p.rows_scanned = scanned;
                p.rows_copied = copied;
                p.estimated_remaining = Some(Duration::from_secs_f64(remaining));
            });
            throttle(started, scanned, ctx.options.copy_rate).await;
            if page.len() < ctx.options.batch {
                break;
            }
        }
    }
    // Read-only: nothing to commit.
    let _ = tx.rollback().await;
    Ok(copied)
}

/// Sleeps until `done` rows at `rate` per second since `started` are due.
pub(super) async fn throttle(started: Instant, done: u64, rate: u32) {
    if rate == 0 {
        return;
    }
    let due = started + Duration::from_secs_f64(done as f64 / f64::from(rate));
    tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
}
