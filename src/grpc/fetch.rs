//! The upstream call of a cacheable request, as the cache core sees it: a
//! [`GrpcCall`] in, a [`Fetched`] out (free of the body types, so the core's
//! store is too), and the [`GrpcPolicy`] that decides what is stored.
//!
//! Only a storable response is shared (a [`Fetched`] holding it). Any
//! other answer goes to the caller whose call it was, through that call's
//! [`Reply`] channel: a response too large to buffer, a gRPC error, or the
//! inner service's error. An error may be down to that caller alone (its
//! `grpc-timeout`, say, or other metadata not in the key), so it is not
//! handed to the callers coalesced with it. The core then sees an empty
//! [`Fetched`] or [`FetchFailed`], stores nothing, and each coalesced
//! caller makes its own call.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{HeaderMap, Request, Response, StatusCode, Version, request, response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower::Service;

use super::GrpcBody;
use super::key::{GrpcKey, single_message};
use super::layer::GrpcConfig;
use crate::body::{Buffer, Buffered, buffer};
use crate::cache::{CachePolicy, Storable, Windows};
use crate::http::CacheBody;

/// Added to each entry's weight for what its sizes do not count.
const ENTRY_OVERHEAD: usize = 256;

/// A complete unary response, buffered.
#[derive(Debug)]
pub(crate) struct StoredGrpc {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
    /// The key of the call it answers (the shared tier's codec writes it
    /// with the response).
    pub(crate) key: GrpcKey,
    /// Read from the shared tier: served only for a call with this key
    /// (see [`serves`](Self::serves)).
    from_tier: bool,
    /// What the store counts it as: key and response bytes.
    weight: u32,
}

impl StoredGrpc {
    /// A response to the call with `key`; `from_tier` when it was read
    /// from the shared tier.
    pub(crate) fn new(
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
        key: GrpcKey,
        from_tier: bool,
    ) -> Self {
        let size = key
            .size()
            .saturating_add(header_bytes(&headers))
            .saturating_add(body.len())
            .saturating_add(trailers.as_ref().map_or(0, header_bytes))
            .saturating_add(ENTRY_OVERHEAD);
        Self {
            status,
            version,
            headers,
            body,
            trailers,
            key,
            from_tier,
            weight: u32::try_from(size).unwrap_or(u32::MAX),
        }
    }

    /// Whether this response may answer the call with `key`: always for
    /// one this instance fetched (the store found it under that key); for
    /// one from the shared tier, only if the key it was written with is
    /// `key` (a value that Redis holds under another key than its own is
    /// never served).
    #[inline]
    pub(crate) fn serves(&self, key: &GrpcKey) -> bool {
        !self.from_tier || self.key == *key
    }

    /// The `grpc-status` of the response: from the trailers if it has any;
    /// from the headers only for a trailers-only response (no message).
    /// A message without trailers (a cut stream) has none.
    fn grpc_status(&self) -> Option<i32> {
        let source = match &self.trailers {
            Some(trailers) => trailers,
            None if self.body.is_empty() => &self.headers,
            None => return None,
        };
        source.get("grpc-status")?.to_str().ok()?.parse().ok()
    }

    /// Whether the response may be stored: HTTP 200, `grpc-status: 0`,
    /// and exactly one well-framed message.
    pub(crate) fn storable(&self) -> bool {
        self.status == StatusCode::OK && self.grpc_status() == Some(0) && single_message(&self.body)
    }

    /// The response, for one caller.
    pub(crate) fn respond<B: Body>(&self) -> Response<CacheBody<B>> {
        let mut res = Response::new(CacheBody::full(self.body.clone(), self.trailers.clone()));
        *res.status_mut() = self.status;
        *res.version_mut() = self.version;
        *res.headers_mut() = self.headers.clone();
        res
    }

