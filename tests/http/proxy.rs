//! The `http_proxy` example as a user runs it: a real process between a
//! real client and a real origin.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::common::{self, Running};

fn start_proxy(upstream: &str) -> Running {
    common::start(
        "http_proxy",
        &["--listen", "127.0.0.1:0", "--upstream", upstream],
    )
}

async fn upstream(count: Arc<AtomicUsize>) -> String {
    let app = Router::new()
        .route(
            "/item",
            get(move |q: axum::extract::RawQuery, h: HeaderMap| {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    let hop = if h.contains_key("x-hop") {
                        "hop leaked"
                    } else {
                        "no hop"
                    };
                    (
                        [("cache-control", "public, max-age=60")],
                        format!("item {} #{n} {hop}", q.0.unwrap_or_default()),
                    )
                }
            }),
        )
        .route("/echo", post(|body: Bytes| async move { body }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(
            req.body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_everything_and_serves_hits_from_the_cache() {
    let count = Arc::new(AtomicUsize::new(0));
    let origin = upstream(count.clone()).await;
    let proxy = tokio::task::spawn_blocking(move || start_proxy(&origin))
        .await
        .unwrap();
    let (status, body) = send(
        &proxy.addr,
        "GET",
        "/item?x=1&y=2",
        &[("connection", "x-hop"), ("x-hop", "1")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, "item x=1&y=2 #1 no hop");
    let (_, again) = send(&proxy.addr, "GET", "/item?x=1&y=2", &[], "").await;
    assert_eq!(again, "item x=1&y=2 #1 no hop", "served from the cache");
    let (_, other) = send(&proxy.addr, "GET", "/item?x=2", &[], "").await;
    assert_eq!(other, "item x=2 #2 no hop", "the query is part of the key");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    let (status, echoed) = send(&proxy.addr, "POST", "/echo", &[], "a request body").await;
    assert_eq!((status, echoed.as_str()), (200, "a request body"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let proxy =
        tokio::task::spawn_blocking(move || start_proxy(&format!("http://127.0.0.1:{port}")))
            .await
            .unwrap();
    let (status, _) = send(&proxy.addr, "GET", "/", &[], "").await;
    assert_eq!(status, 502);
    // Still serving after the failure.
    let (status, _) = send(&proxy.addr, "GET", "/again", &[], "").await;
    assert_eq!(status, 502);
}

#[test]
fn bad_flags_print_usage_and_exit_2() {
    for args in [
        vec![],
        vec!["--listen"],
        vec!["--listen", "nope", "--upstream", "http://a:1"],
        vec!["--bogus"],
    ] {
        let out = Command::new(common::example("http_proxy"))
            .args(&args)
            .output()
            .expect("run http_proxy");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage:"),
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
    }
}
