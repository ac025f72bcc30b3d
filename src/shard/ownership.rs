//! The ownership tables on each shard's primary, and moving slots.
//!
//! ```sql
//! CREATE TABLE tower_scale_shard_map   (one bool PRIMARY KEY CHECK (one),
//!                                       shard text NOT NULL, slot_count int4 NOT NULL,
//!                                       version int8 NOT NULL DEFAULT 0,
//!                                       lease_ms int8 NOT NULL DEFAULT 0);
//! CREATE TABLE tower_scale_shard_slots (slot int4 PRIMARY KEY CHECK (slot >= 0),
//!                                       version int8 NOT NULL,
//!                                       fenced bool NOT NULL DEFAULT false);
//! ```
//!
//! `tower_scale_shard_map` names the shard the database is (so an instance
//! configured with two names swapped refuses to start), the slot count,
//! and the highest map version a move committed there (it never goes
//! down, also when the slots that carried it move away);
//! `tower_scale_shard_slots` lists the slots it owns with the map version
//! that gave each to it. The map's version is the highest of those on any
//! shard. Moves are serialised by an advisory lock on the shard whose name
//! sorts first, held until the move committed, so versions follow the
//! order moves commit in. `lease_ms` is the longest read lease an
//! instance may hold on the shard, and so how long a move holds the
//! range unclaimed after its source let go (`super::lease`): recorded by
//! the first instance to start on a new database (0, no leases, on one
//! set up by an earlier release).
//!
//! A slot is held by the shard whose row for it has the highest version.
//! A move's cutover commits in three steps: the source **fences** its
//! rows (`fenced`: it still holds the slots and refuses their writes and
//! reads fenced in the read; reads under a lease from before the fence
//! may still read them, until the hold runs out), the target takes them at a higher version (from then on the
//! source's fenced rows are leftovers: a lower version), and the source
//! forgets its fenced rows. So the tables show exactly one holder of every
//! slot at every moment, also when the process dies between two steps.

use std::sync::Arc;
use std::time::Duration;

use crate::pg::{Consistency, Db, Lsn, Transaction};

use super::error::ShardError;
use super::map::SlotRange;

/// Serialises the setup of concurrent instances (`pg_advisory_xact_lock`).
const SETUP_LOCK: i64 = 0x7473_7368_6172_6401; // "tsshard\x01"

const CREATE: &str = "CREATE TABLE IF NOT EXISTS tower_scale_shard_map (\
       one bool PRIMARY KEY DEFAULT true CHECK (one), \
       shard text NOT NULL, slot_count int4 NOT NULL, version int8 NOT NULL DEFAULT 0); \
     CREATE TABLE IF NOT EXISTS tower_scale_shard_slots (\
       slot int4 PRIMARY KEY CHECK (slot >= 0), version int8 NOT NULL, \
       fenced bool NOT NULL DEFAULT false)";

/// Columns added to tables created by an earlier release: (table,
/// column, definition). Each only if it is missing (`ALTER TABLE` would
/// wait for every write holding a fence). `fenced` defaults to false;
/// `lease_ms` to 0, no read leases: instances of that release may still
/// run moves, which do not wait for leases. Set it (on every shard) once
/// every instance, movers included, runs this release, then restart
/// them.
const ADDED_COLUMNS: [(&str, &str, &str); 2] = [
    (
        "tower_scale_shard_slots",
        "fenced",
        "bool NOT NULL DEFAULT false",
    ),
    (
        "tower_scale_shard_map",
        "lease_ms",
        "int8 NOT NULL DEFAULT 0",
    ),
];

/// The statement adding `column` to `table` if it is missing.
fn add_missing_column(table: &str, column: &str, definition: &str) -> String {
    format!(
        "DO $$ BEGIN \
           IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute \
             WHERE attrelid = '{table}'::regclass AND attname = '{column}' \
             AND NOT attisdropped) THEN \
             ALTER TABLE {table} ADD COLUMN {column} {definition}; \
           END IF; END $$"
    )
}

