//! [`Invalidator`]: invalidation by key, by tag or everything, and what it
//! promises (see [`engine::log`](super::engine::log) for how).

use std::fmt;
use std::sync::Arc;

use super::Tag;
use super::engine::log::InvalidateTarget;

/// What to invalidate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation<K> {
    /// One key.
    Key(K),
    /// Every entry stored with this tag.
    Tag(Tag),
    /// Everything.
    All,
}
/// A handle that invalidates entries of one cache: by key, by tag, or all.
///
/// Cheap to clone; write paths hold one. Invalidation is race-safe: a fill
/// that began before the call is not stored after it, and a request that
/// starts after the call returned never gets that fill's result. Calls
/// need no runtime (a shared tier queues them and sends them from its own
/// task). With a version (the
/// LSN of the write), fills stamped below it are kept out as well, even if
/// they start later (a lagging replica cannot put the old row back), and
/// entries and fills stamped at or above it are left alone: they already
/// reflect the write (so a change feed's invalidation arriving after a
/// read of the new row does not throw that read away).
///
/// ```
/// # use tower_scale::cache::CacheLayer;
/// # fn demo() -> Result<(), tower_scale::cache::BuildError> {
/// let layer = CacheLayer::builder(|id: &u64| Some(*id)).build::<u64, String, ()>()?;
/// let invalidator = layer.invalidator();
/// invalidator.invalidate_key(&12);
/// invalidator.invalidate_tag("user:12");
/// invalidator.invalidate_tag_at("user:12", 0x16_B374_D848); // at a commit LSN
/// invalidator.invalidate_all();
/// # Ok(()) }
/// ```
pub struct Invalidator<K> {
    target: Arc<dyn InvalidateTarget<K>>,
}

impl<K> Clone for Invalidator<K> {
    fn clone(&self) -> Self {
        Self {
            target: Arc::clone(&self.target),
        }
    }
}

impl<K> fmt::Debug for Invalidator<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Invalidator")
    }
}

impl<K> Invalidator<K> {
    pub(crate) fn new(target: Arc<dyn InvalidateTarget<K>>) -> Self {
        Self { target }
    }

    /// Removes the entry for `key`.
    pub fn invalidate_key(&self, key: &K)
    where
        K: Clone,
    {
        self.target.invalidate(Invalidation::Key(key.clone()), 0);
    }

    /// Removes the entry for `key`, and keeps out fills stamped below
    /// `version` (a `u64`, or an `Option<u64>` where `None` is no version:
    /// for example [`ConsistencyToken::version`], which is `None` for a
    /// commit whose position is not known).
    ///
    /// [`ConsistencyToken::version`]: https://docs.rs/tower-scale/latest/tower_scale/pg/struct.ConsistencyToken.html#method.version
    pub fn invalidate_key_at(&self, key: &K, version: impl Into<Option<u64>>)
    where
        K: Clone,
    {
        self.target
            .invalidate(Invalidation::Key(key.clone()), plain(version));
    }

    /// Invalidates every entry stored with `tag`.
    pub fn invalidate_tag(&self, tag: impl Into<Tag>) {
        self.target.invalidate(Invalidation::Tag(tag.into()), 0);
    }

    /// Invalidates every entry with `tag`, and keeps out fills with that
    /// tag stamped below `version` (as for
    /// [`invalidate_key_at`](Self::invalidate_key_at)).
    pub fn invalidate_tag_at(&self, tag: impl Into<Tag>, version: impl Into<Option<u64>>) {
        self.target
            .invalidate(Invalidation::Tag(tag.into()), plain(version));
    }

    /// Invalidates everything.
    pub fn invalidate_all(&self) {
        self.target.invalidate(Invalidation::All, 0);
    }

    /// Invalidates everything, and from now on keeps out every fill
    /// stamped below `version` (as for
    /// [`invalidate_key_at`](Self::invalidate_key_at), for every key).
    pub fn invalidate_all_at(&self, version: impl Into<Option<u64>>) {
        self.target.invalidate(Invalidation::All, plain(version));
    }

    /// Invalidations made here that the shared tier has not applied yet
    /// (0 without a tier).
    #[cfg_attr(not(feature = "change-feed"), allow(dead_code))]
    pub(crate) fn shared_backlog(&self) -> u64 {
        self.target.shared_gate().map_or(0, |g| g.backlog())
    }

    /// Whether a shared tier (Redis) is attached to the cache.
    pub fn has_shared_tier(&self) -> bool {
        self.target.shared_gate().is_some()
    }

    /// Waits until every invalidation made through this cache before the
    /// call reached the shared tier (applied to it and published to the
    /// other instances), for at most `within`; true if it did, and at once
    /// without a shared tier.
    ///
    /// `invalidate_*` returns as soon as this instance's store is clean
    /// and the invalidation is queued; a caller whose guarantee must count
    /// from the other instances (the [change feed] confirms a transaction
    /// only after this) waits here.
    ///
    /// [change feed]: https://docs.rs/tower-scale/latest/tower_scale/pg/feed/index.html
    pub fn published(
        &self,
        within: std::time::Duration,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let wait = self.target.shared_gate().map(|g| g.published(within));
        async move {
            match wait {
                Some(wait) => wait.await,
                None => true,
            }
        }
    }

    /// Applies one [`Invalidation`], at a version if one is given (as for
    /// [`invalidate_key_at`](Self::invalidate_key_at)).
    pub fn invalidate(&self, what: Invalidation<K>, version: impl Into<Option<u64>>) {
        self.target.invalidate(what, plain(version));
    }
}

/// The log's form of a version: 0 stands for none (no fill is stamped
/// below 0, so a mark at 0 keeps nothing out by version).
fn plain(version: impl Into<Option<u64>>) -> u64 {
    version.into().unwrap_or(0)
}
