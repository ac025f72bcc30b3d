//! The shared cache tier on Redis (feature `redis`): many instances behave
//! as one cache.
//!
//! - **L2 store**: an L1 miss does one Redis round trip (a script that
//!   returns the value only if none of its tags changed since it was
//!   stored); a fill writes L2 (expiring with the entry's windows) and L1.
//!   Values are a compact, versioned binary frame around your codec's bytes;
//!   a value that does not decode is a miss and is deleted.
//! - **Invalidation fan-out**: invalidations go to Redis (key: deleted;
//!   tag and all: a generation counter, O(1)) and are published on one
//!   channel; every instance applies the others' to its L1. An instance
//!   that loses its subscription stops serving from its L1 (and clears it)
//!   until it is subscribed again.
//! - **Distributed single-flight**: a lease (`SET NX PX` with a token) makes
//!   one instance fill a cold key while the others wait for its value (with
//!   a bound, then fill themselves). Any invalidation during a fill cancels
//!   its put (the put checks the invalidation epoch and the lease).
//! - **Fail-open**: every call has a short timeout; a circuit breaker stops
//!   calling Redis after repeated failures and probes it again later; state
//!   changes are logged once. Requests never fail because of Redis.
//!
//! The client is the `redis` crate's tokio `ConnectionManager` (it
//! reconnects by itself, multiplexes, and is the crate's maintained async
//! path) plus a dedicated pub/sub connection.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::invalidate::{Invalidation, Invalidator, Tag};
use super::remote::{BoxFuture, Lease, RemoteEntry, RemoteTier};
use crate::error::ConfigError;

/// Turns keys and responses into bytes and back.
pub trait RedisCodec<K, R>: Send + Sync + 'static {
    /// The key's bytes (part of the Redis key).
    fn encode_key(&self, key: &K) -> Vec<u8>;
    /// The key from its bytes (for invalidations from other instances).
    fn decode_key(&self, bytes: &[u8]) -> Option<K>;
    /// The response's bytes.
    fn encode(&self, response: &R) -> Vec<u8>;
    /// The response from its bytes; `None` if they do not decode.
    fn decode(&self, bytes: &[u8]) -> Option<R>;
}

/// Settings of a [`RedisTier`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisTierBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    lease_wait: Duration,
    failures_to_open: u32,
    open_for: Duration,
}

impl RedisTierBuilder {
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
    pub async fn attach<P, St, C>(
        self,
        layer: &super::CacheLayer<P, St>,
        codec: C,
    ) -> Result<Arc<RedisTier<St::Key, St::Response>>, ConfigError>
    where
        P: Send + Sync + 'static,
        St: super::Store,
        C: RedisCodec<St::Key, St::Response>,
    {
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
        let tier = Arc::new(RedisTier {
            client,
            config,
            manager: tokio::sync::Mutex::new(manager),
            codec: Box::new(codec),
            prefix: self.prefix,
            timeout: self.timeout,
            lease_ttl: self.lease_ttl,
            lease_wait: self.lease_wait,
            instance,
            breaker: Breaker::new(self.failures_to_open, self.open_for),
            subscribed: AtomicBool::new(false),
            stats: RedisStats::default(),
            get_script: Script::new(GET_SCRIPT),
            put_script: Script::new(PUT_SCRIPT),
            lease_script: Script::new(LEASE_SCRIPT),
            last_error: Mutex::new(None),
        });
        let invalidator = layer.invalidator();
        // Until the subscription runs, other instances' invalidations
        // cannot reach this L1: do not serve from it.
        invalidator.set_local_trusted(false);
        layer.attach_remote(tier.clone() as Arc<dyn RemoteTier<St::Key, St::Response>>);
        tokio::spawn(subscribe(
            Arc::downgrade(&tier),
            invalidator,
            layer.shutdown_token(),
        ));
        Ok(tier)
    }
}

/// Counters of the shared tier (also in the `metrics` facade as
/// `tower_scale_cache_l2_*`).
#[derive(Debug, Default)]
pub struct RedisStats {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    fanout_received: AtomicU64,
    lease_waits: AtomicU64,
    subscriptions: AtomicU64,
}

