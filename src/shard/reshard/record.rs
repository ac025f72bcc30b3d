//! `tower_scale_shard_moves`: each move recorded on its source and its
//! target, so a move whose process died leaves its partial copy marked.
//!
//! ```sql
//! CREATE TABLE tower_scale_shard_moves (id text PRIMARY KEY,
//!   role text NOT NULL,            -- 'source' or 'target': which side this shard is
//!   first_slot int4 NOT NULL, last_slot int4 NOT NULL,
//!   source text NOT NULL, target text NOT NULL,
//!   phase text NOT NULL,           -- copying ... done, failed, released, rolled_back
//!   error text, updated timestamptz NOT NULL DEFAULT now());
//! ```
//!
//! On the source, `released` is committed with the fence of the range
//! (the range is then in transit: the target's claim finishes it, or a
//! rollback lifts the fence); on the
//! target, `cleaning_up` is committed with the claim.

use std::sync::Arc;

use tokio_postgres::types::ToSql;

use crate::pg::{Consistency, Db, Transaction};

use super::super::cluster::ShardedCluster;
use super::super::error::ShardError;
use super::super::map::SlotRange;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS tower_scale_shard_moves (\
     id text PRIMARY KEY, role text NOT NULL CHECK (role IN ('source', 'target')), \
     first_slot int4 NOT NULL, last_slot int4 NOT NULL, source text NOT NULL, \
     target text NOT NULL, phase text NOT NULL, error text, \
     updated timestamptz NOT NULL DEFAULT now())";

/// A phase a record can be in that needs nothing more.
const FINISHED: &[&str] = &["done", "rolled_back"];

/// A move as recorded.
#[derive(Debug, Clone)]
pub(crate) struct MoveRecord {
    pub(crate) id: String,
    pub(crate) range: SlotRange,
    pub(crate) source: String,
    pub(crate) target: String,
    /// The phase on each side that recorded it: (source's, target's).
    pub(crate) phases: (Option<String>, Option<String>),
}

/// Creates the table on `db` if needed.
pub(crate) async fn ensure(db: &Db, shard: &Arc<str>) -> Result<(), ShardError> {
    db.execute(CREATE, &[])
        .await
        .map_err(|e| ShardError::db(shard, e))?;
    Ok(())
}

/// Records the move on one side (replacing a record of the same id: a
/// resume starts the move again).
pub(crate) async fn insert(
    db: &Db,
    shard: &Arc<str>,
    record: &MoveRecord,
    role: &str,
    phase: &str,
) -> Result<(), ShardError> {
    ensure(db, shard).await?;
    let (first, last) = (i32::from(record.range.first), i32::from(record.range.last));
    db.execute(
        "INSERT INTO tower_scale_shard_moves (id, role, first_slot, last_slot, source, target, phase) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, \
         first_slot = EXCLUDED.first_slot, last_slot = EXCLUDED.last_slot, \
         source = EXCLUDED.source, target = EXCLUDED.target, phase = EXCLUDED.phase, \
         error = NULL, updated = now()",
        &[
            &record.id,
            &role,
            &first,
            &last,
            &record.source,
            &record.target,
            &phase,
        ],
    )
    .await
    .map_err(|e| ShardError::db(shard, e))?;
    Ok(())
}

/// A `released` source stays so until the move is done or rolled back:
/// it is what says the range is in transit.
const SET_PHASE: &str = "UPDATE tower_scale_shard_moves SET phase = $2, error = $3, \
     updated = now() WHERE id = $1 AND (phase <> 'released' OR $2 IN ('done', 'rolled_back'))";

/// Sets the phase (and error) of the move's record on `db`.
pub(crate) async fn set_phase(
    db: &Db,
    shard: &Arc<str>,
    id: &str,
    phase: &str,
    error: Option<&str>,
) -> Result<(), ShardError> {
    let params: [&(dyn ToSql + Sync); 3] = [&id, &phase, &error];
    db.execute(SET_PHASE, &params)
        .await
        .map_err(|e| ShardError::db(shard, e))?;
    Ok(())
}

