//! The sharded users service's cache (`users_shards.rs`): the users
//! cache of the single-cluster service, one per shard.
//!
//! - One cache per shard, so each compares positions of one WAL only:
//!   entries are stamped with their shard's LSN, a token's position on
//!   that shard is the version a request needs, and what a shard's change
//!   feed invalidates at once (a reconnect, `TRUNCATE`) is that shard's
//!   entries alone. A read goes to the cache of the shard the id's slot
//!   maps to; with no owner in the map (a move in progress) it reads the
//!   shards without a cache.
//! - A token routed by a newer map than this instance's skips the caches:
//!   the read refreshes the map first, and the move's hook drops the moved
//!   slots' entries (a slot moved away and back counts as moved).
//! - Tagged `user:{id}` (what a write and the welcome worker invalidate at
//!   their commit position), `users:*` (what the change feed invalidates
//!   on `TRUNCATE` or a schema change) and the slot's tag ([`slot_tag`],
//!   dropped in every cache when this instance learns that a slot moved).
//! - Hot keys: each cache tracks its hottest ids; a miss of one that is
//!   `Any` on its shard reads with [`ShardedCluster::read_hot`] (any
//!   healthy replica of the shard, also one lagging past the budget, up to
//!   `hot_lag_max`; the primary only when none qualifies), and
//!   single-flight coalesces its misses. The ranks are the
//!   `tower_scale_cache_hot_key_hits{cache="users/NAME",rank}` gauges.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tower_scale::cache::{
    Cache, CacheLayer, CachePolicy, HotKey, Invalidator, QuickStore, Storable, Windows,
};
use tower_scale::pg::Consistency;
use tower_scale::shard::{
    ShardConsistency, ShardError, ShardedCluster, WeakShardedCluster, shard_id, slot_of, slot_tag,
};

use super::users::{BoxError, USER_BY_ID, USERS_WHOLE, User, UserRow};

/// A cached read of one user: the id, the request's consistency, and
/// whether the cache found the id hot (set by the policy on a miss).
pub struct ShardUserRead {
    pub id: i64,
    pub consistency: ShardConsistency,
    pub hot: bool,
}

/// Keyed by id; the version a request needs is its token's position on
/// this cache's shard. It holds the cluster weakly: the cluster's move
/// hook holds this cache's invalidator, and so the policy; a strong
/// handle would keep the cluster (its listeners, its pools) alive for
/// ever.
#[derive(Clone)]
pub struct ShardUserPolicy {
    cluster: WeakShardedCluster,
    shard: u64,
    slots: u16,
}

impl CachePolicy<ShardUserRead, Arc<UserRow<User>>> for ShardUserPolicy {
    type Key = i64;

    fn key(&self, req: &ShardUserRead) -> Option<i64> {
        Some(req.id)
    }

    fn min_version(&self, req: &ShardUserRead) -> Option<u64> {
        if let ShardConsistency::ReadYourWrites(token) = &req.consistency
            && self
                .cluster
                .upgrade()
                .is_none_or(|c| token.map_version() > c.map().version())
        {
            // Routed by a newer map: past every entry, so the read goes
            // to the shards (and refreshes this instance's map).
            return Some(u64::MAX);
        }
        match req.consistency.on_shard(self.shard) {
            Consistency::Any => None,
            Consistency::ReadYourWrites(t) => Some(t.lsn().0),
            // Anything stricter than a token reads the shard.
            _ => Some(u64::MAX),
        }
    }

    fn storable(&self, id: &i64, row: &Arc<UserRow<User>>, d: &Windows) -> Option<Storable> {
        Some(
            Storable::new(*d)
                .tag(format!("user:{id}"))
                .tag(USERS_WHOLE)
                .tag(slot_tag(slot_of(id, self.slots)))
                .version(row.lsn),
        )
    }

    fn on_hot_miss(&self, _key: &i64, req: &mut ShardUserRead) {
        // `Any` on this shard: no token, or one that wrote elsewhere.
        if req.consistency.on_shard(self.shard) == Consistency::Any {
            req.hot = true;
        }
    }
}

/// The loader: one fenced read on the id's shard; `served_by` is
/// `NAME/node`.
#[derive(Clone)]
pub struct ShardLoader {
    cluster: ShardedCluster,
}

type Loading = Pin<Box<dyn Future<Output = Result<Arc<UserRow<User>>, ShardError>> + Send>>;

