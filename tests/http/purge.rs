//! The purge API (feature `purge`): the cache in front of a real origin on
//! a loopback port, the purge router served on its own listener with
//! `axum::serve`, both driven by a real HTTP client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Request, Response, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_scale::http::{HttpCacheLayer, Purge};

const TOKEN: &str = "s3cret-purge-token";

type Calls = Arc<Mutex<HashMap<String, usize>>>;

fn origin(calls: Calls) -> Router {
    fn count(calls: &Calls, path: String) -> usize {
        let mut calls = calls.lock().unwrap();
        let n = calls.entry(path).or_default();
        *n += 1;
        *n
    }
    Router::new()
        .route(
            "/items/{id}",
            get(
                |State(c): State<Calls>, Path(id): Path<String>| async move {
                    let n = count(&c, format!("/items/{id}"));
                    Response::builder()
                        .header("cache-control", "max-age=600")
                        .header("surrogate-key", format!("item:{id} items"))
                        .body(Body::from(format!("item {id} #{n}")))
                        .unwrap()
                },
            ),
        )
        .route(
            "/vary",
            get(|State(c): State<Calls>, h: HeaderMap| async move {
                let n = count(&c, "/vary".into());
                let lang = h
                    .get("accept-language")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                Response::builder()
                    .header("cache-control", "max-age=600")
                    .header("vary", "accept-language")
                    .body(Body::from(format!("vary {lang} #{n}")))
                    .unwrap()
            }),
        )
        .with_state(calls)
}

