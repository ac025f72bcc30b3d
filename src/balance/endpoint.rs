//! One upstream as the p2c balancer sees it: [`Endpoint`] gates it by its
//! health (`poll_ready` is pending while it is ejected, and while its
//! probe runs) and reports its load (peak-EWMA, held back at random while
//! it ramps up). p2c's `call` only picks: it counts the request against
//! the upstream and gives a [`Chosen`] (with its peak-EWMA handle), which
//! the caller sends on the shared keep-alive client once it has let go of
//! p2c's lock; the [`ForwardFuture`] reads the outcome into its health.

use std::cell::Cell;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::{Instant, Sleep, Timeout};
use tower::Service;
use tower::load::Load;

use super::body::RequestBody;
use super::config::Settings;
use super::ewma::{self, PeakEwma, PickClock};
use super::health::{Admit, Phase};
use super::request::{Outcome, classify, target};
use super::stats::FailureKind;
use super::upstreams::UpstreamState;
use crate::sync::lock;

/// The keep-alive client every endpoint sends through (one pool, keyed by
/// upstream).
pub(crate) type Client<B> = hyper_util::client::legacy::Client<HttpConnector, RequestBody<B>>;

/// What an endpoint's `call` returns: the upstream picked, at once.
pub(crate) type EndpointFuture<B> = std::future::Ready<Result<Chosen<B>, Infallible>>;

/// A request to one upstream that did not get a response head.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) outcome: Outcome,
    pub(crate) upstream: Arc<UpstreamState>,
}

/// What one upstream gave.
pub(crate) type Attempt = Result<Response<Incoming>, Failure>;

/// One upstream's sending side. One pointer: p2c's ready cache moves
/// its endpoints at every request, and a hyper client is several hundred
/// bytes.
pub(crate) struct Forward<B> {
    shared: Arc<ForwardShared<B>>,
}

struct ForwardShared<B> {
    state: Arc<UpstreamState>,
    client: Client<B>,
    settings: Arc<Settings>,
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("upstream", &self.shared.state.key)
            .finish_non_exhaustive()
    }
}

/// The upstream p2c picked for a request, ready to send it.
pub(crate) struct Chosen<B> {
    forward: Forward<B>,
    guard: Guard,
    /// Peak-EWMA's measure of this request (none for panic mode's probe,
    /// sent past p2c).
    handle: Option<ewma::Handle>,
}

impl<B> Chosen<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `req` to the upstream.
    pub(crate) fn send(self, req: Request<RequestBody<B>>) -> ForwardFuture {
        let Self {
            forward,
            mut guard,
            handle,
        } = self;
        guard.handle = handle;
        let (mut parts, body) = req.into_parts();
        guard.body_sent = body.sent_flag();
        let this = &*forward.shared;
        parts.uri = target(&this.state.scheme, &this.state.authority, &parts.uri);
        let response = this.client.request(Request::from_parts(parts, body));
        // From the instant of the pick: no clock read of its own.
        let sent_at = guard
            .handle
            .as_ref()
            .map_or_else(Instant::now, ewma::Handle::sent_at);
        ForwardFuture {
            response: tokio::time::timeout_at(sent_at + this.settings.upstream_timeout, response),
            guard,
        }
    }
}

/// Panic mode's probe of `state`, past p2c, started under `sent_under`
/// (see [`Health::panic_probe`](super::health::Health::panic_probe)).
pub(crate) fn panic_probe<B>(
    state: Arc<UpstreamState>,
    client: Client<B>,
    settings: Arc<Settings>,
    sent_under: u64,
) -> Chosen<B> {
    state.stats.sent();
    Chosen {
        forward: Forward {
            shared: Arc::new(ForwardShared {
                state: Arc::clone(&state),
                client,
                settings: Arc::clone(&settings),
            }),
        },
        guard: Guard {
            state,
            settings,
            sent_under,
            body_sent: None,
            handle: None,
            done: false,
        },
        handle: None,
    }
}

pin_project_lite::pin_project! {
    /// A request on its way to one upstream, bounded by the upstream
    /// timeout (the connection and the response head).
    pub(crate) struct ForwardFuture {
        #[pin]
        response: Timeout<hyper_util::client::legacy::ResponseFuture>,
        guard: Guard,
    }
}

