//! Streaming one session: decode, apply at the commit position, confirm
//! only what every fed cache applied and published, and watch the primary.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use pgwire_replication::{ReplicationClient, ReplicationEvent};

use super::FeedError;
use super::apply::Decoder;
use super::run::{Ended, FLUSH_MESSAGE, Shared};
use super::sink::all_published;
use crate::pg::lsn::Lsn;

/// Invalidations a cache's shared tier may have waiting before the feed
/// stops reading the stream until the tier catches up (the slot keeps the
/// WAL meanwhile). Without it a burst of row changes outruns the tier and
/// its queue collapses into "invalidate everything" on every instance.
const MAX_BACKLOG: u64 = 1_000;
/// Consecutive confirmations the shared tier failed before the holder
/// gives up the lease (another instance may reach the tier).
const MAX_PUBLISH_FAILURES: u32 = 3;
/// How long the primary may look unhealthy to the monitor before the feed
/// drops its stream and reconnects (a black-holed server sends nothing, and
/// an idle stream sends nothing either).
const UNHEALTHY_GRACE: Duration = Duration::from_secs(3);

/// How long a stopping session waits for the server to have been told
/// the last confirmed position (the standby status goes out once per
/// second): without it a holder stopped within a second of confirming
/// leaves its successor to replay, and a slot it had just made would be
/// flushed a second time by the next holder.
pub(super) const FINAL_FEEDBACK: Duration = Duration::from_secs(3);

type Confirming = Option<(u64, Pin<Box<dyn Future<Output = bool> + Send>>)>;

/// A stop: finishes a confirmation in flight (what was applied and is
/// being published), then waits until the position this session
/// confirmed has reached the server, so the next holder resumes from it;
/// [`FINAL_FEEDBACK`] at most in all.
async fn stopped(shared: &Shared, client: &ReplicationClient, confirming: Confirming) -> Ended {
    let deadline = Instant::now() + FINAL_FEEDBACK;
    if let Some((lsn, wait)) = confirming
        && tokio::time::timeout(FINAL_FEEDBACK, wait).await == Ok(true)
    {
        client.update_applied_lsn(pgwire_replication::Lsn(lsn));
        shared.update(|s| s.confirmed = Some(Lsn(lsn)));
    }
    while client.feedback_pending_since().is_some()
        && client.is_running()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ended::Stopped
}

/// Streams until stopped, broken or moved.
/// `flushed`: this session already flushed for the slot it made, so the
/// flush message it wrote is applied again but not counted again.
pub(super) async fn stream(
    shared: &Shared,
    client: &mut ReplicationClient,
    idx: usize,
    mut flushed: bool,
) -> Result<Ended, FeedError> {
    let mut decoder = Decoder::new(shared.row_limit);
    let mut in_transaction = false;
    // The highest position applied (and, once published, confirmable).
    let mut applied = 0u64;
    let mut confirmed = 0u64;
    let mut confirming: Confirming = None;
    let mut unhealthy_since: Option<Instant> = None;
    let mut publish_failures = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if confirming.is_none() && applied > confirmed {
            confirming = Some((
                applied,
                Box::pin(all_published(&shared.sinks, shared.publish_timeout)),
            ));
        }
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => return Ok(stopped(shared, client, confirming.take()).await),
            ok = async {
                match confirming.as_mut() {
                    Some((_, wait)) => wait.await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((lsn, _)) = confirming.take() {
                    if ok {
                        publish_failures = 0;
                        client.update_applied_lsn(pgwire_replication::Lsn(lsn));
                        confirmed = lsn;
                        shared.update(|s| s.confirmed = Some(Lsn(lsn)));
                    } else {
                        publish_failures += 1;
                        if publish_failures >= MAX_PUBLISH_FAILURES {
                            return Ok(Ended::Yielded);
                        }
                    }
                }
            }
            event = client.recv() => {
                let event = event
                    .map_err(|e| FeedError::Server(e.to_string()))?
                    .ok_or_else(|| FeedError::Server("the replication stream ended".into()))?;
                match event {
                    ReplicationEvent::Begin { .. } => {
                        decoder.begin();
                        in_transaction = true;
                    }
                    ReplicationEvent::XLogData { data, .. } => {
                        decoder
                            .message(&data)
                            .map_err(|e| FeedError::Protocol(e.to_string()))?;
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        in_transaction = false;
                        let committed = decoder
                            .commit()
                            .map_err(|e| FeedError::Protocol(e.to_string()))?;
                        let end = end_lsn.as_u64();
                        shared.apply(&committed, end);
                        applied = applied.max(end);
                        if shared.sinks.iter().any(|s| s.backlog() > MAX_BACKLOG) {
                            tokio::select! {
                                () = shared.stop.cancelled() => return Ok(stopped(shared, client, confirming.take()).await),
                                ok = all_published(&shared.sinks, shared.publish_timeout) => {
                                    if !ok {
                                        publish_failures += 1;
                                        if publish_failures >= MAX_PUBLISH_FAILURES {
                                            return Ok(Ended::Yielded);
                                        }
                                    }
                                }
                            }
                        }
                        shared.metrics.transactions.increment(1);
                        shared.metrics.rows.increment(committed.rows);
                        shared.update(|s| {
                            s.applied = Some(Lsn(applied));
                            s.transactions += 1;
                            s.rows += committed.rows;
                        });
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        // Every transaction that committed before the
                        // server's sent position was sent before this.
                        if !in_transaction && wal_end.as_u64() > applied {
                            applied = wal_end.as_u64();
                            shared.update(|s| s.applied = Some(Lsn(applied)));
                        }
                    }
                    // Ours only: the message goes to every slot of the
                    // database, so it names the slot it is for.
                    ReplicationEvent::Message { prefix, lsn, content, transactional: false }
                        if prefix == FLUSH_MESSAGE
                            && content.as_ref() == shared.slot.as_bytes()
                            && !in_transaction =>
                    {
                        shared.flush(Some(lsn.as_u64()), !flushed);
                        flushed = false;
                        applied = applied.max(lsn.as_u64());
                        shared.update(|s| s.applied = Some(Lsn(applied)));
                    }
                    ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
                }
            }
            _ = tick.tick() => {
                let inner = &shared.cluster.inner;
                if inner.primary.load(std::sync::atomic::Ordering::Acquire) != idx {
                    return Ok(Ended::Moved);
                }
                let Some(node) = inner.nodes.get(idx) else {
                    return Ok(Ended::Moved);
                };
                if node.is_healthy() {
                    unhealthy_since = None;
                } else if unhealthy_since.get_or_insert_with(Instant::now).elapsed() > UNHEALTHY_GRACE {
                    return Ok(Ended::Moved);
                }
                let behind = node.lsn().0.saturating_sub(confirmed.max(1));
                #[allow(clippy::cast_precision_loss)]
                shared.metrics.bytes_behind.set(behind as f64);
            }
        }
    }
}
