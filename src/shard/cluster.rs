//! [`ShardedCluster`]: the shards, the slot map and its refresh.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::pg::{Cluster, Db};

use super::error::ShardError;
use super::map::{SlotMap, SlotRange};
use super::ownership;
use super::slot::{DEFAULT_SLOTS, MAX_SLOTS, ShardKey, slot_of};
use super::token::shard_id;

/// Called with the slots whose owner changed, each time this instance
/// learns of a move (see [`ShardedClusterBuilder::on_slots_moved`]).
pub type SlotsMoved = Arc<dyn Fn(&[u16]) + Send + Sync>;

/// One shard: a named cluster.
pub(crate) struct Shard {
    pub(crate) name: Arc<str>,
    /// `tower_scale_shard_read_all_failures_total` of this shard.
    pub(crate) read_all_failures: metrics::Counter,
    pub(crate) id: u64,
    pub(crate) cluster: Cluster,
    pub(crate) db: Db,
}

pub(crate) struct Inner {
    pub(crate) shards: Vec<Shard>,
    pub(crate) map: RwLock<Arc<SlotMap>>,
    /// The map the last change replaced: it routes a slot released and
    /// not yet claimed while a lease confirmed for it holds.
    pub(crate) previous_map: RwLock<Option<Arc<SlotMap>>>,
    /// One refresh at a time; callers that waited find the map newer.
    pub(crate) refreshing: tokio::sync::Mutex<()>,
    pub(crate) slots: u16,
    pub(crate) identity: u64,
    pub(crate) moved_wait: Duration,
    pub(crate) read_all_timeout: Duration,
    pub(crate) on_moved: Vec<SlotsMoved>,
    pub(crate) metrics: Metrics,
    /// The read leases on the shards (see `lease`).
    pub(crate) leases: super::lease::Leases,
    /// Fenced forms of the read statements seen, by their text.
    pub(crate) read_sql: RwLock<ReadSqlCache>,
    /// Cancelled when the last handle goes: stops the map listeners.
    pub(crate) closed: tokio_util::sync::CancellationToken,
    /// The declared sharded tables, as the shards' catalogs describe them.
    #[cfg_attr(not(feature = "reshard"), allow(dead_code))]
    pub(crate) tables: Vec<super::tables::TableSpec>,
    /// The tables named as staying on their shard.
    #[cfg_attr(not(feature = "reshard"), allow(dead_code))]
    pub(crate) local_tables: Vec<String>,
    /// The moves this instance runs (id, range): overlapping ones refused.
    #[cfg(feature = "reshard")]
    pub(crate) running_moves: std::sync::Mutex<Vec<(String, SlotRange)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// The sharded cluster's series, registered at build (label `cluster`:
/// [`ShardedClusterBuilder::name`]).
pub(crate) struct Metrics {
    pub(crate) moved: metrics::Counter,
    pub(crate) slots_moved: metrics::Counter,
    pub(crate) map_version: metrics::Gauge,
    /// Routed reads fenced in the read (no lease held on their shard).
    pub(crate) fenced_reads: metrics::Counter,
}

/// A read statement's two forms: fenced in the read (a lateral subquery
/// of the slot's ownership row) and plain (for a read under a lease: the
/// same columns, `tower_scale_owned` last, no second relation).
pub(crate) struct ReadForms {
    pub(crate) fenced: Arc<str>,
    pub(crate) plain: Arc<str>,
}

/// Statement text → (its parameter count, its forms).
pub(crate) type ReadSqlCache =
    std::collections::HashMap<Box<str>, (usize, Arc<ReadForms>), foldhash::fast::RandomState>;

/// At most this many fenced statements are kept (then the cache starts
/// over: SQL text built per request must not grow it for ever).
pub(crate) const MAX_READ_SQL: usize = 256;

/// Several [`Cluster`]s (shards), each a primary with its replicas, behind
/// one handle that routes by a shard key.
///
/// The key space is divided into slots ([`slot_of`]); a versioned
/// [`SlotMap`] gives each slot to one shard. The map lives in ownership
/// tables on the shards' primaries (see the module docs of
/// [`shard`](super)); every write is fenced by its slot's ownership row in
/// its own transaction, every read checks it in its own snapshot, so an
/// instance with a stale map gets [`ShardError::Moved`] from the old owner
/// instead of writing or reading there, refreshes and retries once.
///
/// ```no_run
/// use tower_scale::pg::{Cluster, NodeConfig};
/// use tower_scale::shard::{ShardConsistency, ShardedCluster};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let one = Cluster::builder().primary(NodeConfig::from_url("postgresql://app@db-1/app")?).build().await?;
/// let two = Cluster::builder().primary(NodeConfig::from_url("postgresql://app@db-2/app")?).build().await?;
/// let sharded = ShardedCluster::builder().shard("shard-1", one).shard("shard-2", two).build().await?;
/// let user = 42i64;
/// let w = sharded
///     .write(&user, "INSERT INTO users (id, name) VALUES ($1, $2)", &[&user, &"ada"])
///     .await?;
/// let r = sharded
///     .read(&user, &ShardConsistency::ReadYourWrites(w.token), "SELECT name FROM users WHERE id = $1", &[&user])
///     .await?;
/// assert_eq!(r.value[0].get::<_, String>(0), "ada");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ShardedCluster {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for ShardedCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedCluster")
            .field("shards", &self.shard_names())
            .field("map", &self.map())
            .finish()
    }
}

