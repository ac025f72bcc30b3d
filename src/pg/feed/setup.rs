//! What the feed sets up on the primary, on its own replication session:
//! the checks, the publication (only tables whose updates and deletes
//! cannot start failing because of it) and the slot.

use std::time::Duration;

use pgwire_replication::ReplicationClient;

use super::{FeedError, Tables};

/// A query on the gated replication session, with a deadline.
pub(super) async fn query(
    client: &mut ReplicationClient,
    sql: &str,
    within: Duration,
) -> Result<Vec<Vec<Option<String>>>, FeedError> {
    let rows = tokio::time::timeout(within, client.simple_query(sql))
        .await
        .map_err(|_| FeedError::Timeout(within))?
        .map_err(|e| FeedError::Server(e.to_string()))?;
    Ok(rows
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                .collect()
        })
        .collect())
}

/// The first column of the first row.
pub(super) async fn scalar(
    client: &mut ReplicationClient,
    sql: &str,
    within: Duration,
) -> Result<Option<String>, FeedError> {
    Ok(query(client, sql, within)
        .await?
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten()))
}

/// A string literal that means the same whatever
/// `standard_conforming_strings` is.
pub(super) fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A quoted identifier.
pub(super) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The advisory lock key of the feed lease for `slot` (FNV-1a: stable
/// across releases and platforms, as every instance must agree on it).
pub(super) fn lease_key(slot: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"tower-scale-feed:".iter().chain(slot.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Refuses a server that cannot run the feed, with the setting to change.
pub(super) async fn check_server(
    client: &mut ReplicationClient,
    within: Duration,
) -> Result<(), FeedError> {
    let level = scalar(client, "SHOW wal_level", within).await?;
    match level.as_deref() {
        Some("logical") => Ok(()),
        other => Err(FeedError::WalLevel(other.unwrap_or("unknown").to_owned())),
    }
}

/// A table the publication lists, or one left out and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    pub(super) oid: u32,
    pub(super) schema: String,
    pub(super) name: String,
    /// A partitioned table (published through its root, partitions
    /// included) rather than an ordinary one.
    pub(super) partitioned: bool,
    /// `None`: published; `Some(reason)`: left out.
    pub(super) left_out: Option<String>,
}

/// Whether the table aliased `$r` has a usable replica identity.
macro_rules! identity {
    ($r:literal) => {
        concat!(
            "(", $r, ".relreplident = 'f' OR (", $r, ".relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = ",
            $r, ".oid AND i.indisprimary AND i.indimmediate AND i.indisvalid)) OR (", $r, ".relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = ",
            $r, ".oid AND i.indisreplident AND i.indimmediate AND i.indisvalid)))"
        )
    };
}

/// What each table is, and whether every one of its leaf tables can take
/// an UPDATE and a DELETE while published (a replica identity: a primary
/// key, a chosen index, or FULL).
const TABLE_FACTS: &str = concat!(
    "SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relpersistence::text, ",
    "CASE WHEN c.relkind = 'p' THEN (SELECT bool_and(",
    identity!("l"),
    ") FROM pg_catalog.pg_partition_tree(c.oid) t JOIN pg_catalog.pg_class l ON l.oid = t.relid WHERE t.isleaf) ",
    "ELSE ",
    identity!("c"),
    " END FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
);

fn candidate(row: &[Option<String>]) -> Option<Candidate> {
    let text = |i: usize| row.get(i).cloned().flatten();
    let oid = text(0)?.parse().ok()?;
    let (schema, name) = (text(1)?, text(2)?);
    let kind = text(3).unwrap_or_default();
    let persistence = text(4).unwrap_or_default();
    let identity = text(5).as_deref() == Some("t");
    let left_out = if kind != "r" && kind != "p" {
        Some(format!("not a table (relkind {kind})"))
    } else if persistence != "p" {
        Some("unlogged or temporary: not in the WAL".to_owned())
    } else if !identity {
        Some(
            "no replica identity (no primary key): UPDATE and DELETE would fail while published; \
             set one (ALTER TABLE ... REPLICA IDENTITY) to have it in the feed"
                .to_owned(),
        )
    } else {
        None
    };
    Some(Candidate {
        oid,
        schema,
        name,
        partitioned: kind == "p",
        left_out,
    })
}

/// The tables to publish: the named ones, or every ordinary or
/// partitioned table outside the system schemas (partitions are covered by
/// their root).
pub(super) async fn candidates(
    client: &mut ReplicationClient,
    tables: &Tables,
    within: Duration,
) -> Result<Vec<Candidate>, FeedError> {
    let mut out = Vec::new();
    match tables {
        Tables::All => {
            let sql = format!(
                "{TABLE_FACTS} WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 2, 3"
            );
            for row in query(client, &sql, within).await? {
                out.extend(candidate(&row));
            }
        }
        Tables::Named(names) => {
            for name in names {
                let sql = format!(
                    "{TABLE_FACTS} WHERE c.oid = pg_catalog.to_regclass({})",
                    literal(name)
                );
                let found = query(client, &sql, within).await?;
                match found.first().and_then(|row| candidate(row)) {
                    Some(c) => out.push(c),
                    None => return Err(FeedError::UnknownTable(name.clone())),
                }
            }
        }
    }
    Ok(out)
}

/// Creates the publication or makes it list exactly `published` (by
/// `oid`), with `publish_via_partition_root`. Does nothing when it already
/// does (so a role that does not own it can still use it).
pub(super) async fn ensure_publication(
    client: &mut ReplicationClient,
    publication: &str,
    published: &[&Candidate],
    within: Duration,
) -> Result<(), FeedError> {
    let name = literal(publication);
    let list: Vec<String> = published
        .iter()
        // ONLY: inheritance children (which may have no key) stay out.
        .map(|c| {
            let only = if c.partitioned { "" } else { "ONLY " };
            format!("{only}{}.{}", ident(&c.schema), ident(&c.name))
        })
        .collect();
    let exists = query(
        client,
        &format!(
            "SELECT p.puballtables, p.pubviaroot, \
             (SELECT string_agg(r.prrelid::oid::text, ',' ORDER BY r.prrelid) FROM pg_catalog.pg_publication_rel r WHERE r.prpubid = p.oid) \
             FROM pg_catalog.pg_publication p WHERE p.pubname = {name}"
        ),
        within,
    )
    .await?;
    let Some(row) = exists.first() else {
        let tables = if list.is_empty() {
            String::new()
        } else {
            format!(" FOR TABLE {}", list.join(", "))
        };
        let created = query(
            client,
            &format!(
                "CREATE PUBLICATION {}{tables} WITH (publish_via_partition_root = true)",
                ident(publication)
            ),
            within,
        )
        .await;
        return match created {
            // Another instance made it at the same moment: its table list
            // is reconciled at the next connect.
            Err(FeedError::Server(e)) if e.contains("already exists") => Ok(()),
            other => other.map(|_| ()),
        };
    };
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if text(0) == "t" {
        // FOR ALL TABLES (made by someone else): used as it is.
        return Ok(());
    }
    if text(1) != "t" {
        query(
            client,
            &format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                ident(publication)
            ),
            within,
        )
        .await?;
    }
    let mut want: Vec<u32> = published.iter().map(|c| c.oid).collect();
    want.sort_unstable();
    let have: Vec<u32> = text(2).split(',').filter_map(|s| s.parse().ok()).collect();
    if want == have {
        return Ok(());
    }
    let sql = if list.is_empty() {
        // SET TABLE needs at least one table: drop what is there.
        let rows = query(
            client,
            &format!(
                "SELECT n.nspname, c.relname FROM pg_catalog.pg_publication_rel r \
                 JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid \
                 JOIN pg_catalog.pg_class c ON c.oid = r.prrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = {name}"
            ),
            within,
        )
        .await?;
        let drop: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                Some(format!(
                    "{}.{}",
                    ident(r.first()?.as_deref()?),
                    ident(r.get(1)?.as_deref()?)
                ))
            })
            .collect();
        if drop.is_empty() {
            return Ok(());
        }
        format!(
            "ALTER PUBLICATION {} DROP TABLE {}",
            ident(publication),
            drop.join(", ")
        )
    } else {
        format!(
            "ALTER PUBLICATION {} SET TABLE {}",
            ident(publication),
            list.join(", ")
        )
    };
    query(client, &sql, within).await?;
    Ok(())
}

