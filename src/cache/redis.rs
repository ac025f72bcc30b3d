//! The shared cache tier on Redis (feature `redis`): many instances behave
//! as one cache.
//!
//! - **L2 store**: an L1 miss does one Redis round trip (a script that
//!   returns the value only if none of its tags changed since it was
//!   stored); a fill writes L2 (expiring with the entry's windows) and L1.
//!   Values are a compact, versioned binary frame around your codec's bytes;
//!   a value that does not decode is a miss and is deleted.
//! - **Invalidation fan-out**: invalidations go to Redis (key: deleted;
//!   tag and all: a generation counter, O(1)) and are then published on one
//!   channel; every instance applies the others' to its L1. They leave an
//!   instance through one ordered queue (no runtime needed to invalidate;
//!   a failed one is retried, in order, until Redis takes it; past
//!   `max_queued_invalidations` the queue collapses into one "all").
//! - **Isolation**: every instance publishes a heartbeat on the channel
//!   every quarter of `isolation_ttl` (default 1 s) and serves from its L1
//!   only while its own heartbeat, sent less than `isolation_ttl` ago, has
//!   come back through its subscription (pub/sub keeps order, so every
//!   invalidation Redis accepted before that heartbeat has been applied).
//!   Down, stalled, partitioned from this instance or subscription lost:
//!   within `isolation_ttl` the L1 is off (requests go to Redis, then the
//!   service) until heartbeats return; then the L1 is emptied before it is
//!   trusted again, and Redis values are not used for one more
//!   `isolation_ttl` while other instances flush what they queued.
//!
//! - **Delivery**: `invalidate_*` returns at once; the tier applies and
//!   publishes queued invalidations in batches (one atomic script each, so a
//!   call that timed out on the client did all or nothing), usually within
//!   one round trip. [`RedisTier::flush`] waits for it. When the last handle
//!   of the cache goes, what is queued is flushed for at most one isolation
//!   window.
//! - **Self-healing**: a connection that times out three times in a row is
//!   replaced (a black-holed connection never fails by itself), and a
//!   subscription silent for two isolation windows (no own heartbeat) is
//!   dropped and made again.
//! - **Shared tier writes**: only a fill that took its lease (and with it
//!   the invalidation epoch) before it read the service is written to
//!   Redis; a put after any invalidation since is refused, and the lease
//!   given up so others stop waiting. Tag generation counters expire after
//!   the entries that recorded them; a missing counter matches nothing.
//!
//! # Guarantees
//!
//! - **Same instance, exact**: a read that starts after `invalidate_*`
//!   returned never gets data older than that invalidation, from L1, from a
//!   fill in flight, or from Redis (a value Redis still holds is not taken
//!   while this instance's invalidation touching it is queued, not yet
//!   applied to Redis).
//! - **Across instances, bounded**: a read on another instance that starts
//!   more than `isolation_ttl` after `invalidate_*` returned never gets data
//!   older than that invalidation, also while Redis is down, stalled,
//!   partitioned from the reading instance, or refusing writes. The window
//!   counts from when the invalidation reached Redis, which is within one
//!   round trip of the call while the invalidating instance can reach it
//!   (call [`RedisTier::flush`] to wait for that). An instance cut off from
//!   Redis keeps its invalidations queued (bounded; past the bound they
//!   collapse into one "all") and delivers them when it can reach it again;
//!   until then no other instance can learn of them.
//!
//! Outside the guarantees: a Redis restored from a snapshot, or failed over
//! to a replica that lags, may give back values invalidated after that
//! point (run the tier's Redis as a cache, without persistence, or call
//! `invalidate_all` after such an event); a Redis that refuses writes for
//! another reason than memory (read-only replica, ACL, failed snapshot)
//! counts as unreachable for invalidations; every instance sharing a
//! `prefix` must use the same key codec. Codecs must not panic.
//! - **Redis refusing writes** (`maxmemory` with `noeviction`): a refused
//!   generation bump is replaced by deleting the counter, which every entry
//!   recorded under it fails to match; the invalidation is still published;
//!   fills are not stored in Redis. Refused writes are counted
//!   ([`RedisStatsSnapshot::refused_writes`]) and logged once per change.
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

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::remote::{AttachRemote, BoxFuture, Lease, RemoteEntry, RemoteLink, RemoteTier};
use super::{Invalidation, Tag};
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
    isolation_ttl: Duration,
    max_queued: usize,
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
    /// `layer` is a [`CacheLayer`](super::CacheLayer) or, with the `http`
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
            get_script: Script::new(GET_SCRIPT),
            put_script: Script::new(PUT_SCRIPT),
            lease_script: Script::new(LEASE_SCRIPT),
            invalidate_script: Script::new(INVALIDATE_SCRIPT),
            release_script: Script::new(RELEASE_SCRIPT),
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
        runtime.spawn(subscribe(
            Arc::downgrade(&tier),
            link.clone(),
            shutdown.clone(),
        ));
        runtime.spawn(publish(Arc::downgrade(&tier), link, shutdown));
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
    refused_writes: AtomicU64,
    heartbeats: AtomicU64,
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
    /// Writes Redis refused (out of memory under `noeviction`): fills not
    /// stored, generation bumps replaced by deletes.
    pub refused_writes: u64,
    /// This instance's heartbeats heard back through the subscription.
    pub heartbeats: u64,
    /// This instance's invalidations waiting for Redis now.
    pub queued_invalidations: u64,
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
    /// Itself, for the background connect.
    me: std::sync::Weak<RedisTier<K, R>>,
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    /// The multiplexed connection (cloned per call; it reconnects by
    /// itself). `None` until the first connect succeeds, which runs in the
    /// background so calls never queue behind it.
    manager: RwLock<Option<ConnectionManager>>,
    connecting: AtomicBool,
    runtime: tokio::runtime::Handle,
    codec: Box<dyn RedisCodec<K, R>>,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    lease_wait: Duration,
    isolation_ttl: Duration,
    instance: u64,
    breaker: Breaker,
    subscribed: AtomicBool,
    stats: RedisStats,
    get_script: Script,
    put_script: Script,
    lease_script: Script,
    invalidate_script: Script,
    release_script: Script,
    last_error: Mutex<Option<String>>,
    /// True while Redis refuses writes (logged once per change).
    refusing: AtomicBool,
    /// This instance's invalidations not yet applied to Redis, in order.
    queue: Mutex<VecDeque<Queued<K>>>,
    max_queued: usize,
    queued: tokio::sync::Notify,
    /// Set on (re)subscribing: send a heartbeat now rather than at the next tick.
    heartbeat_now: AtomicBool,
    /// Consecutive timed-out calls: past a few, the connection is replaced
    /// (a black-holed connection never fails by itself).
    timeouts: AtomicU32,
    /// Makes lease tokens unique per call.
    tokens: AtomicU64,
    /// The sequence number of the last invalidation queued, and of the last
    /// one applied to Redis (for [`RedisTier::flush`]).
    last_queued: AtomicU64,
    applied: tokio::sync::watch::Sender<u64>,
}

