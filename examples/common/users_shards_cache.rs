//! The sharded users service's cache (`users_shards.rs`): the users
//! cache of the single-cluster service, over a `ShardedCluster`.
//!
//! - Keyed by id with no shard part: a key's slot never changes. Entries
//!   are stamped with the LSN of the shard that answered; a request with
//!   a token skips entries stamped below that shard's position in it
//!   (positions of different shards are never compared: an id lives on
//!   one shard, and when its slot moves its entries go, below).
//! - Tagged `user:{id}` (what a write and the welcome worker invalidate
//!   at their commit position), `{shard}:users:*` (what a shard's change
//!   feed invalidates on `TRUNCATE` or a schema change, in that shard's
//!   WAL numbering) and the slot's tag ([`slot_tag`], what this instance
//!   invalidates when it learns that a slot moved).
//! - Hot keys: the cache tracks its hottest ids; a miss of one under `Any`
//!   reads with [`ShardedCluster::read_hot`] (any healthy replica of its
//!   shard, also one lagging past the budget, the primary only when none
//!   qualifies), and single-flight coalesces its misses. The ranks are
//!   the `tower_scale_cache_hot_key_hits{cache="users",rank}` gauges.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tower_scale::cache::{
    Cache, CacheLayer, CachePolicy, Invalidator, QuickStore, Storable, Windows,
};
use tower_scale::pg::Consistency;
use tower_scale::shard::{ShardConsistency, ShardError, ShardedCluster, shard_id, slot_tag};

use super::users::{BoxError, USER_BY_ID, User, UserRow};

/// A cached read of one user: the id, the request's consistency, and
/// whether the cache found the id hot (set by the policy on a miss).
pub struct ShardUserRead {
    pub id: i64,
    pub consistency: ShardConsistency,
    pub hot: bool,
}

/// The tag of every user entry a shard's change feed invalidates at
/// once (`TRUNCATE`, a schema change): per shard, since each shard
/// numbers its WAL on its own.
pub fn shard_whole_tag(shard: &str) -> String {
    format!("{shard}:users:*")
}

/// Keyed by id; the version a request needs is its token's position on
/// the id's shard.
#[derive(Clone)]
pub struct ShardUserPolicy {
    cluster: ShardedCluster,
}

impl CachePolicy<ShardUserRead, Arc<UserRow<User>>> for ShardUserPolicy {
    type Key = i64;

    fn key(&self, req: &ShardUserRead) -> Option<i64> {
        Some(req.id)
    }

    fn min_version(&self, req: &ShardUserRead) -> Option<u64> {
        match &req.consistency {
            ShardConsistency::Any => None,
            ShardConsistency::ReadYourWrites(token) => {
                // No owner in the map (a move in progress): past every
                // entry, so the read goes to the shards.
                let Some(shard) = self.cluster.shard_for(&req.id) else {
                    return Some(u64::MAX);
                };
                match token.for_shard(shard_id(&shard)) {
                    Consistency::ReadYourWrites(t) => Some(t.lsn().0),
                    Consistency::Any => None,
                    _ => Some(u64::MAX),
                }
            }
            // Anything stricter than a token reads the shard.
            _ => Some(u64::MAX),
        }
    }

    fn storable(&self, id: &i64, row: &Arc<UserRow<User>>, d: &Windows) -> Option<Storable> {
        let shard = row.served_by.split('/').next().unwrap_or_default();
        Some(
            Storable::new(*d)
                .tag(format!("user:{id}"))
                .tag(shard_whole_tag(shard))
                .tag(slot_tag(self.cluster.slot(id)))
                .version(row.lsn),
        )
    }

    fn on_hot_miss(&self, _key: &i64, req: &mut ShardUserRead) {
        if req.consistency == ShardConsistency::Any {
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

/// The users cache of the sharded service.
pub type ShardUserCache =
    Cache<ShardLoader, ShardUserPolicy, QuickStore<i64, Arc<UserRow<User>>, ShardError>>;

/// How many of the hottest ids the cache tracks, and the ranks that count
/// as hot for routing.
pub const HOT_KEYS: usize = 64;
pub const HOT_RANK: usize = 8;

/// Where the cluster's move notifications find the cache: the cluster is
/// built before the cache, so its `on_slots_moved` hook reads this.
#[derive(Clone, Default)]
pub struct MovedSlots(Arc<OnceLock<Invalidator<i64>>>);

impl MovedSlots {
    /// The hook for `ShardedClusterBuilder::on_slots_moved`.
    pub fn hook(&self) -> impl Fn(&[u16]) + Send + Sync + 'static {
        let cell = Arc::clone(&self.0);
        move |slots: &[u16]| {
            if let Some(invalidator) = cell.get() {
                for slot in slots {
                    invalidator.invalidate_tag(slot_tag(*slot));
                }
            }
        }
    }
}

/// The cache over `cluster`, its invalidator, wired to `moved`.
pub fn build(
    cluster: &ShardedCluster,
    moved: &MovedSlots,
) -> Result<(ShardUserCache, Invalidator<i64>), BoxError> {
    let layer = CacheLayer::builder(ShardUserPolicy {
        cluster: cluster.clone(),
    })
    .name("users")
    .time_to_live(Duration::from_secs(60))
    .max_entries(100_000)
    .track_hot_keys(HOT_KEYS)
    .hot_key_rank(HOT_RANK)
    .build_quick()?;
    let invalidator = layer.invalidator();
    // Set once, here; a second cache over the same hook keeps the first.
    let _ = moved.0.set(invalidator.clone());
    let cache = tower::Layer::layer(
        &layer,
        ShardLoader {
            cluster: cluster.clone(),
        },
    );
    Ok((cache, invalidator))
}
