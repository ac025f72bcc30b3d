//! The response future of [`DbRouting`](super::DbRouting).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::request::RequestState;
use crate::cache::DataVersion;

pin_project! {
    /// The inner service's response, with the token of the request's
    /// writes (if it wrote) set on it as a cookie and a header, and the
    /// [`DataVersion`] of what it read and wrote in its extensions.
    pub struct DbRoutingFuture<F> {
        #[pin]
        pub(super) inner: F,
        pub(super) state: Arc<RequestState>,
    }
}

impl<F> fmt::Debug for DbRoutingFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbRoutingFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for DbRoutingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        let state = &**this.state;
        // A request that neither wrote nor read through its RequestDb (a
        // cache hit) costs two atomic loads here.
        if let Some(token) = state.written() {
            state.layer.set_token(res.headers_mut(), token);
        }
        if let Some(v) = state.data_version() {
            // One the handler set itself counts too: the lower one is what
            // the whole response reflects at least.
            let v = res
                .extensions()
                .get::<DataVersion>()
                .map_or(v, |DataVersion(set)| v.min(*set));
            res.extensions_mut().insert(DataVersion(v));
        }
        Poll::Ready(Ok(res))
    }
}
