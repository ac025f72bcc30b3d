//! Reads on every shard at once, and merging their answers.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::cluster::ShardedCluster;
use super::error::ShardError;
use super::token::ShardConsistency;

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// One shard's answer to a cross-shard read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShardRows {
    /// The shard.
    pub shard: Arc<str>,
    /// Its rows.
    pub rows: Vec<Row>,
    /// The node that ran the query.
    pub served_by: Arc<str>,
}

/// The answer of [`ShardedCluster::read_all`]: rows per shard, in the
/// shards' configured order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AllRows {
    /// The shards that answered.
    pub shards: Vec<ShardRows>,
    /// True if some shards failed and partial results were asked for
    /// ([`ShardedCluster::read_all_partial`]); see [`failed`](Self::failed).
    pub partial: bool,
    /// The shards that failed, with why (empty unless `partial`).
    pub failed: Vec<(Arc<str>, ShardError)>,
}

impl AllRows {
    /// Every row, shard after shard.
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.shards.iter().flat_map(|s| s.rows.iter())
    }

    /// The first `limit` rows in the order `cmp` gives, from shards whose
    /// rows are each already in that order (`ORDER BY ... LIMIT n` on
    /// every shard): a k-way merge.
    pub fn merge_sorted(&self, limit: usize, cmp: impl Fn(&Row, &Row) -> Ordering) -> Vec<&Row> {
        merge_sorted(
            self.shards
                .iter()
                .map(|s| s.rows.iter().collect())
                .collect(),
            limit,
            |a: &&Row, b: &&Row| cmp(a, b),
        )
    }

    /// The sum over shards of column `column` of each shard's first row
    /// (a `count(*)` or `sum(...)` as `int8`; a shard without rows or with
    /// NULL adds 0). Overflow is an error, not a wrap.
    pub fn sum_i64(&self, column: usize) -> Result<i64, ShardError> {
        let mut total = 0i64;
        for s in &self.shards {
            let Some(row) = s.rows.first() else { continue };
            let v: Option<i64> = row.try_get(column).map_err(|e| {
                ShardError::Combine(format!("column {column} of shard {}: {e}", s.shard))
            })?;
            total = total
                .checked_add(v.unwrap_or(0))
                .ok_or_else(|| ShardError::Combine("the sum over shards overflows i64".into()))?;
        }
        Ok(total)
    }

    /// The total number of rows over shards.
    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| s.rows.len()).sum()
    }
}

struct Head<T, F> {
    item: T,
    source: usize,
    cmp: F,
}

impl<T, F: Fn(&T, &T) -> Ordering> PartialEq for Head<T, F> {
    fn eq(&self, other: &Self) -> bool {
        Ord::cmp(self, other) == Ordering::Equal
    }
}
impl<T, F: Fn(&T, &T) -> Ordering> Eq for Head<T, F> {}
impl<T, F: Fn(&T, &T) -> Ordering> PartialOrd for Head<T, F> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(Ord::cmp(self, other))
    }
}
impl<T, F: Fn(&T, &T) -> Ordering> Ord for Head<T, F> {
    fn cmp(&self, other: &Self) -> Ordering {
        // A max-heap: reversed, and ties go to the earlier source.
        (self.cmp)(&other.item, &self.item).then(other.source.cmp(&self.source))
    }
}

/// A k-way merge: the first `limit` items in `cmp` order of `lists`, each
/// already sorted by `cmp`. Stable: ties keep list order.
///
/// ```
/// use tower_scale::shard::merge_sorted;
/// let merged = merge_sorted(vec![vec![1, 4, 9], vec![2, 3, 10], vec![]], 5, |a, b| a.cmp(b));
/// assert_eq!(merged, vec![1, 2, 3, 4, 9]);
/// ```
pub fn merge_sorted<T>(
    lists: Vec<Vec<T>>,
    limit: usize,
    cmp: impl Fn(&T, &T) -> Ordering + Copy,
) -> Vec<T> {
    let mut iters: Vec<std::vec::IntoIter<T>> = lists.into_iter().map(Vec::into_iter).collect();
    let mut heap = BinaryHeap::with_capacity(iters.len());
    for (source, it) in iters.iter_mut().enumerate() {
        if let Some(item) = it.next() {
            heap.push(Head { item, source, cmp });
        }
    }
    let mut out = Vec::with_capacity(limit.min(1024));
    while out.len() < limit {
        let Some(Head { item, source, .. }) = heap.pop() else {
            break;
        };
        out.push(item);
        if let Some(next) = iters[source].next() {
            heap.push(Head {
                item: next,
                source,
                cmp,
            });
        }
    }
    out
}

