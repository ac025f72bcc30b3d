//! The purge API as an axum `Router` (feature `purge`): `POST /_purge`
//! with a bearer token, see [`HttpCacheLayer::purge_router`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;

use super::{HttpCacheLayer, Purge};

/// The largest purge request body accepted (64 KiB); a larger one gets a
/// `413`.
pub const PURGE_MAX_BODY: usize = 64 * 1024;
/// How long the purge route waits for the whole request body (10 s); a
/// body still arriving then gets a `408` (a client trickling bytes holds
/// no task for longer).
pub const PURGE_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many tags or URLs in one request.
const MAX_ITEMS: usize = 1_000;
/// The longest tag accepted, in bytes.
const MAX_TAG_BYTES: usize = 256;
/// The longest URL accepted, in bytes.
const MAX_URL_BYTES: usize = 8 * 1024;

#[derive(Clone)]
struct PurgeState {
    layer: HttpCacheLayer,
    token: Arc<[u8]>,
    /// The second (Unix time) of the last warning about a refused request:
    /// at most one a second, however many come.
    warned_at: Arc<AtomicU64>,
}

impl fmt::Debug for PurgeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("PurgeState").finish_non_exhaustive()
    }
}

/// The request body: exactly one of the three.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    tags: Option<Vec<String>>,
    urls: Option<Vec<String>>,
    all: Option<bool>,
}

impl HttpCacheLayer {
    /// The purge API as an axum `Router` (feature `purge`), to serve on an
    /// admin listener or merge into an app: `POST /_purge` with one of
    ///
    /// - `{"tags": ["user:12", ...]}`: responses tagged with any of them,
    /// - `{"urls": ["https://example.com/users/12", ...]}`: every variant
    ///   of each URL (spelled as the cache key is, see [`Purge::Urls`]),
    /// - `{"all": true}`: everything,
    ///
    /// and `Authorization: Bearer TOKEN`. It runs [`purge`](Self::purge)
    /// (so with a shared tier it reaches every instance) and answers:
    ///
    /// | case | status |
    /// | --- | --- |
    /// | done | `200` `{"purged": N}`, N entries removed on this instance |
    /// | no `Authorization`, another scheme, a wrong token | `401` with `WWW-Authenticate: Bearer`, nothing purged; counted (`tower_scale_cache_purges_refused_total`, [`CacheStats::purges_refused`](crate::cache::CacheStats::purges_refused)) and logged as a warning at most once a second, never with what the request sent |
    /// | a body over [`PURGE_MAX_BODY`] (64 KiB), declared or streamed | `413` |
    /// | a body not complete within [`PURGE_BODY_TIMEOUT`] (10 s) | `408` |
    /// | not JSON, an unknown field, none or several of `tags` / `urls` / `all`, `all` not `true`, an empty list, more than 1,000 items, a tag over 256 bytes or a URL over 8 KiB, an empty string, a tag with whitespace or a control character (stored tags are split on whitespace, so it could never match), a URL that is not an absolute `http` or `https` URL | `400` `{"error": "..."}` saying which |
    /// | another method | `405` |
    ///
    /// The token is compared in constant time (a fold over the bytes that
    /// never stops early; only its length can be learnt). An empty token
    /// matches no request. Counting walks the store for tags and `all`
    /// (O(entries), run on the request's task).
    ///
    /// ```
    /// # fn demo() -> Result<(), tower_scale::ConfigError> {
    /// use tower_scale::http::HttpCacheLayer;
    ///
    /// let layer = HttpCacheLayer::builder().build()?;
    /// let admin: axum::Router = layer.purge_router("a long random secret");
    /// # let _ = admin; Ok(()) }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "purge")))]
    pub fn purge_router(&self, token: impl Into<String>) -> Router {
        let state = PurgeState {
            layer: self.clone(),
            token: token.into().into_bytes().into(),
            warned_at: Arc::new(AtomicU64::new(0)),
        };
        Router::new()
            .route("/_purge", post(purge_handler))
            .with_state(state)
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

fn bad_request(error: impl Into<String>) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": error.into() }),
    )
}

