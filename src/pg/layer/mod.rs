//! Per-request database routing for HTTP services, with consistency tokens
//! that travel with the client (features `http` and `postgres`).
//!
//! [`DbLayer`] puts a [`RequestDb`] into every request's extensions:
//! safe methods (GET, HEAD, OPTIONS) read from replicas, unsafe ones go to
//! the primary, and a per-route override can change that. The client's
//! token (cookie `tower_scale_token`, its value plain or in double quotes
//! as RFC 6265 allows, or header `x-consistency-token`; when both are valid
//! the newer wins) turns replica reads into read-your-writes reads; a write
//! whose commit position could not be learned hands out a token that sends
//! the client's reads to the primary until it expires. When a request wrote, its response carries the new token in both
//! (`HttpOnly`, `SameSite=Lax`, `Path=/`, `Max-Age` = the token lifetime,
//! `Secure` as an option), so any instance can serve the client's next
//! request. Forged, malformed, oversized, expired or far-future tokens are
//! ignored: the request gets the default consistency.
//!
//! A response of a request that read or wrote through its [`RequestDb`]
//! carries the [`DataVersion`] of that data in its extensions (the lowest
//! position among its reads and writes: what all of it reflects at least).
//! An [`HttpCacheLayer`](crate::http::HttpCacheLayer) outside `DbLayer`
//! stamps what it stores with it, and with
//! [`request_version_from`](crate::http::HttpCacheLayerBuilder::request_version_from)
//! answers a request from a stored response only when the stamp is at or
//! above the request's token.
//!
//! What it costs a request that carries no token: one pass over the
//! request's header names (nothing hashed, decoded, allocated or
//! HMAC-verified), one allocation for the state its [`RequestDb`] shares
//! with the response future (plus the extension's box), and two atomic
//! loads on the way out when the handler neither wrote nor read through
//! it (a cache hit).
//!
//! The pieces: [`DbLayer`] and its builder (`db_layer.rs`: routes, the token's
//! cookie and header), the service it makes ([`DbRouting`], `service.rs`)
//! and its future (`future.rs`), and what handlers use ([`RequestDb`] and
//! the [`Primary`] / [`Replica`] extractors, `request.rs`).

mod db_layer;
mod future;
mod request;
mod service;

pub use self::db_layer::{DbLayer, DbLayerBuilder, Route};
pub use self::future::DbRoutingFuture;
pub use self::request::{MissingDbLayer, Primary, Replica, RequestDb};
pub use self::service::DbRouting;
pub use crate::cache::DataVersion;
