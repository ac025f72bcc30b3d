//! Declared sharded tables: which column of each table is its shard key,
//! read from the catalogs of every shard at build, so a move knows which
//! rows belong to a slot.
//!
//! [`ShardedClusterBuilder::table`] declares a table and its shard-key
//! column. At [`build`](ShardedClusterBuilder::build) every shard's primary
//! must have the table, the column of a key type the slot function is
//! defined for (`int8`, `int4`, `int2`, `text`, `varchar`, `bytea`), a
//! primary key (a move writes the target idempotently, `ON CONFLICT` on
//! it, and pages through the source by it), a replica identity of
//! `DEFAULT` (the primary key) or `FULL` (the change stream must name the
//! row an UPDATE or DELETE touched by its primary key) and the
//! same columns on every shard. A declared table that fails any of these
//! is refused at build time with the reason: it is never skipped.
//!
//! What a move does not know it cannot move: a move refuses to start
//! while the source shard has an ordinary table with rows that is neither
//! declared with [`table`](ShardedClusterBuilder::table) nor named with
//! [`local_table`](ShardedClusterBuilder::local_table) (a table whose rows
//! stay where they are: per-shard bookkeeping, reference data).

use std::sync::Arc;

use crate::pg::{Consistency, Db};

use super::cluster::ShardedClusterBuilder;
use super::error::ShardError;
use super::slot::slot_of;

/// The type of a declared table's shard-key column, and so which byte form
/// of [`ShardKey`](super::ShardKey) its values hash as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    /// `int2`, `int4` or `int8`: the value widened to `i64`.
    Integer,
    /// `text` or `varchar`: the UTF-8 bytes.
    Text,
    /// `bytea`: the bytes.
    Bytes,
}

impl KeyType {
    fn from_type_name(name: &str) -> Option<Self> {
        match name {
            "bigint" | "integer" | "smallint" => Some(Self::Integer),
            "text" => Some(Self::Text),
            n if n.starts_with("character varying") => Some(Self::Text),
            "bytea" => Some(Self::Bytes),
            _ => None,
        }
    }

    #[cfg_attr(not(feature = "reshard"), allow(dead_code))]
    /// The slot of a key given in PostgreSQL's text output form (`None`:
    /// the text is not a value of this type).
    pub(crate) fn slot_of_text(self, text: &str, slots: u16) -> Option<u16> {
        match self {
            Self::Integer => text.parse::<i64>().ok().map(|k| slot_of(&k, slots)),
            Self::Text => Some(slot_of(text, slots)),
            Self::Bytes => {
                let hex = text.strip_prefix("\\x")?;
                if hex.len() % 2 != 0 {
                    return None;
                }
                let mut bytes = Vec::with_capacity(hex.len() / 2);
                for pair in hex.as_bytes().chunks(2) {
                    let s = std::str::from_utf8(pair).ok()?;
                    bytes.push(u8::from_str_radix(s, 16).ok()?);
                }
                Some(slot_of(&bytes[..], slots))
            }
        }
    }
}

/// A column of a declared table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableColumn {
    pub(crate) name: String,
    /// `format_type(atttypid, atttypmod)`: what a text value is cast to.
    pub(crate) type_name: String,
}

/// A declared table as the catalogs describe it (the same on every shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableSpec {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Every stored column (generated ones left out), in attribute order.
    pub(crate) columns: Vec<TableColumn>,
    /// Indexes into `columns` of the primary key, in key order.
    pub(crate) primary_key: Vec<usize>,
    /// Index into `columns` of the shard key.
    pub(crate) key: usize,
    pub(crate) key_type: KeyType,
}

#[cfg_attr(not(feature = "reshard"), allow(dead_code))]
impl TableSpec {
    /// `"schema"."name"`.
    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    /// The slot of a row given as text values in `columns` order.
    pub(crate) fn slot_of_row(&self, row: &[Option<String>], slots: u16) -> Option<u16> {
        let key = row.get(self.key)?.as_deref()?;
        self.key_type.slot_of_text(key, slots)
    }
}

/// A quoted identifier.
#[cfg_attr(not(feature = "reshard"), allow(dead_code))]
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The table declarations a builder collected.
#[derive(Debug, Clone, Default)]
pub(crate) struct Declared {
    pub(crate) sharded: Vec<(String, String)>,
    pub(crate) local: Vec<String>,
}

