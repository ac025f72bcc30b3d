//! Range requests (RFC 9110 §14) answered from stored responses: `206`
//! bodies byte-identical to the slice of the stored one, `416` when no
//! byte exists, `If-Range`, several ranges and misses left to the origin,
//! a `206` never stored, hostile `Range` fields.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Response};
use axum::routing::get;

use super::{Origin, Setup, h, reply, setup};

/// The length of the bodies below.
const LEN: usize = 1000;
/// Long before `Date` (now): a strong validator.
const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// A `Last-Modified` ten seconds before the `Date` it is sent with: too
/// close for a strong validator (RFC 9110 §8.8.2.2).
static YOUNG: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

fn now() -> String {
    httpdate::fmt_http_date(SystemTime::now())
}

/// No two neighbouring bytes alike, so a slice off by one shows.
fn body() -> Vec<u8> {
    (0..LEN).map(|i| (i * 7 % 251) as u8).collect()
}

/// Counts the `Range` requests the origin saw.
static RANGED: AtomicUsize = AtomicUsize::new(0);

/// Answers a `Range` request with a `206` of its first byte (whatever was
/// asked: enough to tell it from the cache's answer), else a `200`.
fn answer(
    o: &Origin,
    path: &str,
    hd: &HeaderMap,
    headers: &[(&'static str, String)],
) -> Response<Body> {
    o.hit(path);
    if hd.contains_key("range") {
        RANGED.fetch_add(1, Ordering::SeqCst);
        let mut headers = headers.to_vec();
        headers.push(("content-range", format!("bytes 0-0/{LEN}")));
        return reply(206, &headers, vec![b'!']);
    }
    reply(200, headers, body())
}

pub(crate) fn routes() -> Router<Arc<Origin>> {
    let cc = || ("cache-control", h("max-age=60"));
    Router::new()
        .route(
            "/r/body",
            get(
                move |State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                    let headers = [
                        cc(),
                        ("etag", h("\"r1\"")),
                        ("last-modified", h(LAST_MODIFIED)),
                        ("date", now()),
                        ("content-type", h("application/octet-stream")),
                    ];
                    answer(&o, "/r/body", &hd, &headers)
                },
            ),
        )
        .route(
            "/r/weak",
            get(
                move |State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                    answer(&o, "/r/weak", &hd, &[cc(), ("etag", h("W/\"w1\""))])
                },
            ),
        )
        .route(
            "/r/young",
            get(
                move |State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                    let headers = [
                        cc(),
                        ("last-modified", httpdate::fmt_http_date(*YOUNG)),
                        (
                            "date",
                            httpdate::fmt_http_date(*YOUNG + Duration::from_secs(10)),
                        ),
                    ];
                    answer(&o, "/r/young", &hd, &headers)
                },
            ),
        )
        .route(
            "/r/404",
            get(move |State(o): State<Arc<Origin>>| async move {
                o.hit("/r/404");
                reply(404, &[cc()], "not here")
            }),
        )
        .route(
            "/r/reval",
            get(
                move |State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                    let n = o.hit("/r/reval");
                    let headers = [("cache-control", h("max-age=10")), ("etag", h("\"e1\""))];
                    if n > 1 && hd.get("if-none-match").is_some_and(|v| v == "\"e1\"") {
                        o.conditional.fetch_add(1, Ordering::SeqCst);
                        return reply(304, &headers, Body::empty());
                    }
                    reply(200, &headers, body())
                },
            ),
        )
        .route(
            "/r/swr",
            get(
                move |State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                    let cc = ("cache-control", h("max-age=10, stale-while-revalidate=60"));
                    answer(&o, "/r/swr", &hd, &[cc])
                },
            ),
        )
        .route(
            "/r/slow",
            get(
                move |State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    answer(&o, "/r/slow", &hd, &[cc()])
                },
            ),
        )
}

async fn filled(path: &str) -> Setup {
    let s = setup(|b| b).await;
    let full = s.get(path, &[]).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.body, body());
    s
}

/// Asserts a `206` for `range` of the body, answered from the cache.
fn assert_slice(got: &super::Got, range: std::ops::Range<usize>, what: &str) {
    assert_eq!(got.status, 206, "{what}");
    assert_eq!(got.body[..], body()[range.clone()], "{what}: the slice");
    assert_eq!(
        got.headers["content-range"],
        format!("bytes {}-{}/{LEN}", range.start, range.end - 1),
        "{what}"
    );
    assert_eq!(
        got.headers["content-length"],
        range.len().to_string(),
        "{what}"
    );
    let status = got.headers["cache-status"].to_str().unwrap();
    assert!(status.starts_with("tower-scale; hit"), "{what}: {status}");
    assert!(got.headers.contains_key("age"), "{what}");
}

