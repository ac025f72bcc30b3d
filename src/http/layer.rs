use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::freshness::HttpCachePolicy;
use super::service::{HttpCache, HttpShared};
use crate::cache::{CacheStats, Clock};
use crate::error::ConfigError;

/// Which request directives the cache honours. A proxy must honour them
/// all (the default); a server-side cache may switch some off so clients
/// cannot bypass it. A switch that is off makes the cache act as if the
/// client had not sent the directive, for serving and for storing alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HonourRequest {
    /// `no-cache` (and `Pragma: no-cache`): revalidate before answering.
    pub no_cache: bool,
    /// `no-store`: do not store the response.
    pub no_store: bool,
    /// `max-age`.
    pub max_age: bool,
    /// `max-stale`.
    pub max_stale: bool,
    /// `min-fresh`.
    pub min_fresh: bool,
    /// `only-if-cached`: a 504 instead of going upstream.
    pub only_if_cached: bool,
}

impl HonourRequest {
    /// Every request directive honoured (a proxy's duty).
    pub const ALL: Self = Self {
        no_cache: true,
        no_store: true,
        max_age: true,
        max_stale: true,
        min_fresh: true,
        only_if_cached: true,
    };
    /// None honoured: the server decides alone.
    pub const NONE: Self = Self {
        no_cache: false,
        no_store: false,
        max_age: false,
        max_stale: false,
        min_fresh: false,
        only_if_cached: false,
    };
}

#[derive(Debug, Clone)]
pub(crate) struct HttpConfig {
    pub(crate) max_bytes: u64,
    pub(crate) max_body: usize,
    pub(crate) default_scheme: String,
    pub(crate) honour: HonourRequest,
    pub(crate) rules: HttpCachePolicy,
}

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
    shared: Arc<HttpShared>,
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
                honour: HonourRequest::ALL,
                rules: HttpCachePolicy::default(),
            },
            clock: None,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }

    /// Removes the stored responses for a target URI
    /// (`scheme://authority/path?query`).
    pub fn invalidate(&self, uri: &str) {
        self.shared.invalidate(uri);
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;
    fn layer(&self, inner: S) -> HttpCache<S> {
        HttpCache {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Configures an [`HttpCacheLayer`].
#[must_use]
#[derive(Debug, Clone)]
pub struct HttpCacheLayerBuilder {
    config: HttpConfig,
    clock: Option<Clock>,
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
    /// freshness, `Set-Cookie` sharing).
    pub fn policy(mut self, policy: HttpCachePolicy) -> Self {
        self.config.rules = policy;
        self
    }

    /// The clock ages are measured on (default: [`Clock::new`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<HttpCacheLayer, ConfigError> {
        if self.config.max_bytes == 0 {
            return Err(ConfigError::Zero { field: "max_bytes" });
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
        Ok(HttpCacheLayer {
            shared: Arc::new(HttpShared::new(self.config, clock)),
        })
    }
}
