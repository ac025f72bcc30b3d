//! The response future of [`Cache`](super::Cache).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::Service;

type BoxMiss<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

pin_project! {
    /// The future [`Cache`](super::Cache) returns.
    ///
    /// A hit is an already-ready value (no allocation, nothing to wait for);
    /// a request the policy bypasses drives the inner service's readiness and
    /// call without boxing; only a miss, which waits on the single-flight
    /// group and the inner service, is boxed.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        // A hit's answer, outside the state enum: the hit's poll is one
        // `Option::take` and its drop finds nothing to do.
        ready: Option<Result<S::Response, S::Error>>,
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // The answer is (or was) in `ready`.
        Hit,
        Bypass {
            svc: S,
            req: Option<Req>,
        },
        Calling {
            #[pin]
            fut: S::Future,
        },
        Miss {
            fut: BoxMiss<S::Response, S::Error>,
        },
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    /// True when the answer came from the in-process store (a fresh or
    /// stale hit, or a cached error), known as soon as the future exists.
    pub fn is_hit(&self) -> bool {
        matches!(self.state, State::Hit)
    }

    #[inline]
    pub(crate) fn ready(result: Result<S::Response, S::Error>) -> Self {
        Self {
            ready: Some(result),
            state: State::Hit,
        }
    }

    pub(crate) fn bypass(svc: S, req: Req) -> Self {
        Self {
            ready: None,
            state: State::Bypass {
                svc,
                req: Some(req),
            },
        }
    }

    pub(crate) fn miss(fut: BoxMiss<S::Response, S::Error>) -> Self {
        Self {
            ready: None,
            state: State::Miss { fut },
        }
    }
}

impl<S: Service<Req>, Req> Future for ResponseFuture<S, Req> {
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(result) = this.ready.take() {
            return Poll::Ready(result);
        }
        loop {
            match this.state.as_mut().project() {
                StateProj::Hit => panic!("cache ResponseFuture polled after completion"),
                StateProj::Bypass { svc, req } => {
                    // The cache is always ready; the inner service's
                    // readiness is awaited here, on this request's own clone.
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let Some(req) = req.take() else {
                        panic!("cache ResponseFuture polled after completion");
                    };
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => return fut.poll(cx),
                StateProj::Miss { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Hit => "Hit",
            State::Bypass { .. } => "Bypass",
            State::Calling { .. } => "Calling",
            State::Miss { .. } => "Miss",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
