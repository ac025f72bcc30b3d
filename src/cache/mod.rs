//! The read-through cache tier: [`CacheLayer`] in front of any
//! [`tower::Service`] whose responses can be shared.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_scale::cache::CacheLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = CacheLayer::builder(|id: &u64| Some(*id))
//!     .time_to_live(Duration::from_secs(30))
//!     .stale_while_revalidate(Duration::from_secs(10))
//!     .build()?;
//! let invalidator = layer.invalidator();
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|id: u64| async move {
//!         Ok::<_, Infallible>(Arc::new(format!("row {id}")))
//!     }));
//!
//! let row = svc.ready().await?.call(1).await?; // miss
//! let again = svc.ready().await?.call(1).await?; // hit
//! assert!(Arc::ptr_eq(&row, &again));
//! assert_eq!(svc.stats().hits, 1);
//! invalidator.invalidate_key(&1);
//! # Ok(()) }
//! ```
//!
//! # How a request flows
//!
//! 1. The [`CachePolicy`] gives the request's key, or `None` to bypass.
//! 2. **Hit path**: the key is hashed once; one synchronous [`Store`]
//!    lookup; a validity check (one atomic load unless an invalidation
//!    happened since the entry was last checked); a freshness check against
//!    the [`Clock`]; a clone of the stored response, returned in an
//!    already-ready [`ResponseFuture`]. No allocation, no boxing, no
//!    `.await`, no lock held across calls.
//! 3. **Stale hit** (inside stale-while-revalidate): served the same way,
//!    and exactly one request per entry starts a background refresh.
//!    Probabilistic early refresh (XFetch) does the same shortly before
//!    expiry for popular keys.
//! 4. **Miss**: single-flight. The first miss of a key calls the inner
//!    service (waiting for its readiness in its own future); concurrent misses
//!    of that key wait for it and share its result or error. If the leader is
//!    cancelled, a waiter takes over. Errors are not stored unless negative
//!    caching is on. Inside stale-if-error, a failed call is answered with
//!    the stale entry.
//! 5. **Store**: the policy decides whether and how long ([`Storable`]:
//!    windows, tags, version stamp). Invalidations that happened during the
//!    fill, or at a version above the fill's stamp, keep it out
//!    ([`Invalidator`]).
//!
//! # Guarantees
//!
//! These are what the tests defend (`tests/cache`: a model-based check of
//! random interleavings; `tests/redis`: the same with two instances and
//! Redis faults):
//!
//! - **An invalidation is a line in time (same instance, exact).** A read
//!   that starts after `invalidate_key`, `invalidate_tag` or
//!   `invalidate_all` returned never gets data older than that
//!   invalidation: not from the store, not by joining a fill that began
//!   before it (such a fill is fenced off; the request starts a new one,
//!   and the old fill still answers its own earlier waiters), not from the
//!   shared tier (see the `redis` module).
//! - **Across instances, bounded** (with the Redis tier): a read on another
//!   instance that starts more than `isolation_ttl` (default 1 s) after the
//!   invalidation returned never gets older data, also while Redis is down,
//!   stalled, partitioned from the reading instance, or refusing writes.
//! - **Versions**: with a version stamp (an LSN), an invalidation at version
//!   `v` keeps out every fill stamped below `v`, whenever it started.
//! - **Negative caching never hides a good value**: a failed fill or a
//!   failed background refresh does not replace a good entry that
//!   stale-while-revalidate or stale-if-error may still serve.
//! - **Bounded memory for invalidations**: marks are kept up to
//!   [`CacheLayerBuilder::max_tracked_invalidations`]; past it the older half
//!   is folded into a floor that errs towards a miss, never a stale hit.
//!
//! Responses must be `Clone` (put `Arc` or `Bytes` inside), and so must
//! errors, because one error reaches every waiter: wrap a non-`Clone`
//! error type in an `Arc` below the cache (`.map_err(Arc::new)`).

pub mod future;

pub(crate) mod engine;
mod entry;
mod hot;
mod invalidate;
mod key;
mod layer;
mod policy;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod remote;
mod service;
mod shared;
mod stats;
mod store;
mod tag;
mod version;

pub use self::engine::clock::{COARSE_RESOLUTION, Clock, Instant, MockClock};
pub use self::engine::hot::HotKey;
#[cfg(feature = "http")]
pub(crate) use self::entry::Deadlines;
pub use self::entry::Entry;
pub use self::future::ResponseFuture;
pub use self::invalidate::{Invalidation, Invalidator};
pub use self::key::{Hashed, KeyHasher, PassThrough, PassThroughHasher};
pub use self::layer::{CacheLayer, CacheLayerBuilder, NoStore, Weigher};
pub use self::policy::{CachePolicy, Storable, Windows};
pub use self::remote::{Lease, RemoteEntry, RemoteLink, RemoteTier};
pub use self::service::Cache;
pub use self::stats::CacheStats;
#[cfg(feature = "moka")]
pub use self::store::MokaStore;
#[cfg(feature = "quick-cache")]
pub use self::store::QuickStore;
pub use self::store::{Capacity, Store};
pub use self::tag::Tag;
pub use self::version::DataVersion;

/// The error a cache builder returns for a bad setting.
pub use crate::error::ConfigError as BuildError;
