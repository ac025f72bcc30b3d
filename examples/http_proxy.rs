//! A caching reverse proxy: the HTTP cache layer in front of a hyper client.
//!
//! ```text
//! cargo run --release --features full --example http_proxy -- \
//!     --listen 127.0.0.1:8010 --upstream http://127.0.0.1:8000
//! ```
//!
//! Every method, path, query, header and body is forwarded (hop-by-hop
//! headers removed both ways); responses the origin allows are stored and
//! hits are served from the cache, per RFC 9111.
//!
//! An unreachable upstream (connection refused or reset, closed before a
//! response, or no response head within `--upstream-timeout SECS`, default
//! 30) gives a 502 marked [`UpstreamUnreachable`]: the cache then serves a
//! stale stored response if the origin's directives allow it (a 504 if
//! they forbid it; RFC 9111 §4.2.4), else the client gets the 502. The
//! timeout bounds the connection and the response head; a body that
//! streams after the head is not bounded by it. Any other upstream failure
//! (an unreadable response) is an unmarked 502.
//!
//! When ready it prints `listening on http://IP:PORT` as the first line on
//! stdout; logs go to stderr. Bad flags print usage to stderr and exit
//! with status 2.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tower::{Service, ServiceBuilder};
use tower_scale::http::{HttpCacheLayer, UpstreamUnreachable};

const USAGE: &str = "usage: http_proxy --listen IP:PORT --upstream http://HOST:PORT \
     [--max-bytes N] [--max-body N] [--upstream-timeout SECS]";

type ProxyBody = BoxBody<Bytes, hyper::Error>;

struct Args {
    listen: SocketAddr,
    upstream: Uri,
    max_bytes: u64,
    max_body: usize,
    upstream_timeout: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut upstream) = (None, None);
    let (mut max_bytes, mut max_body) = (256u64 << 20, 1usize << 20);
    let mut upstream_timeout = Duration::from_secs(30);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                listen = Some(
                    value()?
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--listen: {e}"))?,
                )
            }
            "--upstream" => {
                let uri = value()?
                    .parse::<Uri>()
                    .map_err(|e| format!("--upstream: {e}"))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err("--upstream must be http://HOST:PORT".into());
                }
                upstream = Some(uri);
            }
            "--max-bytes" => {
                max_bytes = value()?.parse().map_err(|e| format!("--max-bytes: {e}"))?
            }
            "--max-body" => max_body = value()?.parse().map_err(|e| format!("--max-body: {e}"))?,
            "--upstream-timeout" => {
                let secs: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--upstream-timeout: {e}"))?;
                if secs == 0 {
                    return Err("--upstream-timeout must be at least 1 second".into());
                }
                upstream_timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        max_bytes,
        max_body,
        upstream_timeout,
    })
}

const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop fields, including those `Connection` names.
fn strip_hop_by_hop(headers: &mut header::HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter_map(|s| header::HeaderName::from_bytes(s.as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Whether a client error means the origin could not be reached: the
/// connection was refused (or failed), reset, or closed before a response.
/// Not an unreadable response or the client's own request body failing.
fn unreachable(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | UnexpectedEof
                    | NotConnected
                    | TimedOut
            );
        }
        source = err.source();
    }
    false
}

/// Forwards to the upstream; a transport failure becomes a 502, marked
/// [`UpstreamUnreachable`] when the origin could not be reached.
#[derive(Clone)]
struct Forward {
    client: Client<HttpConnector, Incoming>,
    upstream: Uri,
    /// Bounds the connection and the response head (not the body).
    timeout: Duration,
}

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let client = self.client.clone();
        let upstream = self.upstream.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            let target = format!(
                "{}://{}{path}",
                upstream.scheme_str().unwrap_or("http"),
                upstream.authority().map_or("", |a| a.as_str())
            );
            parts.uri = match target.parse() {
                Ok(uri) => uri,
                Err(_) => return Ok(error(StatusCode::BAD_REQUEST, "bad request target")),
            };
            strip_hop_by_hop(&mut parts.headers);
            let sent = client.request(Request::from_parts(parts, body));
            match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(res)) => {
                    let (mut parts, body) = res.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, body.boxed()))
                }
                Ok(Err(e)) if unreachable(&e) => {
                    eprintln!("upstream unreachable: {e}");
                    Ok(unreachable_502())
                }
                Ok(Err(e)) => {
                    eprintln!("upstream error: {e}");
                    Ok(error(StatusCode::BAD_GATEWAY, "bad response from upstream"))
                }
                Err(_) => {
                    eprintln!("upstream timeout: no response within {timeout:?}");
                    Ok(unreachable_502())
                }
            }
        })
    }
}

/// The 502 for an origin that could not be reached, marked so the cache
/// may serve a stale stored response instead.
fn unreachable_502() -> Response<ProxyBody> {
    let mut res = error(StatusCode::BAD_GATEWAY, "upstream unreachable");
    res.extensions_mut().insert(UpstreamUnreachable);
    res
}

fn error(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(message.as_bytes()))
        .map_err(|never: Infallible| match never {})
        .boxed();
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res
}

#[tokio::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("http_proxy: {message}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let layer = match HttpCacheLayer::builder()
        .max_bytes(args.max_bytes)
        .max_body(args.max_body)
        .build()
    {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("http_proxy: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let forward = Forward {
        client: Client::builder(TokioExecutor::new()).build_http(),
        upstream: args.upstream,
        timeout: args.upstream_timeout,
    };
    let service = ServiceBuilder::new().layer(layer).service(forward);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("http_proxy: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let svc = TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        eprintln!("connection error: {e}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
}
