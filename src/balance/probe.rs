//! The active health check: every interval, `GET` the health path of
//! every upstream at once. A failure (refused, reset, no answer within the
//! upstream timeout and the interval, or a status other than 2xx and 3xx)
//! ejects the upstream as a failed request would; an answer ends an
//! ejected upstream's back-off (its next request is the probe that
//! re-admits it).

use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Uri, header};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::config::Settings;
use super::request::{Outcome, classify, target};
use super::stats::FailureKind;
use super::upstreams::{UpstreamState, Upstreams};
use crate::sync::lock;

/// Runs until `stop` is cancelled (the last balancer clone dropped).
pub(crate) async fn run(
    upstreams: Upstreams,
    settings: Arc<Settings>,
    path: PathAndQuery,
    stop: CancellationToken,
) {
    let mut connector = HttpConnector::new();
    let timeout = settings.upstream_timeout.min(settings.health_interval);
    connector.set_connect_timeout(Some(timeout));
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(connector);
    let mut interval = tokio::time::interval(settings.health_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = Uri::from(path);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let states = upstreams.states();
        let checks = states
            .iter()
            .map(|u| check(&client, u, &path, &settings, timeout));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = futures_util::future::join_all(checks) => {}
        }
    }
}

async fn check(
    client: &Client<HttpConnector, Empty<Bytes>>,
    upstream: &UpstreamState,
    path: &Uri,
    settings: &Settings,
    timeout: std::time::Duration,
) {
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = target(&upstream.scheme, &upstream.authority, path);
    req.headers_mut().insert(
        header::USER_AGENT,
        http::HeaderValue::from_static("tower-scale-health-check"),
    );
    let failure = match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(res)) if res.status().is_success() || res.status().is_redirection() => None,
        Ok(Ok(res)) => {
            tracing::debug!(upstream = %upstream.key, status = %res.status(), "health check failed");
            Some(FailureKind::HealthCheck)
        }
        Ok(Err(error)) => {
            tracing::debug!(upstream = %upstream.key, %error, "health check failed");
            match classify(&error) {
                Outcome::Upstream(kind) => Some(kind),
                Outcome::Request | Outcome::SlowClient | Outcome::ClosedDuringUpload => {
                    Some(FailureKind::Protocol)
                }
            }
        }
        Err(_) => Some(FailureKind::Timeout),
    };
    match failure {
        None => {
            lock(&upstream.health).check_passed();
        }
        Some(kind) => upstream.failed(kind, None, &settings.backoff),
    }
}