/// An invalidation waiting for Redis.
struct Queued<K> {
    seq: u64,
    what: Invalidation<K>,
    version: u64,
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
/// otherwise deletes it. A generation counter that is missing (deleted by
/// an invalidation whose bump Redis refused) matches nothing.
/// KEYS[1] = entry; ARGV[1] = the tag-key prefix.
const GET_SCRIPT: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'v', 'g')
if not h[1] then return false end
local g = h[2] or ''
for tag, gen in string.gmatch(g, "([^\n]*)\n([^\n]*)\n") do
  local cur = redis.call('GET', ARGV[1] .. tag)
  if cur ~= gen then
    redis.call('DEL', KEYS[1])
    return false
  end
end
return h[1]
"#;

/// Stores a value unless an invalidation happened since the fill began
/// (the epoch moved or is gone: the lease, if still ours, is given up so
/// others stop waiting) or its lease was cancelled. A missing tag
/// generation is created from a random start, so a counter deleted and
/// created again never repeats a value an old entry recorded; a counter
/// lives at least as long as the entries that recorded it (when it expires
/// later, those entries simply stop matching: a miss).
/// KEYS[1] = entry, KEYS[2] = epoch, KEYS[3] = lease; ARGV = epoch at
/// start, lease token ('' for none), value, px, tag-key prefix, random
/// start, tags...
const PUT_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2])
local ours = ARGV[2] ~= '' and redis.call('GET', KEYS[3]) == ARGV[2]
if not epoch or epoch ~= ARGV[1] then
  if ours then redis.call('DEL', KEYS[3]) end
  return 0
end
if ARGV[2] ~= '' and not ours then return 0 end
local g = ''
for i = 7, #ARGV do
  local k = ARGV[5] .. ARGV[i]
  local cur = redis.call('GET', k)
  if not cur then
    redis.call('SET', k, ARGV[6])
    cur = ARGV[6]
  end
  if redis.call('PTTL', k) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', k, ARGV[4])
  end
  g = g .. ARGV[i] .. '\n' .. cur .. '\n'
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'g', g)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[2] ~= '' then redis.call('DEL', KEYS[3]) end
return 1
"#;

/// Takes the lease (SET NX PX) and returns the epoch (created from a
/// random start if missing), or false if taken.
/// KEYS[1] = lease, KEYS[2] = epoch; ARGV = token, px, random start.
const LEASE_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local e = redis.call('GET', KEYS[2])
  if not e then
    redis.call('SET', KEYS[2], ARGV[3])
    e = ARGV[3]
  end
  return e