/// Serialises moves (`pg_advisory_xact_lock` on the first shard by name).
const MOVE_LOCK: i64 = 0x7473_7368_6172_6402; // "tsshard\x02"

/// The write fence: the slot's row, locked against a change of ownership
/// until the write's transaction ends (no row: not owned here, or fenced;
/// a write waiting behind a cutover reads the fenced row and gets none).
pub(crate) const FENCE_SQL: &str =
    "SELECT version FROM tower_scale_shard_slots WHERE slot = $1 AND NOT fenced FOR SHARE";

/// Creates the tables if needed and checks (or records) which shard this
/// database is and the slot count; records `lease` as the shard's longest
/// read lease if it has none yet, and returns the one recorded.
pub(crate) async fn setup(
    db: &Db,
    name: &Arc<str>,
    slots: u16,
    lease: Duration,
) -> Result<Duration, ShardError> {
    let err = |e| ShardError::db(name, e);
    let tx = db.transaction().await.map_err(err)?;
    // Whatever the database's default: under REPEATABLE READ the snapshot
    // would predate the lock, and a second instance starting at once
    // would not see the first's column or map row (42701, 40001).
    tx.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", &[])
        .await
        .map_err(err)?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&SETUP_LOCK],
    )
    .await
    .map_err(err)?;
    for statement in CREATE.split("; ") {
        tx.execute(statement, &[]).await.map_err(err)?;
    }
    for (table, column, definition) in ADDED_COLUMNS {
        tx.execute(&add_missing_column(table, column, definition), &[])
            .await
            .map_err(err)?;
    }
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO tower_scale_shard_map (shard, slot_count, lease_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (one) DO NOTHING",
        &[&&**name, &i32::from(slots), &lease_ms],
    )
    .await
    .map_err(err)?;
    let row = tx
        .query_one(
            "SELECT shard, slot_count, lease_ms FROM tower_scale_shard_map",
            &[],
        )
        .await
        .map_err(err)?;
    let bad = |e| ShardError::Setup(format!("shard {name:?}'s map row: {e}"));
    let (recorded, count, lease_ms): (String, i32, i64) = (
        row.try_get(0).map_err(bad)?,
        row.try_get(1).map_err(bad)?,
        row.try_get(2).map_err(bad)?,
    );
    tx.commit().await.map_err(err)?;
    if recorded != **name {
        return Err(ShardError::Setup(format!(
            "the database configured as shard {name:?} records itself as {recorded:?}: \
             check the shards' addresses"
        )));
    }
    if count != i32::from(slots) {
        return Err(ShardError::Setup(format!(
            "shard {name:?} was set up with {count} slots, this instance uses {slots}: \
             the slot count is fixed for the life of the data"
        )));
    }
    Ok(lease_of(lease_ms))
}

/// The longest lease a shard may record: a move waits it out while it
/// holds the move lock.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(60);

/// A recorded `lease_ms` as a lease: a negative value (set by hand) is
/// none, one past [`MAX_LEASE`] is that.
pub(crate) fn lease_of(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(MAX_LEASE)
}

/// A slot a shard's table lists: slot, version, fenced.
pub(crate) type Listed = (u16, u64, bool);

/// What a shard's primary lists: its slots, its map version, and its WAL
/// insert position when it read them.
pub(crate) struct Owned {
    pub(crate) slots: Vec<Listed>,
    pub(crate) version: u64,
    /// A replica that has replayed this has every change of ownership
    /// (and every row committed before it) that the read saw.
    pub(crate) position: Lsn,
    /// The longest read lease the shard records.
    pub(crate) lease: Duration,
}

