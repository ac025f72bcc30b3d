//! The node's own routes: the purge API on the proxied listener (exactly
//! `POST /_purge`, only when a token was given) and Prometheus text on a
//! listener of its own.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tower::{Service, ServiceExt};

/// What a node answers: the cache's responses, or the purge route's.
type NodeBody<B> = Either<B, axum::body::Body>;

/// The proxied listener's service: `POST /_purge` to the purge route when
/// one is configured, everything else (that path's other methods
/// included) to the cache in front of the origin.
#[derive(Clone)]
pub struct Node<C> {
    cached: C,
    purge: Option<axum::Router>,
}

impl<C> Node<C> {
    pub fn new(cached: C, purge: Option<axum::Router>) -> Self {
        Self { cached, purge }
    }
}

impl<C, B> Service<Request<Incoming>> for Node<C>
where
    C: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    C::Future: Send,
    B: Send + 'static,
{
    type Response = Response<NodeBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The cache is driven to readiness inside each call (`oneshot`):
        // it serves hits while the origin is not ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        // Hop-by-hop fields go before the cache keys the request: a field
        // named in `Connection` must not reach the cache's `Vary` match
        // when the origin will not see it.
        tower_scale::balance::strip_hop_by_hop(req.headers_mut());
        let purge = self
            .purge
            .clone()
            .filter(|_| req.method() == Method::POST && req.uri().path() == "/_purge");
        let cached = self.cached.clone();
        Box::pin(async move {
            match purge {
                Some(router) => {
                    let res = router.oneshot(req).await?;
                    Ok(res.map(Either::Right))
                }
                None => {
                    let res = cached.oneshot(req).await?;
                    Ok(res.map(Either::Left))
                }
            }
        })
    }
}

/// `GET /metrics` (Prometheus text), for a listener of its own. The cache
/// publishes its counters once a second; the Redis tier's are read on each
/// scrape.
pub fn metrics_router<T>(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    tier: Option<Arc<T>>,
) -> axum::Router
where
    T: Stats + Send + Sync + 'static,
{
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            if let Some(tier) = &tier {
                tier.record();
            }
            let text = handle.render();
            async move { text }
        }),
    )
}

/// A tier whose counters are recorded on a scrape.
pub trait Stats {
    fn record(&self);
}

impl<K: 'static, R: 'static> Stats for tower_scale::cache::redis::RedisTier<K, R> {
    fn record(&self) {
        // Reading the snapshot records it in the `metrics` facade.
        let _ = self.stats();
    }
}
