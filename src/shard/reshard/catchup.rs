//! The catch-up: the slot streamed from its consistent point, each source
//! transaction's changes to rows of the range applied on the target in
//! one transaction, in commit order.

use std::collections::HashMap;

use pgwire_replication::ReplicationEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::super::error::ShardError;
use super::super::tables::TableSpec;
use super::copy::Session;
use super::rows::{self, TextRow};
use super::run::Ctx;
use crate::pg::feed::pgoutput::{self, Message, Value};

/// The prefix of the cutover's marker (a transactional logical message
/// whose content names the move and the attempt).
pub(super) const MARKER: &str = "tower-scale-reshard";

/// What the stream has done, for the move's task.
#[derive(Debug, Clone, Default)]
pub(super) struct StreamStatus {
    /// Every source transaction that committed at or before it is applied.
    pub(super) applied: u64,
    pub(super) rows_applied: u64,
    /// The last marker received.
    pub(super) marker: Option<String>,
    /// The stream failed.
    pub(super) error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Null,
    Unchanged,
    Text(String),
}

/// A change to a declared table, values in the table's column order.
struct Change {
    table: usize,
    kind: u8,
    old: Option<Vec<Val>>,
    new: Option<Vec<Val>>,
}

/// A relation of the stream: the declared table it is and where each of
/// the table's columns is in its tuples (`None`: not declared).
type Relations = HashMap<u32, Option<(usize, Vec<usize>)>>;

fn fail(ctx: &Ctx, reason: impl Into<String>) -> ShardError {
    ShardError::MoveFailed {
        id: ctx.id.clone(),
        phase: "catching_up",
        reason: reason.into(),
    }
}

fn relation(
    ctx: &Ctx,
    rel: &pgoutput::Relation,
) -> Result<Option<(usize, Vec<usize>)>, ShardError> {
    let tables = &ctx.cluster.inner.tables;
    let Some(index) = tables
        .iter()
        .position(|t| t.schema == rel.schema && t.name == rel.name)
    else {
        return Ok(None);
    };
    let spec = &tables[index];
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    if names.len() != spec.columns.len() {
        return Err(fail(
            ctx,
            format!(
                "the columns of {} changed during the move",
                spec.qualified()
            ),
        ));
    }
    let mut positions = Vec::with_capacity(spec.columns.len());
    for column in &spec.columns {
        match names.iter().position(|n| *n == column.name) {
            Some(p) => positions.push(p),
            None => {
                return Err(fail(
                    ctx,
                    format!(
                        "column {} of {} is gone from the stream: the table changed during the move",
                        column.name,
                        spec.qualified()
                    ),
                ));
            }
        }
    }
    Ok(Some((index, positions)))
}

