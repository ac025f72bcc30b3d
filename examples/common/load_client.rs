//! The load generator of `examples/load.rs`: N keep-alive HTTP/1.1
//! connections (hyper's client `conn::http1`, one task each, on a
//! current-thread runtime), each a loop of request → whole response →
//! next request until the deadline. Every request has a timeout; every
//! answer is checked (status, and who served it).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, COOKIE, HOST, HeaderValue, SET_COOKIE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

/// A request that takes longer than this counts as a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The hot ids the cached GET and the mixed scenario read.
pub const HOT_IDS: std::ops::Range<i64> = 1000..1064;
/// The ids the PUT scenario writes, in turn.
pub const PUT_IDS: std::ops::Range<i64> = 2000..3000;
/// Ids the uncached GET reads, each once: `first..=last_seeded`.
pub const UNCACHED_FIRST: i64 = 10_000;

/// The name every seeded user has (same length for every id below 10^6).
pub fn name_of(id: i64) -> String {
    format!("user {id:06}")
}

/// What one scenario sends and expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The bare axum router returning the static body.
    Ceiling,
    /// `GET /users/{id}` over [`HOT_IDS`], all in the users cache.
    CachedGet,
    /// `GET /users/{id}`, every id once: each a replica read.
    UncachedGet,
    /// `PUT /users/{id}` on the primary.
    Put,
    /// 90% GET of the hot ids, 10% PUT of them, each connection a client
    /// that keeps its token cookie.
    Mixed,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 5] = [
        Scenario::Ceiling,
        Scenario::CachedGet,
        Scenario::UncachedGet,
        Scenario::Put,
        Scenario::Mixed,
    ];

    /// The name in the table and the chart.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::CachedGet => "cached GET",
            Scenario::UncachedGet => "uncached GET",
            Scenario::Put => "PUT",
            Scenario::Mixed => "mixed 90/10 + tokens",
        }
    }
}

/// Shared between the connections of one run.
pub struct Plan {
    pub scenario: Scenario,
    pub addr: SocketAddr,
    pub deadline: Instant,
    /// The next id of the uncached GET.
    pub next_uncached: AtomicI64,
    /// The last seeded id: the uncached GET must not run past it.
    pub last_seeded: i64,
    /// Set on Ctrl-C: every loop stops.
    pub stop: Arc<AtomicBool>,
}

/// What one connection (or, merged, one scenario) saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Latency of each answered request, in microseconds.
    pub latencies_us: Vec<u32>,
    pub ok: u64,
    /// Answers with a status the scenario does not expect, by status.
    pub wrong_status: Vec<(u16, u64)>,
    pub timeouts: u64,
    pub errors: u64,
    /// `x-served-by` values and their counts.
    pub served_by: Vec<(Bytes, u64)>,
    /// The uncached GET ran out of seeded ids.
    pub exhausted: bool,
    /// The last transport error, for the message.
    pub last_error: Option<String>,
}

impl Tally {
    /// Adds another tally's counts to this one.
    pub fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.ok += other.ok;
        for (s, n) in other.wrong_status {
            add(&mut self.wrong_status, s, n);
        }
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        for (by, n) in other.served_by {
            add(&mut self.served_by, by, n);
        }
        self.exhausted |= other.exhausted;
        if other.last_error.is_some() {
            self.last_error = other.last_error;
        }
    }

    /// Requests that did not get the expected answer.
    pub fn failures(&self) -> u64 {
        self.wrong_status.iter().map(|(_, n)| n).sum::<u64>() + self.timeouts + self.errors
    }

    fn served(&mut self, by: Option<&HeaderValue>) {
        let by = by.map_or(&b"-"[..], HeaderValue::as_bytes);
        match self.served_by.iter_mut().find(|(b, _)| b == by) {
            Some((_, n)) => *n += 1,
            None => self.served_by.push((Bytes::copy_from_slice(by), 1)),
        }
    }
}

fn add<K: PartialEq>(list: &mut Vec<(K, u64)>, key: K, n: u64) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, c)) => *c += n,
        None => list.push((key, n)),
    }
}

