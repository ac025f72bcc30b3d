//! What the feed invalidates: any cache's [`Invalidator`], whatever its
//! key type, behind one object-safe trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::cache::{Invalidator, Tag};

/// A cache the feed keeps right.
pub(crate) trait Sink: Send + Sync {
    fn invalidate_tag_at(&self, tag: Tag, version: u64);
    fn invalidate_all_at(&self, version: Option<u64>);
    fn published(&self, within: Duration) -> Pin<Box<dyn Future<Output = bool> + Send>>;
    fn has_shared_tier(&self) -> bool;
    /// Invalidations the shared tier has not applied yet.
    fn backlog(&self) -> u64;
}

impl<K: Send + Sync + 'static> Sink for Invalidator<K> {
    fn invalidate_tag_at(&self, tag: Tag, version: u64) {
        Invalidator::invalidate_tag_at(self, tag, version);
    }

    fn invalidate_all_at(&self, version: Option<u64>) {
        Invalidator::invalidate_all_at(self, version);
    }

    fn published(&self, within: Duration) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        Box::pin(Invalidator::published(self, within))
    }

    fn has_shared_tier(&self) -> bool {
        Invalidator::has_shared_tier(self)
    }

    fn backlog(&self) -> u64 {
        self.shared_backlog()
    }
}

/// Waits until every sink published what it was told, for at most
/// `within` each (they wait side by side); true if all did.
pub(crate) fn all_published(
    sinks: &[std::sync::Arc<dyn Sink>],
    within: Duration,
) -> impl Future<Output = bool> + Send + 'static {
    let waits: Vec<_> = sinks.iter().map(|s| s.published(within)).collect();
    async move {
        futures_util::future::join_all(waits)
            .await
            .into_iter()
            .all(|ok| ok)
    }
}
