//! RFC 9213 targeted cache control (`CDN-Cache-Control` and configured
//! fields) against the real origin over TCP: one test per rule, named
//! after its section. The origin answers `/t/{name}` with the headers a
//! test scripts for that path (and a 304 with the scripted ones to a
//! request whose `If-None-Match` matches the scripted `ETag`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::get;

use super::{Origin, Setup, reply, setup};

/// What the origin answers on one scripted path.
#[derive(Clone, Default)]
pub(crate) struct Script {
    /// The status of a full answer (200 when 0).
    status: u16,
    headers: Vec<(&'static str, Vec<u8>)>,
    /// The headers of a 304 (when the script has an `ETag`).
    not_modified: Vec<(&'static str, Vec<u8>)>,
}

pub(crate) fn routes() -> Router<Arc<Origin>> {
    Router::new().route(
        "/t/{name}",
        get(
            |State(o): State<Arc<Origin>>, Path(name): Path<String>, hd: HeaderMap| async move {
                let path = format!("/t/{name}");
                let n = o.hit(&path);
                let script = o.scripts.lock().unwrap().get(&path).cloned();
                let script = script.unwrap_or_default();
                let etag = script.headers.iter().find(|(k, _)| *k == "etag");
                let matches = etag.is_some_and(|(_, e)| {
                    hd.get("if-none-match").map(|v| v.as_bytes()) == Some(&e[..])
                });
                let (status, headers) = if matches {
                    o.conditional.fetch_add(1, Ordering::SeqCst);
                    (304, &script.not_modified)
                } else {
                    (script.status.max(200), &script.headers)
                };
                let body = if status == 304 {
                    String::new()
                } else {
                    format!("{path} #{n}")
                };
                let mut res = reply(status, &[], body);
                for (k, v) in headers {
                    res.headers_mut()
                        .append(*k, HeaderValue::from_bytes(v).expect("a field value"));
                }
                res
            },
        ),
    )
}

/// Scripts `path`'s full answer.
fn script(s: &Setup, path: &str, headers: &[(&'static str, &[u8])]) {
    edit(s, path, |sc| {
        sc.headers = headers.iter().map(|(k, v)| (*k, v.to_vec())).collect();
    });
}

fn edit(s: &Setup, path: &str, f: impl FnOnce(&mut Script)) {
    let mut scripts = s.origin.scripts.lock().unwrap();
    f(scripts.entry(path.to_string()).or_default());
}

/// Two GETs of `path`: whether the second was answered from the cache.
async fn stored(s: &Setup, path: &str) -> bool {
    let before = s.origin.count(path);
    s.get(path, &[]).await;
    s.get(path, &[]).await;
    s.origin.count(path) == before + 1
}

const CDN: &str = "cdn-cache-control";

#[tokio::test]
async fn rfc9213_2_1_a_fresh_targeted_max_age_is_stored_despite_cache_control_no_store() {
    let s = setup(|b| b).await;
    script(
        &s,
        "/t/a",
        &[("cache-control", b"no-store"), (CDN, b"max-age=60")],
    );
    let first = s.get("/t/a", &[]).await;
    assert_eq!(
        first.headers["cache-control"], "no-store",
        "passed on as is"
    );
    assert_eq!(
        first.headers["cache-status"],
        "tower-scale; fwd=miss; stored"
    );
    s.clock.advance(Duration::from_secs(20));
    let hit = s.get("/t/a", &[]).await;
    assert_eq!(hit.text(), "/t/a #1");
    assert_eq!(hit.headers["cache-status"], "tower-scale; hit; ttl=40");
    s.clock.advance(Duration::from_secs(41));
    assert_eq!(
        s.get("/t/a", &[]).await.text(),
        "/t/a #2",
        "stale: refetched"
    );
}

#[tokio::test]
async fn rfc9213_2_1_targeted_no_store_private_and_no_cache_win_over_cache_control() {
    let s = setup(|b| b).await;
    let public: (&str, &[u8]) = ("cache-control", b"public, max-age=60");
    script(&s, "/t/no-store", &[public, (CDN, b"no-store")]);
    script(&s, "/t/private", &[public, (CDN, b"max-age=60, private")]);
    assert!(!stored(&s, "/t/no-store").await);
    assert!(!stored(&s, "/t/private").await);
    // `no-cache`: stored, but revalidated before every use.
    script(
        &s,
        "/t/no-cache",
        &[public, (CDN, b"max-age=60, no-cache"), ("etag", b"\"v1\"")],
    );
    s.get("/t/no-cache", &[]).await;
    let again = s.get("/t/no-cache", &[]).await;
    assert_eq!(again.text(), "/t/no-cache #1", "the stored body, validated");
    assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 1);
    // The same response in a private cache: `private` does not keep it out.
    let p = setup(|b| b.private()).await;
    script(&p, "/t/private", &[public, (CDN, b"max-age=60, private")]);
    assert!(stored(&p, "/t/private").await);
}

#[tokio::test]
async fn rfc9213_2_2_an_invalid_dictionary_is_ignored_as_a_whole() {
    let s = setup(|b| b).await;
    // The `no-store` in an invalid field counts for nothing...
    script(
        &s,
        "/t/cc-allows",
        &[
            ("cache-control", b"max-age=60"),
            (CDN, b"no-store, max-age=0;"),
        ],
    );
    assert!(stored(&s, "/t/cc-allows").await);
    // ...and neither does its `max-age`: `Cache-Control` rules.
    for (path, bad) in [
        ("/t/upper", &b"Max-Age=60"[..]),
        ("/t/spaces", b"max-age = 60"),
        ("/t/trailing", b"max-age=60,"),
        ("/t/decimal-key", b"max-age=60, 1x"),
        ("/t/obs-text", b"max-age=60, x=\"caf\xe9\""),
    ] {
        script(&s, path, &[("cache-control", b"no-store"), (CDN, bad)]);
        assert!(!stored(&s, path).await, "{path}");
    }
}

#[tokio::test]
async fn rfc9213_2_1_the_first_valid_targeted_field_wins() {
    let s = setup(|b| b.targeted_fields(["MyApp-CDN-Cache-Control", "cdn-cache-control"])).await;
    const MINE: &str = "myapp-cdn-cache-control";
    // The first absent: the second applies.
    script(
        &s,
        "/t/absent",
        &[("cache-control", b"no-store"), (CDN, b"max-age=60")],
    );
    assert!(stored(&s, "/t/absent").await);
    // The first invalid: ignored, the second applies.
    script(
        &s,
        "/t/invalid",
        &[
            ("cache-control", b"max-age=60"),
            (MINE, b"max-age=60;"),
            (CDN, b"no-store"),
        ],
    );
    assert!(!stored(&s, "/t/invalid").await);
    // The first empty: ignored too.
    script(
        &s,
        "/t/empty",
        &[
            ("cache-control", b"max-age=60"),
            (MINE, b""),
            (CDN, b"no-store"),
        ],
    );
    assert!(!stored(&s, "/t/empty").await);
    // The first valid: the second does not count.
    script(
        &s,
        "/t/both",
        &[
            ("cache-control", b"no-store"),
            (MINE, b"max-age=60"),
            (CDN, b"no-store"),
        ],
    );
    assert!(stored(&s, "/t/both").await);
    // Both invalid: `Cache-Control`.
    script(
        &s,
        "/t/neither",
        &[
            ("cache-control", b"no-store"),
            (MINE, b"max-age=60;"),
            (CDN, b"max-age=60;"),
        ],
    );
    assert!(!stored(&s, "/t/neither").await);
    // An empty list turns targeted control off.
    let off = setup(|b| b.targeted_fields(Vec::<String>::new())).await;
    script(
        &off,
        "/t/absent",
        &[("cache-control", b"no-store"), (CDN, b"max-age=60")],
    );
    assert!(!stored(&off, "/t/absent").await);
    assert_eq!(
        off.get("/t/absent", &[]).await.headers[CDN],
        "max-age=60",
        "a field not on the target list passes"
    );
    // Names that are not header names, or `cache-control`, are refused.
    for bad in [&["cdn cache control"][..], &["cache-control"]] {
        let built = tower_scale::http::HttpCacheLayer::builder()
            .targeted_fields(bad)
            .build();
        assert!(built.is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn rfc9213_2_1_expires_is_ignored_when_a_targeted_field_is_valid() {
    let s = setup(|b| b).await;
    let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(3600));
    let future = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    // A past `Expires` would make it stale at once.
    script(
        &s,
        "/t/past",
        &[("expires", past.as_bytes()), (CDN, b"max-age=60")],
    );
    assert!(stored(&s, "/t/past").await);
    // A future one grants nothing once a valid targeted field is there
    // (`must-revalidate` alone: no explicit freshness, no Last-Modified).
    script(
        &s,
        "/t/future",
        &[("expires", future.as_bytes()), (CDN, b"must-revalidate")],
    );
    assert!(!stored(&s, "/t/future").await);
    // Without the targeted field, that `Expires` is followed.
    script(&s, "/t/expires-only", &[("expires", future.as_bytes())]);
    assert!(stored(&s, "/t/expires-only").await);
}

#[tokio::test]
async fn rfc9213_2_1_set_cookie_is_still_not_stored() {
    let s = setup(|b| b).await;
    script(
        &s,
        "/t/cookie",
        &[(CDN, b"public, max-age=60"), ("set-cookie", b"session=1")],
    );
    assert!(!stored(&s, "/t/cookie").await);
    let shared = setup(|b| b.share_set_cookie(true)).await;
    script(
        &shared,
        "/t/cookie",
        &[(CDN, b"public, max-age=60"), ("set-cookie", b"session=1")],
    );
    assert!(stored(&shared, "/t/cookie").await, "unless configured");
}

#[tokio::test]
async fn rfc9213_2_1_the_authorization_rule_still_applies() {
    let s = setup(|b| b).await;
    let auth = [("authorization", "Bearer alice")];
    // `public` in the ignored `Cache-Control` does not count.
    script(
        &s,
        "/t/auth",
        &[
            ("cache-control", b"public, max-age=60"),
            (CDN, b"max-age=60"),
        ],
    );
    s.get("/t/auth", &auth).await;
    s.get("/t/auth", &auth).await;
    assert_eq!(s.origin.count("/t/auth"), 2);
    // `public`, `s-maxage` or `must-revalidate` in the targeted field do.
    for (path, cdn) in [
        ("/t/auth-public", &b"public, max-age=60"[..]),
        ("/t/auth-s-maxage", b"s-maxage=60"),
        ("/t/auth-must", b"max-age=60, must-revalidate"),
    ] {
        script(&s, path, &[("cache-control", b"no-store"), (CDN, cdn)]);
        s.get(path, &auth).await;
        s.get(path, &auth).await;
        assert_eq!(s.origin.count(path), 1, "{path}");
    }
}

#[tokio::test]
async fn rfc9213_3_the_targeted_field_is_stripped_unless_configured() {
    let s = setup(|b| b).await;
    let headers: [(&'static str, &[u8]); 3] = [
        ("cache-control", b"no-store"),
        (CDN, b"max-age=60"),
        ("other-cdn-cache-control", b"no-store"),
    ];
    script(&s, "/t/strip", &headers);
    let miss = s.get("/t/strip", &[]).await;
    let hit = s.get("/t/strip", &[]).await;
    assert_eq!(s.origin.count("/t/strip"), 1);
    for got in [&miss, &hit] {
        assert!(!got.headers.contains_key(CDN));
        // Not on the target list: passed on (RFC 9213 §2.1).
        assert_eq!(got.headers["other-cdn-cache-control"], "no-store");
    }
    // Stripped on a response that is not stored, too.
    script(&s, "/t/strip-no-store", &[(CDN, b"no-store")]);
    assert!(
        !s.get("/t/strip-no-store", &[])
            .await
            .headers
            .contains_key(CDN)
    );
    let pass = setup(|b| b.strip_targeted_fields(false)).await;
    script(&pass, "/t/strip", &headers);
    let miss = pass.get("/t/strip", &[]).await;
    let hit = pass.get("/t/strip", &[]).await;
    assert_eq!(pass.origin.count("/t/strip"), 1);
    assert_eq!(miss.headers[CDN], "max-age=60");
    assert_eq!(hit.headers[CDN], "max-age=60");
}

#[tokio::test]
async fn rfc9213_2_1_a_304_updates_the_stored_targeted_field() {
    let s = setup(|b| b).await;
    let etag: (&str, &[u8]) = ("etag", b"\"v1\"");
    script(
        &s,
        "/t/reval",
        &[("cache-control", b"no-store"), (CDN, b"max-age=10"), etag],
    );
    edit(&s, "/t/reval", |sc| {
        sc.not_modified = vec![(CDN, b"max-age=100".to_vec()), ("etag", b"\"v1\"".to_vec())];
    });
    s.get("/t/reval", &[]).await;
    s.clock.advance(Duration::from_secs(11));
    let revalidated = s.get("/t/reval", &[]).await;
    assert_eq!(revalidated.text(), "/t/reval #1");
    assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 1);
    assert!(!revalidated.headers.contains_key(CDN), "stripped");
    // Fresh for 100 s now, by the 304's field.
    s.clock.advance(Duration::from_secs(50));
    let hit = s.get("/t/reval", &[]).await;
    assert_eq!(hit.text(), "/t/reval #1");
    assert_eq!(hit.headers["cache-status"], "tower-scale; hit; ttl=50");
    assert_eq!(s.origin.count("/t/reval"), 2);
    // A 304 whose targeted field says `no-store`: nothing stays stored.
    edit(&s, "/t/reval", |sc| {
        sc.not_modified = vec![(CDN, b"no-store".to_vec()), ("etag", b"\"v1\"".to_vec())];
    });
    s.clock.advance(Duration::from_secs(51));
    s.get("/t/reval", &[]).await;
    assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 2);
    assert_eq!(s.get("/t/reval", &[]).await.text(), "/t/reval #4");
    // A 304 that resends only a `Cache-Control: no-store`: the stored
    // targeted field still rules, and the merged response is stored.
    script(
        &s,
        "/t/keep",
        &[("cache-control", b"no-store"), (CDN, b"max-age=10"), etag],
    );
    edit(&s, "/t/keep", |sc| {
        sc.not_modified = vec![
            ("cache-control", b"no-store".to_vec()),
            ("etag", b"\"v1\"".to_vec()),
        ];
    });
    s.get("/t/keep", &[]).await;
    s.clock.advance(Duration::from_secs(11));
    s.get("/t/keep", &[]).await;
    let after = s.get("/t/keep", &[]).await;
    assert_eq!(after.text(), "/t/keep #1");
    assert_eq!(s.origin.count("/t/keep"), 2, "one fetch, one revalidation");
}

#[tokio::test]
async fn rfc9213_2_1_stale_directives_come_from_the_targeted_field() {
    let s = setup(|b| b).await;
    // stale-while-revalidate: served stale at once, revalidated behind.
    script(
        &s,
        "/t/swr",
        &[
            ("cache-control", b"max-age=10"),
            (CDN, b"max-age=10, stale-while-revalidate=30"),
        ],
    );
    s.get("/t/swr", &[]).await;
    s.clock.advance(Duration::from_secs(15));
    let stale = s.get("/t/swr", &[]).await;
    assert_eq!(stale.text(), "/t/swr #1");
    assert_eq!(stale.headers["cache-status"], "tower-scale; hit; ttl=-5");
    // ...but not from the ignored `Cache-Control`.
    script(
        &s,
        "/t/swr-cc",
        &[
            ("cache-control", b"max-age=10, stale-while-revalidate=30"),
            (CDN, b"max-age=10"),
        ],
    );
    s.get("/t/swr-cc", &[]).await;
    s.clock.advance(Duration::from_secs(15));
    assert_eq!(s.get("/t/swr-cc", &[]).await.text(), "/t/swr-cc #2");
    // stale-if-error: a 500 is answered with the stale response.
    script(
        &s,
        "/t/sie",
        &[
            ("cache-control", b"no-store"),
            (CDN, b"max-age=10, stale-if-error=60"),
        ],
    );
    s.get("/t/sie", &[]).await;
    edit(&s, "/t/sie", |sc| sc.status = 500);
    s.clock.advance(Duration::from_secs(20));
    let stood_in = s.get("/t/sie", &[]).await;
    assert_eq!(stood_in.status, 200);
    assert_eq!(stood_in.text(), "/t/sie #1");
    script(
        &s,
        "/t/sie-cc",
        &[
            ("cache-control", b"max-age=10, stale-if-error=60"),
            (CDN, b"max-age=10"),
        ],
    );
    s.get("/t/sie-cc", &[]).await;
    edit(&s, "/t/sie-cc", |sc| sc.status = 500);
    s.clock.advance(Duration::from_secs(20));
    assert_eq!(s.get("/t/sie-cc", &[]).await.status, 500);
}

#[tokio::test]
async fn rfc9213_2_2_hostile_values_are_read_strictly() {
    let s = setup(|b| b).await;
    let no_store: (&str, &[u8]) = ("cache-control", b"no-store");
    // (targeted value, stored?) with `Cache-Control: no-store` beside it.
    let cases: [(&[u8], bool); 14] = [
        // 16 digits: not an sf-integer, the field is invalid.
        (b"max-age=1234567890123456", false),
        // 15 digits: valid, capped at 2^31 s.
        (b"max-age=999999999999999", true),
        (b"max-age=-60", false),
        (b"max-age=60.0", false),
        (b"max-age=\"60\"", false),
        // A key given twice takes its last value.
        (b"no-store, max-age=60, no-store=?0", true),
        (b"max-age=60, no-store=?0, no-store", false),
        (b"max-age=0, max-age=60", true),
        // Parameters are ignored.
        (b"max-age=60;a=1;b, private=?0;c", true),
        (b"max-age=60, private;x=?0", false),
        // White space: OWS around commas is fine, around `=` is not.
        (b"max-age=60 ,\tpublic", true),
        (b"max-age =60", false),
        // Inner lists and byte sequences parse; as a flag they count.
        (b"max-age=60, no-store=(a b)", false),
        (b"max-age=60, x=:aGk=:", true),
    ];
    for (i, (cdn, expect)) in cases.iter().enumerate() {
        let path = format!("/t/hostile-{i}");
        script(&s, &path, &[no_store, (CDN, cdn)]);
        assert_eq!(
            stored(&s, &path).await,
            *expect,
            "{}",
            String::from_utf8_lossy(cdn)
        );
    }
    // Repeated field lines are one dictionary.
    script(
        &s,
        "/t/lines",
        &[no_store, (CDN, b"max-age=60"), (CDN, b"private")],
    );
    assert!(!stored(&s, "/t/lines").await);
    // The capped lifetime shows in Cache-Status.
    let hit = s.get("/t/hostile-1", &[]).await;
    assert_eq!(
        hit.headers["cache-status"],
        format!("tower-scale; hit; ttl={}", 1u64 << 31)
    );
}
