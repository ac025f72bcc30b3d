//! The subscription to the invalidation channel: other instances'
//! invalidations applied to this L1 (the fan-out), this instance's own
//! heartbeats heard back (which keep the L1 trusted), and a subscription
//! that went silent for two isolation windows dropped and made again.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::RedisTier;
use super::message::{self, MSG_ALL, MSG_HEARTBEAT, MSG_KEY, MSG_TAG};
use crate::cache::{Instant, Invalidation, RemoteLink, Tag};

impl<K: 'static, R: 'static> RedisTier<K, R> {
    /// Applies one message from the channel: another instance's
    /// invalidation, or this instance's heartbeat coming back.
    fn apply(&self, bytes: &[u8], link: &RemoteLink<K>) {
        let Some(message::Message {
            from,
            version,
            kind,
            payload,
        }) = message::decode(bytes)
        else {
            return;
        };
        let own = from == self.instance;
        if own {
            // Our own invalidations were applied when they were made; our
            // heartbeat says everything published before it has arrived.
            if kind == MSG_HEARTBEAT
                && let Ok(sent) = <[u8; 8]>::try_from(payload)
            {
                self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                link.heard(Instant::from_nanos(u64::from_be_bytes(sent)));
            }
            return;
        }
        let what = match kind {
            MSG_KEY => match self.codec.decode_key(payload) {
                Some(k) => Invalidation::Key(k),
                // A key this instance cannot read: drop everything rather
                // than keep what it may have invalidated.
                None => Invalidation::All,
            },
            MSG_TAG => match std::str::from_utf8(payload) {
                Ok(t) => Invalidation::Tag(Tag::from(t)),
                Err(_) => Invalidation::All,
            },
            MSG_ALL => Invalidation::All,
            _ => return, // other instances' heartbeats, later kinds
        };
        self.stats.fanout_received.fetch_add(1, Ordering::Relaxed);
        link.apply_remote(what, (version != 0).then_some(version));
    }
}

/// Keeps a subscription to the invalidation channel and applies what comes
/// through it. The L1's trust is the heartbeats' business: while this is
/// down no heartbeat comes back, and the L1 stops serving within the
/// isolation window (at once when a subscription is lost).
pub(super) async fn subscribe<K: Send + Sync + 'static, R: Send + Sync + 'static>(
    tier: Weak<RedisTier<K, R>>,
    link: RemoteLink<K>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(t) = tier.upgrade() else { return };
        let client = t.client.clone();
        let channel = t.channel();
        let bound = t.timeout.max(Duration::from_millis(500));
        drop(t);
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(bound, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                redis::RedisResult::Ok(pubsub)
            }) => r.map_err(|_| ()).and_then(|r| r.map_err(|_| ())),
        };
        let Ok(pubsub) = connected else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        };
        backoff = Duration::from_millis(50);
        if let Some(t) = tier.upgrade() {
            t.subscribed.store(true, Ordering::SeqCst);
            t.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
            t.heartbeat_now.store(true, Ordering::Release);
            t.queued.notify_one();
            tracing::info!(prefix = %t.prefix, "redis tier: subscribed to invalidations");
        }
        let mut stream = pubsub.into_on_message();
        // Own heartbeats arrive every quarter window: silence for two
        // windows means a dead (or black-holed) subscription that will
        // never close by itself.
        let silence = tier
            .upgrade()
            .map_or(Duration::from_secs(2), |t| t.isolation_ttl * 2);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                m = tokio::time::timeout(silence, stream.next()) => m,
            };
            let Ok(Some(msg)) = next else { break };
            let Some(t) = tier.upgrade() else { return };
            t.apply(msg.get_payload_bytes(), &link);
        }
        // Lost: no more hits from this L1 until heartbeats come back.
        link.lost();
        if let Some(t) = tier.upgrade() {
            t.subscribed.store(false, Ordering::SeqCst);
            tracing::warn!(prefix = %t.prefix, "redis tier: invalidation subscription lost; L1 off until it is back");
        }
    }
}