/// Sets the phase inside a transaction (the release's or the claim's).
pub(crate) async fn set_phase_in(
    tx: &Transaction,
    shard: &Arc<str>,
    id: &str,
    phase: &str,
) -> Result<(), ShardError> {
    let none: Option<&str> = None;
    let params: [&(dyn ToSql + Sync); 3] = [&id, &phase, &none];
    tx.execute(SET_PHASE, &params)
        .await
        .map_err(|e| ShardError::db(shard, e))?;
    Ok(())
}

/// Every record on every shard (from the primaries), by id.
async fn all(cluster: &ShardedCluster) -> Result<Vec<MoveRecord>, ShardError> {
    let mut out: Vec<MoveRecord> = Vec::new();
    for shard in &cluster.inner.shards {
        ensure(&shard.db, &shard.name).await?;
        let rows = shard
            .db
            .read_query(
                Consistency::Strong,
                "SELECT id, role, first_slot, last_slot, source, target, phase \
                 FROM tower_scale_shard_moves",
                &[],
            )
            .await
            .map_err(|e| ShardError::db(&shard.name, e))?;
        for row in rows.value {
            let bad = |e| ShardError::Setup(format!("{}'s move records: {e}", shard.name));
            let id: String = row.try_get(0).map_err(bad)?;
            let role: String = row.try_get(1).map_err(bad)?;
            let (first, last): (i32, i32) =
                (row.try_get(2).map_err(bad)?, row.try_get(3).map_err(bad)?);
            let phase: String = row.try_get(6).map_err(bad)?;
            let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last)) else {
                continue;
            };
            let record = match out.iter_mut().find(|r| r.id == id) {
                Some(r) => r,
                None => {
                    out.push(MoveRecord {
                        id,
                        range: SlotRange::new(first, last),
                        source: row.try_get(4).map_err(bad)?,
                        target: row.try_get(5).map_err(bad)?,
                        phases: (None, None),
                    });
                    let last = out.len() - 1;
                    &mut out[last]
                }
            };
            if role == "source" {
                record.phases.0 = Some(phase);
            } else {
                record.phases.1 = Some(phase);
            }
        }
    }
    Ok(out)
}

/// The move recorded as `id`.
pub(crate) async fn find(cluster: &ShardedCluster, id: &str) -> Result<MoveRecord, ShardError> {
    all(cluster)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| ShardError::UnknownMove(id.chars().take(64).collect()))
}

impl MoveRecord {
    /// Nothing more to do for it: every side that recorded it says `done`
    /// or `rolled_back`.
    pub(crate) fn finished(&self) -> bool {
        let finished = |p: &Option<String>| p.as_deref().is_none_or(|p| FINISHED.contains(&p));
        finished(&self.phases.0) && finished(&self.phases.1)
    }

    /// Rolled back on every side that recorded it.
    pub(crate) fn rolled_back(&self) -> bool {
        let back = |p: &Option<String>| p.as_deref().is_none_or(|p| p == "rolled_back");
        back(&self.phases.0) && back(&self.phases.1)
    }

    /// Its phases as recorded, for messages (`source/target`).
    pub(crate) fn phase_text(&self) -> String {
        format!(
            "{}/{}",
            self.phases.0.as_deref().unwrap_or("-"),
            self.phases.1.as_deref().unwrap_or("-")
        )
    }
}

/// An unfinished move (other than `except`) from or to shard `shard`:
/// moves streaming from one source would share its stream's markers (one
/// move at a time per source, or per target, keeps each cutover's
/// marker its own).
pub(crate) async fn unfinished_on(
    cluster: &ShardedCluster,
    shard: &str,
    except: Option<&str>,
) -> Result<Option<String>, ShardError> {
    Ok(all(cluster).await?.into_iter().find_map(|r| {
        let on = r.source == shard || r.target == shard;
        (on && !r.finished() && Some(r.id.as_str()) != except).then_some(r.id)
    }))
}

/// An unfinished move (other than `except`) whose range overlaps `range`.
pub(crate) async fn unfinished_overlapping(
    cluster: &ShardedCluster,
    range: SlotRange,
    except: Option<&str>,
) -> Result<Option<String>, ShardError> {
    Ok(all(cluster).await?.into_iter().find_map(|r| {
        let overlaps = r.range.first <= range.last && range.first <= r.range.last;
        (overlaps && !r.finished() && Some(r.id.as_str()) != except).then_some(r.id)
    }))
}
