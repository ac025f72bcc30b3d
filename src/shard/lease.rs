//! Read leases: routed reads without the in-read fence, and what a move
//! owes them.
//!
//! **The guarantee** (the in-read fence's, kept): a routed read never
//! returns a false "not found" or data older than a write that committed
//! before the read began, because this instance's map is stale.
//!
//! An instance holds a lease on each shard: "the shard's map version was
//! at most `v` at local instant `t`", from a read of the shard's primary
//! that started at `t` (the renewal below, every quarter lease, or a map
//! load). A map that read the shard at version `v` or later then shows
//! every change of ownership the shard had committed by `t`. While
//! `now < t + lease`, a read routed by such a map runs its statement as
//! it is (no ownership row joined); otherwise it is fenced in the read,
//! as before. The lease is checked again when the rows arrive: rows that
//! come back after it ran out count only if a fresh read of the shard's
//! version shows no change of ownership since the map's (else the read is
//! made again, fenced).
//!
//! The other side is the move: after the source's release commits, the
//! target's claim waits [`Leases::hold`] (the longest lease any shard
//! records, plus 10% for clocks that run at different rates, plus 20 ms)
//! before it commits, and the source's rows are deleted only after the
//! claim. So a read that a stale lease let through ran its statement
//! before the target could take a write for the range, and before the
//! source deleted a row of it: it saw the range's current data.
//!
//! An instance that hears of the release (its new map shows the range
//! fenced, with no owner) keeps reading it on the old owner through the
//! map it replaced, while the confirmation of that map's version (kept
//! as the shard's previous one) is less than a lease old: the same
//! argument, for that map.
//!
//! Replicas: the map also records, per shard, the primary's WAL insert
//! position when it read the shard's table (kept while the shard's
//! version does not change). A lease read goes to a replica only if the
//! monitor saw it replay that position, so it has every claim the map
//! shows and every row the claims brought (the in-read fence checked the
//! replica's own ownership rows for this).
//!
//! Assumed: clocks whose rates differ by less than 10% (not synchronised
//! clocks: every duration is measured on one machine's monotonic clock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::cluster::{Inner, ShardedCluster};
use crate::pg::Consistency;

/// How much two clocks' rates may differ, in percent of the lease.
const DRIFT_PERCENT: u32 = 10;
/// Added to a move's hold (a scheduler's delay in taking the time).
const HOLD_MARGIN: Duration = Duration::from_millis(20);
/// The read of a shard's version.
const VERSION_SQL: &str = "SELECT version, lease_ms FROM tower_scale_shard_map";

/// What an instance has confirmed of each shard, and the lease's length.
pub(crate) struct Leases {
    base: Instant,
    /// The lease this instance holds, in nanoseconds (0: none, every read
    /// fenced): the configured one, at most the shortest a shard records.
    lease_ns: AtomicU64,
    /// The longest lease a shard records (nanoseconds): what a move's
    /// claim waits after its release.
    longest_ns: AtomicU64,
    shards: Box<[Confirmed]>,
    /// One renewal at a time per shard from reads whose lease ran out
    /// while their rows came (the others then find it renewed).
    renewing: Box<[tokio::sync::Mutex<()>]>,
    /// When such a renewal last failed to answer (a stamp, 0: never).
    renew_failed: Box<[AtomicU64]>,
}

/// What an instance knows of a shard's version: "a query that started
/// at `at` read it as `version`" (so it was at most that at `at`, versions
/// only rising), the latest such confirmation, and `prev`, the latest of
/// the version before (kept when the version rises: it still lets a map
/// that read the earlier version route, until its lease runs out). The
/// later-started query wins; an answer from a query that started earlier
/// than the one held, come late, changes nothing (unless of the same
/// version: its instant is the later of the two). A lower version from a
/// later query means the shard lost ownership changes (a failover that
/// lost commits): `prev` is dropped with the rest, and no map that read
/// the shard before holds. A seqlock: readers never wait; writers take
/// `write`.
#[derive(Default)]
struct Confirmed {
    /// Even when stable, odd while a writer changes the four below.
    seq: AtomicU64,
    version: AtomicU64,
    /// Nanoseconds since `base`, plus one (0: never).
    at: AtomicU64,
    prev_version: AtomicU64,
    prev_at: AtomicU64,
    write: std::sync::Mutex<()>,
}

/// A confirmation: (version, at).
type Pair = (u64, u64);

