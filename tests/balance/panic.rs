//! Panic mode (every upstream ejected: the one whose back-off ends first
//! is probed at once, one probe at a time) and an upstream that refuses a
//! body by closing the connection while it is still being sent (never an
//! ejection).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_scale::balance::UpstreamHealth;

use crate::{BlackHole, Origin, builder, get, send, status_of, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_upstream_that_failed_once_is_tried_again_at_once_not_after_its_back_off() {
    let mut o = Origin::start("lone").await;
    let set = upstreams([o.url()]);
    // A back-off far longer than the test: only panic mode can bring it back.
    let balancer = builder()
        .ejection_base(Duration::from_secs(60))
        .ejection_max(Duration::from_secs(60))
        .build(&set)
        .unwrap();
    assert_eq!(send(&balancer, get("/a")).await.status, StatusCode::OK);
    o.kill().await;
    let failed = send(&balancer, get("/b")).await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    assert!(matches!(
        status_of(&set, &o.url()).health,
        UpstreamHealth::Ejected { .. }
    ));
    // Still down: each request probes it (refused at once), nothing waits
    // for the back-off.
    let down = send(&balancer, get("/c")).await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY);
    assert!(down.unreachable);
    assert_eq!(&down.body[..], b"upstream unreachable\n");
    o.restart().await;
    let back = send(&balancer, get("/d")).await;
    let s = status_of(&set, &o.url());
    println!(
        "panic mode: a lone upstream back after one failure: {} in {:?}; {s:?}",
        back.status, back.took
    );
    assert_eq!(back.status, StatusCode::OK);
    assert_eq!(s.panic_probes, 2, "{s:?}");
    assert!(matches!(s.health, UpstreamHealth::Healthy { .. }), "{s:?}");
    // In rotation again: the next request is an ordinary one.
    assert_eq!(send(&balancer, get("/e")).await.status, StatusCode::OK);
    assert_eq!(status_of(&set, &o.url()).panic_probes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_sends_one_probe_at_a_time_to_a_black_hole() {
    let hole = BlackHole::start().await;
    let set = upstreams([hole.url()]);
    let timeout = Duration::from_secs(1);
    let balancer = builder()
        .upstream_timeout(timeout)
        .ejection_base(Duration::from_secs(60))
        .ejection_max(Duration::from_secs(60))
        .build(&set)
        .unwrap();
    let first = send(&balancer, get("/")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    // Six at once against the ejected black hole: one probe runs, the
    // others are answered at once (a cache would serve stale), never two
    // in flight.
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..6 {
        let balancer = balancer.clone();
        tasks.spawn(async move { send(&balancer, get("/")).await });
    }
    let watch = {
        let (set, peak) = (set.clone(), Arc::clone(&peak));
        tokio::spawn(async move {
            loop {
                let now = set.status()[0].in_flight as usize;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (mut slowest, mut waited) = (Duration::ZERO, 0);
    while let Some(a) = tasks.join_next().await {
        let a = a.unwrap();
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}");
        assert!(a.unreachable);
        slowest = slowest.max(a.took);
        if a.took >= timeout / 2 {
            waited += 1;
        }
    }
    watch.abort();
    let s = set.status().remove(0);
    println!(
        "panic mode on a black hole: slowest of 6 answered in {slowest:?} (timeout {timeout:?}), \
         {waited} waited half of it or more; most in flight {}; {s:?}",
        peak.load(Ordering::SeqCst)
    );
    assert!(peak.load(Ordering::SeqCst) <= 1);
    assert_eq!(s.panic_probes, 1);
    // Only the probe waited for the black hole.
    assert_eq!(waited, 1);
}

/// An origin that reads a request head, answers `413` and closes without
/// reading the body (the kernel resets the connection, the body unread).
async fn refusing_bodies() -> (axum::http::Uri, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                drop(stream);
            });
        }
    });
    (url, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_on_a_body_it_refuses_is_not_ejected() {
    let (url, heads) = refusing_bodies().await;
    let set = upstreams([url.clone()]);
    let balancer = builder().build(&set).unwrap();
    let big = Bytes::from(vec![b'x'; 8 << 20]);
    for round in 0..4 {
        // Two refused uploads, then an ordinary request it answers.
        for _ in 0..2 {
            let req = Request::post("/upload")
                .body(Full::new(big.clone()))
                .unwrap();
            let a = send(&balancer, req).await;
            println!(
                "8 MiB POST to an origin that answers 413 and closes, round {round}: {} {:?}",
                a.status, a.body
            );
            assert!(
                a.status == StatusCode::PAYLOAD_TOO_LARGE || a.status == StatusCode::BAD_GATEWAY,
                "{a:?}"
            );
            assert!(!a.unreachable, "{a:?}");
        }
        assert_eq!(
            send(&balancer, get("/")).await.status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let s = status_of(&set, &url);
        assert_eq!(s.ejections, 0, "{s:?}");
        assert!(matches!(s.health, UpstreamHealth::Healthy { .. }), "{s:?}");
    }
    // Back to back, with nothing answered between: still never ejected
    // (a client could otherwise eject upstreams with bodies they refuse);
    // the third makes the next request a probe, which the answer to a
    // request without a body ends.
    for _ in 0..4 {
        let req = Request::post("/upload")
            .body(Full::new(big.clone()))
            .unwrap();
        send(&balancer, req).await;
    }
    let s = status_of(&set, &url);
    assert_eq!(s.ejections, 0, "{s:?}");
    assert_eq!(
        send(&balancer, get("/")).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let s = status_of(&set, &url);
    assert!(matches!(s.health, UpstreamHealth::Healthy { .. }), "{s:?}");
    assert_eq!(heads.load(Ordering::SeqCst), 17, "never retried");
}

/// An origin that accepts connections and closes them at once.
async fn dropping() -> axum::http::Uri {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dropping_every_connection_is_ejected_by_uploads_too() {
    let good = Origin::start("good").await;
    let bad = dropping().await;
    let set = upstreams([good.url(), bad.clone()]);
    let balancer = builder()
        .ejection_base(Duration::from_secs(60))
        .ejection_max(Duration::from_secs(60))
        .build(&set)
        .unwrap();
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    let mut answers = Vec::new();
    for _ in 0..40 {
        let req = Request::post("/upload")
            .body(Full::new(big.clone()))
            .unwrap();
        answers.push(send(&balancer, req).await.status);
    }
    let s = status_of(&set, &bad);
    let late_ok = answers[10..]
        .iter()
        .filter(|s| **s == StatusCode::OK)
        .count();
    println!(
        "1 MiB POSTs over a good origin and one dropping every connection: \
         {late_ok}/30 of the last answered 200; {s:?}"
    );
    assert!(s.ejections >= 1, "{s:?}");
    assert!(late_ok >= 27, "{answers:?}");
}
