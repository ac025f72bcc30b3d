//! RFC 9111 rules as pure functions: may a response be stored, how long is
//! it fresh, how old is it, may a stored one answer this request.

use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, DATE, EXPIRES, LAST_MODIFIED, SET_COOKIE, VARY};
use http::{HeaderMap, Method, StatusCode};

use super::cache_control::{RequestDirectives, ResponseDirectives};

/// Status codes a cache may give heuristic freshness (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The RFC 9111 policy the HTTP cache applies: shared or private,
/// heuristic freshness, and whether `Set-Cookie` responses may be shared.
/// Set through [`HttpCacheLayerBuilder::policy`](super::HttpCacheLayerBuilder::policy)
/// or the builder's individual setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpCachePolicy {
    /// A shared cache (a proxy, a CDN, a server-side cache for every user)
    /// or a private one (one user's).
    pub shared: bool,
    /// Heuristic freshness: the fraction of `Date - Last-Modified`
    /// (`None`: off).
    pub heuristic_fraction: Option<f64>,
    /// The cap on heuristic freshness.
    pub heuristic_max: Duration,
    /// Share responses carrying `Set-Cookie` (a shared cache should not).
    pub share_set_cookie: bool,
    /// The target list of RFC 9213 targeted fields, most applicable first
    /// (default `["cdn-cache-control"]`; empty: off). The first one a
    /// response carries with a valid, non-empty dictionary replaces its
    /// `Cache-Control` and `Expires` for this cache (see
    /// [`targeted`](super::targeted)).
    pub targeted_fields: Vec<http::HeaderName>,
}

impl Default for HttpCachePolicy {
    fn default() -> Self {
        Self {
            shared: true,
            heuristic_fraction: Some(0.1),
            heuristic_max: Duration::from_secs(24 * 3600),
            share_set_cookie: false,
            targeted_fields: vec![super::targeted::CDN_CACHE_CONTROL],
        }
    }
}

/// Why a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// Only GET responses are stored.
    Method,
    /// 206 Partial Content: partial responses are not stored or combined
    /// (ranges are answered from a stored complete response).
    Partial,
    /// `no-store`.
    NoStore,
    /// `private` in a shared cache.
    Private,
    /// The request had `Authorization` and the response did not allow sharing.
    Authorization,
    /// `Set-Cookie` in a shared cache.
    SetCookie,
    /// `Vary: *`.
    VaryStar,
    /// Neither explicit nor heuristic freshness.
    NoFreshness,
    /// The request said `no-store` (and [`HonourRequest::no_store`](super::HonourRequest::no_store) is on).
    RequestNoStore,
    /// A `Cache-Control` line could not be parsed: its meaning is unknown.
    Unparseable,
    /// A 304 is never stored as a response of its own: it answers one
    /// client's validators and has no body.
    NotModified,
    /// 412 or 416: the answer to one request's preconditions or range.
    Precondition,
    /// An interim (1xx) response: never a final answer to store.
    Interim,
    /// `must-understand` on a status code this cache does not implement.
    NotUnderstood,
}

/// The status codes whose caching semantics this cache implements (for
/// `must-understand`): the heuristically cacheable ones but 206, and the
/// redirects 302 and 307.
pub fn understood(status: StatusCode) -> bool {
    status != StatusCode::PARTIAL_CONTENT
        && (heuristically_cacheable(status) || matches!(status.as_u16(), 302 | 307))
}

/// Parses an HTTP date header.
pub fn date(headers: &HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value).ok()
}

/// The response directives this cache follows: those of the first field
/// of `rules`' target list the response carries with a valid, non-empty
/// dictionary (RFC 9213 §2.1), else its `Cache-Control`.
pub fn response_directives(headers: &HeaderMap, rules: &HttpCachePolicy) -> ResponseDirectives {
    super::targeted::select(headers, &rules.targeted_fields)
        .unwrap_or_else(|| ResponseDirectives::from_headers(headers))
}

/// The freshness lifetime (RFC 9111 §4.2.1), or `None` when the response
/// has neither explicit nor (allowed) heuristic freshness.
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &ResponseDirectives,
    rules: &HttpCachePolicy,
) -> Option<Duration> {
    if rules.shared
        && let Some(s) = cc.s_maxage
    {
        return Some(Duration::from_secs(s));
    }
    if let Some(s) = cc.max_age {
        return Some(Duration::from_secs(s));
    }
    // A targeted field replaces `Expires` too (RFC 9213 §2.1).
    if !cc.targeted && headers.contains_key(EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (§5.3).
        let Some(expires) = date(headers, EXPIRES) else {
            return Some(Duration::ZERO);
        };
        let date = date(headers, DATE).unwrap_or_else(SystemTime::now);
        return Some(expires.duration_since(date).unwrap_or(Duration::ZERO));
    }
    let fraction = rules.heuristic_fraction?;
    // RFC 9111 §4.2.2: heuristics only for a heuristically cacheable
    // status, or a response marked `public`.
    if !heuristically_cacheable(status) && !cc.public {
        return None;
    }
    let last_modified = date(headers, LAST_MODIFIED)?;
    let date = date(headers, DATE).unwrap_or_else(SystemTime::now);
    let age = date.duration_since(last_modified).unwrap_or(Duration::ZERO);
    Some(age.mul_f64(fraction).min(rules.heuristic_max))
}

