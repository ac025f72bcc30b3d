//! Reading the slot map from the shards' ownership tables and installing
//! it: on a refusal, a newer token, an announcement (`watch`), or a call.

use std::sync::Arc;
use std::time::Duration;

use super::cluster::ShardedCluster;
use super::error::ShardError;
use super::map::SlotMap;
use super::ownership;

impl ShardedCluster {
    /// Reads every shard's ownership table (from the primaries).
    ///
    /// All shards at once, each within the read-all deadline. A shard that
    /// does not answer keeps the slots the previous map gave it (it cannot
    /// have let go of them: a move locks its rows first), at the versions
    /// they had, so any shard that claimed them since wins; with no previous map (the
    /// first load), its error is the load's.
    pub(crate) async fn load(&self) -> Result<SlotMap, ShardError> {
        let deadline = self.inner.read_all_timeout;
        // Before any shard is read: each answer confirms its shard's
        // version as of this instant (see `lease`).
        let started = std::time::Instant::now();
        let answers = futures_util::future::join_all(self.inner.shards.iter().map(|shard| async {
            match tokio::time::timeout(deadline, ownership::owned(&shard.db, &shard.name)).await {
                Ok(answer) => answer,
                Err(_) => Err(ShardError::Timeout {
                    shard: Arc::clone(&shard.name),
                    after: deadline,
                }),
            }
        }))
        .await;
        let previous = self.map();
        let mut owned = Vec::new();
        // Slots kept from the previous map for shards that did not answer:
        // after every answer, so a tie goes to what a shard said.
        let mut kept = Vec::new();
        // Which shard's table lists each slot (tables read, not kept).
        let mut listed: Vec<Option<(usize, u64)>> = vec![None; usize::from(self.inner.slots)];
        let mut version = 0;
        let mut state = Vec::with_capacity(self.inner.shards.len());
        for (i, (shard, answer)) in self.inner.shards.iter().zip(answers).enumerate() {
            let (slots, map_version) = match answer {
                Ok(answer) => {
                    self.inner.leases.recorded(answer.lease);
                    self.inner.leases.confirm(i, answer.version, started);
                    // The position its replicas must have replayed: kept
                    // while the shard's version stays (no claim since),
                    // so a refresh for another shard's move does not send
                    // this one's reads to its primary meanwhile.
                    // (The lower of the two: both are at or past every
                    // claim the version covers, and a failover that kept
                    // the version may have set the position back.)
                    let floor = match previous.shard_state(i) {
                        Some((v, floor)) if v == answer.version => floor.min(answer.position),
                        _ => answer.position,
                    };
                    state.push((answer.version, floor));
                    (answer.slots, answer.version)
                }
                Err(e) if previous.version() > 0 => {
                    tracing::warn!(shard = %shard.name, error = %e, "the shard's ownership table could not be read; keeping its slots from the previous map");
                    // At the versions they had (any shard that claimed one
                    // since did so at a higher one, and wins): a shard not
                    // answering is no move, and the map's version does not
                    // go back.
                    for (slot, v, fenced) in previous.held_by(i) {
                        kept.push((i as u16, slot, v, fenced));
                    }
                    // Nothing read, nothing confirmed: its lease runs out.
                    state.push(previous.shard_state(i).unwrap_or_default());
                    version = version.max(previous.version());
                    continue;
                }
                Err(e) => return Err(e),
            };
            version = version.max(map_version);
            for (slot, v, fenced) in slots {
                if slot < self.inner.slots {
                    match listed[usize::from(slot)] {
                        // Listed by two shards at one version: no move made
                        // that (a move's new owner takes a higher version,
                        // and the tables, read one after the other, may show
                        // both sides of it). Two owners pass two fences:
                        // refuse rather than pick.
                        Some((other, at)) if other != i && at == v => {
                            return Err(ShardError::Setup(format!(
                                "slot {slot} is listed as owned by both {:?} and {:?} at version {v}: \
                                 the ownership tables disagree",
                                self.inner.shards[other].name, shard.name
                            )));
                        }
                        _ => listed[usize::from(slot)] = Some((i, v)),
                    }
                }
                if slot >= self.inner.slots {
                    return Err(ShardError::Setup(format!(
                        "shard {:?} lists slot {slot}, outside the key space",
                        shard.name
                    )));
                }
                version = version.max(v);
                owned.push((i as u16, slot, v, fenced));
            }
        }
        // Claims read from the shards first, then the kept ones: at a tie
        // `from_owned` keeps the first.
        owned.append(&mut kept);
        owned.sort_by_key(|&(_, _, v, _)| std::cmp::Reverse(v));
        let names = self
            .inner
            .shards
            .iter()
            .map(|s| Arc::clone(&s.name))
            .collect();
        Ok(SlotMap::from_owned(version, self.inner.slots, names, &owned).with_shard_state(state))
    }