/// The slots the shard lists, with their versions and whether fenced,
/// the shard's map version, and its WAL commit position (from its
/// primary, in one statement: the insert position, read after the
/// snapshot, is at or past every commit the snapshot shows).
pub(crate) async fn owned(db: &Db, name: &Arc<str>) -> Result<Owned, ShardError> {
    let rows = db
        .read_query(
            Consistency::Strong,
            "SELECT slot, version, fenced FROM tower_scale_shard_slots \
             UNION ALL SELECT -1, version, false FROM tower_scale_shard_map \
             UNION ALL SELECT -2, (pg_catalog.pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8, false \
             UNION ALL SELECT -3, (pg_catalog.pg_current_wal_lsn() - '0/0'::pg_lsn)::int8, false \
             UNION ALL SELECT -4, lease_ms, false FROM tower_scale_shard_map \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| ShardError::db(name, e))?;
    let mut out = Vec::with_capacity(rows.value.len());
    let (mut map_version, mut insert, mut written) = (0, Lsn(0), Lsn(0));
    let mut lease = Duration::ZERO;
    for row in rows.value {
        let bad = |e| ShardError::Setup(format!("shard {name:?}'s ownership tables: {e}"));
        let (slot, version, fenced): (i32, i64, bool) = (
            row.try_get(0).map_err(bad)?,
            row.try_get(1).map_err(bad)?,
            row.try_get(2).map_err(bad)?,
        );
        // The map row's and the positions' rows, marked by their slot.
        let value = || u64::try_from(version).unwrap_or(0);
        match slot {
            -1 => map_version = value(),
            -2 => insert = Lsn(value()),
            -3 => written = Lsn(value()),
            -4 => lease = lease_of(version),
            _ => {}
        }
        if slot < 0 {
            continue;
        }
        let (Ok(slot), Ok(version)) = (u16::try_from(slot), u64::try_from(version)) else {
            return Err(ShardError::Setup(format!(
                "shard {name:?} lists slot {slot} at version {version}, which is out of range"
            )));
        };
        out.push((slot, version, fenced));
    }
    Ok(Owned {
        slots: out,
        version: map_version,
        // Past the next page's header when the last record ended at a
        // page boundary, where no replica's replay stops: moved back.
        position: db.commit_position(insert, written),
        lease,
    })
}

/// Takes the move lock in `tx` (on the first shard by name), within the
/// write timeout.
pub(crate) async fn lock_moves(tx: &Transaction, name: &Arc<str>) -> Result<(), ShardError> {
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&MOVE_LOCK])
        .await
        .map_err(|e| ShardError::db(name, e))?;
    Ok(())
}

/// Raises the shard's map version to `version` (within a move).
pub(crate) async fn bump(
    tx: &Transaction,
    name: &Arc<str>,
    version: u64,
) -> Result<(), ShardError> {
    tx.execute(
        "UPDATE tower_scale_shard_map SET version = greatest(version, $1)",
        &[&(version as i64)],
    )
    .await
    .map_err(|e| ShardError::db(name, e))?;
    // Delivered at the commit, if it happens (see `watch`).
    tx.execute(super::watch::ANNOUNCE, &[&(version as i64)])
        .await
        .map_err(|e| ShardError::db(name, e))?;
    Ok(())
}

/// Gives `range` to the shard at `version` if nobody has it (bootstrap).
pub(crate) async fn claim(
    db: &Db,
    name: &Arc<str>,
    range: SlotRange,
    version: u64,
) -> Result<(), ShardError> {
    db.execute(
        "INSERT INTO tower_scale_shard_slots (slot, version) \
         SELECT s, $3 FROM pg_catalog.generate_series($1::int4, $2::int4) s \
         ON CONFLICT (slot) DO NOTHING",
        &[
            &i32::from(range.first),
            &i32::from(range.last),
            &(version as i64),
        ],
    )
    .await
    .map_err(|e| ShardError::db(name, e))?;
    Ok(())
}

/// Locks `range` on the source (every row, `FOR UPDATE`: in-flight writes
/// finish first, later ones wait), returning how many rows it holds.
pub(crate) async fn lock_source(
    tx: &Transaction,
    name: &Arc<str>,
    range: SlotRange,
) -> Result<usize, ShardError> {
    let rows = tx
        .query(
            "SELECT slot FROM tower_scale_shard_slots WHERE slot BETWEEN $1 AND $2 \
             ORDER BY slot FOR UPDATE",
            &[&i32::from(range.first), &i32::from(range.last)],
        )
        .await
        .map_err(|e| ShardError::db(name, e))?;
    Ok(rows.len())
}

