//! Applying a batch of streamed changes on the target in one transaction:
//! each row's net effect, a few statements per table.

use std::collections::HashMap;

use super::super::error::ShardError;
use super::super::tables::TableSpec;
use super::catchup::fail;
use super::rows::{self, TextRow};
use super::run::Ctx;
use crate::pg::Transaction;

/// A streamed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Val {
    Null,
    /// A TOASTed value the change did not touch (not sent).
    Unchanged,
    Text(String),
}

/// A change to a declared table, values in the table's column order.
pub(super) struct Change {
    pub(super) table: usize,
    /// `b'I'`, `b'U'` or `b'D'`.
    pub(super) kind: u8,
    pub(super) old: Option<Vec<Val>>,
    pub(super) new: Option<Vec<Val>>,
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

/// Whether the shard key's value was left out (TOASTed and not changed):
/// the row's slot is then the target's row's, if it has one.
fn key_unchanged(spec: &TableSpec, values: &[Val]) -> bool {
    matches!(values.get(spec.key), Some(Val::Unchanged))
}

/// Whether a new row belongs to the range: its slot is in it, or its
/// shard key was left out (then only a row already on the target, which
/// is in the range, is written).
fn new_in_range(ctx: &Ctx, spec: &TableSpec, new: &[Val]) -> bool {
    key_unchanged(spec, new) || ctx.in_range(slot(ctx, spec, new))
}

fn slot(ctx: &Ctx, spec: &TableSpec, values: &[Val]) -> Option<u16> {
    match values.get(spec.key) {
        Some(Val::Text(t)) => spec.key_type.slot_of_text(t, ctx.slots),
        _ => None,
    }
}

/// Whether a change can touch a row of the range: its new row is in the
/// range, or it deletes a row whose shard key is in the range or unknown
/// (the old tuple names the primary key only), or it is an update that
/// may have taken a row's shard key out of the range: its old shard key
/// is in the range, or unknown while the shard key is not part of the
/// primary key (the old tuple is only sent when the primary key changed,
/// so an update of a shard key inside the primary key always names the
/// old one).
pub(super) fn relevant(ctx: &Ctx, change: &Change) -> bool {
    let spec = &ctx.cluster.inner.tables[change.table];
    match (change.kind, &change.old, &change.new) {
        (b'D', Some(old), _) => match old.get(spec.key) {
            Some(Val::Text(_)) => ctx.in_range(slot(ctx, spec, old)),
            _ => true,
        },
        (b'U', old, Some(new)) if !new_in_range(ctx, spec, new) => {
            match old.as_ref().map(|o| o.get(spec.key)) {
                Some(Some(Val::Text(_))) => {
                    ctx.in_range(old.as_deref().and_then(|o| slot(ctx, spec, o)))
                }
                _ => !spec.primary_key.contains(&spec.key),
            }
        }
        (_, _, Some(new)) => new_in_range(ctx, spec, new),
        _ => false,
    }
}

/// The net effect of a batch on one row (by table and primary key).
enum Effect {
    /// The row as it ends up.
    Upsert(TextRow),
    /// Deleted: with its shard key when the change named it (in range),
    /// else to be looked up on the target.
    Delete(Option<TextRow>),
}

/// The batch's net effects, per table, by primary key.
type Effects = Vec<HashMap<Vec<String>, Effect>>;

/// Writes the net effects: the rows whose shard key is unknown looked up
/// (and kept unless in the range: a row of another slot with the same
/// primary key belongs to the target), then every table's deletes and
/// upserts. Each step's statements (one per table) are sent together:
/// one round trip per step; within a batch each primary key has one
/// effect, and tables are independent.
async fn write(ctx: &Ctx, tx: &Transaction, effects: &mut Effects) -> Result<(), ShardError> {
    let target = &ctx.target().name;
    let tables = &ctx.cluster.inner.tables;
    let mut known: Vec<Vec<TextRow>> = vec![Vec::new(); effects.len()];
    let mut unknown: Vec<Vec<Vec<String>>> = vec![Vec::new(); effects.len()];
    let mut upserts: Vec<Vec<TextRow>> = vec![Vec::new(); effects.len()];
    for (table, rows) in effects.iter_mut().enumerate() {
        for (key, effect) in rows.drain() {
            match effect {
                Effect::Delete(Some(row)) => known[table].push(row),
                Effect::Delete(None) => unknown[table].push(key),
                Effect::Upsert(row) => upserts[table].push(row),
            }
        }
    }
    let found = futures_util::future::try_join_all(
        unknown
            .iter()
            .enumerate()
            .filter(|(_, keys)| !keys.is_empty())
            .map(|(table, keys)| async move {
                rows::lookup(tx, target, &tables[table], keys)
                    .await
                    .map(|found| (table, found))
            }),
    )
    .await?;
    for (table, found) in found {
        for row in found {
            if ctx.in_range(tables[table].slot_of_row(&row, ctx.slots)) {
                known[table].push(row);
            }
        }
    }
    let deletes = known
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(table, r)| {
            let r: Vec<&TextRow> = r.iter().collect();
            async move {
                rows::delete_rows(tx, target, &tables[table], &r)
                    .await
                    .map(drop)
            }
        });
    let ups = upserts
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(table, r)| {
            let r: Vec<&TextRow> = r.iter().collect();
            async move { rows::upsert(tx, target, &tables[table], &r).await }
        });
    // The deletes complete before the upserts start: sent together, a
    // statement whose preparation misses the connection's cache could run
    // after one sent later, and a unique column freed by a delete and
    // taken by an upsert (another primary key) would then collide.
    futures_util::future::try_join_all(deletes).await?;
    futures_util::future::try_join_all(ups).await?;
    Ok(())
}