    /// Reads the map from the shards now and installs it; the slots whose
    /// owner changed go to the [`on_slots_moved`](super::ShardedClusterBuilder::on_slots_moved) hooks.
    pub async fn refresh(&self) -> Result<Arc<SlotMap>, ShardError> {
        let _one = self.inner.refreshing.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<Arc<SlotMap>, ShardError> {
        let fresh = Arc::new(self.load().await?);
        // Only this function installs maps, under the refresh lock: the
        // current one is the one replaced. The previous map is set first,
        // so a reader that sees the new map finds the one it replaced.
        let old = self.map();
        let changed = old.changed_slots(&fresh);
        if !changed.is_empty() {
            *crate::sync::write(&self.inner.previous_map) = Some(Arc::clone(&old));
        }
        *crate::sync::write(&self.inner.map) = Arc::clone(&fresh);
        if old.version() != 0 && !changed.is_empty() {
            // Counted when given to their new owner, not when released (a
            // move's two commits can be seen apart).
            let given = changed
                .iter()
                .filter(|&&s| fresh.owner(s).is_some())
                .count();
            self.inner.metrics.slots_moved.increment(given as u64);
            for hook in &self.inner.on_moved {
                // A hook that panics loses its own call, not the others'
                // nor the caller (a map listener, a request).
                let call = std::panic::AssertUnwindSafe(|| hook(&changed));
                if std::panic::catch_unwind(call).is_err() {
                    tracing::error!(slots = changed.len(), "an on_slots_moved hook panicked");
                }
            }
        }
        self.inner.metrics.map_version.set(fresh.version() as f64);
        Ok(fresh)
    }

    /// After shard `refused` refused `slot` under map `seen`: refreshes
    /// until the map gives the slot to another shard, within the moved
    /// wait (with `same_ok`, a read refused by a lagging replica, the same
    /// shard will do: the retry reads its primary). `None`: still the same
    /// owner (or none) at the deadline.
    pub(crate) async fn refresh_after_moved(
        &self,
        slot: u16,
        refused: usize,
        seen: u64,
        same_ok: bool,
    ) -> Result<Option<usize>, ShardError> {
        self.inner.metrics.moved.increment(1);
        let deadline = tokio::time::Instant::now() + self.inner.moved_wait;
        let mut pause = Duration::from_millis(2);
        loop {
            let map = {
                let _one = self.inner.refreshing.lock().await;
                let current = self.map();
                // Another caller refreshed meanwhile: use its map first.
                if current.version() > seen
                    && current.owner_index(slot).is_some_and(|o| o != refused)
                {
                    current
                } else {
                    self.refresh_locked().await?
                }
            };
            match map.owner_index(slot) {
                Some(o) if o != refused || same_ok => return Ok(Some(o)),
                _ => {}
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The map, refreshed unless another caller already installed one
    /// newer than `seen`.
    pub(crate) async fn refresh_if_not_newer(&self, seen: u64) -> Result<Arc<SlotMap>, ShardError> {
        let _one = self.inner.refreshing.lock().await;
        let current = self.map();
        if current.version() > seen {
            return Ok(current);
        }
        self.refresh_locked().await
    }

    /// Refreshes the map if a token was routed by a newer one.
    pub(crate) async fn catch_up_map(&self, version: u64) -> Result<(), ShardError> {
        if version > self.map().version() {
            let _one = self.inner.refreshing.lock().await;
            if version > self.map().version() {
                self.refresh_locked().await?;
            }
        }
        Ok(())
    }
}
