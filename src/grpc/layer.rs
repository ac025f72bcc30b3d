//! Configuring the gRPC cache: [`GrpcCacheLayerBuilder`], and
//! [`GrpcCacheLayer`], which holds the one cache core every service it
//! wraps shares.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, HeaderName};
use tower::Layer;

use super::fetch::{Fetched, GrpcPolicy};
use super::key::{GrpcKey, PROTOCOL_HEADERS};
use super::service::GrpcCache;
use super::store::{GrpcStore, StoreKind};
use crate::cache::remote::{AttachRemote, RemoteLink, RemoteTier, sealed};
use crate::cache::{BuildError, CacheLayer, CacheStats, Capacity, Invalidator, Store, Tag};

/// The cache core under the gRPC cache.
pub(crate) type Core = CacheLayer<GrpcPolicy, GrpcStore>;

/// One opted-in method.
#[derive(Debug)]
struct Method {
    /// Shared by every key of the method (no allocation per call).
    path: Arc<str>,
    ttl: Duration,
    /// Every entry of the method carries its path as a tag.
    tag: Tag,
}

/// The validated configuration the policy and the service read.
#[derive(Debug)]
pub(crate) struct GrpcConfig {
    methods: HashMap<Arc<str>, Method>,
    /// The protocol headers, then the chosen metadata keys (no duplicates).
    key_names: Box<[HeaderName]>,
    max_message: usize,
}

impl GrpcConfig {
    /// The shared path of an opted-in method.
    pub(crate) fn method_path(&self, path: &str) -> Option<Arc<str>> {
        self.methods.get(path).map(|m| Arc::clone(&m.path))
    }

    /// The TTL and tag of an opted-in method.
    pub(crate) fn method(&self, path: &str) -> Option<(Duration, &Tag)> {
        self.methods.get(path).map(|m| (m.ttl, &m.tag))
    }

    /// The headers that make up the key.
    pub(crate) fn key_names(&self) -> &[HeaderName] {
        &self.key_names
    }

    /// The largest request or response message buffered.
    pub(crate) fn max_message(&self) -> usize {
        self.max_message
    }
}

/// How the store is bounded.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Entries(u64),
    Bytes(u64),
}

/// Configures a [`GrpcCacheLayer`]; [`build`](Self::build) validates the
/// whole and returns an error for a bad setting.
#[must_use]
#[derive(Debug, Clone)]
pub struct GrpcCacheLayerBuilder {
    methods: Vec<(String, Duration)>,
    key_metadata: Vec<String>,
    max_message: usize,
    capacity: Bound,
    name: Option<String>,
}

impl GrpcCacheLayerBuilder {
    pub(crate) fn new() -> Self {
        Self {
            methods: Vec::new(),
            key_metadata: Vec::new(),
            max_message: 1 << 20,
            capacity: Bound::Bytes(64 << 20),
            name: None,
        }
    }

    /// Names the cache: its statistics are published as the
    /// `tower_scale_cache_*` metrics labelled `cache="NAME"` once a second
    /// (see [`CacheLayerBuilder::name`](crate::cache::CacheLayerBuilder::name);
    /// build inside a Tokio runtime).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Caches the unary method at `path` (`/package.Service/Method`) for
    /// `ttl` (a later call for the same path replaces the TTL).
    pub fn method(mut self, path: impl Into<String>, ttl: Duration) -> Self {
        self.methods.push((path.into(), ttl));
        self
    }

    /// Adds a metadata key whose values are part of the cache key (for
    /// example a tenant id; `authorization` to cache per credential).
    /// Names are case-insensitive.
    pub fn key_metadata(mut self, name: impl Into<String>) -> Self {
        self.key_metadata.push(name.into());
        self
    }

    /// The largest request or response message buffered, in bytes with its
    /// 5-byte gRPC prefix (default 1 MiB); larger ones pass through, neither
    /// read into memory past this size nor stored.
    pub fn max_message(mut self, n: usize) -> Self {
        self.max_message = n;
        self
    }