/// Whether a response to `method` may be stored (RFC 9111 §3), and its
/// freshness lifetime if so.
///
/// `request` holds the request directives the cache honours (after any
/// [`HonourRequest`](super::HonourRequest) switch): a `no-store` there
/// forbids storing. The rules that keep one user's response from another
/// (`no-store`, `private`, `Authorization`, `Set-Cookie`, `Vary: *`, an
/// unparseable `Cache-Control`) are checked before freshness, and the cache
/// applies them again to the merged headers after every 304.
pub fn storable(
    method: &Method,
    request_headers: &HeaderMap,
    request: &RequestDirectives,
    status: StatusCode,
    headers: &HeaderMap,
    cc: &ResponseDirectives,
    rules: &HttpCachePolicy,
) -> Result<Duration, NotStored> {
    if method != Method::GET {
        return Err(NotStored::Method);
    }
    // RFC 9111 §3: a cache never stores an interim response.
    if status.is_informational() {
        return Err(NotStored::Interim);
    }
    if request.no_store {
        return Err(NotStored::RequestNoStore);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStored::Partial);
    }
    if status == StatusCode::NOT_MODIFIED {
        return Err(NotStored::NotModified);
    }
    if status == StatusCode::PRECONDITION_FAILED || status == StatusCode::RANGE_NOT_SATISFIABLE {
        return Err(NotStored::Precondition);
    }
    if cc.unparseable {
        return Err(NotStored::Unparseable);
    }
    // RFC 9111 §5.2.2.3: with `must-understand`, a status code this
    // cache does not implement is not stored, and one it does is stored
    // even with `no-store` (which is there for caches that do not know
    // `must-understand`).
    if cc.must_understand {
        if !understood(status) {
            return Err(NotStored::NotUnderstood);
        }
    } else if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if rules.shared && cc.private {
        return Err(NotStored::Private);
    }
    if rules.shared
        && request_headers.contains_key(AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Err(NotStored::Authorization);
    }
    if rules.shared && !rules.share_set_cookie && headers.contains_key(SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if vary_names(headers).is_none() {
        return Err(NotStored::VaryStar);
    }
    freshness_lifetime(status, headers, cc, rules).ok_or(NotStored::NoFreshness)
}

/// The request header names a response varies on, lower-cased and sorted;
/// `None` for `Vary: *`.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<http::HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        let Ok(text) = value.to_str() else {
            return None; // unreadable: as unpredictable as `*`
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            match http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(name) => names.push(name),
                Err(_) => return None,
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// A request header's value normalised for Vary matching (RFC 9111 §4.1):
/// the field lines joined with ", ", white space around commas collapsed.
pub fn normalized(headers: &HeaderMap, name: &http::HeaderName) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for value in headers.get_all(name) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = trim(part);
            if !out.is_empty() {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(part);
        }
    }
    if headers.contains_key(name) {
        Some(out)
    } else {
        None
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The age of a response when it was received (RFC 9111 §4.2.3):
/// `corrected_initial_age`.
pub fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    // RFC 9111 §5.1: an `Age` that is not one non-negative integer (a
    // list, several lines, anything else) makes the response stale: taken
    // as the largest age there is.
    let mut lines = headers.get_all(http::header::AGE).iter();
    let age_value = match (lines.next(), lines.next()) {
        (None, _) => Duration::ZERO,
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| super::cache_control::delta_seconds(Some(v.trim())))
            .map_or(
                Duration::from_secs(super::cache_control::MAX_DELTA_SECONDS),
                Duration::from_secs,
            ),
        (Some(_), Some(_)) => Duration::from_secs(super::cache_control::MAX_DELTA_SECONDS),
    };
    let apparent_age = date(headers, DATE)
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent_age.max(age_value + response_delay)
}

/// What a stored response can do for a request, given its current age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    /// Fresh enough for this request: serve it.
    Fresh,
    /// Stale, inside `stale-while-revalidate`: serve it and revalidate in
    /// the background.
    StaleWhileRevalidate,
    /// Must be revalidated (or refetched) first.
    Revalidate,
}

/// Decides whether a stored response may answer a request (RFC 9111 §4.2,
/// §5.2.1, §5.2.2, RFC 5861). `honour` says which request directives count.
pub fn usable(
    age: Duration,
    lifetime: Duration,
    cc: &ResponseDirectives,
    req: &RequestDirectives,
    rules: &HttpCachePolicy,
) -> Usable {
    if cc.no_cache || req.no_cache {
        return Usable::Revalidate;
    }
    if let Some(max_age) = req.max_age
        && age > Duration::from_secs(max_age)
    {
        return Usable::Revalidate;
    }
    let min_fresh = Duration::from_secs(req.min_fresh.unwrap_or(0));
    if age + min_fresh < lifetime {
        return Usable::Fresh;
    }
    let staleness = (age + min_fresh).saturating_sub(lifetime);
    let must =
        cc.must_revalidate || (rules.shared && (cc.proxy_revalidate || cc.s_maxage.is_some()));
    if must {
        return Usable::Revalidate;
    }
    match req.max_stale {
        Some(None) => return Usable::Fresh,
        Some(Some(n)) if staleness <= Duration::from_secs(n) => return Usable::Fresh,
        _ => {}
    }
    if let Some(swr) = cc.stale_while_revalidate
        && staleness < Duration::from_secs(swr)
    {
        return Usable::StaleWhileRevalidate;
    }
    Usable::Revalidate
}

/// Whether a stale response may stand in for an error (RFC 5861 §4).
pub fn stale_if_error_allows(
    staleness: Duration,
    cc: &ResponseDirectives,
    rules: &HttpCachePolicy,
) -> bool {
    let must =
        cc.must_revalidate || (rules.shared && (cc.proxy_revalidate || cc.s_maxage.is_some()));
    !must
        && cc
            .stale_if_error
            .is_some_and(|s| staleness <= Duration::from_secs(s))
}

#[cfg(test)]
#[path = "freshness_tests.rs"]
mod tests;