#[tokio::test]
async fn rfc9110_14_1_2_byte_ranges_are_slices_of_the_stored_body() {
    let s = filled("/r/body").await;
    let cases = [
        ("bytes=0-99", 0..100),
        ("bytes=100-", 100..LEN),
        ("bytes=-300", 700..LEN),
        ("bytes=900-5000", 900..LEN),
        ("bytes=0-999", 0..LEN),
        ("bytes=-5000", 0..LEN),
        ("bytes=999-999", 999..LEN),
        ("bytes=0-0", 0..1),
        ("bytes=-1", 999..LEN),
    ];
    for (range, slice) in cases {
        let got = s.get("/r/body", &[("range", range)]).await;
        assert_slice(&got, slice, range);
        assert_eq!(got.headers["etag"], "\"r1\"", "{range}: the stored headers");
        assert_eq!(got.headers["content-type"], "application/octet-stream");
    }
    assert_eq!(s.origin.count("/r/body"), 1, "every range from the cache");
}

/// The cache keeps the last range's `206` headers per variant: a repeated
/// range, and one asked for between two others, each get their own.
#[tokio::test]
async fn rfc9110_14_1_2_repeated_and_alternating_ranges_get_their_own_headers() {
    let s = filled("/r/body").await;
    let cases = [
        ("bytes=0-99", 0..100),
        ("bytes=0-99", 0..100),
        ("bytes=100-", 100..LEN),
        ("bytes=0-99", 0..100),
        ("bytes=-300", 700..LEN),
        ("bytes=-300", 700..LEN),
        ("bytes=0-99", 0..100),
    ];
    for (range, slice) in cases {
        let got = s.get("/r/body", &[("range", range)]).await;
        assert_slice(&got, slice, range);
        let full = s.get("/r/body", &[]).await;
        assert_eq!(full.status, 200, "{range}: the full hit between");
        assert!(!full.headers.contains_key("content-range"), "{range}");
    }
    assert_eq!(s.origin.count("/r/body"), 1, "every range from the cache");
}

#[tokio::test]
async fn rfc9110_15_5_17_an_unsatisfiable_range_gets_416_with_the_length() {
    let s = filled("/r/body").await;
    for range in ["bytes=1000-", "bytes=1000-2000", "bytes=5000-", "bytes=-0"] {
        let got = s.get("/r/body", &[("range", range)]).await;
        assert_eq!(got.status, 416, "{range}");
        assert_eq!(got.headers["content-range"], "bytes */1000", "{range}");
        assert!(got.body.is_empty(), "{range}");
        let status = got.headers["cache-status"].to_str().unwrap();
        assert!(status.starts_with("tower-scale; hit"), "{range}: {status}");
    }
    assert_eq!(s.origin.count("/r/body"), 1);
    let full = s.get("/r/body", &[]).await;
    assert_eq!(
        (full.status.as_u16(), full.body.len()),
        (200, LEN),
        "not stored"
    );
}

#[tokio::test]
async fn rfc9110_13_1_5_if_range_applies_the_range_only_to_the_same_representation() {
    let s = filled("/r/body").await;
    let range = ("range", "bytes=10-19");
    let got = s.get("/r/body", &[range, ("if-range", "\"r1\"")]).await;
    assert_slice(&got, 10..20, "a strong entity tag that matches");
    let got = s
        .get("/r/body", &[range, ("if-range", LAST_MODIFIED)])
        .await;
    assert_slice(&got, 10..20, "Last-Modified a day before Date is strong");
    for if_range in [
        "\"other\"",
        "W/\"r1\"",
        "\"r1",
        "Sun, 06 Nov 1994 08:49:38 GMT",
        &now(),
        "not a date",
        "",
    ] {
        let got = s.get("/r/body", &[range, ("if-range", if_range)]).await;
        assert_eq!(got.status, 200, "If-Range: {if_range:?}");
        assert_eq!(got.body, body(), "If-Range: {if_range:?}: the whole body");
        assert!(!got.headers.contains_key("content-range"));
    }
    assert_eq!(s.origin.count("/r/body"), 1);

    let s = filled("/r/weak").await;
    let got = s.get("/r/weak", &[range, ("if-range", "W/\"w1\"")]).await;
    assert_eq!(got.status, 200, "a weak entity tag never matches");
    assert_eq!(got.body, body());
    let got = s.get("/r/weak", &[range]).await;
    assert_slice(&got, 10..20, "without If-Range a weak ETag does not matter");

    let s = filled("/r/young").await;
    let young = httpdate::fmt_http_date(*YOUNG);
    let got = s.get("/r/young", &[range, ("if-range", &young)]).await;
    assert_eq!(got.status, 200, "Last-Modified 10 s before Date is weak");
    assert_eq!(got.body, body());
}

