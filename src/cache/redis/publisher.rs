//! The ordered invalidation queue and its publisher: this instance's
//! invalidations wait here, in order, until Redis takes them (a batch at
//! a time, one atomic script each, retried until it goes through; past
//! `max_queued_invalidations` the queue collapses into one "all"); the
//! publisher task also sends the heartbeats every quarter of the
//! isolation window, and flushes what is queued when the cache goes.

use std::collections::VecDeque;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::message::{self, MSG_ALL, MSG_HEARTBEAT, MSG_KEY, MSG_TAG};
use super::{ALL_TAG, RedisTier, ms};
use crate::cache::{Invalidation, RemoteLink};

/// The most invalidations one delivery carries.
const BATCH: usize = 128;

/// An invalidation waiting for Redis.
pub(super) struct Queued<K> {
    seq: u64,
    what: Invalidation<K>,
    version: u64,
}

impl<K: 'static, R: 'static> RedisTier<K, R> {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued<K>>> {
        crate::sync::lock(&self.queue)
    }

    pub(super) fn queue_len(&self) -> usize {
        self.queue().len()
    }

    /// Queues an invalidation for Redis (collapsing the queue into one
    /// "all" when it is full) and wakes the publisher.
    pub(super) fn enqueue(&self, seq: u64, what: Invalidation<K>, version: u64) {
        {
            let mut queue = self.queue();
            if queue.len() >= self.max_queued {
                // Too many waiting: one invalidation of everything stands
                // for all of them (a miss, never a stale hit).
                tracing::warn!(
                    prefix = %self.prefix,
                    queued = queue.len(),
                    "redis tier: invalidation queue full; collapsing it into one invalidation of everything"
                );
                // At the highest version among them: a fill stamped below
                // any of them stays out on the other instances too.
                let version = queue.iter().map(|q| q.version).fold(version, u64::max);
                queue.clear();
                queue.push_back(Queued {
                    seq,
                    what: Invalidation::All,
                    version,
                });
            } else {
                queue.push_back(Queued { seq, what, version });
            }
            self.last_queued.fetch_max(seq, Ordering::AcqRel);
        }
        self.queued.notify_one();
    }

    /// The deadline of the background publisher's calls: at least the
    /// call timeout, up to a quarter of the isolation window (a slower link
    /// still gets its invalidations through).
    fn publish_timeout(&self) -> Duration {
        self.timeout.max(self.isolation_ttl / 4)
    }

    fn message(&self, kind: u8, version: u64, payload: &[u8]) -> Vec<u8> {
        message::encode(self.instance, kind, version, payload)
    }

    fn invalidation_message(&self, what: &Invalidation<K>, version: u64) -> Vec<u8> {
        match what {
            Invalidation::Key(k) => self.message(MSG_KEY, version, &self.codec.encode_key(k)),
            Invalidation::Tag(t) => self.message(MSG_TAG, version, t.as_str().as_bytes()),
            Invalidation::All => self.message(MSG_ALL, version, &[]),
        }
    }

