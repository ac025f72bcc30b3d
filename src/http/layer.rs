use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tokio_util::sync::DropGuard;
use tower::Layer;

use super::config::{DEFAULT_TAG_HEADER, HonourRequest, HttpConfig};
use super::freshness::HttpCachePolicy;
use super::service::HttpCache;
use super::stand_in::DEFAULT_MAX_STALE_IF_UNREACHABLE;
use super::state::{HttpShared, StoreKind};
use super::stored::StoredVariants;
use crate::cache::Invalidator;
use crate::cache::remote::{AttachRemote, RemoteLink, RemoteTier, sealed};
use crate::cache::{CacheStats, Clock};
use crate::error::ConfigError;

/// An RFC 9111 HTTP cache as a Tower layer: [`HttpCache`].
///
/// Wrap a whole axum `Router` (outside routing, so a hit skips routing and
/// the handler) or any hyper service:
///
/// ```
/// use axum::{Router, routing::get};
/// use tower::ServiceBuilder;
/// use tower_scale::http::HttpCacheLayer;
///
/// # fn demo() -> Result<(), tower_scale::ConfigError> {
/// let app: Router = Router::new().route("/", get(|| async { "hello" }));
/// let cached = ServiceBuilder::new()
///     .layer(HttpCacheLayer::builder().max_bytes(64 << 20).build()?)
///     .service(app);
/// # let _ = cached; Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpCacheLayer {
    pub(super) shared: Arc<HttpShared>,
    life: Arc<DropGuard>,
}

impl fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl HttpCacheLayer {
    /// Starts configuring an HTTP cache.
    pub fn builder() -> HttpCacheLayerBuilder {
        HttpCacheLayerBuilder {
            config: HttpConfig {
                max_bytes: 256 << 20,
                max_body: 1 << 20,
                default_scheme: "http".into(),
                custom_key: None,
                honour: HonourRequest::ALL,
                rules: HttpCachePolicy::default(),
                tag_header: HeaderName::from_static(DEFAULT_TAG_HEADER),
                pass_tag_header: false,
                strip_targeted: true,
                cache_status: None,
                request_version: None,
                mark_hits: false,
                max_stale_if_unreachable: DEFAULT_MAX_STALE_IF_UNREACHABLE,
            },
            cache_status: true,
            targeted_error: None,
            clock: None,
            metrics: (String::new(), std::time::Duration::from_secs(1)),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }

    /// Removes the stored responses for a target URI
    /// (`scheme://authority/path?query`), here and, with a shared tier, on
    /// every instance. The same as `invalidator().invalidate_key(uri)`,
    /// and with a [custom key](HttpCacheLayerBuilder::cache_key) also
    /// every entry whose key adds parts to `uri` (`uri` spelled as the key
    /// function normalises it).
    pub fn invalidate(&self, uri: &str) {
        self.shared.invalidate_url(uri);
    }

    /// Purges stored responses by tag, by URL (every `Vary` variant) or
    /// all, here and, with a shared tier, on every instance (as
    /// [`invalidator`](Self::invalidator) does), and returns how many
    /// entries (one per URL, or per key with a
    /// [custom key](HttpCacheLayerBuilder::cache_key)) it removed on this
    /// instance. Counting walks the whole store for tags and for
    /// everything: O(entries), meant for admin actions.
    ///
    /// ```
    /// # fn demo() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::http::{HttpCacheLayer, Purge};
    ///
    /// let layer = HttpCacheLayer::builder().build()?;
    /// assert_eq!(layer.purge(&Purge::Tags(vec!["user:12".into()])), 0);
    /// # Ok(()) }
    /// ```
    pub fn purge(&self, what: &super::Purge) -> usize {
        self.shared.purge(what)
    }

    /// A handle to invalidate stored responses: by key (the cache key,
    /// `scheme://authority/path?query` with the authority lower-cased), by
    /// tag (the values of the [tag header](HttpCacheLayerBuilder::tag_header)
    /// the responses carried), or all. The same [`Invalidator`] type the
    /// core cache gives, with the same race-safe rules: a response whose
    /// fetch began before an invalidation that touches it is neither stored
    /// nor served after it, and a request that starts after the call
    /// returned never gets it. With a shared tier, other instances apply it
    /// too (see `cache::redis`). With a version (the `*_at` forms, e.g. a
    /// write's `token.version()`), a response stamped below it (its
    /// [`DataVersion`](crate::cache::DataVersion), see
    /// [`request_version`](HttpCacheLayerBuilder::request_version)) is not
    /// stored either, even when its fetch began after the call: a read
    /// from a lagging replica is answered but never put back. A response
    /// without a stamp is kept out only by invalidations after its fetch
    /// began, as with the plain forms.
    ///
    /// ```
    /// # fn demo() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::http::HttpCacheLayer;
    ///
    /// let layer = HttpCacheLayer::builder().build()?;
    /// let invalidator = layer.invalidator();
    /// invalidator.invalidate_tag("user:12"); // every response tagged `user:12`
    /// invalidator.invalidate_key(&"https://example.com/users/12".to_string());
    /// invalidator.invalidate_all();
    /// # Ok(()) }
    /// ```
    pub fn invalidator(&self) -> Invalidator<String> {
        Invalidator::new(self.shared.clone())
    }

    /// The codec for a Redis tier of this cache: stored responses and their
    /// `Vary` variants, keyed by the cache key. Every variant a tier hands
    /// back is checked again against this cache's sharing rules (one that
    /// a shared cache would not store is dropped), and its age carries on
    /// from the time it was written (by the wall clock: the time spent in
    /// Redis counts).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::http::HttpCacheLayer;
    ///
    /// let layer = HttpCacheLayer::builder().build()?;
    /// let tier = tower_scale::cache::redis::builder("redis://127.0.0.1:6379")
    ///     .prefix("pages")
    ///     .attach(&layer, layer.redis_codec())
    ///     .await?;
    /// # let _ = tier; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_codec(&self) -> super::remote::HttpRedisCodec {
        let config = &self.shared.config;
        super::remote::HttpRedisCodec::new(
            self.shared.clock.clone(),
            self.shared.rules.clone(),
            config.max_body,
            (!config.pass_tag_header).then(|| config.tag_header.clone()),
        )
    }
}

