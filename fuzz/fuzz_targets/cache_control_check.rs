// What must hold for any bytes given to the `Cache-Control` parser. Shared
// by the fuzz target and by tests/http/parser.rs, which replays
// fuzz/corpus/cache_control through it on stable.

use tower_scale::http::HttpCachePolicy;
use tower_scale::http::cache_control::{
    MAX_DELTA_SECONDS, RequestDirectives, ResponseDirectives,
};
use tower_scale::http::freshness::storable;

/// The input split in two, as two field lines of one response.
pub fn check(data: &[u8]) {
    let (a, b) = data.split_at(data.len() / 2);
    let r = ResponseDirectives::parse([a, b]);
    for v in [r.max_age, r.s_maxage, r.stale_while_revalidate, r.stale_if_error]
        .into_iter()
        .flatten()
    {
        assert!(v <= MAX_DELTA_SECONDS);
    }
    let q = RequestDirectives::parse([data]);
    assert!(q.max_age.is_none_or(|v| v <= MAX_DELTA_SECONDS));

    // Never lost: in a line without quotes a member is exactly what lies
    // between commas, so a member that reads `private` (white space and
    // case aside) must count.
    for line in [a, b] {
        if line.contains(&b'"') {
            continue;
        }
        for member in line.split(|&c| c == b',') {
            let name = member.trim_ascii_start().trim_ascii_end();
            let is = |d: &str| name.eq_ignore_ascii_case(d.as_bytes());
            assert!(!is("private") || r.private, "private lost: {line:?}");
            assert!(!is("no-store") || r.no_store, "no-store lost: {line:?}");
            assert!(!is("no-cache") || r.no_cache, "no-cache lost: {line:?}");
        }
    }

    // Fail safe: unparseable, private or no-store is never stored shared.
    if r.unparseable || r.private || r.no_store {
        let mut res = http::HeaderMap::new();
        for line in [a, b] {
            if let Ok(v) = http::HeaderValue::from_bytes(line) {
                res.append(http::header::CACHE_CONTROL, v);
            }
        }
        let req = http::HeaderMap::new();
        let decision = storable(
            &http::Method::GET,
            &req,
            &RequestDirectives::default(),
            http::StatusCode::OK,
            &res,
            &r,
            &HttpCachePolicy::default(),
        );
        assert!(decision.is_err(), "{r:?} stored");
    }
}