    /// The answer to the caller whose response body failed part way:
    /// `UNAVAILABLE` (retryable), never stored.
    fn unavailable(version: Version, key: GrpcKey) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("upstream body failed"),
        );
        Self {
            status: StatusCode::OK,
            version,
            headers,
            body: Bytes::new(),
            trailers: None,
            key,
            from_tier: false,
            weight: 1,
        }
    }
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// What one upstream call of the gRPC cache gave: the value type of its
/// store and of its shared tier (`RedisTier<GrpcKey, Fetched>`, encoded by
/// [`GrpcCacheLayer::redis_codec`](super::GrpcCacheLayer::redis_codec)).
///
/// Opaque: a complete unary response that may be stored (HTTP 200,
/// `grpc-status: 0`, one message) and shared with coalesced callers, or
/// nothing, when the response (too large to buffer, or not storable) went
/// to the caller that made the call only.
#[derive(Debug, Clone)]
pub struct Fetched(pub(crate) Option<Arc<StoredGrpc>>);

impl Fetched {
    /// The answer nobody else shares.
    pub(crate) const CALLER_ONLY: Self = Self(None);

    /// The weight of an entry for a byte-bounded store.
    pub(crate) fn weight(&self) -> u32 {
        self.0.as_ref().map_or(1, |stored| stored.weight)
    }
}

/// The inner service failed (or was not ready); its error went to the
/// caller that made the call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchFailed;

/// Where a call's unbuffered response, or its inner error, goes.
pub(crate) type Reply<ResBody, E> = oneshot::Sender<Result<Response<GrpcBody<ResBody>>, E>>;

/// One buffered call: the request type of the cache core.
pub(crate) struct GrpcCall<T> {
    pub(crate) key: GrpcKey,
    pub(crate) parts: request::Parts,
    pub(crate) reply: T,
}

impl<T> fmt::Debug for GrpcCall<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCall")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The request an inner service gets for a buffered message.
pub(crate) fn rebuild<B: Body>(parts: request::Parts, message: Bytes) -> Request<GrpcBody<B>> {
    Request::from_parts(parts, CacheBody::full(message, None))
}

/// The cache core's policy: the call's precomputed key; stored with the
/// method's TTL and tagged with its path when the [`Fetched`] holds a
/// response.
#[derive(Debug)]
pub(crate) struct GrpcPolicy {
    config: Arc<GrpcConfig>,
}

impl GrpcPolicy {
    pub(crate) fn new(config: Arc<GrpcConfig>) -> Self {
        Self { config }
    }
}

impl<T: Send + 'static> CachePolicy<GrpcCall<T>, Fetched> for GrpcPolicy {
    type Key = GrpcKey;

    fn key(&self, call: &GrpcCall<T>) -> Option<GrpcKey> {
        Some(call.key.clone())
    }

    fn storable(&self, key: &GrpcKey, fetched: &Fetched, _: &Windows) -> Option<Storable> {
        // Only storable responses are held (see `finish`).
        fetched.0.as_ref()?;
        let (ttl, tag) = self.config.method(key.path())?;
        Some(Storable::new(Windows::ttl(ttl)).tag(tag.clone()))
    }
}

/// Makes the upstream call of a buffered request and buffers the response.
pub(crate) struct GrpcFetch<S, ReqBody, ResBody> {
    inner: S,
    max_message: usize,
    _bodies: PhantomData<fn() -> (ReqBody, ResBody)>,
}

impl<S, ReqBody, ResBody> GrpcFetch<S, ReqBody, ResBody> {
    pub(crate) fn new(inner: S, max_message: usize) -> Self {
        Self {
            inner,
            max_message,
            _bodies: PhantomData,
        }
    }
}

impl<S: Clone, ReqBody, ResBody> Clone for GrpcFetch<S, ReqBody, ResBody> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.max_message)
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for GrpcFetch<S, ReqBody, ResBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcFetch").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<GrpcCall<Reply<ResBody, S::Error>>>
    for GrpcFetch<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body,
    ResBody: Body<Data = Bytes>,
{
    type Response = Fetched;
    type Error = FetchFailed;
    type Future = FetchFuture<S, ReqBody, ResBody>;

    /// Always ready: the inner service's readiness is awaited in the
    /// future, where its error can reach the caller.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), FetchFailed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: GrpcCall<Reply<ResBody, S::Error>>) -> Self::Future {
        let message = call.key.message().clone();
        FetchFuture {
            state: FetchState::Ready {
                svc: self.inner.clone(),
                req: Some(rebuild(call.parts, message)),
            },
            reply: Some(call.reply),
            max_message: self.max_message,
            key: Some(call.key),
        }
    }
}