/// The permanent slot's state on this server.
pub(super) enum SlotState {
    /// Not there (never made, dropped, or this is a newly promoted primary).
    Missing,
    /// There, but its WAL was removed (`max_slot_wal_keep_size`): it cannot
    /// resume.
    Lost,
    /// There and usable.
    Usable,
}

pub(super) async fn slot_state(
    client: &mut ReplicationClient,
    slot: &str,
    within: Duration,
) -> Result<SlotState, FeedError> {
    let rows = query(
        client,
        &format!(
            "SELECT plugin, coalesce(wal_status, ''), database = current_database() \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            literal(slot)
        ),
        within,
    )
    .await?;
    let Some(row) = rows.first() else {
        return Ok(SlotState::Missing);
    };
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if text(0) != "pgoutput" || text(2) != "t" {
        return Err(FeedError::SlotTaken(slot.to_owned()));
    }
    Ok(if text(1) == "lost" {
        SlotState::Lost
    } else {
        SlotState::Usable
    })
}

/// Creates the slot; returns its consistent point (every transaction that
/// commits after it is streamed).
pub(super) async fn create_slot(
    client: &mut ReplicationClient,
    slot: &str,
    temporary: bool,
    within: Duration,
) -> Result<u64, FeedError> {
    let sql = format!(
        "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
        ident(slot),
        if temporary { " TEMPORARY" } else { "" }
    );
    let rows = query(client, &sql, within).await?;
    let point = rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|t| t.parse::<crate::pg::lsn::Lsn>().ok())
        .ok_or_else(|| FeedError::Server("CREATE_REPLICATION_SLOT: no consistent point".into()))?;
    Ok(point.0)
}

