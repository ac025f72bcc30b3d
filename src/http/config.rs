//! The HTTP cache's settings.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use super::freshness::HttpCachePolicy;

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
    /// The user's key function ([`super::KeyParts`]), if any.
    pub(crate) custom_key: Option<super::custom_key::CustomKey>,
    pub(crate) honour: HonourRequest,
    pub(crate) rules: HttpCachePolicy,
    /// The response header tags are read from.
    pub(crate) tag_header: HeaderName,
    /// Whether the tag header reaches clients (and is stored).
    pub(crate) pass_tag_header: bool,
    /// Whether the targeted fields of `rules.targeted_fields` are removed
    /// from every response that leaves the cache (they stay stored).
    pub(crate) strip_targeted: bool,
    /// The cache's name as its RFC 9211 `Cache-Status` entry writes it;
    /// `None`: no entry (see [`status`](super::status)).
    pub(crate) cache_status: Option<bytes::Bytes>,
    /// Where a request's consistency token comes from (none: no token).
    pub(crate) request_version: Option<RequestVersion>,
    /// Whether answers from the cache carry the [`CacheHit`](super::CacheHit)
    /// extension.
    pub(crate) mark_hits: bool,
    /// How stale a stored response may be to stand in for an unreachable
    /// origin (RFC 9111 §4.2.4); zero: never.
    pub(crate) max_stale_if_unreachable: std::time::Duration,
}

/// The user's function from a request's headers to the version its token
/// asks for (`u64::MAX`: newer than every stamp).
#[derive(Clone)]
pub(crate) struct RequestVersion(pub(crate) Arc<VersionFn>);

/// What [`RequestVersion`] holds.
pub(crate) type VersionFn = dyn Fn(&HeaderMap) -> Option<u64> + Send + Sync;

impl fmt::Debug for RequestVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestVersion(..)")
    }
}

/// Whether a stored response stamped `stamp` may answer a request whose
/// token asks for `token`: always without a token; with one, only a
/// stamp at or above it (an unstamped response never, and the unknown
/// token, `u64::MAX`, never).
#[inline]
pub(crate) fn covers(stamp: Option<u64>, token: Option<u64>) -> bool {
    match token {
        None => true,
        Some(u64::MAX) => false,
        Some(t) => stamp.is_some_and(|s| s >= t),
    }
}

impl HttpConfig {
    /// Removes the targeted fields from a response leaving the cache,
    /// unless they are configured to pass.
    #[inline]
    pub(crate) fn strip_targeted(&self, headers: &mut HeaderMap) {
        if self.strip_targeted {
            for name in &self.rules.targeted_fields {
                headers.remove(name);
            }
        }
    }
}

/// The default tag header: `Surrogate-Key`, as CDNs (Fastly) name it.
pub(crate) const DEFAULT_TAG_HEADER: &str = "surrogate-key";

/// At most this many tags per response; a response with more is not stored
/// (dropping some would let an invalidation of them miss it).
pub const MAX_TAGS: usize = 64;

/// The longest tag, in bytes; a response with a longer one is not stored.
pub const MAX_TAG_LEN: usize = 256;
