//! Query-result caching (feature `change-feed`): a [`DbCache`] read keyed
//! by its statement and parameters and tagged with the tables it reads, so
//! the change feed's invalidations (see [`tags`]) reach it with no tag
//! written by hand.
//!
//! The rules and the tags are on [`ReadCaching`]. The parts: `analyze`,
//! `walk` and `expr` read the statement's text; `catalog` asks the
//! database about its names and derives the [`catalog::Plan`]; `key` turns
//! a key column's value into its text output; `reads` remembers each
//! statement's plan and keys and tags a read by it.
//!
//! [`DbCache`]: super::DbCache
//! [`tags`]: super::feed::tags

mod analyze;
mod catalog;
mod expr;
mod key;
mod names;
mod reads;
mod walk;

pub(crate) use self::reads::{Step, TableTagging};

/// Which reads a [`DbCache`] caches by the tables they read
/// ([`DbCacheBuilder::cache_reads`]): query-result caching, keyed by the
/// statement and its parameters and tagged as the change feed spells its
/// invalidations (see [`tags`]), with no key or tag written by hand.
///
/// Either way only `Any` and `ReadYourWrites` reads without a
/// [`cache_key`](super::Query::cache_key) of their own are considered
/// (`Strong` and `BoundedStaleness` reads, and writes, are as without it).
///
/// # Tables the change feed does not publish
///
/// **Without [`DbCacheBuilder::only_published`], a read of a table that
/// the change feed's publication does not cover is cached all the same,
/// and nothing but the TTL and writes through this cache ever invalidates
/// it: a change made elsewhere (another service, `psql`, a migration) is
/// not seen until the entry expires.** A cache fed by a
/// [`ChangeFeed`](super::feed::ChangeFeed) should name its publication
/// (the feed's default is `tower_scale_feed`):
/// `DbCache::builder(db).only_published("tower_scale_feed")`. Tables left
/// out of it (see the feed's `left_out` status) are then read uncached.
///
/// A statement is cached only if it can be attributed to base tables:
///
/// 1. **Its text** (parsed with `sqlparser`, PostgreSQL dialect): exactly
///    one plain `SELECT` (set operations, subqueries, joins and non-data-
///    modifying CTEs included), no `FOR UPDATE`/`FOR SHARE`, no `INTO`, no
///    table function, `LATERAL` function, `TABLESAMPLE` or construct the
///    analysis does not know; no string literal with a word that
///    PostgreSQL's date/time input reads the clock for (`now`, `today`,
///    `tomorrow`, `yesterday`: `'today 08:00'` as well as `'now'`, in any
///    literal) and no cast to a date/time type of anything but a literal
///    or a column; no field access (`(x.y).z`) but on a relation's row;
///    a qualified name `s.y` of a subquery or CTE `s` only if `y` is an
///    output name its text spells out (not through `SELECT *`); at most
///    256 KiB. Statements that read no table are not cached either.
/// 2. **The catalog** (asked once per statement text on a replica, else the
///    primary, within the cluster's read timeout; the answer is
///    remembered for [`DbCacheBuilder::statement_analysis_ttl`], 60 s by
///    default, for up to 1,024 statements and 4 MiB of their text): every
///    relation resolves (by the
///    session's `search_path`) to a permanent base table (`relkind` `r`
///    or `p`) outside the system schemas and without row-level security —
///    so views, materialized views, foreign, unlogged and temporary tables
///    are not cached; every function called resolves only to `pg_catalog`
///    functions that are **immutable**; no operator by a symbol used is
///    defined outside `pg_catalog` by a function that is not immutable;
///    every qualified column reference `x.y` (or `(x).y`) names a column
///    of `x`'s table (not dropped; no system column but `tableoid`) —
///    else PostgreSQL calls the function `y(x)`, which may read any table;
///    with [`DbCacheBuilder::only_published`], every table (each partition
///    or inheritance child read with it) is in the publication, itself or
///    through an ancestor.
///
/// An unqualified name is never a function call in PostgreSQL (`SELECT
/// order_count FROM users` is an error, not `order_count(users)`), so it
/// is left to the database.
///
/// Stable functions are refused as well as volatile ones: a stable
/// function (`now()`, `current_date`, `current_setting()`, `to_char` of a
/// `timestamptz`, ...) may answer differently from one statement to the
/// next while no table changes, so no invalidation would ever reach its
/// entry. A name with any non-immutable overload is refused (the analysis
/// does not resolve overloads), and so is any function outside
/// `pg_catalog`, whatever its label: a user function may read tables the
/// statement does not name.
///
/// # Tags
///
/// | statement | tags |
/// |---|---|
/// | one table (no join, subquery or CTE) whose `WHERE` compares every replica-identity column with `=` to a `$n` or a literal | `{table}:{key}` and `{table}:*` |
/// | anything else | `{table}` for every table read, with its inheritance family (partitions, parents, children) |
///
/// So a change to another row leaves a row lookup's entry alone, and a
/// `TRUNCATE` or schema change (`{table}:*`) reaches it. The key is the
/// text output of the key columns, as [`tags::row_key`] spells it: taken
/// from a literal, or from the bound parameter encoded as the driver sends
/// it and read back, for `int2`, `int4`, `int8`, `text`, `varchar`,
/// `name` (deterministic collations), `bool` and `uuid`. Any other key type
/// (`bpchar` among them: its output is padded to the column's length), a
/// parameter that does not encode, a table in an inheritance family or a
/// replica identity that is not the primary key or an index falls back to
/// `{table}`: coarser, never wrong.
///
/// The entry is stamped and answers tokens exactly as [`QueryPolicy`]
/// says; a read that cannot be cached (or whose catalog lookup failed)
/// goes to the database as it would without the cache, never failing
/// because of it. While a statement's first lookup is under way, other
/// reads of it go uncached rather than wait.
///
/// # Limits
///
/// - Entries are invalidated by the change feed (and by writes through the
///   cache, by their own tags, and by the TTL): **a table the feed's
///   publication does not cover is never invalidated by a change**; use
///   [`DbCacheBuilder::only_published`] to leave such tables uncached.
/// - What the catalog said is trusted for the analysis TTL: a table
///   replaced by a view in that time is still taken for a table.
/// - Casts and types are not checked: a user-defined cast or type input
///   function that reads tables, or a text column holding `'now'` cast to
///   a date, is beyond the analysis.
/// - A statement text with values spliced in (rather than bound) is a new
///   statement each time: a catalog lookup per read.
///
/// ```no_run
/// # async fn demo(db: tower_scale::pg::Db) -> Result<(), Box<dyn std::error::Error>> {
/// use tower_scale::pg::{Consistency, DbCache, Query, ReadCaching};
///
/// let cache = DbCache::builder(db).cache_reads(ReadCaching::Marked).build()?;
/// // A join: tagged `users` and `orders`.
/// let orders = Query::read(
///     "SELECT o.id, o.total FROM orders o JOIN users u ON u.id = o.user_id WHERE u.email = $1",
///     Consistency::Any,
/// )
/// .bind("ada@example.com")
/// .cache_by_tables();
/// cache.query(orders.clone()).await?;
/// assert_eq!(&*cache.query(orders).await?.served_by, "cache");
/// // A lookup by the primary key: tagged `users:7` and `users:*`, so a
/// // change to another user leaves it cached.
/// let user = Query::read("SELECT name FROM users WHERE id = $1", Consistency::Any)
///     .bind(7i64)
///     .cache_by_tables();
/// cache.query(user).await?;
/// // What the change feed sends for `UPDATE users SET ... WHERE id = 7`
/// // committed at `lsn` (here by hand):
/// # let lsn = 0u64;
/// cache.invalidator().invalidate_tag_at("users", lsn);
/// cache.invalidator().invalidate_tag_at("users:7", lsn);
/// # Ok(()) }
/// ```
///
/// [`DbCache`]: super::DbCache
/// [`DbCacheBuilder::statement_analysis_ttl`]: super::DbCacheBuilder::statement_analysis_ttl
/// [`QueryPolicy`]: super::QueryPolicy
/// [`tags`]: super::feed::tags
/// [`tags::row_key`]: super::feed::tags::row_key
/// [`DbCacheBuilder::cache_reads`]: super::DbCacheBuilder::cache_reads
/// [`DbCacheBuilder::only_published`]: super::DbCacheBuilder::only_published
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadCaching {
    /// Reads marked with [`Query::cache_by_tables`](super::Query::cache_by_tables)
    /// (the default).
    #[default]
    Marked,
    /// Every read whose statement the analysis attributes to base tables.
    AllAnalyzable,
}
