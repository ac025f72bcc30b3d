//! The tier as the cache engine sees it ([`RemoteTier`]): an L2 read (a
//! frame whose tags are all current, decoded by the codec), a fill's
//! write (only under its lease and epoch), the fill leases, and
//! invalidations handed to the ordered queue.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::AsyncCommands;

use super::frame::{decode_frame, encode_frame};
use super::scripts::Put;
use super::{ALL_TAG, RedisTier, ms, now_ms};
use crate::cache::{Invalidation, Lease, RemoteEntry, RemoteTier};

#[async_trait::async_trait]
impl<K, R> RemoteTier<K, R> for RedisTier<K, R>
where
    K: Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    async fn get(&self, key: &K) -> Option<RemoteEntry<R>> {
        let raw = self.codec.encode_key(key);
        let entry_key = self.entry_key(&raw);
        let tag_prefix = self.tag_prefix();
        let scripts = &self.scripts;
        let value: Option<Vec<u8>> = self
            .call(|mut c| async move { scripts.get(&mut c, &entry_key, &tag_prefix).await })
            .await?;
        let Some(bytes) = value else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let decoded = decode_frame(&bytes).and_then(|f| self.codec.decode(f.body).map(|r| (f, r)));
        let Some((frame, response)) = decoded else {
            // Corrupt or from another format: a miss, and gone.
            let entry_key = self.entry_key(&raw);
            let _: Option<()> = self
                .call(|mut c| async move { c.del(&entry_key).await })
                .await;
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let now = now_ms();
        let fresh_for = Duration::from_millis(frame.fresh_until.saturating_sub(now));
        if fresh_for.is_zero() {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(RemoteEntry {
            response,
            fresh_for,
            stale_while_revalidate: Duration::from_millis(frame.swr),
            stale_if_error: Duration::from_millis(frame.sie),
            version: frame.version,
            tags: frame
                .tags
                .into_iter()
                .filter(|t| t.as_str() != ALL_TAG)
                .collect(),
        })
    }

    async fn put(&self, key: &K, entry: RemoteEntry<R>, lease: Lease) {
        let raw = self.codec.encode_key(key);
        let body = self.codec.encode(&entry.response);
        let fresh_until = now_ms().saturating_add(ms(entry.fresh_for));
        let Some(frame) = encode_frame(
            &body,
            fresh_until,
            ms(entry.stale_while_revalidate),
            ms(entry.stale_if_error),
            entry.version,
            &entry.tags,
        ) else {
            // Tags too large for the frame: this entry stays in L1.
            self.release(key, lease).await;
            return;
        };
        // Redis keeps it as long as any window could use it.
        let px = ms(entry
            .fresh_for
            .saturating_add(entry.stale_while_revalidate.max(entry.stale_if_error)))
        .max(1);
        // Only a fill that took its lease (and with it the epoch)
        // before it read is put: a put that read the epoch later could
        // not tell whether an invalidation came between its read and
        // its write.
        let Lease::Acquired { token, epoch } = lease else {
            return;
        };
        let (epoch, token) = (epoch.to_string(), token.to_string());
        let (entry_key, epoch_key, lease_key, tag_prefix) = (
            self.entry_key(&raw),
            self.epoch_key(),
            self.lease_key(&raw),
            self.tag_prefix(),
        );
        let random_start = self.random_start();
        let mut tags: Vec<String> = entry.tags.iter().map(|t| t.as_str().to_string()).collect();
        tags.push(ALL_TAG.to_string());
        let scripts = &self.scripts;
        let put = Put {
            entry_key: &entry_key,
            epoch_key: &epoch_key,
            lease_key: &lease_key,
            epoch: &epoch,
            token: &token,
            frame: &frame,
            px,
            tag_prefix: &tag_prefix,
            random_start,
            tags: &tags,
        };
        let stored: Option<i64> = self
            .call(|mut c| async move { scripts.put(&mut c, put).await })
            .await;
        if stored.is_some() {
            self.writes_accepted();
        }
    }

    async fn lease(&self, key: &K) -> Lease {
        let raw = self.codec.encode_key(key);
        let n = self.tokens.fetch_add(1, Ordering::Relaxed);
        let token = crate::random::mix(self.instance ^ n.rotate_left(32) ^ now_ms());
        let (lease_key, epoch_key) = (self.lease_key(&raw), self.epoch_key());
        let px = ms(self.lease_ttl).max(1);
        let random_start = self.random_start();
        let scripts = &self.scripts;
        let got: Option<Option<String>> = self
            .call(|mut c| async move {
                scripts
                    .lease(&mut c, &lease_key, &epoch_key, token, px, random_start)
                    .await
            })
            .await;
        match got {
            None => Lease::Unavailable,
            Some(None) => {
                self.stats.lease_waits.fetch_add(1, Ordering::Relaxed);
                Lease::Busy
            }
            Some(Some(epoch)) => match epoch.parse() {
                Ok(epoch) => Lease::Acquired { token, epoch },
                // Not a number we wrote: fill without the lease.
                Err(_) => Lease::Unavailable,
            },
        }
    }

    async fn release(&self, key: &K, lease: Lease) {
        let Lease::Acquired { token, .. } = lease else {
            return;
        };
        let lease_key = self.lease_key(&self.codec.encode_key(key));
        let scripts = &self.scripts;
        let _: Option<i64> = self
            .call(|mut c| async move { scripts.release(&mut c, &lease_key, token).await })
            .await;
    }

    fn invalidate(&self, seq: u64, what: Invalidation<K>, version: Option<u64>) {
        self.enqueue(seq, what, version.unwrap_or(0));
    }

    fn lease_wait(&self) -> Duration {
        self.lease_wait
    }
}
