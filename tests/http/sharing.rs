//! Hardening: nothing one user gets from the origin is ever given to
//! another, whatever the origin or the client sends. Two users interleave
//! over a real axum origin on a loopback port and a real hyper client; each
//! test failed on the code before the fix (see the commit that added it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tower_scale::http::HonourRequest;

use super::{Got, Origin, h, reply, setup};

/// Who a request is from: `Cookie: user=NAME`, else
/// `Authorization: Bearer NAME`, else `anon`.
fn user_of(headers: &HeaderMap) -> String {
    let cookie = headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("user=").map(str::to_string));
    let bearer = || {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
    };
    cookie.or_else(bearer).unwrap_or_else(|| "anon".into())
}

/// `Cache-Control` lines an origin may send that a careless parser reads
/// as shareable: each says `private` in a way RFC 9110 allows, or breaks
/// the grammar around it.
fn hostile_lines(n: usize) -> Option<Vec<&'static [u8]>> {
    let lines: [&[&'static [u8]]; 6] = [
        // A quoted string with obs-text (é in Latin-1) on the `private` line.
        &[b"max-age=60", b"x=\"caf\xe9\", private"],
        // An escaped obs-text byte and a qualified no-cache.
        &[
            b"max-age=60",
            b"x=\"\\\xff\", no-cache=\"set-cookie\", private",
        ],
        // Junk glued to the directive.
        &[b"max-age=60", b"private\"x\""],
        // `;` instead of `,`.
        &[b"max-age=60; private"],
        // White space around `=`.
        &[b"public, max-age = 60, private"],
        // Tabs and empty members (allowed; stays private).
        &[b"\t,max-age=60 ,\t, private\t,"],
    ];
    lines.get(n).map(|l| l.to_vec())
}

/// The routes of these tests, merged into the origin app.
pub(crate) fn routes() -> Router<Arc<Origin>> {
    Router::new()
        .route("/reval", get(reval))
        .route(
            "/cc/{n}",
            get(
                |State(o): State<Arc<Origin>>, Path(n): Path<usize>, hd: HeaderMap| async move {
                    let k = o.hit(&format!("/cc/{n}"));
                    let mut res = reply(200, &[], format!("for {} #{k}", user_of(&hd)));
                    for line in hostile_lines(n).unwrap_or_default() {
                        res.headers_mut().append(
                            "cache-control",
                            HeaderValue::from_bytes(line).expect("a valid field value"),
                        );
                    }
                    res
                },
            ),
        )
        .route(
            "/pre",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/pre");
                let cc = ("cache-control", h("max-age=60"));
                if hd.get("if-match").is_some_and(|v| v != "\"p1\"") {
                    return reply(412, &[cc], format!("precondition failed #{n}"));
                }
                if hd.contains_key("range") {
                    return reply(416, &[cc], format!("range not satisfiable #{n}"));
                }
                reply(200, &[cc, ("etag", h("\"p1\""))], format!("pre #{n}"))
            }),
        )
        .route(
            "/nv",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/nv");
                let cc = ("cache-control", h("max-age=60"));
                let body = format!("nv #{n}");
                if hd.contains_key("range") {
                    let range = ("content-range", format!("bytes 0-0/{}", body.len()));
                    return reply(206, &[cc, range], body[..1].to_string());
                }
                reply(200, &[cc], body)
            }),
        )
        .route(
            "/narrow",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                o.hit("/narrow");
                if hd.get("if-none-match").is_some_and(|v| v == "\"n1\"") {
                    return reply(
                        304,
                        &[
                            ("etag", h("\"n1\"")),
                            ("cache-control", h("max-age=60")),
                            ("vary", h("Accept-Encoding")),
                        ],
                        Body::empty(),
                    );
                }
                reply(
                    200,
                    &[
                        ("etag", h("\"n1\"")),
                        ("cache-control", h("max-age=0")),
                        ("vary", h("Cookie")),
                    ],
                    format!("for {}", user_of(&hd)),
                )
            }),
        )
        .route(
            "/xfh",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/xfh");
                let host = hd
                    .get("x-forwarded-host")
                    .or(hd.get("host"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                reply(
                    200,
                    &[
                        ("cache-control", h("max-age=60")),
                        ("vary", h("X-Forwarded-Host")),
                    ],
                    format!("links to https://{host}/ #{n}"),
                )
            }),
        )
}