impl fmt::Debug for ForwardFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardFuture")
            .field("upstream", &self.guard.state.key)
            .finish_non_exhaustive()
    }
}

impl Future for ForwardFuture {
    type Output = Attempt;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Attempt> {
        let this = self.project();
        let result = ready!(this.response.poll(cx));
        // One clock read for peak-EWMA's round trip and the health.
        let now = Instant::now();
        let guard = this.guard;
        let handle = guard.handle.take();
        guard.done = true;
        guard.state.stats.ended();
        let outcome = match result {
            Ok(Ok(response)) => {
                if let Some(handle) = handle {
                    handle.finish(now);
                }
                guard.state.succeeded(guard.sent_under, now);
                return Poll::Ready(Ok(response));
            }
            Ok(Err(error)) => {
                let outcome = match classify(&error) {
                    // No body: the head's write failed, as a reset.
                    Outcome::ClosedDuringUpload if guard.body_sent.is_none() => {
                        Outcome::Upstream(FailureKind::Reset)
                    }
                    outcome => outcome,
                };
                tracing::debug!(upstream = %guard.state.key, %error, ?outcome, "upstream request failed");
                outcome
            }
            // A client still uploading when the time ran out held the
            // request up itself: otherwise a slow upload would eject any
            // upstream at will.
            Err(_) if guard.uploading() => Outcome::SlowClient,
            Err(_) => Outcome::Upstream(FailureKind::Timeout),
        };
        // Peak-EWMA measures the upstream: not a time the client's own
        // faults made (a 30 s trickled upload would be its peak for
        // minutes).
        if let Some(handle) = handle {
            match outcome {
                Outcome::Upstream(_) => handle.finish(now),
                Outcome::ClosedDuringUpload | Outcome::Request | Outcome::SlowClient => {
                    handle.discard()
                }
            }
        }
        match outcome {
            Outcome::Upstream(kind) => {
                guard
                    .state
                    .failed(kind, Some(guard.sent_under), &guard.settings.backoff);
            }
            // The client's fault: the upstream is not to blame, but a probe
            // it was is due again.
            Outcome::ClosedDuringUpload => guard.state.closed_during_upload(guard.sent_under),
            Outcome::Request | Outcome::SlowClient => {
                lock(&guard.state.health).abandoned(guard.sent_under)
            }
        }
        Poll::Ready(Err(Failure {
            outcome,
            upstream: Arc::clone(&guard.state),
        }))
    }
}

/// Ends the request's accounting if its future is dropped before the
/// upstream answered (the client went away).
struct Guard {
    state: Arc<UpstreamState>,
    settings: Arc<Settings>,
    sent_under: u64,
    /// Set once the request body was read to its end (`None`: empty).
    body_sent: Option<Arc<AtomicBool>>,
    /// Peak-EWMA's measure of the request, ended with it.
    handle: Option<ewma::Handle>,
    done: bool,
}

impl Guard {
    /// Whether the client's body was still being read (not to its end).
    fn uploading(&self) -> bool {
        self.body_sent
            .as_ref()
            .is_some_and(|sent| !sent.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.state.stats.ended();
            lock(&self.state.health).abandoned(self.sent_under);
            // The client went away: while it was still uploading, the time
            // is its own, not the upstream's (otherwise the handle's drop
            // counts it, a lower bound of the upstream's answer).
            if self.uploading()
                && let Some(handle) = self.handle.take()
            {
                handle.discard();
            }
        }
    }
}

/// The load p2c compares: the peak-EWMA cost, unless the upstream is
/// held back for this comparison (it ramps up, and lost the draw), in
/// which case it loses to any upstream that is not.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub(crate) struct RampedCost {
    // Field order matters: compared first.
    held_back: bool,
    cost: f64,
}

