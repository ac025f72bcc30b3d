//! What to cache: the [`CachePolicy`] trait, with an implementation for
//! closures that map a request to its key.

use std::hash::Hash;
use std::time::Duration;

use super::Tag;

/// Decides, per request and response, what the cache does.
///
/// Closures `Fn(&Req) -> Option<K>` are policies: they give the key (or
/// `None` to bypass the cache) and every response is stored with the
/// layer's default windows. Implement the trait for more: tags, a version
/// stamp, per-response windows, or a minimum version per request.
///
/// ```
/// use std::time::Duration;
/// use tower_scale::cache::{CachePolicy, Storable, Tag, Windows};
///
/// struct UserPolicy;
///
/// impl CachePolicy<u64, Option<String>> for UserPolicy {
///     type Key = u64;
///     fn key(&self, user_id: &u64) -> Option<u64> {
///         Some(*user_id)
///     }
///     fn storable(&self, id: &u64, row: &Option<String>, defaults: &Windows) -> Option<Storable> {
///         // Missing users are cached briefly; found ones with the defaults.
///         let windows = match row {
///             Some(_) => *defaults,
///             None => Windows { ttl: Duration::from_secs(5), ..*defaults },
///         };
///         Some(Storable::new(windows).tag(format!("user:{id}")))
///     }
/// }
/// ```
pub trait CachePolicy<Req, Resp>: Send + Sync + 'static {
    /// The cache key. Compared in full on every lookup.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key for `req`, or `None` to send it around the cache.
    fn key(&self, req: &Req) -> Option<Self::Key>;

    /// The lowest entry version `req` accepts (for read-your-writes: the
    /// client's consistency token). An entry stamped below it, or not
    /// stamped, is skipped and the request goes to the service. Default:
    /// any version.
    fn min_version(&self, req: &Req) -> Option<u64> {
        let _ = req;
        None
    }

    /// Whether and how to store a successful response for `key`; `None`
    /// keeps it out of the cache. Default: store with the layer's windows.
    fn storable(&self, key: &Self::Key, resp: &Resp, defaults: &Windows) -> Option<Storable> {
        let _ = (key, resp);
        Some(Storable::new(*defaults))
    }

    /// Called before the inner call that fills `key` (a miss's, or a
    /// background refresh's) when `key` is one of the cache's hottest
    /// keys (within [`hot_key_rank`](super::CacheLayerBuilder::hot_key_rank),
    /// with hot keys tracked): a chance to send that request elsewhere,
    /// as `DbCache` sends a hot key's `Any` read to any healthy replica
    /// rather than the primary. Concurrent misses of the key still make
    /// one inner call (single-flight). Default: nothing.
    fn on_hot_miss(&self, key: &Self::Key, req: &mut Req) {
        let _ = (key, req);
    }
}

impl<F, Req, Resp, K> CachePolicy<Req, Resp> for F
where
    F: Fn(&Req) -> Option<K> + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    #[inline]
    fn key(&self, req: &Req) -> Option<K> {
        self(req)
    }
}

/// The freshness windows of an entry, measured from when it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// How long the entry is fresh (served without asking the service).
    pub ttl: Duration,
    /// After the TTL: how long the stale entry is still served while one
    /// background refresh runs (RFC 5861 `stale-while-revalidate`).
    pub stale_while_revalidate: Duration,
    /// After the TTL: how long the stale entry may stand in for a failed
    /// call to the service (RFC 5861 `stale-if-error`).
    pub stale_if_error: Duration,
}

impl Windows {
    /// Fresh for `ttl`, with no stale windows.
    pub const fn ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }
}

/// How to store one response: its windows, tags and version stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Storable {
    pub(crate) windows: Windows,
    pub(crate) tags: Vec<Tag>,
    pub(crate) version: Option<u64>,
}

impl Storable {
    /// Store with these windows, no tags and no version.
    pub fn new(windows: Windows) -> Self {
        Self {
            windows,
            tags: Vec::new(),
            version: None,
        }
    }

    /// Adds a tag (e.g. `user:12`) to invalidate the entry by.
    pub fn tag(mut self, tag: impl Into<Tag>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds several tags.
    pub fn tags<T: Into<Tag>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Stamps the entry with the version its data reflects (for example the
    /// database LSN observed before the read). An invalidation at a higher
    /// version of its key or tags keeps it out of the cache.
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// The windows.
    pub fn windows(&self) -> &Windows {
        &self.windows
    }
}
