//! [`GrpcCache`]: the service a [`GrpcCacheLayer`](super::GrpcCacheLayer)
//! wraps around a gRPC server.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::Service;

use super::GrpcBody;
use super::future::ResponseFuture;
use super::key::cacheable;
use super::layer::{Core, GrpcConfig};
use crate::body::buffer;
use crate::cache::CacheStats;
use crate::http::CacheBody;

/// A gRPC server wrapped by a [`GrpcCacheLayer`](super::GrpcCacheLayer).
///
/// # Readiness
///
/// `poll_ready` is always ready, as for the cache core: a hit never waits
/// for the inner service. Every call that reaches the inner service (a
/// pass-through or a miss) waits for the readiness of its own clone of it
/// inside its response future.
pub struct GrpcCache<S> {
    inner: S,
    config: Arc<GrpcConfig>,
    core: Core,
}

impl<S> GrpcCache<S> {
    pub(crate) fn new(inner: S, config: Arc<GrpcConfig>, core: Core) -> Self {
        Self {
            inner,
            config,
            core,
        }
    }

    /// The counters of the cache core (shared with the layer and every
    /// service it made).
    pub fn stats(&self) -> CacheStats {
        super::layer::stats(&self.core)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for GrpcCache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            core: self.core.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for GrpcCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCache")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcCache<S>
where
    S: Service<Request<GrpcBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    /// Always ready: see "Readiness" on [`GrpcCache`].
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let svc = self.inner.clone();
        match cacheable(&self.config, &parts) {
            None => {
                let req = Request::from_parts(parts, CacheBody::stream(body));
                ResponseFuture::pass_through(svc, req)
            }
            Some(path) => ResponseFuture::buffering(
                svc,
                Arc::clone(&self.config),
                self.core.clone(),
                path,
                parts,
                buffer(body, self.config.max_message()),
            ),
        }
    }
}
