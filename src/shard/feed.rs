//! One change feed per shard (feature `change-feed`).

use std::sync::Arc;

use crate::pg::feed::{ChangeFeed, ChangeFeedBuilder};

use super::cluster::ShardedCluster;
use super::error::ShardError;

impl ShardedCluster {
    /// Starts one [`ChangeFeed`] per shard (one consumer per shard, each
    /// on its own shard's primary), in the shards' order; `configure` gets
    /// each shard's name and its builder (tables, the invalidators to
    /// feed: give every feed the same ones).
    ///
    /// Each feed invalidates at its own shard's commit positions, the
    /// positions reads of that shard are stamped with: a key's tags
    /// (`{table}:{key}`) come from the one shard that owns its slot, so
    /// they are exact. A table-wide tag (`{table}`) is written by every
    /// shard, each in its own WAL numbering: in a cache holding several
    /// shards' reads, map it per shard with
    /// [`ChangeFeedBuilder::map_tags`] (for example to `{shard}:{table}`,
    /// and tag the reads alike), or cache table-wide reads per shard.
    ///
    /// ```no_run
    /// # async fn demo(sharded: tower_scale::shard::ShardedCluster, cache: tower_scale::pg::DbCache) -> Result<(), tower_scale::shard::ShardError> {
    /// let feeds = sharded
    ///     .change_feeds(|_, feed| feed.tables(["users"]).invalidates(cache.invalidator().clone()))
    ///     .await?;
    /// assert_eq!(feeds.len(), sharded.shard_names().len());
    /// # Ok(()) }
    /// ```
    pub async fn change_feeds(
        &self,
        configure: impl Fn(&str, ChangeFeedBuilder) -> ChangeFeedBuilder,
    ) -> Result<Vec<(Arc<str>, ChangeFeed)>, ShardError> {
        let mut feeds = Vec::with_capacity(self.inner.shards.len());
        for shard in &self.inner.shards {
            let builder = configure(&shard.name, ChangeFeed::builder(&shard.cluster));
            let feed = builder.start().await.map_err(|source| ShardError::Feed {
                shard: Arc::clone(&shard.name),
                source,
            })?;
            feeds.push((Arc::clone(&shard.name), feed));
        }
        Ok(feeds)
    }
}
