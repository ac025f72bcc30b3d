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

/// What a listening session hands the refresher: a version announced, or
/// `0` when the session (re)started listening (refresh once: some
/// announcements may have been missed).
type Heard = tokio::sync::mpsc::UnboundedSender<u64>;

async fn listen_to(inner: Weak<Inner>, index: usize, closed: CancellationToken) {
    let mut retry = FIRST_RETRY;
    loop {
        let Some(db) = inner.upgrade().map(|i| i.shards[index].db.clone()) else {
            return;
        };
        let (heard, mut announced) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let on_notify: crate::pg::OnNotify = {
            let heard: Heard = heard.clone();
            Arc::new(move |payload: &str| {
                if let Ok(version) = payload.parse::<u64>() {
                    let _ = heard.send(version);
                }
            })
        };
        let listening: crate::pg::OnListening = {
            let heard: Heard = heard.clone();
            Arc::new(move |on| {
                if on {
                    let _ = heard.send(0);
                }
            })
        };
        drop(heard);
        let started = tokio::time::Instant::now();
        let session = db.listen(CHANNEL.to_string(), on_notify, listening);
        let refresher = async {
            while let Some(version) = announced.recv().await {
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let sharded = ShardedCluster { inner };
                let seen = sharded.map().version();
                // At the version seen too: a move announces its version
                // twice, at the old owner's release (the range then has no
                // owner) and at the new owner's claim.
                if (version == 0 || version >= seen)
                    && let Err(e) = sharded.refresh_if_not_newer(seen).await
                {
                    tracing::debug!(error = %e, "shard map: refresh after an announcement failed");
                }
            }
            // The session ended (its senders dropped): listen again.
            std::future::pending::<()>().await;
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
