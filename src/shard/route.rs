//! Routed writes, transactions and reads on the key's shard, fenced by
//! the shard's ownership row.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::pg::route::RouteHint;
use crate::pg::{Consistency, ConsistencyToken, Lsn, RouteReason, Transaction};

use super::cluster::{Inner, ReadForms, ShardedCluster};
use super::error::ShardError;
use super::ownership::FENCE_SQL;
use super::slot::ShardKey;
use super::token::{ShardConsistency, ShardedToken};

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Inner {
    /// The fenced form of `sql` with `params` parameters of its own. A
    /// statement is checked once, when first fenced (a refused one is
    /// never kept): the statement check `Db` runs on every read
    /// (`pg::route::check_pooled`), and that it names no parameter beyond
    /// `params` (the fence's own, next, would bind it). `shard` names the
    /// shard in a refusal.
    pub(crate) fn fenced_read(
        &self,
        sql: &str,
        params: usize,
        shard: &Arc<str>,
    ) -> Result<Arc<ReadForms>, ShardError> {
        if let Some((n, forms)) = crate::sync::read(&self.read_sql).get(sql)
            && *n == params
        {
            return Ok(Arc::clone(forms));
        }
        crate::pg::route::check_pooled(sql).map_err(|e| ShardError::db(shard, e))?;
        let named = super::ownership::highest_placeholder(sql);
        if named > params {
            return Err(ShardError::Setup(format!(
                "the statement uses ${named} but {params} parameters were given"
            )));
        }
        let forms = Arc::new(ReadForms {
            fenced: super::ownership::fenced_read_sql(sql, params + 1).into(),
            plain: super::ownership::plain_read_sql(sql).into(),
        });
        let mut cache = crate::sync::write(&self.read_sql);
        if cache.len() >= super::cluster::MAX_READ_SQL {
            cache.clear();
        }
        cache.insert(sql.into(), (params, Arc::clone(&forms)));
        Ok(forms)
    }
}

/// A routed write's result.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShardWritten<T> {
    /// What the statement returned.
    pub value: T,
    /// Present it (merged with others) on later reads to see this write.
    pub token: ShardedToken,
    /// The shard that took it.
    pub shard: Arc<str>,
    /// The key's slot.
    pub slot: u16,
}

/// A routed read's result.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShardRead<T> {
    /// The rows. Each has one more column than the statement, last:
    /// `tower_scale_owned` (the fence's, also under a lease; read columns
    /// by index below `row.len() - 1` or by name).
    pub value: T,
    /// The shard that answered.
    pub shard: Arc<str>,
    /// The node that ran the query.
    pub served_by: Arc<str>,
    /// A WAL position (on that shard) the data reflects at least.
    pub lsn: Lsn,
    /// Why that node.
    pub reason: RouteReason,
}

/// A transaction on the shard owning a slot, holding the slot's
/// ownership row `FOR SHARE` until it ends, so the slot cannot move while
/// it runs. Statements go through [`Transaction`]'s methods (`Deref`).
pub struct ShardTransaction {
    tx: Transaction,
    shard: Arc<str>,
    shard_id: u64,
    slot: u16,
    map_version: u64,
}

impl fmt::Debug for ShardTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardTransaction")
            .field("shard", &self.shard)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for ShardTransaction {
    type Target = Transaction;
    fn deref(&self) -> &Transaction {
        &self.tx
    }
}

impl ShardTransaction {
    /// The shard it runs on.
    pub fn shard(&self) -> &Arc<str> {
        &self.shard
    }

    /// Commits (see [`Transaction::commit`]) and returns the token.
    pub async fn commit(self) -> Result<ShardedToken, ShardError> {
        let token = self
            .tx
            .commit()
            .await
            .map_err(|e| ShardError::db(&self.shard, e))?;
        Ok(ShardedToken::single(self.shard_id, token, self.map_version))
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), ShardError> {
        self.tx
            .rollback()
            .await
            .map_err(|e| ShardError::db(&self.shard, e))
    }
}

