//! The load balancer against real origin servers (axum over hyper) on
//! loopback ports: spreading, health (killed, restarted, black-holed
//! origins), upstreams changed at run time, hostile requests, metrics.
//! Conditions are polled with a deadline, never waited for with a sleep;
//! measured figures are printed (`cargo test ... -- --nocapture`).

mod dynamic;
mod faults;
mod hostile;
mod killable;
mod metrics;
mod panic;
mod spread;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use axum::routing::any;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_scale::balance::{Balancer, BalancerBuilder, UpstreamStatus, Upstreams};

/// The request body the tests send.
pub type Req = Full<Bytes>;

/// What an origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
pub struct OriginState {
    pub name: String,
    /// Requests other than health checks.
    pub hits: AtomicUsize,
    pub health_hits: AtomicUsize,
    /// Each answer waits this long first.
    pub delay_ms: AtomicU64,
    /// The health path answers 503.
    pub sick: AtomicBool,
    pub seen: Mutex<Vec<Seen>>,
}

async fn handle(State(o): State<Arc<OriginState>>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if parts.uri.path() == "/health" {
        o.health_hits.fetch_add(1, Ordering::SeqCst);
        let status = if o.sick.load(Ordering::SeqCst) {
            503
        } else {
            200
        };
        let mut res = Response::new(Body::from("health"));
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        return res;
    }
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    o.hits.fetch_add(1, Ordering::SeqCst);
    o.seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let delay = o.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut res = Response::new(Body::from(format!("{} {}", o.name, body.len())));
    let h = res.headers_mut();
    h.insert("x-origin", HeaderValue::from_str(&o.name).unwrap());
    // A hop-by-hop field the balancer must not pass on.
    h.insert("connection", HeaderValue::from_static("x-hop"));
    h.insert("x-hop", HeaderValue::from_static("1"));
    if parts.uri.path() == "/cached" {
        h.insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=60"),
        );
    }
    res
}

/// A real origin on a loopback port.
pub struct Origin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
    task: Option<JoinHandle<()>>,
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(OriginState {
            name: name.to_string(),
            ..OriginState::default()
        });
        let mut origin = Origin {
            addr: listener.local_addr().unwrap(),
            state,
            task: None,
        };
        origin.run(listener);
        origin
    }

    fn run(&mut self, listener: TcpListener) {
        let app = Router::new()
            .fallback(any(handle))
            .with_state(Arc::clone(&self.state));
        self.task = Some(tokio::spawn(killable::serve(listener, app)));
    }

    pub fn url(&self) -> Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Kills it: the listener and every connection closed. Returns once a
    /// connect is refused.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let addr = self.addr;
        eventually(
            "the killed origin refuses connections",
            Duration::from_secs(5),
            || async move { TcpStream::connect(addr).await.is_err() },
        )
        .await;
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        let addr = self.addr;
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        self.run(listener);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A black hole: accepts connections, never reads, never answers.
pub struct BlackHole {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        BlackHole {
            addr,
            accepted,
            task,
        }
    }

    pub fn url(&self) -> Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address nothing listens on (bound, then released).
pub async fn refusing_url() -> Uri {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}").parse().unwrap()
}

/// Polls `check` until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Test settings: short timeouts and back-offs, a fixed seed.
pub fn builder() -> BalancerBuilder {
    Balancer::builder()
        .upstream_timeout(Duration::from_secs(5))
        .ejection_base(Duration::from_millis(200))
        .ejection_max(Duration::from_secs(2))
        .slow_start(Duration::ZERO)
        .seed(7)
}

pub fn upstreams(urls: impl IntoIterator<Item = Uri>) -> Upstreams {
    let u = Upstreams::new();
    for url in urls {
        u.add(url).unwrap();
    }
    u
}

/// What one request through the balancer gave.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub origin: Option<String>,
    pub unreachable: bool,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub took: Duration,
}

pub async fn send(balancer: &Balancer<Req>, req: Request<Req>) -> Answer {
    let started = Instant::now();
    let res = balancer.clone().oneshot(req).await.unwrap();
    let unreachable = res
        .extensions()
        .get::<tower_scale::http::UpstreamUnreachable>()
        .is_some();
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        origin: parts
            .headers
            .get("x-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        unreachable,
        headers: parts.headers,
        body,
        took: started.elapsed(),
    }
}

pub fn get(path: &str) -> Request<Req> {
    Request::get(path).body(Full::default()).unwrap()
}

pub fn post(path: &str, body: &'static [u8]) -> Request<Req> {
    Request::post(path)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

/// Runs `workers` concurrent clients sending GETs until `total` requests
/// were sent (or `stop` is set); returns the answers.
pub async fn load(
    balancer: &Balancer<Req>,
    workers: usize,
    total: usize,
    stop: Option<Arc<AtomicBool>>,
) -> Vec<Answer> {
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (balancer, sent, stop) = (balancer.clone(), Arc::clone(&sent), stop.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            while sent.fetch_add(1, Ordering::SeqCst) < total
                && !stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
            {
                answers.push(send(&balancer, get("/load")).await);
            }
            answers
        });
    }
    let mut all = Vec::new();
    while let Some(answers) = tasks.join_next().await {
        all.extend(answers.unwrap());
    }
    all
}

/// Answers per origin name.
pub fn by_origin(answers: &[Answer]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for a in answers {
        *counts
            .entry(a.origin.clone().unwrap_or_else(|| a.status.to_string()))
            .or_insert(0) += 1;
    }
    counts
}

pub fn status_of(upstreams: &Upstreams, url: &Uri) -> UpstreamStatus {
    upstreams
        .status()
        .into_iter()
        .find(|s| s.url.authority() == url.authority())
        .unwrap_or_else(|| panic!("{url} not in {:?}", upstreams.list()))
}

/// `balancer` is a `Service` whose readiness is always immediate.
pub async fn call(
    balancer: &mut Balancer<Req>,
    req: Request<Req>,
) -> Response<tower_scale::balance::ResponseBody> {
    balancer.ready().await.unwrap().call(req).await.unwrap()
}
