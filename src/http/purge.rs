//! Purging stored responses by tag, by URL or all, with a count of what
//! was removed ([`HttpCacheLayer::purge`](super::HttpCacheLayer::purge));
//! the admin route on top of it is `purge_route` (feature `purge`).

use super::state::HttpShared;
use crate::cache::engine::log::InvalidateTarget;
use crate::cache::{Invalidation, Store, Tag};

/// What to purge from an HTTP cache: see
/// [`HttpCacheLayer::purge`](super::HttpCacheLayer::purge).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purge {
    /// Every response that carried one of these tags in the
    /// [tag header](super::HttpCacheLayerBuilder::tag_header).
    Tags(Vec<String>),
    /// Every `Vary` variant stored for these target URIs, each spelled as
    /// the cache key is (`scheme://authority/path?query`, the authority
    /// lower-cased), as for [`HttpCacheLayer::invalidate`](super::HttpCacheLayer::invalidate).
    Urls(Vec<String>),
    /// Everything.
    All,
}

impl HttpShared {
    /// Counts the entries `what` touches on this instance, then invalidates
    /// (here and, with a shared tier, on every instance). The count walks
    /// the whole store for tags, for everything, and for URLs with a
    /// custom key: O(entries), fine for an admin action, not for a hot
    /// path. An entry stored between the walk and the invalidation is
    /// removed but not counted.
    pub(crate) fn purge(&self, what: &Purge) -> usize {
        self.stats
            .incr_rare(crate::cache::engine::stats::Rare::Purges);
        let mut found = 0;
        match what {
            Purge::Tags(tags) => {
                self.store.for_each_entry(|_, entry| {
                    let touched = tags
                        .iter()
                        .any(|t| entry.tags.iter().any(|have| have.as_str() == t));
                    if touched && self.log.still_valid(entry) {
                        found += 1;
                    }
                });
                for tag in tags {
                    self.invalidate(Invalidation::Tag(Tag::from(tag.as_str())), 0);
                }
            }
            Purge::Urls(urls) => {
                if self.config.custom_key.is_some() {
                    self.store.for_each_entry(|key, entry| {
                        let key = key.key();
                        let base = super::custom_key::base_of(key).unwrap_or(key);
                        if urls.iter().any(|u| u == base) && self.log.still_valid(entry) {
                            found += 1;
                        }
                    });
                } else {
                    for (i, url) in urls.iter().enumerate() {
                        if urls[..i].contains(url) {
                            continue; // counted once
                        }
                        let key = self.hashed(url.clone());
                        if self
                            .store
                            .with_entry(&key, |e| self.log.still_valid(e))
                            .unwrap_or(false)
                        {
                            found += 1;
                        }
                    }
                }
                for url in urls {
                    self.invalidate_url(url);
                }
            }
            Purge::All => {
                self.store.for_each_entry(|_, entry| {
                    if self.log.still_valid(entry) {
                        found += 1;
                    }
                });
                self.invalidate(Invalidation::All, 0);
            }
        }
        found
    }
}
