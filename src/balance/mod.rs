//! The load balancer: requests spread over several HTTP upstreams by
//! tower's own power-of-two-choices balancer
//! ([`tower::balance::p2c`]) over peak-EWMA load, with passive and
//! active health checks, one retry where it is safe, and upstreams added
//! and removed at run time.
//!
//! ```no_run
//! use std::time::Duration;
//! use hyper_util::rt::{TokioExecutor, TokioIo};
//! use hyper_util::service::TowerToHyperService;
//! use tower::ServiceBuilder;
//! use tower_scale::balance::{Balancer, Upstreams};
//! use tower_scale::http::HttpCacheLayer;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let upstreams = Upstreams::new();
//! for url in ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"] {
//!     upstreams.add(url.parse()?)?;
//! }
//! let balancer: Balancer = Balancer::builder()
//!     .upstream_timeout(Duration::from_secs(10))
//!     .health_path(Some("/healthz".into()))
//!     .build(&upstreams)?;
//! // The cache answers what it can; the balancer takes the misses.
//! let service = ServiceBuilder::new()
//!     .layer(HttpCacheLayer::builder().build()?)
//!     .service(balancer);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     let service = TowerToHyperService::new(service.clone());
//!     tokio::spawn(async move {
//!         let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
//!             .serve_connection(TokioIo::new(stream), service)
//!             .await;
//!     });
//!     // Elsewhere, following the service registry:
//!     // upstreams.add(new_url)?; upstreams.remove(&old_url);
//! }
//! # }
//! ```
//!
//! # Choosing an upstream: p2c over peak-EWMA
//!
//! Each request goes to the less loaded of two upstreams drawn at random
//! ([`tower::balance::p2c::Balance`]). The load is peak-EWMA, as
//! [`tower::load::PeakEwma`] computes it (the balancer computes it itself,
//! reading the clock once per pick rather than seven times per request):
//! the moving average of the upstream's
//! response time (to the response head), which jumps to any slower
//! response at once and decays back over [`decay`](BalancerBuilder::decay),
//! multiplied by the requests it has in flight. Peak-EWMA rather than
//! pending requests alone: an upstream ten times slower than the others
//! holds ten times as many requests only once it is already overloaded,
//! while its response time shows at once; peak-EWMA sends it
//! proportionally less, and backs off from an upstream whose latency
//! spikes (a GC pause, a noisy neighbour) before its queue builds.
//!
//! # Health
//!
//! - **Passive**: a request that is refused, reset, closed before its
//!   response head, answered with something that is not HTTP, or not
//!   answered within the [upstream timeout](BalancerBuilder::upstream_timeout)
//!   ejects its upstream at once, for [`ejection_base`](BalancerBuilder::ejection_base)
//!   (default 1 s), doubled at each further ejection in a row up to
//!   [`ejection_max`](BalancerBuilder::ejection_max) (default 30 s).
//!   Failures of requests sent before the ejection do not count again.
//!   An ejected upstream's `poll_ready` is pending, so p2c never picks it
//!   (tower's ready cache parks it, and its back-off timer or a health
//!   change wakes it). A 5xx is an answer: it does not eject. Nothing a
//!   client does counts against an upstream: a request body that fails
//!   (400), a timeout that passed while the client was still uploading
//!   (408), a request head over
//!   [`max_request_head`](BalancerBuilder::max_request_head) (431, not
//!   forwarded: an upstream with a smaller limit might reset on it), a
//!   connection the upstream closed while a request body was still being
//!   written to it (a 502, not retried: that is how servers refuse a body
//!   they will not take, a `413` and a close; counted as a `reset`
//!   failure, it never ejects; three in a row with no answer between make
//!   the upstream's next request a probe, so that one dropping every
//!   connection goes as soon as a request without a body fails on it).
//!   Nor does a client's slowness count in peak-EWMA: a request that ends
//!   for the client's reasons leaves the upstream's estimate alone.
//! - **Active** (with a [`health_path`](BalancerBuilder::health_path)):
//!   every [`health_interval`](BalancerBuilder::health_interval) (default
//!   2 s) each upstream is asked `GET <path>`; anything but a 2xx or 3xx in
//!   time ejects it as a failed request would, and an answer ends an
//!   ejected upstream's back-off early.
//! - **Re-admission, gradually**: when the back-off ends, the upstream
//!   gets exactly one request, the probe, and no other until it answers.
//!   An answer re-admits it with a fresh peak-EWMA and a slow start: for
//!   [`slow_start`](BalancerBuilder::slow_start) (default 10 s) its weight
//!   ramps from 0.1 to 1, and in each p2c comparison it is held back
//!   (loses to any upstream that is not) with probability `1 - weight`.
//!   A failed probe ejects it again, for twice as long. New upstreams
//!   ramp up the same way.
//! - **Panic mode**: when every upstream is ejected with time left on its
//!   back-off and none is being probed, a request does not get a 502 at
//!   once: the upstream whose back-off ends first is probed with it right
//!   away. With one upstream, a single reset would otherwise answer 502
//!   for the whole back-off. One probe at a time: requests that come
//!   while it runs (and while any probe runs with no upstream in
//!   rotation) are answered at once with a 502 marked unreachable, never
//!   kept waiting behind a probe to a black hole, so that a cache in
//!   front serves stale. Counted in
//!   `tower_scale_upstream_panic_probes_total`. A retry never probes: its
//!   answer is the first failure's.
//!
//! # Retries
//!
//! A request that failed on one upstream goes once to another, when:
//!
//! - the connection could not be made (refused, or the
//!   [connect timeout](BalancerBuilder::connect_timeout) passed): nothing
//!   was sent, so any method goes again; or
//! - the connection was reset or closed before the response head, and
//!   the method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE);
//!
//! and in both cases only if nothing of the request body was read: the
//! body travels in a wrapper that gives itself back to the balancer when
//! it is dropped unread, and a body that is empty from the start is simply
//! sent empty again. A body that was (even partly) streamed upstream is
//! never sent twice, whatever the method; nothing is buffered. A timeout
//! is never retried (the client has already waited the whole upstream
//! timeout), nor a response that was not HTTP. The retry goes through p2c
//! again, which no longer sees the failed upstream: it was ejected.
//!
//! # Forwarding
//!
//! Method, path, query, headers and body go to the chosen upstream: the
//! target is the upstream's `http://host:port` with the request's own path
//! and query, whatever host an absolute-form target names. Hop-by-hop
//! fields (`Connection` and the fields it names, `Keep-Alive`, `Proxy-*`,
//! `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are removed both ways.
//! Upstream connections are HTTP/1.1 with keep-alive, pooled per upstream
//! ([`max_idle_per_upstream`](BalancerBuilder::max_idle_per_upstream)).
//!
//! # Metrics
//!
//! Per upstream (label `upstream`, its `http://host:port`), through the
//! `metrics` facade: `tower_scale_upstream_requests_total`,
//! `tower_scale_upstream_failures_total` (label `kind`: `connect`,
//! `reset`, `timeout`, `protocol`, `health_check`),
//! `tower_scale_upstream_retries_total`,
//! `tower_scale_upstream_panic_probes_total` (probed early because every
//! upstream was ejected),
//! `tower_scale_upstream_ejections_total`, `tower_scale_upstream_load`
//! (requests waiting for their response head), and
//! `tower_scale_upstream_healthy` (1 in rotation, 0 ejected or removed).
//! [`Upstreams::status`] gives the same figures in process.

mod body;
mod config;
mod discover;
mod endpoint;
pub mod error;
mod ewma;
mod health;
mod pick;
mod probe;
mod request;
mod service;
mod stats;
mod upstreams;

pub use self::body::ResponseBody;
pub use self::config::BalancerBuilder;
pub use self::error::{BuildError, InvalidUpstream};
pub use self::request::strip_hop_by_hop;
pub use self::service::{Balancer, ResponseFuture};
pub use self::stats::FailureKind;
pub use self::upstreams::{SetOutcome, UpstreamHealth, UpstreamStatus, Upstreams};
