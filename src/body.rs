//! Reading an HTTP body into memory up to a size limit: the one buffering
//! loop of the crate (used by the gRPC cache for request messages and
//! responses; meant for the HTTP cache's responses too).
//!
//! [`buffer`] returns a named future, [`Buffer`], so the services that use
//! it keep named response futures.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};

/// What reading a body up to a limit gave.
pub(crate) enum Buffered<B: Body> {
    /// The whole body, within the limit: its data (the frames joined) and
    /// its trailers, if it had any.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Over the limit, or failed: everything read so far, in order (data
    /// frames, and the trailers if they came before the error), then the
    /// rest of the body (over the limit) or the error (failed). Replaying
    /// `frames`, then `error`, then `rest` gives the body unchanged.
    Partial {
        frames: VecDeque<Frame<Bytes>>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    },
}

impl<B: Body> fmt::Debug for Buffered<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Complete { data, trailers } => f
                .debug_struct("Complete")
                .field("len", &data.len())
                .field("trailers", &trailers.is_some())
                .finish(),
            Self::Partial {
                frames,
                rest,
                error,
            } => f
                .debug_struct("Partial")
                .field("frames", &frames.len())
                .field("rest", &rest.is_some())
                .field("error", &error.is_some())
                .finish(),
        }
    }
}

/// Reads `body` until it ends (within `limit` bytes of data: complete) or
/// its data passes `limit` bytes or it fails (partial). A body whose size
/// hint already says it is over the limit is not read at all.
pub(crate) fn buffer<B>(body: B, limit: usize) -> Buffer<B>
where
    B: Body<Data = Bytes>,
{
    Buffer {
        body: Some(Box::pin(body)),
        frames: VecDeque::new(),
        len: 0,
        limit,
        trailers: None,
    }
}

/// The future of [`buffer`]. Everything in it is `Unpin` (the body is
/// boxed, as the partial result hands it on boxed).
pub(crate) struct Buffer<B: Body> {
    body: Option<Pin<Box<B>>>,
    frames: VecDeque<Frame<Bytes>>,
    len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
}

impl<B: Body> fmt::Debug for Buffer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Buffer<B> {
    fn partial(&mut self, rest: Option<Pin<Box<B>>>, error: Option<B::Error>) -> Buffered<B> {
        let mut frames = std::mem::take(&mut self.frames);
        if let Some(trailers) = self.trailers.take() {
            frames.push_back(Frame::trailers(trailers));
        }
        Buffered::Partial {
            frames,
            rest,
            error,
        }
    }

    fn complete(&mut self) -> Buffered<B> {
        let frames = std::mem::take(&mut self.frames);
        let data = if frames.len() == 1 {
            // One frame (the common case for a unary message): no copy.
            frames
                .into_iter()
                .next()
                .and_then(|f| f.into_data().ok())
                .unwrap_or_default()
        } else {
            let mut data = BytesMut::with_capacity(self.len);
            for frame in frames {
                if let Ok(chunk) = frame.into_data() {
                    data.extend_from_slice(&chunk);
                }
            }
            data.freeze()
        };
        Buffered::Complete {
            data,
            trailers: self.trailers.take(),
        }
    }
}

impl<B> Future for Buffer<B>
where
    B: Body<Data = Bytes>,
{
    type Output = Buffered<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Buffered<B>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            panic!("Buffer polled after completion");
        };
        if this.frames.is_empty()
            && usize::try_from(body.size_hint().lower())
                .ok()
                .is_none_or(|n| n > this.limit)
        {
            // Announced as too large (content-length, say): not read at all.
            let rest = this.body.take();
            return Poll::Ready(this.partial(rest, None));
        }
        loop {
            let Some(body) = this.body.as_mut() else {
                panic!("Buffer polled after completion");
            };
            match ready!(body.as_mut().poll_frame(cx)) {
                None => {
                    this.body = None;
                    return Poll::Ready(this.complete());
                }
                Some(Err(e)) => {
                    this.body = None;
                    return Poll::Ready(this.partial(None, Some(e)));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        this.len = this.len.saturating_add(data.len());
                        this.frames.push_back(Frame::data(data));
                        if this.len > this.limit {
                            let rest = this.body.take();
                            return Poll::Ready(this.partial(rest, None));
                        }
                    }
                    Err(frame) => {
                        // Several trailer frames are kept together.
                        if let Ok(t) = frame.into_trailers() {
                            match &mut this.trailers {
                                Some(seen) => seen.extend(t),
                                None => this.trailers = Some(t),
                            }
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::HeaderMap;
    use http_body::Frame;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::{Buffered, buffer};

    type Frames =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, &'static str>>>>;

    fn frames(items: Vec<Result<Frame<Bytes>, &'static str>>) -> Frames {
        StreamBody::new(futures::stream::iter(items))
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        t
    }

    #[tokio::test]
    async fn complete_within_the_limit_with_trailers() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
            Ok(Frame::trailers(trailers())),
        ]);
        let Buffered::Complete { data, trailers: t } = buffer(body, 4).await else {
            panic!("expected complete");
        };
        assert_eq!(data, "abcd");
        assert_eq!(t, Some(trailers()));
    }

    #[tokio::test]
    async fn over_the_limit_replays_unchanged() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cde"))),
            Ok(Frame::data(Bytes::from_static(b"f"))),
            Ok(Frame::trailers(trailers())),
        ]);
        let Buffered::Partial {
            frames,
            rest,
            error,
        } = buffer(body, 4).await
        else {
            panic!("expected partial");
        };
        assert_eq!(
            frames.len(),
            2,
            "read up to the frame that passed the limit"
        );
        assert!(error.is_none());
        let rest = rest.expect("the rest of the body").collect().await.unwrap();
        let mut all: Vec<u8> = Vec::new();
        for f in frames {
            all.extend_from_slice(&f.into_data().unwrap());
        }
        assert_eq!(all, b"abcde");
        let t = rest.trailers().cloned();
        assert_eq!(rest.to_bytes(), "f");
        assert_eq!(t, Some(trailers()));
    }

    #[tokio::test]
    async fn an_error_is_kept_after_what_was_read() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("boom"),
        ]);
        let Buffered::Partial {
            frames,
            rest,
            error,
        } = buffer(body, 100).await
        else {
            panic!("expected partial");
        };
        assert_eq!(frames.len(), 1);
        assert!(rest.is_none());
        assert_eq!(error, Some("boom"));
    }

    #[tokio::test]
    async fn a_body_announced_too_large_is_not_read() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        let Buffered::Partial { frames, rest, .. } = buffer(body, 4).await else {
            panic!("expected partial");
        };
        assert!(frames.is_empty());
        let rest = rest.unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(rest, "0123456789");
        let body = Full::new(Bytes::from_static(b"0123"));
        assert!(matches!(
            buffer::<Full<Bytes>>(body, 4).await,
            Buffered::Complete { .. }
        ));
    }
}