/// A snapshot of [`RedisStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStatsSnapshot {
    /// L1 misses answered by Redis.
    pub hits: u64,
    /// L1 misses Redis did not have.
    pub misses: u64,
    /// Failed or timed-out Redis calls.
    pub errors: u64,
    /// Invalidations received from other instances.
    pub fanout_received: u64,
    /// Fills that waited for another instance's lease.
    pub lease_waits: u64,
    /// True while the circuit is open (Redis not called).
    pub circuit_open: bool,
    /// True while subscribed to the invalidation channel.
    pub subscribed: bool,
    /// Successful subscriptions so far (more than one: it was lost and regained).
    pub subscriptions: u64,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

/// Stops calling Redis after repeated failures; lets one call through
/// after a pause to see whether it is back.
#[derive(Debug)]
struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    opened_at_ms: AtomicU64,
    threshold: u32,
    open_for: Duration,
    start: Instant,
}

impl Breaker {
    fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            threshold,
            open_for,
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// May a call go to Redis now? While open, one call per pause probes.
    fn allow(&self) -> bool {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return true;
        }
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        let due = opened + u64::try_from(self.open_for.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        // The probe: the first caller past the pause moves the clock on.
        now >= due
            && self
                .opened_at_ms
                .compare_exchange(opened, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.state.swap(CLOSED, Ordering::AcqRel) == OPEN {
            tracing::info!("redis tier: circuit closed, Redis answers again");
        }
    }

    fn failure(&self, error: &str) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold && self.state.swap(OPEN, Ordering::AcqRel) == CLOSED {
            self.opened_at_ms.store(self.now_ms(), Ordering::Release);
            tracing::warn!(error, "redis tier: circuit open, serving without Redis");
        }
    }

    fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }
}

/// The shared tier on Redis; see the [module docs](self).
pub struct RedisTier<K, R> {
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    codec: Box<dyn RedisCodec<K, R>>,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    lease_wait: Duration,
    instance: u64,
    breaker: Breaker,
    subscribed: AtomicBool,
    stats: RedisStats,
    get_script: Script,
    put_script: Script,
    lease_script: Script,
    last_error: Mutex<Option<String>>,
}

impl<K, R> fmt::Debug for RedisTier<K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.prefix)
            .field("circuit_open", &self.breaker.is_open())
            .field("subscribed", &self.subscribed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Returns the value if every tag generation recorded with it is current;
/// otherwise deletes it. KEYS[1] = entry; ARGV[1] = the tag-key prefix.
const GET_SCRIPT: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'v', 'g')
if not h[1] then return false end
local g = h[2] or ''
for tag, gen in string.gmatch(g, "([^\n]*)\n([^\n]*)\n") do
  local cur = redis.call('GET', ARGV[1] .. tag) or '0'
  if cur ~= gen then
    redis.call('DEL', KEYS[1])
    return false
  end
end
return h[1]
"#;

/// Stores a value unless an invalidation happened since the fill began
/// (the epoch moved) or its lease was cancelled. KEYS[1] = entry,
/// KEYS[2] = epoch, KEYS[3] = lease; ARGV = epoch at start, lease token
/// ('' for none), value, px, tag-key prefix, tags...
const PUT_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2]) or '0'
if epoch ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[2] then return 0 end
local g = ''
for i = 6, #ARGV do
  g = g .. ARGV[i] .. '\n' .. (redis.call('GET', ARGV[5] .. ARGV[i]) or '0') .. '\n'
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'g', g)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[2] ~= '' then redis.call('DEL', KEYS[3]) end
return 1
"#;

/// Takes the lease (SET NX PX) and returns the epoch, or false if taken.
/// KEYS[1] = lease, KEYS[2] = epoch; ARGV = token, px.
const LEASE_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('GET', KEYS[2]) or '0'
end
return false
"#;

