//! What the balancer does to a request and a response on the way through
//! (hop-by-hop fields, the upstream's address), how a failure is read,
//! and when a failed request may be sent again.

use http::header::{self, HeaderMap, HeaderName};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Uri};

use super::stats::FailureKind;

/// The hop-by-hop fields of RFC 9110 §7.6.1, and the old ones still seen.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop fields (RFC 9110 §7.6.1): the standard ones,
/// `Keep-Alive`, `Proxy-Connection`, and every field `Connection` names,
/// except `Host` (the target's authority is never hop-by-hop: a request
/// naming it in `Connection` would reach the origin with another host).
///
/// The balancer strips both ways itself. An HTTP cache in front of it
/// should see the request stripped as well, or a client can name a field
/// the cache keys on (`Connection: accept-language`) so that the origin
/// answers without it while the cache stores the answer under it:
/// call this on the request before the cache.
///
/// ```
/// use http::HeaderMap;
///
/// let mut h = HeaderMap::new();
/// h.insert("connection", "accept-language, host".parse().unwrap());
/// h.insert("accept-language", "fr".parse().unwrap());
/// h.insert("host", "a.test".parse().unwrap());
/// tower_scale::balance::strip_hop_by_hop(&mut h);
/// assert!(h.get("accept-language").is_none() && h.get("connection").is_none());
/// assert_eq!(h["host"], "a.test");
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, without hashing.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes())
                && name != header::HOST
            {
                named.push(name);
            }
        }
    }
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Whether `name` is hop-by-hop whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
}

/// The request's target on the upstream: the upstream's scheme and
/// authority, the request's own path and query (`/` if it has none). An
/// absolute-form target naming another host keeps only its path: the
/// upstream is always one of the configured ones.
pub(crate) fn target(scheme: &Scheme, authority: &Authority, uri: &Uri) -> Uri {
    // An asterisk-form target (`OPTIONS *`) goes as `/`.
    let path = uri
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'))
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path);
    // Scheme, authority and path all present: `from_parts` cannot fail.
    Uri::from_parts(parts).unwrap_or_default()
}

/// The size of a request head as the balancer counts it: the target, and
/// every field's name and value.
pub(crate) fn head_size(uri: &Uri, headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    fields + uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// Methods that may be sent twice with the effect of once (RFC 9110
/// §9.2.2).
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request that failed with `kind` may go to another upstream.
///
/// `body_back`: its body came back unread (nothing of it was sent). A
/// connect failure sent nothing, so any method goes again; a reset or a
/// close before the response may have reached the application, so only
/// an idempotent method goes again; a timeout is never retried (the
/// client has already waited the whole upstream timeout), nor an answer
/// that was not HTTP. Never without the body.
pub(crate) fn may_retry(kind: FailureKind, idempotent: bool, body_back: bool) -> bool {
    body_back
        && match kind {
            FailureKind::Connect => true,
            FailureKind::Reset => idempotent,
            FailureKind::Timeout | FailureKind::Protocol | FailureKind::HealthCheck => false,
        }
}

/// How a request failed, read from the client's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The upstream's fault.
    Upstream(FailureKind),
    /// The request itself could not be sent (its body failed while being
    /// read): not the upstream's fault.
    Request,
    /// The upstream timeout passed while the client was still sending the
    /// body: the upstream was waiting for it, not the other way round.
    SlowClient,
    /// The upstream closed or reset the connection while a request with a
    /// body was being written: most often its answer to a body it refuses
    /// (a `413` and a close), so one alone does not eject it; three in a
    /// row with no answer between do (an upstream that drops every
    /// connection). Never retried: the body was read.
    ClosedDuringUpload,
}

/// hyper's text for an error writing the request body to the connection.
const BODY_WRITE: &str = "error writing a body to connection";

/// Reads a client error.
pub(crate) fn classify(error: &hyper_util::client::legacy::Error) -> Outcome {
    if error.is_connect() {
        return Outcome::Upstream(FailureKind::Connect);
    }
    let mut source = std::error::Error::source(error);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() || h.is_body_write_aborted() {
                return Outcome::Request;
            }
            // hyper has no predicate for its `BodyWrite` kind; its text is
            // what tells (tests/balance/panic.rs fails if it changes).
            if h.to_string() == BODY_WRITE {
                return Outcome::ClosedDuringUpload;
            }
            if h.is_parse() || h.is_parse_status() {
                return Outcome::Upstream(FailureKind::Protocol);
            }
            if h.is_timeout() {
                return Outcome::Upstream(FailureKind::Timeout);
            }
        }
        source = err.source();
    }
    // Closed, canceled, incomplete, or an I/O error (reset, broken pipe).
    Outcome::Upstream(FailureKind::Reset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_fields_go_and_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-secret-hop", "1"),
            ("accept", "*/*"),
            ("cache-control", "no-cache"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "cache-control"]);
    }

    #[test]
    fn the_target_is_always_the_upstream() {
        let authority: Authority = "10.0.0.1:8080".parse().unwrap_or_else(|_| unreachable!());
        let t = |s: &str| {
            let uri: Uri = s.parse().unwrap_or_default();
            target(&Scheme::HTTP, &authority, &uri).to_string()
        };
        assert_eq!(t("/a/b?c=d"), "http://10.0.0.1:8080/a/b?c=d");
        assert_eq!(t("http://evil.example:25/x?y"), "http://10.0.0.1:8080/x?y");
        assert_eq!(t("evil.example:443"), "http://10.0.0.1:8080/");
        assert_eq!(t("*"), "http://10.0.0.1:8080/");
    }

    #[test]
    fn retry_rule() {
        use FailureKind::*;
        // Nothing sent: any method, once, with its body.
        assert!(may_retry(Connect, false, true));
        assert!(may_retry(Connect, true, true));
        // Reset before a response: idempotent methods only.
        assert!(may_retry(Reset, true, true));
        assert!(!may_retry(Reset, false, true));
        // Never a timeout nor a response that was not HTTP.
        assert!(!may_retry(Timeout, true, true));
        assert!(!may_retry(Protocol, true, true));
        // Never once the body was read.
        for kind in [Connect, Reset, Timeout, Protocol] {
            assert!(!may_retry(kind, true, false));
        }
        assert!(idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
        assert!(!idempotent(
            &Method::from_bytes(b"FROB").unwrap_or_default()
        ));
    }
}
