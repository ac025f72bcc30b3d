//! The future of [`HttpCache`](super::HttpCache).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`HttpCache`](super::HttpCache): ready at once for a hit, boxed otherwise.
    pub struct HttpResponseFuture<T> {
        ready: Option<T>,
        pending: Option<BoxFuture<T>>,
    }
}

impl<T> fmt::Debug for HttpResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponseFuture")
            .field("ready", &self.ready.is_some())
            .finish()
    }
}

impl<T> Future for HttpResponseFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        if let Some(v) = this.ready.take() {
            return Poll::Ready(v);
        }
        match this.pending {
            Some(fut) => fut.as_mut().poll(cx),
            None => panic!("HttpResponseFuture polled after completion"),
        }
    }
}

impl<T> HttpResponseFuture<T> {
    pub(crate) fn ready(v: T) -> Self {
        Self {
            ready: Some(v),
            pending: None,
        }
    }
    pub(crate) fn boxed(f: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            ready: None,
            pending: Some(Box::pin(f)),
        }
    }
}