pin_project! {
    /// The future of [`GrpcFetch`]: the inner service's readiness, its
    /// call, then buffering the response body.
    pub(crate) struct FetchFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>,
        ReqBody: Body,
        ResBody: Body,
    {
        #[pin]
        state: FetchState<S, ReqBody, ResBody>,
        reply: Option<Reply<ResBody, S::Error>>,
        max_message: usize,
        key: Option<GrpcKey>,
    }
}

pin_project! {
    #[project = FetchProj]
    enum FetchState<S, ReqBody, ResBody>
    where
        S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>,
        ReqBody: Body,
        ResBody: Body,
    {
        Ready {
            svc: S,
            req: Option<Request<GrpcBody<ReqBody>>>,
        },
        Calling {
            #[pin]
            fut: S::Future,
        },
        Buffering {
            buffer: Buffer<ResBody>,
            parts: Option<response::Parts>,
        },
    }
}

impl<S, ReqBody, ResBody> Future for FetchFuture<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Fetched, FetchFailed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                FetchProj::Ready { svc, req } => {
                    let ready = ready!(svc.poll_ready(cx));
                    let fut = match (ready, req.take()) {
                        (Ok(()), Some(req)) => svc.call(req),
                        (Err(e), _) => return Poll::Ready(fail(this.reply, Err(e))),
                        (Ok(()), None) => panic!("gRPC fetch polled after completion"),
                    };
                    this.state.set(FetchState::Calling { fut });
                }
                FetchProj::Calling { fut } => match ready!(fut.poll(cx)) {
                    Ok(res) => {
                        let (parts, body) = res.into_parts();
                        let buffer = buffer(body, *this.max_message);
                        this.state.set(FetchState::Buffering {
                            buffer,
                            parts: Some(parts),
                        });
                    }
                    Err(e) => return Poll::Ready(fail(this.reply, Err(e))),
                },
                FetchProj::Buffering { buffer, parts } => {
                    let buffered = ready!(Pin::new(buffer).poll(cx));
                    let (Some(parts), Some(key)) = (parts.take(), this.key.take()) else {
                        panic!("gRPC fetch polled after completion");
                    };
                    return Poll::Ready(finish(buffered, parts, key, this.reply));
                }
            }
        }
    }
}

/// Hands an inner error to the caller whose call it was.
fn fail<B: Body, E>(
    reply: &mut Option<Reply<B, E>>,
    result: Result<Response<GrpcBody<B>>, E>,
) -> Result<Fetched, FetchFailed> {
    send(reply, result);
    Err(FetchFailed)
}

/// What a buffered response gives the core: a storable response to share,
/// or (anything else) the response sent to its own caller.
fn finish<B: Body<Data = Bytes>, E>(
    buffered: Buffered<B>,
    parts: response::Parts,
    key: GrpcKey,
    reply: &mut Option<Reply<B, E>>,
) -> Result<Fetched, FetchFailed> {
    let stored = match buffered {
        Buffered::Complete { data, trailers } => StoredGrpc::new(
            parts.status,
            parts.version,
            parts.headers,
            data,
            trailers,
            key,
            false,
        ),
        Buffered::Partial { error: Some(_), .. } => StoredGrpc::unavailable(parts.version, key),
        Buffered::Partial {
            frames,
            rest,
            error: None,
        } => {
            // Too large to keep: the caller gets it unchanged.
            let body = CacheBody::partial(frames, rest, None);
            send(reply, Ok(Response::from_parts(parts, body)));
            return Ok(Fetched::CALLER_ONLY);
        }
    };
    if stored.storable() {
        return Ok(Fetched(Some(Arc::new(stored))));
    }
    send(reply, Ok(stored.respond()));
    Ok(Fetched::CALLER_ONLY)
}

/// Sends the caller its own answer.
fn send<B: Body, E>(reply: &mut Option<Reply<B, E>>, result: Result<Response<GrpcBody<B>>, E>) {
    if let Some(reply) = reply.take() {
        // The caller may have gone: nobody to answer then.
        let _ = reply.send(result);
    }
}
