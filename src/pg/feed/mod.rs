//! The change feed (feature `change-feed`): every committed write on the
//! primary, by any writer (another service, a migration, `psql`), read
//! from PostgreSQL's logical replication stream and turned into
//! invalidations of the caches it feeds.
//!
//! ```no_run
//! # async fn demo(cluster: tower_scale::pg::Cluster, cache: tower_scale::pg::DbCache) -> Result<(), Box<dyn std::error::Error>> {
//! use tower_scale::pg::feed::ChangeFeed;
//!
//! let feed = ChangeFeed::builder(&cluster)
//!     .tables(["users", "orders"])
//!     .invalidates(cache.invalidator().clone())
//!     .start()
//!     .await?;
//! // From here on an `UPDATE users SET ... WHERE id = 7` from anywhere
//! // invalidates the tags `users` and `users:7` (see [`tags`]).
//! println!("{:?}", feed.status());
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! 1. **Every committed change to a published table invalidates its tags
//!    at its commit position** ([`tags`] spells them): the end of its
//!    commit record, the position a replica must have replayed to show it.
//!    So a fill read below it (a lagging replica) is never stored, and an
//!    entry stamped at or above it (a read-your-writes token) still is.
//! 2. **Nothing is lost.** The slot's confirmed position moves past a
//!    transaction only after its invalidations were applied to every cache
//!    the feed feeds and published to the other instances through their
//!    shared tier ([`Invalidator::published`]). A consumer that dies
//!    replays, on its successor, everything it had not confirmed.
//! 3. **A gap is never silent.** When the stream cannot resume where it
//!    was — the slot is missing (first start, dropped, or a newly promoted
//!    primary: PostgreSQL 15 has no failover slots, so **every promotion
//!    is a slot loss**), its WAL was removed (`max_slot_wal_keep_size`), or
//!    the server is another one than before — the feed makes a new slot
//!    and invalidates everything in every cache it feeds (L1 on every
//!    instance and L2), at the new slot's starting position, before it
//!    streams.
//! 4. **It never makes another writer's statement fail.** PostgreSQL
//!    refuses UPDATE and DELETE on a published table without a replica
//!    identity; such tables (and unlogged ones) are left out of the
//!    publication, reported in [`FeedStatus::left_out`], and invalidated by
//!    TTL only, until they get a primary key or `REPLICA IDENTITY`.
//! 5. **One consumer per slot.** With a shared tier the feed uses one
//!    permanent slot and a lease, a PostgreSQL advisory lock taken on the
//!    replication session itself: it lives exactly as long as the stream,
//!    is released by the server the moment the holder's connection dies,
//!    and moves with the primary. The other instances stand by and take
//!    over within about [`ChangeFeedBuilder::lease_poll`] after the holder
//!    goes; they receive its invalidations through the fan-out meanwhile.
//!    Without a shared tier every instance has its own temporary slot, and
//!    every reconnect is a slot loss (3).
//!
//! # What to know
//!
//! - The primary needs `wal_level = logical` (a restart) and a role with
//!   `REPLICATION`; [`ChangeFeedBuilder::start`] says which is missing.
//! - A permanent slot holds back WAL on the primary while no consumer
//!   reads it. Bound it with `max_slot_wal_keep_size` (the slot is then
//!   lost, rule 3, instead of the disk filling); the metric
//!   `tower_scale_feed_bytes_behind` shows how far behind it is. Drop a
//!   slot you no longer use with [`ChangeFeed::drop_slot`].
//! - Relation (schema) messages arrive only before the next change to
//!   that table, not at the DDL itself: a schema change that rewrites rows
//!   without changing them logically (`ALTER TABLE ... TYPE`) invalidates
//!   the table only when the table next changes. Every relation message is
//!   treated as a change to every row of the table.
//! - Tables are published when the feed connects: with
//!   [`Tables::All`], a table created later joins at the next reconnect.
//! - A cache fed through a Redis tier should keep that tier's
//!   `max_queued_invalidations` above 1,000: the feed stops reading while
//!   1,000 are waiting, and a smaller queue collapses into "invalidate
//!   everything" first.
//! - A new slot's flush is written into the WAL as a logical message
//!   naming the slot (prefix `tower-scale-feed:flush`); while it is not yet
//!   written, the publication's comment says a flush is pending, so a
//!   holder that died in between leaves the flush to the next one.
//! - Give each service its own slot and publication names: two services
//!   on the same names share one lease and rewrite each other's table list.
//! - A holder that stalls (SIGSTOP, a frozen VM) keeps the lease until its
//!   replication session times out ([`ChangeFeedBuilder::stall_timeout`],
//!   5 s); meanwhile no invalidation from the feed reaches anyone.
//! - With synchronous replication, a commit is decoded (and invalidated)
//!   once it is flushed on the primary, before the standby confirms it and
//!   it becomes visible there: a read on the primary in that window sees
//!   the old row. Such reads are stamped with the primary's position as the
//!   monitor last saw it, which is normally below the commit; keep
//!   `probe_interval` short or TTLs bounded for data written that way.
//! - Keys are written in PostgreSQL's text output with `DateStyle = ISO`
//!   and `TimeZone = UTC` on the replication session.
//! - The replication session does not use TLS yet: a node configured
//!   with `sslmode=require` is refused ([`FeedError::Tls`]).