const FORMAT: u8 = 1;
/// Every entry carries this tag, so `invalidate_all` is one INCR.
const ALL_TAG: &str = "\u{1}all";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The frame around a value: format, absolute fresh-until (Unix ms), the
/// stale windows, the version, the tags, then the codec's bytes.
fn encode_frame(
    entry_bytes: &[u8],
    fresh_until: u64,
    swr: u64,
    sie: u64,
    version: Option<u64>,
    tags: &[Tag],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry_bytes.len() + 40);
    out.push(FORMAT);
    out.extend_from_slice(&fresh_until.to_be_bytes());
    out.extend_from_slice(&swr.to_be_bytes());
    out.extend_from_slice(&sie.to_be_bytes());
    out.push(u8::from(version.is_some()));
    out.extend_from_slice(&version.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&u16::try_from(tags.len()).unwrap_or(u16::MAX).to_be_bytes());
    for tag in tags.iter().take(usize::from(u16::MAX)) {
        let t = tag.as_str().as_bytes();
        let len = u16::try_from(t.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&t[..usize::from(len)]);
    }
    out.extend_from_slice(entry_bytes);
    out
}

struct Frame<'a> {
    fresh_until: u64,
    swr: u64,
    sie: u64,
    version: Option<u64>,
    tags: Vec<Tag>,
    body: &'a [u8],
}

fn decode_frame(bytes: &[u8]) -> Option<Frame<'_>> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    };
    let u64_at = |at: &mut usize| -> Option<u64> {
        let mut w = [0u8; 8];
        w.copy_from_slice(take(at, 8)?);
        Some(u64::from_be_bytes(w))
    };
    if *take(&mut at, 1)?.first()? != FORMAT {
        return None;
    }
    let fresh_until = u64_at(&mut at)?;
    let swr = u64_at(&mut at)?;
    let sie = u64_at(&mut at)?;
    let has_version = *take(&mut at, 1)?.first()? == 1;
    let version = u64_at(&mut at)?;
    let mut n = [0u8; 2];
    n.copy_from_slice(take(&mut at, 2)?);
    let mut tags = Vec::new();
    for _ in 0..u16::from_be_bytes(n) {
        let mut l = [0u8; 2];
        l.copy_from_slice(take(&mut at, 2)?);
        let t = take(&mut at, usize::from(u16::from_be_bytes(l)))?;
        tags.push(Tag::from(std::str::from_utf8(t).ok()?));
    }
    Some(Frame {
        fresh_until,
        swr,
        sie,
        version: has_version.then_some(version),
        tags,
        body: bytes.get(at..)?,
    })
}

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
    }
}

impl<K: 'static, R: 'static> RedisTier<K, R> {
    /// The counters so far; also recorded in the `metrics` facade.
    pub fn stats(&self) -> RedisStatsSnapshot {
        let s = RedisStatsSnapshot {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
            fanout_received: self.stats.fanout_received.load(Ordering::Relaxed),
            lease_waits: self.stats.lease_waits.load(Ordering::Relaxed),
            circuit_open: self.breaker.is_open(),
            subscribed: self.subscribed.load(Ordering::Relaxed),
            subscriptions: self.stats.subscriptions.load(Ordering::Relaxed),
        };
        for (name, v) in [
            ("tower_scale_cache_l2_redis_hits_total", s.hits),
            ("tower_scale_cache_l2_misses_total", s.misses),
            ("tower_scale_cache_l2_errors_total", s.errors),
            (
                "tower_scale_cache_l2_fanout_received_total",
                s.fanout_received,
            ),
            ("tower_scale_cache_l2_lease_waits_total", s.lease_waits),
        ] {
            metrics::counter!(name, "prefix" => self.prefix.clone()).absolute(v);
        }
        metrics::gauge!("tower_scale_cache_l2_circuit_open", "prefix" => self.prefix.clone())
            .set(if s.circuit_open { 1.0 } else { 0.0 });
        s
    }

