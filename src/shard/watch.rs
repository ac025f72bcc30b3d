//! Map announcements (the fan-out): every change of ownership notifies
//! [`CHANNEL`] with the new map version, in the transaction that changes
//! it (so the notification is delivered when, and only if, it commits);
//! every instance listens on every shard's primary (a session of its own
//! per shard, following failovers) and refreshes its map when a version
//! newer than its own is announced. An instance so learns of a move made
//! by another within a notification's delay, without waiting for a
//! refused request; its [`on_slots_moved`](super::ShardedClusterBuilder::on_slots_moved)
//! hooks fire then.
//!
//! Notifications can be lost (a listening session that drops, a server
//! restart): each time a session starts listening, the map is refreshed
//! once, and the fence stays what makes a stale map harmless.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::cluster::{Inner, ShardedCluster};

/// The channel map versions are announced on.
pub const CHANNEL: &str = "tower_scale_shard_map";

/// The statement a transaction that changes ownership runs (the payload:
/// the new version, as text).
pub(crate) const ANNOUNCE: &str = "SELECT pg_notify('tower_scale_shard_map', $1::int8::text)";

/// Waits between listening attempts on a shard whose session failed at
/// once: from this, doubling, up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Starts one listener per shard; they stop when `closed` is cancelled
/// (the cluster's last handle dropped).
pub(crate) fn start(sharded: &ShardedCluster, closed: &CancellationToken) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for index in 0..sharded.inner.shards.len() {
        runtime.spawn(listen_to(
            Arc::downgrade(&sharded.inner),
            index,
            closed.clone(),
        ));
    }
}

/// What the listening sessions of one shard heard and the refresher has
/// not acted on yet: the highest version announced, and whether a session
/// (re)started listening (refresh once: announcements may have been
/// missed). Announcements coalesce here: a flood of them (any role may
/// `NOTIFY`) makes back-to-back refreshes at most, one per
/// [`MIN_SPACING`], never a queue.
#[derive(Default)]
struct Heard {
    highest: u64,
    resync: bool,
}

/// Refreshes started by announcements are at least this far apart.
const MIN_SPACING: Duration = Duration::from_millis(20);

async fn listen_to(inner: Weak<Inner>, index: usize, closed: CancellationToken) {
    let mut retry = FIRST_RETRY;
    let heard = Arc::new((
        std::sync::Mutex::new(Heard::default()),
        tokio::sync::Notify::new(),
    ));
    loop {
        let Some(db) = inner.upgrade().map(|i| i.shards[index].db.clone()) else {
            return;
        };
        let on_notify: crate::pg::OnNotify = {
            let heard = Arc::clone(&heard);
            Arc::new(move |payload: &str| {
                if let Ok(version) = payload.parse::<u64>() {
                    let mut h = crate::sync::lock(&heard.0);
                    h.highest = h.highest.max(version);
                    drop(h);
                    heard.1.notify_one();
                }
            })
        };
        let listening: crate::pg::OnListening = {
            let heard = Arc::clone(&heard);
            Arc::new(move |on| {
                if on {
                    crate::sync::lock(&heard.0).resync = true;
                    heard.1.notify_one();
                }
            })
        };
        let started = tokio::time::Instant::now();
        let session = db.listen(CHANNEL.to_string(), on_notify, listening);
        let refresher = async {
            loop {
                heard.1.notified().await;
                let (highest, resync) = {
                    let mut h = crate::sync::lock(&heard.0);
                    (h.highest, std::mem::take(&mut h.resync))
                };
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let sharded = ShardedCluster { inner };
                // Compared under the refresh lock: a move announces its
                // version at the old owner's release (the range then has
                // no owner) and again at the new owner's claim; a map at
                // that version may predate the claim.
                let refreshed = match resync {
                    true => sharded.refresh().await,
                    false => sharded.refresh_if_not_newer(highest).await,
                };
                if let Err(e) = refreshed {
                    tracing::debug!(error = %e, "shard map: refresh after an announcement failed");
                }
                drop(sharded);
                tokio::time::sleep(MIN_SPACING).await;
            }
        };
        tokio::select! {
            () = closed.cancelled() => return,
            ended = session => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "shard map: listening again");
                }
            }
            () = refresher => return,
        }
        // A session that listened a while is retried at once; one that
        // failed at once backs off.
        let wait = if started.elapsed() >= Duration::from_secs(1) {
            retry = FIRST_RETRY;
            Duration::ZERO
        } else {
            let wait = retry;
            retry = (retry * 2).min(MAX_RETRY);
            wait
        };
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// A handle on a [`ShardedCluster`] that does not keep it alive: for what
/// the cluster itself holds (an [`on_slots_moved`](super::ShardedClusterBuilder::on_slots_moved)
/// hook, a cache policy whose invalidator such a hook holds), where a
/// strong handle would make a cycle and the cluster, its listeners and
/// its pools would never be dropped.
///
/// ```no_run
/// # async fn demo(sharded: tower_scale::shard::ShardedCluster) {
/// let weak = sharded.downgrade();
/// assert!(weak.upgrade().is_some());
/// drop(sharded);
/// # }
/// ```
#[derive(Clone)]
pub struct WeakShardedCluster(Weak<Inner>);

impl std::fmt::Debug for WeakShardedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakShardedCluster")
    }
}

impl WeakShardedCluster {
    /// The cluster, while a strong handle exists.
    pub fn upgrade(&self) -> Option<ShardedCluster> {
        self.0.upgrade().map(|inner| ShardedCluster { inner })
    }
}

impl ShardedCluster {
    /// A [`WeakShardedCluster`] of this cluster.
    pub fn downgrade(&self) -> WeakShardedCluster {
        WeakShardedCluster(Arc::downgrade(&self.inner))
    }
}
