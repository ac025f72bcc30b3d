//! How the tier makes one Redis call: the shared connection (made in the
//! background, replaced after repeated timeouts), the timeout, the circuit
//! breaker, and writes Redis refuses (out of memory), which are not
//! failures of Redis.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::RedisTier;

impl<K: 'static, R: 'static> RedisTier<K, R> {
    /// The connection, or `None` (and a connect started in the
    /// background) while there is none yet. Never waits.
    fn connection(&self) -> Option<ConnectionManager>
    where
        K: Send + Sync,
        R: Send + Sync,
    {
        if let Some(c) = crate::sync::read(&self.manager).clone() {
            return Some(c);
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let tier = self.me.clone();
            let (client, config) = (self.client.clone(), self.config.clone());
            let bound = self.timeout.max(Duration::from_millis(200));
            self.runtime.spawn(async move {
                let made =
                    tokio::time::timeout(bound, ConnectionManager::new_with_config(client, config))
                        .await;
                if let Some(t) = tier.upgrade() {
                    if let Ok(Ok(m)) = made {
                        *crate::sync::write(&t.manager) = Some(m);
                    }
                    t.connecting.store(false, Ordering::Release);
                }
            });
        }
        None
    }

    /// Runs one Redis operation of the request path through the breaker,
    /// with the timeout.
    pub(super) async fn call<T, F, Fut>(&self, op: F) -> Option<T>
    where
        K: Send + Sync,
        R: Send + Sync,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return None;
        }
        self.call_within(self.timeout, op).await
    }

    /// Runs one operation within `deadline`, not held back by an open
    /// circuit (the background publisher paces itself, and its success
    /// closes the circuit at once).
    pub(super) async fn call_within<T, F, Fut>(&self, deadline: Duration, op: F) -> Option<T>
    where
        K: Send + Sync,
        R: Send + Sync,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.connection() else {
            self.failed("no connection");
            return None;
        };
        match tokio::time::timeout(deadline, op(conn)).await {
            Ok(Ok(v)) => {
                self.timeouts.store(0, Ordering::Relaxed);
                self.breaker.success();
                Some(v)
            }
            Ok(Err(e)) if is_refused_write(&e) => {
                // Redis answers, it only refuses to grow: not a failure of
                // Redis (the circuit stays closed, heartbeats go on).
                self.timeouts.store(0, Ordering::Relaxed);
                self.breaker.success();
                self.write_refused(&e.to_string());
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                // A black-holed connection never fails by itself (the
                // client's response timeout does not reconnect): after a
                // few timeouts in a row, replace it.
                if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= 3 {
                    self.timeouts.store(0, Ordering::Relaxed);
                    *crate::sync::write(&self.manager) = None;
                }
                self.failed("timed out");
                None
            }
        }
    }

    pub(super) fn write_refused(&self, error: &str) {
        self.stats.refused_writes.fetch_add(1, Ordering::Relaxed);
        if !self.refusing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                prefix = %self.prefix,
                error,
                "redis tier: Redis refuses writes (out of memory?); fills are not shared, invalidations fall back to deletes"
            );
        }
    }

    pub(super) fn writes_accepted(&self) {
        if self.refusing.load(Ordering::Relaxed) && self.refusing.swap(false, Ordering::AcqRel) {
            tracing::info!(prefix = %self.prefix, "redis tier: Redis accepts writes again");
        }
    }

    fn failed(&self, error: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut last = crate::sync::lock(&self.last_error);
        if last.as_deref() != Some(error) {
            tracing::debug!(error, "redis tier call failed");
            *last = Some(error.to_string());
        }
        self.breaker.failure(error);
    }
}

/// Whether Redis refused a write because it is out of memory.
fn is_refused_write(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed")
}
