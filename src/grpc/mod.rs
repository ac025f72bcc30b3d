//! Unary gRPC response caching (feature `grpc`), for tonic servers or any
//! `Service<http::Request<B>>` speaking gRPC over HTTP/2.
//!
//! - **Opt-in per method path** (`/package.Service/Method`), each with its
//!   TTL; every other path, and every streaming call, passes through.
//! - **Key**: the path, the request message bytes, and the values of the
//!   metadata keys you name ([`GrpcCacheLayerBuilder::key_metadata`]).
//! - Requests carrying `authorization` metadata bypass the cache, unless
//!   `authorization` is one of the key's metadata keys (then each caller's
//!   credentials get their own entries).
//! - A response is stored only when its `grpc-status` (in the trailers, or
//!   in the headers of a trailers-only response) is `0`: gRPC errors travel
//!   as HTTP 200. A hit returns the stored headers, message and trailers.
//! - Concurrent identical calls are coalesced (the cache core's
//!   single-flight); bodies over the size limit stream through untouched.
//!
//! ```
//! use std::time::Duration;
//! use tower_scale::grpc::GrpcCacheLayer;
//!
//! let layer = GrpcCacheLayer::builder()
//!     .method("/users.v1.Users/GetUser", Duration::from_secs(30))
//!     .key_metadata("x-tenant")
//!     .build()
//!     .unwrap();
//! // Server::builder().layer(layer).add_service(UsersServer::new(svc))
//! # let _ = layer;
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use tower::{Layer, Service, ServiceExt};

use crate::cache::{Cache, CacheLayer, CachePolicy, CacheStats, MokaStore, Storable, Windows};
use crate::error::ConfigError;
use crate::http::CacheBody;

/// The cache key of one unary call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrpcKey {
    path: Arc<str>,
    message: Bytes,
    metadata: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// A stored unary response.
#[derive(Debug)]
pub struct StoredGrpc {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
    grpc_status: Option<i32>,
}

/// The response of a call the cache could not hold, taken once by its caller.
pub type PassthroughSlot<ResBody, E> = Arc<Mutex<Option<Result<Response<CacheBody<ResBody>>, E>>>>;

type StatsSources = Arc<Mutex<Vec<Box<dyn Fn() -> CacheStats + Send + Sync>>>>;

/// What one upstream call gave: a complete response, or one the cache
/// could not hold (handed to the caller that made the call).
pub enum GrpcOutcome<ResBody: Body, E> {
    /// Buffered in full.
    Complete(Arc<StoredGrpc>),
    /// Too large, or failed: for the leader only.
    Passthrough(PassthroughSlot<ResBody, E>),
}

impl<ResBody: Body, E> Clone for GrpcOutcome<ResBody, E> {
    fn clone(&self) -> Self {
        match self {
            Self::Complete(s) => Self::Complete(Arc::clone(s)),
            Self::Passthrough(p) => Self::Passthrough(Arc::clone(p)),
        }
    }
}

impl<ResBody: Body, E> fmt::Debug for GrpcOutcome<ResBody, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Complete(s) => f.debug_tuple("Complete").field(s).finish(),
            Self::Passthrough(_) => f.write_str("Passthrough"),
        }
    }
}

/// One buffered call, the request type of the cache core underneath.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    uri: Uri,
    headers: HeaderMap,
    message: Bytes,
    key: GrpcKey,
}

/// The request body the inner service receives: the buffered message, or
/// the caller's body (after any prefix read while buffering). The same type
/// as the HTTP cache's response body.
pub type GrpcBody<B> = CacheBody<B>;

/// `prefix` (if any) followed by the rest of the caller's body.
fn replay<B: Body>(prefix: Bytes, rest: Pin<Box<B>>) -> GrpcBody<B> {
    let mut frames = std::collections::VecDeque::new();
    if !prefix.is_empty() {
        frames.push_back(Frame::data(prefix));
    }
    CacheBody::partial(frames, Some(rest), None)
}

#[derive(Debug)]
struct GrpcConfig {
    methods: HashMap<String, Duration>,
    key_metadata: Vec<HeaderName>,
    max_message: usize,
}

