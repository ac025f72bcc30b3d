//! [`DbRouting`], the service [`DbLayer`](super::DbLayer) makes.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::db_layer::DbLayer;
use super::future::DbRoutingFuture;
use super::request::RequestDb;

/// The service [`DbLayer`] makes.
#[derive(Clone)]
pub struct DbRouting<S> {
    pub(super) inner: S,
    pub(super) layer: DbLayer,
}

impl<S> fmt::Debug for DbRouting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbRouting")
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DbRouting<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = DbRoutingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Without a token header or cookie this decodes nothing; the
        // request's one allocation is the state its RequestDb shares with
        // the future (plus the extension's box).
        let token = self.layer.token_of(req.headers());
        let route = self.layer.route_of(req.uri().path(), req.method());
        let request_db = RequestDb::new(self.layer.clone(), route, token);
        let state = Arc::clone(&request_db.state);
        req.extensions_mut().insert(request_db);
        DbRoutingFuture {
            inner: self.inner.call(req),
            state,
        }
    }
}
