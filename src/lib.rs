//! # tower-scale
//!
//! Tower layers that take a Rust service from one server to millions of
//! users, the way the classic "scale from zero to millions" playbook does it
//! with servers:
//!
//! ```text
//!            axum / tonic / any tower::Service
//!                          |
//!    +---------------- HTTP / gRPC glue ----------------------------+
//!    | CacheLayer + HTTP/gRPC policies     DbLayer: per-request       |
//!    | (RFC 9111, Vary, 304, Age)          routing + token round trip |
//!    +--------------------------------------------------------------+
//!                          |
//!    cache   read-through core: key -> L1 store (moka | quick_cache)
//!            -> single-flight -> inner service; TTL, stale-while-revalidate,
//!            stale-if-error, early refresh, tags, race-safe invalidation
//!                          |
//!    pg      Cluster: per-node pools, monitor, lag-aware balancing
//!                          |
//!            deadpool-postgres -> tokio-postgres -> primary + replicas
//! ```
//!
//! ## The parts
//!
//! - **The cache tier** ([`cache`]): [`cache::CacheLayer`] puts a read-through
//!   cache in front of any [`tower::Service`] whose responses can be shared
//!   (`Clone`). A hit is one synchronous store lookup, a freshness check
//!   against a cheap clock and a clone of the stored response, returned in an
//!   already-ready future: no allocation, no boxing, no `.await`. Misses go
//!   through single-flight (one inner call per key at a time); entries have
//!   freshness windows (TTL, stale-while-revalidate, stale-if-error) and
//!   probabilistic early refresh; invalidation by key, tag or everything is
//!   race-safe against fills in flight and understands version stamps (the
//!   database LSN), which is how caching and replication share one
//!   consistency model.
//! - **The shared tier** (`cache::redis`, feature `redis`): a Redis L2 behind
//!   every instance's L1, with leases against stampedes, versioned frames,
//!   invalidation fan-out to every instance in order, and isolation (an
//!   instance that cannot hear the fan-out stops trusting its L1).
//! - **HTTP caching** ([`http`], feature `http`): an RFC 9111 shared cache
//!   (`Cache-Control`, `Vary`, validators and 304s, `Age`, unsafe-method
//!   invalidation) that never shares a per-user response.
//! - **gRPC caching** ([`grpc`], feature `grpc`): unary responses of chosen
//!   methods, keyed by path, message and chosen metadata.
//! - **Replication routing** ([`pg`], feature `postgres`): a [`pg::Cluster`]
//!   of a primary and replicas over deadpool-postgres pools, a health
//!   monitor that follows a failover (a replica promoted by your tooling
//!   takes the writes without a restart), lag-aware power-of-two-choices
//!   balancing, and read-your-writes through WAL-position tokens; `pg::layer`
//!   (features `postgres` and `http`) carries the tokens through cookies,
//!   headers and gRPC metadata.
//! - **The job queue** (`queue`, feature `queue`): jobs enqueued in the
//!   business write's own transaction, workers that are tower Services
//!   claiming with `SKIP LOCKED` under renewed leases, retries with
//!   back-off, dead letters, and handlers that read their job's writes
//!   through a read-your-writes token even from a lagging replica.
//! - **Real servers for tests** ([`testing`], feature `local-cluster`): a
//!   PostgreSQL primary with streaming replicas and a Redis server, started
//!   from the installed binaries in temp dirs on free loopback ports, with the
//!   faults a production cluster sees (stop, kill, pause, promote, lag), and a
//!   TCP fault proxy (latency, black holes, refused connections).
//! - **Settings** (`settings`, feature `serde`): the cluster, cache, HTTP
//!   cache and Redis builders from TOML, JSON or environment variables.
//! - **Errors** ([`error`]): the configuration error every builder returns.
//! - **The guide** ([`guide`], in the docs built with `full`): the scaling
//!   journey step by step, each step's code, what it buys and costs, plus
//!   operations and what is still being built.
//!
//! ## The consistency model
//!
//! A PostgreSQL WAL position (LSN) is the clock. A write gives back a token
//! holding the primary's LSN after commit; a read that carries the token is
//! served only by a replica, or a cache entry, whose data reflects at least
//! that LSN. Cache entries carry an optional version stamp for exactly this,
//! and an invalidation at version `v` keeps any fill stamped below `v` out of
//! the cache.
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `moka` (default) | the L1 store on `moka::sync::Cache` |
//! | `quick-cache` | the L1 store on `quick_cache` (S3-FIFO) |
//! | `http` | [`http`]: an RFC 9111 HTTP cache for axum and hyper services |
//! | `purge` | the HTTP cache's purge API as an axum `Router` (`POST /_purge`: by tag, URL or all, bearer token); implies `http` |
//! | `grpc` | [`grpc`]: unary gRPC response caching for tonic servers |
//! | `balance` | [`balance`]: a load balancer over HTTP upstreams (p2c over peak-EWMA, health checks, retries, upstreams changed at run time); implies `http` |
//! | `postgres` | [`pg`]: primary/replica routing over deadpool-postgres pools (with `http`: `pg::layer`) |
//! | `shard` | [`shard`]: several primaries behind one handle, routed by a shard key, fenced against stale maps; implies `postgres` |
//! | `reshard` | `shard::reshard`: online moves of slots and their rows between live shards (snapshot copy, logical-replication catch-up, bounded cutover); implies `shard` and `change-feed` |
//! | `redis` | `cache::redis`: the shared L2 tier on Redis |
//! | `local-cluster` | [`testing`]: PostgreSQL and Redis servers for tests, examples and benches |
//! | `serde` | `settings`: the builders from TOML, JSON or the environment |
//! | `full` | every feature |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]

/// Reading a body up to a limit, for the HTTP and gRPC caches.
#[cfg(feature = "http")]
mod body;
pub mod cache;
pub mod error;
pub mod ids;
#[cfg(any(feature = "postgres", feature = "local-cluster"))]
mod lsn_text;
mod random;
#[cfg(any(feature = "serde", feature = "redis"))]
mod redact;
mod sync;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;

#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub mod grpc;

#[cfg(feature = "balance")]
#[cfg_attr(docsrs, doc(cfg(feature = "balance")))]
pub mod balance;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod pg;

#[cfg(feature = "queue")]
#[cfg_attr(docsrs, doc(cfg(feature = "queue")))]
pub mod queue;

#[cfg(feature = "shard")]
#[cfg_attr(docsrs, doc(cfg(feature = "shard")))]
pub mod shard;

#[cfg(feature = "local-cluster")]
#[cfg_attr(docsrs, doc(cfg(feature = "local-cluster")))]
pub mod testing;

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod settings;

#[cfg(all(feature = "postgres", feature = "http", feature = "redis"))] // `http` brings `moka`
#[cfg_attr(
    docsrs,
    doc(cfg(all(feature = "postgres", feature = "http", feature = "redis")))
)]
pub mod guide;

pub use error::ConfigError;

// The README's examples are compiled and run as doc tests.
#[cfg(all(doctest, feature = "moka"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
