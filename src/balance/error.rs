//! The balancer's errors: an upstream address it refuses, and what
//! [`BalancerBuilder::build`](super::BalancerBuilder::build) refuses.

use crate::error::ConfigError;

/// An upstream address [`Upstreams`](super::Upstreams) refuses.
///
/// Upstreams are written `http://HOST:PORT` (the port defaults to 80): the
/// balancer keeps each request's own path and query, and speaks HTTP/1.1
/// in clear to its upstreams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidUpstream {
    /// Not `http://` (TLS to upstreams is not supported).
    #[error(
        "upstream `{0}`: only http:// upstreams are supported; terminate TLS in front of the upstream"
    )]
    Scheme(String),
    /// No host.
    #[error("upstream `{0}` has no host; write it as http://HOST:PORT")]
    NoHost(String),
    /// User information (`user:password@`) in the address: refused so that
    /// it never reaches metric labels or logs (the message names the host
    /// only).
    #[error(
        "upstream `http://{0}` carries user information (user:password@); remove it: upstream addresses appear in metrics and logs"
    )]
    Credentials(String),
    /// A path or query: the balancer keeps each request's own.
    #[error(
        "upstream `{0}` has a path or query; write it as http://HOST:PORT (each request keeps its own path)"
    )]
    Path(String),
}

/// Why [`BalancerBuilder::build`](super::BalancerBuilder::build) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `build` was called outside a Tokio runtime: the balancer runs its
    /// upstream connections and health checks as tasks.
    #[error(
        "the balancer must be built inside a Tokio runtime (it spawns its connections and health checks)"
    )]
    NoRuntime,
    /// The [`Upstreams`](super::Upstreams) handle already feeds a live
    /// balancer: clone that balancer instead (clones share one upstream
    /// set, its health and its load figures).
    #[error(
        "these upstreams already feed a balancer; clone that balancer instead of building another"
    )]
    UpstreamsInUse,
}