/// Configures a [`ShardedCluster`].
#[must_use]
pub struct ShardedClusterBuilder {
    shards: Vec<(Arc<str>, Cluster)>,
    slots: u16,
    initial: Option<Vec<(SlotRange, String)>>,
    identity: Option<String>,
    name: Option<String>,
    moved_wait: Duration,
    read_all_timeout: Option<Duration>,
    on_moved: Vec<SlotsMoved>,
    watch_map: bool,
    read_lease: Duration,
    lease_renewal: Option<Duration>,
    pub(super) declared: super::tables::Declared,
}

impl fmt::Debug for ShardedClusterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedClusterBuilder")
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.0).collect::<Vec<_>>(),
            )
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl ShardedClusterBuilder {
    /// Adds a shard named `name` (for example `shard-1`): the name is how
    /// the ownership tables, tokens and errors know it, so every instance
    /// must give each database the same name.
    pub fn shard(mut self, name: impl Into<Arc<str>>, cluster: Cluster) -> Self {
        self.shards.push((name.into(), cluster));
        self
    }

    /// The number of slots (default 4096, at most 16384): fixed for the
    /// life of the data (recorded on each shard; an instance with another
    /// count refuses to start).
    pub fn slots(mut self, n: u16) -> Self {
        self.slots = n;
        self
    }

    /// Who owns what on a first start (when no move has happened and some
    /// slot has no owner: also a first start that stopped half way):
    /// inclusive slot ranges and shard names covering every slot. Default:
    /// an even split in the order the shards were added. Instances starting
    /// together must agree on it. Ignored once the map is complete: the
    /// tables are the map.
    pub fn initial_map(mut self, ranges: Vec<(SlotRange, String)>) -> Self {
        self.initial = Some(ranges);
        self
    }

    /// The name tokens are bound to (default: the shard names, sorted).
    pub fn identity(mut self, name: impl Into<String>) -> Self {
        self.identity = Some(name.into());
        self
    }

    /// The name of the sharded cluster in its metrics (the `cluster`
    /// label of the `tower_scale_shard_*` series; default: the shard
    /// names, sorted, joined with `,`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How long a request refused with [`ShardError::Moved`] waits for
    /// the map to show the slot's new owner before its one retry (a move
    /// commits on the old owner, then on the new one, the read leases'
    /// hold later: keep it above that hold, 1.1 s with the default
    /// lease, or requests for a range being moved fail with
    /// [`ShardError::Moved`] or [`ShardError::Unowned`]; a warning is
    /// logged at build). Default 2 s.
    pub fn moved_wait(mut self, d: Duration) -> Self {
        self.moved_wait = d;
        self
    }

    /// The per-shard deadline of [`ShardedCluster::read_all`] (default
    /// 11 s: twice the default read timeout, the most a routed read with
    /// its retry takes, plus 1 s). Set it below that to bound a stalled
    /// shard sooner.
    pub fn read_all_timeout(mut self, d: Duration) -> Self {
        self.read_all_timeout = Some(d);
        self
    }

    /// Called with the slots whose owner changed whenever this instance
    /// learns of a move (a slot released and not yet claimed counts, and
    /// again when claimed; one moved away and back counts): invalidate
    /// cache entries tagged
    /// [`slot_tag`](super::slot_tag) there (without a version: the new
    /// owner's positions are another WAL's; an [`Invalidator`](crate::cache::Invalidator)
    /// also keeps out fills that began before it). It runs right after the
    /// new map is installed, while other refreshes wait: keep it quick (an
    /// invalidation is), never blocking.
    pub fn on_slots_moved(mut self, f: impl Fn(&[u16]) + Send + Sync + 'static) -> Self {
        self.on_moved.push(Arc::new(f));
        self
    }

    /// Listens for map announcements on every shard's primary (default:
    /// on; see [`CHANNEL`](super::CHANNEL)): a move made by another
    /// instance reaches this one's map, and its `on_slots_moved` hooks,
    /// within a notification's delay. Off, this instance learns of moves
    /// when a shard refuses one of its requests or a token was routed by a
    /// newer map.
    pub fn watch_map(mut self, on: bool) -> Self {
        self.watch_map = on;
        self
    }

    /// How long a confirmation of a shard's map lets this instance read
    /// it without the in-read fence (default 1 s; renewed every quarter
    /// of it, one small query per shard's primary; zero: every read
    /// fenced in the read). A move's new owner claims the range this long
    /// (plus 10%) after the old owner let go, so a read routed by a stale
    /// map still finds the range's current rows: requests for the range
    /// wait that much longer during a cutover (keep
    /// [`moved_wait`](Self::moved_wait) above it). The first instance to
    /// start records it on each shard; an instance never holds a longer
    /// lease than a shard records, and moves wait for the longest (at most
    /// 60 s). A database set up by an earlier release records 0 (no
    /// leases, since instances of that release run moves without the
    /// hold): once every instance runs this release, set
    /// `tower_scale_shard_map.lease_ms` on every shard and restart them.
    /// Lowering it: instances pick the shorter lease at their next
    /// renewal; start no move within one old lease of the change.
    ///
    /// Assumed: clock rates differ by less than 10%, and no machine's
    /// monotonic clock stops while real time passes (a suspended host).
    /// Copies made with [`begin_move`](super::ShardedCluster::begin_move)
    /// are deleted from the old owner only after the move's `commit`
    /// returned.
    pub fn read_lease(mut self, d: Duration) -> Self {
        self.read_lease = d;
        self
    }

    /// How often the read leases are renewed (default: every quarter of
    /// the lease). A renewal that finds a shard's version moved refreshes
    /// the map, so an instance also learns of a move this way (with
    /// [`watch_map`](Self::watch_map) off, or a notification lost). A
    /// period longer than the lease lets leases run out between renewals:
    /// reads are fenced in the read meanwhile.
    pub fn lease_renewal(mut self, every: Duration) -> Self {
        self.lease_renewal = Some(every);
        self
    }

    /// Checks the configuration, creates the ownership tables where
    /// missing, writes the initial map if no shard owns any slot, and
    /// reads the map.
    pub async fn build(self) -> Result<ShardedCluster, ShardError> {
        if self.shards.is_empty() {
            return Err(ShardError::Setup("no shards configured".into()));
        }
        if self.shards.len() >= usize::from(super::map::NO_OWNER) {
            return Err(ShardError::Setup("too many shards".into()));
        }
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return Err(ShardError::Setup(format!(
                "the slot count must be 1..={MAX_SLOTS}, got {}",
                self.slots
            )));
        }
        let mut names: Vec<&str> = self.shards.iter().map(|s| &*s.0).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ShardError::Setup("two shards have the same name".into()));
        }
        let identity = crate::pg::cluster_identity(
            &self
                .identity
                .clone()
                .unwrap_or_else(|| format!("tower-scale shards: {}", names.join(","))),
        );
        let read_all_timeout = self.read_all_timeout.unwrap_or(Duration::from_secs(11));
        let label = self.name.clone().unwrap_or_else(|| names.join(","));
        let metrics = Metrics {
            moved: metrics::counter!("tower_scale_shard_moved_total", "cluster" => label.clone()),
            slots_moved: metrics::counter!("tower_scale_shard_slots_moved_total", "cluster" => label.clone()),
            map_version: metrics::gauge!("tower_scale_shard_map_version", "cluster" => label.clone()),
            fenced_reads: metrics::counter!("tower_scale_shard_fenced_reads_total", "cluster" => label.clone()),
        };
        let shards: Vec<Shard> = self
            .shards
            .into_iter()
            .map(|(name, cluster)| Shard {
                read_all_failures: metrics::counter!(
                    "tower_scale_shard_read_all_failures_total",
                    "cluster" => label.clone(),
                    "shard" => name.to_string()
                ),
                id: shard_id(&name),
                db: cluster.db(),
                name,
                cluster,
            })
            .collect();
        let dbs: Vec<(Arc<str>, Db)> = shards
            .iter()
            .map(|s| (Arc::clone(&s.name), s.db.clone()))
            .collect();
        let tables = super::tables::describe_all(&dbs, &self.declared).await?;
        let names: Vec<Arc<str>> = shards.iter().map(|s| Arc::clone(&s.name)).collect();
        let empty = SlotMap::from_owned(0, self.slots, names, &[]);
        let shard_count = shards.len();
        let sharded = ShardedCluster {
            inner: Arc::new(Inner {
                shards,
                map: RwLock::new(Arc::new(empty)),
                previous_map: RwLock::new(None),
                refreshing: tokio::sync::Mutex::new(()),
                slots: self.slots,
                identity,
                moved_wait: self.moved_wait,
                read_all_timeout,
                on_moved: self.on_moved,
                metrics,
                leases: super::lease::Leases::new(shard_count, self.read_lease),
                read_sql: RwLock::new(ReadSqlCache::default()),
                closed: tokio_util::sync::CancellationToken::new(),
                tables,
                local_tables: self.declared.local,
                #[cfg(feature = "reshard")]
                running_moves: std::sync::Mutex::new(Vec::new()),
            }),
        };
        for shard in &sharded.inner.shards {
            let recorded =
                ownership::setup(&shard.db, &shard.name, self.slots, self.read_lease).await?;
            sharded.inner.leases.recorded(recorded);
        }
        let hold = sharded.inner.leases.hold();
        if self.moved_wait <= hold {
            tracing::warn!(
                moved_wait = ?self.moved_wait,
                ?hold,
                "the moved wait is not above a move's hold (the longest read lease a shard records, \
                 plus 10%): requests for a range being moved will fail with Moved or Unowned"
            );
        }
        // Claimed under the move lock, with the map read under it:
        // instances starting together (in whatever order their shards are
        // listed) agree; the first claims, the others find every slot owned.
        let (_, serial) = sharded.lock_moves().await?;
        let map = sharded.load().await?;
        // A first start, or one that stopped half way through writing the
        // initial map (no move has happened yet): claiming is idempotent.
        let unowned = (0..self.slots).any(|s| map.holder_index(s).is_none());
        if map.version() <= 1 && unowned {
            let initial = match self.initial {
                Some(ranges) => ranges,
                None => {
                    // By name, not by the order given: the same split
                    // whichever instance claims.
                    let mut names: Vec<&str> = sharded.shard_names();
                    names.sort_unstable();
                    SlotMap::even(self.slots, &names)
                        .ranges()
                        .into_iter()
                        .filter_map(|(r, o)| Some((r, o?.to_string())))
                        .collect()
                }
            };
            let mut covered = vec![false; usize::from(self.slots)];
            for (range, name) in &initial {
                let index = sharded.shard_index(name)?;
                if range.is_empty() || range.last >= self.slots {
                    return Err(ShardError::Setup(format!(
                        "initial range {range} is outside 0..{}",
                        self.slots
                    )));
                }
                for s in range.slots() {
                    covered[usize::from(s)] = true;
                }
                let shard = &sharded.inner.shards[index];
                ownership::claim(&shard.db, &shard.name, *range, 1).await?;
            }
            if let Some(s) = covered.iter().position(|c| !c) {
                return Err(ShardError::Setup(format!(
                    "the initial map leaves slot {s} without an owner"
                )));
            }
        }
        // It wrote nothing: however it ends, the lock goes with it.
        let _ = serial.rollback().await;
        sharded.refresh().await?;
        if self.watch_map {
            super::watch::start(&sharded, &sharded.inner.closed);
        }
        super::lease::start(&sharded, self.lease_renewal, &sharded.inner.closed);
        Ok(sharded)
    }
}

