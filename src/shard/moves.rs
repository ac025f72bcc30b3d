//! Changing a slot range's owner: the fence's other side.

use std::fmt;
use std::sync::Arc;

use crate::pg::Transaction;

use super::cluster::ShardedCluster;
use super::error::ShardError;
use super::map::SlotRange;
use super::ownership;

/// A move of a slot range in progress: the range's ownership rows are
/// locked `FOR UPDATE` on the old owner and fenced there (writes to it
/// wait, writes in flight have finished), and the new owner's rows are
/// written but not committed. Copy the range's data with [`source`](Self::source) and
/// [`target`](Self::target) (data copying is the caller's in this
/// version), then [`commit`](Self::commit). Dropping it aborts the move.
///
/// Delete the range's rows from the old owner only after `commit`
/// returned, never in [`source`](Self::source)'s transaction: until the
/// new owner's claim, an instance reading under a read lease with a map
/// from before the move may still read them there, and must find them
/// (see [`read_lease`](super::ShardedClusterBuilder::read_lease)).
pub struct SlotMove {
    cluster: ShardedCluster,
    /// Holds the move lock until the move committed.
    serial: (Arc<str>, Transaction),
    range: SlotRange,
    from: Option<(Arc<str>, Transaction)>,
    to: (Arc<str>, Transaction),
    version: u64,
}

impl fmt::Debug for SlotMove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotMove")
            .field("range", &self.range)
            .field("from", &self.from.as_ref().map(|f| &f.0))
            .field("to", &self.to.0)
            .field("version", &self.version)
            .finish()
    }
}

impl SlotMove {
    /// The old owner's transaction (`None` when finishing a move that
    /// was interrupted after the old owner let go in an earlier release,
    /// which deleted its rows instead of fencing them).
    pub fn source(&self) -> Option<&Transaction> {
        self.from.as_ref().map(|f| &f.1)
    }

    /// The new owner's transaction.
    pub fn target(&self) -> &Transaction {
        &self.to.1
    }

    /// The range moved.
    pub fn range(&self) -> SlotRange {
        self.range
    }

    /// The map version the move creates.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Commits the old owner's fence first, then (after the hold of the
    /// read leases: the longest lease a shard records, plus 10%) the new
    /// owner's claim, then deletes the old owner's fenced rows, and refreshes this
    /// instance's map. Between the first two commits the old owner still
    /// holds the range, fenced: it refuses the range's writes and reads
    /// fenced in the read (they wait for the new owner, within the moved
    /// wait); an instance reading under a lease confirmed before the
    /// fence (with a map from before it, its current one or the one it
    /// replaced) may still read it there, until that lease runs out,
    /// within the hold. So no write is
    /// accepted by the new owner while the old one could still serve a
    /// read, and the ownership tables name one holder of every slot at
    /// every moment. The move lock is held through the hold: moves follow
    /// each other at most one per hold. If the claim's commit fails (or
    /// this future is dropped during the hold), the old owner holds the
    /// range fenced: run the move again (it finishes from there) or lift
    /// the fence ([`ShardedCluster::rollback_move`] for a move by
    /// `move_slots`). A failure to delete the fenced rows is only logged:
    /// they are leftovers at a lower version than the claim (cleanup
    /// deletes them).
    pub async fn commit(self) -> Result<u64, ShardError> {
        let from = match self.from {
            Some((name, tx)) => {
                tx.commit().await.map_err(|e| ShardError::db(&name, e))?;
                Some(name)
            }
            None => None,
        };
        // A read routed by a stale map under a lease may still reach the
        // old owner: the new one takes the range (and writes to it) only
        // once every such lease has run out (see `lease`). Also when
        // finishing a move in transit: its release's time is unknown.
        // Measured on the clock the leases are (a paused or skewed tokio
        // clock would shorten a sleep alone).
        let until = std::time::Instant::now() + self.cluster.inner.leases.hold();
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left).await;
        }
        let (name, tx) = self.to;
        tx.commit().await.map_err(|e| ShardError::db(&name, e))?;
        if let Some(from) = from {
            self.cluster
                .forget_fenced(&from, self.range, self.version)
                .await;
        }
        // It wrote nothing: however it ends, the lock goes with it.
        let _ = self.serial.1.rollback().await;
        self.cluster.refresh().await?;
        Ok(self.version)
    }
}

impl ShardedCluster {
    /// Deletes shard `from`'s fenced rows of `range` below `version` (see
    /// `ownership::forget`); a failure is logged, not returned.
    pub(crate) async fn forget_fenced(&self, from: &str, range: SlotRange, version: u64) {
        let Ok(i) = self.shard_index(from) else {
            return;
        };
        let shard = &self.inner.shards[i];
        if let Err(e) = ownership::forget(&shard.db, &shard.name, range, version).await {
            tracing::warn!(shard = %shard.name, %range, error = %e, "a moved range's fenced ownership rows were not deleted (leftovers: the cleanup deletes them)");
        }
    }

