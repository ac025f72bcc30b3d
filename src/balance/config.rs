//! [`BalancerBuilder`]: the balancer's settings, validated in `build`.

use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;

/// Below the 5 s keep-alive timeout of many servers (Node, Apache,
/// hyper's examples): the client closes an idle connection first.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The longest duration setting: a year.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);
use super::error::BuildError;
use super::ewma::PeakEwma;
use super::health::Backoff;
use super::service::Balancer;
use super::upstreams::Upstreams;
use crate::error::ConfigError;
use crate::random::Random;

/// What every part of one balancer reads.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) upstream_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) health_path: Option<PathAndQuery>,
    pub(crate) health_interval: Duration,
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
    pub(crate) max_request_head: usize,
    /// The ramp's draws and p2c's picks.
    pub(crate) random: Arc<Random>,
}

impl Settings {
    /// A fresh peak-EWMA: no latency measured yet, so `default_rtt`
    /// stands in until the first response.
    pub(crate) fn peak_ewma(&self) -> PeakEwma {
        PeakEwma::new(self.default_rtt, self.decay, tokio::time::Instant::now())
    }
}

/// Builds a [`Balancer`]; from [`Balancer::builder`].
///
/// Every setting has a default; `build` checks them and needs a Tokio
/// runtime (its upstream connections and, with a health path, its health
/// checks run as tasks on it).
#[derive(Debug, Clone)]
#[must_use]
pub struct BalancerBuilder {
    upstream_timeout: Duration,
    connect_timeout: Option<Duration>,
    health_path: Option<String>,
    health_interval: Duration,
    ejection_base: Duration,
    ejection_max: Duration,
    slow_start: Duration,
    default_rtt: Duration,
    decay: Duration,
    max_idle_per_upstream: usize,
    idle_timeout: Duration,
    max_request_head: usize,
    seed: u64,
}

impl Default for BalancerBuilder {
    fn default() -> Self {
        let backoff = Backoff::default();
        Self {
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: None,
            health_path: None,
            health_interval: Duration::from_secs(2),
            ejection_base: backoff.base,
            ejection_max: backoff.max,
            slow_start: backoff.slow_start,
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
            max_idle_per_upstream: 64,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_request_head: 64 * 1024,
            seed: 0x2545_F491_4F6C_DD1D,
        }
    }
}