mod apply;
pub(crate) mod pgoutput;
mod run;
mod setup;
mod sink;
mod stream;
pub mod tags;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cluster::Cluster;
use super::lsn::Lsn;
use crate::cache::{Invalidator, Tag};
#[cfg(feature = "reshard")]
pub(crate) use run::primary_replication_config;
use sink::Sink;
pub use tags::Change;

/// Which tables the feed publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tables {
    /// Every ordinary and partitioned table outside the system schemas
    /// (tables without a replica identity are left out).
    All,
    /// These tables (`name` or `schema.name`, resolved with the session's
    /// `search_path`).
    Named(Vec<String>),
}

/// Which slot the feed reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotKind {
    /// Permanent with a lease when a cache it feeds has a shared tier,
    /// temporary otherwise.
    Auto,
    /// One permanent slot for every instance, read by the lease holder.
    Permanent,
    /// A temporary slot of this instance's own (gone with its session).
    Temporary,
}

/// Why the feed cannot run.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    /// The primary's `wal_level` is not `logical`.
    #[error(
        "the change feed needs wal_level = logical on the primary (it is {0}); set it in postgresql.conf and restart the server"
    )]
    WalLevel(String),
    /// No primary is known.
    #[error("no primary to read the change feed from")]
    NoPrimary,
    /// The node asks for TLS, which the replication session does not do.
    #[error(
        "the change feed's replication session does not support TLS yet (the node has sslmode=require)"
    )]
    Tls,
    /// A named table does not exist.
    #[error("the change feed cannot publish {0:?}: no such table")]
    UnknownTable(String),
    /// The slot name is taken by a slot of another plugin or database.
    #[error("the replication slot {0:?} exists for another plugin or database")]
    SlotTaken(String),
    /// A setting is out of range.
    #[error("change feed setting {field}: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The server did not answer in time.
    #[error("the primary did not answer within {0:?}")]
    Timeout(Duration),
    /// The server refused (connection, authentication, a statement).
    #[error("the primary refused: {0}")]
    Server(String),
    /// The stream carried something that does not parse.
    #[error("{0}")]
    Protocol(String),
}

/// What the feed is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedState {
    /// Connecting and setting up.
    Starting,
    /// Streaming changes into the caches.
    Streaming,
    /// Another instance holds the lease; this one waits to take over.
    Standby,
    /// The stream broke; reconnecting.
    Reconnecting,
    /// Shut down.
    Stopped,
}

/// A snapshot of the feed ([`ChangeFeed::status`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FeedStatus {
    /// What it is doing.
    pub state: FeedState,
    /// The slot it reads (a temporary slot's own name).
    pub slot: String,
    /// The node it streams from.
    pub node: Option<String>,
    /// The commit position of the last transaction applied to the caches.
    pub applied: Option<Lsn>,
    /// The position confirmed to the slot (applied and published). The
    /// server hears of it within a second, and before a
    /// [`shutdown`](ChangeFeed::shutdown) lets the session go (at most 3 s).
    pub confirmed: Option<Lsn>,
    /// Transactions applied.
    pub transactions: u64,
    /// Row changes applied.
    pub rows: u64,
    /// Times every cache was flushed because the stream could not resume.
    pub flushes: u64,
    /// Times this instance took the feed (lease or temporary slot).
    pub takeovers: u64,
    /// Tables left out of the publication, with the reason.
    pub left_out: Vec<(String, String)>,
    /// The last error, if the feed is not streaming because of it.
    pub last_error: Option<String>,
}