/// Applies a batch of changes (whole source transactions, in commit
/// order) in one target transaction; returns the changes of the range it
/// applied.
///
/// Changes to different rows commute, so the batch is reduced to each
/// row's net effect (its last change) and written per table, deletes
/// first: a few statements per batch whatever its size. An update that
/// left TOASTed values out and follows no full row of the batch is
/// written on its own, after everything before it.
pub(super) async fn apply(ctx: &Ctx, changes: &[Change]) -> Result<u64, ShardError> {
    let target = ctx.target();
    let terr = |e| ShardError::db(&target.name, e);
    let mut tx: Option<Transaction> = None;
    let mut applied = 0;
    let mut effects: Effects = (0..ctx.cluster.inner.tables.len())
        .map(|_| HashMap::new())
        .collect();
    for change in changes {
        let spec = &ctx.cluster.inner.tables[change.table];
        let new_in_range = change
            .new
            .as_ref()
            .is_some_and(|n| new_in_range(ctx, spec, n));
        let rows = &mut effects[change.table];
        if let (b'D', Some(old)) = (change.kind, &change.old) {
            // The old tuple names the primary key, and the shard key only
            // if it is part of it (or the identity is FULL).
            let Some(key) = key_text(spec, old) else {
                return Err(fail(ctx, "a delete without its primary key"));
            };
            let effect = match old.get(spec.key) {
                Some(Val::Text(_)) if !ctx.in_range(slot(ctx, spec, old)) => continue,
                Some(Val::Text(_)) => Effect::Delete(text_row(old)),
                _ => Effect::Delete(None),
            };
            rows.insert(key, effect);
            applied += 1;
            continue;
        }
        if let (b'U', Some(new), false) = (change.kind, &change.new, new_in_range) {
            // Its shard key may have left the range (see `relevant`): the
            // row goes from the target if it is there with a key in the
            // range (looked up), under its old primary key and its new.
            let keys = [change.old.as_deref(), Some(new.as_slice())];
            for key in keys.into_iter().flatten().filter_map(|v| key_text(spec, v)) {
                rows.insert(key, Effect::Delete(None));
            }
            applied += 1;
            continue;
        }
        let Some(new) = change.new.as_ref().filter(|_| new_in_range) else {
            continue;
        };
        let Some(key) = key_text(spec, new) else {
            return Err(fail(ctx, "a row without its primary key"));
        };
        applied += 1;
        // An update that changed the primary key: the old row goes (or,
        // with values left out, is renamed in place below).
        let renamed = match (change.kind, &change.old) {
            (b'U', Some(old)) => key_text(spec, old).filter(|old_key| *old_key != key),
            _ => None,
        };
        if let Some(row) = text_row(new) {
            if let Some(old_key) = renamed {
                rows.insert(old_key, Effect::Delete(None));
            }
            rows.insert(key, Effect::Upsert(row));
            continue;
        }
        // TOASTed values left out: completed from the batch's own full
        // row of it (under its old key, if renamed), or written in place
        // after everything before it.
        let from = renamed.clone().unwrap_or_else(|| key.clone());
        if let Some(Effect::Upsert(row)) = rows.get_mut(&from) {
            let mut row = std::mem::take(row);
            for (i, v) in new.iter().enumerate() {
                match v {
                    Val::Null => row[i] = None,
                    Val::Text(t) => row[i] = Some(t.clone()),
                    Val::Unchanged => {}
                }
            }
            if let Some(old_key) = renamed {
                rows.insert(old_key, Effect::Delete(None));
            }
            rows.insert(key, Effect::Upsert(row));
            continue;
        }
        if tx.is_none() {
            tx = Some(target.db.transaction().await.map_err(terr)?);
        }
        let Some(t) = tx.as_ref() else { continue };
        write(ctx, t, &mut effects).await?;
        // The row found by its old key (renamed: the new key is among the
        // columns set), its left-out values kept.
        let set: Vec<(usize, Option<String>)> = new
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Val::Null => Some((i, None)),
                Val::Text(t) => Some((i, Some(t.clone()))),
                Val::Unchanged => None,
            })
            .collect();
        rows::update_columns(t, &target.name, spec, &from, &set).await?;
    }
    if effects.iter().all(HashMap::is_empty) && tx.is_none() {
        return Ok(applied);
    }
    let tx = match tx {
        Some(tx) => tx,
        None => target.db.transaction().await.map_err(terr)?,
    };
    write(ctx, &tx, &mut effects).await?;
    tx.commit().await.map_err(terr)?;
    Ok(applied)
}