fn values(ctx: &Ctx, tuple: &[Value<'_>], positions: &[usize]) -> Result<Vec<Val>, ShardError> {
    positions
        .iter()
        .map(|&p| match tuple.get(p) {
            None | Some(Value::Null) => Ok(Val::Null),
            Some(Value::Unchanged) => Ok(Val::Unchanged),
            Some(Value::Text(b) | Value::Binary(b)) => std::str::from_utf8(b)
                .map(|s| Val::Text(s.to_owned()))
                .map_err(|_| fail(ctx, "a streamed value is not UTF-8")),
        })
        .collect()
}

fn text_row(values: &[Val]) -> Option<TextRow> {
    values
        .iter()
        .map(|v| match v {
            Val::Null => Some(None),
            Val::Text(t) => Some(Some(t.clone())),
            Val::Unchanged => None,
        })
        .collect()
}

fn key_text(spec: &TableSpec, values: &[Val]) -> Option<Vec<String>> {
    spec.primary_key
        .iter()
        .map(|&i| match values.get(i) {
            Some(Val::Text(t)) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn slot(ctx: &Ctx, spec: &TableSpec, values: &[Val]) -> Option<u16> {
    match values.get(spec.key) {
        Some(Val::Text(t)) => spec.key_type.slot_of_text(t, ctx.slots),
        _ => None,
    }
}

/// Applies one source transaction's changes; returns the rows of the
/// range it wrote.
async fn apply(ctx: &Ctx, changes: &[Change]) -> Result<u64, ShardError> {
    let target = ctx.target();
    let terr = |e| ShardError::db(&target.name, e);
    let mut tx = None;
    let mut rows_applied = 0;
    // Consecutive upserts of one table, one row per primary key (the
    // last change wins), written in one statement.
    let mut upserts: Upserts = (0, Vec::new(), HashMap::new());
    for change in changes {
        let spec = &ctx.cluster.inner.tables[change.table];
        // What to do: write the new row (in range), or delete the old one.
        let new_in_range = change
            .new
            .as_ref()
            .is_some_and(|n| ctx.in_range(slot(ctx, spec, n)));
        let delete_key = match (change.kind, &change.old, &change.new) {
            (b'D', Some(old), _) => {
                // The old tuple names the key; the shard key only if it is
                // part of it (or REPLICA IDENTITY FULL).
                match old.get(spec.key) {
                    Some(Val::Text(_)) if !ctx.in_range(slot(ctx, spec, old)) => None,
                    _ => key_text(spec, old),
                }
            }
            // A primary key changed within the range: the old row goes.
            (b'U', Some(old), Some(new)) if new_in_range => {
                let (o, n) = (key_text(spec, old), key_text(spec, new));
                if o.is_some() && o != n { o } else { None }
            }
            _ => None,
        };
        if !new_in_range && delete_key.is_none() {
            continue;
        }
        if tx.is_none() {
            tx = Some(target.db.transaction().await.map_err(terr)?);
        }
        let Some(t) = tx.as_ref() else { continue };
        let row = change
            .new
            .as_ref()
            .filter(|_| new_in_range)
            .and_then(|n| text_row(n));
        if let (Some(row), None) = (&row, &delete_key) {
            if upserts.0 != change.table {
                flush(ctx, t, &mut upserts).await?;
                upserts.0 = change.table;
            }
            let key = rows::key_of(spec, row);
            match upserts.2.get(&key) {
                Some(&i) => upserts.1[i] = row.clone(),
                None => {
                    upserts.2.insert(key, upserts.1.len());
                    upserts.1.push(row.clone());
                }
            }
            rows_applied += 1;
            continue;
        }
        flush(ctx, t, &mut upserts).await?;
        if let Some(key) = delete_key {
            rows::delete_in_range(t, &target.name, spec, &key, ctx.range, ctx.slots).await?;
            rows_applied += 1;
        }
        if let (true, Some(new)) = (new_in_range, &change.new) {
            match text_row(new) {
                Some(row) => rows::upsert(t, &target.name, spec, &[&row]).await?,
                None => {
                    // TOASTed values left out: update the others in place.
                    let key = key_text(spec, new)
                        .ok_or_else(|| fail(ctx, "an update without its primary key"))?;
                    let set: Vec<(usize, Option<String>)> = new
                        .iter()
                        .enumerate()
                        .filter_map(|(i, v)| match v {
                            Val::Null => Some((i, None)),
                            Val::Text(t) => Some((i, Some(t.clone()))),
                            Val::Unchanged => None,
                        })
                        .collect();
                    rows::update_columns(t, &target.name, spec, &key, &set).await?;
                }
            }
            rows_applied += 1;
        }
    }
    if let Some(tx) = tx {
        flush(ctx, &tx, &mut upserts).await?;
        tx.commit().await.map_err(terr)?;
    }
    Ok(rows_applied)
}

/// Pending upserts: the table, the rows, each row's index by primary key.
type Upserts = (usize, Vec<TextRow>, HashMap<Option<Vec<String>>, usize>);

async fn flush(
    ctx: &Ctx,
    tx: &crate::pg::Transaction,
    upserts: &mut Upserts,
) -> Result<(), ShardError> {
    if upserts.1.is_empty() {
        return Ok(());
    }
    let spec = &ctx.cluster.inner.tables[upserts.0];
    let rows: Vec<&TextRow> = upserts.1.iter().collect();
    rows::upsert(tx, &ctx.target().name, spec, &rows).await?;
    upserts.1.clear();
    upserts.2.clear();
    Ok(())
}

/// The most changes applied in one target transaction.
const MAX_BATCH: usize = 5_000;

/// Applies the batch in one target transaction; returns the new applied
/// position.
async fn apply_batch(
    ctx: &Ctx,
    client: &pgwire_replication::ReplicationClient,
    status: &watch::Sender<StreamStatus>,
    batch: &mut Vec<Change>,
    end: u64,
) -> Result<u64, ShardError> {
    let n = apply(ctx, batch).await?;
    batch.clear();
    client.update_applied_lsn(pgwire_replication::Lsn(end));
    status.send_modify(|s| {
        s.applied = s.applied.max(end);
        s.rows_applied += n;
    });
    Ok(end)
}

/// Streams until `stop`, applying; reports through `status`. The session
/// must have been started.
pub(super) async fn stream(
    ctx: &Ctx,
    mut session: Session,
    status: watch::Sender<StreamStatus>,
    stop: CancellationToken,
) -> Result<(), ShardError> {
    let result = run(ctx, &mut session, &status, &stop).await;
    if let Err(e) = &result {
        status.send_modify(|s| s.error = Some(e.to_string()));
    }
    // The session (and its temporary slot) ends here.
    drop(session);
    result
}

async fn run(
    ctx: &Ctx,
    session: &mut Session,
    status: &watch::Sender<StreamStatus>,
    stop: &CancellationToken,
) -> Result<(), ShardError> {
    let client = &mut session.0;
    let mut relations: Relations = HashMap::new();
    let mut pending: Vec<Change> = Vec::new();
    let mut in_transaction = false;
    let mut applied = 0u64;
    // Committed transactions not applied yet, and the end of the last:
    // applied together in one target transaction when the stream has
    // nothing more ready (or the batch is full).
    let mut batch: Vec<Change> = Vec::new();
    let mut batch_end = 0u64;
    loop {
        let ready = if batch_end > applied {
            match futures_util::FutureExt::now_or_never(client.recv()) {
                Some(event) => Some(event),
                None => {
                    applied = apply_batch(ctx, client, status, &mut batch, batch_end).await?;
                    continue;
                }
            }
        } else {
            None
        };
        let event = match ready {
            Some(event) => event,
            None => tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                event = client.recv() => event,
            },
        };
        let event = event
            .map_err(|e| fail(ctx, format!("the replication stream: {e}")))?
            .ok_or_else(|| fail(ctx, "the replication stream ended"))?;
        match event {
            ReplicationEvent::Begin { .. } => {
                pending.clear();
                in_transaction = true;
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data).map_err(|e| fail(ctx, e.to_string()))?;
                match message {
                    Message::Relation(rel) => {
                        let mapped = relation(ctx, &rel)?;
                        relations.insert(rel.id, mapped);
                    }
                    Message::Change {
                        kind,
                        relation,
                        old,
                        new,
                    } => {
                        let Some(Some((table, positions))) = relations.get(&relation) else {
                            continue;
                        };
                        let old = old.map(|t| values(ctx, &t, positions)).transpose()?;
                        let new = new.map(|t| values(ctx, &t, positions)).transpose()?;
                        pending.push(Change {
                            table: *table,
                            kind,
                            old,
                            new,
                        });
                    }
                    Message::Truncate(ids) => {
                        if ids
                            .iter()
                            .any(|id| matches!(relations.get(id), Some(Some(_))))
                        {
                            return Err(fail(
                                ctx,
                                "a declared table was truncated during the move",
                            ));
                        }
                    }
                    Message::Other(_) => {}
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                in_transaction = false;
                batch.append(&mut pending);
                batch_end = batch_end.max(end_lsn.as_u64());
                if batch.is_empty() {
                    // Nothing of the range: applied as it is.
                    applied = applied.max(batch_end);
                    client.update_applied_lsn(pgwire_replication::Lsn(applied));
                    status.send_modify(|s| s.applied = applied);
                } else if batch.len() >= MAX_BATCH {
                    applied = apply_batch(ctx, client, status, &mut batch, batch_end).await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if !in_transaction && batch_end <= applied && wal_end.as_u64() > applied {
                    applied = wal_end.as_u64();
                    batch_end = applied;
                    client.update_applied_lsn(pgwire_replication::Lsn(applied));
                    status.send_modify(|s| s.applied = applied);
                }
            }
            ReplicationEvent::Message {
                prefix, content, ..
            } if prefix == MARKER => {
                if batch_end > applied {
                    applied = apply_batch(ctx, client, status, &mut batch, batch_end).await?;
                }
                let marker = String::from_utf8_lossy(&content).into_owned();
                // Every transaction committed before the marker's was
                // applied above (commit order).
                status.send_modify(|s| s.marker = Some(marker));
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
    }
}
