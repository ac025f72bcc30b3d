//! HTTP response caching (feature `http`): an RFC 9111 cache for axum and
//! hyper services, as a Tower layer.
//!
//! [`HttpCacheLayer`] wraps a whole axum `Router` or any
//! `Service<http::Request<B>>` returning `http::Response<ResBody>` (hyper 1 /
//! http-body 1 types) and keeps the inner error type. What it implements:
//!
//! - **Storing** (RFC 9111 §3): GET responses with explicit freshness
//!   (`s-maxage`, `max-age`, `Expires - Date`) whatever their status except
//!   206, or heuristic freshness (10 % of `Date - Last-Modified`, capped at a
//!   day, configurable) for the heuristically cacheable statuses; never
//!   `no-store`; never `private` in shared mode (a private mode exists);
//!   requests with `Authorization` only when the response says `public`,
//!   `s-maxage` or `must-revalidate`; never `Set-Cookie` responses unless
//!   configured; never `Vary: *`.
//! - **Keys**: the target URI (scheme from the URI, else configured;
//!   authority from the URI, else `Host`; path and query in full), plus one
//!   variant per distinct normalised value of the request headers named by
//!   `Vary`. Nothing else from the request is in the key: in particular not
//!   `X-Forwarded-Host` / `X-Forwarded-Proto` / `Forwarded`. An origin that
//!   varies its response on such a header without listing it in `Vary` can
//!   be poisoned through any shared cache (one client's header value decides
//!   what every client gets); list them in `Vary` or strip them in front.
//! - **Freshness and age** (§4.2): upstream `Age` and the request/response
//!   delay are counted in; a hit carries a correct `Age`. Invalid or
//!   conflicting `max-age` means stale (see [`cache_control`]).
//! - **Revalidation** (§4.3): a stale entry is revalidated with
//!   `If-None-Match` / `If-Modified-Since` (a conditional request, not a
//!   refetch); a 304 freshens the stored headers. `no-cache`,
//!   `must-revalidate`, `proxy-revalidate` force it. Clients' own
//!   conditional requests get a 304 from the cache when the entry matches.
//! - **Request directives** (§5.2.1): `no-cache`, `no-store`, `max-age`,
//!   `max-stale`, `min-fresh`, `only-if-cached` (a 504 when nothing is
//!   stored), and `Pragma: no-cache` without `Cache-Control`; each can be
//!   switched off ([`HonourRequest`]) for a server-side cache.
//! - **Invalidation** (§4.4): a successful POST, PUT, PATCH or DELETE
//!   invalidates the target URI and a same-origin `Location` /
//!   `Content-Location`.
//! - **RFC 5861**: `stale-while-revalidate` (served at once, one background
//!   revalidation per key) and `stale-if-error` (5xx or a service error).
//! - **HEAD** is answered from a stored GET.
//! - **Bodies** are buffered up to a limit (1 MiB by default) to be stored;
//!   a larger or endless body streams through to the client untouched and
//!   is not stored. Trailers are kept.
//! - **Misses** on one key are coalesced: one request goes upstream, the
//!   others take its stored response when it matches their `Vary` headers.

pub mod cache_control;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod db_layer;
pub mod freshness;

mod body;
mod layer;
mod service;

pub use self::body::CacheBody;
#[cfg(feature = "postgres")]
pub use self::db_layer::{DbLayer, DbLayerBuilder, DbRouting, Primary, Replica, RequestDb, Route};
pub use self::freshness::HttpCachePolicy;
pub use self::layer::{HonourRequest, HttpCacheLayer, HttpCacheLayerBuilder};
pub use self::service::{HttpCache, HttpResponseFuture};