    /// Bounds the store to `n` entries, whatever their size (replaces
    /// [`max_bytes`](Self::max_bytes)).
    pub fn max_entries(mut self, n: u64) -> Self {
        self.capacity = Bound::Entries(n);
        self
    }

    /// Bounds the store to about `n` bytes (the default, 64 MiB; replaces
    /// [`max_entries`](Self::max_entries)): each entry weighs its request
    /// message, its key metadata, its response headers, message and trailers,
    /// plus a fixed overhead. With messages of up to
    /// [`max_message`](Self::max_message) bytes both ways, a bound by entries
    /// alone lets callers who send distinct large messages fill memory.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.capacity = Bound::Bytes(n);
        self
    }

    /// Validates and builds, on the core's default store (moka, TinyLFU
    /// admission): an invalid method path (not `/package.Service/Method`),
    /// a zero TTL, no method at all, an invalid metadata name, or a zero
    /// `max_message` or capacity is an error.
    pub fn build(self) -> Result<GrpcCacheLayer, BuildError> {
        self.build_on(StoreKind::Moka)
    }

    /// Validates and builds (with the same checks as [`build`](Self::build))
    /// on the core's quick_cache store (feature `quick-cache`: S3-FIFO, a
    /// shorter hit path), bounded the same way.
    #[cfg(feature = "quick-cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "quick-cache")))]
    pub fn build_quick(self) -> Result<GrpcCacheLayer, BuildError> {
        self.build_on(StoreKind::Quick)
    }

    fn build_on(self, kind: StoreKind) -> Result<GrpcCacheLayer, BuildError> {
        if self.methods.is_empty() {
            return Err(BuildError::OutOfRange {
                field: "method",
                reason: "no method is opted in, so nothing would be cached".into(),
            });
        }
        let mut methods = HashMap::new();
        for (path, ttl) in self.methods {
            let valid = path
                .strip_prefix('/')
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(service, method)| {
                    !service.is_empty() && !method.is_empty() && !method.contains('/')
                });
            if !valid {
                return Err(BuildError::OutOfRange {
                    field: "method",
                    reason: format!("{path:?} is not a gRPC path like /package.Service/Method"),
                });
            }
            if ttl.is_zero() {
                return Err(BuildError::ZeroDuration {
                    field: "method ttl",
                    value: ttl,
                });
            }
            let path: Arc<str> = Arc::from(path);
            let tag = Tag::from(&*path);
            methods.insert(Arc::clone(&path), Method { path, ttl, tag });
        }
        let mut key_names: Vec<HeaderName> = PROTOCOL_HEADERS.to_vec();
        for name in &self.key_metadata {
            let header =
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    BuildError::OutOfRange {
                        field: "key_metadata",
                        reason: format!("{name:?} is not a valid metadata key"),
                    }
                })?;
            if !key_names.contains(&header) {
                key_names.push(header);
            }
        }
        if self.max_message == 0 {
            return Err(BuildError::Zero {
                field: "max_message",
            });
        }
        let config = Arc::new(GrpcConfig {
            methods,
            key_names: key_names.into_boxed_slice(),
            max_message: self.max_message,
        });
        let mut core = CacheLayer::builder(GrpcPolicy::new(Arc::clone(&config))).no_early_refresh();
        if let Some(name) = self.name {
            core = core.name(name);
        }
        let core = match self.capacity {
            Bound::Entries(n) => core.max_entries(n).build_with_store(GrpcStore::new(
                kind,
                Capacity::Entries(n),
                Arc::clone(&config),
            ))?,
            Bound::Bytes(n) => {
                core.max_weight(n, Fetched::weight)
                    .build_with_store(GrpcStore::new(
                        kind,
                        Capacity::Weight(n),
                        Arc::clone(&config),
                    ))?
            }
        };
        Ok(GrpcCacheLayer { config, core })
    }
}