impl sealed::Sealed for HttpCacheLayer {}

/// A shared tier (Redis) shares stored responses between instances. Only a
/// shared cache takes one: a [private](HttpCacheLayerBuilder::private)
/// cache is one user's and its responses must not reach another instance.
impl AttachRemote for HttpCacheLayer {
    type Key = String;
    type Response = StoredVariants;

    fn attach_tier(
        &self,
        tier: Arc<dyn RemoteTier<String, StoredVariants>>,
    ) -> Result<RemoteLink<String>, ConfigError> {
        if !self.shared.rules.shared {
            return Err(ConfigError::OutOfRange {
                field: "shared tier",
                reason: "a private HTTP cache holds one user's responses; it cannot share them"
                    .into(),
            });
        }
        if self.shared.remote.set(tier).is_err() {
            return Err(ConfigError::OutOfRange {
                field: "shared tier",
                reason: "this cache already has a shared tier attached".into(),
            });
        }
        Ok(RemoteLink {
            target: self.shared.clone(),
        })
    }

    fn closed_token(&self) -> tokio_util::sync::CancellationToken {
        self.shared.closed.clone()
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;
    fn layer(&self, inner: S) -> HttpCache<S> {
        HttpCache {
            inner,
            shared: Arc::clone(&self.shared),
            life: Arc::clone(&self.life),
        }
    }
}

/// Configures an [`HttpCacheLayer`].
#[must_use]
#[derive(Debug, Clone)]
pub struct HttpCacheLayerBuilder {
    pub(super) config: HttpConfig,
    /// Whether responses get a `Cache-Status` entry.
    cache_status: bool,
    /// Why the last [`targeted_fields`](Self::targeted_fields) list was
    /// refused (reported by `build`).
    pub(super) targeted_error: Option<String>,
    clock: Option<Clock>,
    /// Name and interval of the metrics publication (empty: none).
    metrics: (String, std::time::Duration),
}

impl HttpCacheLayerBuilder {
    /// Total bytes of stored bodies (plus about 512 bytes per response for
    /// headers) (default 256 MiB).
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.config.max_bytes = n;
        self
    }

    /// The largest body that is buffered and stored (default 1 MiB); a
    /// larger or endless one streams through to the client untouched.
    pub fn max_body(mut self, n: usize) -> Self {
        self.config.max_body = n;
        self
    }

