//! Read routing: which replicas qualify for a consistency, the balancer's
//! pick among them, the catch-up wait for read-your-writes, and the public
//! read methods.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::Row;
use tracing::Instrument;

use super::balance::Candidate;
use super::error::{DbError, Operation};
use super::lsn::{Consistency, Lsn};
use super::node::{Node, Role};
use super::region::{self, Tiered};

use super::db::*;
use super::session::*;

/// A routing override a read may carry (crate-private: `DbCache` sets it
/// on the fill of a hot key, `ShardedCluster::read_hot` on every read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum RouteHint {
    /// Route by the consistency alone.
    #[default]
    None,
    /// For an `Any` read: any healthy replica, however far it lags (the
    /// balancer still prefers the less loaded and less lagging), the
    /// primary only when no replica is healthy. A hot key's reads are
    /// spread over the replicas instead of landing on the primary when
    /// the replicas lag past the budget. Other consistencies ignore it.
    AnyHealthyReplica,
}

/// Refuses a statement that would change a pooled session's state (see
/// `statement::check`).
pub(crate) fn check_pooled(sql: &str) -> Result<(), DbError> {
    super::statement::check(sql, super::statement::Context::Pooled)
}

/// How a read-your-writes catch-up ended.
pub(super) enum CatchUp {
    Replayed,
    /// Still behind at the deadline, or no connection in time.
    Behind,
    /// The replica did not answer within the wait.
    NoAnswer,
}