    fn entry_key(&self, key: &[u8]) -> String {
        format!("{}:e:{}", self.prefix, hex(key))
    }
    fn lease_key(&self, key: &[u8]) -> String {
        format!("{}:l:{}", self.prefix, hex(key))
    }
    fn tag_prefix(&self) -> String {
        format!("{}:t:", self.prefix)
    }
    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:invalidate", self.prefix)
    }

    /// Runs one Redis operation through the breaker, with the timeout.
    async fn call<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return None;
        }
        let conn = {
            let mut guard = self.manager.lock().await;
            if guard.is_none() {
                let made = tokio::time::timeout(
                    self.timeout.max(Duration::from_millis(200)),
                    ConnectionManager::new_with_config(self.client.clone(), self.config.clone()),
                )
                .await;
                if let Ok(Ok(m)) = made {
                    *guard = Some(m);
                }
            }
            guard.clone()
        };
        let Some(conn) = conn else {
            self.failed("no connection");
            return None;
        };
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => {
                self.breaker.success();
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timed out");
                None
            }
        }
    }

    fn failed(&self, error: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(error) {
            tracing::debug!(error, "redis tier call failed");
            *last = Some(error.to_string());
        }
        self.breaker.failure(error);
    }

    fn message(&self, what: &Invalidation<K>, version: u64) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        match what {
            Invalidation::Key(k) => {
                out.push(0);
                out.extend_from_slice(&self.codec.encode_key(k));
            }
            Invalidation::Tag(t) => {
                out.push(1);
                out.extend_from_slice(t.as_str().as_bytes());
            }
            Invalidation::All => out.push(2),
        }
        Some(out)
    }

    fn apply(&self, bytes: &[u8], invalidator: &Invalidator<K>) {
        if bytes.len() < 17 {
            return;
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[..8]);
        if u64::from_be_bytes(w) == self.instance {
            return; // our own, applied already
        }
        w.copy_from_slice(&bytes[8..16]);
        let version = u64::from_be_bytes(w);
        let what = match bytes[16] {
            0 => match self.codec.decode_key(&bytes[17..]) {
                Some(k) => Invalidation::Key(k),
                None => return,
            },
            1 => match std::str::from_utf8(&bytes[17..]) {
                Ok(t) => Invalidation::Tag(Tag::from(t)),
                Err(_) => return,
            },
            2 => Invalidation::All,
            _ => return,
        };
        self.stats.fanout_received.fetch_add(1, Ordering::Relaxed);
        invalidator.invalidate_local(what, version);
    }
}

impl<K, R> RemoteTier<K, R> for RedisTier<K, R>
where
    K: Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    fn get<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Option<RemoteEntry<R>>> {
        Box::pin(async move {
            let raw = self.codec.encode_key(key);
            let entry_key = self.entry_key(&raw);
            let tag_prefix = self.tag_prefix();
            let script = &self.get_script;
            let value: Option<Vec<u8>> = self
                .call(|mut c| async move {
                    script
                        .key(&entry_key)
                        .arg(&tag_prefix)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            let Some(bytes) = value else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            let decoded =
                decode_frame(&bytes).and_then(|f| self.codec.decode(f.body).map(|r| (f, r)));
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
        })
    }

    fn put<'a>(&'a self, key: &'a K, entry: RemoteEntry<R>, lease: Lease) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let raw = self.codec.encode_key(key);
            let body = self.codec.encode(&entry.response);
            let fresh_until = now_ms().saturating_add(ms(entry.fresh_for));
            let frame = encode_frame(
                &body,
                fresh_until,
                ms(entry.stale_while_revalidate),
                ms(entry.stale_if_error),
                entry.version,
                &entry.tags,
            );
            // Redis keeps it as long as any window could use it.
            let px =
                ms(entry.fresh_for + entry.stale_while_revalidate.max(entry.stale_if_error)).max(1);
            let (epoch, token) = match lease {
                Lease::Acquired { token, epoch } => (epoch.to_string(), token.to_string()),
                // Without a lease (a background refresh) compare with the
                // epoch now: only a refresh that raced an invalidation
                // between its own read and write could slip by, and that
                // invalidation also reaches every L1.
                _ => {
                    let epoch_key = self.epoch_key();
                    let now: Option<Option<String>> = self
                        .call(|mut c| async move { c.get(&epoch_key).await })
                        .await;
                    let Some(now) = now else { return };
                    (now.unwrap_or_else(|| "0".into()), String::new())
                }
            };
            let (entry_key, epoch_key, lease_key, tag_prefix) = (
                self.entry_key(&raw),
                self.epoch_key(),
                self.lease_key(&raw),
                self.tag_prefix(),
            );
            let mut tags: Vec<String> = entry.tags.iter().map(|t| t.as_str().to_string()).collect();
            tags.push(ALL_TAG.to_string());
            let script = &self.put_script;
            let _: Option<i64> = self
                .call(|mut c| async move {
                    let mut inv = script.prepare_invoke();
                    inv.key(&entry_key).key(&epoch_key).key(&lease_key);
                    inv.arg(&epoch)
                        .arg(&token)
                        .arg(&frame)
                        .arg(px)
                        .arg(&tag_prefix);
                    for t in &tags {
                        inv.arg(t);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await;
        })
    }

    fn lease<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Lease> {
        Box::pin(async move {
            let raw = self.codec.encode_key(key);
            let token = crate::random::mix(self.instance ^ now_ms() ^ raw.len() as u64);
            let (lease_key, epoch_key) = (self.lease_key(&raw), self.epoch_key());
            let px = ms(self.lease_ttl).max(1);
            let script = &self.lease_script;
            let got: Option<Option<String>> = self
                .call(|mut c| async move {
                    script
                        .key(&lease_key)
                        .key(&epoch_key)
                        .arg(token)
                        .arg(px)
                        .invoke_async(&mut c)
                        .await
                })
                .await;
            match got {
                None => Lease::Unavailable,
                Some(None) => {
                    self.stats.lease_waits.fetch_add(1, Ordering::Relaxed);
                    Lease::Busy
                }
                Some(Some(epoch)) => Lease::Acquired {
                    token,
                    epoch: epoch.parse().unwrap_or(0),
                },
            }
        })
    }

    fn invalidate<'a>(&'a self, what: &'a Invalidation<K>, version: u64) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(message) = self.message(what, version) else {
                return;
            };
            let mut pipe = redis::pipe();
            pipe.atomic();
            match what {
                Invalidation::Key(k) => {
                    let raw = self.codec.encode_key(k);
                    pipe.del(self.entry_key(&raw)).ignore();
                    pipe.del(self.lease_key(&raw)).ignore();
                }
                Invalidation::Tag(t) => {
                    pipe.incr(format!("{}{}", self.tag_prefix(), t.as_str()), 1)
                        .ignore();
                }
                _ => {
                    pipe.incr(format!("{}{}", self.tag_prefix(), ALL_TAG), 1)
                        .ignore();
                }
            }
            pipe.incr(self.epoch_key(), 1).ignore();
            pipe.publish(self.channel(), message).ignore();
            let pipe = &pipe;
            let _: Option<()> = self
                .call(|mut c| async move { pipe.query_async(&mut c).await })
                .await;
        })
    }

    fn lease_wait(&self) -> Duration {
        self.lease_wait
    }
}