    /// A private cache (one user's, like a browser's): `private` responses
    /// may be stored and `s-maxage` does not apply. Default: shared.
    pub fn private(mut self) -> Self {
        self.config.rules.shared = false;
        self
    }

    /// The scheme of requests whose URI has none (origin-form, as servers
    /// receive them). Default `http`.
    pub fn default_scheme(mut self, scheme: impl Into<String>) -> Self {
        self.config.default_scheme = scheme.into();
        self
    }

    /// Which request directives count (default: all, as a proxy must).
    pub fn honour_request_directives(mut self, honour: HonourRequest) -> Self {
        self.config.honour = honour;
        self
    }

    /// Heuristic freshness for responses with `Last-Modified` and no
    /// explicit freshness: `fraction` of their age, at most `max`
    /// (default 10 %, at most one day). `None` turns it off.
    pub fn heuristic(mut self, fraction: Option<f64>, max: Duration) -> Self {
        self.config.rules.heuristic_fraction = fraction;
        self.config.rules.heuristic_max = max;
        self
    }

    /// Stores responses carrying `Set-Cookie` in a shared cache (default:
    /// never; they are usually per user). With it on, a `Set-Cookie` that a
    /// 304 adds to a stored response is shared too.
    pub fn share_set_cookie(mut self, yes: bool) -> Self {
        self.config.rules.share_set_cookie = yes;
        self
    }

    /// Replaces the whole RFC 9111 policy (shared or private, heuristic
    /// freshness, `Set-Cookie` sharing, the targeted fields): set it before
    /// the individual setters, which change it.
    pub fn policy(mut self, policy: HttpCachePolicy) -> Self {
        self.config.rules = policy;
        self
    }

    /// The response header that carries a response's tags (default
    /// `surrogate-key`): space-separated values, on one line or several,
    /// that [`HttpCacheLayer::invalidator`] can invalidate by. A response
    /// whose tags cannot be read (not visible ASCII), with more than
    /// [`MAX_TAGS`](super::MAX_TAGS) distinct tags (or more than four times
    /// that many values in all), or with one longer than
    /// [`MAX_TAG_LEN`](super::MAX_TAG_LEN) bytes, is passed on but not
    /// stored (an invalidation of a tag it could not record would miss
    /// it). The header is removed from every response before it leaves the
    /// cache, stored or not, unless [`pass_tag_header`](Self::pass_tag_header)
    /// is on. Tags are read from the header section only; trailers lose the
    /// field in the responses the cache buffers (a body too large to buffer
    /// streams through untouched, trailers included).
    pub fn tag_header(mut self, name: HeaderName) -> Self {
        self.config.tag_header = name;
        self
    }

    /// Lets the tag header through to clients (and stores it with the
    /// response). Default: off; tags often name internal things (`user:12`),
    /// so they stay in the cache.
    pub fn pass_tag_header(mut self, pass: bool) -> Self {
        self.config.pass_tag_header = pass;
        self
    }

    /// Makes the cache honour consistency tokens: `f` reads the version a
    /// request's token asks for from its headers (`None`: no token, or
    /// one that is not valid), and a stored response answers the request
    /// only when it is stamped at or above that version. Otherwise the
    /// request is a miss: it goes to the origin, and the fresh response
    /// replaces the stored one. `u64::MAX` stands for a token whose
    /// position is unknown: newer than every stamp, never answered from
    /// the cache.
    ///
    /// A response is stamped with the [`DataVersion`](crate::cache::DataVersion)
    /// in its extensions, which [`DbLayer`](crate::pg::DbLayer) sets
    /// inside this cache (the version of the data the response was built
    /// from); one without it is unstamped and answers only requests
    /// without a token. Stamps travel through the shared tier with the
    /// responses. `f` runs on every GET and HEAD the cache sees, so it
    /// must be quick (a token's signature check is). A client that can
    /// choose its version (an unsigned one) can make each of its requests
    /// a miss, as `Cache-Control: no-cache` can: read signed tokens. For a `DbLayer`,
    /// [`request_version_from`](Self::request_version_from) does this.
    ///
    /// ```
    /// # fn demo() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::http::HttpCacheLayer;
    ///
    /// // A token in a header as a plain number (an example, not a safe
    /// // token: use a signed one, as `request_version_from` does).
    /// let layer = HttpCacheLayer::builder()
    ///     .request_version(|headers| {
    ///         headers.get("x-min-version")?.to_str().ok()?.parse().ok()
    ///     })
    ///     .build()?;
    /// # let _ = layer; Ok(()) }
    /// ```
    pub fn request_version(
        mut self,
        f: impl Fn(&http::HeaderMap) -> Option<u64> + Send + Sync + 'static,
    ) -> Self {
        self.config.request_version = Some(super::config::RequestVersion(Arc::new(f)));
        self
    }

