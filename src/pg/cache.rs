//! [`DbCache`]: the read-through cache over [`Db`] that keeps the
//! consistency model with no policy to write.
//!
//! Every cached read is stamped with the WAL position its data reflects
//! ([`QueryOutput::lsn`]); a read is answered from an entry only if the
//! entry satisfies its consistency; a write through the cache invalidates
//! its tags at its commit position, so a fill read below that position (a
//! lagging replica's old row) is answered but never stored.
//!
//! | read | from the cache |
//! |---|---|
//! | `Any` | any fresh entry |
//! | `ReadYourWrites(token)` | an entry stamped at or above the token (the unknown token: never) |
//! | `Strong`, `BoundedStaleness` | never (straight to the database) |
//!
//! The guarantee: a read with a token never sees data older than the
//! token, from the cache or a replica; after a write through the cache
//! returned, no read sees a cached entry from before it.
//!
//! # Query-result caching (feature `change-feed`)
//!
//! A read marked with `Query::cache_by_tables` (or every read, with
//! `DbCacheBuilder::cache_reads`) needs no key: before it reaches the
//! policy, its statement is analysed once (`super::sql`: parsed, its names
//! checked in the catalog, the plan remembered) and the read is given the
//! key name and tags the plan says — `{table}:{key}` and `{table}:*` for a
//! lookup of one row by its key, `{table}` for every table otherwise — so
//! the change feed's invalidations reach it. From there it is an ordinary
//! keyed read: the same stamps, the same tokens. A statement that cannot
//! be attributed to base tables, or whose lookup failed, goes uncached.
//! The rules: `ReadCaching`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use super::db::Db;
use super::error::DbError;
use super::lsn::Consistency;
use super::query::{Access, Query, QueryFuture, QueryOutput};
use crate::cache::{
    Cache, CacheLayer, CacheLayerBuilder, CachePolicy, CacheStats, Invalidator, Storable, Store,
    Windows,
};
use crate::error::ConfigError;

/// The policy [`DbCache`] runs: key, consistency and stamps from the
/// [`Query`] (public for [`DbCacheBuilder::configure`]).
///
/// | read | answered from the cache |
/// |---|---|
/// | `Any` | by any fresh entry |
/// | `ReadYourWrites(token)` | by an entry stamped at or above the token (the unknown token: never) |
/// | `Strong`, `BoundedStaleness` | never (straight to the database) |
///
/// Every entry is stamped with the WAL position its data reflects and
/// tagged with its key name and the query's tags.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryPolicy;

/// The key of a cached read: its SQL text, its [`cache_key`](Query::cache_key)
/// and its bound parameters as `Debug` writes them (two statements, or one
/// statement with other parameters, under one key name never answer each
/// other: `for_key("docs", 7)` on `WHERE id = $1 AND owner = $2` is still
/// keyed by the owner).
pub type QueryKey = (Arc<str>, Arc<str>, Arc<str>);

impl CachePolicy<Query, QueryOutput> for QueryPolicy {
    type Key = QueryKey;

    fn key(&self, q: &Query) -> Option<QueryKey> {
        match q.access {
            Access::Read(Consistency::Any | Consistency::ReadYourWrites(_)) => {
                let name = q.cache_key.clone()?;
                let params = format!("{:?}", q.params);
                Some((Arc::clone(&q.sql), name, params.into()))
            }
            _ => None,
        }
    }

    fn min_version(&self, q: &Query) -> Option<u64> {
        match q.access {
            // The unknown token is above every position: no entry serves it.
            Access::Read(Consistency::ReadYourWrites(token)) => {
                Some(token.version().unwrap_or(u64::MAX))
            }
            _ => None,
        }
    }

    fn storable(&self, key: &QueryKey, out: &QueryOutput, windows: &Windows) -> Option<Storable> {
        // Tagged with its key name too: a write tagged with that name
        // invalidates it even when the read named no tag.
        let mut s = Storable::new(*windows)
            .version(out.lsn.0)
            .tag(key.1.as_ref());
        for tag in out.tags.iter() {
            s = s.tag(tag.clone());
        }
        Some(s)
    }