impl tower::Service<ShardUserRead> for ShardLoader {
    type Response = Arc<UserRow<User>>;
    type Error = ShardError;
    type Future = Loading;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ShardError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ShardUserRead) -> Loading {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            let id = req.id;
            let r = if req.hot {
                cluster.read_hot(&id, USER_BY_ID, &[&id]).await?
            } else {
                cluster
                    .read(&id, &req.consistency, USER_BY_ID, &[&id])
                    .await?
            };
            let row = match r.value.first() {
                Some(row) => Some(
                    User::from_row(row)
                        .map_err(|e| ShardError::Setup(format!("{}: a users row: {e}", r.shard)))?,
                ),
                None => None,
            };
            Ok(Arc::new(UserRow {
                row,
                served_by: Arc::from(format!("{}/{}", r.shard, r.served_by)),
                lsn: r.lsn.0,
                taken: AtomicBool::new(false),
            }))
        })
    }
}

/// One shard's users cache.
pub type ShardUserCache =
    Cache<ShardLoader, ShardUserPolicy, QuickStore<i64, Arc<UserRow<User>>, ShardError>>;

/// How many of the hottest ids each cache tracks, and the ranks that
/// count as hot for routing.
pub const HOT_KEYS: usize = 64;
pub const HOT_RANK: usize = 8;

/// The users caches, one per shard in the shards' order, and their
/// invalidators.
pub struct ShardCaches {
    cluster: ShardedCluster,
    shards: Vec<(Arc<str>, ShardUserCache, Invalidator<i64>)>,
    loader: ShardLoader,
}

impl ShardCaches {
    /// The cache of the shard `id`'s slot maps to in this instance's map
    /// (`None`: no owner, a move in progress).
    pub fn for_id(&self, id: i64) -> Option<&ShardUserCache> {
        let shard = self.cluster.shard_for(&id)?;
        self.shards
            .iter()
            .find(|(name, _, _)| *name == shard)
            .map(|(_, cache, _)| cache)
    }

    /// The loader without a cache (for reads with no owner in the map).
    pub fn uncached(&self) -> ShardLoader {
        self.loader.clone()
    }

    /// Shard `shard`'s invalidator.
    pub fn invalidator(&self, shard: &str) -> Option<&Invalidator<i64>> {
        self.shards
            .iter()
            .find(|(name, _, _)| **name == *shard)
            .map(|(_, _, i)| i)
    }

    /// Drops user `id`'s entries in every cache, now (a write whose
    /// position is unknown, or whose shard is).
    pub fn forget(&self, id: i64) {
        for (_, _, invalidator) in &self.shards {
            invalidator.invalidate_tag(format!("user:{id}"));
        }
    }

    /// The hottest ids of every shard's cache, hottest first.
    pub fn hot_keys(&self, k: usize) -> Vec<HotKey<i64>> {
        let mut all: Vec<HotKey<i64>> = self
            .shards
            .iter()
            .flat_map(|(_, cache, _)| cache.hot_keys(k))
            .collect();
        all.sort_by_key(|k| std::cmp::Reverse(k.reads));
        all.truncate(k);
        all
    }
}

/// Where the cluster's move notifications find the caches: the cluster is
/// built before them, so its `on_slots_moved` hook reads this.
#[derive(Clone, Default)]
pub struct MovedSlots(Arc<OnceLock<Vec<Invalidator<i64>>>>);

impl MovedSlots {
    /// The hook for `ShardedClusterBuilder::on_slots_moved`: the moved
    /// slots' entries go from every shard's cache.
    pub fn hook(&self) -> impl Fn(&[u16]) + Send + Sync + 'static {
        let cell = Arc::clone(&self.0);
        move |slots: &[u16]| {
            for invalidator in cell.get().into_iter().flatten() {
                for slot in slots {
                    invalidator.invalidate_tag(slot_tag(*slot));
                }
            }
        }
    }
}

/// A cache per shard of `cluster`, wired to `moved`.
pub fn build(cluster: &ShardedCluster, moved: &MovedSlots) -> Result<ShardCaches, BoxError> {
    let loader = ShardLoader {
        cluster: cluster.clone(),
    };
    let mut shards = Vec::new();
    for name in cluster.shard_names() {
        let layer = CacheLayer::builder(ShardUserPolicy {
            cluster: cluster.downgrade(),
            shard: shard_id(name),
            slots: cluster.map().slot_count(),
        })
        .name(format!("users/{name}"))
        .time_to_live(Duration::from_secs(60))
        .max_entries(100_000)
        .track_hot_keys(HOT_KEYS)
        .hot_key_rank(HOT_RANK)
        .build_quick()?;
        let invalidator = layer.invalidator();
        let cache = tower::Layer::layer(&layer, loader.clone());
        shards.push((Arc::<str>::from(name), cache, invalidator));
    }
    // Set once, here; a second set of caches over the same hook keeps
    // the first's.
    let _ = moved
        .0
        .set(shards.iter().map(|(_, _, i)| i.clone()).collect());
    Ok(ShardCaches {
        cluster: cluster.clone(),
        shards,
        loader,
    })
}