    /// [`request_version`](Self::request_version) with the tokens `db`
    /// reads ([`DbLayer::token_of`](crate::pg::DbLayer::token_of): its
    /// cookie or header, signature, cluster and expiry checked; forged,
    /// expired or foreign tokens count as none). A token whose position is
    /// unknown is never answered from the cache. Put this cache outside
    /// `db`, so that what it stores carries the data's version:
    ///
    /// ```no_run
    /// # async fn demo(db: tower_scale::pg::Db, codec: tower_scale::pg::TokenCodec)
    /// # -> Result<(), tower_scale::ConfigError> {
    /// use axum::Router;
    /// use tower::ServiceBuilder;
    /// use tower_scale::http::HttpCacheLayer;
    /// use tower_scale::pg::DbLayer;
    ///
    /// let db_layer = DbLayer::builder(db, codec).build();
    /// let cache = HttpCacheLayer::builder()
    ///     .request_version_from(&db_layer)
    ///     .build()?;
    /// let app = ServiceBuilder::new()
    ///     .layer(cache)
    ///     .layer(db_layer)
    ///     .service(Router::<()>::new());
    /// # let _ = app; Ok(()) }
    /// ```
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn request_version_from(self, db: &crate::pg::DbLayer) -> Self {
        let db = db.clone();
        self.request_version(move |headers| {
            db.token_of(headers)
                .map(|t| t.version().unwrap_or(u64::MAX))
        })
    }

