//! Serving stale when the origin is unreachable (RFC 9111 §4.2.4): a real
//! origin on a loopback port that answers, then closes its listener,
//! resets connections or stalls. In process, the cache wraps a real hyper
//! client (the origin's failure as a service error, or as a 502 marked
//! `UpstreamUnreachable`), on a mock clock; as a process, the
//! `http_proxy` example (build it first: `cargo build --all-features
//! --example http_proxy`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tower::util::BoxCloneService;
use tower_scale::cache::{Clock, MockClock};
use tower_scale::http::{CacheBody, HttpCacheLayer, HttpCacheLayerBuilder, UpstreamUnreachable};

use crate::common::{self, Running};

const SERVE: u8 = 0;
const RESET: u8 = 1;
const STALL: u8 = 2;

/// A raw HTTP/1.1 origin: one request per connection (`Connection:
/// close`), so no pooled connection outlives a change of behaviour.
struct RawOrigin {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    count: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
    /// Stalled connections, held open (never answered).
    stalled: Arc<Mutex<Vec<TcpStream>>>,
}

fn cache_control(path: &str) -> &'static str {
    match path {
        "/must" => "max-age=10, must-revalidate",
        "/proxy" => "max-age=10, proxy-revalidate",
        "/nocache" => "max-age=10, no-cache",
        "/smaxage" => "s-maxage=10",
        "/sie" => "max-age=10, stale-if-error=3600",
        "/swr" => "max-age=10, stale-while-revalidate=60",
        _ => "max-age=10",
    }
}

