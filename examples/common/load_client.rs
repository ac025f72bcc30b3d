//! The load generator of `examples/load.rs`: N keep-alive HTTP/1.1
//! connections (one task each, on a current-thread runtime), each a loop
//! of request → whole response → next request until the deadline, like
//! wrk. Every request has a timeout; every answer is checked (status, and
//! who served it).
//!
//! It writes pre-encoded requests and parses the response head in place
//! (status, `content-length`, `x-served-by`, `set-cookie`), with no
//! allocation per request. hyper's client (`conn::http1`) was the first
//! choice; measured here it spent as much CPU per request as the server
//! it drove (about 9 µs each on the ceiling), so on equal cores it could
//! not show the server's limit. This one spends 10-15% less than the
//! server on the ceiling (most of either side's cost is the kernel's
//! loopback TCP work), enough for the server to be the side that is 100%
//! busy; the report prints both sides' CPU and busy time so that stays
//! checked on every run.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    /// Answers to requests sent from here on are counted (before: warm-up).
    pub measure_from: Instant,
    /// No request is sent from here on.
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

    fn served(&mut self, by: Option<&[u8]>) {
        let by = by.unwrap_or(b"-");
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
    let host = plan.addr.to_string();
    // The hot reads, encoded once: a request is one write of these bytes.
    let hot: Vec<Vec<u8>> = HOT_IDS
        .map(|id| encode("GET", &format!("/users/{id}"), &host, None, None))
        .collect();
    let mut cookie: Option<Vec<u8>> = None;
    let mut n: usize = index.wrapping_mul(7);
    let mut conn: Option<Conn> = None;
    let mut scratch = Vec::with_capacity(256);
    while Instant::now() < plan.deadline && !plan.stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match tokio::time::timeout(REQUEST_TIMEOUT, Conn::open(plan.addr)).await {
                Ok(Ok(c)) => conn = Some(c),
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
        let Some(c) = conn.as_mut() else { continue };
        n = n.wrapping_add(1);
        let Some((req, expect_cache)) =
            request(&plan, &hot, &host, n, cookie.as_deref(), &mut scratch)
        else {
            tally.exhausted = true;
            break;
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, c.round_trip(req)).await;
        let answer = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tally.errors += 1;
                tally.last_error = Some(e.to_string());
                conn = None;
                continue;
            }
            Err(_) => {
                tally.timeouts += 1;
                conn = None;
                continue;
            }
        };
        if started < plan.measure_from {
            // Warm-up: checked, not counted.
            if answer.status != 200 {
                add(&mut tally.wrong_status, answer.status, 1);
            }
            c.consume(answer.length);
            continue;
        }
        let us = started.elapsed().as_micros();
        tally
            .latencies_us
            .push(u32::try_from(us).unwrap_or(u32::MAX));
        if answer.status != 200 {
            add(&mut tally.wrong_status, answer.status, 1);
            continue;
        }
        tally.ok += 1;
        if plan.scenario != Scenario::Ceiling {
            let by = c.header(answer.served_by);
            tally.served(by);
            if expect_cache == Some(false) && by.is_some_and(|b| b.starts_with(b"cache")) {
                // An uncached read the cache answered: a wrong answer.
                add(&mut tally.wrong_status, 0, 1);
            }
        }
        if plan.scenario == Scenario::Mixed
            && let Some(set) = c.header(answer.set_cookie)
            && let Some(pair) = set.split(|&b| b == b';').next()
        {
            cookie = Some(pair.to_vec());
        }
        c.consume(answer.length);
    }
    tally
}

/// An HTTP/1.1 request's bytes.
fn encode(
    method: &str,
    path: &str,
    host: &str,
    cookie: Option<&[u8]>,
    json: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_into(&mut out, method, path, host, cookie, json);
    out
}

fn encode_into(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    host: &str,
    cookie: Option<&[u8]>,
    json: Option<&str>,
) {
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(c) = cookie {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(body) = json {
        out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body.as_bytes());
    } else {
        out.extend_from_slice(b"\r\n");
    }
}

