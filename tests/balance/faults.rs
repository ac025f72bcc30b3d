//! Killed, restarted, black-holed and refusing origins; a connection
//! reset after the request was sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower_scale::balance::{FailureKind, UpstreamHealth, Upstreams};

use crate::{
    BlackHole, Origin, builder, by_origin, eventually, get, load, post, refusing_url, send,
    status_of, upstreams,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_origin_fails_no_get_and_takes_traffic_again_after_a_restart() {
    let mut origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    ];
    // Requests are in flight on `b` when it is killed.
    for o in &origins {
        o.set_delay(Duration::from_millis(5));
    }
    let set = upstreams(origins.iter().map(Origin::url));
    let interval = Duration::from_millis(200);
    let balancer = builder()
        .health_path(Some("/health".into()))
        .health_interval(interval)
        .slow_start(Duration::from_secs(1))
        .build(&set)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let (balancer, stop) = (balancer.clone(), Arc::clone(&stop));
        tokio::spawn(async move { load(&balancer, 8, usize::MAX, Some(stop)).await })
    };
    eventually("b takes traffic", Duration::from_secs(10), || async {
        origins[1].hits() > 50
    })
    .await;
    let b_url = origins[1].url();
    origins[1].kill().await;
    let killed = Instant::now();
    eventually("b is ejected", Duration::from_secs(2), || async {
        !status_of(&set, &b_url).health.in_rotation()
    })
    .await;
    println!("killed origin out of rotation after {:?}", killed.elapsed());
    // A while down: its probes and health checks keep failing, and its
    // back-off grows.
    eventually("b's back-off grew", Duration::from_secs(5), || async {
        status_of(&set, &b_url).consecutive_failures >= 3
    })
    .await;
    let before = origins[1].hits();
    origins[1].restart().await;
    let restarted = Instant::now();
    eventually("b takes traffic again", Duration::from_secs(5), || async {
        origins[1].hits() > before + 10
    })
    .await;
    let back_after = restarted.elapsed();
    stop.store(true, Ordering::SeqCst);
    let answers = running.await.unwrap();
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK)
        .collect();
    let b = status_of(&set, &b_url);
    println!(
        "{} GETs, {} failed; per origin {:?}; b: {} failures, {} ejections, {} retries; back in rotation {:?} after the restart",
        answers.len(),
        failed.len(),
        by_origin(&answers),
        b.failures,
        b.ejections,
        b.retries,
        back_after
    );
    assert!(
        failed.is_empty(),
        "failed GETs: {:?}",
        &failed[..failed.len().min(3)]
    );
    assert!(b.ejections >= 1);
    assert!(matches!(b.health, UpstreamHealth::Healthy { .. }), "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_origin_is_ejected_by_its_first_failed_request() {
    let mut origins = [Origin::start("a").await, Origin::start("b").await];
    let set = upstreams(origins.iter().map(Origin::url));
    // Passive health only, and a back-off longer than the test.
    let balancer = builder()
        .ejection_base(Duration::from_secs(30))
        .ejection_max(Duration::from_secs(30))
        .build(&set)
        .unwrap();
    // `b` is slower: p2c prefers `a`, so the first request after the
    // kill goes to it.
    origins[1].set_delay(Duration::from_millis(5));
    for _ in 0..20 {
        assert_eq!(send(&balancer, get("/warm")).await.status, 200);
    }
    let a_url = origins[0].url();
    origins[0].kill().await;
    let mut sent = 0;
    loop {
        let answer = send(&balancer, get("/after")).await;
        sent += 1;
        assert_eq!(answer.status, 200, "GETs are retried: {answer:?}");
        let a = status_of(&set, &a_url);
        if a.failures > 0 {
            println!("first failure on the killed origin at request {sent}: {a:?}");
            assert_eq!(a.failures, 1);
            assert_eq!(a.ejections, 1);
            assert!(matches!(a.health, UpstreamHealth::Ejected { .. }), "{a:?}");
            assert_eq!(a.retries, 1);
            break;
        }
        assert!(sent < 200, "the killed origin was never tried");
    }
    // Out of rotation: nothing more goes to it.
    for _ in 0..20 {
        assert_eq!(
            send(&balancer, get("/after")).await.origin.as_deref(),
            Some("b")
        );
    }
    assert_eq!(status_of(&set, &a_url).failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_killed_origin_is_ejected_within_one_health_interval() {
    let mut origins = [Origin::start("a").await, Origin::start("b").await];
    let set = upstreams(origins.iter().map(Origin::url));
    let interval = Duration::from_millis(300);
    let _balancer: tower_scale::balance::Balancer<crate::Req> = builder()
        .health_path(Some("/health".into()))
        .health_interval(interval)
        .build(&set)
        .unwrap();
    eventually("health checks run", Duration::from_secs(5), || async {
        origins[0].state.health_hits.load(Ordering::SeqCst) >= 2
    })
    .await;
    let a_url = origins[0].url();
    origins[0].kill().await;
    let killed = Instant::now();
    // The issue's bound is one interval: measured and reported, with a
    // generous deadline (a timed assertion would fail on a loaded machine).
    eventually(
        "a is ejected with no traffic",
        Duration::from_secs(10),
        || async { !status_of(&set, &a_url).health.in_rotation() },
    )
    .await;
    let took = killed.elapsed();
    println!("idle killed origin ejected {took:?} after the kill (interval {interval:?})");
    assert!(status_of(&set, &origins[1].url()).health.in_rotation());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_times_out_is_not_retried_and_is_ejected() {
    let good = Origin::start("good").await;
    let hole = BlackHole::start().await;
    let set = upstreams([good.url(), hole.url()]);
    let timeout = Duration::from_millis(500);
    let balancer = builder()
        .upstream_timeout(timeout)
        .ejection_base(Duration::from_secs(30))
        .ejection_max(Duration::from_secs(30))
        .build(&set)
        .unwrap();
    // Sent together, before any answer: p2c sends some to each.
    let bodies: [&'static [u8]; 4] = [b"post-0", b"post-1", b"post-2", b"post-3"];
    let answers =
        futures::future::join_all(bodies.map(|b| send(&balancer, post("/submit", b)))).await;
    let timed_out: Vec<_> = answers.iter().filter(|a| a.status == 502).collect();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    for a in &answers {
        println!(
            "POST: {} after {:?} (unreachable: {})",
            a.status, a.took, a.unreachable
        );
    }
    assert!(
        !timed_out.is_empty(),
        "no POST reached the black hole: {answers:?}"
    );
    assert_eq!(timed_out.len() + ok, answers.len());
    for a in &timed_out {
        assert!(a.unreachable, "marked for the HTTP cache");
        assert!(
            a.took >= timeout - Duration::from_millis(20)
                && a.took < timeout + Duration::from_millis(500),
            "timed out after {:?}",
            a.took
        );
    }
    // Not retried: the good origin got exactly the POSTs that succeeded.
    assert_eq!(good.hits(), ok);
    assert!(hole.accepted.load(Ordering::SeqCst) >= 1);
    let h = status_of(&set, &hole.url());
    assert!(matches!(h.health, UpstreamHealth::Ejected { .. }), "{h:?}");
    assert_eq!(h.retries, 0);
    for _ in 0..10 {
        let a = send(&balancer, get("/after")).await;
        assert_eq!(a.origin.as_deref(), Some("good"));
        assert!(a.took < timeout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_post_goes_to_another_upstream_with_its_body() {
    let good = Origin::start("good").await;
    let refusing = refusing_url().await;
    let set = upstreams([refusing.clone(), good.url()]);
    // Slower than the refusing upstream's assumed 1 ms: p2c tries that one
    // by the second request.
    good.set_delay(Duration::from_millis(5));
    let balancer = builder()
        .ejection_base(Duration::from_secs(30))
        .ejection_max(Duration::from_secs(30))
        .build(&set)
        .unwrap();
    let mut sent = 0;
    while status_of(&set, &refusing).failures == 0 {
        let a = send(&balancer, post("/submit", b"the whole body")).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(&a.body[..], b"good 14", "the body arrived whole");
        sent += 1;
        assert!(sent < 100, "the refusing upstream was never tried");
    }
    let r = status_of(&set, &refusing);
    println!("refused POST retried: {r:?}");
    assert_eq!(r.retries, 1);
    let seen = good.state.seen.lock().unwrap();
    assert!(seen.iter().all(|s| &s.body[..] == b"the whole body"));
}

/// An origin that reads a request, then closes the connection without
/// answering (a reset after the request was sent).
async fn rude_origin() -> (
    axum::http::Uri,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&received);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, received, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_sending_is_retried_for_get_but_not_for_post() {
    let good = Origin::start("good").await;
    let (rude, received, task) = rude_origin().await;
    for (method, retried) in [("GET", true), ("POST", false)] {
        // Fresh upstreams each round, until the rude origin got one.
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 50, "the rude origin never got a {method}");
            let set = Upstreams::new();
            set.add(rude.clone()).unwrap();
            set.add(good.url()).unwrap();
            let balancer = builder()
                .ejection_base(Duration::from_secs(30))
                .ejection_max(Duration::from_secs(30))
                .build(&set)
                .unwrap();
            let before = (received.load(Ordering::SeqCst), good.hits());
            let make = || match method {
                "GET" => get("/r"),
                _ => post("/r", b"once only"),
            };
            let answers =
                futures::future::join_all([send(&balancer, make()), send(&balancer, make())]).await;
            let rude_got = received.load(Ordering::SeqCst) - before.0;
            if rude_got == 0 {
                continue;
            }
            let r = status_of(&set, &rude);
            let good_got = good.hits() - before.1;
            println!(
                "{method}: rude origin got {rude_got}, good {good_got}: {:?}; {r:?}",
                answers
                    .iter()
                    .map(|a| a.status.as_u16())
                    .collect::<Vec<_>>()
            );
            assert_eq!(r.failures, rude_got as u64);
            assert!(r.failures >= 1);
            assert_eq!(r.ejections, 1);
            if retried {
                assert!(answers.iter().all(|a| a.status == 200), "GETs were retried");
                assert_eq!(good_got, 2);
            } else {
                let failed = answers.iter().filter(|a| a.status == 502).count();
                assert_eq!(
                    failed, rude_got,
                    "a POST whose body was sent is not retried"
                );
                assert!(
                    answers
                        .iter()
                        .filter(|a| a.status == 502)
                        .all(|a| a.unreachable)
                );
                assert_eq!(good_got, 2 - rude_got);
                assert_eq!(r.retries, 0);
            }
            break;
        }
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_upstream_configured_or_none_alive() {
    let empty = Upstreams::new();
    let balancer = builder().build(&empty).unwrap();
    let a = send(&balancer, get("/")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&a.body[..], b"no upstream configured\n");

    let set = upstreams([refusing_url().await, refusing_url().await]);
    let balancer = builder()
        .ejection_base(Duration::from_secs(30))
        .ejection_max(Duration::from_secs(30))
        .build(&set)
        .unwrap();
    // Refused, retried on the other, refused again.
    let first = send(&balancer, get("/")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert!(first.unreachable);
    let status = set.status();
    assert!(
        status
            .iter()
            .all(|s| s.failures == 1 && !s.health.in_rotation()),
        "{status:?}"
    );
    // Both out: panic mode probes the one whose back-off ends first, at
    // once (refused again: answered without waiting for a timeout).
    let then = send(&balancer, get("/")).await;
    println!(
        "all refused: {} after {:?}, then {} after {:?}",
        first.status, first.took, then.status, then.took
    );
    // As unreachable as a refusal: a cache in front may serve stale.
    assert_eq!(then.status, StatusCode::BAD_GATEWAY);
    assert!(then.unreachable);
    assert_eq!(&then.body[..], b"upstream unreachable\n");
    // Refused at once: far from the upstream timeout (5 s).
    assert!(then.took < Duration::from_secs(4), "{:?}", then.took);
    let status = set.status();
    assert_eq!(
        status.iter().map(|s| s.panic_probes).sum::<u64>(),
        1,
        "{status:?}"
    );
    assert_eq!(
        status.iter().map(|s| s.requests).sum::<u64>(),
        3,
        "{status:?}"
    );
    assert_eq!(FailureKind::Connect.as_str(), "connect");
}