/// The publication's comment while a new slot's flush is not yet in the
/// WAL (set before the slot is made, cleared once the flush message is
/// written): a holder that finds it flushes, so a process that died in
/// between leaves no silent gap.
fn pending_marker(slot: &str) -> String {
    format!("tower-scale-feed: flush pending for slot {slot}")
}

/// Sets or clears the marker; false when the role may not comment on the
/// publication (it does not own it): the feed goes on without it.
pub(super) async fn mark_pending(
    client: &mut ReplicationClient,
    publication: &str,
    slot: &str,
    pending: bool,
    within: Duration,
) -> Result<bool, FeedError> {
    let value = if pending {
        literal(&pending_marker(slot))
    } else {
        "NULL".to_owned()
    };
    match query(
        client,
        &format!("COMMENT ON PUBLICATION {} IS {value}", ident(publication)),
        within,
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(FeedError::Server(e)) if e.contains("must be owner") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the marker is set for `slot`.
pub(super) async fn is_pending(
    client: &mut ReplicationClient,
    publication: &str,
    slot: &str,
    within: Duration,
) -> Result<bool, FeedError> {
    let comment = scalar(
        client,
        &format!(
            "SELECT pg_catalog.obj_description(oid, 'pg_publication') FROM pg_catalog.pg_publication WHERE pubname = {}",
            literal(publication)
        ),
        within,
    )
    .await?;
    Ok(comment.as_deref() == Some(pending_marker(slot).as_str()))
}

pub(super) async fn drop_slot(
    client: &mut ReplicationClient,
    slot: &str,
    within: Duration,
) -> Result<(), FeedError> {
    query(
        client,
        &format!(
            "SELECT pg_catalog.pg_drop_replication_slot({})",
            literal(slot)
        ),
        within,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_the_lease_key() {
        assert_eq!(literal("a'b\\c"), "E'a''b\\\\c'");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        // Pinned: instances of different releases must agree.
        assert_eq!(lease_key("tower_scale_feed"), -4_632_824_522_759_883_617);
        assert_ne!(lease_key("a"), lease_key("b"));
    }
}
