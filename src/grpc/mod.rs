//! Unary gRPC response caching (feature `grpc`), for tonic servers or any
//! `Service<http::Request<B>>` speaking gRPC over HTTP/2, on the crate's
//! cache core ([`crate::cache`]): one store, single-flight and stats per
//! [`GrpcCacheLayer`], whatever the body types of the services it wraps.
//!
//! - **Opt-in per method path** (`/package.Service/Method`), each with its
//!   TTL; every other path, and every call whose request is not one
//!   complete message within the size limit (a streaming call, say),
//!   passes through untouched.
//! - **Key** ([`GrpcKey`]): the path, the request message bytes, and every
//!   value of the metadata keys you name
//!   ([`GrpcCacheLayerBuilder::key_metadata`]), plus the protocol headers
//!   `content-type`, `grpc-encoding` and `grpc-accept-encoding`. Metadata
//!   you do not name is not in the key: a method whose answer depends on
//!   it must name it.
//! - Requests carrying `authorization` metadata bypass the cache, unless
//!   `authorization` is one of the key's metadata keys (then each caller's
//!   credentials get their own entries).
//! - A response is stored only when it is HTTP 200 with `grpc-status: 0`
//!   (in its trailers, or in the headers of a trailers-only response) and
//!   exactly one well-framed message: gRPC errors travel as HTTP 200 and
//!   are never stored. A hit returns the stored headers, message and
//!   trailers.
//! - Concurrent identical calls are coalesced (the core's single-flight),
//!   and share the response only if it is stored. Anything else goes only
//!   to the caller whose call it was, and each coalesced caller makes its
//!   own call: a response over the size limit (streamed through
//!   unchanged), and any error, which may be down to that caller's own
//!   metadata (a short `grpc-timeout`, say).
//! - A bad configuration is an error from
//!   [`build`](GrpcCacheLayerBuilder::build), never a cache that silently
//!   does nothing.
//! - **Store**: moka with [`build`](GrpcCacheLayerBuilder::build), or
//!   quick_cache with `build_quick` (feature `quick-cache`); either is
//!   bounded by [`max_bytes`](GrpcCacheLayerBuilder::max_bytes) (or
//!   entries) and counts its evictions in
//!   [`stats`](GrpcCacheLayer::stats).
//! - **Sharing through Redis** (feature `redis`): `cache::redis::builder(url)
//!   .attach(&layer, layer.redis_codec())` puts a shared tier behind the
//!   store, keyed by the whole [`GrpcKey`]; invalidations (by key, by method
//!   tag, all) reach every instance. What comes back from Redis is checked
//!   again against this cache's storing rules and served only for the key
//!   it was written with (see `GrpcCacheLayer::redis_codec`).
//!
//! ```
//! use std::time::Duration;
//! use tower_scale::grpc::GrpcCacheLayer;
//!
//! # fn main() -> Result<(), tower_scale::cache::BuildError> {
//! let layer = GrpcCacheLayer::builder()
//!     .method("/users.v1.Users/GetUser", Duration::from_secs(30))
//!     .key_metadata("x-tenant")
//!     .build()?;
//! // Server::builder().layer(layer.clone()).add_service(UsersServer::new(svc))
//! assert_eq!(layer.stats().hits, 0);
//!
//! // A mistake is refused when the layer is built:
//! let bad = GrpcCacheLayer::builder()
//!     .method("GetUser", Duration::from_secs(30))
//!     .build();
//! assert!(bad.is_err());
//! # Ok(()) }
//! ```

mod fetch;
mod future;
mod key;
mod layer;
#[cfg(feature = "redis")]
mod remote;
mod service;
mod store;

pub use self::fetch::Fetched;
pub use self::future::ResponseFuture;
pub use self::key::GrpcKey;
pub use self::layer::{GrpcCacheLayer, GrpcCacheLayerBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::remote::GrpcRedisCodec;
pub use self::service::GrpcCache;

/// The request body the inner service receives: the buffered message, or
/// the caller's body (after any prefix read while buffering). The same type
/// as the HTTP cache's response body.
pub type GrpcBody<B> = crate::http::CacheBody<B>;