struct Setup {
    app: SocketAddr,
    admin: SocketAddr,
    layer: HttpCacheLayer,
    calls: Calls,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn setup() -> Setup {
    setup_on(HttpCacheLayer::builder().build().unwrap()).await
}

async fn setup_on(layer: HttpCacheLayer) -> Setup {
    let calls = Calls::default();
    let app = crate::serve_cached(&layer, origin(calls.clone())).await;
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let router = layer.purge_router(TOKEN);
    tokio::spawn(async move { axum::serve(admin_listener, router).await });
    Setup {
        app,
        admin,
        layer,
        calls,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Setup {
    fn calls(&self, path: &str) -> usize {
        self.calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> String {
        let mut req = Request::get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A request to the purge route: status, headers, JSON body.
    async fn purge_raw(
        &self,
        method: Method,
        auth: Option<&str>,
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}/_purge", self.admin))
            .header("content-type", "application/json");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let res = self
            .client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json)
    }

    async fn purge(&self, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let auth = format!("Bearer {TOKEN}");
        let (status, _, json) = self
            .purge_raw(Method::POST, Some(&auth), body.to_string())
            .await;
        (status, json)
    }

    /// Fills `/items/1`, `/items/2`, `/items/3` (tags `item:N items`).
    async fn fill_items(&self) {
        for id in 1..=3 {
            self.get(&format!("/items/{id}"), &[]).await;
            self.get(&format!("/items/{id}"), &[]).await;
        }
        for id in 1..=3 {
            assert_eq!(self.calls(&format!("/items/{id}")), 1, "stored");
        }
    }
}

#[tokio::test]
async fn a_purge_by_tag_removes_the_tagged_responses_and_counts_them() {
    let s = setup().await;
    s.fill_items().await;
    let (status, json) = s.purge(serde_json::json!({"tags": ["item:2"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, serde_json::json!({"purged": 1}));
    assert_eq!(s.get("/items/2", &[]).await, "item 2 #2", "origin again");
    assert_eq!(s.get("/items/1", &[]).await, "item 1 #1", "untouched");
    // Two entries carry `items` now (1 and 3; 2 was refilled): three.
    let (_, json) = s
        .purge(serde_json::json!({"tags": ["items", "item:1"]}))
        .await;
    assert_eq!(json, serde_json::json!({"purged": 3}), "each entry once");
    let (_, json) = s.purge(serde_json::json!({"tags": ["items"]})).await;
    assert_eq!(json, serde_json::json!({"purged": 0}), "already gone");
    for id in 1..=3 {
        s.get(&format!("/items/{id}"), &[]).await;
    }
    assert_eq!(s.calls("/items/1"), 2);
    assert_eq!(s.calls("/items/3"), 2);
}

#[cfg(feature = "quick-cache")]
#[tokio::test]
async fn purges_count_on_the_quick_cache_store_too() {
    let s = setup_on(HttpCacheLayer::builder().build_quick().unwrap()).await;
    s.fill_items().await;
    let (_, json) = s.purge(serde_json::json!({"tags": ["item:3"]})).await;
    assert_eq!(json, serde_json::json!({"purged": 1}));
    assert_eq!(s.get("/items/3", &[]).await, "item 3 #2");
    let (_, json) = s
        .purge(serde_json::json!({"urls": [s.url("/items/1")]}))
        .await;
    assert_eq!(json, serde_json::json!({"purged": 1}));
    let (_, json) = s.purge(serde_json::json!({"all": true})).await;
    assert_eq!(
        json,
        serde_json::json!({"purged": 2}),
        "/items/2 and /items/3"
    );
}

#[tokio::test]
async fn a_purge_by_url_removes_every_vary_variant() {
    let s = setup().await;
    for lang in ["en", "fr", "en", "fr"] {
        s.get("/vary", &[("accept-language", lang)]).await;
    }
    assert_eq!(s.calls("/vary"), 2, "two variants stored");
    s.fill_items().await;
    let (status, json) = s
        .purge(serde_json::json!({"urls": [s.url("/vary"), s.url("/nothing")]}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, serde_json::json!({"purged": 1}), "one URL entry");
    assert_eq!(
        s.get("/vary", &[("accept-language", "en")]).await,
        "vary en #3"
    );
    assert_eq!(
        s.get("/vary", &[("accept-language", "fr")]).await,
        "vary fr #4"
    );
    assert_eq!(s.get("/items/1", &[]).await, "item 1 #1", "untouched");
    // The programmatic form counts the same way.
    assert_eq!(s.layer.purge(&Purge::Urls(vec![s.url("/items/1")])), 1);
    assert_eq!(s.get("/items/1", &[]).await, "item 1 #2");
}

#[tokio::test]
async fn a_purge_of_everything() {
    let s = setup().await;
    s.fill_items().await;
    let (status, json) = s.purge(serde_json::json!({"all": true})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, serde_json::json!({"purged": 3}));
    for id in 1..=3 {
        assert_eq!(
            s.get(&format!("/items/{id}"), &[]).await,
            format!("item {id} #2")
        );
    }
    assert_eq!(s.layer.purge(&Purge::All), 3);
}

#[tokio::test]
async fn without_a_valid_token_it_is_401_and_nothing_is_purged() {
    let s = setup().await;
    s.fill_items().await;
    let body = serde_json::json!({"all": true}).to_string();
    let wrong_byte = format!("Bearer {}X", &TOKEN[..TOKEN.len() - 1]);
    let cases: [Option<&str>; 6] = [
        None,
        Some("Bearer wrong"),
        Some(&wrong_byte),
        Some("Bearer s3cret-purge-token-and-more"),
        Some("Basic czNjcmV0LXB1cmdlLXRva2Vu"),
        Some("s3cret-purge-token"),
    ];
    for auth in cases {
        let (status, headers, json) = s.purge_raw(Method::POST, auth, body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert!(json["error"].is_string());
    }
    for id in 1..=3 {
        s.get(&format!("/items/{id}"), &[]).await;
        assert_eq!(s.calls(&format!("/items/{id}")), 1, "still stored");
    }
    assert_eq!(s.layer.stats().purges_refused, 6, "each refusal counted");
    // The scheme is case-insensitive.
    let auth = format!("bearer {TOKEN}");
    let (status, _, _) = s.purge_raw(Method::POST, Some(&auth), body).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_is_400_naming_the_problem() {
    let s = setup().await;
    s.fill_items().await;
    let auth = format!("Bearer {TOKEN}");
    let long_tag = "t".repeat(257);
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid request body"),
        (
            r#"{"tags": ["a"], "extra": 1}"#.into(),
            "unknown field `extra`",
        ),
        (r#"{"tags": ["a"], "all": true}"#.into(), "only one of"),
        (
            r#"{"tags": ["a"], "urls": ["http://a.test/"]}"#.into(),
            "only one of",
        ),
        ("{}".into(), "one of `tags`, `urls` or `all` is required"),
        (r#"{"tags": []}"#.into(), "`tags` must not be empty"),
        (r#"{"urls": []}"#.into(), "`urls` must not be empty"),
        (r#"{"all": false}"#.into(), "`all` must be true"),
        (r#"{"tags": [1]}"#.into(), "invalid type"),
        (r#"{"tags": "a"}"#.into(), "invalid type"),
        (r#"{"tags": [""]}"#.into(), "`tags[0]` is empty"),
        (
            r#"{"tags": ["ok", "a b"]}"#.into(),
            "`tags[1]` contains whitespace",
        ),
        (
            r#"{"tags": ["a\u0001"]}"#.into(),
            "`tags[0]` contains whitespace",
        ),
        (r#"{"urls": ["not a url"]}"#.into(), "`urls[0]`: not a URL"),
        (
            r#"{"urls": ["/items/1"]}"#.into(),
            "`urls[0]`: not an absolute URL",
        ),
        (
            r#"{"urls": ["http://a.test/", "ftp://a.test/"]}"#.into(),
            "`urls[1]`: not an http or https URL",
        ),
        (
            serde_json::json!({"tags": [long_tag]}).to_string(),
            "`tags[0]` is 257 bytes",
        ),
        (
            serde_json::json!({"tags": many}).to_string(),
            "`tags` has 1001 items",
        ),
    ];
    for (body, expected) in cases {
        let (status, _, json) = s.purge_raw(Method::POST, Some(&auth), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{body}: {error}");
    }
    for id in 1..=3 {
        s.get(&format!("/items/{id}"), &[]).await;
        assert_eq!(s.calls(&format!("/items/{id}")), 1, "still stored");
    }
}

#[tokio::test]
async fn a_body_over_64_kib_is_413_and_other_methods_405() {
    let s = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let big = format!(r#"{{"tags": ["{}"]}}"#, "a".repeat(65 * 1024));
    let (status, _, _) = s.purge_raw(Method::POST, Some(&auth), big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, _) = s.purge_raw(Method::GET, Some(&auth), "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = s.purge_raw(Method::PUT, Some(&auth), "{}").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// An origin for the revalidation races: `v1` (ETag `"v1"`, tag `r`,
/// fresh for 1 s, then stale for 60) to an unconditional request; a
/// conditional one is reported on `arrived` and answered `304` once the
/// test sends on `release`.
fn validating_origin(
    arrived: tokio::sync::mpsc::UnboundedSender<()>,
    release: Arc<tokio::sync::Semaphore>,
) -> ValidatingOrigin {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let (arrived, release) = (arrived.clone(), release.clone());
        async move {
            let res = Response::builder()
                .header("cache-control", "max-age=1, stale-while-revalidate=60")
                .header("etag", "\"v1\"")
                .header("surrogate-key", "r");
            if req.headers().contains_key("if-none-match") {
                let _ = arrived.send(());
                release.acquire().await.unwrap().forget();
                return Ok(res
                    .status(StatusCode::NOT_MODIFIED)
                    .body(Full::new(Bytes::new()))
                    .unwrap());
            }
            Ok(res.body(Full::new(Bytes::from_static(b"v1"))).unwrap())
        }
    }))
}

type ValidatingOrigin = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<Full<Bytes>>,
    std::convert::Infallible,
>;

/// The cache in front of [`validating_origin`] on a mock clock, `/p`
/// stored and then stale (2 s later).
async fn stale_page() -> (
    tower_scale::http::HttpCache<ValidatingOrigin>,
    HttpCacheLayer,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    Arc<tokio::sync::Semaphore>,
) {
    use tower::{Layer, ServiceExt};
    let (clock, mock) = tower_scale::cache::Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let svc = layer.layer(validating_origin(arrived, release.clone()));
    let res = svc.clone().oneshot(page(&[])).await.unwrap();
    assert_eq!(body_of(res).await, "v1");
    mock.advance(std::time::Duration::from_secs(2));
    (svc, layer, arrivals, release)
}

fn page(headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::get("/p").header("host", "cdn.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

async fn body_of<B: http_body::Body<Data = Bytes>>(res: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// A purge between reading the stale entry and the origin's 304 keeps the
/// merge out (it would store the purged body under a sequence number
/// taken after the purge): the request that forces revalidation.
#[tokio::test]
async fn a_purge_during_a_revalidation_keeps_the_304_out() {
    use tower::{Service, ServiceExt};
    let (mut svc, layer, mut arrivals, release) = stale_page().await;
    // `no-cache`: revalidated before answering. The stale entry is read
    // when the request is called, before its future first runs.
    let revalidating = svc.call(page(&[("cache-control", "no-cache")]));
    assert_eq!(layer.purge(&Purge::Tags(vec!["r".into()])), 1);
    let revalidating = tokio::spawn(revalidating);
    arrivals.recv().await.unwrap();
    release.add_permits(1);
    let res = revalidating.await.unwrap().unwrap();
    assert_eq!(body_of(res).await, "v1", "asked before the purge");
    let stored = layer.stats().stored;
    let next = svc.ready().await.unwrap().call(page(&[])).await.unwrap();
    let status = next.headers()["cache-status"].to_str().unwrap().to_string();
    assert!(
        !status.contains("hit"),
        "the purged body came back: {status}"
    );
    assert_eq!(layer.stats().stored, stored + 1, "refilled from the origin");
}

/// The same with a stale hit whose revalidation runs in the background.
#[tokio::test]
async fn a_purge_during_a_background_revalidation_keeps_the_304_out() {
    use tower::ServiceExt;
    let (svc, layer, mut arrivals, release) = stale_page().await;
    let stale = svc.clone().oneshot(page(&[])).await.unwrap();
    assert!(
        stale.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit"),
        "a stale hit"
    );
    // The revalidation is spawned, not run yet (current-thread runtime).
    assert_eq!(layer.purge(&Purge::Tags(vec!["r".into()])), 1);
    arrivals.recv().await.unwrap();
    let before = layer.stats();
    release.add_permits(1);
    // Wait for the 304 to be merged and kept or refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = layer.stats();
        if now.stored + now.not_stored > before.stored + before.not_stored {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no revalidation");
        tokio::task::yield_now().await;
    }
    let next = svc.oneshot(page(&[])).await.unwrap();
    let status = next.headers()["cache-status"].to_str().unwrap().to_string();
    assert!(
        !status.contains("hit"),
        "the purged body came back: {status}"
    );
}

/// Keys keep the `Host` header as written: a purge by URL finds the
/// default port written or left out, and any case of the host.
#[tokio::test]
async fn a_purge_by_url_finds_every_spelling_of_the_origin() {
    let s = setup().await;
    let via = |host: &'static str, id: u32| {
        let s = &s;
        async move { s.get(&format!("/items/{id}"), &[("host", host)]).await }
    };
    assert_eq!(via("cdn.test:80", 1).await, "item 1 #1");
    assert_eq!(via("cdn.test:80", 1).await, "item 1 #1", "stored");
    assert_eq!(via("cdn.test", 2).await, "item 2 #1");
    assert_eq!(via("cdn.test:8080", 3).await, "item 3 #1");
    let (status, json) = s
        .purge(serde_json::json!({"urls": ["http://cdn.test/items/1"]}))
        .await;
    assert_eq!(
        (status, json),
        (StatusCode::OK, serde_json::json!({"purged": 1}))
    );
    assert_eq!(via("cdn.test:80", 1).await, "item 1 #2", "a miss");
    let (_, json) = s
        .purge(serde_json::json!({"urls": ["http://CDN.test:80/items/2"]}))
        .await;
    assert_eq!(json, serde_json::json!({"purged": 1}));
    assert_eq!(via("cdn.test", 2).await, "item 2 #2", "a miss");
    // Another port is another origin.
    let (_, json) = s
        .purge(serde_json::json!({"urls": ["http://cdn.test/items/3"]}))
        .await;
    assert_eq!(json, serde_json::json!({"purged": 0}));
    assert_eq!(via("cdn.test:8080", 3).await, "item 3 #1");
    assert_eq!(
        s.layer
            .purge(&Purge::Urls(vec!["HTTP://cdn.test:8080/items/3".into()])),
        1
    );
    assert_eq!(via("cdn.test:8080", 3).await, "item 3 #2");
}

/// A body that trickles in is cut off after the documented 10 s (on a
/// paused clock: no real wait).
#[tokio::test(start_paused = true)]
async fn a_purge_body_that_never_ends_is_408() {
    use futures::StreamExt;
    use tower::ServiceExt;
    let layer = HttpCacheLayer::builder().build().unwrap();
    let first = futures::stream::once(async {
        Ok::<_, std::io::Error>(Bytes::from_static(b"{\"tags\": ["))
    });
    let req = Request::post("/_purge")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from_stream(first.chain(futures::stream::pending())))
        .unwrap();
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        layer.purge_router(TOKEN).oneshot(req),
    )
    .await
    .expect("the route gives up on the body")
    .unwrap();
    let waited = started.elapsed();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(body_of(res).await.contains("error"));
    assert!(
        (10..11).contains(&waited.as_secs()),
        "cut off after {waited:?}"
    );
}

/// A chunked body (no `Content-Length`) over 64 KiB is 413 too: the
/// limit holds while the body streams, not only on the declared length.
#[tokio::test]
async fn a_chunked_body_over_64_kib_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let mut conn = tokio::net::TcpStream::connect(s.admin).await.unwrap();
    let head = format!(
        "POST /_purge HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("2000\r\n{}\r\n", "a".repeat(0x2000));
    // 9 chunks of 8 KiB: 72 KiB. The server may answer and close early.
    for _ in 0..9 {
        if conn.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// With a custom key, a purge URL is normalised as the key function
/// normalises requests (here: the query sorted), and reaches every key
/// that adds parts to it.
#[tokio::test]
async fn a_purge_by_url_normalises_as_the_custom_key_does() {
    let layer = HttpCacheLayer::builder()
        .cache_key(|req, key| {
            key.sort_query();
            let device = req
                .headers
                .get("x-device")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("desktop")
                .to_owned();
            key.push("device", &device);
            true
        })
        .build()
        .unwrap();
    let s = setup_on(layer).await;
    assert_eq!(s.get("/items/1?a=1&b=2", &[]).await, "item 1 #1");
    let mobile = [("x-device", "mobile")];
    assert_eq!(s.get("/items/1?b=2&a=1", &mobile).await, "item 1 #2");
    assert_eq!(s.get("/items/1?b=2&a=1", &[]).await, "item 1 #1", "stored");
    let (status, json) = s
        .purge(serde_json::json!({"urls": [s.url("/items/1?b=2&a=1")]}))
        .await;
    assert_eq!(
        (status, json),
        (StatusCode::OK, serde_json::json!({"purged": 2}))
    );
    assert_eq!(s.get("/items/1?a=1&b=2", &[]).await, "item 1 #3");
    assert_eq!(s.get("/items/1?a=1&b=2", &mobile).await, "item 1 #4");
}
