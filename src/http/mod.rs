//! HTTP response caching (feature `http`): an RFC 9111 cache for axum and
//! hyper services, as a Tower layer.
//!
//! [`HttpCacheLayer`] wraps a whole axum `Router` or any
//! `Service<http::Request<B>>` returning `http::Response<ResBody>` (hyper 1 /
//! http-body 1 types) and keeps the inner error type. What it implements:
//!
//! - **Storing** (RFC 9111 §3): GET responses with explicit freshness
//!   (`s-maxage`, `max-age`, `Expires - Date`) whatever their status except
//!   206, 304, 412 and 416, or heuristic freshness (10 % of
//!   `Date - Last-Modified`, capped at a day, configurable) for the
//!   heuristically cacheable statuses; never `no-store`; never `private` in
//!   shared mode (a private mode exists); requests with `Authorization` only
//!   when the response says `public`, `s-maxage` or `must-revalidate`; never
//!   `Set-Cookie` responses (in headers or trailers) unless configured;
//!   never `Vary: *`; never a response whose `Cache-Control` cannot be
//!   parsed (unless a valid targeted field replaces it, see
//!   [RFC 9213](#rfc-9213-targeted-cache-control)).
//! - **Keys**: see [the key](#the-key) below.
//! - **Freshness and age** (§4.2): upstream `Age` and the request/response
//!   delay are counted in; a hit carries a correct `Age`. Invalid or
//!   conflicting `max-age` means stale (see [`cache_control`]).
//! - **Revalidation** (§4.3): a stale entry is revalidated with
//!   `If-None-Match` / `If-Modified-Since` (a conditional request, not a
//!   refetch); a 304 freshens the stored headers, and is kept only if
//!   nothing touching the entry was invalidated since it was looked up (a
//!   purge during the revalidation is not undone by the 304). `no-cache`,
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
//! - **RFC 9213**: `CDN-Cache-Control` (or a configured list of targeted
//!   fields) replaces `Cache-Control` and `Expires`; see
//!   [below](#rfc-9213-targeted-cache-control).
//! - **Unreachable origin** (§4.2.4): when the inner service returns an
//!   error or a response marked [`UpstreamUnreachable`] (a proxy's 502 for
//!   a refused, reset or timed-out connection), a stale stored response is
//!   served, up to [`max_stale_if_unreachable`](HttpCacheLayerBuilder::max_stale_if_unreachable)
//!   of staleness (a day by default), unless a directive forbids it
//!   (`no-cache`, `must-revalidate`, `proxy-revalidate`, `s-maxage`, or
//!   the request's own): then a 504. With nothing stored, what the inner
//!   service returned passes through.
//! - **HEAD** is answered from a stored GET.
//! - **Ranges** (RFC 9110 §14): a request for one `bytes` range
//!   (`a-b`, `a-`, `-n`) of a stored `200` is answered from the cache with
//!   a `206 Partial Content` whose body is that slice of the stored body
//!   (`Content-Range`, `Content-Length` of the slice, trailers dropped),
//!   or a `416` with `Content-Range: bytes */len` when no byte of it
//!   exists; only a GET has ranges (a `HEAD` with `Range` gets the full
//!   `200`'s headers, §14.2). `If-Range` applies the range
//!   only when it names the stored strong `ETag`, or its `Last-Modified`
//!   when that is a strong validator (`Date` at least 60 s later);
//!   otherwise the whole `200` is sent. A `Range` the cache cannot read
//!   (another unit, bad syntax) is ignored (§14.2); a stored response
//!   other than `200` is sent as is. A request for several ranges (or
//!   with several `Range` lines) goes to the origin, bypassing the cache.
//!   On a **miss** the request goes to the origin as sent, `Range`
//!   included (a large file is not fetched whole for a small range), and
//!   does not hold other requests for the URL waiting; a `206` is never
//!   stored (partial responses are not combined, RFC 9111 §3.4), so the
//!   cache fills from a plain `GET`, after which every range is answered
//!   from it. A stale entry is revalidated as for any request, and the
//!   range applied to the result. Requests that waited for another's
//!   fetch, and hits from the shared tier, each get their own range.
//! - **Bodies** are buffered up to a limit (1 MiB by default) to be stored;
//!   a larger or endless body streams through to the client untouched and
//!   is not stored. Trailers are kept.
//! - **`Cache-Status`** (RFC 9211) on every response that passed through,
//!   after the origin's entries; see [`HttpCacheLayerBuilder::cache_status`].
//! - **Misses** on one key are coalesced: one request goes upstream, the
//!   others take its stored response when it matches their `Vary` headers
//!   and is fresh for their request.
//!
//! # Conformance
//!
//! RFC 9111 (and RFC 9213, RFC 5861) requirements on a shared cache, each
//! tested in `tests/http` by a test named after its section
//! (`rfc9111_4_2_2_...`):
//!
//! | section | requirement | here |
//! |---|---|---|
//! | 9111 §3 | store only GET (a method it understands), final responses (never 1xx) | yes; a response needs explicit or heuristic freshness (one with only a validator is not stored) |
//! | 9111 §3.1 | do not store connection-specific fields | yes |
//! | 9111 §3.2 | update stored fields from a 304 | yes |
//! | 9111 §3.3 | incomplete responses | not stored (a body that fails or exceeds `max_body` streams through) |
//! | 9111 §3.4 | combining partial content | no: a 206 is never stored |
//! | 9111 §3.5 | `Authorization` only with `public`, `s-maxage`, `must-revalidate` | yes |
//! | 9111 §4 | another target URI never answered | yes (with a custom key, the target as the key function normalises it) |
//! | 9111 §4.1 | `Vary` selects; `Vary: *` never matches | yes |
//! | 9111 §4.2 | stale not reused without validation (unless allowed) | yes |
//! | 9111 §4.2.1 | `s-maxage` > `max-age` > `Expires` | yes |
//! | 9111 §4.2.2 | heuristics only for heuristically cacheable statuses or `public` | yes |
//! | 9111 §4.2.3 | age calculation, upstream `Age` added | yes |
//! | 9111 §4.3.1–§4.3.4 | conditional revalidation, 304 to clients, freshening | yes |
//! | 9111 §4.3.5 | HEAD from a stored GET | yes |
//! | 9111 §4.4 | unsafe methods invalidate the target, `Location`, `Content-Location` (same origin) | yes |
//! | 9111 §5.1 | `Age` on hits; an invalid `Age` (not one non-negative integer) makes the response stale | yes |
//! | 9111 §5.2.1 | request `max-age`, `max-stale`, `min-fresh`, `no-cache`, `no-store`, `only-if-cached` | yes (switchable: [`HonourRequest`]) |
//! | 9111 §5.2.2 | response `must-revalidate`, `must-understand`, `no-cache`, `no-store`, `no-transform` (never transformed), `private`, `proxy-revalidate`, `public`, `s-maxage`, `max-age` | yes |
//! | 9111 §5.3 | invalid `Expires` is in the past | yes |
//! | 9111 §5.4 | request `Pragma: no-cache` without `Cache-Control` | yes |
//! | 9111 §5.5 | `Warning` (obsolete) | never generated |
//! | 5861 | `stale-while-revalidate`, `stale-if-error` | yes |
//!
//! `must-understand` is honoured for the status codes whose caching this
//! cache implements ([`freshness::understood`]): the heuristically
//! cacheable ones but 206, and 302 and 307.
//!
//! # RFC 9213: targeted cache control
//!
//! The cache has a target list ([`HttpCacheLayerBuilder::targeted_fields`],
//! default `["cdn-cache-control"]`). What is and is not implemented:
//!
//! | RFC 9213 | here |
//! | --- | --- |
//! | §2.1: the first field of the list that is present, valid and non-empty decides, and `Cache-Control` and `Expires` are ignored | yes, per response (so per 304 merge and per value read back from the shared tier) |
//! | §2.1: otherwise `Cache-Control` and `Expires` | yes: an invalid or empty field is ignored as if absent, and the next one is tried |
//! | §2.1: `max-age`, `must-revalidate`, `no-store`, `no-cache`, `private` must be implemented | yes, and `s-maxage`, `public`, `proxy-revalidate`, `immutable`, `stale-while-revalidate`, `stale-if-error` |
//! | §2.1: other mechanisms (`Authorization`, `Vary`) still apply | yes, and `Set-Cookie`, request directives, 304 merging |
//! | §2.1: fields not on the list change nothing and are passed on | yes |
//! | §2.2: an RFC 8941 dictionary; one that does not parse is ignored in its entirety | yes (the `sfv` crate, RFC 8941 mode); a key given twice takes its last value |
//! | §2.2: parameters on directives ignored | yes |
//! | §2.2: values mapped to types | `max-age`/`s-maxage` not a non-negative Integer: stale (lifetime 0); `stale-*` not one: ignored; a flag counts unless `?0` (see [`targeted`]) |
//! | §3: `CDN-Cache-Control`; a CDN may remove it | in the default list; removed from every response leaving the cache unless [`strip_targeted_fields(false)`](HttpCacheLayerBuilder::strip_targeted_fields) (always kept in storage) |
//! | a target list per request | no: one list per cache |
//!
//! # One engine with the core cache
//!
//! The HTTP cache keeps its responses in the cache core's machinery; only
//! the RFC 9111 logic (storability, freshness, validators, `Vary`, 304
//! merging) lives here.
//!
//! - **Store**: the core's [`Store`](crate::cache::Store), moka by default
//!   ([`HttpCacheLayerBuilder::build`]) or quick_cache
//!   (`HttpCacheLayerBuilder::build_quick`, feature `quick-cache`), bounded
//!   by [`max_bytes`](HttpCacheLayerBuilder::max_bytes). One entry per URL
//!   holds its `Vary` variants ([`StoredVariants`]). Evictions, hits,
//!   misses and the rest are the core's [`CacheStats`](crate::cache::CacheStats).
//! - **Tags**: a response names its tags in a header (default
//!   `surrogate-key`, see [`HttpCacheLayerBuilder::tag_header`]); the
//!   header is stripped before any response leaves the cache unless
//!   [`pass_tag_header`](HttpCacheLayerBuilder::pass_tag_header) is on.
//! - **Invalidation**: [`HttpCacheLayer::invalidator`] is the core's
//!   [`Invalidator`](crate::cache::Invalidator) (by key, the cache key
//!   string; by tag; all; with versions), with the core's guarantees: a
//!   response whose fetch began before an invalidation touching it (its
//!   key, one of its tags, everything) is not stored, and a request that
//!   starts after the invalidation returned never gets it (not from the
//!   store, not by joining that fetch, not from the shared tier). A tag
//!   invalidation drops every variant of the URLs it touches.
//! - **Purge**: [`HttpCacheLayer::purge`] invalidates by tags, URLs
//!   (every variant) or all and counts the entries it removed on this
//!   instance (a walk of the store: an admin action, not a hot path);
//!   `HttpCacheLayer::purge_router` (feature `purge`) serves it as an
//!   axum `Router`, `POST /_purge` behind a bearer token.
//! - **Shared tier**: `cache::redis::builder(url).attach(&layer,
//!   layer.redis_codec())` (feature `redis`) shares responses between
//!   instances: a miss asks the tier once; what a miss or a revalidation
//!   stores is written to it under its lease (refused after any
//!   invalidation since). The rules above apply to what comes back from
//!   it: every variant is checked again against this cache's storing rules
//!   (a per-user response is dropped, never served), selected by `Vary`,
//!   and freshness-checked with its age including the time it spent in the
//!   tier; this cache's tag-header and `max_body` settings apply to it too.
//!   The cross-instance invalidation bound is the tier's (see
//!   `cache::redis`). A private cache cannot take a tier. Unlike the core
//!   cache, a miss does not wait for another instance that holds the lease
//!   on the same URL: it fills here too and does not write the tier.
//!
//! # Consistency tokens
//!
//! Outside [`DbLayer`](crate::pg::DbLayer), the cache keeps read-your-writes
//! ([`HttpCacheLayerBuilder::request_version_from`], or
//! [`request_version`](HttpCacheLayerBuilder::request_version) for another
//! token source):
//!
//! - every stored variant is stamped with the [`DataVersion`](crate::cache::DataVersion)
//!   its response carried in its extensions (`DbLayer` sets it: the lowest
//!   LSN among the request's reads and writes); one without it is
//!   unstamped;
//! - a request whose token asks for version `t` is answered from a variant
//!   stamped `s` only when `s >= t`; otherwise (a newer token, an
//!   unstamped variant, or a token whose position is unknown) it is a
//!   miss: it goes to the origin, whose response replaces the variant. A
//!   request without a token (or with one that is forged, expired or of
//!   another cluster) is answered as before;
//! - a request only waits for another's fetch of the same URL when that
//!   request's token is at least its own, and takes its response only
//!   when the stamp covers its token;
//! - the invalidator's `*_at` forms keep out a response stamped below
//!   their version, even one whose fetch began after them;
//! - stamps travel through the shared tier with each variant.
//!
//! Responses answered from the cache carry [`CacheHit`] in their
//! extensions (from this instance's store or from the shared tier).
//!
//! # Guarantees: nothing per-user is shared
//!
//! In a shared cache (the default), whatever the origin or the client
//! sends, one user's response never reaches another:
//!
//! 1. **Revalidation re-checks sharing.** The response merged from a 304
//!    (stored body, stored headers updated by the 304's) goes through every
//!    storing rule again and is keyed by the revalidating request's values
//!    of the merged `Vary`. When the 304 makes it per-user (`Set-Cookie`,
//!    `private`, `no-store`, an unparseable `Cache-Control`, `Vary: *`),
//!    only the client whose request revalidated gets it (with its
//!    `Set-Cookie`, also in a 304 the cache makes for that client) and
//!    nothing is left stored under the key. When only that request keeps it
//!    out (its `Authorization` without `public` / `s-maxage` /
//!    `must-revalidate`, or its `no-store`), that client alone gets it and
//!    the stored response it validated stays as it was, holding nothing of
//!    that client's. A 304, 412 or 416 is never stored as a response of its
//!    own: each answers one client's validators, preconditions or range.
//! 2. **The parser fails safe** ([`cache_control`]). Everything RFC 9110
//!    allows in a field value (quoted strings with obs-text, escapes and
//!    commas; odd white space; unknown extensions with or without values;
//!    empty members; repeated lines) is read without dropping a directive.
//!    A line that breaks the grammar still has its directives' names read
//!    (`private`, `no-store`, `no-cache` are never lost) and makes the
//!    response not storable. A targeted field (RFC 9213) is read as a
//!    strict Structured Fields dictionary instead: one that does not parse
//!    is ignored as a whole, and `Cache-Control` applies.
//! 3. **One authority.** A request whose absolute-form target names
//!    another authority than its `Host` header (ports compared with the
//!    scheme's default filled in, no userinfo), or that has several `Host`
//!    lines, is neither stored nor answered from the cache: the origin may
//!    build its response from either. An unsafe method sent that way
//!    invalidates the keys of both authorities.
//! 4. **Switches work.** Each [`HonourRequest`] switch takes effect, and
//!    storing looks at the request directives as switched: with
//!    `no_store` off a client's `no-store` does not keep a response out.
//! 5. **Unkeyed inputs are the origin's to declare**: see
//!    [the key](#the-key).
//!
//! A targeted field (RFC 9213, `CDN-Cache-Control`) is the origin speaking
//! to this cache in place of `Cache-Control`: `CDN-Cache-Control:
//! max-age=60` makes a response with `Cache-Control: private` storable
//! here, as the RFC means; `Set-Cookie`, `Authorization` (whose sharing
//! then needs `public`, `s-maxage` or `must-revalidate` in the targeted
//! field), `Vary` and the 304 rules are unchanged. An origin whose
//! responses are per-user must not send one.
//!
//! A private cache ([`HttpCacheLayerBuilder::private`]) is one user's and
//! stores `private` responses; [`HttpCacheLayerBuilder::share_set_cookie`]
//! shares `Set-Cookie` responses, a 304's included. Use neither in front
//! of several users unless that is what the origin means.
//!
//! # The key
//!
//! A stored response is found by exactly these parts of the request:
//!
//! - the **method**: GET (a HEAD is answered from the stored GET);
//! - the **scheme**: the target URI's, else the configured default
//!   ([`HttpCacheLayerBuilder::default_scheme`]);
//! - the **authority**: the target URI's, else the `Host` header's
//!   (lower-cased; see guarantee 3 when both are there);
//! - the **path and query**, byte for byte;
//! - the values of the request headers the stored response names in
//!   **`Vary`** (lines joined, white space around commas normalised).
//!
//! With [`HttpCacheLayerBuilder::cache_key`] the path and query may be
//! normalised (a sorted query) and parts taken from the request added (a
//! device class); the scheme and authority rules above still apply, and an
//! unsafe method still invalidates every entry of its target.
//!
//! Nothing else is: not `Cookie`, not `Authorization` (those are handled
//! by the storing rules above, not the key), not `Accept-Encoding` or
//! `Accept-Language`, and not `X-Forwarded-Host`, `X-Forwarded-Proto`,
//! `Forwarded` or any other header. `Vary` is how an origin adds one: an
//! origin whose response depends on a request header it does not name in
//! `Vary` can be poisoned through any shared cache (one client's header
//! value decides what every client gets), so list such headers in `Vary`
//! or strip them in front of the cache.

