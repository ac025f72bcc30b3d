//! Hostile or odd requests: the upstream is always a configured one,
//! hop-by-hop fields never cross, and nothing a client sends can eject an
//! upstream. Plus the balancer served by hyper behind the HTTP cache.

use std::time::Duration;

use axum::http::{HeaderValue, Method, Request, StatusCode, Version};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tower::{ServiceBuilder, ServiceExt};
use tower_scale::balance::{Balancer, UpstreamHealth};
use tower_scale::http::HttpCacheLayer;

use crate::{Origin, builder, get, send, status_of, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_cannot_reach_another_host() {
    let (ours, other) = (Origin::start("ours").await, Origin::start("other").await);
    let set = upstreams([ours.url()]);
    let balancer = builder().build(&set).unwrap();
    let req = Request::get(format!("http://{}/steal?x=1", other.addr))
        .header("host", other.addr.to_string())
        .body(Full::default())
        .unwrap();
    let a = send(&balancer, req).await;
    assert_eq!(a.origin.as_deref(), Some("ours"));
    assert_eq!(other.hits(), 0);
    let seen = ours.state.seen.lock().unwrap().clone();
    assert_eq!(seen[0].uri.to_string(), "/steal?x=1");
    // The client's Host goes through as it is (the origin may route on it).
    assert_eq!(seen[0].headers["host"], other.addr.to_string().as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_odd_methods_and_versions_pass() {
    let o = Origin::start("o").await;
    let set = upstreams([o.url()]);
    let balancer = builder().build(&set).unwrap();
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri(o.addr.to_string())
        .body(Full::default())
        .unwrap();
    assert_eq!(
        send(&balancer, connect).await.status,
        StatusCode::NOT_IMPLEMENTED
    );
    assert_eq!(o.hits(), 0);
    // An extension method, an HTTP/2 request (the upstream leg is
    // HTTP/1.1), an asterisk-form target.
    let frob = Request::builder()
        .method(Method::from_bytes(b"FROB").unwrap())
        .uri("/frob")
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&balancer, frob).await.status, 200);
    let star = Request::builder()
        .method(Method::OPTIONS)
        .uri("*")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&balancer, star).await.status, 200);
    let seen = o.state.seen.lock().unwrap().clone();
    assert_eq!(seen[0].method.as_str(), "FROB");
    assert_eq!(seen[1].uri.to_string(), "/");
    assert_eq!(status_of(&set, &o.url()).failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_fields_are_removed_both_ways() {
    let o = Origin::start("o").await;
    let set = upstreams([o.url()]);
    let balancer = builder().build(&set).unwrap();
    let mut req = get("/h");
    for (k, v) in [
        ("connection", "x-secret, keep-alive"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("x-end-to-end", "kept"),
    ] {
        req.headers_mut().append(k, HeaderValue::from_static(v));
    }
    let a = send(&balancer, req).await;
    assert_eq!(a.status, 200);
    let seen = o.state.seen.lock().unwrap()[0].headers.clone();
    for gone in [
        "x-secret",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(!seen.contains_key(gone), "{gone} reached the origin");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    // The origin named `x-hop` in its `Connection`.
    assert!(!a.headers.contains_key("x-hop"));
    assert!(!a.headers.contains_key("connection"));
    assert_eq!(a.headers["x-origin"], "o");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_or_a_failing_body_never_eject_an_upstream() {
    let o = Origin::start("o").await;
    let set = upstreams([o.url()]);
    let balancer = builder().build(&set).unwrap();
    // A megabyte of header: refused by the balancer itself (an upstream
    // might reset the connection on it, which would eject it).
    let mut req = get("/huge");
    let value = "x".repeat(1 << 20);
    req.headers_mut()
        .insert("x-huge", HeaderValue::from_str(&value).unwrap());
    let a = send(&balancer, req).await;
    println!("1 MiB header: {} {:?}", a.status, a.body);
    assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(o.hits(), 0);
    // Just under the limit: forwarded.
    let mut req = get("/big");
    let value = "x".repeat(60 * 1024);
    req.headers_mut()
        .insert("x-big", HeaderValue::from_str(&value).unwrap());
    assert_eq!(send(&balancer, req).await.status, 200);
    // Then a body that breaks half-way (a client going away).
    type Breaking =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;
    // A set of its own (one live balancer per set), same origin.
    let second = upstreams([o.url()]);
    let broken: Balancer<Breaking> = builder().build(&second).unwrap();
    let body = StreamBody::new(futures::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(b"half"))),
        Err(std::io::Error::other("the client went away")),
    ]));
    let req = Request::post("/upload")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let res = broken.clone().oneshot(req).await.unwrap();
    println!("a body that fails: {}", res.status());
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let upstream = &broken.upstreams().status()[0];
    assert_eq!(upstream.failures, 0, "{upstream:?}");
    assert!(matches!(upstream.health, UpstreamHealth::Healthy { .. }));
    let s = status_of(&set, &o.url());
    assert_eq!(s.ejections, 0, "{s:?}");
    assert!(s.health.in_rotation());
    assert_eq!(send(&balancer, get("/after")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_hyper_clients_behind_the_http_cache() {
    let origins = [Origin::start("a").await, Origin::start("b").await];
    let set = upstreams(origins.iter().map(Origin::url));
    let balancer: Balancer = Balancer::builder()
        .upstream_timeout(Duration::from_secs(5))
        .build(&set)
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(HttpCacheLayer::builder().build().unwrap())
        .service(balancer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = |path: &str| {
        format!("http://{addr}{path}")
            .parse::<hyper::Uri>()
            .unwrap()
    };
    for _ in 0..3 {
        let res = client.get(url("/cached")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let cached_hits: usize = origins
        .iter()
        .map(|o| {
            o.state
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.uri.path() == "/cached")
                .count()
        })
        .sum();
    assert_eq!(cached_hits, 1, "two of three answered by the cache");
    let res = client
        .request(
            Request::post(url("/echo"))
                .body(Full::new(Bytes::from_static(b"0123456789")))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b" 10"), "{body:?}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_times_out_against_the_client_not_the_upstream() {
    let o = Origin::start("o").await;
    let set = upstreams([o.url()]);
    type Stalling = StreamBody<
        futures::stream::Chain<
            futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
            futures::stream::Pending<Result<Frame<Bytes>, std::io::Error>>,
        >,
    >;
    let timeout = Duration::from_millis(300);
    let balancer: Balancer<Stalling> = builder().upstream_timeout(timeout).build(&set).unwrap();
    use futures::StreamExt;
    // Ten bytes of a hundred, then nothing.
    let body = StreamBody::new(
        futures::stream::iter(vec![Ok(Frame::data(Bytes::from_static(b"0123456789")))])
            .chain(futures::stream::pending()),
    );
    let req = Request::post("/upload")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let started = tokio::time::Instant::now();
    let res = balancer.clone().oneshot(req).await.unwrap();
    println!(
        "a stalled upload: {} after {:?}",
        res.status(),
        started.elapsed()
    );
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let s = status_of(&set, &o.url());
    assert_eq!((s.failures, s.ejections), (0, 0), "{s:?}");
    assert!(matches!(s.health, UpstreamHealth::Healthy { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_host_reaches_the_origin_whatever_connection_or_the_version_says() {
    let o = Origin::start("o").await;
    let set = upstreams([o.url()]);
    let balancer = builder().build(&set).unwrap();
    // `Connection: host` would have the origin see its own address as
    // the host while a cache in front keyed the answer on `a.test`.
    let named = Request::get("/named")
        .header("host", "a.test")
        .header("connection", "host, x-drop")
        .header("x-drop", "1")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&balancer, named).await.status, 200);
    // An HTTP/2 request carries its authority in the target, no `Host`.
    let h2 = Request::get("http://b.test/h2")
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&balancer, h2).await.status, 200);
    let seen = o.state.seen.lock().unwrap().clone();
    assert_eq!(seen[0].headers["host"], "a.test");
    assert!(seen[0].headers.get("x-drop").is_none());
    assert_eq!(seen[1].uri.to_string(), "/h2");
    assert_eq!(seen[1].headers["host"], "b.test");
}