impl Confirmed {
    /// The latest confirmation and the previous version's, consistent
    /// with each other.
    fn get(&self) -> (Pair, Pair) {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            let now = (
                self.version.load(Ordering::Relaxed),
                self.at.load(Ordering::Relaxed),
            );
            let prev = (
                self.prev_version.load(Ordering::Relaxed),
                self.prev_at.load(Ordering::Relaxed),
            );
            std::sync::atomic::fence(Ordering::Acquire);
            if before & 1 == 0 && self.seq.load(Ordering::Relaxed) == before {
                return (now, prev);
            }
            std::hint::spin_loop();
        }
    }

    fn set(&self, version: u64, at: u64) {
        let _one = crate::sync::lock(&self.write);
        let held = (
            self.version.load(Ordering::Relaxed),
            self.at.load(Ordering::Relaxed),
        );
        let prev = (
            self.prev_version.load(Ordering::Relaxed),
            self.prev_at.load(Ordering::Relaxed),
        );
        let (now, prev) = if version == held.0 {
            ((version, at.max(held.1)), prev)
        } else if at <= held.1 {
            // An earlier query's answer, come late: what is held is newer.
            return;
        } else if version > held.0 {
            ((version, at), held)
        } else {
            ((version, at), (0, 0))
        };
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.version.store(now.0, Ordering::Relaxed);
        self.at.store(now.1, Ordering::Relaxed);
        self.prev_version.store(prev.0, Ordering::Relaxed);
        self.prev_at.store(prev.1, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Leases {
    pub(crate) fn new(shards: usize, configured: Duration) -> Self {
        Self {
            base: Instant::now(),
            lease_ns: AtomicU64::new(nanos(configured)),
            longest_ns: AtomicU64::new(0),
            shards: (0..shards).map(|_| Confirmed::default()).collect(),
            renewing: (0..shards).map(|_| tokio::sync::Mutex::new(())).collect(),
            renew_failed: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A shard records `lease` as its longest (read at start, at every map
    /// load and renewal): this instance holds no longer one from then on,
    /// and its moves wait for the longest it has seen.
    pub(crate) fn recorded(&self, lease: Duration) {
        self.lease_ns.fetch_min(nanos(lease), Ordering::Relaxed);
        self.longest_ns.fetch_max(nanos(lease), Ordering::Relaxed);
    }

    /// The lease this instance holds.
    pub(crate) fn lease(&self) -> Duration {
        Duration::from_nanos(self.lease_ns.load(Ordering::Relaxed))
    }

    /// How long a move's claim waits after its release commits: the
    /// longest lease recorded, plus the clocks' allowance (zero if no
    /// shard records a lease).
    pub(crate) fn hold(&self) -> Duration {
        let longest = Duration::from_nanos(self.longest_ns.load(Ordering::Relaxed));
        if longest.is_zero() {
            return Duration::ZERO;
        }
        longest + longest * DRIFT_PERCENT / 100 + HOLD_MARGIN
    }

    /// `at` as nanoseconds since `base`, plus one (0 is "never").
    fn stamp(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.base)).saturating_add(1)
    }

    /// A query that started at `started` read shard `i`'s map version as
    /// `version`.
    pub(crate) fn confirm(&self, i: usize, version: u64, started: Instant) {
        if let Some(c) = self.shards.get(i) {
            c.set(version, self.stamp(started));
        }
    }

    /// The version of shard `i`'s latest confirmation (0: none).
    fn latest(&self, i: usize) -> u64 {
        self.shards.get(i).map_or(0, |c| c.get().0.0)
    }

    /// Whether a map that read shard `i` at version `seen` may route a
    /// read to it without the in-read fence at `now`: a confirmation of
    /// that same version (the latest, or the previous version's) less
    /// than a lease ago. Every change of ownership the shard had
    /// committed by then is in the map, and one committed since has not
    /// let a new owner take a write yet.
    pub(crate) fn holds(&self, i: usize, seen: u64, now: Instant) -> bool {
        let Some(c) = self.shards.get(i) else {
            return false;
        };
        let lease = self.lease_ns.load(Ordering::Relaxed);
        let now = nanos(now.saturating_duration_since(self.base));
        let (latest, prev) = c.get();
        let within = |(version, at): Pair| {
            at != 0 && version == seen && now < (at - 1).saturating_add(lease)
        };
        lease != 0 && (within(latest) || within(prev))
    }
}

impl ShardedCluster {
    /// Whether rows read from shard `i` under a map that read it at
    /// `seen` count: the lease holds now (the statement ran before), or
    /// a read of the shard's version that starts now shows it unchanged.
    /// No renewal when the shard is known at another version already (a
    /// map from before a move: none would show `seen`); one at a time
    /// per shard, and those that waited use its outcome: renewed, the
    /// lease holds; failed after their rows came, they give up at once
    /// (a shard whose primary does not answer costs each read one wait at
    /// most, not a queue of them).
    pub(crate) async fn still_holds(&self, i: usize, seen: u64) -> bool {
        let leases = &self.inner.leases;
        let arrived = Instant::now();
        if leases.holds(i, seen, arrived) {
            return true;
        }
        let (Some(one), Some(failed)) = (leases.renewing.get(i), leases.renew_failed.get(i)) else {
            return false;
        };
        if leases.latest(i) != seen {
            return false;
        }
        let _one = one.lock().await;
        if leases.holds(i, seen, Instant::now()) {
            return true;
        }
        if leases.latest(i) != seen || failed.load(Ordering::Relaxed) >= leases.stamp(arrived) {
            return false;
        }
        let started = Instant::now();
        match self.renew(i).await {
            Some(version) => version == seen,
            None => {
                failed.fetch_max(leases.stamp(started), Ordering::Relaxed);
                false
            }
        }
    }

    /// Reads shard `i`'s version on its primary (within half a lease) and
    /// confirms it (`None`: no answer in time).
    pub(crate) async fn renew(&self, i: usize) -> Option<u64> {
        let shard = self.inner.shards.get(i)?;
        let leases = &self.inner.leases;
        let started = Instant::now();
        let wait = (leases.lease() / 2).max(Duration::from_millis(10));
        let read = shard.db.read_one(Consistency::Strong, VERSION_SQL, &[]);
        let version = match tokio::time::timeout(wait, read).await {
            Ok(Ok(row)) => {
                // A lease changed by hand: a shorter one applies now.
                leases.recorded(super::ownership::lease_of(row.value.try_get(1).ok()?));
                u64::try_from(row.value.try_get::<_, i64>(0).ok()?).ok()?
            }
            _ => return None,
        };
        leases.confirm(i, version, started);
        Some(version)
    }
}

/// Starts the renewals (every `every`, by default a quarter of the
/// current lease; every shard at once); they stop when `closed` is
/// cancelled. A shard whose version moved is followed by a refresh of
/// the map (whose reads confirm every shard), in a task of its own so
/// renewals go on meanwhile, one at a time, backing off while it fails.
pub(crate) fn start(sharded: &ShardedCluster, every: Option<Duration>, closed: &CancellationToken) {
    if sharded.inner.leases.lease().is_zero() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(renew_all(
        Arc::downgrade(&sharded.inner),
        every,
        closed.clone(),
    ));
}

/// Renewals are at least this far apart (a lease set to a few
/// milliseconds by hand would otherwise query every shard continuously).
const MIN_PERIOD: Duration = Duration::from_millis(25);

/// The backoff of a failing refresh started by a renewal: from this,
/// doubling, up to 5 s.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A renewal's refresh: whether one runs, and when the next may start.
struct Refreshing {
    running: bool,
    not_before: Instant,
    backoff: Duration,
}

async fn renew_all(inner: Weak<Inner>, every: Option<Duration>, closed: CancellationToken) {
    let refreshing = Arc::new(std::sync::Mutex::new(Refreshing {
        running: false,
        not_before: Instant::now(),
        backoff: FIRST_BACKOFF,
    }));
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let sharded = ShardedCluster { inner };
        let lease = sharded.inner.leases.lease();
        if lease.is_zero() {
            // Turned off (a shard records 0): it never comes back on in
            // this process.
            return;
        }
        let map = sharded.map();
        let renewed = futures_util::future::join_all(
            (0..sharded.inner.shards.len()).map(|i| sharded.renew(i)),
        )
        .await;
        // A shard that changed ownership since the map read it (or lost
        // changes: its version lower, after a failover): refresh (a shard
        // that did not answer is left to its lease running out).
        let moved = renewed
            .iter()
            .enumerate()
            .any(|(i, v)| v.is_some_and(|v| map.shard_state(i).is_none_or(|(seen, _)| v != seen)));
        if moved {
            start_refresh(&sharded, &refreshing, map.version());
        }
        drop(sharded);
        let period = every.unwrap_or(lease / 4).max(MIN_PERIOD);
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Refreshes the map in a task of its own, unless one runs or the last
/// failed less than its backoff ago.
fn start_refresh(
    sharded: &ShardedCluster,
    refreshing: &Arc<std::sync::Mutex<Refreshing>>,
    seen: u64,
) {
    {
        let mut r = crate::sync::lock(refreshing);
        if r.running || Instant::now() < r.not_before {
            return;
        }
        r.running = true;
    }
    let (sharded, refreshing) = (sharded.clone(), Arc::clone(refreshing));
    /// Clears `running` however the task ends (a panic in a hook).
    struct Running(Arc<std::sync::Mutex<Refreshing>>);
    impl Drop for Running {
        fn drop(&mut self) {
            crate::sync::lock(&self.0).running = false;
        }
    }
    tokio::spawn(async move {
        let running = Running(Arc::clone(&refreshing));
        let result = sharded.refresh_if_not_newer(seen).await;
        drop(running);
        let mut r = crate::sync::lock(&refreshing);
        match result {
            Ok(_) => r.backoff = FIRST_BACKOFF,
            Err(e) => {
                tracing::debug!(error = %e, "shard map: refresh after a renewal failed");
                r.not_before = Instant::now() + r.backoff;
                r.backoff = (r.backoff * 2).min(MAX_BACKOFF);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_for_the_version_confirmed_within_its_length() {
        let leases = Leases::new(1, Duration::from_secs(1));
        let t = |ms: u64| leases.base + Duration::from_millis(ms);
        assert!(!leases.holds(0, 0, t(0)), "never confirmed");
        leases.confirm(0, 5, t(100));
        assert!(leases.holds(0, 5, t(1099)));
        assert!(!leases.holds(0, 5, t(1100)), "ran out");
        assert!(!leases.holds(0, 4, t(200)), "a map older than the shard");
        assert!(
            !leases.holds(0, 6, t(200)),
            "a map newer than the confirmation"
        );
        // An older query's answer, come late, changes nothing.
        leases.confirm(0, 4, t(50));
        assert!(leases.holds(0, 5, t(1099)));
        // The same version later: extended.
        leases.confirm(0, 5, t(900));
        assert!(leases.holds(0, 5, t(1899)));
        // A lower version from a later query: the shard lost changes; no
        // map that read it before holds.
        leases.confirm(0, 3, t(1000));
        assert!(!leases.holds(0, 5, t(1001)));
        assert!(leases.holds(0, 3, t(1001)));
        // A straggler of the lost version, from a query that started
        // before: ignored.
        leases.confirm(0, 5, t(950));
        assert!(!leases.holds(0, 5, t(1001)));
        // A rise keeps the version before usable to its own lease's end
        // (a map that read it routes a slot released since).
        leases.confirm(0, 4, t(1200));
        assert!(leases.holds(0, 4, t(1300)));
        assert!(leases.holds(0, 3, t(1999)));
        assert!(!leases.holds(0, 3, t(2000)));
        // Two rises: only the one before the latest is kept.
        leases.confirm(0, 6, t(1300));
        assert!(!leases.holds(0, 3, t(1301)));
        assert!(leases.holds(0, 4, t(1301)));
        // No lease configured: nothing holds.
        let none = Leases::new(1, Duration::ZERO);
        none.confirm(0, 1, none.base);
        assert!(!none.holds(0, 1, none.base));
    }

    #[test]
    fn an_instance_holds_the_shortest_lease_and_moves_wait_the_longest() {
        let leases = Leases::new(2, Duration::from_secs(5));
        leases.recorded(Duration::from_secs(1));
        leases.recorded(Duration::from_secs(2));
        assert_eq!(leases.lease(), Duration::from_secs(1));
        assert_eq!(
            leases.hold(),
            Duration::from_secs(2) + Duration::from_millis(200) + HOLD_MARGIN
        );
        // Lowered by hand: shorter from now on, and moves keep the longest.
        leases.recorded(Duration::from_millis(300));
        assert_eq!(leases.lease(), Duration::from_millis(300));
        assert!(leases.hold() > Duration::from_secs(2));
        assert_eq!(
            Leases::new(1, Duration::from_secs(1)).hold(),
            Duration::ZERO
        );
    }
}