    /// A hot key's `Any` read goes to any healthy replica, even one
    /// lagging past the lag budget, and to the primary only when no
    /// replica is healthy ([`RouteReason::HotKey`](super::RouteReason::HotKey)):
    /// `Any` accepts any staleness, and the primary is the one node that
    /// cannot be scaled out. Other consistencies route as always.
    fn on_hot_miss(&self, _key: &QueryKey, q: &mut Query) {
        if q.access == Access::Read(Consistency::Any) {
            q.route_hint = super::route::RouteHint::AnyHealthyReplica;
        }
    }
}

/// Configures a [`DbCache`].
#[must_use]
pub struct DbCacheBuilder {
    db: Db,
    layer: CacheLayerBuilder<QueryPolicy>,
    #[cfg(feature = "change-feed")]
    reads: super::sql::ReadCaching,
    #[cfg(feature = "change-feed")]
    analysis_ttl: Duration,
    #[cfg(feature = "change-feed")]
    only_published: Option<String>,
}

/// The hot-key sketch's size in a [`DbCache`] (on by default there: a
/// sampled read costs nothing next to a database round trip).
const DEFAULT_HOT_KEYS: usize = 64;

/// How long a statement's analysis is trusted by default.
#[cfg(feature = "change-feed")]
const STATEMENT_ANALYSIS_TTL: Duration = Duration::from_secs(60);

impl fmt::Debug for DbCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbCacheBuilder")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl DbCacheBuilder {
    /// How long an entry is fresh (default 60 s).
    pub fn time_to_live(self, ttl: Duration) -> Self {
        self.configure(|b| b.time_to_live(ttl))
    }

    /// Bounds the store to `n` entries (default 10,000).
    pub fn max_entries(self, n: u64) -> Self {
        self.configure(|b| b.max_entries(n))
    }

    /// Names the cache for its metrics (see [`CacheLayerBuilder::name`]).
    pub fn name(self, name: impl Into<String>) -> Self {
        self.configure(|b| b.name(name))
    }

    /// Any other setting of the underlying [`CacheLayerBuilder`] (windows,
    /// negative caching, clock, ...).
    pub fn configure(
        mut self,
        f: impl FnOnce(CacheLayerBuilder<QueryPolicy>) -> CacheLayerBuilder<QueryPolicy>,
    ) -> Self {
        self.layer = f(self.layer);
        self
    }

    /// Which reads are cached by the tables they read (feature
    /// `change-feed`; default [`ReadCaching::Marked`](super::ReadCaching::Marked):
    /// those marked with [`Query::cache_by_tables`]). See the
    /// [`DbCache`] docs.
    #[cfg(feature = "change-feed")]
    #[cfg_attr(docsrs, doc(cfg(feature = "change-feed")))]
    pub fn cache_reads(mut self, reads: super::sql::ReadCaching) -> Self {
        self.reads = reads;
        self
    }

    /// How long what the catalog said about a statement (its tables, key
    /// columns, functions) is trusted before it is asked again (feature
    /// `change-feed`; default 60 s). A table replaced by a view is seen
    /// within this time.
    #[cfg(feature = "change-feed")]
    #[cfg_attr(docsrs, doc(cfg(feature = "change-feed")))]
    pub fn statement_analysis_ttl(mut self, ttl: Duration) -> Self {
        self.analysis_ttl = ttl;
        self
    }

    /// Caches reads by their tables only if the change feed's publication
    /// `publication` covers every table they read (feature `change-feed`;
    /// the feed's default publication is `tower_scale_feed`): a table
    /// outside it, or a partition whose root is not published either, is
    /// read uncached. Checked with the rest of the statement's catalog
    /// lookup (`pg_publication_tables`), so a table added to or dropped
    /// from the publication is seen within
    /// [`statement_analysis_ttl`](Self::statement_analysis_ttl).
    ///
    /// Without it, a table the publication does not cover is cached too
    /// and its entries are invalidated only by the TTL and by writes
    /// through the cache (see [`ReadCaching`](super::ReadCaching)).
    #[cfg(feature = "change-feed")]
    #[cfg_attr(docsrs, doc(cfg(feature = "change-feed")))]
    pub fn only_published(mut self, publication: impl Into<String>) -> Self {
        self.only_published = Some(publication.into());
        self
    }

    /// Builds on the moka store.
    #[cfg(feature = "moka")]
    #[cfg_attr(docsrs, doc(cfg(feature = "moka")))]
    pub fn build(self) -> Result<DbCache, ConfigError> {
        let tables = self.tagging()?;
        let layer = self.layer.build()?;
        Ok(DbCache::assemble(self.db, &layer, tables))
    }

    /// Builds on the quick_cache store.
    #[cfg(feature = "quick-cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "quick-cache")))]
    pub fn build_quick(
        self,
    ) -> Result<DbCache<crate::cache::QuickStore<QueryKey, QueryOutput, DbError>>, ConfigError>
    {
        let tables = self.tagging()?;
        let layer = self.layer.build_quick()?;
        Ok(DbCache::assemble(self.db, &layer, tables))
    }

    #[cfg(feature = "change-feed")]
    fn tagging(&self) -> Result<Tagging, ConfigError> {
        if self.analysis_ttl.is_zero() {
            return Err(ConfigError::ZeroDuration {
                field: "statement_analysis_ttl",
                value: self.analysis_ttl,
            });
        }
        Ok(Arc::new(super::sql::TableTagging::new(
            self.reads,
            self.analysis_ttl,
            self.only_published.clone(),
        )))
    }

    #[cfg(not(feature = "change-feed"))]
    fn tagging(&self) -> Result<Tagging, ConfigError> {
        Ok(())
    }
}