#[tokio::test]
async fn rfc9110_14_2_several_ranges_go_to_the_origin() {
    let s = filled("/r/body").await;
    let before = RANGED.load(Ordering::SeqCst);
    for (range, n) in [("bytes=0-1,5-6", 2), ("bytes=0-1, 0-1", 3)] {
        let got = s.get("/r/body", &[("range", range)]).await;
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(&got.body[..], b"!", "{range}: the origin's answer");
        assert_eq!(s.origin.count("/r/body"), n, "{range}");
        let status = got.headers["cache-status"].to_str().unwrap();
        assert_eq!(status, "tower-scale; fwd=bypass", "{range}");
    }
    let got = s
        .get("/r/body", &[("range", "bytes=0-1"), ("range", "bytes=5-6")])
        .await;
    assert_eq!(&got.body[..], b"!", "two Range lines are several ranges");
    assert_eq!(s.origin.count("/r/body"), 4);
    assert!(RANGED.load(Ordering::SeqCst) >= before + 3);
    let full = s.get("/r/body", &[]).await;
    assert_eq!(full.body, body(), "what was stored stays");
    assert_eq!(s.origin.count("/r/body"), 4);
}

#[tokio::test]
async fn rfc9111_3_4_a_range_on_a_miss_goes_to_the_origin_and_its_206_is_not_stored() {
    let s = setup(|b| b).await;
    let got = s.get("/r/body", &[("range", "bytes=10-19")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(&got.body[..], b"!", "the origin's own 206, Range forwarded");
    assert_eq!(got.headers["content-range"], "bytes 0-0/1000");
    let status = got.headers["cache-status"].to_str().unwrap();
    assert!(!status.contains("stored"), "{status}");
    assert_eq!(s.origin.count("/r/body"), 1);

    let full = s.get("/r/body", &[]).await;
    assert_eq!(full.body, body(), "the 206 was not stored");
    assert_eq!(s.origin.count("/r/body"), 2);
    let got = s.get("/r/body", &[("range", "bytes=10-19")]).await;
    assert_slice(&got, 10..20, "once the 200 is stored");
    assert_eq!(s.origin.count("/r/body"), 2);

    // An origin answering 206 to a plain GET: never stored either.
    assert_eq!(s.get("/partial", &[]).await.status, 206);
    assert_eq!(s.get("/partial", &[]).await.status, 206);
    assert_eq!(s.origin.count("/partial"), 2);
}

#[tokio::test]
async fn rfc9110_14_2_head_ignores_range() {
    // Range handling is defined for GET only: a HEAD gets the headers of
    // the full GET, never a 206 or a 416.
    let s = filled("/r/body").await;
    for range in ["bytes=0-99", "bytes=-0"] {
        let got = s.send(Method::HEAD, "/r/body", &[("range", range)]).await;
        assert_eq!(got.status, 200, "{range}");
        assert!(got.body.is_empty());
        assert!(got.headers.get("content-range").is_none());
    }
    assert_eq!(s.origin.count("/r/body"), 1);
}

#[tokio::test]
async fn rfc9110_14_2_a_stored_response_other_than_200_ignores_the_range() {
    let s = setup(|b| b).await;
    assert_eq!(s.get("/r/404", &[]).await.status, 404);
    let got = s.get("/r/404", &[("range", "bytes=0-1")]).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.text(), "not here");
    let got = s.get("/r/404", &[("range", "bytes=100-")]).await;
    assert_eq!(got.status, 404, "not a 416 either");
    assert_eq!(s.origin.count("/r/404"), 1);
}

#[tokio::test]
async fn rfc9111_4_3_a_stale_entry_is_revalidated_then_the_range_applied() {
    let s = filled("/r/reval").await;
    s.clock.advance(Duration::from_secs(20));
    let got = s.get("/r/reval", &[("range", "bytes=10-19")]).await;
    assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 1, "a 304");
    assert_eq!(got.status, 206);
    assert_eq!(got.body[..], body()[10..20]);
    assert_eq!(got.headers["content-range"], "bytes 10-19/1000");
    let status = got.headers["cache-status"].to_str().unwrap();
    assert!(status.contains("fwd=stale"), "{status}");
    let got = s.get("/r/reval", &[("range", "bytes=-10")]).await;
    assert_slice(&got, 990..LEN, "freshened by the 304");
    assert_eq!(s.origin.count("/r/reval"), 2);
}