/// `BEGIN` and the fence of `slot` as simple-query text (the slot is a
/// number: written into the text, nothing to escape).
/// The version of the ownership row the fence found (0 if unreadable):
/// a token carries at least it, so a reader whose map predates a move
/// back to this shard refreshes before it reads (its map may point at the
/// shard the slot visited, whose replica still shows it owned).
fn fence_version(rows: &[tokio_postgres::SimpleQueryRow]) -> u64 {
    rows.first()
        .and_then(|row| row.get(0))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

fn fence_text(slot: u16) -> String {
    format!("BEGIN; {}", FENCE_SQL.replace("$1", &slot.to_string()))
}

/// How a fenced attempt ended.
enum Fenced<T> {
    Done(T),
    Moved,
}

impl ShardedCluster {
    /// The owner of `slot` by the current map, with the map's version.
    /// A slot without an owner is fenced between a move's two commits (or
    /// by an interrupted move): the map is refreshed until it has one, within
    /// the moved wait.
    async fn owner(&self, slot: u16) -> Result<(usize, u64), ShardError> {
        let map = self.map();
        if let Some(index) = map.owner_index(slot) {
            return Ok((index, map.version()));
        }
        let deadline = tokio::time::Instant::now() + self.inner.moved_wait;
        let mut pause = std::time::Duration::from_millis(2);
        let mut seen = map.version();
        loop {
            let map = self.refresh_if_not_newer(seen).await?;
            seen = map.version();
            if let Some(index) = map.owner_index(slot) {
                return Ok((index, map.version()));
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(ShardError::Unowned { slot });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
    }

    /// After shard `refused` refused `slot` (map `version`): the shard to
    /// retry on, once the map shows one (see `refresh_after_moved`).
    async fn after_moved(
        &self,
        slot: u16,
        refused: usize,
        version: u64,
        read: bool,
    ) -> Result<usize, ShardError> {
        self.refresh_after_moved(slot, refused, version, read)
            .await?
            .ok_or_else(|| self.moved(slot, refused, version))
    }

    fn moved(&self, slot: u16, index: usize, version: u64) -> ShardError {
        ShardError::Moved {
            slot,
            shard: Arc::clone(&self.inner.shards[index].name),
            version,
        }
    }

    /// Begins a transaction on shard `index` and takes the slot's fence,
    /// in one round trip (`BEGIN` and the fence sent together).
    async fn begin_fenced(
        &self,
        index: usize,
        slot: u16,
    ) -> Result<Fenced<(Transaction, u64)>, ShardError> {
        let shard = &self.inner.shards[index];
        let err = |e| ShardError::db(&shard.name, e);
        let (tx, own) = shard
            .db
            .transaction_with(&fence_text(slot))
            .await
            .map_err(err)?;
        if own.is_empty() {
            tx.rollback().await.map_err(err)?;
            return Ok(Fenced::Moved);
        }
        Ok(Fenced::Done((tx, fence_version(&own))))
    }

    /// A fenced transaction on the owner of `slot`, after one refresh
    /// and retry if refused; with the shard index and the map version.
    async fn begin_owned(&self, slot: u16) -> Result<(Transaction, usize, u64), ShardError> {
        let (mut index, version) = self.owner(slot).await?;
        let mut retried = false;
        loop {
            match self.begin_fenced(index, slot).await? {
                Fenced::Done((tx, fenced)) if retried => {
                    return Ok((tx, index, self.map().version().max(fenced)));
                }
                Fenced::Done((tx, fenced)) => return Ok((tx, index, version.max(fenced))),
                Fenced::Moved if retried => return Err(self.moved(slot, index, version)),
                Fenced::Moved => {
                    index = self.after_moved(slot, index, version, false).await?;
                    retried = true;
                }
            }
        }
    }

    /// Runs a statement on the primary of `key`'s shard, in a transaction
    /// that first takes the slot's ownership row `FOR SHARE` (so the slot
    /// cannot move until it commits, and a shard that does not own the
    /// slot refuses it), and returns its rows with the write's token.
    ///
    /// The statement must only touch rows of `key` (or of keys in the same
    /// slot). Refused for a stale map: the map is refreshed and the write
    /// retried once on the new owner, transparently.
    ///
    /// Two round trips: `BEGIN`, the fence and the statement are sent
    /// together (the server runs the statement after the fence; where the
    /// fence found no row, the statement is rolled back, whatever it did
    /// or failed with), then `COMMIT` with the token.
    pub async fn write<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        sql: &str,
        params: Params<'_>,
    ) -> Result<ShardWritten<Vec<Row>>, ShardError> {
        let slot = self.slot(key);
        let (mut index, version) = self.owner(slot).await?;
        let mut retried = false;
        let (tx, rows, fenced) = loop {
            let shard = &self.inner.shards[index];
            let err = |e| ShardError::db(&shard.name, e);
            // BEGIN, the fence and the statement in one round trip: the
            // statement runs after the fence; if the fence found no row, it
            // is rolled back with the rest.
            let begun = shard
                .db
                .transaction_with_statement(&fence_text(slot), sql, params)
                .await
                .map_err(err)?;
            if !begun.begin_rows.is_empty() {
                let fenced = fence_version(&begun.begin_rows);
                break (begun.tx, begun.statement.map_err(err)?, fenced);
            }
            drop(begun.tx);
            if retried {
                return Err(self.moved(slot, index, version));
            }
            index = self.after_moved(slot, index, version, false).await?;
            retried = true;
        };
        let version = if retried {
            self.map().version()
        } else {
            version
        }
        .max(fenced);
        let shard = &self.inner.shards[index];
        let token = tx
            .commit()
            .await
            .map_err(|e| ShardError::db(&shard.name, e))?;
        Ok(ShardWritten {
            value: rows,
            token: ShardedToken::single(shard.id, token, version),
            shard: Arc::clone(&shard.name),
            slot,
        })
    }

    /// Starts a transaction on the primary of `key`'s shard holding the
    /// slot's fence (see [`ShardTransaction`]); a stale map is refreshed
    /// and the start retried once.
    pub async fn transaction<K: ShardKey + ?Sized>(
        &self,
        key: &K,
    ) -> Result<ShardTransaction, ShardError> {
        let slot = self.slot(key);
        let (tx, index, version) = self.begin_owned(slot).await?;
        let shard = &self.inner.shards[index];
        Ok(ShardTransaction {
            tx,
            shard: Arc::clone(&shard.name),
            shard_id: shard.id,
            slot,
            map_version: version,
        })
    }

    /// A read on `key`'s shard routed by `consistency` (replicas, lag,
    /// read-your-writes, failover: as [`Db`](crate::pg::Db) does).
    ///
    /// A stale map never makes it return a false "not found" or data
    /// older than a write that committed before it began. Under this
    /// instance's read lease on the shard (see
    /// [`read_lease`](super::ShardedClusterBuilder::read_lease)) the
    /// statement runs as it is; otherwise it runs as a subquery joined to
    /// the slot's ownership row, in one statement and so one snapshot, and
    /// a shard (or a replica) that does not own the slot in that snapshot
    /// answers no row at all: the map is refreshed and the read retried
    /// once on the owner's primary. `sql` must be a
    /// `SELECT` (or `VALUES`, `TABLE`, `WITH ... SELECT`) usable as a
    /// subquery; its order is kept. A token routed by a newer map than
    /// this instance's refreshes the map first.
    pub async fn read<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        consistency: &ShardConsistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<ShardRead<Vec<Row>>, ShardError> {
        self.read_hinted(key, consistency, RouteHint::None, sql, params)
            .await
    }

    /// An [`Any`](ShardConsistency::Any) read of a hot key (for example
    /// one of a cache's [`hot_keys`](crate::cache::CacheLayer::hot_keys),
    /// from [`CachePolicy::on_hot_miss`](crate::cache::CachePolicy::on_hot_miss)):
    /// on any healthy replica of the key's shard, also one lagging past
    /// the lag budget (up to the shard's
    /// [`hot_lag_max`](crate::pg::ClusterBuilder::hot_lag_max)), and on
    /// the primary only when no replica qualifies
    /// ([`RouteReason::HotKey`]). The fence and the retry on a moved slot
    /// are [`read`](Self::read)'s.
    ///
    /// ```no_run
    /// # async fn demo(sharded: tower_scale::shard::ShardedCluster) -> Result<(), tower_scale::shard::ShardError> {
    /// let celebrity = 42_i64;
    /// let r = sharded
    ///     .read_hot(&celebrity, "SELECT name FROM users WHERE id = $1", &[&celebrity])
    ///     .await?;
    /// println!("{} rows from {}/{}", r.value.len(), r.shard, r.served_by);
    /// # Ok(()) }
    /// ```
    pub async fn read_hot<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        sql: &str,
        params: Params<'_>,
    ) -> Result<ShardRead<Vec<Row>>, ShardError> {
        let any = ShardConsistency::Any;
        self.read_hinted(key, &any, RouteHint::AnyHealthyReplica, sql, params)
            .await
    }

    async fn read_hinted<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        consistency: &ShardConsistency,
        hint: RouteHint,
        sql: &str,
        params: Params<'_>,
    ) -> Result<ShardRead<Vec<Row>>, ShardError> {
        self.catch_up_map(consistency.map_version()).await?;
        let slot = self.slot(key);
        if let Some(read) = self
            .read_leased(slot, consistency, hint, sql, params)
            .await?
        {
            return Ok(read);
        }
        self.inner.metrics.fenced_reads.increment(1);
        let (mut index, version) = self.owner(slot).await?;
        // Checked once, when first fenced: `read_checked` below.
        let fenced_sql = Arc::clone(
            &self
                .inner
                .fenced_read(sql, params.len(), &self.inner.shards[index].name)?
                .fenced,
        );
        let slot_param = i32::from(slot);
        let (mut retried, mut on_primary) = (false, false);
        let read = loop {
            let shard = &self.inner.shards[index];
            // The retry reads the owner's primary: a replica may lag the map.
            let c = if retried || on_primary {
                Consistency::Strong
            } else {
                consistency.on_shard(shard.id)
            };
            // The retry goes to the primary: no hint.
            let hint = if retried || on_primary {
                RouteHint::None
            } else {
                hint
            };
            // The ownership row must be at least the version this map
            // gave the slot at: a replica still showing an older grant of
            // the slot to this shard (a slot moved away and back, the
            // replica behind both) does not pass.
            let min_param = i64::try_from(self.map().slot_version(slot)).unwrap_or(i64::MAX);
            // The caller's parameters, the slot's and the version: on the
            // stack up to 8.
            let mut small: [&(dyn ToSql + Sync); 10] = [&slot_param; 10];
            let mut large: Vec<&(dyn ToSql + Sync)> = Vec::new();
            let all: &[&(dyn ToSql + Sync)] = match small.get_mut(..params.len()) {
                Some(head) if params.len() <= 8 => {
                    head.copy_from_slice(params);
                    small[params.len() + 1] = &min_param;
                    &small[..params.len() + 2]
                }
                _ => {
                    large.reserve_exact(params.len() + 2);
                    large.extend_from_slice(params);
                    large.push(&slot_param);
                    large.push(&min_param);
                    &large
                }
            };
            let read = match shard
                .db
                .read_checked(c, hint, Lsn(0), &fenced_sql, all)
                .await
            {
                Ok(read) => read,
                // A replica behind the creation of a table the read names
                // (the ownership table just after the first start, the
                // caller's table just after a migration) cannot answer:
                // once more on the primary, if reads may fall back to it.
                Err(e)
                    if !on_primary
                        && c != Consistency::Strong
                        && shard.db.falls_back_to_primary()
                        && e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
                {
                    tracing::debug!(shard = %shard.name, error = %e, "read on the primary: a table is missing where it ran");
                    on_primary = true;
                    continue;
                }
                Err(e) => return Err(ShardError::db(&shard.name, e)),
            };
            match read.value.is_empty() {
                false => break read,
                true if retried => return Err(self.moved(slot, index, version)),
                true => {
                    index = self.after_moved(slot, index, version, true).await?;
                    retried = true;
                }
            }
        };
        let mut rows = read.value;
        // The one row of an owned slot whose statement found nothing.
        rows.retain(|row| {
            !row.is_empty()
                && row.try_get::<_, Option<bool>>(row.len() - 1).ok().flatten() == Some(true)
        });
        Ok(ShardRead {
            value: rows,
            shard: Arc::clone(&self.inner.shards[index].name),
            served_by: read.served_by,
            lsn: read.lsn,
            reason: read.reason,
        })
    }

    /// A read of `slot` under this instance's lease on its owner (see
    /// `lease`): the statement's plain form, on a replica only if it has
    /// replayed the map's position for that shard. `None`: no lease holds
    /// (read it fenced), or one ran out while the rows came and the
    /// shard's version moved since the map read it (read it again,
    /// fenced).
    async fn read_leased(
        &self,
        slot: u16,
        consistency: &ShardConsistency,
        hint: RouteHint,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<ShardRead<Vec<Row>>>, ShardError> {
        let current = self.map();
        let (map, index) = match current.owner_index(slot) {
            Some(index) => (current, index),
            // Released and not claimed yet (a move's hold): the map from
            // before the release still routes it, while a lease
            // confirmed for it holds.
            None => {
                let previous = crate::sync::read(&self.inner.previous_map).clone();
                match previous.and_then(|p| Some((p.owner_index(slot)?, p))) {
                    Some((index, previous)) => (previous, index),
                    None => return Ok(None),
                }
            }
        };
        let Some((seen, floor)) = map.shard_state(index) else {
            return Ok(None);
        };
        let leases = &self.inner.leases;
        let shard = &self.inner.shards[index];
        // A replica behind the position (just after a claim, or lagging
        // far) would be passed over for the primary: the fenced read
        // routes as it always did instead.
        let on_primary = matches!(consistency, ShardConsistency::Strong);
        if !leases.holds(index, seen, Instant::now())
            || !(on_primary || shard.db.replicas_replayed(floor))
        {
            return Ok(None);
        }
        let forms = self.inner.fenced_read(sql, params.len(), &shard.name)?;
        let c = consistency.on_shard(shard.id);
        let read = match shard
            .db
            .read_checked(c, hint, floor, &forms.plain, params)
            .await
        {
            Ok(read) => read,
            // A replica behind the creation of a table the read names:
            // the fenced read knows where to go.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                return Ok(None);
            }
            Err(e) => return Err(ShardError::db(&shard.name, e)),
        };
        // The rows count if the lease holds still (the statement ran
        // before), or a read of the shard's version that starts now shows
        // no change of ownership since the map's.
        if !self.still_holds(index, seen).await {
            return Ok(None);
        }
        Ok(Some(ShardRead {
            value: read.value,
            shard: Arc::clone(&shard.name),
            served_by: read.served_by,
            lsn: read.lsn,
            reason: read.reason,
        }))
    }

    /// The consistency token of a write made outside this handle (for
    /// example by a [`ShardTransaction`] committed elsewhere) on `shard`.
    pub fn token_for(
        &self,
        shard: &str,
        token: ConsistencyToken,
    ) -> Result<ShardedToken, ShardError> {
        let index = self.shard_index(shard)?;
        Ok(ShardedToken::single(
            self.inner.shards[index].id,
            token,
            self.map().version(),
        ))
    }
}
