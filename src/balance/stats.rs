//! Per-upstream counters, kept twice: atomics for
//! [`Upstreams::status`](super::Upstreams::status), and `metrics` handles
//! registered once when the upstream is added (no label allocation per
//! request).

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge};

/// Why a request to an upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The connection could not be made (refused, or the connect timed
    /// out): nothing was sent.
    Connect,
    /// The connection was reset or closed before a response head came.
    Reset,
    /// No response head within the upstream timeout.
    Timeout,
    /// The upstream answered with something that is not HTTP/1.
    Protocol,
    /// The active health check got a status other than 2xx or 3xx.
    HealthCheck,
}

impl FailureKind {
    /// The `kind` label of `tower_scale_upstream_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::HealthCheck => "health_check",
        }
    }

    const ALL: [Self; 5] = [
        Self::Connect,
        Self::Reset,
        Self::Timeout,
        Self::Protocol,
        Self::HealthCheck,
    ];
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
pub(crate) struct UpstreamStats {
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) panic_probes: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    metrics: Metrics,
}

#[derive(Debug)]
struct Metrics {
    requests: Counter,
    failures: [Counter; 5],
    retries: Counter,
    panic_probes: Counter,
    ejections: Counter,
    load: Gauge,
    healthy: Gauge,
}

impl UpstreamStats {
    pub(crate) fn new(upstream: &str) -> Self {
        let label = || ("upstream", upstream.to_string());
        let failures = FailureKind::ALL.map(|kind| {
            metrics::counter!(
                "tower_scale_upstream_failures_total",
                &[label(), ("kind", kind.as_str().to_string())]
            )
        });
        let metrics = Metrics {
            requests: metrics::counter!("tower_scale_upstream_requests_total", &[label()]),
            failures,
            retries: metrics::counter!("tower_scale_upstream_retries_total", &[label()]),
            panic_probes: metrics::counter!("tower_scale_upstream_panic_probes_total", &[label()]),
            ejections: metrics::counter!("tower_scale_upstream_ejections_total", &[label()]),
            load: metrics::gauge!("tower_scale_upstream_load", &[label()]),
            healthy: metrics::gauge!("tower_scale_upstream_healthy", &[label()]),
        };
        metrics.healthy.set(1.0);
        metrics.load.set(0.0);
        Self {
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            panic_probes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            metrics,
        }
    }

    /// A request is sent.
    pub(crate) fn sent(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests.increment(1);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.load.set(now as f64);
    }

    /// A request sent ended (answered, failed or abandoned).
    pub(crate) fn ended(&self) {
        let now = self
            .in_flight
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.metrics.load.set(now as f64);
    }

    pub(crate) fn failed(&self, kind: FailureKind) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let i = FailureKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.metrics.failures[i].increment(1);
    }

    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.retries.increment(1);
    }

    /// Probed early because every upstream was ejected (panic mode).
    pub(crate) fn panic_probe(&self) {
        self.panic_probes.fetch_add(1, Ordering::Relaxed);
        self.metrics.panic_probes.increment(1);
    }

    pub(crate) fn ejected(&self) {
        self.metrics.ejections.increment(1);
        self.metrics.healthy.set(0.0);
    }

    pub(crate) fn healthy(&self, healthy: bool) {
        self.metrics.healthy.set(if healthy { 1.0 } else { 0.0 });
    }

    /// The upstream left the set: its gauges go to zero.
    pub(crate) fn removed(&self) {
        self.metrics.healthy.set(0.0);
        self.metrics.load.set(0.0);
    }
}
