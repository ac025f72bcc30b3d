//! Unit tests of `freshness` (in their own file to keep that one short).

use super::*;
use http::HeaderValue;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn lifetime(
    status: u16,
    pairs: &[(&'static str, &str)],
    rules: &HttpCachePolicy,
) -> Option<Duration> {
    let h = headers(pairs);
    let cc = response_directives(&h, rules);
    freshness_lifetime(StatusCode::from_u16(status).unwrap(), &h, &cc, rules)
}

#[test]
fn explicit_freshness_order() {
    let r = HttpCachePolicy::default();
    let s = |n| Some(Duration::from_secs(n));
    assert_eq!(
        lifetime(200, &[("cache-control", "max-age=10, s-maxage=20")], &r),
        s(20)
    );
    let private = HttpCachePolicy {
        shared: false,
        ..HttpCachePolicy::default()
    };
    assert_eq!(
        lifetime(
            200,
            &[("cache-control", "max-age=10, s-maxage=20")],
            &private
        ),
        s(10)
    );
    assert_eq!(
        lifetime(
            200,
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
            ],
            &r
        ),
        s(60)
    );
    assert_eq!(
        lifetime(200, &[("expires", "0")], &r),
        s(0),
        "invalid Expires: stale"
    );
    assert_eq!(
        lifetime(500, &[("cache-control", "max-age=5")], &r),
        s(5),
        "any status with explicit freshness"
    );
}

#[test]
fn a_valid_targeted_field_replaces_cache_control_and_expires() {
    let r = HttpCachePolicy::default();
    let s = |n| Some(Duration::from_secs(n));
    let expires = [
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
    ];
    let with = |cdn: &'static str| {
        let mut pairs = expires.to_vec();
        pairs.push(("cache-control", "max-age=10"));
        pairs.push(("cdn-cache-control", cdn));
        lifetime(200, &pairs, &r)
    };
    assert_eq!(with("max-age=30"), s(30));
    assert_eq!(with("s-maxage=40, max-age=30"), s(40));
    assert_eq!(with("max-age=30;"), s(10), "invalid: Cache-Control");
    // Valid without freshness: neither Cache-Control nor Expires counts,
    // and no Last-Modified leaves nothing.
    assert_eq!(with("must-revalidate"), None);
    assert_eq!(lifetime(200, &expires, &r), s(60));
    let off = HttpCachePolicy {
        targeted_fields: Vec::new(),
        ..HttpCachePolicy::default()
    };
    let pairs = [
        ("cache-control", "max-age=10"),
        ("cdn-cache-control", "max-age=30"),
    ];
    assert_eq!(lifetime(200, &pairs, &off), s(10), "an empty target list");
}

