//! A stored response standing in for the origin's answer when the origin
//! fails: `stale-if-error` (RFC 5861 §4) after a 5xx or a service error,
//! and the RFC 9111 §4.2.4 rule when the origin cannot be reached (a
//! service error, or a response marked [`UpstreamUnreachable`]): served
//! stale when no directive forbids it and it is not staler than
//! [`max_stale_if_unreachable`](super::HttpCacheLayerBuilder::max_stale_if_unreachable),
//! a 504 when a directive forbids it.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;

use super::body::CacheBody;
use super::cache_control::{RequestDirectives, ResponseDirectives};
use super::freshness::{self, HttpCachePolicy};
use super::state::HttpShared;
use super::status::{self, Detail};
use super::stored::{CacheHit, Stored, hit, respond};
use crate::cache::engine::stats::Kind;

/// Marks a response that the inner service made because it could not
/// reach the origin (connection refused or reset, closed before a
/// response, its own timeout): the HTTP cache then treats the origin as
/// unreachable, as it does an inner service error, and may answer with a
/// stale stored response instead (RFC 9111 §4.2.4; see
/// [`HttpCacheLayerBuilder::max_stale_if_unreachable`](super::HttpCacheLayerBuilder::max_stale_if_unreachable)).
///
/// Insert it in the response extensions, typically on a proxy's 502:
///
/// ```
/// use axum::body::Body;
/// use axum::http::{Response, StatusCode};
/// use tower_scale::http::UpstreamUnreachable;
///
/// fn unreachable() -> Response<Body> {
///     let mut res = Response::new(Body::from("upstream unreachable"));
///     *res.status_mut() = StatusCode::BAD_GATEWAY;
///     res.extensions_mut().insert(UpstreamUnreachable);
///     res
/// }
/// # let _ = unreachable();
/// ```
///
/// A marked response is never stored and never replaces what is stored;
/// with nothing stored that may stand in, it reaches the client as it is
/// (marker included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamUnreachable;

/// The default for [`max_stale_if_unreachable`](super::HttpCacheLayerBuilder::max_stale_if_unreachable):
/// one day.
pub(crate) const DEFAULT_MAX_STALE_IF_UNREACHABLE: Duration = Duration::from_secs(24 * 3600);

/// How the origin failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The inner service returned an error: unreachable.
    ServiceError,
    /// A response marked [`UpstreamUnreachable`], with its status.
    Unreachable(StatusCode),
    /// A 5xx from the origin: only `stale-if-error` may stand in.
    Status(StatusCode),
}

impl Failure {
    fn status(self) -> Option<StatusCode> {
        match self {
            Failure::ServiceError => None,
            Failure::Unreachable(s) | Failure::Status(s) => Some(s),
        }
    }
}

/// Whether a directive forbids serving `stored` (at `age`, stale by
/// `staleness`) without a successful validation, so that an unreachable
/// origin gets the client a 504: the response's `no-cache`,
/// `must-revalidate`, and in a shared cache `proxy-revalidate` or
/// `s-maxage` (RFC 9111 §4.2.4, §5.2.2); the request's `no-cache`, a
/// `max-age` it is older than, a `min-fresh` it does not meet, a
/// `max-stale` it is staler than (§5.2.1: the client said it does not
/// want it).
pub(crate) fn stale_forbidden(
    age: Duration,
    lifetime: Duration,
    cc: &ResponseDirectives,
    req: &RequestDirectives,
    rules: &HttpCachePolicy,
) -> bool {
    let secs = Duration::from_secs;
    let staleness = age.saturating_sub(lifetime);
    let response = cc.no_cache
        || cc.must_revalidate
        || (rules.shared && (cc.proxy_revalidate || cc.s_maxage.is_some()));
    let request = req.no_cache
        || req.max_age.is_some_and(|n| age > secs(n))
        || req.min_fresh.is_some_and(|n| age + secs(n) >= lifetime)
        || matches!(req.max_stale, Some(Some(n)) if staleness > secs(n));
    response || request
}