/// Fences `range` on the source (within the move's transaction): it
/// still holds the slots, and refuses their writes and the reads fenced
/// in the read.
pub(crate) async fn fence(
    tx: &Transaction,
    name: &Arc<str>,
    range: SlotRange,
) -> Result<(), ShardError> {
    tx.execute(
        "UPDATE tower_scale_shard_slots SET fenced = true WHERE slot BETWEEN $1 AND $2",
        &[&i32::from(range.first), &i32::from(range.last)],
    )
    .await
    .map_err(|e| ShardError::db(name, e))?;
    Ok(())
}

/// Lifts the fence of `range` on its holder (a move rolled back after its
/// source's side committed), regranting the slots at map version
/// `version`, under the move lock; how many slots it held fenced. The new
/// version is above any claim of the move: one whose commit was still
/// pending and lands later is a leftover, and the holder stays the holder.
pub(crate) async fn unfence(
    tx: &Transaction,
    name: &Arc<str>,
    range: SlotRange,
    version: u64,
) -> Result<u64, ShardError> {
    let lifted = tx
        .execute(
            "UPDATE tower_scale_shard_slots SET fenced = false, version = $3 \
             WHERE slot BETWEEN $1 AND $2 AND fenced",
            &[
                &i32::from(range.first),
                &i32::from(range.last),
                &i64::try_from(version).unwrap_or(i64::MAX),
            ],
        )
        .await
        .map_err(|e| ShardError::db(name, e))?;
    bump(tx, name, version).await?;
    Ok(lifted)
}

/// Deletes the fenced rows of `range` below version `below` on a shard
/// that gave the range away (another shard holds it at `below` or
/// higher: they are leftovers): the cutover's last step, and the
/// cleanup's first. A row fenced again since, by a later move of a range
/// given back, has a version of at least `below` and stays.
pub(crate) async fn forget(
    db: &Db,
    name: &Arc<str>,
    range: SlotRange,
    below: u64,
) -> Result<u64, ShardError> {
    db.execute(
        "DELETE FROM tower_scale_shard_slots WHERE slot BETWEEN $1 AND $2 AND fenced \
         AND version < $3",
        &[
            &i32::from(range.first),
            &i32::from(range.last),
            &i64::try_from(below).unwrap_or(i64::MAX),
        ],
    )
    .await
    .map(|w| w.value)
    .map_err(|e| ShardError::db(name, e))
}

/// Takes `range` on the target at `version` (within the move's transaction).
pub(crate) async fn take(
    tx: &Transaction,
    name: &Arc<str>,
    range: SlotRange,
    version: u64,
) -> Result<(), ShardError> {
    tx.execute(
        "INSERT INTO tower_scale_shard_slots (slot, version) \
         SELECT s, $3 FROM pg_catalog.generate_series($1::int4, $2::int4) s \
         ON CONFLICT (slot) DO UPDATE SET version = EXCLUDED.version, fenced = false",
        &[
            &i32::from(range.first),
            &i32::from(range.last),
            &(version as i64),
        ],
    )
    .await
    .map_err(|e| ShardError::db(name, e))?;
    Ok(())
}

/// The fenced form of a read: the statement as a lateral subquery of the
/// slot's ownership row (`$slot_param`, at a version of at least
/// `$slot_param + 1`), so both are read in one snapshot. No row: the
/// shard does not own the slot (or shows an older grant of it than the
/// reader's map). Otherwise the statement's rows with one
/// more column, `tower_scale_owned` (true), at the end; a statement with
/// no rows gives one row where it is NULL.
pub(crate) fn fenced_read_sql(sql: &str, slot_param: usize) -> String {
    let sql = crate::pg::query_body(sql);
    // Short aliases: the text is hashed on every read (the pool's
    // statement cache). They are the outer query's; the statement's own
    // names shadow them inside it.
    // `$slot_param + 1`: the least version of the slot's row that counts.
    let min_param = slot_param + 1;
    format!(
        "SELECT _tsq.* FROM (SELECT FROM tower_scale_shard_slots WHERE slot=${slot_param} \
         AND version>=${min_param} AND NOT fenced) _tso LEFT JOIN LATERAL (SELECT _tsu.*,true tower_scale_owned \
         FROM (\n{sql}\n) _tsu) _tsq ON true"
    )
}

