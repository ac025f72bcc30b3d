//! [`Picker`]: the one p2c [`Balance`] that every clone of a
//! [`Balancer`](super::Balancer) shares, driven in each request's own
//! task.
//!
//! p2c is not `Clone`, so the usual shape is a `tower::buffer::Buffer`
//! in front of it: every request goes over a channel to a worker task and
//! its response future comes back over another, two wake-ups of another
//! task per request (on a loopback miss, about half the balancer's cost).
//! Here the caller takes a mutex instead, polls p2c itself and calls the
//! chosen endpoint; the mutex is held only for that (no `.await` under
//! it), and the request is sent from the caller's task.
//!
//! The wake-ups p2c registers (an endpoint becoming ready again, a
//! back-off timer, an upstream added) must reach whoever waits, not only
//! the last task that polled: p2c is always polled with one waker of its
//! own, which wakes every waiting caller ([`Notify::notify_waiters`]), and
//! each of them polls again. A caller enables its notification before it
//! polls, so a wake-up between its poll and its wait is not lost.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use http::Request;
use http_body::Body;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::Service;
use tower::balance::p2c::Balance;

use super::body::RequestBody;
use super::config::Settings;
use super::discover::Discovered;
use super::endpoint::{self, Client, ForwardFuture};
use super::service::P2cFuture;
use super::upstreams::UpstreamState;
use crate::sync::lock;

type UpstreamRequest<B> = Request<RequestBody<B>>;

/// p2c's waker: wakes every caller waiting for an upstream.
struct WakeAll(Notify);

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.0.notify_waiters();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_waiters();
    }
}

/// What [`Picker::try_send`] did.
pub(crate) enum Picked<B> {
    /// Sent to the upstream p2c picked: its answer to come.
    Sent(P2cFuture),
    /// None is ready now: the request, unsent.
    Pending(UpstreamRequest<B>),
    /// p2c failed (it cannot: its discover stream is infallible).
    Failed,
}

/// Why [`Picker::send_or_wait`] sent nothing.
// Moved once per wake-up on the rare path: boxing would cost more.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Waited<B> {
    /// Something changed: the request, unsent, to try again.
    Changed(UpstreamRequest<B>),
    /// Nothing became ready before the deadline.
    Timeout,
    /// p2c failed (its discover stream did; it cannot, being infallible).
    Failed,
}

/// The shared p2c balancer.
pub(crate) struct Picker<B> {
    p2c: Mutex<Balance<Discovered<B>, UpstreamRequest<B>>>,
    wake_all: Arc<WakeAll>,
    waker: Waker,
    /// For panic mode's probes, sent past p2c.
    client: Client<B>,
    settings: Arc<Settings>,
}

impl<B> fmt::Debug for Picker<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picker").finish_non_exhaustive()
    }
}

impl<B> Picker<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(crate) fn new(
        p2c: Balance<Discovered<B>, UpstreamRequest<B>>,
        client: Client<B>,
        settings: Arc<Settings>,
    ) -> Self {
        let wake_all = Arc::new(WakeAll(Notify::new()));
        Self {
            p2c: Mutex::new(p2c),
            waker: Waker::from(Arc::clone(&wake_all)),
            wake_all,
            client,
            settings,
        }
    }

    /// Sends `req` to the upstream p2c picks if one is ready now; gives it
    /// back if none is.
    pub(crate) fn try_send(&self, req: UpstreamRequest<B>) -> Picked<B> {
        let mut p2c = lock(&self.p2c);
        let mut cx = Context::from_waker(&self.waker);
        match p2c.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Picked::Sent(p2c.call(req)),
            Poll::Ready(Err(_)) => Picked::Failed,
            Poll::Pending => Picked::Pending(req),
        }
    }

    /// Sends `req` to the upstream p2c picks if one is ready now; if none
    /// is, waits until something changes (an upstream ready again, added,
    /// ejected, a probe ended) or `deadline`, and gives the request back
    /// so that the caller looks at the set again.
    pub(crate) async fn send_or_wait(
        &self,
        req: UpstreamRequest<B>,
        deadline: Instant,
    ) -> Result<P2cFuture, Waited<B>> {
        // Before polling: a wake-up from here on completes it.
        let changed = self.wake_all.0.notified();
        let req = match self.try_send(req) {
            Picked::Sent(sent) => return Ok(sent),
            Picked::Failed => return Err(Waited::Failed),
            Picked::Pending(req) => req,
        };
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(()) => Err(Waited::Changed(req)),
            Err(_) => Err(Waited::Timeout),
        }
    }

    /// Panic mode: `req` straight to `state`, probed early under
    /// `sent_under` (see [`Upstreams::panic_probe`](super::upstreams::Upstreams::panic_probe)).
    pub(crate) fn panic_probe(
        &self,
        state: Arc<UpstreamState>,
        req: UpstreamRequest<B>,
        sent_under: u64,
    ) -> ForwardFuture {
        endpoint::panic_probe(
            state,
            self.client.clone(),
            Arc::clone(&self.settings),
            req,
            sent_under,
        )
    }
}
