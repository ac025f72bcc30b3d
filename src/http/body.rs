//! The body a cached HTTP service returns: a stored body (with trailers),
//! or the upstream body streamed through untouched after any prefix that
//! was read while deciding whether to store it.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// The response body of [`HttpCache`](super::HttpCache).
pub struct CacheBody<B: Body> {
    kind: Kind<B>,
}

enum Kind<B: Body> {
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Stream {
        prefix: VecDeque<Frame<Bytes>>,
        error: Option<B::Error>,
        rest: Option<Pin<Box<B>>>,
    },
}

// Nothing in it is ever pinned in place: the upstream body is boxed.
impl<B: Body> Unpin for CacheBody<B> {}

impl<B: Body> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full { data, trailers } => f
                .debug_struct("CacheBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            Kind::Stream { prefix, .. } => f
                .debug_struct("CacheBody::Stream")
                .field("buffered_frames", &prefix.len())
                .finish(),
        }
    }
}

impl<B: Body> CacheBody<B> {
    /// A complete body (a hit, or a stored fill).
    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// No body (HEAD, 304).
    pub(crate) fn empty() -> Self {
        Self::full(Bytes::new(), None)
    }

    /// The upstream body, untouched.
    pub(crate) fn stream(body: B) -> Self {
        Self {
            kind: Kind::Stream {
                prefix: VecDeque::new(),
                error: None,
                rest: Some(Box::pin(body)),
            },
        }
    }

    pub(crate) fn partial(
        prefix: VecDeque<Frame<Bytes>>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    ) -> Self {
        Self {
            kind: Kind::Stream {
                prefix,
                error,
                rest,
            },
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        // Every field is Unpin (the upstream body is boxed).
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Kind::Stream {
                prefix,
                error,
                rest,
            } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                match rest {
                    Some(body) => body.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream {
                prefix,
                error,
                rest,
            } => {
                prefix.is_empty()
                    && error.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { prefix, rest, .. } => {
                let buffered: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let mut hint = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint());
                hint.set_lower(hint.lower() + buffered);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}

/// What reading a body up to a limit gave.
pub(crate) enum Buffered<B: Body> {
    /// The whole body, within the limit.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Over the limit, or failed: give the client everything read so far,
    /// then the rest (or the error).
    Passthrough(CacheBody<B>),
}

/// Reads `body` until it ends or passes `limit` bytes (the crate's one
/// buffering routine, [`crate::body::buffer`]); what could not be
/// buffered is replayed to the client as read, then the rest or the error.
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Buffered<B>
where
    B: Body<Data = Bytes>,
{
    match crate::body::buffer(body, limit).await {
        crate::body::Buffered::Complete { data, trailers } => Buffered::Complete { data, trailers },
        crate::body::Buffered::Partial {
            frames,
            rest,
            error,
        } => Buffered::Passthrough(CacheBody::partial(frames, rest, error)),
    }
}