impl ShardedCluster {
    /// Runs `sql` on every shard concurrently (each routed by
    /// `consistency` as [`read`](Self::read) would, without the slot
    /// fence: a cross-shard read is not about one slot), each within the
    /// per-shard deadline ([`read_all_timeout`](super::ShardedClusterBuilder::read_all_timeout)),
    /// and returns the rows per shard. If any shard fails or misses the
    /// deadline, the whole read fails with [`ShardError::Shards`] naming
    /// every shard that failed; see [`read_all_partial`](Self::read_all_partial).
    pub async fn read_all(
        &self,
        consistency: &ShardConsistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<AllRows, ShardError> {
        let all = self.read_every(consistency, sql, params).await?;
        if all.failed.is_empty() {
            Ok(all)
        } else {
            Err(ShardError::Shards { failed: all.failed })
        }
    }

    /// Like [`read_all`](Self::read_all), but shards that fail are left
    /// out: the answer is marked [`partial`](AllRows::partial) and lists
    /// them in [`failed`](AllRows::failed). Fails only if every shard did.
    pub async fn read_all_partial(
        &self,
        consistency: &ShardConsistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<AllRows, ShardError> {
        let all = self.read_every(consistency, sql, params).await?;
        if all.shards.is_empty() {
            return Err(ShardError::Shards { failed: all.failed });
        }
        Ok(all)
    }

    async fn read_every(
        &self,
        consistency: &ShardConsistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<AllRows, ShardError> {
        self.catch_up_map(consistency.map_version()).await?;
        let deadline = self.inner.read_all_timeout;
        let reads = self.inner.shards.iter().map(|shard| async move {
            let read = tokio::time::timeout(
                deadline,
                shard
                    .db
                    .read_query(consistency.on_shard(shard.id), sql, params),
            )
            .await;
            let result = match read {
                Ok(Ok(read)) => Ok(ShardRows {
                    shard: Arc::clone(&shard.name),
                    rows: read.value,
                    served_by: read.served_by,
                }),
                Ok(Err(e)) => Err(ShardError::db(&shard.name, e)),
                Err(_) => Err(ShardError::Timeout {
                    shard: Arc::clone(&shard.name),
                    after: deadline,
                }),
            };
            (Arc::clone(&shard.name), result)
        });
        let mut all = AllRows {
            shards: Vec::new(),
            partial: false,
            failed: Vec::new(),
        };
        for (name, result) in futures_util::future::join_all(reads).await {
            match result {
                Ok(rows) => all.shards.push(rows),
                Err(e) => {
                    if let Some(shard) = self.inner.shards.iter().find(|s| s.name == name) {
                        shard.read_all_failures.increment(1);
                    }
                    all.failed.push((name, e));
                }
            }
        }
        all.partial = !all.failed.is_empty();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_k_sorted_lists_with_a_limit() {
        let lists = vec![vec![1, 5, 7], vec![], vec![2, 2, 8], vec![0]];
        assert_eq!(
            merge_sorted(lists.clone(), 100, |a, b| a.cmp(b)),
            vec![0, 1, 2, 2, 5, 7, 8]
        );
        assert_eq!(
            merge_sorted(lists.clone(), 3, |a, b| a.cmp(b)),
            vec![0, 1, 2]
        );
        assert_eq!(merge_sorted(lists, 0, |a, b| a.cmp(b)), Vec::<i32>::new());
        // Descending, stable on ties (list order).
        let pairs = vec![vec![(3, 'a'), (1, 'a')], vec![(3, 'b'), (2, 'b')]];
        assert_eq!(
            merge_sorted(pairs, 4, |a, b| b.0.cmp(&a.0)),
            vec![(3, 'a'), (3, 'b'), (2, 'b'), (1, 'a')]
        );
    }
}