/// One upstream in the balancer.
pub(crate) struct Endpoint<B> {
    state: Arc<UpstreamState>,
    forward: Forward<B>,
    ewma: PeakEwma,
    /// The instant of the pick under way.
    clock: Arc<PickClock>,
    /// The ejection count its peak-EWMA was started under: after an
    /// ejection it starts afresh (a timeout's peak would starve it for
    /// long after it recovered).
    ewma_since: u64,
    /// The start of the admission its ramp was last seen finished in:
    /// while the upstream stays admitted since then, its weight is 1.0
    /// without reading the clock.
    ramped: Cell<Option<Instant>>,
    sleep: Option<Pin<Box<Sleep>>>,
    settings: Arc<Settings>,
}

impl<B> fmt::Debug for Endpoint<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("upstream", &self.state.key)
            .finish_non_exhaustive()
    }
}

impl<B> Endpoint<B> {
    pub(crate) fn new(
        state: Arc<UpstreamState>,
        client: Client<B>,
        settings: Arc<Settings>,
        clock: Arc<PickClock>,
    ) -> Self {
        let forward = Forward {
            shared: Arc::new(ForwardShared {
                state: Arc::clone(&state),
                client,
                settings: Arc::clone(&settings),
            }),
        };
        let ewma_since = lock(&state.health).ejections();
        Self {
            ewma: settings.peak_ewma(),
            clock,
            forward,
            state,
            ewma_since,
            ramped: Cell::new(None),
            sleep: None,
            settings,
        }
    }
}

impl<B> Service<()> for Endpoint<B> {
    type Response = Chosen<B>;
    type Error = Infallible;
    type Future = EndpointFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Twice at most: once more after a back-off's timer fired.
        for _ in 0..2 {
            let (admit, ejections) = {
                let mut health = lock(&self.state.health);
                // In rotation: ready, without reading the clock.
                let admit = if let Phase::Admitted { .. } = health.phase() {
                    Admit::Ready
                } else {
                    health.admit(Instant::now(), Some(cx.waker()))
                };
                (admit, health.ejections())
            };
            match admit {
                Admit::Ready => {
                    self.sleep = None;
                    if ejections != self.ewma_since {
                        self.ewma = self.settings.peak_ewma();
                        self.ewma_since = ejections;
                    }
                    return Poll::Ready(Ok(()));
                }
                // Its probe runs: woken when it ends.
                Admit::Wait(None) => {
                    self.sleep = None;
                    return Poll::Pending;
                }
                Admit::Wait(Some(until)) => {
                    let sleep = match &mut self.sleep {
                        Some(sleep) => {
                            if sleep.deadline() != until {
                                sleep.as_mut().reset(until);
                            }
                            sleep
                        }
                        None => self.sleep.insert(Box::pin(tokio::time::sleep_until(until))),
                    };
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.sleep = None;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Counts a request against the upstream (its probe, if one is due,
    /// marked sent while p2c is still locked, so that no other request
    /// takes it) and gives it to the caller to send.
    fn call(&mut self, (): ()) -> Self::Future {
        // Under the ejection count `poll_ready` saw: an ejection in
        // between (another task's failure) makes this request's answer
        // stale evidence, as for any request sent before it.
        lock(&self.state.health).dispatch();
        let sent_under = self.ewma_since;
        self.state.stats.sent();
        std::future::ready(Ok(Chosen {
            forward: self.forward.clone(),
            guard: Guard {
                state: Arc::clone(&self.state),
                settings: Arc::clone(&self.settings),
                sent_under,
                body_sent: None,
                handle: None,
                done: false,
            },
            handle: Some(self.ewma.handle(self.clock.now())),
        }))
    }
}

impl<B> Load for Endpoint<B> {
    type Metric = RampedCost;

    fn load(&self) -> RampedCost {
        let now = self.clock.now();
        let weight = {
            let health = lock(&self.state.health);
            match health.phase() {
                Phase::Admitted { since } if self.ramped.get() == Some(since) => 1.0,
                phase => {
                    let weight = health.weight(now, &self.settings.backoff);
                    // The ramp only goes up while it stays admitted.
                    if let Phase::Admitted { since } = phase
                        && weight >= 1.0
                    {
                        self.ramped.set(Some(since));
                    }
                    weight
                }
            }
        };
        let held_back = weight < 1.0 && self.settings.random.next_unit() > weight;
        RampedCost {
            held_back,
            cost: self.ewma.cost(now),
        }
    }
}