/// What decides which reads are cached by their tables (feature
/// `change-feed`).
#[cfg(feature = "change-feed")]
type Tagging = Arc<super::sql::TableTagging>;
#[cfg(not(feature = "change-feed"))]
type Tagging = ();

/// A consistent read-through cache over [`Db`] (which reads an entry
/// answers: [`QueryPolicy`]): reads that name a [`cache_key`](Query::cache_key) are
/// cached and stamped; writes invalidate their [tags](Query::tag) at their
/// commit position. A `tower::Service<Query>`, like `Db` itself.
///
/// With feature `change-feed`, a read needs no key of its own: marked with
/// `Query::cache_by_tables` (or all reads, with `cache_reads`), it is
/// keyed by its statement and parameters and tagged with the tables it
/// reads, as the change feed invalidates them (query-result caching; the
/// rules are on `ReadCaching`).
///
/// ```no_run
/// # async fn demo(db: tower_scale::pg::Db) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_scale::pg::{Consistency, DbCache, Query};
///
/// let cache = DbCache::builder(db).time_to_live(Duration::from_secs(30)).build()?;
/// let sql = "SELECT name FROM users WHERE id = $1";
/// let first = cache.query(Query::read(sql, Consistency::Any).bind(7i64).for_key("users", 7)).await?;
/// let again = cache.query(Query::read(sql, Consistency::Any).bind(7i64).for_key("users", 7)).await?;
/// assert_eq!(&*again.served_by, "cache");
/// // The write invalidates `users:7` at its commit position...
/// let written = cache
///     .query(Query::write("UPDATE users SET name = $1 WHERE id = $2").bind("bob").bind(7i64).for_key("users", 7))
///     .await?;
/// // ...and its token reads the new name, from the cache only once an
/// // entry at or above the write is there.
/// let token = written.token.expect("a write's token");
/// let mine = cache
///     .query(Query::read(sql, Consistency::ReadYourWrites(token)).bind(7i64).for_key("users", 7))
///     .await?;
/// # let _ = (first, mine); Ok(()) }
/// ```
pub struct DbCache<St = DefaultStore>
where
    St: Store<Key = QueryKey, Response = QueryOutput, Error = DbError>,
{
    db: Db,
    cache: Cache<Db, QueryPolicy, St>,
    invalidator: Invalidator<QueryKey>,
    tables: Tagging,
}