/// Caches unary gRPC responses: wraps a service in a [`GrpcCache`]. See
/// the [module docs](super) for what is cached and an example.
///
/// Every service the layer wraps (and every clone of those) shares one
/// store, one single-flight group and one set of [`stats`](Self::stats).
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
///
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{Layer, ServiceExt, service_fn};
/// use tower_scale::grpc::{GrpcBody, GrpcCacheLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = GrpcCacheLayer::builder()
///     .method("/users.v1.Users/GetUser", Duration::from_secs(30))
///     .key_metadata("x-tenant")
///     .build()?;
/// // A stand-in for a tonic server: one message, then `grpc-status: 0`.
/// let server = service_fn(|_req: http::Request<GrpcBody<Full<Bytes>>>| async {
///     let mut trailers = http::HeaderMap::new();
///     trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
///     let body = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi"))
///         .with_trailers(async move { Some(Ok(trailers)) });
///     Ok::<_, Infallible>(http::Response::new(body))
/// });
/// let svc = layer.layer(server);
///
/// for _ in 0..2 {
///     let req = http::Request::post("/users.v1.Users/GetUser")
///         .header("content-type", "application/grpc")
///         .header("x-tenant", "acme")
///         .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02\x08\x01")))?;
///     let res = svc.clone().oneshot(req).await?;
///     let body = res.into_body().collect().await?;
///     assert_eq!(body.trailers().map(|t| &t["grpc-status"]), Some(&"0".parse()?));
///     assert_eq!(body.to_bytes(), &b"\0\0\0\0\x02hi"[..]);
/// }
/// let stats = layer.stats();
/// assert_eq!((stats.misses, stats.hits), (1, 1));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GrpcCacheLayer {
    config: Arc<GrpcConfig>,
    core: Core,
}

impl fmt::Debug for GrpcCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCacheLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GrpcCacheLayer {
    /// Starts configuring a gRPC cache.
    pub fn builder() -> GrpcCacheLayerBuilder {
        GrpcCacheLayerBuilder::new()
    }

    /// The counters of the cache core, for every service the layer wraps
    /// (the store's deferred maintenance runs first, so evictions and the
    /// entry count are current).
    pub fn stats(&self) -> CacheStats {
        stats(&self.core)
    }

    /// A handle to drop entries: `invalidate_tag("/package.Service/Method")`
    /// drops every entry of that method, `invalidate_all()` every entry.
    /// With a shared tier, other instances apply it too (see
    /// [`redis_codec`](Self::redis_codec)).
    pub fn invalidator(&self) -> Invalidator<GrpcKey> {
        self.core.invalidator()
    }

    /// The codec for a Redis tier of this cache (feature `redis`): stored
    /// responses keyed by the whole [`GrpcKey`], so instances share a
    /// response only for the same method, message and key metadata.
    ///
    /// What comes back from Redis is checked again against this cache's
    /// rules, whatever wrote it: HTTP 200, `grpc-status: 0`, exactly one
    /// well-formed message within [`max_message`](GrpcCacheLayerBuilder::max_message),
    /// a method this cache caches, the same key metadata names; anything
    /// else (and anything that does not parse) is a miss, and the tier
    /// deletes it. A value is served only for the key it was written with,
    /// and kept in this instance's store only if its frame carries its
    /// method's tag and no stale windows (as this cache's own entries do),
    /// so `invalidate_tag(method)` always reaches it.
    /// Its freshness is what the writer gave it (instances sharing a prefix
    /// should cache a method with the same TTL).
    ///
    /// The key's bytes, its metadata values included, name the Redis
    /// entry: a cache whose key holds `authorization` cannot take a shared
    /// tier (credentials would be written to Redis key names). Key on a
    /// non-secret caller id instead.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_scale::grpc::GrpcCacheLayer;
    ///
    /// let layer = GrpcCacheLayer::builder()
    ///     .method("/users.v1.Users/GetUser", Duration::from_secs(30))
    ///     .build()?;
    /// let tier = tower_scale::cache::redis::builder("redis://127.0.0.1:6379")
    ///     .prefix("users-grpc")
    ///     .attach(&layer, layer.redis_codec())
    ///     .await?;
    /// // Drops the method's entries here, in Redis and on every instance.
    /// layer.invalidator().invalidate_tag("/users.v1.Users/GetUser");
    /// # let _ = tier; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_codec(&self) -> super::remote::GrpcRedisCodec {
        super::remote::GrpcRedisCodec::new(Arc::clone(&self.config))
    }
}