end
return false
"#;

/// Deletes a lease if it is still ours. KEYS[1] = lease; ARGV[1] = token.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Applies a batch of invalidations to Redis and publishes them, in one
/// atomic step (so a call that timed out on the client either did all of it
/// or nothing): a key's entry and lease are deleted; a tag's (or
/// everything's) generation is bumped; the epoch is bumped (cancelling puts
/// of fills in flight). A counter that does not exist is left alone (a
/// missing generation or epoch already matches nothing, and `INCR` would
/// restart it at 1, a value an old entry may have recorded). A bump Redis
/// refuses (out of memory) becomes a delete of the counter, which Redis
/// accepts and which fences just as well. Returns 1 if a bump was refused.
/// KEYS[1] = epoch, then per item: target (entry or counter), lease (or
/// the target again); ARGV[1] = channel, then per item: 'k', 't' or 'a',
/// and the message to publish.
const INVALIDATE_SCRIPT: &str = r#"
local refused = 0
local function bump(k)
  if redis.call('EXISTS', k) == 1 then
    local r = redis.pcall('INCR', k)
    if type(r) == 'table' and r.err then
      redis.call('DEL', k)
      refused = 1
    end
  end
end
local n = (#KEYS - 1) / 2
for i = 1, n do
  if ARGV[2 * i] == 'k' then
    redis.call('DEL', KEYS[2 * i], KEYS[2 * i + 1])
  else
    bump(KEYS[2 * i])
  end
end
bump(KEYS[1])
for i = 1, n do
  redis.call('PUBLISH', ARGV[1], ARGV[2 * i + 1])
end
return refused
"#;

/// The most invalidations one delivery carries.
const BATCH: usize = 128;

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
        isolation_ttl: Duration::from_secs(1),
        max_queued: 10_000,
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
            refused_writes: self.stats.refused_writes.load(Ordering::Relaxed),
            heartbeats: self.stats.heartbeats.load(Ordering::Relaxed),
            queued_invalidations: self.queue_len() as u64,
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
            (
                "tower_scale_cache_l2_refused_writes_total",
                s.refused_writes,
            ),
            ("tower_scale_cache_l2_heartbeats_total", s.heartbeats),
        ] {
            metrics::counter!(name, "prefix" => self.prefix.clone()).absolute(v);
        }
        metrics::gauge!("tower_scale_cache_l2_circuit_open", "prefix" => self.prefix.clone())
            .set(if s.circuit_open { 1.0 } else { 0.0 });
        metrics::gauge!("tower_scale_cache_l2_queued_invalidations", "prefix" => self.prefix.clone())
            .set(s.queued_invalidations as f64);
        s
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued<K>>> {
        crate::sync::lock(&self.queue)
    }

    fn queue_len(&self) -> usize {
        self.queue().len()
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
    /// A random start for a generation counter or epoch created anew.
    fn random_start(&self) -> u64 {
        crate::random::mix(self.instance ^ now_ms().rotate_left(17)) >> 12
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:invalidate", self.prefix)
    }

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
    async fn call<T, F, Fut>(&self, op: F) -> Option<T>
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

    /// The deadline of the background publisher's calls: at least the
    /// call timeout, up to a quarter of the isolation window (a slower link
    /// still gets its invalidations through).
    fn publish_timeout(&self) -> Duration {
        self.timeout.max(self.isolation_ttl / 4)
    }

    /// Runs one operation within `deadline`, not held back by an open
    /// circuit (the background publisher paces itself, and its success
    /// closes the circuit at once).
    async fn call_within<T, F, Fut>(&self, deadline: Duration, op: F) -> Option<T>
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

    fn write_refused(&self, error: &str) {
        self.stats.refused_writes.fetch_add(1, Ordering::Relaxed);
        if !self.refusing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                prefix = %self.prefix,
                error,
                "redis tier: Redis refuses writes (out of memory?); fills are not shared, invalidations fall back to deletes"
            );
        }
    }

    fn writes_accepted(&self) {
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

    fn message(&self, kind: u8, version: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + payload.len());
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(payload);
        out
    }

    fn invalidation_message(&self, what: &Invalidation<K>, version: u64) -> Vec<u8> {
        match what {
            Invalidation::Key(k) => self.message(MSG_KEY, version, &self.codec.encode_key(k)),
            Invalidation::Tag(t) => self.message(MSG_TAG, version, t.as_str().as_bytes()),
            Invalidation::All => self.message(MSG_ALL, version, &[]),
        }
    }

    /// Applies one message from the channel: another instance's
    /// invalidation, or this instance's heartbeat coming back.
    fn apply(&self, bytes: &[u8], link: &RemoteLink<K>) {
        let (Some(from), Some(version), Some(&kind)) = (
            bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            bytes.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            bytes.get(16),
        ) else {
            return;
        };
        let payload = bytes.get(17..).unwrap_or_default();
        let own = u64::from_be_bytes(from) == self.instance;
        let version = u64::from_be_bytes(version);
        if own {
            // Our own invalidations were applied when they were made; our
            // heartbeat says everything published before it has arrived.
            if kind == MSG_HEARTBEAT
                && let Ok(sent) = <[u8; 8]>::try_from(payload)
            {
                self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                link.heard(super::Instant::from_nanos(u64::from_be_bytes(sent)));
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
        link.apply_remote(what, version);
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
        let script = &self.invalidate_script;
        let (keys, args) = (&keys, &args);
        let refused: Option<i64> = self
            .call_within(self.publish_timeout(), |mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                for a in args {
                    inv.arg(a.as_slice());
                }
                inv.invoke_async(&mut c).await
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

    /// Sends this instance's heartbeat (its clock's time) on the channel.
    async fn heartbeat(&self, link: &RemoteLink<K>)
    where
        K: Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let sent_at = link.now().as_nanos();
        let message = self.message(MSG_HEARTBEAT, 0, &sent_at.to_be_bytes());
        let channel = self.channel();
        let _: Option<i64> = self
            .call_within(self.publish_timeout(), |mut c| async move {
                c.publish(&channel, message).await
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

/// Whether Redis refused a write because it is out of memory.
fn is_refused_write(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed")
}

const MSG_KEY: u8 = 0;
const MSG_TAG: u8 = 1;
const MSG_ALL: u8 = 2;
const MSG_HEARTBEAT: u8 = 3;

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
            let script = &self.put_script;
            let stored: Option<i64> = self
                .call(|mut c| async move {
                    let mut inv = script.prepare_invoke();
                    inv.key(&entry_key).key(&epoch_key).key(&lease_key);
                    inv.arg(&epoch)
                        .arg(&token)
                        .arg(&frame)
                        .arg(px)
                        .arg(&tag_prefix)
                        .arg(random_start);
                    for t in &tags {
                        inv.arg(t);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await;
            if stored.is_some() {
                self.writes_accepted();
            }
        })
    }

    fn lease<'a>(&'a self, key: &'a K) -> BoxFuture<'a, Lease> {
        Box::pin(async move {
            let raw = self.codec.encode_key(key);
            let n = self.tokens.fetch_add(1, Ordering::Relaxed);
            let token = crate::random::mix(self.instance ^ n.rotate_left(32) ^ now_ms());
            let (lease_key, epoch_key) = (self.lease_key(&raw), self.epoch_key());
            let px = ms(self.lease_ttl).max(1);
            let random_start = self.random_start();
            let script = &self.lease_script;
            let got: Option<Option<String>> = self
                .call(|mut c| async move {
                    script
                        .key(&lease_key)
                        .key(&epoch_key)
                        .arg(token)
                        .arg(px)
                        .arg(random_start)
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
                Some(Some(epoch)) => match epoch.parse() {
                    Ok(epoch) => Lease::Acquired { token, epoch },
                    // Not a number we wrote: fill without the lease.
                    Err(_) => Lease::Unavailable,
                },
            }
        })
    }

    fn release<'a>(&'a self, key: &'a K, lease: Lease) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Lease::Acquired { token, .. } = lease else {
                return;
            };
            let lease_key = self.lease_key(&self.codec.encode_key(key));
            let script = &self.release_script;
            let _: Option<i64> = self
                .call(|mut c| async move {
                    script.key(&lease_key).arg(token).invoke_async(&mut c).await
                })
                .await;
        })
    }

    fn invalidate(&self, seq: u64, what: Invalidation<K>, version: u64) {
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

    fn lease_wait(&self) -> Duration {
        self.lease_wait
    }
}

/// Keeps a subscription to the invalidation channel and applies what comes
/// through it. The L1's trust is the heartbeats' business: while this is
/// down no heartbeat comes back, and the L1 stops serving within the
/// isolation window (at once when a subscription is lost).
async fn subscribe<K: Send + Sync + 'static, R: Send + Sync + 'static>(
    tier: std::sync::Weak<RedisTier<K, R>>,
    link: RemoteLink<K>,
    shutdown: tokio_util::sync::CancellationToken,
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

/// Sends this instance's invalidations to Redis in order, in batches
/// (retrying one that fails, with a backoff of at most a quarter window),
/// and its heartbeats every quarter of the isolation window. On shutdown
/// it flushes what is queued (for at most one isolation window) first.
async fn publish<K: Send + Sync + 'static, R: Send + Sync + 'static>(
    tier: std::sync::Weak<RedisTier<K, R>>,
    link: RemoteLink<K>,
    shutdown: tokio_util::sync::CancellationToken,
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