impl RawOrigin {
    /// Starts it; `age` adds an `Age` header to every response (stale on
    /// arrival when above 10, for the process tests, which have no mock
    /// clock).
    async fn start(age: Option<u64>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(SERVE));
        let count = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (mode, count, stalled) = (mode.clone(), count.clone(), stalled.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (mode, count, stalled) = (mode.clone(), count.clone(), stalled.clone());
                    tokio::spawn(async move {
                        serve(stream, &mode, &count, &stalled, age).await;
                    });
                }
            }
        });
        Self {
            addr,
            mode,
            count,
            accept,
            stalled,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Closes the listener: connections are refused from now on.
    async fn close(&self) {
        self.accept.abort();
        // The listener goes when the aborted task is dropped, which may be
        // a moment after it reports finished: poll with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while TcpStream::connect(self.addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the listener still accepts"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(
    mut stream: TcpStream,
    mode: &AtomicU8,
    count: &AtomicUsize,
    stalled: &Mutex<Vec<TcpStream>>,
    age: Option<u64>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    match mode.load(Ordering::SeqCst) {
        RESET => {
            // SO_LINGER 0: closing sends a RST, not a FIN.
            stream.set_zero_linger().unwrap();
            drop(stream);
        }
        STALL => stalled.lock().unwrap().push(stream),
        _ => {
            let text = String::from_utf8_lossy(&buf);
            let target = text.split(' ').nth(1).unwrap_or("/");
            let path = target.split('?').next().unwrap_or("/").to_string();
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let body = format!("{path} #{n}");
            let mut head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\
                 cache-control: {}\r\netag: \"v{n}\"\r\n",
                body.len(),
                cache_control(&path)
            );
            if let Some(age) = age {
                head.push_str(&format!("age: {age}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ClientBody = BoxBody<Bytes, hyper::Error>;
type Cached = BoxCloneService<Request<Full<Bytes>>, Response<CacheBody<ClientBody>>, BoxError>;

/// How the inner service reports an origin it cannot reach.
#[derive(Debug, Clone, Copy)]
enum Inner {
    /// A service error.
    Errors,
    /// A 502 marked `UpstreamUnreachable`, as `http_proxy` does.
    Marks,
}

/// The cache over a hyper client to `origin`, on a mock clock.
fn cached(
    origin: SocketAddr,
    inner: Inner,
    configure: impl FnOnce(HttpCacheLayerBuilder) -> HttpCacheLayerBuilder,
) -> (Cached, HttpCacheLayer, MockClock) {
    let (clock, mock) = Clock::mock();
    let layer = configure(HttpCacheLayer::builder().clock(clock))
        .build()
        .unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let svc = tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            let target = format!("http://{origin}{}", req.uri().path());
            *req.uri_mut() = target.parse().unwrap();
            let sent = tokio::time::timeout(Duration::from_secs(1), client.request(req)).await;
            match (sent, inner) {
                (Ok(Ok(res)), _) => Ok(res.map(|b| b.boxed())),
                (Ok(Err(e)), Inner::Errors) => Err(BoxError::from(e)),
                (Err(e), Inner::Errors) => Err(BoxError::from(e)),
                (_, Inner::Marks) => {
                    let body = Full::new(Bytes::from_static(b"upstream unreachable"))
                        .map_err(|never: Infallible| match never {})
                        .boxed();
                    let mut res = Response::new(body);
                    *res.status_mut() = StatusCode::BAD_GATEWAY;
                    res.extensions_mut().insert(UpstreamUnreachable);
                    Ok(res)
                }
            }
        }
    });
    let svc = tower::Layer::layer(&layer, svc);
    (BoxCloneService::new(svc), layer, mock)
}

#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn age(&self) -> u64 {
        self.headers["age"].to_str().unwrap().parse().unwrap()
    }
    fn cache_status(&self) -> Vec<&str> {
        self.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }
}

/// A GET through the cache; `Err` carries the inner service's error.
async fn get(svc: &Cached, path: &str, headers: &[(&str, &str)]) -> Result<Got, String> {
    let mut req = Request::get(path).header("host", "origin.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = svc
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Ok(Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[tokio::test]
async fn rfc9111_4_2_4_stale_served_when_the_origin_is_unreachable() {
    for inner in [Inner::Errors, Inner::Marks] {
        let origin = RawOrigin::start(None).await;
        let (svc, layer, clock) = cached(origin.addr, inner, |b| b);
        assert_eq!(get(&svc, "/stale", &[]).await.unwrap().body, "/stale #1");
        // A stale response with a validator: the cache revalidates it.
        assert_eq!(get(&svc, "/etag", &[]).await.unwrap().body, "/etag #2");
        clock.advance(Duration::from_secs(100));
        origin.close().await;
        for (n, path) in ["/stale", "/etag"].into_iter().enumerate() {
            let got = get(&svc, path, &[]).await.unwrap();
            assert_eq!(got.status, StatusCode::OK, "{inner:?} {path}");
            assert_eq!(got.body, format!("{path} #{}", n + 1), "{inner:?}");
            assert!(got.age() >= 100, "Age {} beyond max-age=10", got.age());
            let entry = match inner {
                Inner::Errors => "tower-scale; fwd=stale; ttl=-90; detail=unreachable",
                Inner::Marks => {
                    "tower-scale; fwd=stale; fwd-status=502; ttl=-90; detail=unreachable"
                }
            };
            assert_eq!(got.cache_status(), [entry], "{inner:?} {path}");
        }
        let stats = layer.stats();
        assert_eq!(stats.stale_if_unreachable, 2, "{inner:?}: {stats:?}");
        assert_eq!(stats.stale_if_error, 0, "{inner:?}");
        assert_eq!(
            stats.inner_errors, 0,
            "{inner:?}: it stood in for the error"
        );
    }
}

#[tokio::test]
async fn rfc9111_4_2_4_stale_served_when_the_origin_resets_the_connection() {
    for inner in [Inner::Errors, Inner::Marks] {
        let origin = RawOrigin::start(None).await;
        let (svc, layer, clock) = cached(origin.addr, inner, |b| b);
        get(&svc, "/stale", &[]).await.unwrap();
        clock.advance(Duration::from_secs(100));
        origin.set(RESET);
        let got = get(&svc, "/stale", &[]).await.unwrap();
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "/stale #1")
        );
        assert!(got.age() >= 100);
        assert_eq!(layer.stats().stale_if_unreachable, 1, "{inner:?}");
        assert_eq!(origin.count.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn rfc9111_4_2_4_and_5_2_2_directives_that_forbid_stale_give_a_504() {
    for inner in [Inner::Errors, Inner::Marks] {
        let origin = RawOrigin::start(None).await;
        let (svc, layer, clock) = cached(origin.addr, inner, |b| b);
        let paths = ["/must", "/proxy", "/nocache", "/smaxage"];
        for path in paths {
            assert_eq!(get(&svc, path, &[]).await.unwrap().status, StatusCode::OK);
        }
        clock.advance(Duration::from_secs(100));
        origin.close().await;
        for path in paths {
            let got = get(&svc, path, &[]).await.unwrap();
            assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{inner:?} {path}");
            assert!(got.body.contains("unreachable"), "{}", got.body);
            assert!(
                got.cache_status().is_empty(),
                "made by the cache: no entry (RFC 9211 §2): {:?}",
                got.cache_status()
            );
        }
        let stats = layer.stats();
        assert_eq!(stats.stale_if_unreachable, 0, "{inner:?}");
        let errors = match inner {
            Inner::Errors => 4,
            Inner::Marks => 0,
        };
        assert_eq!(stats.inner_errors, errors, "{inner:?}");
    }
    // A private cache: proxy-revalidate and s-maxage bind shared caches only.
    let origin = RawOrigin::start(None).await;
    let (svc, _, clock) = cached(origin.addr, Inner::Marks, |b| b.private());
    get(&svc, "/proxy", &[]).await.unwrap();
    clock.advance(Duration::from_secs(100));
    origin.close().await;
    let got = get(&svc, "/proxy", &[]).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/proxy #1")
    );
}

#[tokio::test]
async fn rfc9111_5_2_1_request_directives_that_refuse_the_stored_response_give_a_504() {
    let origin = RawOrigin::start(None).await;
    let (svc, layer, clock) = cached(origin.addr, Inner::Marks, |b| b);
    get(&svc, "/stale", &[]).await.unwrap();
    origin.close().await;
    clock.advance(Duration::from_secs(5));
    for cc in ["no-cache", "max-age=2", "min-fresh=6"] {
        let got = get(&svc, "/stale", &[("cache-control", cc)]).await.unwrap();
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{cc}");
    }
    let got = get(&svc, "/stale", &[("pragma", "no-cache")])
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "Pragma: no-cache");
    clock.advance(Duration::from_secs(95));
    let got = get(&svc, "/stale", &[("cache-control", "max-stale=50")])
        .await
        .unwrap();
    assert_eq!(
        got.status,
        StatusCode::GATEWAY_TIMEOUT,
        "staler than max-stale"
    );
    let got = get(&svc, "/stale", &[]).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/stale #1")
    );
    assert_eq!(layer.stats().stale_if_unreachable, 1);
}

#[tokio::test]
async fn rfc9111_4_2_4_a_fresh_entry_is_a_hit_while_the_origin_is_down() {
    let origin = RawOrigin::start(None).await;
    let (svc, layer, clock) = cached(origin.addr, Inner::Marks, |b| b);
    get(&svc, "/stale", &[]).await.unwrap();
    origin.close().await;
    clock.advance(Duration::from_secs(5));
    let got = get(&svc, "/stale", &[]).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/stale #1")
    );
    assert_eq!(got.cache_status(), ["tower-scale; hit; ttl=5"]);
    let stats = layer.stats();
    assert_eq!((stats.hits, stats.stale_if_unreachable), (1, 0));
}

#[tokio::test]
async fn rfc9111_4_2_4_nothing_stored_passes_the_failure_through() {
    let origin = RawOrigin::start(None).await;
    origin.close().await;
    let (svc, layer, _) = cached(origin.addr, Inner::Marks, |b| b);
    let got = get(&svc, "/stale", &[]).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::BAD_GATEWAY, "upstream unreachable")
    );
    let (svc, _, _) = cached(origin.addr, Inner::Errors, |b| b);
    assert!(get(&svc, "/stale", &[]).await.is_err(), "the service error");
    assert_eq!(layer.stats().stale_if_unreachable, 0);
}

