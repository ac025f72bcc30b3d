//! [`Picker`]: the one p2c [`Balance`] that every clone of a
//! [`Balancer`](super::Balancer) shares, driven in each request's own
//! task.
//!
//! p2c is not `Clone`, so the usual shape is a `tower::buffer::Buffer`
//! in front of it: every request goes over a channel to a worker task and
//! its response future comes back over another, two wake-ups of another
//! task per request (on a loopback miss, about half the balancer's cost).
//! Here the caller takes a mutex instead, polls p2c itself and calls the
//! chosen endpoint, which only counts the request against its upstream;
//! the mutex is held only for that (no `.await` under it), and the
//! request is sent from the caller's task once it is let go.
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

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::Service;
use tower::balance::p2c::Balance;

use super::config::Settings;
use super::discover::Discovered;
use super::endpoint::{self, Chosen, Client};
use super::ewma::PickClock;
use super::upstreams::UpstreamState;
use crate::sync::lock;

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

/// What [`Picker::try_pick`] did.
pub(crate) enum Picked<B> {
    /// The upstream p2c picked, the request counted against it.
    Chosen(Chosen<B>),
    /// None is ready now.
    Pending,
    /// p2c failed (it cannot: its discover stream is infallible).
    Failed,
}

/// Why [`Picker::pick_or_wait`] picked none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// Something changed (an upstream ready again, added, ejected, a
    /// probe ended): look at the set again.
    Changed,
    /// Nothing became ready before the deadline.
    Timeout,
    /// p2c failed (its discover stream did; it cannot, being infallible).
    Failed,
}

/// The shared p2c balancer.
pub(crate) struct Picker<B> {
    p2c: Mutex<Balance<Discovered<B>, ()>>,
    /// Read once per pick, under the lock: both loads p2c compares, the
    /// send time and the deadline use it.
    clock: Arc<PickClock>,
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

impl<B> Picker<B> {
    pub(crate) fn new(
        p2c: Balance<Discovered<B>, ()>,
        clock: Arc<PickClock>,
        client: Client<B>,
        settings: Arc<Settings>,
    ) -> Self {
        let wake_all = Arc::new(WakeAll(Notify::new()));
        Self {
            p2c: Mutex::new(p2c),
            clock,
            waker: Waker::from(Arc::clone(&wake_all)),
            wake_all,
            client,
            settings,
        }
    }

    /// Panic mode: a probe of `state` past p2c, started under
    /// `sent_under` (see [`Upstreams::panic_probe`](super::upstreams::Upstreams::panic_probe)).
    pub(crate) fn panic_probe(&self, state: Arc<UpstreamState>, sent_under: u64) -> Chosen<B> {
        endpoint::panic_probe(
            state,
            self.client.clone(),
            Arc::clone(&self.settings),
            sent_under,
        )
    }

    /// The upstream p2c picks, if one is ready now.
    pub(crate) fn try_pick(&self) -> Picked<B> {
        let mut p2c = lock(&self.p2c);
        self.clock.start();
        let mut cx = Context::from_waker(&self.waker);
        match p2c.poll_ready(&mut cx) {
            // The endpoint's future is ready at once (it only counts the
            // request).
            Poll::Ready(Ok(())) => match p2c.call(()).now_or_never() {
                Some(Ok(chosen)) => Picked::Chosen(chosen),
                Some(Err(_)) | None => Picked::Failed,
            },
            Poll::Ready(Err(_)) => Picked::Failed,
            Poll::Pending => Picked::Pending,
        }
    }

    /// The upstream p2c picks if one is ready now; if none is, waits
    /// until something changes or `deadline`, for the caller to look at
    /// the set again.
    pub(crate) async fn pick_or_wait(&self, deadline: Instant) -> Result<Chosen<B>, Waited> {
        // Before polling: a wake-up from here on completes it.
        let changed = self.wake_all.0.notified();
        match self.try_pick() {
            Picked::Chosen(chosen) => return Ok(chosen),
            Picked::Failed => return Err(Waited::Failed),
            Picked::Pending => {}
        }
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(()) => Err(Waited::Changed),
            Err(_) => Err(Waited::Timeout),
        }
    }
}
