//! Serving a listener with hyper (HTTP/1 and HTTP/2) under deadlines: a
//! client that does not finish its request head within the header timeout
//! is disconnected (no slowloris holding connections and tasks forever),
//! HTTP/2 connections are pinged, and an accept error (out of file
//! descriptors) pauses the loop instead of spinning on it.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

/// How long the loop pauses after a failed accept.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The HTTP/2 connection preface: what a client speaking HTTP/2 with prior
/// knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accepts and serves connections until the process ends (or `listener`
/// fails for good, which it does not).
pub async fn serve<S, B>(listener: TcpListener, service: S, header_timeout: Duration, what: &str)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let mut failing = false;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                failing = false;
                accepted
            }
            Err(e) => {
                // EMFILE and friends: accepting again at once fails again
                // at once. Said once per run of failures.
                if !failing {
                    eprintln!("http_proxy: {what}: accept failed: {e}; pausing");
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        // The origin learns who asked: the peer's address appended to
        // `X-Forwarded-For` (a client's own value stays in front of it).
        let forwarded = forwarded_for(peer.ip());
        let svc =
            tower::util::MapRequest::new(service.clone(), move |mut req: Request<Incoming>| {
                // Hop-by-hop fields go first: `Connection: x-forwarded-for`
                // would otherwise remove the address appended here.
                tower_scale::balance::strip_hop_by_hop(req.headers_mut());
                append_forwarded_for(req.headers_mut(), &forwarded);
                req
            });
        let (builder, svc) = (builder.clone(), TowerToHyperService::new(svc));
        tokio::spawn(async move {
            // hyper reads the first bytes (HTTP/1 or HTTP/2?) before any of
            // its timers run: bound that too.
            if !speaks(&stream, header_timeout).await {
                return;
            }
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                eprintln!("connection error: {e}");
            }
        });
    }
}

/// Whether the client sent, within `within`, enough to tell HTTP/1 from
/// HTTP/2 (a byte off the HTTP/2 preface, or all of it). False when it
/// sent nothing, or only a prefix of the preface, in time, or closed.
async fn speaks(stream: &TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    let told = async {
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if n == buf.len() || buf[..n] != H2_PREFACE[..n] {
                return Some(());
            }
            // A prefix of the preface: `peek` would return it again at
            // once, so wait a little for the rest.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    matches!(tokio::time::timeout(within, told).await, Ok(Some(())))
}

/// The peer's address as an `X-Forwarded-For` element.
fn forwarded_for(ip: std::net::IpAddr) -> HeaderValue {
    // An IP address is always a valid field value.
    HeaderValue::from_str(&ip.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends `peer` to the request's `X-Forwarded-For` (RFC 7239 §4's
/// de facto predecessor): one field, the client's elements first.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue) {
    let before: Vec<&[u8]> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if before.is_empty() {
        headers.insert(X_FORWARDED_FOR, peer.clone());
        return;
    }
    let mut joined = before.join(&b", "[..]);
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(peer.as_bytes());
    // The parts were valid values and ", " is: so is the whole.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}