#[tokio::test]
async fn rfc9111_4_2_4_staler_than_max_stale_if_unreachable_passes_the_failure_through() {
    let origin = RawOrigin::start(None).await;
    let bound = Duration::from_secs(60);
    let (svc, layer, clock) = cached(origin.addr, Inner::Marks, |b| {
        b.max_stale_if_unreachable(bound)
    });
    get(&svc, "/stale", &[]).await.unwrap();
    origin.close().await;
    clock.advance(Duration::from_secs(10 + 59)); // 59 s stale
    let got = get(&svc, "/stale", &[]).await.unwrap();
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/stale #1")
    );
    clock.advance(Duration::from_secs(2)); // 61 s stale
    let got = get(&svc, "/stale", &[]).await.unwrap();
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(layer.stats().stale_if_unreachable, 1);
    // Zero: never.
    let origin = RawOrigin::start(None).await;
    let (svc, _, clock) = cached(origin.addr, Inner::Errors, |b| {
        b.max_stale_if_unreachable(Duration::ZERO)
    });
    get(&svc, "/stale", &[]).await.unwrap();
    origin.close().await;
    clock.advance(Duration::from_secs(11));
    assert!(get(&svc, "/stale", &[]).await.is_err());
}

#[tokio::test]
async fn rfc5861_stale_if_error_keeps_its_window_when_the_origin_is_unreachable() {
    let origin = RawOrigin::start(None).await;
    let (svc, layer, clock) = cached(origin.addr, Inner::Marks, |b| {
        b.max_stale_if_unreachable(Duration::from_secs(60))
    });
    get(&svc, "/sie", &[]).await.unwrap();
    origin.close().await;
    clock.advance(Duration::from_secs(1000)); // beyond the bound, inside stale-if-error
    let got = get(&svc, "/sie", &[]).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "/sie #1"));
    assert_eq!(
        got.cache_status(),
        ["tower-scale; fwd=stale; fwd-status=502; ttl=-990"]
    );
    let stats = layer.stats();
    assert_eq!((stats.stale_if_error, stats.stale_if_unreachable), (1, 0));
}