/// A stored response that is always stale (`max-age=0`, an ETag), so
/// every request revalidates it; the 304 says what `mode` says, with the
/// revalidating user's data in `x-user` and, for `cookie`, `Set-Cookie`.
async fn reval(
    State(o): State<Arc<Origin>>,
    RawQuery(query): RawQuery,
    hd: HeaderMap,
) -> Response<Body> {
    let query = query.unwrap_or_default();
    let mode = query.strip_prefix("mode=").unwrap_or_default();
    let n = o.hit(&format!("/reval?{query}"));
    let user = user_of(&hd);
    if hd.get("if-none-match").is_none_or(|v| v != "\"r1\"") {
        return reply(
            200,
            &[("etag", h("\"r1\"")), ("cache-control", h("max-age=0"))],
            format!("shared body #{n}"),
        );
    }
    o.conditional.fetch_add(1, Ordering::SeqCst);
    let mut headers = vec![("etag", h("\"r1\""))];
    let per_user = match mode {
        "plain" => {
            headers.push(("cache-control", h("max-age=0")));
            false
        }
        "cookie" => {
            headers.push(("cache-control", h("max-age=60")));
            headers.push(("set-cookie", format!("session={user}")));
            true
        }
        "private" => {
            headers.push(("cache-control", h("private, max-age=60")));
            true
        }
        "nostore" => {
            headers.push(("cache-control", h("no-store, max-age=60")));
            true
        }
        "vary" => {
            headers.push(("cache-control", h("max-age=60")));
            headers.push(("vary", h("Cookie")));
            true
        }
        "unparseable" => {
            headers.push(("cache-control", h("max-age=60, private\"x\"")));
            true
        }
        // Nothing per-user: fresh again for everybody.
        "fresh" => {
            headers.push(("cache-control", h("max-age=60")));
            false
        }
        // Sent with Authorization: nothing in the 304 allows sharing it.
        "auth" => {
            headers.push(("cache-control", h("max-age=60")));
            true
        }
        _ => false,
    };
    if per_user {
        headers.push(("x-user", user));
    }
    reply(304, &headers, Body::empty())
}

/// Everything of a response that names a user.
fn user_data(got: &Got) -> String {
    let mut out = got.text();
    for name in ["set-cookie", "x-user"] {
        for v in got.headers.get_all(name) {
            out.push(' ');
            out.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
    }
    out
}

fn cookie(user: &str) -> String {
    format!("user={user}")
}

#[tokio::test]
async fn a_304_with_set_cookie_reaches_only_the_user_who_revalidated() {
    let s = setup(|b| b).await;
    let path = "/reval?mode=cookie";
    let (alice, bob) = (cookie("alice"), cookie("bob"));
    assert_eq!(s.get(path, &[]).await.text(), "shared body #1");
    let a = s.get(path, &[("cookie", &alice)]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.text(), "shared body #1", "revalidated, not refetched");
    assert_eq!(a.headers["set-cookie"], "session=alice");
    assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 1);
    for _ in 0..2 {
        let b = s.get(path, &[("cookie", &bob)]).await;
        assert!(
            !user_data(&b).contains("alice"),
            "bob got alice's 304: {}",
            user_data(&b)
        );
        let a = s.get(path, &[("cookie", &alice)]).await;
        assert!(!user_data(&a).contains("bob"), "{}", user_data(&a));
    }
    // Alice's own conditional request: the cache's 304 still brings her
    // cookie.
    let a = s
        .get(path, &[("cookie", &alice), ("if-none-match", "\"r1\"")])
        .await;
    assert_eq!(a.status, 304);
    assert!(
        a.headers
            .get_all("set-cookie")
            .iter()
            .all(|v| v == "session=alice")
    );
}

