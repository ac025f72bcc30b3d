//! Rows as text: reading pages of a declared table, writing them on the
//! target idempotently, and deleting them where they no longer belong.
//!
//! Every value travels in PostgreSQL's text form and is cast back with the
//! column's own type (`$1::text::timestamptz`), so any column type a table
//! has is copied without the library knowing it.

use std::sync::Arc;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::pg::Transaction;

use super::super::error::ShardError;
use super::super::tables::{TableSpec, ident};

/// One row in `columns` order, as text (`None`: NULL).
pub(crate) type TextRow = Vec<Option<String>>;

/// The SELECT of one page of `spec` in primary-key order, after the key
/// given as parameters `$1..$k` (none: the first page), `limit` rows.
pub(crate) fn page_sql(spec: &TableSpec, after: bool, limit: usize) -> String {
    let columns: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        // Aliased: an output column named like the key would be what
        // ORDER BY sorts by (as text).
        .map(|(i, c)| format!("{}::text AS v{i}", ident(&c.name)))
        .collect();
    let pk = pk_list(spec);
    let filter = if after {
        format!(" WHERE ({pk}) > ({})", key_params(spec, 1))
    } else {
        String::new()
    };
    format!(
        "SELECT {} FROM ONLY {}{filter} ORDER BY {} LIMIT {limit}",
        columns.join(", "),
        spec.qualified(),
        pk
    )
}

/// The rows of a page as text.
pub(crate) fn text_rows(rows: &[Row], shard: &Arc<str>) -> Result<Vec<TextRow>, ShardError> {
    rows.iter()
        .map(|row| {
            (0..row.len())
                .map(|i| {
                    row.try_get::<_, Option<String>>(i)
                        .map_err(|e| ShardError::Setup(format!("{shard}: a copied value: {e}")))
                })
                .collect()
        })
        .collect()
}

/// The primary-key values of `row` (all present: a key is never NULL).
pub(crate) fn key_of(spec: &TableSpec, row: &[Option<String>]) -> Option<Vec<String>> {
    spec.primary_key
        .iter()
        .map(|&i| row.get(i).cloned().flatten())
        .collect()
}

/// `INSERT ... SELECT FROM unnest(...) ON CONFLICT (pk) DO UPDATE`: the
/// rows given as one text array per column. A conflicting row whose shard
/// key differs (another slot's row with the same primary key) is left
/// alone, and the short count says so.
fn upsert_sql(spec: &TableSpec) -> String {
    let names: Vec<String> = spec.columns.iter().map(|c| ident(&c.name)).collect();
    let casts: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.v{i}::{}", c.type_name))
        .collect();
    let arrays: Vec<String> = (1..=spec.columns.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..spec.columns.len()).map(|i| format!("v{i}")).collect();
    let pk = pk_list(spec);
    let set: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !spec.primary_key.contains(i))
        .map(|(_, c)| format!("{0} = EXCLUDED.{0}", ident(&c.name)))
        .collect();
    let on_conflict = if set.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        let key = ident(&spec.columns[spec.key].name);
        format!(
            "DO UPDATE SET {} WHERE tower_scale_t.{key} IS NOT DISTINCT FROM EXCLUDED.{key}",
            set.join(", ")
        )
    };
    format!(
        "INSERT INTO {} AS tower_scale_t ({}) SELECT {} FROM unnest({}) AS u({}) \
         ON CONFLICT ({}) {on_conflict}",
        spec.qualified(),
        names.join(", "),
        casts.join(", "),
        arrays.join(", "),
        aliases.join(", "),
        pk
    )
}

/// Column-major text arrays of `rows`.
fn columns_of(spec: &TableSpec, rows: &[&TextRow]) -> Vec<Vec<Option<String>>> {
    let mut out = vec![Vec::with_capacity(rows.len()); spec.columns.len()];
    for row in rows {
        for (i, column) in out.iter_mut().enumerate() {
            column.push(row.get(i).cloned().flatten());
        }
    }
    out
}

/// Writes `rows` (text rows of `spec`) on the target in `tx`, replacing
/// what is there; refuses a primary key taken by a row of another shard
/// key (primary keys must be unique across shards for a move).
pub(crate) async fn upsert(
    tx: &Transaction,
    target: &Arc<str>,
    spec: &TableSpec,
    rows: &[&TextRow],
) -> Result<(), ShardError> {
    if rows.is_empty() {
        return Ok(());
    }
    let arrays = columns_of(spec, rows);
    let params: Vec<&(dyn ToSql + Sync)> =
        arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    let written = tx
        .execute(&upsert_sql(spec), &params)
        .await
        .map_err(|e| ShardError::db(target, e))?;
    let all_key = spec.columns.len() == spec.primary_key.len();
    if !all_key && written < rows.len() as u64 {
        return Err(ShardError::Setup(format!(
            "{}: {} of {} rows have a primary key that {target} already uses for a row of \
             another shard key: primary keys must be unique across shards to move rows",
            spec.qualified(),
            rows.len() as u64 - written,
            rows.len()
        )));
    }
    Ok(())
}

fn key_condition(spec: &TableSpec, first_param: usize) -> String {
    format!("({}) = ({})", pk_list(spec), key_params(spec, first_param))
}