/// The plain form of a read (under a lease): the statement's rows with
/// `tower_scale_owned` (true) last, as the fenced form gives them; no
/// second relation (the planner flattens the subquery).
pub(crate) fn plain_read_sql(sql: &str) -> String {
    let sql = crate::pg::query_body(sql);
    format!("SELECT _tsu.*,true tower_scale_owned FROM (\n{sql}\n) _tsu")
}

/// The highest `$n` placeholder `sql` uses, outside strings, quoted
/// identifiers, comments and dollar-quoted bodies (0 if none).
pub(crate) fn highest_placeholder(sql: &str) -> usize {
    let b = sql.as_bytes();
    let (mut i, mut highest) = (0, 0usize);
    let skip_to = |from: usize, end: &[u8]| -> usize {
        b[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map_or(b.len(), |p| from + p + end.len())
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    while i < b.len() {
        match b[i] {
            // An escape string (`E'...'`): a backslash escapes the quote.
            b'\'' if i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !ident(b[i - 2])) => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'\'' => i = skip_to(i + 1, b"'"),
            // Inside an identifier (`a$1`, `x$y$`): neither a parameter
            // nor a dollar quote.
            b'$' if i > 0 && ident(b[i - 1]) => {
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
            }
            b'"' => i = skip_to(i + 1, b"\""),
            b'-' if b.get(i + 1) == Some(&b'-') => i = skip_to(i + 2, b"\n"),
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_to(i + 2, b"*/"),
            b'$' => {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits > 0 {
                    let n = sql[i + 1..i + 1 + digits]
                        .parse::<usize>()
                        .unwrap_or(usize::MAX);
                    highest = highest.max(n);
                    i += 1 + digits;
                } else {
                    // A dollar quote: `$tag$ ... $tag$`.
                    let tag_len = b[i + 1..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                        .count();
                    if b.get(i + 1 + tag_len) == Some(&b'$') {
                        let tag = &b[i..i + 2 + tag_len];
                        i = skip_to(i + 2 + tag_len, tag);
                    } else {
                        i += 1;
                    }
                }
            }
            _ => i += 1,
        }
    }
    highest
}

#[cfg(test)]
mod placeholder_tests {
    use super::highest_placeholder;

    #[test]
    fn placeholders_outside_strings_comments_and_dollar_quotes() {
        assert_eq!(highest_placeholder("SELECT 1"), 0);
        assert_eq!(
            highest_placeholder("SELECT * FROM t WHERE a = $1 AND b = $12"),
            12
        );
        assert_eq!(
            highest_placeholder("SELECT '$9', \"$8\" FROM t WHERE a = $2"),
            2
        );
        assert_eq!(highest_placeholder("SELECT 1 -- $7\n, $3 /* $9 */"), 3);
        assert_eq!(highest_placeholder("SELECT $q$ $5 $q$, $$ $6 $$, $1"), 1);
        assert_eq!(highest_placeholder("SELECT 'it''s $4', $2"), 2);
        assert_eq!(highest_placeholder("SELECT '$1"), 0);
        // An escape string's escaped quote does not end it.
        assert_eq!(highest_placeholder("SELECT E'\\'' || name, $2"), 2);
        assert_eq!(highest_placeholder("SELECT e'\\' $7', $1"), 1);
        assert_eq!(highest_placeholder("SELECT some'x', $3"), 3);
        // `$` inside identifiers: no parameter, no dollar quote.
        assert_eq!(
            highest_placeholder("SELECT a$1, x$y$ FROM t WHERE b = $2"),
            2
        );
    }
}
