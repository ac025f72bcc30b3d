//! The HTTP cache against a real axum app on a loopback port, driven by a
//! real HTTP client. The origin counts the requests (and the conditional
//! ones) it receives; time is a mock clock.

mod balance_proxy;
mod cache_status;
#[path = "../common/mod.rs"]
mod common;
mod parser;
mod proxy;
#[cfg(feature = "purge")]
mod purge;
mod range;
mod rfc9111;
mod sharing;
mod tags;
mod targeted;
mod tokens;
mod unreachable;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tower::{ServiceBuilder, ServiceExt};
use tower_scale::cache::{Clock, MockClock};
use tower_scale::http::{HonourRequest, HttpCacheLayer};

#[derive(Default)]
struct Origin {
    counts: Mutex<HashMap<String, usize>>,
    conditional: AtomicUsize,
    fail: AtomicBool,
    /// What `/t/{name}` answers (see `targeted`).
    scripts: Mutex<HashMap<String, targeted::Script>>,
}

impl Origin {
    fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    fn hit(&self, path: &str) -> usize {
        let mut counts = self.counts.lock().unwrap();
        let n = counts.entry(path.to_string()).or_default();
        *n += 1;
        *n
    }
}

fn reply(status: u16, headers: &[(&'static str, String)], body: impl Into<Body>) -> Response<Body> {
    let mut res = Response::new(body.into());
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        res.headers_mut()
            .append(*k, HeaderValue::from_str(v).unwrap());
    }
    res
}

fn h(value: &str) -> String {
    value.to_string()
}

fn origin_app(origin: Arc<Origin>) -> Router {
    async fn simple(path: &'static str, cc: &'static str, o: &Origin) -> Response<Body> {
        let n = o.hit(path);
        reply(200, &[("cache-control", h(cc))], format!("{path} #{n}"))
    }
    Router::new()
        .route(
            "/public",
            get(|State(o): State<Arc<Origin>>| async move {
                simple("/public", "public, max-age=60", &o).await
            })
            .post(|State(o): State<Arc<Origin>>| async move {
                o.hit("POST /public");
                reply(200, &[], "updated")
            }),
        )
        .route(
            "/create",
            axum::routing::post(|State(o): State<Arc<Origin>>| async move {
                o.hit("POST /create");
                reply(201, &[("location", h("/public"))], "created")
            }),
        )
        .route(
            "/private",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/private");
                let who = hd
                    .get("cookie")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                reply(
                    200,
                    &[("cache-control", h("private, max-age=60"))],
                    format!("private for {who} #{n}"),
                )
            }),
        )
        .route(
            "/nostore",
            get(|State(o): State<Arc<Origin>>| async move {
                simple("/nostore", "no-store, max-age=60", &o).await
            }),
        )
        .route(
            "/auth",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/auth");
                let who = hd
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                reply(
                    200,
                    &[("cache-control", h("max-age=60"))],
                    format!("for {who} #{n}"),
                )
            }),
        )
        .route(
            "/auth-public",
            get(|State(o): State<Arc<Origin>>| async move {
                simple("/auth-public", "public, max-age=60", &o).await
            }),
        )
        .route(
            "/cookie",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/cookie");
                let who = hd
                    .get("cookie")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                reply(
                    200,
                    &[
                        ("cache-control", h("max-age=60")),
                        ("set-cookie", format!("session={who}")),
                    ],
                    format!("cookie {who} #{n}"),
                )
            }),
        )
        .route(
            "/vary-cookie",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/vary-cookie");
                let who = hd
                    .get("cookie")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                reply(
                    200,
                    &[("cache-control", h("max-age=60")), ("vary", h("Cookie"))],
                    format!("for {who} #{n}"),
                )
            }),
        )
        .route(
            "/etag",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/etag");
                if hd.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
                    o.conditional.fetch_add(1, Ordering::SeqCst);
                    return reply(
                        304,
                        &[("etag", h("\"v1\"")), ("cache-control", h("max-age=10"))],
                        Body::empty(),
                    );
                }
                reply(
                    200,
                    &[("etag", h("\"v1\"")), ("cache-control", h("max-age=10"))],
                    format!("etag #{n}"),
                )
            }),
        )
        .route(
            "/lm",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                let n = o.hit("/lm");
                let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
                if hd.get("if-modified-since").is_some_and(|v| v == lm) {
                    o.conditional.fetch_add(1, Ordering::SeqCst);
                    return reply(304, &[("cache-control", h("max-age=10"))], Body::empty());
                }
                reply(
                    200,
                    &[("last-modified", h(lm)), ("cache-control", h("max-age=10"))],
                    format!("lm #{n}"),
                )
            }),
        )
        .route(
            "/swr",
            get(|State(o): State<Arc<Origin>>| async move {
                simple("/swr", "max-age=10, stale-while-revalidate=60", &o).await
            }),
        )
        .route(
            "/sie",
            get(|State(o): State<Arc<Origin>>| async move {
                if o.fail.load(Ordering::SeqCst) {
                    o.hit("/sie");
                    return reply(500, &[], "down");
                }
                simple("/sie", "max-age=10, stale-if-error=60", &o).await
            }),
        )
        .route(
            "/must",
            get(|State(o): State<Arc<Origin>>| async move {
                if o.fail.load(Ordering::SeqCst) {
                    o.hit("/must");
                    return reply(500, &[], "down");
                }
                simple(
                    "/must",
                    "max-age=10, stale-if-error=60, must-revalidate",
                    &o,
                )
                .await
            }),
        )
        .route(
            "/big",
            get(|State(o): State<Arc<Origin>>| async move {
                o.hit("/big");
                reply(
                    200,
                    &[("cache-control", h("max-age=60"))],
                    vec![b'x'; 3 << 20],
                )
            }),
        )
        .route(
            "/stream",
            get(|State(o): State<Arc<Origin>>| async move {
                o.hit("/stream");
                // No Content-Length: 3 MiB in 64 KiB chunks.
                let chunks =
                    (0..48).map(|_| Ok::<_, Infallible>(Bytes::from(vec![b'y'; 64 << 10])));
                reply(
                    200,
                    &[("cache-control", h("max-age=60"))],
                    Body::from_stream(futures::stream::iter(chunks)),
                )
            }),
        )
        .route(
            "/host",
            get(|State(o): State<Arc<Origin>>, hd: HeaderMap| async move {
                o.hit("/host");
                let host = hd
                    .get("host")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                reply(
                    200,
                    &[("cache-control", h("max-age=60"))],
                    format!("host {host}"),
                )
            }),
        )
        .route(
            "/heuristic",
            get(|State(o): State<Arc<Origin>>| async move {
                let n = o.hit("/heuristic");
                let lm = httpdate::fmt_http_date(
                    std::time::SystemTime::now() - Duration::from_secs(3600),
                );
                reply(200, &[("last-modified", lm)], format!("heuristic #{n}"))
            }),
        )
        .route(
            "/none",
            get(|State(o): State<Arc<Origin>>| async move {
                let n = o.hit("/none");
                reply(200, &[], format!("none #{n}"))
            }),
        )
        .route(
            "/error500",
            get(|State(o): State<Arc<Origin>>| async move {
                let n = o.hit("/error500");
                reply(
                    500,
                    &[("cache-control", h("max-age=60"))],
                    format!("err #{n}"),
                )
            }),
        )
        .route(
            "/partial",
            get(|State(o): State<Arc<Origin>>| async move {
                let n = o.hit("/partial");
                reply(
                    206,
                    &[
                        ("cache-control", h("max-age=60")),
                        ("content-range", h("bytes 0-1/10")),
                    ],
                    format!("{n}"),
                )
            }),
        )
        .route(
            "/star",
            get(|State(o): State<Arc<Origin>>| async move {
                let n = o.hit("/star");
                reply(
                    200,
                    &[("cache-control", h("max-age=60")), ("vary", h("*"))],
                    format!("star #{n}"),
                )
            }),
        )
        .route(
            "/invalid",
            get(|State(o): State<Arc<Origin>>| async move {
                simple("/invalid", "max-age=abc", &o).await
            }),
        )
        .route(
            "/age",
            get(|State(o): State<Arc<Origin>>| async move {
                let n = o.hit("/age");
                reply(
                    200,
                    &[("cache-control", h("max-age=60")), ("age", h("50"))],
                    format!("age #{n}"),
                )
            }),
        )
        .merge(sharing::routes())
        .merge(targeted::routes())
        .merge(range::routes())
        .with_state(origin)
}