    /// Applies a batch of queued invalidations to Redis and publishes
    /// them, in one script (all or nothing). False if Redis did not take it
    /// (it is retried).
    async fn deliver(&self, items: &[Queued<K>]) -> bool
    where
        K: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let mut keys = vec![self.epoch_key()];
        let mut args = vec![self.channel().into_bytes()];
        for item in items {
            let (kind, target, lease) = match &item.what {
                Invalidation::Key(k) => {
                    let raw = self.codec.encode_key(k);
                    ("k", self.entry_key(&raw), self.lease_key(&raw))
                }
                Invalidation::Tag(t) => {
                    let counter = format!("{}{}", self.tag_prefix(), t.as_str());
                    ("t", counter.clone(), counter)
                }
                Invalidation::All => {
                    let counter = format!("{}{}", self.tag_prefix(), ALL_TAG);
                    ("a", counter.clone(), counter)
                }
            };
            keys.push(target);
            keys.push(lease);
            args.push(kind.as_bytes().to_vec());
            args.push(self.invalidation_message(&item.what, item.version));
        }
        let scripts = &self.scripts;
        let (keys, args) = (&keys, &args);
        let refused: Option<i64> = self
            .call_within(self.publish_timeout(), |mut c| async move {
                scripts.invalidate(&mut c, keys, args).await
            })
            .await;
        match refused {
            None => false,
            Some(0) => {
                self.writes_accepted();
                true
            }
            Some(_) => {
                self.write_refused("generation bump refused; counter deleted instead");
                true
            }
        }
    }

    /// Sends this instance's heartbeat (its clock's time) on the channel,
    /// through a script that writes first: a Redis that would refuse this
    /// instance's invalidations (read-only, `MISCONF`) refuses the
    /// heartbeat too, so every instance isolates instead of trusting an
    /// L1 that a purge it cannot hear of should have emptied.
    async fn heartbeat(&self, link: &RemoteLink<K>)
    where
        K: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let sent_at = link.now().as_nanos();
        let message = self.message(MSG_HEARTBEAT, 0, &sent_at.to_be_bytes());
        let (channel, key) = (self.channel(), self.heartbeat_key());
        // The key outlives a few missed beats, then goes by itself.
        let px = ms(self.isolation_ttl.saturating_mul(2)).max(1);
        let scripts = &self.scripts;
        let (channel, key, message) = (&channel, &key, &message);
        let _: Option<i64> = self
            .call_within(self.publish_timeout(), |mut c| async move {
                scripts.heartbeat(&mut c, key, channel, message, px).await
            })
            .await;
    }

    /// Waits until every invalidation this instance made so far is applied
    /// to Redis and published (so other instances' bound starts), or until
    /// `within` passes. True if they all were.
    ///
    /// `invalidate_*` returns at once and the tier delivers in the
    /// background, usually within one round trip; a writer that needs the
    /// cross-instance bound to count from its own return calls this after
    /// invalidating.
    pub async fn flush(&self, within: Duration) -> bool {
        let target = self.last_queued.load(Ordering::Acquire);
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(within, applied.wait_for(|seq| *seq >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Delivers queued invalidations, a batch at a time, until the queue is
    /// empty (true) or a delivery fails (false, the batch back in front).
    async fn drain(&self, link: &RemoteLink<K>, until: Option<tokio::time::Instant>) -> bool
    where
        K: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        loop {
            let batch: Vec<Queued<K>> = {
                let mut queue = self.queue();
                let n = queue.len().min(BATCH);
                queue.drain(..n).collect()
            };
            let Some(last) = batch.last().map(|q| q.seq) else {
                return true;
            };
            if !self.deliver(&batch).await {
                // Back to the front, before anything queued meanwhile.
                let mut queue = self.queue();
                for item in batch.into_iter().rev() {
                    queue.push_front(item);
                }
                return false;
            }
            link.applied(last);
            self.applied.send_replace(last);
            if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                return true;
            }
        }
    }
}

/// Sends this instance's invalidations to Redis in order, in batches
/// (retrying one that fails, with a backoff of at most a quarter window),
/// and its heartbeats every quarter of the isolation window. On shutdown
/// it flushes what is queued (for at most one isolation window) first.
pub(super) async fn publish<K: Send + Sync + 'static, R: Send + Sync + 'static>(
    tier: Weak<RedisTier<K, R>>,
    link: RemoteLink<K>,
    shutdown: CancellationToken,
) {
    let Some((every, ttl)) = tier
        .upgrade()
        .map(|t| (t.isolation_ttl / 4, t.isolation_ttl))
    else {
        return;
    };
    // A failed delivery is retried at least every quarter window, so after
    // an outage the queue is flushed within the window other instances
    // wait before they use Redis values again.
    let max_backoff = every.min(Duration::from_millis(250));
    let mut next_heartbeat = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        let Some(t) = tier.upgrade() else { return };
        if shutdown.is_cancelled() {
            let until = tokio::time::Instant::now() + ttl;
            while tokio::time::Instant::now() < until && !t.drain(&link, Some(until)).await {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
            return;
        }
        if t.heartbeat_now.swap(false, Ordering::AcqRel)
            || tokio::time::Instant::now() >= next_heartbeat
        {
            next_heartbeat = tokio::time::Instant::now() + every;
            t.heartbeat(&link).await;
        }
        // Heartbeats are not held up by a long queue.
        let failed = !t.drain(&link, Some(next_heartbeat)).await;
        let wait = if failed {
            let pause = backoff;
            backoff = (backoff * 2).min(max_backoff);
            pause
        } else {
            backoff = Duration::from_millis(5);
            next_heartbeat.saturating_duration_since(tokio::time::Instant::now())
        };
        let notified = t.queued.notified();
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = notified, if !failed => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}