/// The cache core's policy for buffered calls: the precomputed key; stored
/// with the method's TTL when `grpc-status` is 0.
#[derive(Debug)]
pub struct GrpcPolicy {
    config: Arc<GrpcConfig>,
}

impl<ResBody, E> CachePolicy<GrpcCall, GrpcOutcome<ResBody, E>> for GrpcPolicy
where
    ResBody: Body + Send + 'static,
    E: Send + 'static,
{
    type Key = GrpcKey;

    fn key(&self, call: &GrpcCall) -> Option<GrpcKey> {
        Some(call.key.clone())
    }

    fn storable(
        &self,
        key: &GrpcKey,
        out: &GrpcOutcome<ResBody, E>,
        _: &Windows,
    ) -> Option<Storable> {
        let GrpcOutcome::Complete(stored) = out else {
            return None;
        };
        if stored.grpc_status != Some(0) || !stored.status.is_success() {
            return None;
        }
        let ttl = *self.config.methods.get(&*key.path)?;
        Some(Storable::new(Windows::ttl(ttl)))
    }
}

/// Makes the upstream call of a buffered request and buffers the response.
pub struct GrpcFetch<S, ReqBody, ResBody> {
    inner: S,
    max_message: usize,
    _bodies: std::marker::PhantomData<fn() -> (ReqBody, ResBody)>,
}

impl<S: Clone, ReqBody, ResBody> Clone for GrpcFetch<S, ReqBody, ResBody> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            max_message: self.max_message,
            _bodies: std::marker::PhantomData,
        }
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for GrpcFetch<S, ReqBody, ResBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GrpcFetch")
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn rebuild<B: Body>(call: &GrpcCall) -> Request<GrpcBody<B>> {
    let mut req = Request::new(CacheBody::full(call.message.clone(), None));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = call.uri.clone();
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = call.headers.clone();
    req
}

impl<S, ReqBody, ResBody> Service<GrpcCall> for GrpcFetch<S, ReqBody, ResBody>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + Sync + 'static,
    ReqBody: Body + Send + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = GrpcOutcome<ResBody, S::Error>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: GrpcCall) -> Self::Future {
        let svc = self.inner.clone();
        let limit = self.max_message;
        Box::pin(async move {
            let passthrough = |r| Ok(GrpcOutcome::Passthrough(Arc::new(Mutex::new(Some(r)))));
            let res = match svc.oneshot(rebuild(&call)).await {
                Ok(res) => res,
                Err(e) => return passthrough(Err(e)),
            };
            let (parts, body) = res.into_parts();
            let mut body = Box::pin(body);
            let mut data = bytes::BytesMut::new();
            let mut trailers = None;
            loop {
                match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                    None => break,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(chunk) => {
                            data.extend_from_slice(&chunk);
                            if data.len() > limit {
                                // Too large to keep: hand everything to the caller.
                                let mut prefix = std::collections::VecDeque::new();
                                prefix.push_back(Frame::data(data.freeze()));
                                let body = CacheBody::partial(prefix, Some(body), None);
                                return passthrough(Ok(Response::from_parts(parts, body)));
                            }
                        }
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                trailers = Some(t);
                            }
                        }
                    },
                    Some(Err(_)) => {
                        // A broken response body: answer UNAVAILABLE, not stored.
                        let mut headers = HeaderMap::new();
                        headers
                            .insert("content-type", HeaderValue::from_static("application/grpc"));
                        headers.insert("grpc-status", HeaderValue::from_static("14"));
                        headers.insert(
                            "grpc-message",
                            HeaderValue::from_static("upstream body failed"),
                        );
                        return Ok(GrpcOutcome::Complete(Arc::new(StoredGrpc {
                            status: StatusCode::OK,
                            version: parts.version,
                            headers,
                            body: Bytes::new(),
                            trailers: None,
                            grpc_status: Some(14),
                        })));
                    }
                }
            }
            let grpc_status = trailers
                .as_ref()
                .and_then(grpc_status)
                .or_else(|| grpc_status(&parts.headers));
            Ok(GrpcOutcome::Complete(Arc::new(StoredGrpc {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body: data.freeze(),
                trailers,
                grpc_status,
            })))
        })
    }
}