    /// Names the cache and publishes its statistics as the
    /// `tower_scale_cache_*` metrics labelled `cache="NAME"`, once a second
    /// ([`metrics_interval`](Self::metrics_interval)), for as long as it
    /// lives; building a named cache outside a Tokio runtime is an error.
    /// See [`CacheLayerBuilder::name`](crate::cache::CacheLayerBuilder::name).
    ///
    /// The name is also the one the [`Cache-Status`](Self::cache_status)
    /// entry gives (default `tower-scale`): written as a Structured Fields
    /// token when it is one (`edge-1`, `cache.example.com`), else as a
    /// quoted string (`"My cache"`); a name a quoted string cannot hold
    /// (control characters, non-ASCII) fails the build unless
    /// `cache_status(false)`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.metrics.0 = name.into();
        self
    }

    /// Adds this cache's RFC 9211 `Cache-Status` entry to every response
    /// that passed through it (default: on), named by [`name`](Self::name)
    /// (`tower-scale` when unnamed):
    ///
    /// | the response | the entry |
    /// | --- | --- |
    /// | served from storage (a `HEAD`, a client's 304 too) | `NAME; hit; ttl=N` |
    /// | from the shared tier (L2) | `NAME; hit; ttl=N; detail=l2` |
    /// | no usable stored response | `NAME; fwd=miss`, `; stored` when stored |
    /// | a concurrent miss's response, reused | `NAME; fwd=miss; collapsed` |
    /// | a stale stored one revalidated or refetched | `NAME; fwd=stale`, `; fwd-status=304` after a 304, `; stored` |
    /// | a fresh one the request's `no-cache` / `max-age` / `min-fresh` refused | `NAME; fwd=request` (same parameters) |
    /// | a stale one standing in for an error (`stale-if-error`) | `NAME; fwd=stale; fwd-status=503; ttl=-N` (no `fwd-status` after a service error) |
    /// | a stale one standing in for an unreachable origin ([`max_stale_if_unreachable`](Self::max_stale_if_unreachable)) | `NAME; fwd=stale; fwd-status=502; ttl=-N; detail=unreachable` (no `fwd-status` after a service error) |
    /// | not eligible: an unsafe method, `OPTIONS`, a request the cache cannot key, a `no-store` request with nothing stored for it | `NAME; fwd=bypass` |
    ///
    /// `ttl` is the remaining freshness lifetime in whole seconds, negative
    /// for a stale response served under `stale-while-revalidate`,
    /// `stale-if-error` or the request's `max-stale`; with the `Age` the
    /// response carries it adds up to the freshness lifetime. `fwd-status`
    /// is only written when it differs from the response's status (RFC 9211
    /// §2.3). A `504` the cache makes (for `only-if-cached`, or for an
    /// unreachable origin when the stored response may not be served
    /// stale) carries no entry (RFC 9211 §2: it was not the origin's).
    ///
    /// The entry goes after the field's existing members (RFC 9211 §2: the
    /// first member is the cache closest to the origin, the last the one
    /// closest to the user), as a line of its own; the origin's or an inner
    /// cache's entries are kept byte for byte and never read. It is added
    /// on the way out only: stored responses (and what the shared tier
    /// holds) keep the origin's field as it was, so a hit never replays
    /// the entry of the miss that stored it.
    pub fn cache_status(mut self, on: bool) -> Self {
        self.cache_status = on;
        self
    }

    /// How often a [named](Self::name) cache publishes its metrics.
    /// Default: 1 s, at least 10 ms. No effect without a name.
    pub fn metrics_interval(mut self, every: std::time::Duration) -> Self {
        self.metrics.1 = every;
        self
    }

    /// Marks every answer from the cache with the
    /// [`CacheHit`](super::CacheHit) response extension (`Local` or
    /// `SharedTier`), for a layer outside to report it (an `x-served-by`
    /// header, a metric). Default: off (the extension map costs two
    /// allocations on every hit).
    pub fn mark_hits(mut self, yes: bool) -> Self {
        self.config.mark_hits = yes;
        self
    }

    /// The clock ages are measured on (default: [`Clock::new`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Validates and builds, on the core's default store (moka, TinyLFU
    /// admission), bounded by [`max_bytes`](Self::max_bytes).
    pub fn build(self) -> Result<HttpCacheLayer, ConfigError> {
        self.build_on(StoreKind::Moka)
    }

    /// Validates and builds on the core's quick_cache store (feature
    /// `quick-cache`: S3-FIFO, a shorter hit path), bounded by
    /// [`max_bytes`](Self::max_bytes).
    #[cfg(feature = "quick-cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "quick-cache")))]
    pub fn build_quick(self) -> Result<HttpCacheLayer, ConfigError> {
        self.build_on(StoreKind::Quick)
    }

    fn build_on(self, kind: StoreKind) -> Result<HttpCacheLayer, ConfigError> {
        if self.config.max_bytes == 0 {
            return Err(ConfigError::Zero { field: "max_bytes" });
        }
        if let Some(reason) = self.targeted_error {
            return Err(ConfigError::OutOfRange {
                field: "targeted_fields",
                reason,
            });
        }
        if self
            .config
            .rules
            .targeted_fields
            .contains(&http::header::CACHE_CONTROL)
        {
            return Err(ConfigError::OutOfRange {
                field: "targeted_fields",
                reason: "`cache-control` is not a targeted field: it is what they replace".into(),
            });
        }
        if let Some(f) = self.config.rules.heuristic_fraction
            && !(f.is_finite() && (0.0..=1.0).contains(&f))
        {
            return Err(ConfigError::OutOfRange {
                field: "heuristic",
                reason: format!("fraction must be in 0.0..=1.0, got {f}"),
            });
        }
        if !matches!(self.config.default_scheme.as_str(), "http" | "https") {
            return Err(ConfigError::OutOfRange {
                field: "default_scheme",
                reason: format!(
                    "must be http or https, got {:?}",
                    self.config.default_scheme
                ),
            });
        }
        let clock = self.clock.unwrap_or_default();
        let (name, every) = self.metrics;
        crate::cache::engine::stats::publisher::validate(&name, every)?;
        let mut config = self.config;
        if self.cache_status {
            config.cache_status = Some(super::status::encode_name(&name)?);
        }
        let shared = Arc::new(HttpShared::new(config, clock, kind));
        let weak = Arc::downgrade(&shared);
        crate::cache::engine::stats::publisher::spawn(
            name,
            every,
            shared.closed.clone(),
            move || weak.upgrade().map(|s| s.stats()),
        )?;
        let life = Arc::new(shared.closed.clone().drop_guard());
        Ok(HttpCacheLayer { shared, life })
    }
}
