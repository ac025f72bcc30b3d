//! What the catalog says about a statement's names: which relations are
//! base tables (and their inheritance family, their key columns), which
//! functions and operators are builtins that read nothing but their
//! arguments; and the parameter types the server gives the statement.
//! From that, the [`Plan`] that tags its entries.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio_postgres::types::Type;

use super::analyze::{KeyValue, Shape};
use super::key::{KeyKind, literal_text};
use crate::cache::Tag;
use crate::pg::db::Db;
use crate::pg::feed::tags;
use crate::pg::lsn::Consistency;
use crate::pg::session::{Running, prepare};

/// How one statement's reads are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Not cached: not a plain `SELECT` over base tables, or it calls
    /// something the catalog does not vouch for.
    NotCached,
    /// Tagged with these tables (`{table}`), for any parameters.
    Tables(Arc<[Tag]>),
    /// One row of `table` by its key: tagged `{table}:{key}` and
    /// `{table}:*`, the key taken per call (if it cannot be, `fallback`).
    Row {
        table: Arc<str>,
        key: Vec<KeySource>,
        fallback: Arc<[Tag]>,
    },
}

/// Where one key column's value comes from, in key column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// Parameter `index` (0-based), bound as `ty`.
    Param { index: usize, ty: Type },
    /// A literal, as the column's text output.
    Literal(String),
}

/// The catalog could not be asked (no connection, a timeout, an error):
/// the read goes uncached and the next one asks again.
#[derive(Debug)]
pub(crate) struct LookupFailed;

/// One row per relation asked for and per member of its inheritance
/// family (itself, its ancestors, its descendants); `kind` is NULL for a
/// name that resolves to nothing. The last column: whether the member is
/// published (it or an ancestor is in `pg_publication_tables` for
/// publication `$2`; always true when `$2` is NULL).
const RELATIONS_SQL: &str = "\
WITH RECURSIVE wanted AS (
    SELECT w.i, pg_catalog.to_regclass(w.name)::pg_catalog.oid AS rel
    FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS w(name, i)
), down(i, rel) AS (
    SELECT i, rel FROM wanted WHERE rel IS NOT NULL
    UNION
    SELECT d.i, h.inhrelid FROM down d JOIN pg_catalog.pg_inherits h ON h.inhparent = d.rel
), up(i, rel) AS (
    SELECT i, rel FROM wanted WHERE rel IS NOT NULL
    UNION
    SELECT u.i, h.inhparent FROM up u JOIN pg_catalog.pg_inherits h ON h.inhrelid = u.rel
), family AS (
    SELECT i, rel FROM down UNION SELECT i, rel FROM up
), ancestors(rel, anc) AS (
    SELECT rel, rel FROM family WHERE $2::pg_catalog.text IS NOT NULL
    UNION
    SELECT a.rel, h.inhparent FROM ancestors a JOIN pg_catalog.pg_inherits h ON h.inhrelid = a.anc
), published AS (
    SELECT DISTINCT a.rel
    FROM ancestors a
    JOIN pg_catalog.pg_class pc ON pc.oid = a.anc
    JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
    JOIN pg_catalog.pg_publication_tables pt
      ON pt.pubname = $2::pg_catalog.text AND pt.schemaname = pn.nspname AND pt.tablename = pc.relname
)
SELECT w.i::pg_catalog.int4, f.rel = w.rel, c.relkind::pg_catalog.text,
       c.relpersistence::pg_catalog.text, c.relrowsecurity, c.relreplident::pg_catalog.text,
       n.nspname::pg_catalog.text, c.relname::pg_catalog.text,
       $2::pg_catalog.text IS NULL OR f.rel IN (SELECT rel FROM published)
FROM wanted w
LEFT JOIN family f ON f.i = w.i
LEFT JOIN pg_catalog.pg_class c ON c.oid = f.rel
LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";

/// The replica identity's columns (the primary key, or the index named
/// by `REPLICA IDENTITY USING INDEX`) in column order, as the change feed
/// spells keys: name, type, whether its collation is deterministic
/// (`collisdeterministic` is read through JSON: PostgreSQL 10 and 11 have
/// no such column and only deterministic collations).
const KEY_SQL: &str = "\
SELECT a.attname::pg_catalog.text, a.atttypid,
       COALESCE((pg_catalog.to_jsonb(co) ->> 'collisdeterministic')::pg_catalog.bool, true)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_index x ON x.indrelid = c.oid
  AND CASE c.relreplident WHEN 'd' THEN x.indisprimary WHEN 'i' THEN x.indisreplident ELSE false END
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
  AND a.attnum = ANY (x.indkey::pg_catalog.int2[])
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
WHERE c.oid = pg_catalog.to_regclass($1)
ORDER BY a.attnum";

/// Per function name: how many functions it may resolve to (by the
/// session's `search_path`, or in the schema named) and whether every one
/// is an immutable builtin.
const FUNCTIONS_SQL: &str = "\
SELECT f.i::pg_catalog.int4, pg_catalog.count(p.oid),
       COALESCE(pg_catalog.bool_and(p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
                                    AND p.provolatile = 'i'), false)
FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[]))
     WITH ORDINALITY AS f(schema, name, i)
LEFT JOIN pg_catalog.pg_proc p ON p.proname = f.name AND p.pronamespace IN (
    SELECT n.oid FROM pg_catalog.pg_namespace n
    WHERE n.nspname = f.schema
       OR (f.schema IS NULL AND n.nspname = ANY (pg_catalog.current_schemas(true))))
GROUP BY f.i";

/// Operators by those symbols, outside `pg_catalog`, whose function is
/// not immutable (an extension's operators on its own types are fine).
const OPERATORS_SQL: &str = "\
SELECT o.oprname::pg_catalog.text
FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode
WHERE o.oprname = ANY ($1::pg_catalog.text[])
  AND o.oprnamespace <> 'pg_catalog'::pg_catalog.regnamespace
  AND p.provolatile <> 'i'";

/// How many of the `(relation, column)` pairs name no column of the
/// relation: none dropped, no system column but `tableoid` (`ctid`,
/// `xmin`, `xmax` change without a logical change).
const COLUMNS_SQL: &str = "\
SELECT pg_catalog.count(*)::pg_catalog.int8
FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[]))
     AS c(rel, col)
WHERE NOT EXISTS (
    SELECT FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = pg_catalog.to_regclass(c.rel) AND a.attname = c.col::pg_catalog.name
      AND NOT a.attisdropped AND (a.attnum > 0 OR a.attname = 'tableoid'))";

/// What the database answered, before it is judged.
struct Answers {
    params: Vec<Type>,
    relations: Vec<tokio_postgres::Row>,
    key: Vec<tokio_postgres::Row>,
    functions: Vec<tokio_postgres::Row>,
    operators: Vec<tokio_postgres::Row>,
    /// Qualified references that name no column.
    missing_columns: i64,
}

/// Asks the catalog about `shape` (one session on a replica, else the
/// primary; the queries within the read timeout, after a checkout bounded
/// by the pool's timeouts) and judges the answer. With `publication`,
/// only tables that publication covers are cached.
pub(crate) async fn plan(
    db: &Db,
    sql: &str,
    shape: &Shape,
    publication: Option<&str>,
) -> Result<Plan, LookupFailed> {
    if shape.relations.is_empty() {
        // Nothing to tag it with (and nothing worth caching).
        return Ok(Plan::NotCached);
    }
    let answers = ask(db, sql, shape, publication).await?;
    Ok(judge(shape, &answers).unwrap_or(Plan::NotCached))
}

async fn ask(
    db: &Db,
    sql: &str,
    shape: &Shape,
    publication: Option<&str>,
) -> Result<Answers, LookupFailed> {
    let (index, _, _) = db
        .route(
            Consistency::Any,
            super::super::route::RouteHint::None,
            None,
            crate::pg::Lsn(0),
        )
        .await
        .map_err(|_| LookupFailed)?;
    let node = db.node(index);
    // Checkout is bounded by the pool's own timeouts, as a read's is.
    let conn = node.connection().await.map_err(|_| LookupFailed)?;
    let read_timeout = db.inner.options.read_timeout;
    let running = Running::new(conn, &db.inner.cancel);
    let conn = running.conn().map_err(|_| LookupFailed)?;
    let relations: Vec<String> = shape.relations.iter().map(|r| r.quoted()).collect();
    let (schemas, names): (Vec<Option<&str>>, Vec<&str>) = shape
        .functions
        .iter()
        .map(|f| (f.schema.as_deref(), f.name.as_str()))
        .unzip();
    let operators: Vec<&str> = shape.operators.iter().map(String::as_str).collect();
    let (column_relations, columns): (Vec<String>, Vec<&str>) = shape
        .columns
        .iter()
        .map(|(r, c)| (r.quoted(), c.as_str()))
        .unzip();
    let single = match (&shape.lookup, relations.as_slice()) {
        (Some(_), [one]) => Some(one.as_str()),
        _ => None,
    };
    // Sent together (one round trip), each to its end: a preparation
    // dropped half way would leave its statement on the server.
    let all = async {
        let ((statement, relations, key, functions, operators), columns) =
            futures_util::future::join(
                futures_util::future::join5(
                    prepare(conn, &node.statement_cache_clears, sql),
                    query(
                        conn,
                        &node.statement_cache_clears,
                        RELATIONS_SQL,
                        &[&relations, &publication],
                    ),
                    async {
                        match single {
                            Some(one) => {
                                query(conn, &node.statement_cache_clears, KEY_SQL, &[&one]).await
                            }
                            None => Ok(Vec::new()),
                        }
                    },
                    query(
                        conn,
                        &node.statement_cache_clears,
                        FUNCTIONS_SQL,
                        &[&schemas, &names],
                    ),
                    query(
                        conn,
                        &node.statement_cache_clears,
                        OPERATORS_SQL,
                        &[&operators],
                    ),
                ),
                query(
                    conn,
                    &node.statement_cache_clears,
                    COLUMNS_SQL,
                    &[&column_relations, &columns],
                ),
            )
            .await;
        let missing_columns = match columns?.first() {
            Some(row) => row.try_get(0)?,
            None => 0,
        };
        Ok::<_, tokio_postgres::Error>(Answers {
            params: statement?.params().to_vec(),
            relations: relations?,
            key: key?,
            functions: functions?,
            operators: operators?,
            missing_columns,
        })
    };
    match tokio::time::timeout(read_timeout, all).await {
        Ok(Ok(answers)) => {
            running.release();
            Ok(answers)
        }
        Ok(Err(e)) => {
            tracing::debug!(node = %node.name, error = %e, "query cache: the catalog lookup failed; the read goes uncached");
            running.settle(&e, false);
            Err(LookupFailed)
        }
        Err(_) => {
            // A stalled server, as for a read: out of rotation until the
            // monitor sees it answer. Dropping `running` cancels what
            // still runs and closes the session.
            node.mark_down();
            db.inner.request_reprobe();
            Err(LookupFailed)
        }
    }
}

