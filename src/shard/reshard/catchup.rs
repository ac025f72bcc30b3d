//! The catch-up: the slot streamed from its consistent point, each source
//! transaction's changes to rows of the range applied on the target in
//! one transaction, in commit order.

use std::collections::HashMap;

use pgwire_replication::ReplicationEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::super::error::ShardError;
use super::apply::{Change, Val, apply, relevant};
use super::copy::Session;
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

/// A relation of the stream: the declared table it is and where each of
/// the table's columns is in its tuples (`None`: not declared).
type Relations = HashMap<u32, Option<(usize, Vec<usize>)>>;

pub(super) fn fail(ctx: &Ctx, reason: impl Into<String>) -> ShardError {
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
                        let change = Change {
                            table: *table,
                            kind,
                            old,
                            new,
                        };
                        // Only what the range may need is kept until the
                        // commit.
                        if relevant(ctx, &change) {
                            pending.push(change);
                        }
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