/// The store [`DbCache`] uses unless told otherwise.
#[cfg(feature = "moka")]
pub type DefaultStore = crate::cache::MokaStore<QueryKey, QueryOutput, DbError>;
/// The store [`DbCache`] uses unless told otherwise.
#[cfg(all(not(feature = "moka"), feature = "quick-cache"))]
pub type DefaultStore = crate::cache::QuickStore<QueryKey, QueryOutput, DbError>;

impl<St> Clone for DbCache<St>
where
    St: Store<Key = QueryKey, Response = QueryOutput, Error = DbError>,
{
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            cache: self.cache.clone(),
            invalidator: self.invalidator.clone(),
            tables: self.tables.clone(),
        }
    }
}

impl<St> fmt::Debug for DbCache<St>
where
    St: Store<Key = QueryKey, Response = QueryOutput, Error = DbError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbCache")
            .field("stats", &self.cache.stats())
            .finish_non_exhaustive()
    }
}

impl DbCache {
    /// Starts configuring a cache over `db`.
    pub fn builder(db: Db) -> DbCacheBuilder {
        DbCacheBuilder {
            db,
            layer: CacheLayer::builder(QueryPolicy).track_hot_keys(DEFAULT_HOT_KEYS),
            #[cfg(feature = "change-feed")]
            reads: super::sql::ReadCaching::default(),
            #[cfg(feature = "change-feed")]
            analysis_ttl: STATEMENT_ANALYSIS_TTL,
            #[cfg(feature = "change-feed")]
            only_published: None,
        }
    }
}

impl<St> DbCache<St>
where
    St: Store<Key = QueryKey, Response = QueryOutput, Error = DbError>,
{
    /// A cache over `db` on a layer built with [`QueryPolicy`] (any store;
    /// reads marked with `Query::cache_by_tables` are cached by their
    /// tables, with the default settings).
    pub fn from_layer(db: Db, layer: &CacheLayer<QueryPolicy, St>) -> Self {
        #[cfg(feature = "change-feed")]
        let tables = Arc::new(super::sql::TableTagging::new(
            super::sql::ReadCaching::default(),
            STATEMENT_ANALYSIS_TTL,
            None,
        ));
        #[cfg(not(feature = "change-feed"))]
        let tables = ();
        Self::assemble(db, layer, tables)
    }

    fn assemble(db: Db, layer: &CacheLayer<QueryPolicy, St>, tables: Tagging) -> Self {
        Self {
            invalidator: layer.invalidator(),
            cache: layer.layer(db.clone()),
            tables,
            db,
        }
    }

    /// Runs `query`: a cacheable read from the cache or the database, a
    /// write on the primary followed by its tags' invalidation.
    pub async fn query(&self, query: Query) -> Result<QueryOutput, DbError> {
        self.clone().oneshot(query).await
    }

    /// Invalidates by key, tag or everything (writes made elsewhere).
    pub fn invalidator(&self) -> &Invalidator<QueryKey> {
        &self.invalidator
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The `k` most read keys lately, hottest first, with estimated reads
    /// ([`HotKey`](crate::cache::HotKey): a sample of the reads, hits and
    /// misses alike). Tracked by default in a cache from
    /// [`DbCache::builder`] (64 keys, one read in 32 sampled; change it
    /// with [`DbCacheBuilder::configure`] and the `hot_key_*` settings of
    /// [`CacheLayerBuilder`]); for [`from_layer`](Self::from_layer), as
    /// the layer was built. A hot key's `Any` misses go to any healthy
    /// replica, even one past the lag budget, rather than to the primary
    /// ([`QueryPolicy`]); concurrent misses of it make one database read.
    ///
    /// ```no_run
    /// # async fn demo(db: tower_scale::pg::Db) -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_scale::pg::DbCache;
    /// let cache = DbCache::builder(db).name("rows").build()?;
    /// for hot in cache.hot_keys(5) {
    ///     let (_sql, name, _params) = &hot.key;
    ///     println!("{name}: ~{} reads", hot.reads);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn hot_keys(&self, k: usize) -> Vec<crate::cache::HotKey<QueryKey>> {
        self.cache.hot_keys(k)
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

impl<St> Service<Query> for DbCache<St>
where
    St: Store<Key = QueryKey, Response = QueryOutput, Error = DbError>,
{
    type Response = QueryOutput;
    type Error = DbError;
    type Future = QueryFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DbError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, query: Query) -> QueryFuture {
        if query.access == Access::Write {
            let mut db = self.db.clone();
            let mut pending = PendingWrite {
                invalidator: self.invalidator.clone(),
                tags: query.tags.clone(),
            };
            return QueryFuture::new(async move {
                let result = db.call(query).await;
                match &result {
                    // At the commit position: fills read below it stay out.
                    Ok(out) => pending.done(out.token.and_then(|t| t.version())),
                    // It may have committed, at a position not known: the
                    // primary's position now is at or above it (if the
                    // primary does not answer, a plain invalidation).
                    Err(DbError::RowCount {
                        written: Some(token),
                        ..
                    }) => pending.done(token.version()),
                    Err(e) if e.may_have_committed() => {
                        let now = primary_position(&db).await;
                        pending.done(now);
                    }
                    Err(_) => pending.tags.clear(),
                }
                result
            });
        }
        #[cfg(feature = "change-feed")]
        let query = match self.tables.step(query) {
            super::sql::Step::Go(query) => query,
            super::sql::Step::LookUp(query, pending) => {
                let db = self.db.clone();
                let mut cache = self.cache.clone();
                // `pending` moves into the future: dropped unpolled, it
                // clears the statement's mark.
                return QueryFuture::new(async move {
                    let query = super::sql::TableTagging::look_up(&db, query, pending).await;
                    served(cache.call(query)).await
                });
            }
        };
        QueryFuture::new(served(self.cache.call(query)))
    }
}

/// A read through the cache, saying `"cache"` in `served_by` for a hit.
fn served(
    fut: crate::cache::ResponseFuture<Db, Query>,
) -> impl Future<Output = Result<QueryOutput, DbError>> + Send + 'static {
    let hit = fut.is_hit();
    async move {
        let mut out = fut.await?;
        if hit {
            out.served_by = Arc::from("cache");
        }
        Ok(out)
    }
}