#[test]
fn targeted_directives_decide_storing() {
    let r = HttpCachePolicy::default();
    let check = |pairs: &[(&'static str, &str)], auth: bool| {
        let h = headers(pairs);
        let mut req = HeaderMap::new();
        if auth {
            req.insert(AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        }
        let cc = response_directives(&h, &r);
        storable(
            &Method::GET,
            &req,
            &RequestDirectives::default(),
            StatusCode::OK,
            &h,
            &cc,
            &r,
        )
    };
    let cc_no_store = ("cache-control", "no-store");
    assert_eq!(
        check(&[cc_no_store, ("cdn-cache-control", "max-age=60")], false),
        Ok(Duration::from_secs(60))
    );
    let public = ("cache-control", "public, max-age=60");
    for (cdn, why) in [
        ("no-store", NotStored::NoStore),
        ("private", NotStored::Private),
        ("max-age=60, no-store=?1", NotStored::NoStore),
    ] {
        assert_eq!(
            check(&[public, ("cdn-cache-control", cdn)], false),
            Err(why)
        );
    }
    assert_eq!(
        check(&[public, ("cdn-cache-control", "max-age=60")], true),
        Err(NotStored::Authorization),
        "`public` in Cache-Control no longer counts"
    );
    assert!(check(&[("cdn-cache-control", "public, max-age=60")], true).is_ok());
    assert_eq!(
        check(
            &[("cdn-cache-control", "max-age=60"), ("set-cookie", "a=b")],
            false
        ),
        Err(NotStored::SetCookie)
    );
    assert_eq!(
        check(&[("cache-control", "max-age=60, no-store garbage")], false),
        Err(NotStored::Unparseable)
    );
    assert!(
        check(
            &[
                ("cache-control", "max-age=60, no-store garbage"),
                ("cdn-cache-control", "max-age=60"),
            ],
            false
        )
        .is_ok(),
        "an unreadable Cache-Control is ignored too"
    );
}

#[test]
fn heuristic_freshness() {
    let r = HttpCachePolicy::default();
    let lm = [
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("last-modified", "Sun, 06 Nov 1994 07:49:37 GMT"),
    ];
    assert_eq!(
        lifetime(200, &lm, &r),
        Some(Duration::from_secs(360)),
        "10% of an hour"
    );
    assert_eq!(
        lifetime(500, &lm, &r),
        None,
        "500 is not heuristically cacheable"
    );
    assert_eq!(lifetime(200, &[], &r), None, "no Last-Modified: nothing");
    let off = HttpCachePolicy {
        heuristic_fraction: None,
        ..HttpCachePolicy::default()
    };
    assert_eq!(lifetime(200, &lm, &off), None);
}

#[test]
fn storability() {
    let r = HttpCachePolicy::default();
    let check = |method: Method,
                 req: &[(&'static str, &str)],
                 status: u16,
                 resp: &[(&'static str, &str)]| {
        let (rq, rs) = (headers(req), headers(resp));
        let cc = ResponseDirectives::from_headers(&rs);
        storable(
            &method,
            &rq,
            &RequestDirectives::from_headers(&rq),
            StatusCode::from_u16(status).unwrap(),
            &rs,
            &cc,
            &r,
        )
    };
    let ok = [("cache-control", "max-age=60")];
    assert!(check(Method::GET, &[], 200, &ok).is_ok());
    assert_eq!(check(Method::POST, &[], 200, &ok), Err(NotStored::Method));
    assert_eq!(check(Method::GET, &[], 206, &ok), Err(NotStored::Partial));
    assert_eq!(
        check(
            Method::GET,
            &[],
            200,
            &[("cache-control", "no-store, max-age=60")]
        ),
        Err(NotStored::NoStore)
    );
    assert_eq!(
        check(
            Method::GET,
            &[],
            200,
            &[("cache-control", "private, max-age=60")]
        ),
        Err(NotStored::Private)
    );
    assert_eq!(
        check(Method::GET, &[("authorization", "Bearer a")], 200, &ok),
        Err(NotStored::Authorization)
    );
    for allowed in [
        "public, max-age=60",
        "s-maxage=60",
        "must-revalidate, max-age=60",
    ] {
        assert!(
            check(
                Method::GET,
                &[("authorization", "Bearer a")],
                200,
                &[("cache-control", allowed)]
            )
            .is_ok()
        );
    }
    assert_eq!(
        check(
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
        ),
        Err(NotStored::SetCookie)
    );
    assert_eq!(
        check(
            Method::GET,
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "*")]
        ),
        Err(NotStored::VaryStar)
    );
    assert_eq!(
        check(Method::GET, &[], 200, &[]),
        Err(NotStored::NoFreshness)
    );
    assert_eq!(
        check(Method::GET, &[("cache-control", "no-store")], 200, &ok),
        Err(NotStored::RequestNoStore)
    );
    assert_eq!(
        check(Method::GET, &[], 304, &ok),
        Err(NotStored::NotModified)
    );
    for status in [412, 416] {
        assert_eq!(
            check(Method::GET, &[], status, &ok),
            Err(NotStored::Precondition)
        );
    }
    for line in [
        "max-age=60; private",
        "max-age = 60",
        "max-age=60 x",
        "a=\"b",
    ] {
        assert_eq!(
            check(Method::GET, &[], 200, &[("cache-control", line)]),
            Err(NotStored::Unparseable),
            "{line}"
        );
    }
}

#[test]
fn vary_normalisation() {
    let h = headers(&[
        ("vary", "Accept-Encoding, accept-language"),
        ("vary", "Cookie"),
    ]);
    let names: Vec<_> = vary_names(&h)
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["accept-encoding", "accept-language", "cookie"]);
    let a = headers(&[("accept-encoding", "gzip,  br")]);
    let b = headers(&[("accept-encoding", "gzip"), ("accept-encoding", "br")]);
    let name = http::HeaderName::from_static("accept-encoding");
    assert_eq!(normalized(&a, &name), normalized(&b, &name));
    assert_eq!(normalized(&HeaderMap::new(), &name), None);
}

#[test]
fn usability() {
    let r = HttpCachePolicy::default();
    let cc = |s: &str| ResponseDirectives::parse([s.as_bytes()]);
    let rq = |s: &str| RequestDirectives::parse([s.as_bytes()]);
    let secs = Duration::from_secs;
    let none = RequestDirectives::default();
    assert_eq!(
        usable(secs(5), secs(10), &cc("max-age=10"), &none, &r),
        Usable::Fresh
    );
    assert_eq!(
        usable(secs(10), secs(10), &cc("max-age=10"), &none, &r),
        Usable::Revalidate
    );
    assert_eq!(
        usable(
            secs(12),
            secs(10),
            &cc("max-age=10, stale-while-revalidate=5"),
            &none,
            &r
        ),
        Usable::StaleWhileRevalidate
    );
    assert_eq!(
        usable(
            secs(12),
            secs(10),
            &cc("max-age=10, must-revalidate, stale-while-revalidate=5"),
            &none,
            &r
        ),
        Usable::Revalidate
    );
    assert_eq!(
        usable(secs(1), secs(10), &cc("no-cache, max-age=10"), &none, &r),
        Usable::Revalidate
    );
    assert_eq!(
        usable(secs(5), secs(10), &cc("max-age=10"), &rq("max-age=2"), &r),
        Usable::Revalidate
    );
    assert_eq!(
        usable(secs(5), secs(10), &cc("max-age=10"), &rq("min-fresh=6"), &r),
        Usable::Revalidate
    );
    assert_eq!(
        usable(
            secs(15),
            secs(10),
            &cc("max-age=10"),
            &rq("max-stale=10"),
            &r
        ),
        Usable::Fresh
    );
    assert_eq!(
        usable(secs(15), secs(10), &cc("max-age=10"), &rq("max-stale"), &r),
        Usable::Fresh
    );
    assert_eq!(
        usable(
            secs(15),
            secs(10),
            &cc("max-age=10, proxy-revalidate"),
            &rq("max-stale"),
            &r
        ),
        Usable::Revalidate
    );
    assert_eq!(
        usable(secs(1), secs(10), &cc("max-age=10"), &rq("no-cache"), &r),
        Usable::Revalidate
    );
    assert!(stale_if_error_allows(
        secs(5),
        &cc("max-age=1, stale-if-error=10"),
        &r
    ));
    assert!(!stale_if_error_allows(
        secs(5),
        &cc("max-age=1, stale-if-error=10, must-revalidate"),
        &r
    ));
}

#[test]
fn initial_age_counts_upstream_age_and_delay() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let h = headers(&[("age", "30")]);
    assert_eq!(
        initial_age(&h, now - Duration::from_secs(2), now),
        Duration::from_secs(32)
    );
    // RFC 9111 §5.1: an invalid Age makes the response stale.
    let stale = Duration::from_secs(crate::http::cache_control::MAX_DELTA_SECONDS);
    assert_eq!(initial_age(&headers(&[("age", "x")]), now, now), stale);
    assert_eq!(initial_age(&headers(&[("age", "1, 2")]), now, now), stale);
}