impl ShardedClusterBuilder {
    /// Declares a sharded table and its shard-key column: the rows a
    /// move of a slot carries are the rows whose `key_column` hashes to
    /// it. Checked on every shard at build, which fails with the reason
    /// otherwise (a table is never skipped): the table must be an
    /// ordinary table with a primary key, replica identity `DEFAULT` or
    /// `FULL`, the same columns on every shard, and a key column of type
    /// `int8`, `int4`, `int2`, `text`, `varchar` or `bytea` (hashed as the
    /// [`ShardKey`](super::ShardKey) of that type: `i64`, text, bytes).
    /// `name` may be schema-qualified.
    pub fn table(mut self, name: impl Into<String>, key_column: impl Into<String>) -> Self {
        self.declared.sharded.push((name.into(), key_column.into()));
        self
    }

    /// Names a table whose rows stay on their shard (not moved): a move
    /// refuses to start while its source has an undeclared table with
    /// rows, so that nothing is left behind silently.
    pub fn local_table(mut self, name: impl Into<String>) -> Self {
        self.declared.local.push(name.into());
        self
    }
}

const TABLE_SQL: &str = "SELECT n.nspname::text, c.relname::text, c.relkind::text, \
     c.relreplident::text, EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid \
     AND i.indisprimary) FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid = pg_catalog.to_regclass($1)";

const COLUMNS_SQL: &str = "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
     (SELECT pg_catalog.array_position(i.indkey::int2[], a.attnum) FROM pg_catalog.pg_index i \
      WHERE i.indrelid = a.attrelid AND i.indisprimary), a.attnotnull \
     FROM pg_catalog.pg_attribute a WHERE a.attrelid = pg_catalog.to_regclass($1) \
     AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum";

/// Reads one declared table from one shard, refusing what a move could not
/// attribute.
async fn describe(
    db: &Db,
    shard: &Arc<str>,
    name: &str,
    key_column: &str,
) -> Result<TableSpec, ShardError> {
    let refuse =
        |why: String| ShardError::Setup(format!("declared table {name:?} on shard {shard}: {why}"));
    let err = |e| ShardError::db(shard, e);
    let found = db
        .read_query(Consistency::Strong, TABLE_SQL, &[&name])
        .await
        .map_err(err)?;
    let Some(row) = found.value.first() else {
        return Err(refuse("no such table".into()));
    };
    let text = |i: usize| row.try_get::<_, String>(i).unwrap_or_default();
    let (schema, relname, kind, identity) = (text(0), text(1), text(2), text(3));
    let has_pk = row.try_get::<_, bool>(4).unwrap_or(false);
    if kind != "r" {
        return Err(refuse(format!(
            "not an ordinary table (relkind {kind}): only ordinary tables can be moved"
        )));
    }
    if !has_pk {
        return Err(refuse(
            "no primary key: a move pages through the rows and writes them idempotently by it"
                .into(),
        ));
    }
    if identity == "n" || identity == "i" {
        return Err(refuse(
            "REPLICA IDENTITY NOTHING or USING INDEX: the change stream must name the rows \
             updated or deleted during a move by their primary key (DEFAULT) or in full (FULL)"
                .into(),
        ));
    }
    let rows = db
        .read_query(Consistency::Strong, COLUMNS_SQL, &[&name])
        .await
        .map_err(err)?;
    let mut columns = Vec::with_capacity(rows.value.len());
    let mut not_null = Vec::with_capacity(rows.value.len());
    let mut pk: Vec<(i32, usize)> = Vec::new();
    for (i, r) in rows.value.iter().enumerate() {
        let bad = |e: tokio_postgres::Error| refuse(format!("its catalog row: {e}"));
        let name: String = r.try_get(0).map_err(bad)?;
        let type_name: String = r.try_get(1).map_err(bad)?;
        if let Some(p) = r.try_get::<_, Option<i32>>(2).map_err(bad)? {
            pk.push((p, i));
        }
        not_null.push(r.try_get::<_, bool>(3).map_err(bad)?);
        columns.push(TableColumn { name, type_name });
    }
    pk.sort_unstable();
    let Some(key) = columns.iter().position(|c| c.name == key_column) else {
        return Err(refuse(format!("no column {key_column:?}")));
    };
    let Some(key_type) = KeyType::from_type_name(&columns[key].type_name) else {
        return Err(refuse(format!(
            "the shard key {key_column:?} is of type {}: the slot is defined for int8, int4, \
             int2, text, varchar and bytea",
            columns[key].type_name
        )));
    };
    if !not_null[key] {
        return Err(refuse(format!(
            "the shard key {key_column:?} may be NULL (a row with a NULL key belongs to no \
             slot, so no move would carry it): declare it NOT NULL"
        )));
    }
    if pk.is_empty() {
        return Err(refuse(
            "the primary key's columns are not stored columns".into(),
        ));
    }
    Ok(TableSpec {
        schema,
        name: relname,
        columns,
        primary_key: pk.into_iter().map(|(_, i)| i).collect(),
        key,
        key_type,
    })
}