/// What the cache answers when the origin failed while `stored` (the
/// stored response for this request, being revalidated) was at hand;
/// `None`: what the inner service returned goes to the client.
///
/// `stale-if-error` first (its own window, as before); then, for an
/// unreachable origin and a client waiting for the answer (not a
/// background revalidation), a 504 when a directive forbids serving
/// stale, the stored response when it is stale by at most the configured
/// bound.
pub(crate) fn answer<B: Body>(
    shared: &HttpShared,
    stored: &Stored,
    failure: Failure,
    answers_client: bool,
    head: bool,
    client: &HeaderMap,
    req_cc: &RequestDirectives,
) -> Option<Response<CacheBody<B>>> {
    let rules = &shared.rules;
    let age = stored.age(shared.clock.now());
    let staleness = age.saturating_sub(stored.lifetime);
    let serve = |detail| {
        let mut res = hit(
            &shared.config,
            respond(stored, age, head, client),
            CacheHit::Local,
        );
        status::note_stood_in(
            &shared.config,
            &mut res,
            stored,
            age,
            failure.status(),
            detail,
        );
        res
    };
    if freshness::stale_if_error_allows(staleness, &stored.cc, rules) {
        shared.stats.incr(Kind::StaleIfError);
        return Some(serve(None));
    }
    if matches!(failure, Failure::Status(_)) || !answers_client {
        return None;
    }
    if stale_forbidden(age, stored.lifetime, &stored.cc, req_cc, rules) {
        if failure == Failure::ServiceError {
            shared.stats.incr(Kind::InnerErrors);
        }
        return Some(gateway_timeout(shared));
    }
    let bound = shared.config.max_stale_if_unreachable;
    if bound.is_zero() || staleness > bound {
        return None;
    }
    shared.stats.incr(Kind::StaleIfUnreachable);
    Some(serve(Some(Detail::Unreachable)))
}

/// The 504 the cache makes when the origin is unreachable and the stored
/// response may not be served stale.
fn gateway_timeout<B: Body>(shared: &HttpShared) -> Response<CacheBody<B>> {
    const BODY: &[u8] = b"504 Gateway Timeout: the origin is unreachable and the stored \
                          response may not be served without validation\n";
    let mut res = Response::new(CacheBody::full(Bytes::from_static(BODY), None));
    *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(BODY.len()));
    status::note(&shared.config, &mut res, |s| s.generated = true);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(age: u64, lifetime: u64, cc: &str, req: &str) -> bool {
        let mut res = HeaderMap::new();
        res.insert(header::CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
        let mut rq = HeaderMap::new();
        if !req.is_empty() {
            rq.insert(header::CACHE_CONTROL, HeaderValue::from_str(req).unwrap());
        }
        stale_forbidden(
            Duration::from_secs(age),
            Duration::from_secs(lifetime),
            &ResponseDirectives::from_headers(&res),
            &RequestDirectives::from_headers(&rq),
            &HttpCachePolicy::default(),
        )
    }

    #[test]
    fn rfc9111_4_2_4_directives_that_forbid_serving_stale() {
        assert!(!forbidden(100, 10, "max-age=10", ""));
        assert!(!forbidden(100, 10, "max-age=10, public", ""));
        for cc in [
            "max-age=10, must-revalidate",
            "max-age=10, proxy-revalidate",
            "max-age=10, no-cache",
            "s-maxage=10",
        ] {
            assert!(forbidden(100, 10, cc, ""), "{cc}");
        }
        // The request's own (§5.2.1).
        assert!(forbidden(100, 10, "max-age=10", "no-cache"));
        assert!(forbidden(5, 10, "max-age=10", "max-age=0"));
        assert!(!forbidden(100, 10, "max-age=10", "max-age=200"));
        assert!(forbidden(5, 10, "max-age=10", "min-fresh=6"));
        assert!(forbidden(100, 10, "max-age=10", "max-stale=50"));
        assert!(!forbidden(100, 10, "max-age=10", "max-stale=90"));
        assert!(!forbidden(100, 10, "max-age=10", "max-stale"));
    }

    #[test]
    fn proxy_revalidate_and_s_maxage_bind_only_a_shared_cache() {
        let mut res = HeaderMap::new();
        res.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=10, s-maxage=10, proxy-revalidate"),
        );
        let private = HttpCachePolicy {
            shared: false,
            ..HttpCachePolicy::default()
        };
        assert!(!stale_forbidden(
            Duration::from_secs(100),
            Duration::from_secs(10),
            &ResponseDirectives::from_headers(&res),
            &RequestDirectives::default(),
            &private,
        ));
    }
}
