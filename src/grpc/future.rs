//! [`ResponseFuture`]: the response future of
//! [`GrpcCache`](super::GrpcCache).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response, request};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower::{Layer, Service};

use super::GrpcBody;
use super::fetch::{Fetched, GrpcCall, GrpcFetch, Reply, rebuild};
use super::key::{GrpcKey, single_message};
use super::layer::{Core, GrpcConfig};
use crate::body::{Buffer, Buffered};
use crate::cache;
use crate::http::CacheBody;

/// The inner service's error type.
type ErrorOf<S, ReqBody> = <S as Service<Request<GrpcBody<ReqBody>>>>::Error;

/// The cache core's future for one call.
type CoreFuture<S, ReqBody, ResBody> = cache::ResponseFuture<
    GrpcFetch<S, ReqBody, ResBody>,
    GrpcCall<Reply<ResBody, ErrorOf<S, ReqBody>>>,
>;

/// What a cacheable call needs once its message is read.
struct Pending<S> {
    svc: S,
    config: Arc<GrpcConfig>,
    core: Core,
    path: Arc<str>,
    parts: request::Parts,
}

/// A cacheable call, kept until it has its answer: when the core's answer
/// was not for it (another caller's response that is not shared: too large
/// to buffer, a gRPC error, or an inner error), it asks the core once more
/// (so the callers in that position coalesce again, and a good answer is
/// stored), then calls the inner service itself.
struct Retry<S> {
    svc: S,
    config: Arc<GrpcConfig>,
    core: Core,
    key: GrpcKey,
    parts: request::Parts,
    /// Whether it may ask the core once more.
    again: bool,
}

pin_project! {
    /// The future [`GrpcCache`](super::GrpcCache) returns.
    ///
    /// A named state machine, no boxing at this level: a call that passes
    /// through waits for the inner service's readiness, then its response;
    /// a cacheable call reads its request message (up to the size limit),
    /// then asks the cache core, whose hits are ready at once. The core's
    /// own miss future is boxed inside [`cache::ResponseFuture`] (it
    /// awaits the single-flight group and the shared tier).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>,
        S: Clone,
        ReqBody: Body,
        ResBody: Body<Data = Bytes>,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>,
        S: Clone,
        ReqBody: Body,
        ResBody: Body<Data = Bytes>,
    {
        // Passing through: waiting for the inner service's readiness.
        Ready {
            svc: S,
            req: Option<Request<GrpcBody<ReqBody>>>,
        },
        // Passing through: the inner call, its body streamed back.
        Calling {
            #[pin]
            fut: S::Future,
        },
        // Reading the request message.
        Buffering {
            buffer: Buffer<ReqBody>,
            pending: Option<Pending<S>>,
        },
        // In the cache core; `reply` gets this call's response if the core
        // cannot hold it.
        Cached {
            #[pin]
            fut: CoreFuture<S, ReqBody, ResBody>,
            reply: oneshot::Receiver<Result<Response<GrpcBody<ResBody>>, ErrorOf<S, ReqBody>>>,
            retry: Option<Retry<S>>,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body,
    ResBody: Body<Data = Bytes>,
{
    pub(crate) fn pass_through(svc: S, req: Request<GrpcBody<ReqBody>>) -> Self {
        Self {
            state: State::Ready {
                svc,
                req: Some(req),
            },
        }
    }

    pub(crate) fn buffering(
        svc: S,
        config: Arc<GrpcConfig>,
        core: Core,
        path: Arc<str>,
        parts: request::Parts,
        buffer: Buffer<ReqBody>,
    ) -> Self {
        Self {
            state: State::Buffering {
                buffer,
                pending: Some(Pending {
                    svc,
                    config,
                    core,
                    path,
                    parts,
                }),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Output = Result<Response<CacheBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Ready { svc, req } => {
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let Some(req) = req.take() else {
                        panic!("gRPC cache ResponseFuture polled after completion");
                    };
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let res = ready!(fut.poll(cx));
                    return Poll::Ready(res.map(|res| res.map(CacheBody::stream)));
                }
                StateProj::Buffering { buffer, pending } => {
                    let buffered = ready!(Pin::new(buffer).poll(cx));
                    let Some(pending) = pending.take() else {
                        panic!("gRPC cache ResponseFuture polled after completion");
                    };
                    let next = after_buffering(pending, buffered);
                    this.state.set(next);
                }
                StateProj::Cached { fut, reply, retry } => {
                    let fetched = ready!(fut.poll(cx));
                    if let (Ok(Fetched(Some(stored))), Some(retry)) = (&fetched, retry.as_ref()) {
                        if stored.serves(&retry.key) {
                            return Poll::Ready(Ok(stored.respond()));
                        }
                        // A value the shared tier held under this key but
                        // written for another call: never served; dropped
                        // here, from the tier and on every instance.
                        retry.core.invalidator().invalidate_key(&retry.key);
                    }
                    // Not held by the core: this call's own response (or
                    // error) if it made the call; otherwise its own call.
                    if let Ok(result) = reply.try_recv() {
                        return Poll::Ready(result);
                    }
                    let Some(mut retry) = retry.take() else {
                        panic!("gRPC cache ResponseFuture polled after completion");
                    };
                    let next = if retry.again {
                        retry.again = false;
                        ask_core(retry)
                    } else {
                        State::Ready {
                            req: Some(rebuild(retry.parts, retry.key.message().clone())),
                            svc: retry.svc,
                        }
                    };
                    this.state.set(next);
                }
            }
        }
    }
}

/// The state after the request body was read: the cache core's call for
/// one complete unary message, otherwise a pass-through of the body as it
/// came (a streaming or oversized body, one that failed, or one with
/// trailers).
fn after_buffering<S, ReqBody, ResBody>(
    pending: Pending<S>,
    buffered: Buffered<ReqBody>,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let Pending {
        svc,
        config,
        core,
        path,
        parts,
    } = pending;
    let body = match buffered {
        Buffered::Complete {
            data,
            trailers: None,
        } if single_message(&data) => {
            let key = GrpcKey::new(path, data, &parts.headers, config.key_names());
            return ask_core(Retry {
                svc,
                config,
                core,
                key,
                parts,
                again: true,
            });
        }
        Buffered::Complete { data, trailers } => CacheBody::full(data, trailers),
        Buffered::Partial {
            frames,
            rest,
            error,
        } => CacheBody::partial(frames, rest, error),
    };
    State::Ready {
        svc,
        req: Some(Request::from_parts(parts, body)),
    }
}

/// The cache core's call for a buffered message.
fn ask_core<S, ReqBody, ResBody>(retry: Retry<S>) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let (tx, rx) = oneshot::channel();
    let call = GrpcCall {
        key: retry.key.clone(),
        parts: retry.parts.clone(),
        reply: tx,
    };
    let fetch = GrpcFetch::new(retry.svc.clone(), retry.config.max_message());
    // The core is always ready (see `Cache`'s "Readiness"): no `poll_ready`
    // to wait for.
    let fut = retry.core.layer(fetch).call(call);
    State::Cached {
        fut,
        reply: rx,
        retry: Some(retry),
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body,
    ResBody: Body<Data = Bytes>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "Ready",
            State::Calling { .. } => "Calling",
            State::Buffering { .. } => "Buffering",
            State::Cached { .. } => "Cached",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