/// One client connection's loop until the plan's deadline.
pub async fn connection(plan: Arc<Plan>, index: usize) -> Tally {
    let mut tally = Tally::default();
    let host = HeaderValue::from_str(&plan.addr.to_string()).expect("an address is a header value");
    let hot: Vec<Uri> = HOT_IDS
        .map(|id| format!("/users/{id}").parse().expect("a path"))
        .collect();
    let mut cookie: Option<HeaderValue> = None;
    let mut n: usize = index.wrapping_mul(7);
    let mut sender = None;
    while Instant::now() < plan.deadline && !plan.stop.load(Ordering::Relaxed) {
        if sender.is_none() {
            match tokio::time::timeout(REQUEST_TIMEOUT, connect(plan.addr)).await {
                Ok(Ok(s)) => sender = Some(s),
                Ok(Err(e)) => {
                    tally.errors += 1;
                    tally.last_error = Some(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => {
                    tally.timeouts += 1;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        n = n.wrapping_add(1);
        let (req, expect_cache) = match request(&plan, &hot, n, cookie.as_ref()) {
            Some(r) => r,
            None => {
                tally.exhausted = true;
                break;
            }
        };
        let mut req = req;
        req.headers_mut().insert(HOST, host.clone());
        let started = Instant::now();
        let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
            s.ready().await?;
            let res = s.send_request(req).await?;
            let (parts, body) = res.into_parts();
            body.collect().await?;
            Ok::<_, hyper::Error>(parts)
        })
        .await;
        let parts = match sent {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                tally.errors += 1;
                tally.last_error = Some(e.to_string());
                sender = None;
                continue;
            }
            Err(_) => {
                tally.timeouts += 1;
                sender = None;
                continue;
            }
        };
        let us = started.elapsed().as_micros();
        tally
            .latencies_us
            .push(u32::try_from(us).unwrap_or(u32::MAX));
        if parts.status != StatusCode::OK {
            add(&mut tally.wrong_status, parts.status.as_u16(), 1);
            continue;
        }
        tally.ok += 1;
        if plan.scenario != Scenario::Ceiling {
            let by = parts.headers.get("x-served-by");
            tally.served(by);
            if expect_cache == Some(false) && by.is_some_and(|b| b.as_bytes().starts_with(b"cache"))
            {
                // An uncached read the cache answered: a wrong answer.
                add(&mut tally.wrong_status, 0, 1);
            }
        }
        if plan.scenario == Scenario::Mixed
            && let Some(set) = parts.headers.get(SET_COOKIE)
            && let Some(pair) = set.as_bytes().split(|&b| b == b';').next()
        {
            cookie = HeaderValue::from_bytes(pair).ok();
        }
    }
    tally
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The `n`th request of a connection, and whether the cache must (not)
/// answer it; `None` when the uncached GET has no unread id left.
fn request(
    plan: &Plan,
    hot: &[Uri],
    n: usize,
    cookie: Option<&HeaderValue>,
) -> Option<(Request<Full<Bytes>>, Option<bool>)> {
    let hot_uri = || hot[n % hot.len()].clone();
    let get = |uri: Uri| {
        let mut r = Request::new(Full::new(Bytes::new()));
        *r.uri_mut() = uri;
        r
    };
    let put = |id: i64| {
        let body = format!(r#"{{"name":"{}"}}"#, name_of(id));
        let mut r = Request::new(Full::new(Bytes::from(body)));
        *r.method_mut() = Method::PUT;
        *r.uri_mut() = format!("/users/{id}").parse().expect("a path");
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    let req = match plan.scenario {
        Scenario::Ceiling | Scenario::CachedGet => (get(hot_uri()), None),
        Scenario::UncachedGet => {
            let id = plan.next_uncached.fetch_add(1, Ordering::Relaxed);
            if id > plan.last_seeded {
                return None;
            }
            let uri = format!("/users/{id}").parse().expect("a path");
            (get(uri), Some(false))
        }
        Scenario::Put => {
            let span = (PUT_IDS.end - PUT_IDS.start) as usize;
            (put(PUT_IDS.start + (n % span) as i64), None)
        }
        Scenario::Mixed => {
            // Spread the writes over the hot ids, one request in ten.
            let mut r = if n.is_multiple_of(10) {
                put(HOT_IDS.start + ((n / 10) % hot.len()) as i64)
            } else {
                get(hot_uri())
            };
            if let Some(c) = cookie {
                r.headers_mut().insert(COOKIE, c.clone());
            }
            (r, None)
        }
    };
    Some(req)
}
