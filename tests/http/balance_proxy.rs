//! `http_proxy` as the load balancer (issue 26): a real proxy process in
//! front of several real origin servers on loopback ports. Shares are
//! printed (`-- --nocapture`); conditions are polled with deadlines, and
//! reloads are awaited on the line the proxy writes to stderr.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, Response, StatusCode};
use axum::routing::any;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::common::{self, Running};

#[path = "../balance/killable.rs"]
mod killable;

/// How long `/slow` takes to answer.
const SLOW: Duration = Duration::from_secs(3);

#[derive(Default)]
struct OriginState {
    name: String,
    /// Requests other than health checks.
    hits: AtomicUsize,
    /// `/slow` requests being answered now.
    slow_in_flight: AtomicUsize,
    /// The health path answers 503.
    sick: AtomicBool,
}

async fn handle(State(o): State<Arc<OriginState>>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let req_xff = req.headers().get("x-forwarded-for").cloned();
    let status = if path == "/health" {
        if o.sick.load(Ordering::SeqCst) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    } else {
        o.hits.fetch_add(1, Ordering::SeqCst);
        if path == "/slow" {
            o.slow_in_flight.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(SLOW).await;
            o.slow_in_flight.fetch_sub(1, Ordering::SeqCst);
        } else {
            // Requests stay in flight a little, so that some are cut
            // when an origin is killed.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        StatusCode::OK
    };
    let mut res = Response::new(Body::from(o.name.clone()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    // Every request is a miss: the balancer answers them all.
    h.insert("cache-control", "no-store".parse().unwrap());
    h.insert("x-origin", o.name.parse().unwrap());
    if let Some(xff) = req_xff {
        h.insert("x-saw-forwarded-for", xff);
    }
    res
}

/// A real origin; every connection is a task of its server task, so that
/// killing it closes the listener and every connection at once.
struct Origin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    task: Option<JoinHandle<()>>,
}

impl Origin {
    async fn start(name: &str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(OriginState {
            name: name.to_string(),
            ..OriginState::default()
        });
        let app = Router::new()
            .fallback(any(handle))
            .with_state(Arc::clone(&state));
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(killable::serve(listener, app));
        Origin {
            addr,
            state,
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Kills it; returns once a connect is refused.
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let addr = self.addr;
        eventually("the killed origin refuses connections", || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `check` until it holds; panics after 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A proxy process whose stderr lines are kept (for its reload reports).
struct Proxy {
    running: Running,
    metrics: Option<String>,
    stderr: mpsc::Receiver<String>,
}

impl Proxy {
    async fn start(args: Vec<String>) -> Proxy {
        tokio::task::spawn_blocking(move || {
            let with_metrics = args.iter().any(|a| a == "--metrics-listen");
            let mut child = Command::new(common::example("http_proxy"))
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn http_proxy");
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut read_line = || {
                let mut line = String::new();
                stdout.read_line(&mut line).unwrap();
                line.trim().to_string()
            };
            let first = read_line();
            let addr = first
                .strip_prefix("listening on http://")
                .unwrap_or_else(|| panic!("first line was {first:?}"))
                .to_string();
            let metrics = with_metrics.then(|| {
                read_line()
                    .strip_prefix("metrics on http://")
                    .expect("metrics line")
                    .to_string()
            });
            let (tx, stderr) = mpsc::channel();
            let err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            Proxy {
                running: Running { child, addr },
                metrics,
                stderr,
            }
        })
        .await
        .unwrap()
    }

    /// Sends SIGHUP and returns the reload's report (waiting at most 10 s).
    async fn reload(&self) -> String {
        let pid = self.running.child.id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = tokio::task::block_in_place(|| self.stderr.recv_timeout(left))
                .expect("a reload report on stderr within 10 s");
            if line.contains("upstreams reloaded") || line.contains("upstreams not reloaded") {
                return line;
            }
        }
    }

    /// `tower_scale_upstream_healthy` for `url`, from `/metrics`.
    async fn healthy(&self, url: &str) -> Option<f64> {
        let metrics = self.metrics.as_ref().expect("--metrics-listen");
        let (status, text) = get(metrics, "/metrics").await;
        assert_eq!(status, 200);
        let series = format!("tower_scale_upstream_healthy{{upstream=\"{url}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
    }
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET http://{addr}{path}`: the status and the body (the origin's name);
/// a transport error is status 0.
async fn get(addr: &str, path: &str) -> (u16, String) {
    send(&client(), addr, path).await
}

async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: &str,
    path: &str,
) -> (u16, String) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap();
    let Ok(res) = client.request(req).await else {
        return (0, String::new());
    };
    let status = res.status().as_u16();
    match res.into_body().collect().await {
        Ok(body) => (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ),
        Err(_) => (0, String::new()),
    }
}

/// `workers` clients sending distinct GETs until `stop` is set or `total`
/// were sent; every answer as (status, origin).
async fn load(
    addr: &str,
    workers: usize,
    total: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(u16, String)> {
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (addr, sent, stop) = (addr.to_string(), Arc::clone(&sent), Arc::clone(&stop));
        tasks.spawn(async move {
            let client = client();
            let mut answers = Vec::new();
            loop {
                let i = sent.fetch_add(1, Ordering::SeqCst);
                if i >= total || stop.load(Ordering::SeqCst) {
                    return answers;
                }
                answers.push(send(&client, &addr, &format!("/load?i={i}")).await);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(answers) = tasks.join_next().await {
        all.extend(answers.unwrap());
    }
    all
}

fn shares(answers: &[(u16, String)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (status, origin) in answers {
        let key = if *status == 200 {
            origin.clone()
        } else {
            format!("status {status}")
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

fn args(upstreams: &[&Origin], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into()];
    for o in upstreams {
        args.extend(["--upstream".to_string(), o.url()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_origins_share_the_load_and_a_killed_one_fails_no_request() {
    let mut origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    ];
    let proxy = Proxy::start(args(&[&origins[0], &origins[1], &origins[2]], &[])).await;
    let addr = proxy.running.addr.clone();

    let uniform = load(&addr, 6, 600, Arc::new(AtomicBool::new(false))).await;
    let before = shares(&uniform);
    println!("3 origins, 600 GETs from 6 clients: {before:?}");
    for name in ["a", "b", "c"] {
        let n = before.get(name).copied().unwrap_or(0);
        // A third is 200; p2c over peak-EWMA keeps equal origins close.
        assert!((120..=280).contains(&n), "{name}: {n} of 600: {before:?}");
    }
    assert_eq!(uniform.iter().filter(|(s, _)| *s != 200).count(), 0);

    // Under load, `b` is killed: its listener and connections closed,
    // requests in flight on it cut.
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let (addr, stop) = (addr.clone(), Arc::clone(&stop));
        tokio::spawn(async move { load(&addr, 6, usize::MAX, stop).await })
    };
    let b_before = origins[1].hits();
    eventually("b takes traffic under the new load", || async {
        origins[1].hits() > b_before + 30
    })
    .await;
    origins[1].kill().await;
    let b_at_kill = origins[1].hits();
    let (a_at_kill, c_at_kill) = (origins[0].hits(), origins[2].hits());
    eventually("a and c take 400 more requests", || async {
        origins[0].hits() + origins[2].hits() > a_at_kill + c_at_kill + 400
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let answers = running.await.unwrap();
    let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    let after = (
        origins[0].hits() - a_at_kill,
        origins[1].hits() - b_at_kill,
        origins[2].hits() - c_at_kill,
    );
    println!(
        "b killed under load: {} GETs, {} failed; whole run {:?}; after the kill a {}, b {}, c {}",
        answers.len(),
        failed.len(),
        shares(&answers),
        after.0,
        after.1,
        after.2
    );
    assert!(
        failed.is_empty(),
        "failed GETs: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_eq!(after.1, 0, "a killed origin answers nothing");
    assert!(
        after.0 > 100 && after.2 > 100,
        "{after:?}: b's share went to a and c"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_learns_the_client_address_after_the_clients_own_forwarded_for() {
    let a = Origin::start("a").await;
    let proxy = Proxy::start(args(&[&a], &[])).await;
    let addr = proxy.running.addr.clone();
    for (sent, connection, seen) in [
        (None, None, "127.0.0.1"),
        (Some("203.0.113.9"), None, "203.0.113.9, 127.0.0.1"),
        // Naming it hop-by-hop removes the client's value, never ours.
        (Some("203.0.113.9"), Some("x-forwarded-for"), "127.0.0.1"),
    ] {
        let mut req = Request::get(format!("http://{addr}/xff"));
        if let Some(sent) = sent {
            req = req.header("x-forwarded-for", sent);
        }
        if let Some(connection) = connection {
            req = req.header("connection", connection);
        }
        let res = client()
            .request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()
                .get("x-saw-forwarded-for")
                .map(|v| v.as_bytes()),
            Some(seen.as_bytes()),
            "sent {sent:?}, {connection:?}: {:?}",
            res.headers()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_upstreams_file_without_dropping_requests_in_flight() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
        Origin::start("d").await,
    ];
    let file = tempfile_path("upstreams");
    let write = |names: &[usize], extra: &str| {
        let mut text = String::from("# the origins\n\n");
        for &i in names {
            text.push_str(&format!(
                "{}  # {}\n",
                origins[i].url(),
                origins[i].state.name
            ));
        }
        text.push_str(extra);
        std::fs::write(&file, text).unwrap();
    };
    write(&[0, 1, 2], "");
    let file_arg = file.to_str().unwrap();
    let proxy = Proxy::start(args(
        &[],
        &[
            "--upstreams-file",
            file_arg,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    ))
    .await;
    let addr = proxy.running.addr.clone();
    for o in &origins[..3] {
        assert_eq!(proxy.healthy(&o.url()).await, Some(1.0), "{}", o.url());
    }
    assert_eq!(proxy.healthy(&origins[3].url()).await, None);

    // Slow requests in flight, at least one of them on `c`.
    let mut slow = JoinSet::new();
    let c = &origins[2];
    while c.state.slow_in_flight.load(Ordering::SeqCst) == 0 {
        assert!(slow.len() < 30, "no slow request reached c");
        // Distinct targets: the cache would collapse identical misses.
        let (addr, path) = (addr.clone(), format!("/slow?n={}", slow.len()));
        slow.spawn(async move { get(&addr, &path).await });
        let sent = slow.len();
        // Wait until this one is in flight somewhere before sending the next.
        eventually("the slow request reaches an origin", || async {
            origins
                .iter()
                .map(|o| o.state.slow_in_flight.load(Ordering::SeqCst))
                .sum::<usize>()
                >= sent
        })
        .await;
    }
    let on_c = c.state.slow_in_flight.load(Ordering::SeqCst);

    // A file caught while it is rewritten (0 bytes) is refused.
    std::fs::write(&file, "").unwrap();
    let report = proxy.reload().await;
    println!("empty file: {report}");
    assert!(
        report.contains("not reloaded") && report.contains("empty"),
        "{report}"
    );
    assert_eq!(proxy.healthy(&c.url()).await, Some(1.0));

    // A file that cannot be used is refused: the list stays.
    write(&[0, 1, 3], "https://127.0.0.1:1\n");
    let report = proxy.reload().await;
    println!("bad file: {report}");
    assert!(
        report.contains("not reloaded") && report.contains("http://"),
        "{report}"
    );
    assert_eq!(proxy.healthy(&c.url()).await, Some(1.0));
    assert_eq!(proxy.healthy(&origins[3].url()).await, None);

    // `c` leaves, `d` joins, while `c` still answers a slow request.
    write(&[0, 1, 3], "");
    let report = proxy.reload().await;
    println!("good file: {report}");
    assert!(report.contains("upstreams reloaded"), "{report}");
    assert!(
        report.contains(&format!("added [{}]", origins[3].url())),
        "{report}"
    );
    assert!(
        report.contains(&format!("removed [{}]", c.url())),
        "{report}"
    );
    assert_eq!(proxy.healthy(&c.url()).await, Some(0.0));
    assert_eq!(proxy.healthy(&origins[3].url()).await, Some(1.0));
    assert!(
        c.state.slow_in_flight.load(Ordering::SeqCst) >= 1,
        "still in flight on c"
    );

    let c_hits = c.hits();
    let d_before = origins[3].hits();
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    // `d` ramps up from a tenth of its share: some requests before it gets one.
    while origins[3].hits() == d_before || answers.len() < 100 {
        assert!(Instant::now() < deadline, "d got no request");
        answers.extend(load(&addr, 4, 40, Arc::new(AtomicBool::new(false))).await);
    }
    let mut slow_answers = Vec::new();
    while let Some(answer) = slow.join_next().await {
        slow_answers.push(answer.unwrap());
    }
    println!(
        "after the reload: {} GETs {:?}; {} slow requests in flight across it ({} on c): {:?}",
        answers.len(),
        shares(&answers),
        slow_answers.len(),
        on_c,
        shares(&slow_answers)
    );
    assert!(
        answers.iter().all(|(s, _)| *s == 200),
        "{:?}",
        shares(&answers)
    );
    assert_eq!(c.hits(), c_hits, "a removed origin gets no new request");
    assert!(origins[3].hits() > d_before);
    assert!(
        slow_answers.iter().all(|(s, _)| *s == 200),
        "{:?}",
        shares(&slow_answers)
    );
    assert!(
        slow_answers.iter().filter(|(_, o)| o == "c").count() >= 1,
        "the slow request on the removed origin completed: {:?}",
        shares(&slow_answers)
    );
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_health_check_ejects_an_origin_that_fails_it() {
    let origins = [Origin::start("a").await, Origin::start("b").await];
    origins[1].state.sick.store(true, Ordering::SeqCst);
    let proxy = Proxy::start(args(
        &[&origins[0], &origins[1]],
        &[
            "--health-path",
            "/health",
            "--health-interval",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    ))
    .await;
    let started = Instant::now();
    let b = origins[1].url();
    eventually("b fails its health check and is ejected", || async {
        proxy.healthy(&b).await == Some(0.0)
    })
    .await;
    println!(
        "sick origin ejected {:?} after the start",
        started.elapsed()
    );
    let b_hits = origins[1].hits();
    let answers = load(&proxy.running.addr, 2, 40, Arc::new(AtomicBool::new(false))).await;
    assert_eq!(
        shares(&answers).get("a"),
        Some(&40),
        "{:?}",
        shares(&answers)
    );
    assert_eq!(origins[1].hits(), b_hits);
}

#[test]
fn bad_upstream_lists_are_refused_at_start() {
    let file = tempfile_path("bad-upstreams");
    let missing = tempfile_path("missing-upstreams");
    let cases: [(&str, &[&str], &str); 8] = [
        ("", &["--upstreams-file", ""], "empty"),
        (
            "",
            &["--upstream", "http://127.0.0.1:1", "--upstreams-file", ""],
            "empty",
        ),
        (
            "# only a comment\n\n",
            &["--upstreams-file", ""],
            "no upstream listed",
        ),
        (
            "http://127.0.0.1:1 http://127.0.0.1:2\n",
            &["--upstreams-file", ""],
            "line 1",
        ),
        (
            "https://127.0.0.1:1\n",
            &["--upstreams-file", ""],
            "only http://",
        ),
        ("", &["--upstreams-file", "MISSING"], "MISSING"),
        ("", &["--upstream", "http://127.0.0.1:1/base"], "path"),
        (
            "",
            &["--upstream", "http://127.0.0.1:1", "--health-interval", "1"],
            "needs --health-path",
        ),
    ];
    for (text, extra, says) in cases {
        std::fs::write(&file, text).unwrap();
        let extra: Vec<String> = extra
            .iter()
            .map(|a| match *a {
                "" => file.to_str().unwrap().to_string(),
                "MISSING" => missing.to_str().unwrap().to_string(),
                a => a.to_string(),
            })
            .collect();
        let out = Command::new(common::example("http_proxy"))
            .args(["--listen", "127.0.0.1:0"])
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let says = says.replace("MISSING", missing.to_str().unwrap());
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(&says) && stderr.contains("usage:"),
            "{extra:?}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    let out = Command::new(common::example("http_proxy"))
        .args(["--listen", "127.0.0.1:0", "--health-interval", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A FIFO is refused before it is opened (opening one blocks until a
    // writer comes).
    let fifo = tempfile_path("fifo-upstreams");
    let _ = std::fs::remove_file(&fifo);
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new(common::example("http_proxy"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
        ])
        .arg("--upstreams-file")
        .arg(&fifo)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    let _ = std::fs::remove_file(&fifo);
    let _ = std::fs::remove_file(&file);
}

/// A path in the temp dir, unique to this process and `what`.
fn tempfile_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("http-proxy-{what}-{}", std::process::id()))
}