type Core<S, ReqBody, ResBody> = Cache<
    GrpcFetch<S, ReqBody, ResBody>,
    GrpcPolicy,
    MokaStore<
        GrpcKey,
        GrpcOutcome<ResBody, <S as Service<Request<GrpcBody<ReqBody>>>>::Error>,
        Infallible,
    >,
>;

/// Configures a [`GrpcCacheLayer`].
#[must_use]
#[derive(Debug, Clone)]
pub struct GrpcCacheLayerBuilder {
    methods: HashMap<String, Duration>,
    key_metadata: Vec<String>,
    max_message: usize,
    max_entries: u64,
}

impl GrpcCacheLayerBuilder {
    /// Caches the unary method at `path` (`/package.Service/Method`) for `ttl`.
    pub fn method(mut self, path: impl Into<String>, ttl: Duration) -> Self {
        self.methods.insert(path.into(), ttl);
        self
    }

    /// Adds a metadata key whose value is part of the cache key (for
    /// example a tenant id; `authorization` to cache per credential).
    pub fn key_metadata(mut self, name: impl Into<String>) -> Self {
        self.key_metadata.push(name.into());
        self
    }

    /// The largest request or response message buffered (default 1 MiB);
    /// larger ones pass through.
    pub fn max_message(mut self, n: usize) -> Self {
        self.max_message = n;
        self
    }

    /// Entries kept (default 10,000).
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<GrpcCacheLayer, ConfigError> {
        let mut names = Vec::new();
        for name in &self.key_metadata {
            names.push(
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    ConfigError::OutOfRange {
                        field: "key_metadata",
                        reason: format!("{name:?} is not a valid metadata key"),
                    }
                })?,
            );
        }
        for (path, ttl) in &self.methods {
            if !path.starts_with('/') || path.matches('/').count() != 2 {
                return Err(ConfigError::OutOfRange {
                    field: "method",
                    reason: format!("{path:?} is not a gRPC path like /package.Service/Method"),
                });
            }
            if ttl.is_zero() {
                return Err(ConfigError::ZeroDuration {
                    field: "method ttl",
                    value: *ttl,
                });
            }
        }
        if self.max_entries == 0 {
            return Err(ConfigError::Zero {
                field: "max_entries",
            });
        }
        Ok(GrpcCacheLayer {
            config: Arc::new(GrpcConfig {
                methods: self.methods,
                key_metadata: names,
                max_message: self.max_message,
            }),
            max_entries: self.max_entries,
            stores: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

/// Caches unary gRPC responses: [`GrpcCache`]. See the [module docs](self).
#[derive(Clone)]
pub struct GrpcCacheLayer {
    config: Arc<GrpcConfig>,
    max_entries: u64,
    stores: StatsSources,
}

impl fmt::Debug for GrpcCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCacheLayer")
            .field("config", &self.config)
            .finish()
    }
}

impl GrpcCacheLayer {
    /// Starts configuring a gRPC cache.
    pub fn builder() -> GrpcCacheLayerBuilder {
        GrpcCacheLayerBuilder {
            methods: HashMap::new(),
            key_metadata: Vec::new(),
            max_message: 1 << 20,
            max_entries: 10_000,
        }
    }

    /// The counters of the caches this layer made, added up.
    pub fn stats(&self) -> CacheStats {
        let stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        stores
            .iter()
            .map(|f| f())
            .fold(CacheStats::default(), |a, b| CacheStats {
                hits: a.hits + b.hits,
                misses: a.misses + b.misses,
                coalesced: a.coalesced + b.coalesced,
                stored: a.stored + b.stored,
                bypasses: a.bypasses + b.bypasses,
                entries: a.entries + b.entries,
                ..a
            })
    }
}

impl<S> Layer<S> for GrpcCacheLayer {
    type Service = GrpcCache<S>;
    fn layer(&self, inner: S) -> GrpcCache<S> {
        GrpcCache {
            inner,
            config: Arc::clone(&self.config),
            max_entries: self.max_entries,
            stores: Arc::clone(&self.stores),
            core: Arc::new(std::sync::OnceLock::new()),
        }
    }
}

