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
    // A setting given twice is refused, not silently overridden (the
    // trailing bogus flag is never reached).
    let token_file = std::env::temp_dir().join(format!("proxy-token-{}", std::process::id()));
    std::fs::write(&token_file, "a-token-from-a-file-0123456789").unwrap();
    let token_file = token_file.to_str().unwrap().to_string();
    for args in [
        vec![
            "--redis",
            "redis://127.0.0.1:1",
            "--redis",
            "redis://127.0.0.1:2",
        ],
        vec![
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        vec![
            "--purge-token",
            "token-0123456789abcdef",
            "--purge-token-file",
            &token_file,
        ],
        vec![
            "--purge-token-file",
            &token_file,
            "--purge-token-file",
            &token_file,
        ],
        vec!["--header-timeout", "1", "--header-timeout", "2"],
    ] {
        let mut args = args.clone();
        args.push("--bogus");
        let out = Command::new(common::example("http_proxy"))
            .args(&args)
            .output()
            .expect("run http_proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr.contains("more than once"), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(&token_file);
}

/// Reads until the peer closes; how long that took (panics past `limit`).
async fn closed_within(
    conn: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> std::time::Duration {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            conn.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {} // a 408, say: read on to the close
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    use tokio::io::AsyncWriteExt;
    let count = Arc::new(AtomicUsize::new(0));
    let origin = upstream(count.clone()).await;
    let proxy = tokio::task::spawn_blocking(move || {
        common::start(
            "http_proxy",
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &origin,
                "--header-timeout",
                "1",
            ],
        )
    })
    .await
    .unwrap();
    // Bound: the 1 s timeout and a generous slack; none would be forever.
    let limit = std::time::Duration::from_secs(4);
    // Half a request head (slowloris), then silence.
    let mut half = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    half.write_all(b"GET /item HTTP/1.1\r\nhost: a.test\r\nx-slow: ")
        .await
        .unwrap();
    // Nothing at all (hyper would still be deciding HTTP/1 or HTTP/2).
    let mut silent = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    let (a, b) = tokio::join!(
        closed_within(&mut half, limit),
        closed_within(&mut silent, limit)
    );
    println!("header timeout 1 s: half a head closed after {a:?}, nothing sent after {b:?}");
    assert!(
        a >= std::time::Duration::from_millis(900),
        "closed too early: {a:?}"
    );
    // A whole request is still served.
    let (status, _) = send(&proxy.addr, "GET", "/item", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "the slow client never reached the origin"
    );
}

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of file descriptors, `accept` fails at once, again and again: the
/// loop pauses instead of spinning a core.
#[test]
fn accept_errors_do_not_spin() {
    use std::io::BufRead;
    let exe = common::example("http_proxy");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 32 && exec {} --listen 127.0.0.1:0 --upstream http://127.0.0.1:9",
            exe.display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap()
        .to_string();
    // More connections than the proxy has descriptors left.
    let held: Vec<std::net::TcpStream> = (0..40)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(held.len() >= 32, "connected {}", held.len());
    // Measured over a fixed second (not waiting for a condition): once
    // the proxy's descriptors run out, a spinning loop burns about 100
    // ticks a second, a pausing one about none.
    let pid = child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    let _ = child.kill();
    let _ = child.wait();
    println!("out of descriptors: {used} CPU ticks in 1 s");
    assert!(used < 30, "the accept loop spun: {used} ticks in 1 s");
}