/// Every declared table, described on every shard and the same on all.
pub(crate) async fn describe_all(
    shards: &[(Arc<str>, Db)],
    declared: &Declared,
) -> Result<Vec<TableSpec>, ShardError> {
    let mut out: Vec<TableSpec> = Vec::with_capacity(declared.sharded.len());
    for (name, key_column) in &declared.sharded {
        let mut first: Option<(Arc<str>, TableSpec)> = None;
        for (shard, db) in shards {
            let spec = describe(db, shard, name, key_column).await?;
            match &first {
                None => first = Some((Arc::clone(shard), spec)),
                Some((other, seen)) if *seen != spec => {
                    return Err(ShardError::Setup(format!(
                        "declared table {name:?} differs between shards {other} and {shard} \
                         (columns, types or primary key): a move copies rows column by column"
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some((_, spec)) = first {
            if out
                .iter()
                .any(|t| t.schema == spec.schema && t.name == spec.name)
            {
                return Err(ShardError::Setup(format!(
                    "table {name:?} is declared twice"
                )));
            }
            out.push(spec);
        }
    }
    Ok(out)
}

#[cfg_attr(not(feature = "reshard"), allow(dead_code))]
/// The first ordinary table with rows on `db` that is neither declared nor
/// local (outside the system schemas and the library's own tables).
pub(crate) async fn undeclared_with_rows(
    db: &Db,
    shard: &Arc<str>,
    tables: &[TableSpec],
    local: &[String],
) -> Result<Option<String>, ShardError> {
    let rows = db
        .read_query(
            Consistency::Strong,
            "SELECT n.nspname::text, c.relname::text, \
             pg_catalog.to_regclass(n.nspname::text || '.' || c.relname::text)::oid::int8 \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_%' AND c.relname NOT LIKE 'tower\\_scale\\_%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| ShardError::db(shard, e))?;
    let mut local_oids = Vec::new();
    for name in local {
        let row = db
            .read_one(
                Consistency::Strong,
                "SELECT coalesce(pg_catalog.to_regclass($1)::oid::int8, 0)",
                &[name],
            )
            .await
            .map_err(|e| ShardError::db(shard, e))?;
        local_oids.push(row.value.try_get::<_, i64>(0).unwrap_or(0));
    }
    for row in rows.value {
        let (schema, name): (String, String) = (
            row.try_get(0).unwrap_or_default(),
            row.try_get(1).unwrap_or_default(),
        );
        let oid: i64 = row.try_get(2).unwrap_or(0);
        if tables.iter().any(|t| t.schema == schema && t.name == name) || local_oids.contains(&oid)
        {
            continue;
        }
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.{})",
            ident(&schema),
            ident(&name)
        );
        let any = db
            .read_one(Consistency::Strong, &sql, &[])
            .await
            .map_err(|e| ShardError::db(shard, e))?;
        if any.value.try_get::<_, bool>(0).unwrap_or(true) {
            return Ok(Some(format!("{schema}.{name}")));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_forms_hash_as_their_shard_keys() {
        assert_eq!(
            KeyType::Integer.slot_of_text("-42", 4096),
            Some(slot_of(&-42i64, 4096))
        );
        assert_eq!(
            KeyType::Text.slot_of_text("ada", 4096),
            Some(slot_of("ada", 4096))
        );
        assert_eq!(
            KeyType::Bytes.slot_of_text("\\x00ff", 4096),
            Some(slot_of(&[0u8, 255][..], 4096))
        );
        assert_eq!(KeyType::Bytes.slot_of_text("\\x0", 4096), None);
        assert_eq!(KeyType::Integer.slot_of_text("x", 4096), None);
        assert_eq!(
            KeyType::from_type_name("character varying(20)"),
            Some(KeyType::Text)
        );
        assert_eq!(KeyType::from_type_name("uuid"), None);
    }
}