/// A write's tags until its invalidation ran: dropped before that (the
/// caller gave up on a write that may have committed), it invalidates
/// them plainly.
struct PendingWrite {
    invalidator: Invalidator<QueryKey>,
    tags: Vec<crate::cache::Tag>,
}

impl PendingWrite {
    fn done(&mut self, version: Option<u64>) {
        for tag in std::mem::take(&mut self.tags) {
            self.invalidator.invalidate_tag_at(tag, version);
        }
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        self.done(None);
    }
}

/// The primary's WAL insert position now (at or past every commit, even
/// an asynchronous one not yet written out), as a version (`None` if it cannot be
/// read within the read timeout).
async fn primary_position(db: &Db) -> Option<u64> {
    let row = db
        .read_one(
            Consistency::Strong,
            "SELECT pg_catalog.pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await
        .ok()?;
    let text: String = row.value.try_get(0).ok()?;
    text.parse::<super::lsn::Lsn>().ok().map(|l| l.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::route::RouteHint;
    use crate::pg::{ConsistencyToken, Lsn};

    /// Only a hot key's `Any` read is sent past the lag budget: a token,
    /// a bound or `Strong` keeps its own routing, and a write is untouched.
    #[test]
    fn only_any_reads_of_hot_keys_get_the_hint() {
        let key: QueryKey = ("q".into(), "k".into(), "[]".into());
        let hinted = |mut q: Query| {
            QueryPolicy.on_hot_miss(&key, &mut q);
            q.route_hint
        };
        let sql = "SELECT 1";
        assert_eq!(
            hinted(Query::read(sql, Consistency::Any)),
            RouteHint::AnyHealthyReplica
        );
        for c in [
            Consistency::Strong,
            Consistency::BoundedStaleness(Duration::from_millis(100)),
            Consistency::ReadYourWrites(ConsistencyToken::new(Lsn(7))),
        ] {
            assert_eq!(hinted(Query::read(sql, c)), RouteHint::None, "{c:?}");
        }
        assert_eq!(hinted(Query::write("UPDATE t SET a = 1")), RouteHint::None);
    }
}