impl ShardedCluster {
    /// Starts configuring a sharded cluster.
    pub fn builder() -> ShardedClusterBuilder {
        ShardedClusterBuilder {
            shards: Vec::new(),
            slots: DEFAULT_SLOTS,
            initial: None,
            identity: None,
            name: None,
            moved_wait: Duration::from_secs(2),
            read_all_timeout: None,
            on_moved: Vec::new(),
            watch_map: true,
            read_lease: Duration::from_secs(1),
            lease_renewal: None,
            declared: super::tables::Declared::default(),
        }
    }

    /// The slot of `key` (a hash and a modulo: see [`slot_of`]).
    pub fn slot<K: ShardKey + ?Sized>(&self, key: &K) -> u16 {
        slot_of(key, self.inner.slots)
    }

    /// The name of the shard `key` routes to by this instance's map.
    pub fn shard_for<K: ShardKey + ?Sized>(&self, key: &K) -> Option<Arc<str>> {
        let map = self.map();
        let index = map.owner_index(self.slot(key))?;
        Some(Arc::clone(&self.inner.shards[index].name))
    }

    /// This instance's map.
    pub fn map(&self) -> Arc<SlotMap> {
        Arc::clone(&crate::sync::read(&self.inner.map))
    }

    /// The shard names, as configured.
    pub fn shard_names(&self) -> Vec<&str> {
        self.inner.shards.iter().map(|s| &*s.name).collect()
    }

    /// The cluster of shard `name`.
    pub fn shard(&self, name: &str) -> Result<&Cluster, ShardError> {
        Ok(&self.inner.shards[self.shard_index(name)?].cluster)
    }

    /// The identity [`ShardedTokenCodec`](super::ShardedTokenCodec)s of
    /// this cluster are bound to.
    pub fn identity(&self) -> u64 {
        self.inner.identity
    }

    pub(crate) fn shard_index(&self, name: &str) -> Result<usize, ShardError> {
        self.inner
            .shards
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| ShardError::UnknownShard(name.chars().take(64).collect()))
    }

    /// Refuses an empty range, or one past the key space.
    pub(crate) fn check_range(&self, range: SlotRange) -> Result<(), ShardError> {
        if range.is_empty() || range.last >= self.inner.slots {
            return Err(ShardError::SlotOutOfRange {
                slot: u32::from(range.last.max(range.first)),
                slots: self.inner.slots,
            });
        }
        Ok(())
    }
}