impl Db {
    /// Candidates for a read, with their node indices and tiers.
    pub(super) fn replicas(&self, accept: impl Fn(&Node) -> bool) -> Vec<Tiered> {
        let options = &self.inner.options;
        self.inner
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                // Fenced: replaying an older timeline than the newest
                // primary's (it follows, or was, an old primary).
                n.is_healthy() && n.role() == Role::Replica && !n.is_fenced() && accept(n)
            })
            .map(|(i, n)| {
                let tier = region::tier(options, n);
                (
                    i,
                    Candidate {
                        in_flight: n.in_flight.load(Ordering::Relaxed),
                        latency: n.latency(self.inner.started),
                        rtt: n.rtt(),
                        lag: n.lag(),
                        weight: self.inner.weight(n),
                        same_zone: tier == region::LOCAL_ZONE,
                    },
                    tier,
                )
            })
            .collect()
    }

    /// The nearest candidates' pick (see [`region::pick_nearest`]): the
    /// node index and its tier.
    pub(super) fn pick(&self, candidates: &[Tiered]) -> Option<(usize, u8)> {
        region::pick_nearest(candidates, || self.inner.random())
    }

    /// The replicas `accept` takes, but `exclude`.
    /// Healthy replicas but `exclude` that `accept` and have replayed
    /// `floor` (by what the monitor last saw).
    fn eligible(
        &self,
        exclude: Option<usize>,
        floor: Lsn,
        accept: impl Fn(&Node) -> bool,
    ) -> Vec<Tiered> {
        let mut c = self.replicas(|n| n.lsn() >= floor && accept(n));
        c.retain(|c| Some(c.0) != exclude);
        c
    }

    /// Where a read goes, and the LSN its data reflects at least: a
    /// replica only if it has replayed `floor` too (`Lsn(0)`: any).
    pub(super) async fn route(
        &self,
        consistency: Consistency,
        hint: RouteHint,
        exclude: Option<usize>,
        floor: Lsn,
    ) -> Result<(usize, Lsn, RouteReason), DbError> {
        let budget = self.inner.options.lag_budget;
        // A replica of another region serves a read as `CrossRegion`.
        let reason = |(i, tier): (usize, u8), near: RouteReason| {
            if tier == region::REMOTE {
                (i, RouteReason::CrossRegion)
            } else {
                (i, near)
            }
        };
        // A replica that did not answer the catch-up query in time.
        let mut stalled = None;
        let choice = match consistency {
            Consistency::Strong => None,
            Consistency::Any if hint == RouteHint::AnyHealthyReplica => {
                let cap = self.inner.options.hot_lag_max;
                let c = self.eligible(exclude, floor, |n| n.lag() <= cap);
                self.pick(&c).map(|(i, _)| (i, RouteReason::HotKey))
            }
            Consistency::Any => {
                let c = self.eligible(exclude, floor, |n| n.lag() <= budget);
                self.pick(&c).map(|p| reason(p, RouteReason::Replica))
            }
            Consistency::BoundedStaleness(bound) => {
                let c = self.eligible(exclude, floor, |n| n.lag() <= bound);
                self.pick(&c).map(|p| reason(p, RouteReason::Replica))
            }
            // A commit whose position is unknown: no replica can be shown
            // to have it, and none is waited for.
            Consistency::ReadYourWrites(token) if token.is_unknown() => None,
            Consistency::ReadYourWrites(token) => {
                let (choice, no_answer) = self
                    .route_read_your_writes(token.lsn().max(floor), exclude)
                    .await;
                stalled = no_answer;
                choice
            }
        };
        if let Some((i, reason)) = choice {
            return Ok((i, self.node(i).lsn(), reason));
        }
        // Strong reads and the unknown token belong on the primary: not a
        // fallback, so `fallback_to_primary(false)` does not refuse them.
        let primary_by_rule = match consistency {
            Consistency::Strong => true,
            Consistency::ReadYourWrites(token) => token.is_unknown(),
            _ => false,
        };
        if !self.inner.options.fallback_to_primary && !primary_by_rule {
            if let Some(i) = stalled {
                return Err(DbError::Timeout {
                    node: Arc::clone(&self.node(i).name),
                    operation: Operation::CatchUp,
                    after: self.inner.options.read_your_writes_wait,
                });
            }
            return Err(DbError::NoPrimary {
                tried: vec!["no replica qualifies and fallback_to_primary is off".into()],
            });
        }
        let i = self.primary_index().await?;
        let lsn = self
            .node(i)
            .lsn()
            .max(Lsn(self.inner.last_write.load(Ordering::Acquire)));
        let reason = if primary_by_rule {
            RouteReason::Primary
        } else {
            RouteReason::FallbackToPrimary
        };
        Ok((i, lsn, reason))
    }

    /// A read-your-writes read's replica: one of the local region that has
    /// replayed `lsn`; else the local one that waited for it (at most the
    /// local wait, only one not far behind); else the nearest replica of
    /// another region that has it, or that replays it within the
    /// read-your-writes wait. `None` leaves the read to the primary; the
    /// second value names a replica that did not answer the catch-up query.
    async fn route_read_your_writes(
        &self,
        lsn: Lsn,
        exclude: Option<usize>,
    ) -> (Option<(usize, RouteReason)>, Option<usize>) {
        let options = &self.inner.options;
        let is_local = |c: &Tiered| c.2 != region::REMOTE;
        let (local, remote): (Vec<Tiered>, Vec<Tiered>) = self
            .eligible(exclude, lsn, |_| true)
            .into_iter()
            .partition(is_local);
        if let Some((i, _)) = self.pick(&local) {
            return (Some((i, RouteReason::CaughtUp)), None);
        }
        // Waiting only helps on a replica that is not far behind.
        let local_wait = options.local_wait;
        let mut stalled = None;
        let near: Vec<Tiered> = self
            .eligible(exclude, Lsn(0), |n| n.lag() <= local_wait)
            .into_iter()
            .filter(is_local)
            .collect();
        if let Some((i, _)) = self.pick(&near) {
            match self.wait_for_replay(i, lsn, local_wait).await {
                CatchUp::Replayed => return (Some((i, RouteReason::WaitedForReplica)), None),
                CatchUp::Behind => {}
                CatchUp::NoAnswer => stalled = Some(i),
            }
        }
        if let Some((i, _)) = self.pick(&remote) {
            return (Some((i, RouteReason::CrossRegion)), stalled);
        }
        let wait = options.read_your_writes_wait;
        let far: Vec<Tiered> = self
            .eligible(exclude, Lsn(0), |n| n.lag() <= wait)
            .into_iter()
            .filter(|c| !is_local(c))
            .collect();
        if let Some((i, _)) = self.pick(&far) {
            match self.wait_for_replay(i, lsn, wait).await {
                CatchUp::Replayed => return (Some((i, RouteReason::CrossRegion)), stalled),
                CatchUp::Behind => {}
                CatchUp::NoAnswer => stalled = stalled.or(Some(i)),
            }
        }
        (None, stalled)
    }

    /// Polls replica `index` until it has replayed `lsn`, within `wait`
    /// (the local wait or the read-your-writes wait), which bounds everything here: the checkout
    /// and every query. A replica that does not answer in time is left to
    /// the monitor (a wait for a pooled connection is not held against it).
    pub(super) async fn wait_for_replay(&self, index: usize, lsn: Lsn, wait: Duration) -> CatchUp {
        let node = self.node(index);
        let deadline = tokio::time::Instant::now() + wait;
        let Ok(Ok(conn)) = tokio::time::timeout_at(deadline, node.connection()).await else {
            return CatchUp::Behind;
        };
        let running = Running::new(conn, &self.inner.cancel);
        let Ok(conn) = running.conn() else {
            return CatchUp::Behind;
        };
        let mut pause = Duration::from_millis(1);
        loop {
            match tokio::time::timeout_at(deadline, conn.simple_query(REPLAY_SQL)).await {
                Ok(Ok(messages)) => {
                    if let Some(replayed) = parse_lsn(&messages) {
                        node.observe_lsn(replayed);
                        if replayed >= lsn {
                            running.release();
                            return CatchUp::Replayed;
                        }
                    }
                }
                Ok(Err(e)) => {
                    running.settle(&e, false);
                    return CatchUp::Behind;
                }
                Err(_) => {
                    // Dropping `running` cancels the query and closes the session.
                    tracing::debug!(node = %node.name, ?wait, "replica did not answer the catch-up query");
                    self.inner.request_reprobe();
                    return CatchUp::NoAnswer;
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                running.release();
                return CatchUp::Behind;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    pub(super) async fn read(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        self.read_hinted(consistency, RouteHint::None, sql, params)
            .await
    }

    /// [`read`](Self::read) with a routing override.
    pub(crate) async fn read_hinted(
        &self,
        consistency: Consistency,
        hint: RouteHint,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        check_pooled(sql)?;
        self.read_checked(consistency, hint, Lsn(0), sql, params)
            .await
    }

    /// Whether every healthy replica a read might use (within the lag
    /// budget or the hot-read lag) has replayed `floor`, by what the
    /// monitor last saw: a shard's read lease then routes as without it.
    #[cfg(feature = "shard")]
    pub(crate) fn replicas_replayed(&self, floor: Lsn) -> bool {
        let options = &self.inner.options;
        let usable = options.lag_budget.max(options.hot_lag_max);
        self.replicas(|n| n.lag() <= usable && n.lsn() < floor)
            .is_empty()
    }

    /// The position a replica must replay to have every commit the
    /// primary had when its WAL insert position was `insert` and its
    /// write position `written` (see `WalLayout`).
    #[cfg(feature = "shard")]
    pub(crate) fn commit_position(&self, insert: Lsn, written: Lsn) -> Lsn {
        let primary = self.inner.primary.load(Ordering::Acquire);
        self.node(primary)
            .wal_layout()
            .commit_position(insert, written)
    }

    /// Whether reads that no replica can serve may go to the primary
    /// ([`ClusterBuilder::fallback_to_primary`](super::ClusterBuilder::fallback_to_primary)).
    #[cfg(feature = "shard")]
    pub(crate) fn falls_back_to_primary(&self) -> bool {
        self.inner.options.fallback_to_primary
    }

    /// [`read_hinted`](Self::read_hinted) of a statement the caller has
    /// passed through [`check_pooled`] (or built itself around one that
    /// did): `ShardedCluster` checks a statement once, when it first
    /// wraps it in the read fence, instead of the longer fenced text on
    /// every read (the check scans the text: it was two thirds of the
    /// fence's cost on the client). A replica serves it only if it has
    /// replayed `floor` (a shard's read lease: see `shard::lease`).
    pub(crate) async fn read_checked(
        &self,
        consistency: Consistency,
        hint: RouteHint,
        floor: Lsn,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        let (index, lsn, reason) = self.route(consistency, hint, None, floor).await?;
        let node = self.node(index);
        let span = tracing::debug_span!(
            "db.read",
            node = %node.name,
            reason = ?reason,
            lag_ms = node.lag().as_millis() as u64,
        );
        match self.read_on(index, sql, params).instrument(span).await {
            Ok(rows) => Ok(Read {
                value: rows,
                served_by: Arc::clone(&node.name),
                lsn,
                reason,
            }),
            // A replica that failed (not the query): once elsewhere.
            Err((e, true)) if index != self.inner.primary.load(Ordering::Acquire) => {
                tracing::warn!(node = %node.name, error = %e, "read failed on a replica; retrying elsewhere");
                // Nowhere else to go: the first error is the one that says why.
                let Ok((index, lsn, _)) = self.route(consistency, hint, Some(index), floor).await
                else {
                    return Err(e);
                };
                let rows = self.read_on(index, sql, params).await.map_err(|(e, _)| e)?;
                Ok(Read {
                    value: rows,
                    served_by: Arc::clone(&self.node(index).name),
                    lsn,
                    reason: RouteReason::Retried,
                })
            }
            Err((e, _)) => Err(e),
        }
    }

    /// A read routed by `consistency`.
    pub async fn read_query(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Vec<Row>>, DbError> {
        self.read(consistency, sql, params).await
    }

    /// A read of at most one row routed by `consistency`.
    pub async fn read_opt(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Option<Row>>, DbError> {
        let r = self.read(consistency, sql, params).await?;
        let mut rows = r.value;
        if rows.len() > 1 {
            return Err(DbError::RowCount {
                node: Arc::clone(&r.served_by),
                rows: rows.len(),
                written: None,
            });
        }
        Ok(Read {
            value: rows.pop(),
            served_by: r.served_by,
            lsn: r.lsn,
            reason: r.reason,
        })
    }

    /// A read of exactly one row routed by `consistency`.
    pub async fn read_one(
        &self,
        consistency: Consistency,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Read<Row>, DbError> {
        let r = self.read(consistency, sql, params).await?;
        let row = exactly_one(r.value, &r.served_by, None)?;
        Ok(Read {
            value: row,
            served_by: r.served_by,
            lsn: r.lsn,
            reason: r.reason,
        })
    }
}