/// The rows of primary keys `keys` on the shard in `tx`, locked, as text
/// rows with only the primary key and the shard key set.
pub(crate) async fn lookup(
    tx: &Transaction,
    shard: &Arc<str>,
    spec: &TableSpec,
    keys: &[Vec<String>],
) -> Result<Vec<TextRow>, ShardError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut columns: Vec<usize> = spec.primary_key.clone();
    if !columns.contains(&spec.key) {
        columns.push(spec.key);
    }
    let select: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("{}::text AS v{n}", ident(&spec.columns[i].name)))
        .collect();
    let pk = pk_list(spec);
    let casts: Vec<String> = spec
        .primary_key
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("u.k{n}::{}", spec.columns[i].type_name))
        .collect();
    let arrays: Vec<String> = (1..=spec.primary_key.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..spec.primary_key.len())
        .map(|n| format!("k{n}"))
        .collect();
    let sql = format!(
        "SELECT {} FROM ONLY {} WHERE ({}) IN (SELECT {} FROM unnest({}) AS u({})) FOR UPDATE",
        select.join(", "),
        spec.qualified(),
        pk,
        casts.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    );
    let values: Vec<Vec<String>> = (0..spec.primary_key.len())
        .map(|n| keys.iter().filter_map(|k| k.get(n).cloned()).collect())
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let found = tx
        .query(&sql, &params)
        .await
        .map_err(|e| ShardError::db(shard, e))?;
    let mut out = Vec::with_capacity(found.len());
    for row in &found {
        let mut text: TextRow = vec![None; spec.columns.len()];
        for (n, &i) in columns.iter().enumerate() {
            text[i] = row
                .try_get::<_, Option<String>>(n)
                .map_err(|e| ShardError::Setup(format!("{shard}: a looked-up key: {e}")))?;
        }
        out.push(text);
    }
    Ok(out)
}

/// An UPDATE of the columns given (`Some`) of the row of primary key
/// `key`, for a change that left TOASTed values out; the shard key must be
/// in range (checked by the caller).
pub(crate) async fn update_columns(
    tx: &Transaction,
    target: &Arc<str>,
    spec: &TableSpec,
    key: &[String],
    values: &[(usize, Option<String>)],
) -> Result<(), ShardError> {
    if values.is_empty() {
        return Ok(());
    }
    let set: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(n, (i, _))| {
            format!(
                "{} = ${}::text::{}",
                ident(&spec.columns[*i].name),
                n + 1,
                spec.columns[*i].type_name
            )
        })
        .collect();
    let sql = format!(
        "UPDATE ONLY {} SET {} WHERE {}",
        spec.qualified(),
        set.join(", "),
        key_condition(spec, values.len() + 1)
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = values
        .iter()
        .map(|(_, v)| v as &(dyn ToSql + Sync))
        .collect();
    params.extend(key.iter().map(|k| k as &(dyn ToSql + Sync)));
    tx.execute(&sql, &params)
        .await
        .map_err(|e| ShardError::db(target, e))?;
    Ok(())
}

/// Deletes the rows of `rows` (text rows of `spec`) from the shard in
/// `tx`, matching primary key and shard key both.
pub(crate) async fn delete_rows(
    tx: &Transaction,
    shard: &Arc<str>,
    spec: &TableSpec,
    rows: &[&TextRow],
) -> Result<u64, ShardError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut columns: Vec<usize> = spec.primary_key.clone();
    if !columns.contains(&spec.key) {
        columns.push(spec.key);
    }
    let names: Vec<String> = columns
        .iter()
        .map(|&i| ident(&spec.columns[i].name))
        .collect();
    let casts: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("u.v{n}::{}", spec.columns[i].type_name))
        .collect();
    let arrays: Vec<String> = (1..=columns.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..columns.len()).map(|n| format!("v{n}")).collect();
    let sql = format!(
        "DELETE FROM ONLY {} WHERE ({}) IN (SELECT {} FROM unnest({}) AS u({}))",
        spec.qualified(),
        names.join(", "),
        casts.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    );
    let values: Vec<Vec<Option<String>>> = columns
        .iter()
        .map(|&i| rows.iter().map(|r| r.get(i).cloned().flatten()).collect())
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    tx.execute(&sql, &params)
        .await
        .map_err(|e| ShardError::db(shard, e))
}

/// The primary key's columns, quoted, comma-separated.
fn pk_list(spec: &TableSpec) -> String {
    let pk: Vec<String> = spec
        .primary_key
        .iter()
        .map(|&i| ident(&spec.columns[i].name))
        .collect();
    pk.join(", ")
}

/// The primary key's values as text parameters from `$first`, each cast
/// to its column's type.
fn key_params(spec: &TableSpec, first: usize) -> String {
    let params: Vec<String> = spec
        .primary_key
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("${}::text::{}", first + n, spec.columns[i].type_name))
        .collect();
    params.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tables::{KeyType, TableColumn};

    fn spec() -> TableSpec {
        TableSpec {
            schema: "public".into(),
            name: "items".into(),
            columns: vec![
                TableColumn {
                    name: "id".into(),
                    type_name: "bigint".into(),
                },
                TableColumn {
                    name: "name".into(),
                    type_name: "text".into(),
                },
            ],
            primary_key: vec![0],
            key: 0,
            key_type: KeyType::Integer,
        }
    }

    #[test]
    fn statements_cast_text_back_to_the_column_types() {
        let s = spec();
        assert_eq!(
            page_sql(&s, true, 10),
            "SELECT \"id\"::text AS v0, \"name\"::text AS v1 FROM ONLY \"public\".\"items\" \
             WHERE (\"id\") > ($1::text::bigint) ORDER BY \"id\" LIMIT 10"
        );
        let upsert = upsert_sql(&s);
        assert!(upsert.contains("u.v0::bigint, u.v1::text"), "{upsert}");
        assert!(upsert.contains("ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\""));
        assert!(upsert.contains("IS NOT DISTINCT FROM EXCLUDED.\"id\""));
        assert_eq!(
            key_of(&s, &[Some("7".into()), None]),
            Some(vec!["7".into()])
        );
        assert_eq!(key_of(&s, &[None, None]), None);
    }
}
