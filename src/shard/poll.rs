//! Learning of moves without a request: the shards' map versions polled,
//! the map refreshed when one is newer (so [`on_slots_moved`] fires on
//! every instance, within the interval of a move's commit).
//!
//! [`on_slots_moved`]: ShardedClusterBuilder::on_slots_moved

use std::sync::Weak;
use std::time::Duration;

use crate::pg::Consistency;

use super::cluster::{Inner, ShardedCluster, ShardedClusterBuilder};

impl ShardedClusterBuilder {
    /// Every `every`, read each shard's map version (one small query on
    /// each primary) and refresh the map when one is newer than this
    /// instance's: other instances see a move (and invalidate the moved
    /// slots' cache entries through
    /// [`on_slots_moved`](Self::on_slots_moved)) within about `every` of
    /// its commit, without waiting for a request to be refused. Off by
    /// default (a stale map is harmless: the fence refuses, the instance
    /// refreshes then).
    pub fn map_poll(mut self, every: Duration) -> Self {
        self.map_poll = Some(every.max(Duration::from_millis(10)));
        self
    }
}

/// The highest map version any shard reports now (shards that do not
/// answer within `within` are skipped).
async fn newest(cluster: &ShardedCluster, within: Duration) -> u64 {
    let reads = cluster.inner.shards.iter().map(|shard| async move {
        let read = shard.db.read_one(
            Consistency::Strong,
            "SELECT greatest((SELECT version FROM tower_scale_shard_map), \
             (SELECT coalesce(max(version), 0) FROM tower_scale_shard_slots))",
            &[],
        );
        match tokio::time::timeout(within, read).await {
            Ok(Ok(row)) => row.value.try_get::<_, i64>(0).unwrap_or(0),
            _ => 0,
        }
    });
    let versions = futures_util::future::join_all(reads).await;
    versions
        .into_iter()
        .map(|v| u64::try_from(v).unwrap_or(0))
        .max()
        .unwrap_or(0)
}

/// Polls until the cluster is dropped.
pub(super) fn spawn(cluster: &ShardedCluster, every: Duration) {
    let weak: Weak<Inner> = std::sync::Arc::downgrade(&cluster.inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let cluster = ShardedCluster { inner };
            let within = every.max(Duration::from_millis(500));
            let map = cluster.map();
            // A map read between a move's two commits has the range
            // unowned at the new version: looked at again until owned.
            let unowned = (0..map.slot_count()).any(|s| map.owner(s).is_none());
            if (unowned || newest(&cluster, within).await > map.version())
                && let Err(e) = cluster.refresh().await
            {
                tracing::warn!(error = %e, "shard map poll: the refresh failed");
            }
        }
    });
}
