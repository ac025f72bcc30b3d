//! The bodies on both sides of the balancer: a request body that gives
//! itself back when it is dropped unread (so a request whose connection
//! failed can be sent again, body included), and the response body (the
//! upstream's, or the balancer's own short answer).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;

/// A request body on its way upstream. Dropped before anything was read
/// from it (the connection was refused, or closed before the body was
/// asked for), it sends itself back to the balancer; once a frame (or its
/// end, or an error) was read it is spent, and the request is never sent
/// again. A body that is empty from the start is not kept at all: any
/// attempt can send another empty one.
pub(crate) struct RequestBody<B> {
    inner: Option<B>,
    read: bool,
    back: Option<oneshot::Sender<B>>,
    /// Set once the whole body was read (absent for an empty body): a
    /// request that times out before that was waiting for its client,
    /// not for its upstream.
    sent: Option<Arc<AtomicBool>>,
}

impl<B: Body> RequestBody<B> {
    /// Wraps `body`; `None` for the receiver when it is empty (nothing to
    /// give back), else the receiver it comes back on if dropped unread.
    pub(crate) fn new(body: B) -> (Self, Option<oneshot::Receiver<B>>) {
        if body.is_end_stream() {
            return (Self::empty(), None);
        }
        let (tx, rx) = oneshot::channel();
        (
            Self {
                inner: Some(body),
                read: false,
                back: Some(tx),
                sent: Some(Arc::new(AtomicBool::new(false))),
            },
            Some(rx),
        )
    }
}

impl<B> RequestBody<B> {
    /// An empty body.
    pub(crate) fn empty() -> Self {
        Self {
            inner: None,
            read: false,
            back: None,
            sent: None,
        }
    }

    /// A flag set once the whole body was read; `None` for an empty body
    /// (nothing to wait for).
    pub(crate) fn sent_flag(&self) -> Option<Arc<AtomicBool>> {
        self.sent.clone()
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("empty", &self.inner.is_none())
            .field("read", &self.read)
            .finish()
    }
}

impl<B> Drop for RequestBody<B> {
    fn drop(&mut self) {
        if let (false, Some(body), Some(back)) = (self.read, self.inner.take(), self.back.take()) {
            let _ = back.send(body);
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let mut inner = Pin::new(inner);
        let polled = inner.as_mut().poll_frame(cx);
        if polled.is_ready() {
            // Something was taken from the body (a frame, its end or an
            // error): it can no longer be sent again as it was.
            this.read = true;
            let ended = match &polled {
                Poll::Ready(None) => true,
                Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                _ => false,
            };
            if ended && let Some(sent) = &this.sent {
                sent.store(true, Ordering::Release);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The body of a [`Balancer`](super::Balancer)'s response: the upstream's
/// body as it streams in, or the balancer's own short answer (a 502, 503
/// or 400 it made itself).
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Upstream(Incoming),
    Own(Option<Bytes>),
}

impl ResponseBody {
    pub(crate) fn upstream(body: Incoming) -> Self {
        Self {
            kind: Kind::Upstream(body),
        }
    }

    pub(crate) fn own(text: &'static str) -> Self {
        Self {
            kind: Kind::Own(Some(Bytes::from_static(text.as_bytes()))),
        }
    }

    /// Whether this is the upstream's body (not one the balancer made).
    pub fn is_upstream(&self) -> bool {
        matches!(self.kind, Kind::Upstream(_))
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Upstream(_) => "upstream",
            Kind::Own(_) => "own",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.kind {
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Own(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Own(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Own(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn an_unread_body_comes_back() {
        let (body, back) = RequestBody::new(Full::new(Bytes::from_static(b"abc")));
        drop(body);
        let back = back.expect("a body with data is kept");
        let b = back.await.expect("given back");
        let bytes = b.collect().await.map(|c| c.to_bytes()).ok();
        assert_eq!(bytes.as_deref(), Some(&b"abc"[..]));
    }

    #[tokio::test]
    async fn an_empty_body_is_not_kept() {
        let (body, back) = RequestBody::new(Full::new(Bytes::new()));
        assert!(back.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_read_body_is_spent() {
        let (body, back) = RequestBody::new(Full::new(Bytes::from_static(b"abc")));
        let sent = body.sent_flag().expect("a body with data is watched");
        assert!(!sent.load(Ordering::Acquire));
        let _ = body.collect().await;
        assert!(sent.load(Ordering::Acquire), "read to its end");
        let back = back.expect("a body with data is kept");
        assert!(
            back.await.is_err(),
            "a body that was read is not given back"
        );
    }
}