#[tokio::test]
async fn a_304_that_makes_the_response_per_user_leaves_no_shared_entry() {
    let (alice, bob) = (cookie("alice"), cookie("bob"));
    let cases = [
        ("private", "cookie", alice.as_str(), bob.as_str()),
        ("nostore", "cookie", &alice, &bob),
        ("vary", "cookie", &alice, &bob),
        ("unparseable", "cookie", &alice, &bob),
        ("cookie", "cookie", &alice, &bob),
        ("auth", "authorization", "Bearer alice", "Bearer bob"),
    ];
    // Alice's request as is, then with her own `no-store` (which must not
    // hide what the origin's 304 says).
    for alice_no_store in [false, true] {
        for (mode, name, alice, bob) in cases {
            let s = setup(|b| b).await;
            let path = format!("/reval?mode={mode}");
            s.get(&path, &[]).await;
            let mut headers = vec![(name, alice)];
            if alice_no_store {
                headers.push(("cache-control", "no-store"));
            }
            let a = s.get(&path, &headers).await;
            assert!(user_data(&a).contains("alice"), "{mode}");
            assert_eq!(a.text(), "shared body #1", "{mode}");
            if mode == "vary" && !alice_no_store {
                // Stored, but for alice's cookie only.
                let before = s.origin.count(&path);
                let a = s.get(&path, &[(name, alice)]).await;
                assert_eq!(a.headers["x-user"], "alice");
                assert_eq!(s.origin.count(&path), before, "alice's variant is a hit");
            }
            // Nothing left under the key for anybody else: the next
            // request is a full fetch, not a hit nor a revalidation. But
            // when only the request keeps alice's 304 out (her
            // Authorization, or her no-store on a 304 that is shareable
            // keyed by Cookie), the shared entry it validated stays.
            let fetches = || s.origin.count(&path) - s.origin.conditional.load(Ordering::SeqCst);
            let before = fetches();
            let anon = s.get(&path, &[]).await;
            let kept = mode == "auth" || (mode == "vary" && alice_no_store);
            let expect = if kept { before } else { before + 1 };
            assert_eq!(fetches(), expect, "{mode} no-store {alice_no_store}");
            assert!(!user_data(&anon).contains("alice"), "{mode}");
            for round in 0..2 {
                let b = s.get(&path, &[(name, bob)]).await;
                assert!(
                    !user_data(&b).contains("alice"),
                    "{mode} round {round}: bob got {}",
                    user_data(&b)
                );
                let anon = s.get(&path, &[]).await;
                assert!(!user_data(&anon).contains("alice"), "{mode}");
                assert!(!user_data(&anon).contains("bob"), "{mode}");
            }
        }
    }
}

#[tokio::test]
async fn a_clients_no_store_or_authorization_does_not_evict_the_shared_entry() {
    for (name, value) in [
        ("cache-control", "no-store"),
        ("authorization", "Bearer alice"),
    ] {
        let s = setup(|b| b).await;
        let path = "/reval?mode=fresh";
        assert_eq!(s.get(path, &[]).await.text(), "shared body #1");
        // Alice's revalidation: a 304 that is hers alone.
        let a = s.get(path, &[(name, value)]).await;
        assert_eq!(a.text(), "shared body #1");
        assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 1);
        // Bob revalidates the entry that stayed (a 304, not a refetch),
        // then it is fresh for everybody.
        let b = s.get(path, &[("cookie", "user=bob")]).await;
        assert_eq!(b.text(), "shared body #1", "{name}: evicted");
        assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 2, "{name}");
        s.get(path, &[]).await;
        assert_eq!(s.origin.count(path), 3, "{name}: then a hit");
    }
}

#[tokio::test]
async fn a_304_to_one_clients_conditional_request_is_never_stored() {
    let s = setup(|b| b).await;
    let alice = cookie("alice");
    let a = s
        .get("/etag", &[("cookie", &alice), ("if-none-match", "\"v1\"")])
        .await;
    assert_eq!(a.status, 304, "a miss: the origin's own 304");
    let b = s.get("/etag", &[("cookie", &cookie("bob"))]).await;
    assert_eq!(b.status, 200, "bob asked for the body");
    assert_eq!(b.text(), "etag #2");
}

#[tokio::test]
async fn a_412_or_416_to_one_clients_preconditions_is_never_stored() {
    let s = setup(|b| b).await;
    let a = s.get("/pre", &[("if-match", "\"other\"")]).await;
    assert_eq!(a.status, 412);
    let a = s.get("/pre", &[("range", "bytes=100-200")]).await;
    assert_eq!(a.status, 416);
    let b = s.get("/pre", &[]).await;
    assert_eq!((b.status.as_u16(), b.text().as_str()), (200, "pre #3"));
}

