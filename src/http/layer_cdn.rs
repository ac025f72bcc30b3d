//! The builder's CDN-tier settings: targeted cache control (RFC 9213),
//! serving stale when the origin is unreachable (RFC 9111 §4.2.4) and the
//! custom cache key.

use std::time::Duration;

use http::HeaderName;

use super::HttpCacheLayerBuilder;

impl HttpCacheLayerBuilder {
    /// The target list of RFC 9213 targeted cache-control fields, most
    /// applicable first (default: `["cdn-cache-control"]`; an empty list
    /// turns targeted control off). Names are case-insensitive; one that is
    /// not a valid header name, or `cache-control`, fails the build.
    ///
    /// For each response, the first field of the list that is present and
    /// parses as a non-empty RFC 8941 dictionary is this cache's policy
    /// for it: its `no-store`, `private`, `no-cache`, `max-age`,
    /// `s-maxage`, `public`, `must-revalidate`, `proxy-revalidate`,
    /// `stale-while-revalidate` and `stale-if-error` apply, and the
    /// response's `Cache-Control` and `Expires` are ignored. So
    /// `CDN-Cache-Control: max-age=600` with `Cache-Control: no-store` is
    /// stored for ten minutes, and `CDN-Cache-Control: no-store` (or
    /// `private`, or `no-cache`) wins over a permissive `Cache-Control`. A
    /// field that is empty or does not parse is ignored as a whole and the
    /// next one is tried, then `Cache-Control`. The rules on
    /// `Authorization`, `Set-Cookie`, `Vary` and request directives still
    /// apply, and a 304's targeted field updates the stored one like any
    /// other header. See [`targeted`](super::targeted) for how members are
    /// read. The fields are removed from the responses the cache sends
    /// unless [`strip_targeted_fields`](Self::strip_targeted_fields) is off.
    ///
    /// ```
    /// # fn demo() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::http::HttpCacheLayer;
    ///
    /// let layer = HttpCacheLayer::builder()
    ///     .targeted_fields(["myapp-cdn-cache-control", "cdn-cache-control"])
    ///     .build()?;
    /// # let _ = layer; Ok(()) }
    /// ```
    pub fn targeted_fields<I>(mut self, names: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.targeted_error = None;
        let mut fields = Vec::new();
        for name in names {
            let name = name.as_ref();
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(header) => fields.push(header),
                Err(_) => {
                    self.targeted_error = Some(format!("{name:?} is not a header name"));
                }
            }
        }
        self.config.rules.targeted_fields = fields;
        self
    }

    /// Whether the [targeted fields](Self::targeted_fields) are removed
    /// from every response leaving the cache, hits and misses alike
    /// (default: on; RFC 9213 §3 lets a CDN remove them when nothing
    /// downstream uses them). Either way they are stored with the response:
    /// a hit, a 304's merge and the shared tier read them again. Turn it
    /// off when a cache further down honours them too.
    pub fn strip_targeted_fields(mut self, strip: bool) -> Self {
        self.config.strip_targeted = strip;
        self
    }

    /// A custom cache key: `f` may normalise the path and query and add
    /// parts taken from the request ([`KeyParts`](super::KeyParts)); it
    /// returns false for a request that must not be cached (it then goes
    /// to the origin untouched). The scheme and authority stay the
    /// cache's, `Vary` still selects variants, and every storing rule
    /// still applies. An unsafe method invalidates every entry of its
    /// target's normalised path and query, whatever parts were added (the
    /// entries carry their URL as a tag: to invalidate a URL yourself, use
    /// [`HttpCache::invalidate`](super::HttpCache::invalidate) or
    /// invalidate that tag, not the key, which has the parts added).
    /// Parts taken from request headers belong in
    /// [`push`](super::KeyParts::push), not in the path: an unsafe method
    /// invalidates the path its own headers give, so a path rewritten from
    /// headers would leave the other rewrites stored.
    pub fn cache_key(
        mut self,
        f: impl Fn(&http::request::Parts, &mut super::KeyParts) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.custom_key = Some(super::custom_key::CustomKey(std::sync::Arc::new(f)));
        self
    }

    /// How stale a stored response may be to stand in for an origin that
    /// cannot be reached (default: one day; `Duration::ZERO`: never).
    ///
    /// The origin is unreachable when the inner service returns an error
    /// or a response carrying [`UpstreamUnreachable`](super::UpstreamUnreachable)
    /// in its extensions (a proxy's 502 for a refused, reset or timed-out
    /// connection). Then a stored response for the request (selected by
    /// `Vary`) that is stale, or that the request's directives sent to be
    /// validated, is handled per RFC 9111 §4.2.4:
    ///
    /// - a directive forbids serving it stale: the response's `no-cache`,
    ///   `must-revalidate`, and in a shared cache `proxy-revalidate` or
    ///   `s-maxage`; or the request's (§5.2.1) `no-cache`, a `max-age` it
    ///   is older than, a `min-fresh` it does not meet, or a `max-stale`
    ///   it is staler than. The client gets a `504 Gateway Timeout` made
    ///   by the cache (a short text body; no `Cache-Status` entry, RFC
    ///   9211 §2);
    /// - stale by at most this bound: it is served, with its `Age` and the
    ///   entry `NAME; fwd=stale; ttl=-N; detail=unreachable` (with
    ///   `fwd-status=502` after a marked response), counted in
    ///   [`CacheStats::stale_if_unreachable`](crate::cache::CacheStats::stale_if_unreachable);
    /// - staler: the client gets what the inner service returned (its
    ///   error, or the proxy's 502).
    ///
    /// With nothing stored for the request, what the inner service
    /// returned passes through. A response marked unreachable is never
    /// stored and never replaces what is stored. `stale-if-error` (RFC
    /// 5861) is checked first and keeps its own window and meaning (a 5xx
    /// or a service error; counted in `stale_if_error`); a fresh stored
    /// response is a hit and never reaches the origin.
    pub fn max_stale_if_unreachable(mut self, bound: Duration) -> Self {
        self.config.max_stale_if_unreachable = bound;
        self
    }
}
