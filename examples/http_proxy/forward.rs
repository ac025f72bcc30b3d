//! Forwarding to the origin: hop-by-hop headers removed both ways, the
//! connection and the response head bounded by a timeout, and an
//! unreachable origin reported as a 502 marked [`UpstreamUnreachable`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;
use tower_scale::http::UpstreamUnreachable;

/// What the origin's responses carry.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

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
pub struct Forward {
    pub client: Client<HttpConnector, Incoming>,
    pub upstream: Uri,
    /// Bounds the connection and the response head (not the body).
    pub timeout: Duration,
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

pub fn error(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(message.as_bytes()))
        .map_err(|never: Infallible| match never {})
        .boxed();
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res
}