#[tokio::test]
async fn cache_control_the_parser_cannot_read_keeps_responses_per_user() {
    let s = setup(|b| b).await;
    let mut n = 0;
    while hostile_lines(n).is_some() {
        let path = format!("/cc/{n}");
        for user in ["alice", "bob", "alice", "bob"] {
            let got = s.get(&path, &[("cookie", &cookie(user))]).await;
            assert!(
                got.text().starts_with(&format!("for {user} ")),
                "{path}: {user} got {:?}",
                got.text()
            );
        }
        n += 1;
    }
}

/// A request sent as written: absolute-form target and `Host` lines as
/// given (the pooled client would set `Host` itself).
async fn raw_get(addr: SocketAddr, target: &str, headers: &[(&'static str, &str)]) -> Got {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(target);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn an_absolute_target_and_host_that_disagree_neither_store_nor_hit() {
    let s = setup(|b| b).await;
    let addr = s.addr;
    let target = format!("http://{addr}/host");
    let own = addr.to_string();
    // The attacker: absolute-form for this server, Host for another.
    let evil = raw_get(addr, &target, &[("host", "evil.example")]).await;
    assert_eq!(evil.text(), "host evil.example");
    // A user of this server (origin-form, Host: the server).
    let user = s.get("/host", &[]).await;
    assert_eq!(user.text(), format!("host {own}"), "poisoned");
    // Now stored for this server: the disagreeing request is not served it.
    let evil = raw_get(addr, &target, &[("host", "evil.example")]).await;
    assert_eq!(evil.text(), "host evil.example");
    assert_eq!(s.origin.count("/host"), 3);
    // Two Host lines: the same, whatever line the origin reads.
    let two = raw_get(
        addr,
        "/host",
        &[("host", own.as_str()), ("host", "evil.example")],
    )
    .await;
    assert_eq!(s.origin.count("/host"), 4, "{}", two.text());
    assert_eq!(s.get("/host", &[]).await.text(), format!("host {own}"));
    // Agreeing forms share one entry: absolute-form with the same Host, and
    // the scheme's default port written out or not.
    let same = raw_get(addr, &target, &[("host", own.as_str())]).await;
    assert_eq!(same.text(), format!("host {own}"));
    assert_eq!(s.origin.count("/host"), 4, "a hit");
    let upper = raw_get(addr, &target, &[("host", &own.to_uppercase())]).await;
    assert_eq!(upper.text(), format!("host {own}"));
    assert_eq!(s.origin.count("/host"), 4, "hosts are case-insensitive");
}

#[tokio::test]
async fn an_unsafe_request_with_two_authorities_invalidates_both() {
    let s = setup(|b| b).await;
    let own = s.addr.to_string();
    s.get("/public", &[]).await;
    s.get("/public", &[("host", "other.example")]).await;
    assert_eq!(s.origin.count("/public"), 2);
    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{own}/public"))
        .header("host", "other.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    s.get("/public", &[]).await;
    s.get("/public", &[("host", "other.example")]).await;
    assert_eq!(s.origin.count("/public"), 4, "both entries were dropped");
}

#[tokio::test]
async fn every_honour_request_switch_takes_effect() {
    type Switch = fn(&mut HonourRequest);
    let off: [(&str, Switch); 6] = [
        ("no-store", |h| h.no_store = false),
        ("no-cache", |h| h.no_cache = false),
        ("max-age=0", |h| h.max_age = false),
        ("min-fresh=1000", |h| h.min_fresh = false),
        ("max-stale", |h| h.max_stale = false),
        ("only-if-cached", |h| h.only_if_cached = false),
    ];
    for (directive, switch) in off {
        let mut honour = HonourRequest::ALL;
        switch(&mut honour);
        let s = setup(move |b| b.honour_request_directives(honour)).await;
        let cc = [("cache-control", directive)];
        let alice = ("cookie", "user=alice");
        let bob = ("cookie", "user=bob");
        match directive {
            "no-store" => {
                // Alice asks it not to be stored; the server says store.
                s.get("/public", &[cc[0], alice]).await;
                s.get("/public", &[bob]).await;
                assert_eq!(s.origin.count("/public"), 1, "{directive} ignored");
            }
            "max-stale" => {
                s.get("/public", &[alice]).await;
                s.clock.advance(std::time::Duration::from_secs(70));
                let b = s.get("/public", &[cc[0], bob]).await;
                assert_eq!(b.text(), "/public #2", "{directive} ignored: no stale");
            }
            "only-if-cached" => {
                let b = s.get("/public", &[cc[0], bob]).await;
                assert_eq!(b.status, 200, "{directive} ignored: went upstream");
            }
            _ => {
                s.get("/public", &[alice]).await;
                s.get("/public", &[cc[0], bob]).await;
                s.get("/public", &[("pragma", "no-cache"), alice]).await;
                let expect = if directive == "no-cache" { 1 } else { 2 };
                assert_eq!(s.origin.count("/public"), expect, "{directive} ignored");
            }
        }
        // The other switches stay on.
        let s = setup(move |b| b.honour_request_directives(honour)).await;
        for (other, _) in off.iter().filter(|(d, _)| *d != directive) {
            let before = s.origin.count("/auth-public");
            s.get("/auth-public", &[]).await;
            let got = s.get("/auth-public", &[("cache-control", other)]).await;
            let went_up = s.origin.count("/auth-public") > before + 1;
            match *other {
                "no-cache" | "max-age=0" => assert!(went_up, "{other} with {directive} off"),
                "only-if-cached" | "max-stale" | "min-fresh=1000" => {
                    assert_eq!(got.status, 200, "{other}")
                }
                _ => {}
            }
            s.layer
                .invalidate(&format!("http://{}/auth-public", s.addr));
        }
    }
}

#[tokio::test]
async fn a_header_outside_the_key_is_safe_when_the_origin_varies_on_it() {
    let s = setup(|b| b).await;
    let own = s.addr.to_string();
    let mut seen = BTreeMap::new();
    for _ in 0..2 {
        for xfh in [Some("evil.example"), None, Some("cdn.example")] {
            let headers: Vec<(&'static str, &str)> =
                xfh.map(|v| ("x-forwarded-host", v)).into_iter().collect();
            let got = s.get("/xfh", &headers).await;
            let expect = format!("links to https://{}/", xfh.unwrap_or(&own));
            assert!(got.text().starts_with(&expect), "{xfh:?}: {}", got.text());
            seen.entry(xfh).or_insert(got.text());
            assert_eq!(seen[&xfh], got.text(), "one variant per value");
        }
    }
    assert_eq!(s.origin.count("/xfh"), 3, "three variants, then hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_requests_never_carry_another_users_data() {
    let s = Arc::new(setup(|b| b).await);
    let kinds: [(&str, bool); 10] = [
        ("/cookie", false),
        ("/vary-cookie", false),
        ("/auth", true),
        ("/private", false),
        ("/reval?mode=cookie", false),
        ("/reval?mode=plain", false),
        ("/reval?mode=private", false),
        ("/reval?mode=vary", false),
        ("/reval?mode=auth", true),
        ("/public", false),
    ];
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..128 {
        let s = s.clone();
        let users = users.clone();
        let (path, auth) = kinds[i % kinds.len()];
        tasks.spawn(async move {
            let me = &users[(i / kinds.len() + i) % users.len()];
            let cookie = format!("user={me}");
            let bearer = format!("Bearer {me}");
            let headers: Vec<(&'static str, &str)> = if auth {
                vec![("authorization", &bearer)]
            } else {
                vec![("cookie", &cookie)]
            };
            let got = s.get(path, &headers).await;
            let data = user_data(&got);
            let leaked: Vec<String> = users
                .iter()
                .filter(|u| *u != me && data.contains(u.as_str()))
                .cloned()
                .collect();
            (path, me.clone(), leaked, data)
        });
    }
    let mut leaks = Vec::new();
    let mut answered = 0;
    while let Some(done) = tasks.join_next().await {
        let (path, me, leaked, data) = done.unwrap();
        answered += 1;
        if !leaked.is_empty() {
            leaks.push(format!("{me} on {path} got {leaked:?}: {data}"));
        }
    }
    assert_eq!(answered, 128);
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    assert!(
        s.origin.conditional.load(Ordering::SeqCst) > 0,
        "revalidations happened"
    );
}

#[tokio::test]
async fn a_request_that_cannot_store_does_not_evict_the_stored_response() {
    let s = setup(|b| b).await;
    assert_eq!(s.get("/nv", &[]).await.text(), "nv #1");
    let head = s
        .send(Method::HEAD, "/nv", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(head.status, 200);
    let before = s.origin.count("/nv");
    assert_eq!(s.get("/nv", &[]).await.text(), "nv #1", "HEAD evicted");
    assert_eq!(s.origin.count("/nv"), before, "a hit after HEAD");
    let hostile: [&[(&'static str, &str)]; 3] = [
        &[("cache-control", "no-cache, no-store")],
        &[
            ("authorization", "Bearer mallory"),
            ("cache-control", "no-cache"),
        ],
        &[("range", "bytes=0-0"), ("cache-control", "no-cache")],
    ];
    for headers in hostile {
        let got = s.get("/nv", headers).await;
        assert!(got.status.is_success(), "{headers:?}: {}", got.status);
        let before = s.origin.count("/nv");
        let anon = s.get("/nv", &[]).await;
        assert_eq!(
            s.origin.count("/nv"),
            before,
            "{headers:?} evicted: {}",
            anon.text()
        );
    }
    let before = s.origin.count("/nv");
    assert_eq!(s.get("/nv", &[]).await.text(), "nv #1", "evicted");
    assert_eq!(s.origin.count("/nv"), before, "a hit");
}

#[tokio::test]
async fn a_304_cannot_narrow_vary_to_share_one_users_response() {
    let s = setup(|b| b).await;
    let (alice, bob) = (cookie("alice"), cookie("bob"));
    assert_eq!(
        s.get("/narrow", &[("cookie", &alice)]).await.text(),
        "for alice"
    );
    // Alice revalidates: the 304 names only Accept-Encoding.
    let a = s.get("/narrow", &[("cookie", &alice)]).await;
    assert_eq!(a.text(), "for alice");
    for _ in 0..2 {
        let b = s.get("/narrow", &[("cookie", &bob)]).await;
        assert!(!b.text().contains("alice"), "bob got {:?}", b.text());
        let anon = s.get("/narrow", &[]).await;
        assert!(!anon.text().contains("alice"), "anon got {:?}", anon.text());
    }
}

#[tokio::test]
async fn an_http1_absolute_target_without_host_neither_stores_nor_hits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(|b| b).await;
    let own = s.addr.to_string();
    // Written by hand: a client library would add `Host`.
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!("GET http://{own}/host HTTP/1.1\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.ends_with("host "), "the origin saw no Host: {raw}");
    let user = s.get("/host", &[]).await;
    assert_eq!(user.text(), format!("host {own}"), "poisoned");
    assert_eq!(s.origin.count("/host"), 2);
}

#[tokio::test]
async fn host_spellings_the_origin_sees_differently_never_share_an_entry() {
    let s = setup(|b| b).await;
    // Absolute-form `a.test`, `Host: A.TEST:80`: the origin sees the latter.
    let odd = raw_get(s.addr, "http://a.test/host", &[("host", "A.TEST:80")]).await;
    assert_eq!(odd.text(), "host A.TEST:80");
    let plain = raw_get(s.addr, "/host", &[("host", "a.test")]).await;
    assert_eq!(plain.text(), "host a.test", "poisoned");
    // Nor the other way round, nor by case alone.
    for host in ["A.TEST:80", "a.test:80", "A.test"] {
        let got = raw_get(s.addr, "/host", &[("host", host)]).await;
        assert_eq!(got.text(), format!("host {host}"));
        let got = raw_get(s.addr, "http://a.test/host", &[("host", host)]).await;
        assert_eq!(got.text(), format!("host {host}"));
    }
    // The same spelling still shares one entry.
    let before = s.origin.count("/host");
    let again = raw_get(s.addr, "http://a.test/host", &[("host", "a.test")]).await;
    assert_eq!(again.text(), "host a.test");
    assert_eq!(s.origin.count("/host"), before, "a hit");
}

#[tokio::test]
async fn an_unbalanced_quote_does_not_hide_a_requests_no_store() {
    let s = setup(|b| b).await;
    let got = s
        .get("/nv", &[("cache-control", r#"x="\", no-store"#)])
        .await;
    assert_eq!(got.text(), "nv #1");
    assert_eq!(s.get("/nv", &[]).await.text(), "nv #2", "stored");
}