    /// Lifts the fence of `range` on the shard holding it: undoes a move
    /// whose cutover committed the source's side only (a
    /// [`SlotMove::commit`] that failed at the claim, or a process that
    /// died there), so the holder serves the range again. The holder's
    /// rows are the range's data (the claim never committed, so no write
    /// went elsewhere); a copy the move made on its target is the
    /// caller's to delete. Under the move lock, at a new map version, which
    /// it returns. Refused if the range has no single holder; a range not
    /// fenced is left as it is (the version still goes up).
    pub async fn lift_fence(&self, range: SlotRange) -> Result<u64, ShardError> {
        self.check_range(range)?;
        let map = self.refresh().await?;
        let holder = map
            .holder_index(range.first)
            .map(|(i, _)| i)
            .ok_or(ShardError::Unowned { slot: range.first })?;
        self.lift_fence_on(range, holder).await
    }

    /// [`lift_fence`](Self::lift_fence) on shard `holder`, which must hold
    /// every slot of `range` (checked under the move lock).
    pub(crate) async fn lift_fence_on(
        &self,
        range: SlotRange,
        holder: usize,
    ) -> Result<u64, ShardError> {
        self.check_range(range)?;
        let (_, serial) = self.lock_moves().await?;
        let map = self.refresh().await?;
        let shard = &self.inner.shards[holder];
        if let Some(s) = range
            .slots()
            .find(|&s| map.holder_index(s).map(|(i, _)| i) != Some(holder))
        {
            return Err(ShardError::Setup(format!(
                "{} does not hold slot {s} of {range} (another shard was given it): \
                 its fence stays",
                shard.name
            )));
        }
        // A shard that cannot answer may hold the range at a higher
        // version (this map may predate its claim): the fence stays.
        self.none_lists(range, &[holder]).await?;
        let version = map.version() + 1;
        let err = |e| ShardError::db(&shard.name, e);
        let tx = shard.db.transaction().await.map_err(err)?;
        ownership::unfence(&tx, &shard.name, range, version).await?;
        tx.commit().await.map_err(err)?;
        let _ = serial.rollback().await;
        self.refresh().await?;
        Ok(version)
    }

    /// A transaction holding the move lock (on the first shard by name):
    /// moves and first starts are serialised by it; it goes with the
    /// transaction.
    pub(crate) async fn lock_moves(&self) -> Result<(Arc<str>, Transaction), ShardError> {
        let first = self
            .inner
            .shards
            .iter()
            .min_by(|a, b| a.name.cmp(&b.name))
            .ok_or_else(|| ShardError::Setup("no shards".into()))?;
        let serial = first
            .db
            .transaction()
            .await
            .map_err(|e| ShardError::db(&first.name, e))?;
        ownership::lock_moves(&serial, &first.name).await?;
        Ok((Arc::clone(&first.name), serial))
    }

    /// Every shard but those of `except` answers, on its primary, that it
    /// lists no slot of `range` (a shard that claimed it and cannot be
    /// reached now is kept in the map from before, which may predate the
    /// claim: the range would look unowned, or held fenced by the shard
    /// that gave it away, while it owns it).
    async fn none_lists(&self, range: SlotRange, except: &[usize]) -> Result<(), ShardError> {
        let (first, last) = (i32::from(range.first), i32::from(range.last));
        for (i, shard) in self.inner.shards.iter().enumerate() {
            if except.contains(&i) {
                continue;
            }
            let row = shard
                .db
                .read_one(
                    crate::pg::Consistency::Strong,
                    "SELECT count(*) FROM tower_scale_shard_slots WHERE slot BETWEEN $1 AND $2",
                    &[&first, &last],
                )
                .await
                .map_err(|e| {
                    ShardError::Setup(format!(
                        "{range} is unowned or fenced in the map, but {} does not answer ({e}): \
                         it may own it; finish the move (or lift the fence) once it does",
                        shard.name
                    ))
                })?;
            let listed: i64 = row.value.try_get(0).map_err(|e| {
                ShardError::Setup(format!("{}: a count of its slots: {e}", shard.name))
            })?;
            if listed > 0 {
                return Err(ShardError::Setup(format!(
                    "{} lists {listed} slots of {range}: the map is stale; refresh and retry",
                    shard.name
                )));
            }
        }
        Ok(())
    }

    /// Starts moving `range` to shard `to` (see [`SlotMove`]). The range
    /// must be owned by one shard other than `to`, or by none (an
    /// interrupted move).
    pub async fn begin_move(&self, range: SlotRange, to: &str) -> Result<SlotMove, ShardError> {
        self.begin_move_within(range, to, None, false).await
    }