/// A gRPC server wrapped by a [`GrpcCacheLayer`].
pub struct GrpcCache<S> {
    inner: S,
    config: Arc<GrpcConfig>,
    max_entries: u64,
    stores: StatsSources,
    /// The cache core, made on first use (its types depend on the body types).
    core: Arc<std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>>,
}

impl<S: Clone> Clone for GrpcCache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            max_entries: self.max_entries,
            stores: Arc::clone(&self.stores),
            core: Arc::clone(&self.core),
        }
    }
}

impl<S> fmt::Debug for GrpcCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCache")
            .field("config", &self.config)
            .finish()
    }
}

impl<S> GrpcCache<S> {
    fn core<ReqBody, ResBody>(&self) -> Option<Core<S, ReqBody, ResBody>>
    where
        S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Send + Sync + 'static,
        ReqBody: Body + Send + 'static,
        ReqBody::Error: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Send,
    {
        let made = self.core.get_or_init(|| {
            let layer = CacheLayer::builder(GrpcPolicy {
                config: Arc::clone(&self.config),
            })
            .max_entries(self.max_entries)
            .no_early_refresh();
            match layer.build() {
                Ok(layer) => {
                    let core: Core<S, ReqBody, ResBody> = layer.layer(GrpcFetch {
                        inner: self.inner.clone(),
                        max_message: self.config.max_message,
                        _bodies: std::marker::PhantomData,
                    });
                    let for_stats = core.clone();
                    self.stores
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Box::new(move || for_stats.stats()));
                    Box::new(core)
                }
                Err(_) => Box::new(()),
            }
        });
        made.downcast_ref::<Core<S, ReqBody, ResBody>>().cloned()
    }
}

fn respond<B: Body>(stored: &StoredGrpc) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::full(
        stored.body.clone(),
        stored.trailers.clone(),
    ));
    *res.status_mut() = stored.status;
    *res.version_mut() = stored.version;
    *res.headers_mut() = stored.headers.clone();
    res
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcCache<S>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    S::Error: Send + Sync + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let svc = self.inner.clone();
        let config = Arc::clone(&self.config);
        let path = req.uri().path().to_string();
        let authorized = req.headers().contains_key(http::header::AUTHORIZATION);
        let auth_in_key = config.key_metadata.contains(&http::header::AUTHORIZATION);
        let core = if config.methods.contains_key(&path) && (!authorized || auth_in_key) {
            self.core::<ReqBody, ResBody>()
        } else {
            None
        };
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let Some(core) = core else {
                let req = Request::from_parts(parts, replay(Bytes::new(), Box::pin(body)));
                return Ok(svc.oneshot(req).await?.map(CacheBody::stream));
            };
            // Buffer the (unary) request message; a larger or streaming body
            // passes through untouched.
            let mut body = Box::pin(body);
            let mut message = bytes::BytesMut::new();
            let mut complete = true;
            loop {
                match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                    None => break,
                    Some(Ok(frame)) => {
                        if let Ok(chunk) = frame.into_data() {
                            message.extend_from_slice(&chunk);
                            if message.len() > config.max_message {
                                complete = false;
                                break;
                            }
                        }
                    }
                    Some(Err(_)) => {
                        complete = false;
                        break;
                    }
                }
            }
            let message = message.freeze();
            if !complete {
                let req = Request::from_parts(parts, replay(message, body));
                return Ok(svc.oneshot(req).await?.map(CacheBody::stream));
            }
            let metadata = config
                .key_metadata
                .iter()
                .map(|name| (name.clone(), parts.headers.get(name).cloned()))
                .collect();
            let call = GrpcCall {
                key: GrpcKey {
                    path: Arc::from(path.as_str()),
                    message: message.clone(),
                    metadata,
                },
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                message,
            };
            let Ok(outcome) = core.oneshot(call.clone()).await;
            match outcome {
                GrpcOutcome::Complete(stored) => Ok(respond(&stored)),
                GrpcOutcome::Passthrough(slot) => {
                    let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    match taken {
                        Some(result) => result,
                        // Another caller's pass-through: make our own call.
                        None => Ok(svc.oneshot(rebuild(&call)).await?.map(CacheBody::stream)),
                    }
                }
            }
        })
    }
}