/// Keeps a subscription to the invalidation channel; while it is down the
/// instance's L1 is not trusted.
async fn subscribe<K: Send + Sync + 'static, R: Send + Sync + 'static>(
    tier: std::sync::Weak<RedisTier<K, R>>,
    invalidator: Invalidator<K>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(t) = tier.upgrade() else { return };
        let client = t.client.clone();
        let channel = t.channel();
        drop(t);
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(1), async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                redis::RedisResult::Ok(pubsub)
            }) => r.map_err(|_| ()).and_then(|r| r.map_err(|_| ())),
        };
        let Ok(pubsub) = connected else {
            // Redis is unreachable: nobody can publish invalidations now, and
            // requests must not suffer; serve from this (flushed) L1, bounded
            // by TTLs, until the subscription is back.
            invalidator.set_local_trusted(true);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        };
        backoff = Duration::from_millis(50);
        // Subscribed: whatever was missed before is gone with the clear.
        invalidator.set_local_trusted(false);
        invalidator.set_local_trusted(true);
        if let Some(t) = tier.upgrade() {
            t.subscribed.store(true, Ordering::SeqCst);
            t.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(prefix = %t.prefix, "redis tier: subscribed to invalidations");
        }
        let mut stream = pubsub.into_on_message();
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                m = stream.next() => m,
            };
            let Some(msg) = next else { break };
            let Some(t) = tier.upgrade() else { return };
            t.apply(msg.get_payload_bytes(), &invalidator);
        }
        // Lost: no more hits from this L1 until subscribed again.
        invalidator.set_local_trusted(false);
        if let Some(t) = tier.upgrade() {
            t.subscribed.store(false, Ordering::SeqCst);
            tracing::warn!(prefix = %t.prefix, "redis tier: invalidation subscription lost; L1 off until it is back");
        }
    }
}