#[tokio::test]
async fn rfc9111_4_coalesced_requests_each_get_their_own_range() {
    let s = Arc::new(setup(|b| b).await);
    let leader = {
        let s = s.clone();
        tokio::spawn(async move { s.get("/r/slow", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ranges = [
        ("bytes=0-9", 0..10),
        ("bytes=500-", 500..LEN),
        ("bytes=-3", 997..LEN),
    ];
    let waiters: Vec<_> = ranges
        .iter()
        .map(|(range, _)| {
            let (s, range) = (s.clone(), *range);
            tokio::spawn(async move { s.get("/r/slow", &[("range", range)]).await })
        })
        .collect();
    assert_eq!(leader.await.unwrap().body, body());
    for (waiter, (range, slice)) in waiters.into_iter().zip(ranges) {
        let got = waiter.await.unwrap();
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(got.body[..], body()[slice.clone()], "{range}");
        let status = got.headers["cache-status"].to_str().unwrap();
        assert!(status.contains("collapsed"), "{range}: {status}");
    }
    assert_eq!(s.origin.count("/r/slow"), 1, "one request upstream");
}

#[tokio::test]
async fn rfc9110_14_1_1_hostile_range_fields_never_panic() {
    let s = filled("/r/body").await;
    let many_commas = format!("bytes={}", ",".repeat(4000));
    let commas_around = format!("bytes={}0-9{}", ",".repeat(100), ", ,".repeat(100));
    let cases: Vec<(&str, u16, Option<std::ops::Range<usize>>)> = vec![
        ("bytes=99999999999999999999999999-", 416, None),
        ("bytes=18446744073709551615-18446744073709551615", 416, None),
        ("bytes=0-99999999999999999999999999", 206, Some(0..LEN)),
        ("bytes=0-18446744073709551616", 206, Some(0..LEN)),
        ("bytes=-99999999999999999999999999", 206, Some(0..LEN)),
        ("bytes=-0", 416, None),
        ("bytes=-00000", 416, None),
        ("bytes=0000-0009", 206, Some(0..10)),
        ("bytes= 0-9", 206, Some(0..10)),
        ("bytes=0-9 ,", 206, Some(0..10)),
        ("BYTES=0-9", 206, Some(0..10)),
        (&commas_around, 206, Some(0..10)),
        (&many_commas, 200, None),
        ("bytes=0 - 9", 200, None),
        ("bytes =0-9", 200, None),
        ("bytes=5-4", 200, None),
        ("bytes=-", 200, None),
        ("bytes=--1", 200, None),
        ("bytes=1-2-3", 200, None),
        ("bytes=+1-2", 200, None),
        ("bytes=0x10-0x20", 200, None),
        ("bytes=", 200, None),
        ("bytes", 200, None),
        ("=0-9", 200, None),
        ("items=0-9", 200, None),
        ("bytes=0-9,5-4", 200, None),
    ];
    for (range, status, slice) in cases {
        let got = s.get("/r/body", &[("range", range)]).await;
        assert_eq!(got.status, status, "{range}");
        match (status, slice) {
            (206, Some(slice)) => assert_slice(&got, slice, range),
            (200, _) => assert_eq!(got.body, body(), "{range}: ignored"),
            _ => assert!(got.body.is_empty(), "{range}"),
        }
    }
    assert_eq!(s.origin.count("/r/body"), 1, "all from the cache");
}

#[tokio::test]
async fn rfc5861_3_a_background_refresh_fetches_the_whole_response() {
    let s = filled("/r/swr").await;
    s.clock.advance(Duration::from_secs(20));
    let got = s.get("/r/swr", &[("range", "bytes=0-9")]).await;
    assert_eq!(got.status, 206, "served stale at once");
    assert_eq!(got.body[..], body()[0..10]);
    for _ in 0..200 {
        if s.origin.count("/r/swr") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.origin.count("/r/swr"), 2, "refreshed in the background");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = s.get("/r/swr", &[("range", "bytes=-5")]).await;
    assert_slice(&got, 995..LEN, "from the refreshed 200");
    let status = got.headers["cache-status"].to_str().unwrap();
    assert!(status.contains("ttl=10"), "fresh again: {status}");
    assert_eq!(s.origin.count("/r/swr"), 2, "no second refresh");
}
