//! [`Balancer`]: the HTTP-facing service. Each request's own task has the
//! shared p2c [`Balance`](tower::balance::p2c::Balance) pick an upstream
//! (see [`Picker`](super::pick::Picker): no hop to a worker task), sends
//! it there, awaits the answer, and sends it once more to another upstream
//! when the retry rule allows.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::Service;
use tower::balance::p2c::Balance;

use super::body::{RequestBody, ResponseBody};
use super::config::Settings;
use super::discover::Discovered;
use super::endpoint::{Attempt, Chosen, Client, Failure};
use super::ewma::PickClock;
use super::pick::{Picked, Picker, Waited};
use super::probe;
use super::request::{Outcome, head_size, idempotent, may_retry, strip_hop_by_hop};
use super::stats::FailureKind;
use super::upstreams::Upstreams;
use crate::http::UpstreamUnreachable;
use crate::random::Random;

type UpstreamRequest<B> = Request<RequestBody<B>>;

/// Spreads requests over [`Upstreams`] with `tower::balance::p2c` over
/// peak-EWMA load, ejecting upstreams that fail and retrying what may be
/// retried (see the [module docs](super)).
///
/// HTTP-facing: its error is [`Infallible`]; a failure is a response. A
/// 502 marked [`UpstreamUnreachable`] when the upstream could not be
/// reached (refused, reset, no response head within the upstream timeout)
/// or every upstream is out of rotation, so that an HTTP cache in front
/// may serve a stale response; an unmarked 502 for an answer that was not
/// HTTP; a 503 when no upstream is configured; a 501 for `CONNECT`; a 431 for a
/// request head over [`max_request_head`](super::BalancerBuilder::max_request_head);
/// a 408 when the upstream timeout passed while the client was still
/// sending the body (not counted against the upstream); a 400 when the
/// request's own body failed while it was sent.
///
/// Cloning is cheap and shares everything (the upstream set, their
/// health, the connection pool); the background tasks stop when the last
/// clone is dropped.
pub struct Balancer<B = Incoming> {
    picker: Arc<Picker<B>>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    upstreams: Upstreams,
    settings: Arc<Settings>,
    /// Stops the health checks when the last clone goes.
    _stop: DropGuard,
}

impl<B> Clone for Balancer<B> {
    fn clone(&self) -> Self {
        Self {
            picker: Arc::clone(&self.picker),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> fmt::Debug for Balancer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("upstreams", &self.shared.upstreams.list())
            .field("upstream_timeout", &self.shared.settings.upstream_timeout)
            .finish_non_exhaustive()
    }
}

/// p2c's randomness from the balancer's seeded stream.
struct P2cRng(Arc<Random>);

impl tower::util::rng::Rng for P2cRng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

impl<B> Balancer<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(crate) fn start(
        upstreams: Upstreams,
        changes: tokio::sync::mpsc::UnboundedReceiver<super::upstreams::SetChange>,
        client: Client<B>,
        settings: Arc<Settings>,
    ) -> Self {
        let clock = Arc::new(PickClock::new());
        let discover = Discovered::new(
            changes,
            client.clone(),
            Arc::clone(&settings),
            Arc::clone(&clock),
        );
        let p2c = Balance::from_rng(discover, P2cRng(Arc::clone(&settings.random)));
        let picker = Arc::new(Picker::new(p2c, clock, client, Arc::clone(&settings)));
        let stop = CancellationToken::new();
        if let Some(path) = settings.health_path.clone() {
            tokio::spawn(probe::run(
                upstreams.clone(),
                Arc::clone(&settings),
                path,
                stop.clone(),
            ));
        }
        Self {
            picker,
            shared: Arc::new(Shared {
                upstreams,
                settings,
                _stop: stop.drop_guard(),
            }),
        }
    }
}

impl<B> Balancer<B> {
    /// The upstream set this balancer follows.
    pub fn upstreams(&self) -> &Upstreams {
        &self.shared.upstreams
    }
}

impl<B> Service<Request<B>> for Balancer<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    /// Always ready: the wait for an upstream happens in the response
    /// future, bounded by the upstream timeout.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        ResponseFuture {
            inner: forward(Arc::clone(&self.picker), Arc::clone(&self.shared), req),
        }
    }
}

/// The response future of [`Balancer`]. Boxed: the balancer's whole path
/// is a network round trip, where one allocation does not show.
pub struct ResponseFuture {
    inner: Answer,
}

type Answer = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx).map(Ok)
    }
}

/// A response the balancer makes itself.
fn own(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::own(text));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The answer when every configured upstream is out of rotation: as
/// unreachable as one that refused (a 502 marked [`UpstreamUnreachable`],
/// so that a cache in front may serve stale), answered at once.
fn none_in_rotation(text: &'static str) -> Response<ResponseBody> {
    let mut res = own(StatusCode::BAD_GATEWAY, text);
    res.extensions_mut().insert(UpstreamUnreachable);
    res
}

/// The answer to a request that failed for good.
fn failed(outcome: Outcome) -> Response<ResponseBody> {
    match outcome {
        Outcome::Upstream(FailureKind::Protocol) => {
            own(StatusCode::BAD_GATEWAY, "bad response from upstream\n")
        }
        Outcome::Upstream(_) => {
            let mut res = own(StatusCode::BAD_GATEWAY, "upstream unreachable\n");
            res.extensions_mut().insert(UpstreamUnreachable);
            res
        }
        Outcome::Request => own(StatusCode::BAD_REQUEST, "the request body failed\n"),
        Outcome::ClosedDuringUpload => own(
            StatusCode::BAD_GATEWAY,
            "the upstream closed the connection before the request body was sent\n",
        ),
        Outcome::SlowClient => own(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive within the upstream timeout\n",
        ),
    }
}