/// The connect timeout when none is set: short, since connecting to a
/// live upstream on the same network takes milliseconds, and a refused or
/// timed-out connect is retried on another upstream.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl BalancerBuilder {
    /// Bounds the connection and the response head of each request to an
    /// upstream (not the body that streams after the head). A request that
    /// gets no head in time is answered with a 502 marked
    /// [`UpstreamUnreachable`](crate::http::UpstreamUnreachable), and the
    /// upstream is ejected. Default 30 s.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_timeout = timeout;
        self
    }

    /// Bounds making the connection (within the upstream timeout); a
    /// connect that times out sent nothing and is retried on another
    /// upstream. Default 2 s, or the upstream timeout if that is shorter.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// The path the active health check asks each upstream for (`GET`,
    /// healthy on a 2xx or 3xx within the upstream timeout), every
    /// [`health_interval`](Self::health_interval). `None` (the default):
    /// passive health only.
    pub fn health_path(mut self, path: Option<String>) -> Self {
        self.health_path = path;
        self
    }

    /// How often the active health check runs. Default 2 s.
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// The first ejection's length; each further failure in a row doubles
    /// it, up to [`ejection_max`](Self::ejection_max). Default 1 s.
    pub fn ejection_base(mut self, base: Duration) -> Self {
        self.ejection_base = base;
        self
    }

    /// The longest ejection. Default 30 s.
    pub fn ejection_max(mut self, max: Duration) -> Self {
        self.ejection_max = max;
        self
    }

    /// How long an upstream takes to reach its full share after it was
    /// added or re-admitted (it starts at a tenth). Zero: at once.
    /// Default 10 s.
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.slow_start = window;
        self
    }

    /// The response time assumed for an upstream not measured yet (new,
    /// or back from an ejection); the first response replaces it. Default
    /// 1 ms: low, so that a new upstream gets its first requests at once
    /// (the slow start bounds how many).
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt = rtt;
        self
    }

    /// How fast the peak-EWMA forgets a slow response (its decay time
    /// constant). Default 10 s.
    pub fn decay(mut self, decay: Duration) -> Self {
        self.decay = decay;
        self
    }

    /// Idle keep-alive connections kept per upstream. Default 64.
    pub fn max_idle_per_upstream(mut self, max: usize) -> Self {
        self.max_idle_per_upstream = max;
        self
    }

    /// How long an idle keep-alive connection is kept. Default 4 s: keep
    /// it below every upstream's own keep-alive timeout (often 5 s), or an
    /// upstream closing an idle connection just as a request goes out on
    /// it fails that request (a reset: the request may be retried if it is
    /// idempotent, and the upstream is ejected).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The largest request head forwarded (the target and every header's
    /// name and value), in bytes; a larger one is answered with a 431 by
    /// the balancer itself. An upstream with a smaller limit may close the
    /// connection on a large head before answering, which would count
    /// against it: a client could eject upstreams at will. Default 64 KiB.
    pub fn max_request_head(mut self, bytes: usize) -> Self {
        self.max_request_head = bytes;
        self
    }

    /// Seeds the balancer's random choices (p2c's pairs, the ramp's
    /// draws), for reproducible tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    fn settings(&self) -> Result<(Settings, Duration), ConfigError> {
        let positive = |field: &'static str, value: Duration| {
            if value.is_zero() {
                Err(ConfigError::ZeroDuration { field, value })
            } else if value > MAX_DURATION {
                // Added to an `Instant` on the request path: bounded so
                // that it cannot overflow.
                Err(ConfigError::OutOfRange {
                    field,
                    reason: format!("{value:?} is over a year"),
                })
            } else {
                Ok(())
            }
        };
        positive("upstream_timeout", self.upstream_timeout)?;
        positive("health_interval", self.health_interval)?;
        positive("ejection_base", self.ejection_base)?;
        positive("default_rtt", self.default_rtt)?;
        positive("decay", self.decay)?;
        positive("idle_timeout", self.idle_timeout)?;
        positive("ejection_max", self.ejection_max)?;
        positive("slow_start", self.slow_start.max(Duration::from_nanos(1)))?;
        if self.max_request_head == 0 {
            return Err(ConfigError::Zero {
                field: "max_request_head",
            });
        }
        if self.ejection_max < self.ejection_base {
            return Err(ConfigError::OutOfRange {
                field: "ejection_max",
                reason: format!(
                    "{:?} is below ejection_base ({:?}); set it at least as long",
                    self.ejection_max, self.ejection_base
                ),
            });
        }
        let connect_timeout = match self.connect_timeout {
            Some(t) => {
                positive("connect_timeout", t)?;
                if t > self.upstream_timeout {
                    return Err(ConfigError::OutOfRange {
                        field: "connect_timeout",
                        reason: format!(
                            "{t:?} is longer than upstream_timeout ({:?}), which bounds the connect too",
                            self.upstream_timeout
                        ),
                    });
                }
                t
            }
            None => DEFAULT_CONNECT_TIMEOUT.min(self.upstream_timeout),
        };
        let health_path = match &self.health_path {
            None => None,
            Some(path) => match path.parse::<PathAndQuery>() {
                Ok(p) if p.as_str().starts_with('/') => Some(p),
                _ => {
                    return Err(ConfigError::OutOfRange {
                        field: "health_path",
                        reason: format!("{path:?} is not a path; write it as /health"),
                    });
                }
            },
        };
        let settings = Settings {
            upstream_timeout: self.upstream_timeout,
            backoff: Backoff {
                base: self.ejection_base,
                max: self.ejection_max,
                slow_start: self.slow_start,
            },
            health_path,
            health_interval: self.health_interval,
            default_rtt: self.default_rtt,
            decay: self.decay,
            max_request_head: self.max_request_head,
            random: Arc::new(Random::new(self.seed)),
        };
        Ok((settings, connect_timeout))
    }

    /// The balancer over `upstreams` (which it follows as they change).
    ///
    /// Fails on a setting out of range, outside a Tokio runtime, and when
    /// `upstreams` already feeds a live balancer (clone that one instead).
    pub fn build<B>(self, upstreams: &Upstreams) -> Result<Balancer<B>, BuildError>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (settings, connect_timeout) = self.settings()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BuildError::NoRuntime);
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(self.max_idle_per_upstream)
            .pool_idle_timeout(self.idle_timeout)
            .pool_timer(TokioTimer::new())
            .build::<_, RequestBody<B>>(connector);
        let changes = upstreams.bind(settings.backoff)?;
        Ok(Balancer::start(
            upstreams.clone(),
            changes,
            client,
            Arc::new(settings),
        ))
    }
}

impl Balancer<Incoming> {
    /// A builder with the default settings.
    pub fn builder() -> BalancerBuilder {
        BalancerBuilder::default()
    }
}