pub mod cache_control;
/// Moved to [`crate::pg::layer`]: database routing is not HTTP caching.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[deprecated(since = "0.2.0", note = "moved to `tower_scale::pg::layer`")]
pub mod db_layer {
    pub use crate::pg::layer::*;
}

/// Moved to [`crate::pg::DbLayer`].
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "moved to `tower_scale::pg::DbLayer`")]
pub type DbLayer = crate::pg::DbLayer;
/// Moved to [`crate::pg::DbLayerBuilder`].
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "moved to `tower_scale::pg::DbLayerBuilder`")]
pub type DbLayerBuilder = crate::pg::DbLayerBuilder;
/// Moved to [`crate::pg::DbRouting`].
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "moved to `tower_scale::pg::DbRouting`")]
pub type DbRouting<S> = crate::pg::DbRouting<S>;
/// Moved to [`crate::pg::RequestDb`].
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "moved to `tower_scale::pg::RequestDb`")]
pub type RequestDb = crate::pg::RequestDb;
/// Moved to [`crate::pg::Route`].
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "moved to `tower_scale::pg::Route`")]
pub type Route = crate::pg::Route;
pub mod freshness;
pub mod targeted;

mod body;
mod config;
mod custom_key;
mod future;
mod key;
mod layer;
mod layer_cdn;
mod purge;
#[cfg(feature = "purge")]
mod purge_route;
mod range;
#[cfg(feature = "redis")]
pub(crate) mod remote;
mod service;
mod stack_buf;
mod stand_in;
mod state;
mod status;
mod stored;
mod unsafe_method;
mod upstream;

pub use self::body::CacheBody;
pub use self::config::{HonourRequest, MAX_TAG_LEN, MAX_TAGS};
pub use self::custom_key::{InvalidPath, KeyParts};
pub use self::freshness::HttpCachePolicy;
pub use self::future::HttpResponseFuture;
pub use self::layer::{HttpCacheLayer, HttpCacheLayerBuilder};
pub use self::purge::Purge;
#[cfg(feature = "purge")]
#[cfg_attr(docsrs, doc(cfg(feature = "purge")))]
pub use self::purge_route::{PURGE_BODY_TIMEOUT, PURGE_MAX_BODY};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::remote::HttpRedisCodec;
pub use self::service::HttpCache;
pub use self::stand_in::UpstreamUnreachable;
pub use self::stored::{CacheHit, StoredVariants};
