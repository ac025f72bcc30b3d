//! Configuring a tier ([`builder`], [`RedisTierBuilder`]): the settings,
//! their validation, and attaching the tier to a cache (connect,
//! subscribe, start the publisher).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use super::breaker::Breaker;
use super::scripts::Scripts;
use super::{RedisCodec, RedisStats, RedisTier, publisher, subscriber};
use crate::cache::remote::{AttachRemote, RemoteTier};
use crate::error::ConfigError;

/// Starts configuring a tier on the Redis at `url` (`redis://HOST:PORT`).
pub fn builder(url: impl Into<String>) -> RedisTierBuilder {
    RedisTierBuilder {
        url: url.into(),
        prefix: "tower-scale".into(),
        timeout: Duration::from_millis(50),
        lease_ttl: Duration::from_secs(5),
        lease_wait: Duration::from_secs(2),
        failures_to_open: 5,
        open_for: Duration::from_secs(1),
        isolation_ttl: Duration::from_secs(1),
        max_queued: 10_000,
    }
}

/// Settings of a [`RedisTier`]. Its `Debug` output never shows the URL's
/// password.
#[derive(Clone)]
#[must_use]
pub struct RedisTierBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    lease_wait: Duration,
    failures_to_open: u32,
    open_for: Duration,
    isolation_ttl: Duration,
    max_queued: usize,
}

impl std::fmt::Debug for RedisTierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTierBuilder")
            .field("url", &crate::redact::secrets(&self.url))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .field("failures_to_open", &self.failures_to_open)
            .field("open_for", &self.open_for)
            .field("isolation_ttl", &self.isolation_ttl)
            .field("max_queued", &self.max_queued)
            .finish()
    }
}

impl RedisTierBuilder {
    /// How long an instance keeps serving from its L1 without hearing its
    /// own heartbeat back through the invalidation channel (default 1 s;
    /// heartbeats go out every quarter of it). This is the bound on how
    /// long after an invalidation another instance may still serve the old
    /// value when the fan-out is broken. At least 10 ms.
    pub fn isolation_ttl(mut self, ttl: Duration) -> Self {
        self.isolation_ttl = ttl.max(Duration::from_millis(10));
        self
    }

    /// How many invalidations may wait for Redis (default 10,000); past
    /// that they collapse into one invalidation of everything.
    pub fn max_queued_invalidations(mut self, n: usize) -> Self {
        self.max_queued = n.max(1);
        self
    }

    /// Namespace of every key and of the channel (default `tower-scale`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Timeout of each Redis call (default 50 ms).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// How long a fill lease lasts (default 5 s) and how long others wait
    /// for its value (default 2 s).
    pub fn lease(mut self, ttl: Duration, wait: Duration) -> Self {
        self.lease_ttl = ttl;
        self.lease_wait = wait;
        self
    }

    /// The circuit opens after `failures` consecutive failures and stays
    /// open for `open_for` before one probe (defaults: 5, 1 s).
    pub fn circuit(mut self, failures: u32, open_for: Duration) -> Self {
        self.failures_to_open = failures.max(1);
        self.open_for = open_for;
        self
    }

    /// Connects, subscribes to the invalidation channel, and attaches the
    /// tier to `layer`'s cache. Never fails because Redis is down (it keeps
    /// trying); fails for a malformed URL.
    ///
    /// `layer` is a [`CacheLayer`](crate::cache::CacheLayer) or, with the `http`
    /// feature, an `HttpCacheLayer` (whose codec is
    /// `HttpCacheLayer::redis_codec`).
    pub async fn attach<L, C>(
        self,
        layer: &L,
        codec: C,
    ) -> Result<Arc<RedisTier<L::Key, L::Response>>, ConfigError>
    where
        L: AttachRemote,
        L::Key: Send + Sync + 'static,
        L::Response: Send + Sync + 'static,
        C: RedisCodec<L::Key, L::Response>,
    {
        if self.timeout.is_zero() || self.timeout >= self.isolation_ttl {
            return Err(ConfigError::OutOfRange {
                field: "redis timeout",
                reason: format!(
                    "must be above zero and below the isolation window ({:?}), got {:?}",
                    self.isolation_ttl, self.timeout
                ),
            });
        }
        let client =
            redis::Client::open(self.url.as_str()).map_err(|e| ConfigError::OutOfRange {
                field: "redis url",
                reason: e.to_string(),
            })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(500)),
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await
        {
            Ok(Ok(m)) => Some(m),
            _ => None,
        };
        let instance = crate::random::mix(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
                ^ u64::from(std::process::id()),
        );
        // Invalidations may come from threads outside tokio: the tier's
        // tasks run on the runtime it was attached on.
        let runtime = tokio::runtime::Handle::current();
        let tier = Arc::new_cyclic(|me| RedisTier {
            me: me.clone(),
            client,
            config,
            manager: RwLock::new(manager),
            connecting: AtomicBool::new(false),
            runtime: runtime.clone(),
            codec: Box::new(codec),
            prefix: self.prefix,
            timeout: self.timeout,
            lease_ttl: self.lease_ttl,
            lease_wait: self.lease_wait,
            isolation_ttl: self.isolation_ttl,
            instance,
            breaker: Breaker::new(self.failures_to_open, self.open_for),
            subscribed: AtomicBool::new(false),
            stats: RedisStats::default(),
            scripts: Scripts::new(),
            last_error: Mutex::new(None),
            refusing: AtomicBool::new(false),
            queue: Mutex::new(VecDeque::new()),
            max_queued: self.max_queued,
            queued: tokio::sync::Notify::new(),
            heartbeat_now: AtomicBool::new(false),
            timeouts: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            last_queued: AtomicU64::new(0),
            applied: tokio::sync::watch::channel(0).0,
        });
        let link = layer.attach_tier(tier.clone() as Arc<dyn RemoteTier<L::Key, L::Response>>)?;
        // Until its own heartbeat comes back through the subscription,
        // other instances' invalidations cannot reach this L1: no hits.
        link.require_heartbeats(tier.isolation_ttl);
        let shutdown = layer.closed_token();
        runtime.spawn(subscriber::subscribe(
            Arc::downgrade(&tier),
            link.clone(),
            shutdown.clone(),
        ));
        runtime.spawn(publisher::publish(Arc::downgrade(&tier), link, shutdown));
        Ok(tier)
    }
}