/// Maps a change to the tags to invalidate.
type TagMap = dyn Fn(Change<'_>) -> Vec<Tag> + Send + Sync;

/// Configures a [`ChangeFeed`].
#[must_use]
pub struct ChangeFeedBuilder {
    cluster: Cluster,
    tables: Tables,
    publication: String,
    slot: String,
    slot_kind: SlotKind,
    sinks: Vec<Arc<dyn Sink>>,
    map: Option<Arc<TagMap>>,
    row_limit: usize,
    lease_poll: Duration,
    timeout: Duration,
    slot_create_timeout: Duration,
    publish_timeout: Duration,
    stall_timeout: Duration,
}

impl fmt::Debug for ChangeFeedBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeFeedBuilder")
            .field("tables", &self.tables)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("slot_kind", &self.slot_kind)
            .field("caches", &self.sinks.len())
            .field("row_limit", &self.row_limit)
            .finish_non_exhaustive()
    }
}

/// Postgres' own rule for slot names, and ours for the publication.
fn valid_name(field: &'static str, name: &str, max: usize) -> Result<(), FeedError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FeedError::Config {
            field,
            reason: format!("{name:?}: 1 to {max} characters of a-z, 0-9 and _"),
        })
    }
}

impl ChangeFeedBuilder {
    /// Publishes these tables (`name` or `schema.name`) only; default:
    /// [`Tables::All`].
    pub fn tables<I, S>(mut self, tables: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tables = Tables::Named(tables.into_iter().map(Into::into).collect());
        self
    }

    /// The publication's name (default `tower_scale_feed`; `a-z`, `0-9`,
    /// `_`).
    pub fn publication(mut self, name: impl Into<String>) -> Self {
        self.publication = name.into();
        self
    }

    /// The slot's name (default `tower_scale_feed`; `a-z`, `0-9`, `_`, at
    /// most 50 characters: a temporary slot adds a suffix).
    pub fn slot(mut self, name: impl Into<String>) -> Self {
        self.slot = name.into();
        self
    }

    /// Permanent (with a lease) or temporary (default [`SlotKind::Auto`]).
    pub fn slot_kind(mut self, kind: SlotKind) -> Self {
        self.slot_kind = kind;
        self
    }

    /// Feeds this cache (repeat for several; any key type).
    pub fn invalidates<K: Send + Sync + 'static>(mut self, invalidator: Invalidator<K>) -> Self {
        self.sinks.push(Arc::new(invalidator));
        self
    }

    /// Maps each change to the tags to invalidate (default
    /// [`Change::default_tag`]): for example a service that tags its
    /// entries `user:{id}` maps `Change::Row { table: "users", key }` to
    /// `user:{key}`. A map replaces the default tags, and a change it drops
    /// invalidates nothing: a cache that also caches reads by their tables
    /// (`Query::cache_by_tables`, `DbCacheBuilder::cache_reads`) relies on
    /// `{table}`, `{table}:{key}` and `{table}:*`, so return
    /// `change.default_tag()` along with your own tags for it; dropping
    /// [`Change::Whole`] leaves row entries alive through `TRUNCATE`.
    pub fn map_tags(
        mut self,
        map: impl Fn(Change<'_>) -> Vec<Tag> + Send + Sync + 'static,
    ) -> Self {
        self.map = Some(Arc::new(map));
        self
    }

    /// Rows of one table tracked one by one in a transaction (default
    /// 1,000); a transaction that changes more invalidates the whole table
    /// instead, so memory stays bounded whatever its size.
    pub fn row_limit(mut self, rows: usize) -> Self {
        self.row_limit = rows;
        self
    }

    /// How often an instance on standby tries to take the lease (default
    /// 500 ms): the takeover time after the holder dies.
    pub fn lease_poll(mut self, every: Duration) -> Self {
        self.lease_poll = every;
        self
    }

    /// The deadline of each setup statement and of the connection (default
    /// 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The deadline for creating a slot, which waits for the transactions
    /// running on the primary to end (default 60 s).
    pub fn slot_create_timeout(mut self, timeout: Duration) -> Self {
        self.slot_create_timeout = timeout;
        self
    }

    /// The replication session's `wal_sender_timeout` (default 5 s): a
    /// holder that stops answering (stalled, its host gone) loses its
    /// session, and with it the lease, after this long; the client answers
    /// every second while healthy. So a stalled holder is replaced within
    /// about this plus [`lease_poll`](Self::lease_poll).
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// How long a confirmation waits for the shared tier before it is
    /// tried again (default 5 s). Nothing is confirmed past an
    /// invalidation the tier has not published.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Checks the primary (`wal_level`, the role, the tables), sets up the
    /// publication, and starts the feed in the background. Errors here are
    /// the ones a restart would not fix; later failures (a lost
    /// connection, a failover) are retried by the feed itself.
    pub async fn start(self) -> Result<ChangeFeed, FeedError> {
        valid_name("publication", &self.publication, 63)?;
        valid_name("slot", &self.slot, 50)?;
        if self.lease_poll.is_zero()
            || self.timeout.is_zero()
            || self.publish_timeout.is_zero()
            || self.stall_timeout < Duration::from_secs(2)
        {
            return Err(FeedError::Config {
                field: "timeouts",
                reason: "must be above zero (the stall timeout at least 2 s)".into(),
            });
        }
        let shared = Arc::new(run::Shared::new(self));
        run::preflight(&shared).await?;
        let stop = shared.stop.clone();
        tokio::spawn(run::run(Arc::clone(&shared)));
        Ok(ChangeFeed {
            shared,
            _stop: Arc::new(stop.drop_guard()),
        })
    }
}