    /// Finishes a move in transit: `range` must be held fenced by one
    /// shard (checked under the move lock: a rollback that lifted the
    /// fence meanwhile makes this refuse, rather than give away a range
    /// whose source took writes since). Returns the new map version.
    #[cfg(feature = "reshard")]
    pub(crate) async fn finish_fenced(
        &self,
        range: SlotRange,
        to: &str,
    ) -> Result<u64, ShardError> {
        self.begin_move_within(range, to, None, true)
            .await?
            .commit()
            .await
    }

    /// [`begin_move`](Self::begin_move), waiting at most `lock_wait` for
    /// the old owner's ownership rows (writes in flight on the range hold
    /// them): past it, a `lock_not_available` error (SQLSTATE 55P03) and
    /// nothing changed.
    pub(crate) async fn begin_move_within(
        &self,
        range: SlotRange,
        to: &str,
        lock_wait: Option<std::time::Duration>,
        only_fenced: bool,
    ) -> Result<SlotMove, ShardError> {
        self.check_range(range)?;
        let target = self.shard_index(to)?;
        // One move at a time, so versions follow the order moves commit in.
        let serial = self.lock_moves().await?;
        let map = self.refresh().await?;
        // The holder, fenced or not: a move interrupted between its
        // cutover's commits is finished from its fenced source.
        let mut owners: Vec<Option<usize>> = range
            .slots()
            .map(|s| map.holder_index(s).map(|(i, _)| i))
            .collect();
        owners.dedup();
        let source = match owners.as_slice() {
            [Some(o)] if *o == target => {
                return Err(ShardError::Setup(format!(
                    "{to} already holds {range} (fenced, if a move away from it is in transit)"
                )));
            }
            [o] => *o,
            _ => {
                return Err(ShardError::Setup(format!(
                    "{range} spans several owners: move each owner's part on its own"
                )));
            }
        };
        let fenced = range
            .slots()
            .filter(|&s| map.fenced_by(s).is_some())
            .count();
        if only_fenced && (source.is_none() || fenced != range.len()) {
            return Err(ShardError::Setup(format!(
                "{range} is not held fenced by one shard any more (the move was finished \
                 or rolled back meanwhile)"
            )));
        }
        if source.is_none() || fenced > 0 {
            // Finishing a move in transit (or one an earlier release
            // interrupted, whose source deleted its rows): only if every
            // other shard answers that it lists none of the range.
            let except: Vec<usize> = [Some(target), source].into_iter().flatten().collect();
            self.none_lists(range, &except).await?;
        }
        let version = map.version() + 1;
        let from = match source {
            Some(i) => {
                let shard = &self.inner.shards[i];
                let tx = shard
                    .db
                    .transaction()
                    .await
                    .map_err(|e| ShardError::db(&shard.name, e))?;
                if let Some(wait) = lock_wait {
                    // At least a millisecond: 0 would mean no bound.
                    let ms = wait.as_millis().clamp(1, i32::MAX as u128);
                    tx.execute(&format!("SET LOCAL lock_timeout = {ms}"), &[])
                        .await
                        .map_err(|e| ShardError::db(&shard.name, e))?;
                }
                let locked = ownership::lock_source(&tx, &shard.name, range).await?;
                if lock_wait.is_some() {
                    // The bound was for the rows' lock; the rest of the
                    // move's statements wait as any other.
                    tx.execute("SET LOCAL lock_timeout = 0", &[])
                        .await
                        .map_err(|e| ShardError::db(&shard.name, e))?;
                }
                if locked != range.len() {
                    // Moved since the map was read: start again.
                    return Err(ShardError::Setup(format!(
                        "{} owns {locked} of the {} slots of {range} now; retry the move",
                        shard.name,
                        range.len()
                    )));
                }
                ownership::fence(&tx, &shard.name, range).await?;
                ownership::bump(&tx, &shard.name, version).await?;
                Some((Arc::clone(&shard.name), tx))
            }
            None => None,
        };
        let shard = &self.inner.shards[target];
        let tx = shard
            .db
            .transaction()
            .await
            .map_err(|e| ShardError::db(&shard.name, e))?;
        ownership::take(&tx, &shard.name, range, version).await?;
        ownership::bump(&tx, &shard.name, version).await?;
        Ok(SlotMove {
            cluster: self.clone(),
            serial,
            range,
            from,
            to: (Arc::clone(&shard.name), tx),
            version,
        })
    }

    /// Moves the ownership of `range` to shard `to` now (no data is
    /// copied: see [`begin_move`](Self::begin_move) to copy in between).
    /// Returns the new map version.
    pub async fn move_ownership(&self, range: SlotRange, to: &str) -> Result<u64, ShardError> {
        self.begin_move(range, to).await?.commit().await
    }
}