async fn purge_handler(State(state): State<PurgeState>, req: Request) -> Response {
    if !authorized(req.headers(), &state.token) {
        refused(&state);
        let mut res = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "a valid `Authorization: Bearer` token is required" }),
        );
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return res;
    }
    let too_large = || {
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({ "error": format!("the body is over {PURGE_MAX_BODY} bytes") }),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > PURGE_MAX_BODY as u64) {
        return too_large();
    }
    let body: Body = req.into_body();
    let read = tokio::time::timeout(
        PURGE_BODY_TIMEOUT,
        Limited::new(body, PURGE_MAX_BODY).collect(),
    );
    let bytes = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(_)) => return bad_request("the body could not be read"),
        Err(_) => {
            return json(
                StatusCode::REQUEST_TIMEOUT,
                serde_json::json!({ "error": format!(
                    "the body did not arrive within {} s",
                    PURGE_BODY_TIMEOUT.as_secs()
                ) }),
            );
        }
    };
    let what = match parse(&bytes) {
        Ok(what) => what,
        Err(error) => return bad_request(error),
    };
    let purged = state.layer.purge(&what);
    json(StatusCode::OK, serde_json::json!({ "purged": purged }))
}

/// Counts a refused request and warns about it, at most once a second
/// (a flood of them must not flood the log). Nothing the request sent is
/// logged: a near-miss token is token material.
fn refused(state: &PurgeState) {
    let shared = &state.layer.shared;
    shared
        .stats
        .incr_rare(crate::cache::engine::stats::Rare::PurgesRefused);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = state.warned_at.load(Ordering::Relaxed);
    if now > last
        && state
            .warned_at
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            refused_so_far = shared.stats().purges_refused,
            "purge route: a request without a valid bearer token was refused (401)"
        );
    }
}

/// Whether the request carries `Authorization: Bearer <token>` (scheme
/// case-insensitive, RFC 9110 §11.1).
fn authorized(headers: &HeaderMap, token: &[u8]) -> bool {
    let mut lines = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (lines.next(), lines.next()) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    !token.is_empty() && constant_time_eq(given.trim_ascii(), token)
}

/// `a == b` in time that depends only on the lengths: every byte pair is
/// folded in, with no early exit (a length mismatch returns at once; the
/// length of the token is not the secret).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The request body as a [`Purge`], or what is wrong with it.
fn parse(bytes: &[u8]) -> Result<Purge, String> {
    let body: PurgeBody =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid request body: {e}"))?;
    match (body.tags, body.urls, body.all) {
        (Some(tags), None, None) => {
            check_items("tags", &tags, MAX_TAG_BYTES)?;
            if let Some(i) = tags
                .iter()
                .position(|t| t.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(format!(
                    "`tags[{i}]` contains whitespace or a control character (no stored tag can)"
                ));
            }
            Ok(Purge::Tags(tags))
        }
        (None, Some(urls), None) => {
            check_items("urls", &urls, MAX_URL_BYTES)?;
            for (i, url) in urls.iter().enumerate() {
                super::purge::url_spellings(url).map_err(|why| format!("`urls[{i}]`: {why}"))?;
            }
            Ok(Purge::Urls(urls))
        }
        (None, None, Some(true)) => Ok(Purge::All),
        (None, None, Some(false)) => Err("`all` must be true".into()),
        (None, None, None) => Err("one of `tags`, `urls` or `all` is required".into()),
        _ => Err("only one of `tags`, `urls` or `all` may be given".into()),
    }
}

fn check_items(field: &str, items: &[String], max_bytes: usize) -> Result<(), String> {
    if items.is_empty() {
        return Err(format!("`{field}` must not be empty"));
    }
    if items.len() > MAX_ITEMS {
        return Err(format!(
            "`{field}` has {} items, at most {MAX_ITEMS} are allowed",
            items.len()
        ));
    }
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() {
            return Err(format!("`{field}[{i}]` is empty"));
        }
        if item.len() > max_bytes {
            return Err(format!(
                "`{field}[{i}]` is {} bytes, at most {max_bytes} are allowed",
                item.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"secret-token", b"secret-toke"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokenx"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokeN"));
        assert!(!constant_time_eq(b"secret-token", b"Secret-token"));
    }

    #[test]
    fn authorization_needs_the_bearer_scheme_and_the_token() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(authorized(&with("Bearer tok"), b"tok"));
        assert!(authorized(&with("bearer tok"), b"tok"));
        assert!(!authorized(&with("Basic tok"), b"tok"));
        assert!(!authorized(&with("Bearer tik"), b"tok"));
        assert!(!authorized(&with("Bearer "), b""));
        assert!(!authorized(&HeaderMap::new(), b"tok"));
    }
}