/// Serves `app` behind `layer` on a free loopback port (hyper, HTTP/1 and
/// HTTP/2); returns its address.
pub(crate) async fn serve_cached(layer: &HttpCacheLayer, app: Router) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .map_request(|r: Request<hyper::body::Incoming>| r.map(Body::new))
        .layer(layer.clone())
        .service(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct Setup {
    addr: SocketAddr,
    origin: Arc<Origin>,
    clock: MockClock,
    layer: HttpCacheLayer,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

async fn setup(
    configure: impl FnOnce(
        tower_scale::http::HttpCacheLayerBuilder,
    ) -> tower_scale::http::HttpCacheLayerBuilder,
) -> Setup {
    let origin = Arc::new(Origin::default());
    let (clock, mock) = Clock::mock();
    let layer = configure(HttpCacheLayer::builder().clock(clock))
        .build()
        .unwrap();
    let addr = serve_cached(&layer, origin_app(origin.clone())).await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    Setup {
        addr,
        origin,
        clock: mock,
        layer,
        client,
    }
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Got {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Setup {
    async fn send(&self, method: Method, path: &str, headers: &[(&'static str, &str)]) -> Got {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .client
            .request(req.body(Full::new(Bytes::new())).unwrap())
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

    async fn get(&self, path: &str, headers: &[(&'static str, &str)]) -> Got {
        self.send(Method::GET, path, headers).await
    }
}

#[tokio::test]
async fn a_fresh_public_response_is_served_from_the_cache_with_age() {
    let s = setup(|b| b).await;
    let first = s.get("/public", &[]).await;
    assert_eq!(first.text(), "/public #1");
    s.clock.advance(Duration::from_secs(7));
    let second = s.get("/public", &[]).await;
    assert_eq!(second.text(), "/public #1");
    let age: u64 = second.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((7..=8).contains(&age), "Age {age}");
    assert_eq!(s.origin.count("/public"), 1);
    // HEAD is answered from the stored GET.
    let head = s.send(Method::HEAD, "/public", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(s.origin.count("/public"), 1);
    // Past max-age it goes upstream again.
    s.clock.advance(Duration::from_secs(60));
    assert_eq!(s.get("/public", &[]).await.text(), "/public #2");
    assert_eq!(s.layer.stats().hits, 2);
}

#[tokio::test]
async fn upstream_age_is_counted_in() {
    let s = setup(|b| b).await;
    s.get("/age", &[]).await;
    s.clock.advance(Duration::from_secs(9));
    let got = s.get("/age", &[]).await;
    let age: u64 = got.headers["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 59, "Age {age} should include the upstream 50");
    s.clock.advance(Duration::from_secs(2));
    assert_eq!(
        s.get("/age", &[]).await.text(),
        "age #2",
        "60 s of age: stale"
    );
}

#[tokio::test]
async fn what_is_not_stored() {
    let s = setup(|b| b).await;
    for path in [
        "/nostore", "/private", "/none", "/partial", "/star", "/invalid",
    ] {
        s.get(path, &[]).await;
        s.get(path, &[]).await;
        assert_eq!(s.origin.count(path), 2, "{path} was served from the cache");
    }
    // Explicit freshness stores any status but 206.
    s.get("/error500", &[]).await;
    assert_eq!(s.get("/error500", &[]).await.text(), "err #1");
    // Heuristic freshness with Last-Modified.
    s.get("/heuristic", &[]).await;
    assert_eq!(s.get("/heuristic", &[]).await.text(), "heuristic #1");
}

#[tokio::test]
async fn users_never_get_each_others_responses() {
    let s = setup(|b| b).await;
    // Authorization without an explicit "shareable": never shared.
    let a = s.get("/auth", &[("authorization", "Bearer alice")]).await;
    let b = s.get("/auth", &[("authorization", "Bearer bob")]).await;
    assert!(a.text().contains("alice") && b.text().contains("bob"));
    let a2 = s.get("/auth", &[("authorization", "Bearer alice")]).await;
    assert!(a2.text().contains("alice"));
    assert_eq!(s.origin.count("/auth"), 3);
    // `public` makes it shareable.
    s.get("/auth-public", &[("authorization", "Bearer alice")])
        .await;
    s.get("/auth-public", &[("authorization", "Bearer bob")])
        .await;
    assert_eq!(s.origin.count("/auth-public"), 1);
    // Set-Cookie responses are not shared.
    let a = s.get("/cookie", &[("cookie", "alice")]).await;
    let b = s.get("/cookie", &[("cookie", "bob")]).await;
    assert!(a.text().contains("alice") && b.text().contains("bob"));
    assert_eq!(b.headers["set-cookie"], "session=bob");
    // private: never stored in a shared cache.
    let a = s.get("/private", &[("cookie", "alice")]).await;
    let b = s.get("/private", &[("cookie", "bob")]).await;
    assert!(a.text().contains("alice") && b.text().contains("bob"));
    // Vary: Cookie: one variant per cookie.
    for _ in 0..2 {
        assert!(
            s.get("/vary-cookie", &[("cookie", "alice")])
                .await
                .text()
                .contains("alice")
        );
        assert!(
            s.get("/vary-cookie", &[("cookie", "bob")])
                .await
                .text()
                .contains("bob")
        );
    }
    assert_eq!(s.origin.count("/vary-cookie"), 2, "one fill per variant");
}

#[tokio::test]
async fn another_host_never_gets_this_hosts_entry() {
    let s = setup(|b| b).await;
    let a = s.get("/host", &[("host", "a.example")]).await;
    let b = s.get("/host", &[("host", "b.example")]).await;
    assert_eq!(a.text(), "host a.example");
    assert_eq!(b.text(), "host b.example");
    // X-Forwarded-Host is not part of the key (and not trusted).
    let c = s
        .get(
            "/host",
            &[("host", "a.example"), ("x-forwarded-host", "evil.example")],
        )
        .await;
    assert_eq!(c.text(), "host a.example");
    assert_eq!(s.origin.count("/host"), 2);
}

#[tokio::test]
async fn stale_entries_are_revalidated_with_conditional_requests() {
    let s = setup(|b| b).await;
    assert_eq!(s.get("/etag", &[]).await.text(), "etag #1");
    s.clock.advance(Duration::from_secs(11));
    let got = s.get("/etag", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "etag #1", "the 304 freshened the stored body");
    assert_eq!(
        s.origin.conditional.load(Ordering::SeqCst),
        1,
        "one conditional request"
    );
    // Fresh again after the 304.
    s.get("/etag", &[]).await;
    assert_eq!(s.origin.count("/etag"), 2);
    // Last-Modified validators work the same way.
    s.get("/lm", &[]).await;
    s.clock.advance(Duration::from_secs(11));
    assert_eq!(s.get("/lm", &[]).await.text(), "lm #1");
    assert_eq!(s.origin.conditional.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn clients_conditional_requests_get_a_304_from_the_cache() {
    let s = setup(|b| b).await;
    s.get("/etag", &[]).await;
    let got = s.get("/etag", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(got.status, 304);
    assert!(got.body.is_empty());
    let got = s.get("/etag", &[("if-none-match", "\"other\"")]).await;
    assert_eq!(got.status, 200);
    assert_eq!(s.origin.count("/etag"), 1);
}

#[tokio::test]
async fn request_directives_are_honoured_by_default() {
    let s = setup(|b| b).await;
    s.get("/public", &[]).await;
    s.get("/public", &[("cache-control", "no-cache")]).await;
    assert_eq!(s.origin.count("/public"), 2, "no-cache goes upstream");
    s.get("/public", &[("pragma", "no-cache")]).await;
    assert_eq!(
        s.origin.count("/public"),
        3,
        "Pragma: no-cache without Cache-Control"
    );
    s.clock.advance(Duration::from_secs(5));
    s.get("/public", &[("cache-control", "max-age=2")]).await;
    assert_eq!(s.origin.count("/public"), 4, "too old for max-age=2");
    s.clock.advance(Duration::from_secs(50));
    s.get("/public", &[("cache-control", "min-fresh=30")]).await;
    assert_eq!(
        s.origin.count("/public"),
        5,
        "not fresh for 30 more seconds"
    );
    s.clock.advance(Duration::from_secs(70));
    let stale_ok = s.get("/public", &[("cache-control", "max-stale=20")]).await;
    assert_eq!(
        stale_ok.text(),
        "/public #5",
        "max-stale accepts 10 s of staleness"
    );
    let only = s
        .get("/nostore", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(only.status, 504);
    s.get("/auth-public", &[("cache-control", "no-store")])
        .await;
    s.get("/auth-public", &[]).await;
    assert_eq!(
        s.origin.count("/auth-public"),
        2,
        "no-store request: not stored"
    );
}

#[tokio::test]
async fn request_directives_can_be_switched_off() {
    let s = setup(|b| b.honour_request_directives(HonourRequest::NONE)).await;
    s.get("/public", &[]).await;
    s.get("/public", &[("cache-control", "no-cache")]).await;
    s.get("/public", &[("cache-control", "max-age=0")]).await;
    assert_eq!(s.origin.count("/public"), 1);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_target_and_location() {
    let s = setup(|b| b).await;
    s.get("/public", &[]).await;
    s.send(Method::POST, "/public", &[]).await;
    assert_eq!(s.get("/public", &[]).await.text(), "/public #2");
    s.send(Method::POST, "/create", &[]).await; // Location: /public
    assert_eq!(s.get("/public", &[]).await.text(), "/public #3");
    assert!(s.layer.stats().invalidations >= 2);
}

#[tokio::test]
async fn stale_while_revalidate_and_stale_if_error() {
    let s = setup(|b| b).await;
    s.get("/swr", &[]).await;
    s.clock.advance(Duration::from_secs(15));
    assert_eq!(s.get("/swr", &[]).await.text(), "/swr #1", "stale, at once");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.origin.count("/swr") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background revalidation"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get("/swr", &[]).await.text() != "/swr #2" {
        assert!(
            std::time::Instant::now() < deadline,
            "the revalidated entry was not stored"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    s.get("/sie", &[]).await;
    s.origin.fail.store(true, Ordering::SeqCst);
    s.clock.advance(Duration::from_secs(20));
    let got = s.get("/sie", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.text(),
        "/sie #1",
        "the stale entry stands in for the 500"
    );
    // must-revalidate forbids it.
    s.origin.fail.store(false, Ordering::SeqCst);
    s.get("/must", &[]).await;
    s.origin.fail.store(true, Ordering::SeqCst);
    s.clock.advance(Duration::from_secs(20));
    assert_eq!(s.get("/must", &[]).await.status, 500);
}

#[tokio::test]
async fn large_and_endless_bodies_stream_through_untouched() {
    let s = setup(|b| b.max_body(1 << 20)).await;
    for _ in 0..2 {
        let big = s.get("/big", &[]).await;
        assert_eq!(big.body.len(), 3 << 20);
        let stream = s.get("/stream", &[]).await;
        assert_eq!(stream.body.len(), 3 << 20);
        assert!(stream.body.iter().all(|&b| b == b'y'));
    }
    assert_eq!(s.origin.count("/big"), 2, "not stored");
    assert_eq!(s.origin.count("/stream"), 2, "not stored");
}

#[tokio::test]
async fn concurrent_misses_on_one_url_make_one_upstream_request() {
    let s = Arc::new(setup(|b| b).await);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let s = s.clone();
        tasks.spawn(async move { s.get("/public", &[]).await.text() });
    }
    while let Some(text) = tasks.join_next().await {
        assert_eq!(text.unwrap(), "/public #1");
    }
    assert_eq!(s.origin.count("/public"), 1);
}

#[tokio::test]
async fn trailers_are_kept_in_stored_responses() {
    use http_body_util::StreamBody;
    let (clock, _) = Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = {
        let calls = calls.clone();
        tower::service_fn(move |_req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let frames = vec![
                    Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"payload"))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                let body = Body::new(StreamBody::new(futures::stream::iter(frames)));
                let mut res = Response::new(body);
                res.headers_mut()
                    .insert("cache-control", HeaderValue::from_static("max-age=60"));
                Ok::<_, Infallible>(res)
            }
        })
    };
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    for _ in 0..2 {
        let req = Request::get("http://a.example/t")
            .header("host", "a.example")
            .body(Body::empty())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "payload");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_set_cookie_trailer_is_never_shared() {
    use http_body_util::StreamBody;
    let (clock, _) = Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let svc = tower::service_fn(move |req: Request<Body>| async move {
        let who = req.headers()["cookie"].to_str().unwrap().to_string();
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "set-cookie",
            HeaderValue::from_str(&format!("session={who}")).unwrap(),
        );
        let frames = vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"payload"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut res = Response::new(Body::new(StreamBody::new(futures::stream::iter(frames))));
        res.headers_mut()
            .insert("cache-control", HeaderValue::from_static("max-age=60"));
        Ok::<_, Infallible>(res)
    });
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    for who in ["alice", "bob"] {
        let req = Request::get("http://a.example/t")
            .header("host", "a.example")
            .header("cookie", who)
            .body(Body::empty())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let collected = res.into_body().collect().await.unwrap();
        let cookie = collected.trailers().unwrap()["set-cookie"].clone();
        assert_eq!(cookie, format!("session={who}").as_str());
    }
}

#[tokio::test]
async fn router_layer_works_too() {
    let (clock, _) = Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let origin = Arc::new(Origin::default());
    let app = origin_app(origin.clone()).layer(layer.clone());
    for _ in 0..3 {
        let req = Request::get("/public")
            .header("host", "a.example")
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "/public #1"
        );
    }
    assert_eq!(origin.count("/public"), 1);
    assert_eq!(layer.stats().hits, 2);
}

/// A named HTTP cache publishes its metrics from a task: outside a runtime
/// the builder says so; inside one it builds (the publication itself is
/// tested on the core cache, which shares the publisher).
#[test]
fn a_named_http_cache_needs_a_runtime() {
    let refused = HttpCacheLayer::builder().name("pages").build();
    assert!(
        refused.is_err_and(|e| e.to_string().contains("Tokio runtime")),
        "built a named cache outside a runtime"
    );
    assert!(
        HttpCacheLayer::builder().build().is_ok(),
        "unnamed: no runtime needed"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let built = rt.block_on(async {
        HttpCacheLayer::builder()
            .name("pages")
            .metrics_interval(Duration::from_millis(5))
            .build()
            .err()
            .map(|e| e.to_string())
    });
    assert!(
        built.is_some_and(|e| e.contains("metrics_interval")),
        "5 ms is below the minimum"
    );
    rt.block_on(async {
        assert!(HttpCacheLayer::builder().name("pages").build().is_ok());
    });
}

/// A stored response with a header repeated 25,000 times (more values than
/// a header map's capacity may count) is served from the cache with every
/// value and its `Age`, never a panic.
#[tokio::test]
async fn a_response_with_a_huge_repeated_header_is_served_whole() {
    let (clock, _) = Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/many",
            get(move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut res = Response::new(Body::from("many"));
                    res.headers_mut()
                        .insert("cache-control", HeaderValue::from_static("max-age=60"));
                    for _ in 0..25_000 {
                        res.headers_mut()
                            .append("x-a", HeaderValue::from_static("1"));
                    }
                    res
                }
            }),
        )
        .layer(layer.clone());
    for _ in 0..2 {
        let req = Request::get("/many")
            .header("host", "a.example")
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.headers().get_all("x-a").iter().count(), 25_000);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "many");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the second was a hit");
    assert_eq!(layer.stats().hits, 1);
}