async fn query(
    conn: &deadpool_postgres::Object,
    node: &metrics::Counter,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let statement = prepare(conn, node, sql).await?;
    conn.query(&statement, params).await
}

/// Schemas whose tables the change feed never reports.
fn is_system_schema(schema: &str) -> bool {
    schema == "pg_catalog" || schema == "information_schema" || schema.starts_with("pg_toast")
}

/// The plan the answers allow (`None`: not cached).
fn judge(shape: &Shape, a: &Answers) -> Option<Plan> {
    // Functions: each name resolves only to immutable builtins.
    for row in &a.functions {
        let found: i64 = row.try_get(1).ok()?;
        let builtin: bool = row.try_get(2).ok()?;
        if found == 0 || !builtin {
            return None;
        }
    }
    if a.functions.len() != shape.functions.len() || !a.operators.is_empty() {
        return None;
    }
    // Qualified references: real columns, not functions in disguise.
    if a.missing_columns != 0 {
        return None;
    }
    // Relations: base tables, permanent, without row security; tagged with
    // their whole inheritance family (a partition's change may be reported
    // under its root, a parent's read covers its children).
    let mut tables = BTreeSet::new();
    let mut self_rows = 0;
    let mut family = 0;
    let mut target: Option<(String, String, String)> = None;
    for row in &a.relations {
        let is_self: Option<bool> = row.try_get(1).ok()?;
        let kind: Option<String> = row.try_get(2).ok()?;
        let persistence: Option<String> = row.try_get(3).ok()?;
        let row_security: Option<bool> = row.try_get(4).ok()?;
        let identity: Option<String> = row.try_get(5).ok()?;
        let schema: Option<String> = row.try_get(6).ok()?;
        let name: Option<String> = row.try_get(7).ok()?;
        let published: Option<bool> = row.try_get(8).ok()?;
        let (Some(kind), Some(schema), Some(name)) = (kind, schema, name) else {
            return None;
        };
        // A partitioned table holds no rows: its partitions are published
        // (or it is, for them, with `publish_via_partition_root`).
        if kind == "r" && published != Some(true) {
            return None;
        }
        if !matches!(kind.as_str(), "r" | "p")
            || persistence.as_deref() != Some("p")
            || row_security != Some(false)
            || is_system_schema(&schema)
        {
            return None;
        }
        family += 1;
        if is_self == Some(true) {
            self_rows += 1;
            target = Some((
                kind,
                identity.unwrap_or_default(),
                tags::table_name(&schema, &name),
            ));
        }
        tables.insert(tags::table_name(&schema, &name));
    }
    if self_rows != shape.relations.len() {
        return None;
    }
    let tables: Arc<[Tag]> = tables.into_iter().map(Tag::from).collect();
    let Some(terms) = &shape.lookup else {
        return Some(Plan::Tables(tables));
    };
    // A row lookup: one plain table (no inheritance family) whose every
    // key column is compared with a parameter or a literal.
    let row_plan = || -> Option<Plan> {
        let (kind, identity, table) = target.clone()?;
        if family != 1 || kind != "r" || !matches!(identity.as_str(), "d" | "i") {
            return None;
        }
        if a.key.is_empty() {
            return None;
        }
        let mut key = Vec::with_capacity(a.key.len());
        for column in &a.key {
            let name: String = column.try_get(0).ok()?;
            let oid: u32 = column.try_get(1).ok()?;
            let deterministic: bool = column.try_get(2).ok()?;
            let ty = Type::from_oid(oid)?;
            let kind = KeyKind::of(&ty)?;
            if kind == KeyKind::Text && !deterministic {
                return None;
            }
            let (_, value) = terms.iter().find(|(c, _)| *c == name)?;
            key.push(match value {
                KeyValue::Param(n) => {
                    let param = a.params.get(n - 1)?;
                    if KeyKind::of(param)? != kind {
                        return None;
                    }
                    KeySource::Param {
                        index: n - 1,
                        ty: param.clone(),
                    }
                }
                literal => KeySource::Literal(literal_text(literal, &ty)?),
            });
        }
        Some(Plan::Row {
            table: table.into(),
            key,
            fallback: Arc::clone(&tables),
        })
    };
    Some(row_plan().unwrap_or(Plan::Tables(tables)))
}