/// The `n`th request of a connection, and whether the cache must (not)
/// answer it; `None` when the uncached GET has no unread id left.
fn request<'a>(
    plan: &Plan,
    hot: &'a [Vec<u8>],
    host: &str,
    n: usize,
    cookie: Option<&[u8]>,
    scratch: &'a mut Vec<u8>,
) -> Option<(&'a [u8], Option<bool>)> {
    let put = |scratch: &mut Vec<u8>, id: i64, cookie: Option<&[u8]>| {
        let body = format!(r#"{{"name":"{}"}}"#, name_of(id));
        encode_into(
            scratch,
            "PUT",
            &format!("/users/{id}"),
            host,
            cookie,
            Some(&body),
        );
    };
    Some(match plan.scenario {
        Scenario::Ceiling | Scenario::CachedGet => (&hot[n % hot.len()][..], None),
        Scenario::UncachedGet => {
            let id = plan.next_uncached.fetch_add(1, Ordering::Relaxed);
            if id > plan.last_seeded {
                return None;
            }
            encode_into(scratch, "GET", &format!("/users/{id}"), host, None, None);
            (&scratch[..], Some(false))
        }
        Scenario::Put => {
            let span = (PUT_IDS.end - PUT_IDS.start) as usize;
            put(scratch, PUT_IDS.start + (n % span) as i64, None);
            (&scratch[..], None)
        }
        Scenario::Mixed => {
            // One request in ten writes, spread over the hot ids.
            let id = HOT_IDS.start + ((n / 10) % hot.len()) as i64;
            if n.is_multiple_of(10) {
                put(scratch, id, cookie);
            } else {
                let id = HOT_IDS.start + (n % hot.len()) as i64;
                encode_into(scratch, "GET", &format!("/users/{id}"), host, cookie, None);
            }
            (&scratch[..], None)
        }
    })
}

/// Where a header's value lies in the connection's buffer.
type Span = Option<(usize, usize)>;

/// A response's head, parsed in place.
struct Answer {
    status: u16,
    /// Head and body: consumed once the answer has been looked at.
    length: usize,
    served_by: Span,
    set_cookie: Span,
}

/// A keep-alive HTTP/1.1 connection: one request written, one response
/// read (head parsed in place, body skipped by `content-length`), no
/// allocation per request once the buffer has grown.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(Self {
            tcp,
            buf: vec![0; 16 * 1024],
            filled: 0,
        })
    }

    fn header(&self, span: Span) -> Option<&[u8]> {
        span.map(|(a, b)| &self.buf[a..b])
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.filled == self.buf.len() {
            if self.buf.len() >= 1 << 20 {
                return Err(std::io::Error::other("response over 1 MiB"));
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.tcp.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.filled += n;
        Ok(())
    }

    async fn round_trip(&mut self, req: &[u8]) -> std::io::Result<Answer> {
        self.tcp.write_all(req).await?;
        let head = loop {
            if let Some(end) = self.buf[..self.filled]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break end + 4;
            }
            self.fill().await?;
        };
        let mut answer = parse_head(&self.buf[..head])?;
        answer.length += head;
        while self.filled < answer.length {
            self.fill().await?;
        }
        Ok(answer)
    }
}

/// Status, body length and the two headers the scenarios look at; `length`
/// is the body's (every answer of these servers has `content-length`).
fn parse_head(head: &[u8]) -> std::io::Result<Answer> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let status = head
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .filter(|_| head.starts_with(b"HTTP/1.1 "))
        .ok_or_else(|| bad("not an HTTP/1.1 status line"))?;
    let mut answer = Answer {
        status,
        length: 0,
        served_by: None,
        set_cookie: None,
    };
    let mut length = None;
    let mut at = head
        .iter()
        .position(|&b| b == b'\n')
        .map_or(head.len(), |i| i + 1);
    while at < head.len() {
        let end = head[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head.len(), |i| at + i + 1);
        let line = &head[at..end];
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = &line[..colon];
            let mut a = at + colon + 1;
            let mut b = end;
            while a < b && head[a] == b' ' {
                a += 1;
            }
            while b > a && matches!(head[b - 1], b'\r' | b'\n' | b' ') {
                b -= 1;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                length = std::str::from_utf8(&head[a..b])
                    .ok()
                    .and_then(|v| v.parse().ok());
            } else if name.eq_ignore_ascii_case(b"x-served-by") {
                answer.served_by = Some((a, b));
            } else if name.eq_ignore_ascii_case(b"set-cookie") {
                answer.set_cookie = Some((a, b));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                return Err(bad(
                    "a chunked answer (this client reads content-length only)",
                ));
            }
        }
        at = end;
    }
    answer.length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) => 0,
        (None, _) => return Err(bad("an answer without content-length")),
    };
    Ok(answer)
}