/// What is kept of the request to send it again.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Head {
    fn request<B>(&self, body: RequestBody<B>) -> UpstreamRequest<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        // The upstream connection is HTTP/1.1 whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
        req
    }
}

/// What needs no upstream is answered here; the rest is [`send`]'s, whose
/// future does not hold the request as it came (an async fn keeps its
/// arguments for its whole life): 1,232 bytes with it, too large for the
/// allocator's per-thread cache, a slow `malloc` and `free` per request.
fn forward<B>(picker: Arc<Picker<B>>, shared: Arc<Shared>, req: Request<B>) -> Answer
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let answer = |res| -> Answer { Box::pin(std::future::ready(res)) };
    if req.method() == Method::CONNECT {
        return answer(own(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported\n",
        ));
    }
    if head_size(req.uri(), req.headers()) > shared.settings.max_request_head {
        return answer(own(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large\n",
        ));
    }
    let (parts, body) = req.into_parts();
    let mut head = Head {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
    };
    strip_hop_by_hop(&mut head.headers);
    // An HTTP/2 (or absolute-form) request carries its authority in the
    // target, not in `Host`: keep it for the origin, whose address replaces
    // the target's (the cache keyed the answer on this authority).
    if !head.headers.contains_key(http::header::HOST)
        && let Some(authority) = head.uri.authority()
        && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
    {
        head.headers.insert(http::header::HOST, host);
    }
    Box::pin(send(picker, shared, head, body))
}

/// No upstream was ready: waits (at most the upstream timeout) for one,
/// looking at the set again at every change. When no upstream takes
/// requests (each ejected, or being probed), a request (`may_panic`: not
/// a retry) probes the one whose back-off ends first at once if none is
/// being probed (panic mode: with a single upstream, one failure would
/// otherwise answer 502 for the whole back-off); the others are answered
/// at once (a 502 marked unreachable), never kept waiting for a probe.
/// `Err`: the answer to give (unless an earlier attempt's failure says
/// more).
async fn wait_for_one<B>(
    picker: &Picker<B>,
    shared: &Shared,
    may_panic: bool,
) -> Result<Chosen<B>, Response<ResponseBody>>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let deadline = tokio::time::Instant::now() + shared.settings.upstream_timeout;
    loop {
        let (configured, usable) = shared.upstreams.usable();
        if !configured {
            return Err(own(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream configured\n",
            ));
        }
        if !usable {
            if may_panic && let Some((state, sent_under)) = shared.upstreams.panic_probe() {
                return Ok(picker.panic_probe(state, sent_under));
            }
            // A probe runs (an answer at once beats waiting for it: a
            // cache in front may serve stale), or one came back meanwhile.
            if !may_panic || !shared.upstreams.usable().1 {
                return Err(none_in_rotation("no upstream in rotation\n"));
            }
            continue;
        }
        match picker.pick_or_wait(deadline).await {
            Ok(chosen) => return Ok(chosen),
            Err(Waited::Changed) => {}
            Err(Waited::Timeout) => {
                return Err(none_in_rotation(
                    "no upstream became ready within the upstream timeout\n",
                ));
            }
            Err(Waited::Failed) => {
                return Err(own(StatusCode::SERVICE_UNAVAILABLE, "balancer stopped\n"));
            }
        }
    }
}

async fn send<B>(
    picker: Arc<Picker<B>>,
    shared: Arc<Shared>,
    head: Head,
    body: B,
) -> Response<ResponseBody>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let idempotent = idempotent(&head.method);
    let (mut body, mut back) = RequestBody::new(body);
    let mut last: Option<Failure> = None;
    for _attempt in 0..2 {
        // The common case first: an upstream is ready, nothing else to ask.
        let chosen = match picker.try_pick() {
            Picked::Chosen(chosen) => chosen,
            Picked::Failed => return own(StatusCode::SERVICE_UNAVAILABLE, "balancer stopped\n"),
            // Boxed: the rare path keeps the common one's future small.
            Picked::Pending => match Box::pin(wait_for_one(&picker, &shared, last.is_none())).await
            {
                Ok(chosen) => chosen,
                Err(why) => {
                    return match last {
                        Some(failure) => failed(failure.outcome),
                        None => why,
                    };
                }
            },
        };
        let attempt: Attempt = chosen.send(head.request(body)).await;
        let failure = match attempt {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(parts, ResponseBody::upstream(body));
            }
            Err(failure) => failure,
        };
        let Outcome::Upstream(kind) = failure.outcome else {
            return failed(failure.outcome);
        };
        // The body is back if nothing of it was read (an empty body never
        // left).
        let again = match back.take() {
            None => Some(RequestBody::empty()),
            Some(mut rx) => rx.try_recv().ok().map(|b| {
                let (body, rx) = RequestBody::new(b);
                back = rx;
                body
            }),
        };
        let first = last.is_none();
        match again {
            Some(again) if first && may_retry(kind, idempotent, true) => {
                failure.upstream.stats.retried();
                tracing::debug!(upstream = %failure.upstream.key, %kind, "retrying on another upstream");
                body = again;
                last = Some(failure);
            }
            // Not retried: the second failure, a rule that forbids it, or
            // a body that was read (`may_retry(kind, _, false)` is false).
            _ => return failed(failure.outcome),
        }
    }
    match last {
        Some(failure) => failed(failure.outcome),
        None => none_in_rotation("no upstream in rotation\n"),
    }
}