/// The core's counters after its store's deferred maintenance.
pub(crate) fn stats(core: &Core) -> CacheStats {
    core.store().run_pending_tasks();
    core.stats()
}

impl sealed::Sealed for GrpcCacheLayer {}

/// A shared tier (Redis) shares stored responses between instances, keyed
/// by the whole [`GrpcKey`]. A cache whose key holds credentials
/// (`authorization`, `proxy-authorization` or `cookie` metadata) does not
/// take one: the key's bytes name the Redis entries. Key on a non-secret
/// caller id instead (and never on an API key under another name).
impl AttachRemote for GrpcCacheLayer {
    type Key = GrpcKey;
    type Response = Fetched;

    fn attach_tier(
        &self,
        tier: Arc<dyn RemoteTier<GrpcKey, Fetched>>,
    ) -> Result<RemoteLink<GrpcKey>, BuildError> {
        let secrets = [
            AUTHORIZATION,
            http::header::PROXY_AUTHORIZATION,
            http::header::COOKIE,
        ];
        if let Some(secret) = secrets.iter().find(|s| self.config.key_names().contains(s)) {
            return Err(BuildError::OutOfRange {
                field: "shared tier",
                reason: format!(
                    "the cache key holds `{secret}` metadata; a shared tier would write \
                     credentials into Redis key names"
                ),
            });
        }
        self.core.attach_tier(tier)
    }

    fn closed_token(&self) -> tokio_util::sync::CancellationToken {
        self.core.closed_token()
    }
}

impl<S> Layer<S> for GrpcCacheLayer {
    type Service = GrpcCache<S>;

    fn layer(&self, inner: S) -> GrpcCache<S> {
        GrpcCache::new(inner, Arc::clone(&self.config), self.core.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::cache::Store;
    use crate::grpc::GrpcBody;

    /// One length-prefixed message of `n` bytes of `fill`.
    fn message(fill: u8, n: usize) -> Bytes {
        let mut out = vec![0u8];
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        out.resize(5 + n, fill);
        Bytes::from(out)
    }

    #[tokio::test]
    async fn the_store_is_bounded_in_bytes() {
        let layer = GrpcCacheLayer::builder()
            .method("/a.B/C", Duration::from_secs(60))
            .max_bytes(4096)
            .build()
            .unwrap();
        // 1,000-byte answers: three entries at most fit in 4 KiB.
        let svc = layer.layer(service_fn(
            |_: http::Request<GrpcBody<Full<Bytes>>>| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let body =
                    Full::new(message(b'r', 1000)).with_trailers(async { Some(Ok(trailers)) });
                Ok::<_, Infallible>(http::Response::new(body))
            },
        ));
        for i in 0..20u8 {
            let req = http::Request::post("/a.B/C")
                .header("content-type", "application/grpc")
                .body(Full::new(message(i, 1)))
                .unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(
                res.into_body().collect().await.unwrap().to_bytes().len(),
                1005
            );
        }
        assert_eq!(layer.stats().stored, 20);
        let store = layer.core.store();
        store.run_pending_tasks();
        assert!(
            (1..=3).contains(&store.entry_count()),
            "{} entries",
            store.entry_count()
        );
    }
}