/// A running change feed; stops when the last clone is dropped or on
/// [`shutdown`](Self::shutdown). See the [module docs](self).
#[derive(Clone)]
pub struct ChangeFeed {
    shared: Arc<run::Shared>,
    _stop: Arc<tokio_util::sync::DropGuard>,
}

impl fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("status", &self.status())
            .finish()
    }
}

impl ChangeFeed {
    /// Starts configuring a feed from `cluster`'s primary.
    pub fn builder(cluster: &Cluster) -> ChangeFeedBuilder {
        ChangeFeedBuilder {
            cluster: cluster.clone(),
            tables: Tables::All,
            publication: "tower_scale_feed".into(),
            slot: "tower_scale_feed".into(),
            slot_kind: SlotKind::Auto,
            sinks: Vec::new(),
            map: None,
            row_limit: 1_000,
            lease_poll: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
            slot_create_timeout: Duration::from_secs(60),
            publish_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(5),
        }
    }

    /// What the feed is doing now.
    pub fn status(&self) -> FeedStatus {
        crate::sync::lock(&self.shared.status).clone()
    }

    /// Waits until this instance streams (it holds the feed), for at most
    /// `within`; true if it does.
    pub async fn streaming(&self, within: Duration) -> bool {
        self.wait(within, |s| s.state == FeedState::Streaming).await
    }

    /// Waits until the feed applied every transaction that committed at or
    /// below `lsn` (for example the primary's `pg_current_wal_lsn()` after
    /// a write), for at most `within`; true if it did. Only the instance
    /// that streams gets there.
    pub async fn applied_through(&self, lsn: Lsn, within: Duration) -> bool {
        self.wait(within, |s| s.applied.is_some_and(|a| a >= lsn))
            .await
    }

    async fn wait(&self, within: Duration, f: impl Fn(&FeedStatus) -> bool) -> bool {
        let mut changes = self.shared.changed.subscribe();
        tokio::time::timeout(within, async {
            loop {
                if f(&self.status()) {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Stops the feed (the slot stays, for the next holder).
    pub fn shutdown(&self) {
        self.shared.cancel_all();
    }

    /// Stops the feed and drops its permanent slot, so the primary stops
    /// keeping WAL for it (decommissioning; the next start is a slot loss).
    pub async fn drop_slot(&self) -> Result<(), FeedError> {
        self.shutdown();
        run::drop_slot(&self.shared).await
    }
}

/// The status a feed starts with.
fn initial_status(slot: &str) -> FeedStatus {
    FeedStatus {
        state: FeedState::Starting,
        slot: slot.to_owned(),
        node: None,
        applied: None,
        confirmed: None,
        transactions: 0,
        rows: 0,
        flushes: 0,
        takeovers: 0,
        left_out: Vec::new(),
        last_error: None,
    }
}

/// The shared state's status cell.
type StatusCell = Mutex<FeedStatus>;