/// A stale-while-revalidate hit is answered at once; its background
/// revalidation failing answers nobody: counted as an inner error, not as
/// a stale response served.
#[tokio::test]
async fn rfc5861_a_failed_background_revalidation_serves_nobody_stale() {
    let origin = RawOrigin::start(None).await;
    let (svc, layer, clock) = cached(origin.addr, Inner::Errors, |b| b);
    get(&svc, "/swr", &[]).await.unwrap();
    origin.close().await;
    clock.advance(Duration::from_secs(15));
    let got = get(&svc, "/swr", &[]).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "/swr #1"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while layer.stats().inner_errors == 0 {
        assert!(Instant::now() < deadline, "no background revalidation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = layer.stats();
    assert_eq!((stats.stale_hits, stats.stale_if_unreachable), (1, 0));
}

#[tokio::test]
async fn a_marked_response_is_never_stored() {
    let (clock, _) = Clock::mock();
    let layer = HttpCacheLayer::builder().clock(clock).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn({
        let calls = calls.clone();
        move |_: Request<Full<Bytes>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let mut res = Response::new(Full::new(Bytes::from(format!("#{n}"))));
                *res.status_mut() = StatusCode::BAD_GATEWAY;
                res.headers_mut()
                    .insert("cache-control", "max-age=60".parse().unwrap());
                res.extensions_mut().insert(UpstreamUnreachable);
                Ok::<_, Infallible>(res)
            }
        }
    });
    let svc = tower::Layer::layer(&layer, inner);
    for n in 1..=2 {
        let req = Request::get("/x").header("host", "a.test");
        let req = req.body(Full::new(Bytes::new()));
        let res = svc.clone().oneshot(req.unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert!(res.extensions().get::<UpstreamUnreachable>().is_some());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("#{n}"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = layer.stats();
    assert_eq!((stats.stored, stats.not_stored, stats.misses), (0, 2, 2));
}

// The `http_proxy` example as a process.

async fn proxy(origin: &RawOrigin, extra: &[&'static str]) -> Running {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into()];
    args.extend(["--upstream".to_string(), origin.url()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::start("http_proxy", &args)
    })
    .await
    .unwrap()
}

async fn through(proxy: &Running, path: &str) -> Got {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{}{path}", proxy.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Every response comes with `Age: 100` and `max-age=10`: stored stale,
/// so the next request revalidates (no clock to move in another process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_2_4_the_proxy_serves_stale_when_the_origin_is_gone_or_resets() {
    let origin = RawOrigin::start(Some(100)).await;
    let proxy = proxy(&origin, &[]).await;
    for path in ["/stale", "/reset", "/must"] {
        assert_eq!(through(&proxy, path).await.status, StatusCode::OK);
    }
    origin.set(RESET);
    let got = through(&proxy, "/reset").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/reset #2")
    );
    assert!(got.age() > 10, "Age {}", got.age());
    origin.close().await;
    let got = through(&proxy, "/stale").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/stale #1")
    );
    assert!(got.age() >= 100, "Age {}", got.age());
    let entry = got.cache_status().join(", ");
    assert!(
        entry.contains("fwd=stale; fwd-status=502; ttl=-") && entry.ends_with("detail=unreachable"),
        "{entry}"
    );
    let got = through(&proxy, "/must").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "must-revalidate");
    let got = through(&proxy, "/never-stored").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "nothing stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_2_4_the_proxy_serves_stale_when_the_origin_stalls_past_the_timeout() {
    let origin = RawOrigin::start(Some(100)).await;
    let proxy = proxy(&origin, &["--upstream-timeout", "1"]).await;
    through(&proxy, "/stale").await;
    origin.set(STALL);
    let started = Instant::now();
    let got = through(&proxy, "/stale").await;
    let took = started.elapsed();
    eprintln!("stalled origin, --upstream-timeout 1: stale response after {took:?}");
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "/stale #1")
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(origin.stalled.lock().unwrap().len(), 1, "the origin got it");
    // Nothing stored: the 502 after the timeout.
    let started = Instant::now();
    let got = through(&proxy, "/other").await;
    let took = started.elapsed();
    eprintln!("stalled origin, nothing stored: 502 after {took:?}");
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn the_proxy_refuses_a_bad_upstream_timeout() {
    for value in ["0", "-1", "soon", "1.5"] {
        let out = std::process::Command::new(common::example("http_proxy"))
            .args(["--listen", "127.0.0.1:0", "--upstream", "http://a:1"])
            .args(["--upstream-timeout", value])
            .output()
            .expect("run http_proxy");
        assert_eq!(out.status.code(), Some(2), "{value}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
        assert!(out.stdout.is_empty());
    }
}
