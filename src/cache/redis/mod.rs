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
//! `invalidate_all` after such an event); every instance sharing a
//! `prefix` must use the same key codec. Codecs must not panic.
//! - **Redis refusing every write** (a read-only replica, `MISCONF` after
//!   a failed snapshot, an ACL): invalidations cannot be applied, and
//!   heartbeats, which write a key before they publish, stop with them, so
//!   every instance stops trusting its L1 (and Redis values) within
//!   `isolation_ttl`, as if Redis were down; this instance's queued
//!   invalidations are delivered when Redis takes writes again.
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

mod breaker;
mod builder;
mod call;
mod codec;
mod frame;
mod message;
mod publisher;
mod remote;
mod scripts;
mod stats;
mod subscriber;

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

pub use self::builder::{RedisTierBuilder, builder};
pub use self::codec::RedisCodec;
pub use self::stats::{RedisStats, RedisStatsSnapshot};

use self::breaker::Breaker;
use self::publisher::Queued;
use self::scripts::Scripts;

/// The shared tier on Redis; see the [module docs](self).
///
/// ```no_run
/// use std::{sync::Arc, time::Duration};
/// use tower_scale::cache::{CacheLayer, redis::{self, RedisCodec}};
///
/// /// How keys and responses travel through Redis.
/// struct Codec;
///
/// impl RedisCodec<u64, Arc<Vec<u8>>> for Codec {
///     fn encode_key(&self, k: &u64) -> Vec<u8> { k.to_be_bytes().to_vec() }
///     fn decode_key(&self, b: &[u8]) -> Option<u64> { Some(u64::from_be_bytes(b.try_into().ok()?)) }
///     fn encode(&self, r: &Arc<Vec<u8>>) -> Vec<u8> { r.to_vec() }
///     fn decode(&self, b: &[u8]) -> Option<Arc<Vec<u8>>> { Some(Arc::new(b.to_vec())) }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = CacheLayer::builder(|id: &u64| Some(*id))
///     .time_to_live(Duration::from_secs(60))
///     .build::<u64, Arc<Vec<u8>>, String>()?;
/// // Every instance attaches the same Redis: L1 misses are read from it,
/// // fills written to it, invalidations fanned out through it.
/// let tier = redis::builder("redis://10.0.0.5:6379")
///     .prefix("users")
///     .isolation_ttl(Duration::from_millis(500))
///     .attach(&layer, Codec)
///     .await?;
/// layer.invalidator().invalidate_key(&7);
/// // Wait (boundedly) until the invalidation reached Redis, so every
/// // other instance stops serving the old value within `isolation_ttl`.
/// tier.flush(Duration::from_secs(1)).await;
/// println!("{:?}", tier.stats());
/// # Ok(())
/// # }
/// ```
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
    scripts: Scripts,
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

impl<K, R> fmt::Debug for RedisTier<K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.prefix)
            .field("circuit_open", &self.breaker.is_open())
            .field("subscribed", &self.subscribed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<K: 'static, R: 'static> RedisTier<K, R> {
    /// The counters so far; also recorded in the `metrics` facade.
    pub fn stats(&self) -> RedisStatsSnapshot {
        let s = self.stats.snapshot(
            self.breaker.is_open(),
            self.subscribed.load(Ordering::Relaxed),
            self.queue_len() as u64,
        );
        s.record(&self.prefix);
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
    /// This instance's heartbeat key (written by every heartbeat, so that
    /// a Redis refusing writes stops the heartbeats).
    fn heartbeat_key(&self) -> String {
        format!("{}:hb:{:016x}", self.prefix, self.instance)
    }
}

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
