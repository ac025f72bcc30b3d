//! Purging stored responses by tag, by URL or all, with a count of what
//! was removed ([`HttpCacheLayer::purge`](super::HttpCacheLayer::purge));
//! the admin route on top of it is `purge_route` (feature `purge`).

use std::collections::HashSet;

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
    /// Every `Vary` variant stored for these target URIs. Each is read as
    /// an absolute `http` or `https` URL: its scheme and host are
    /// lower-cased, and the default port counts as written and as left out
    /// (`http://cdn.test/p` purges what was stored for `Host: cdn.test`
    /// and for `Host: cdn.test:80`); with a
    /// [custom key](super::HttpCacheLayerBuilder::cache_key), its path and
    /// query are normalised as the key function normalises them, and every
    /// key that adds parts to the URL goes too. A string that is not an
    /// absolute http(s) URL is taken as a cache key as it is (the purge
    /// route answers `400` for it instead).
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
                let wanted: HashSet<&str> = tags.iter().map(String::as_str).collect();
                self.store.for_each_entry(|_, entry| {
                    let touched = entry.tags.iter().any(|t| wanted.contains(t.as_str()));
                    if touched && self.log.still_valid(entry) {
                        found += 1;
                    }
                });
                for tag in wanted {
                    self.invalidate(Invalidation::Tag(Tag::from(tag)), 0);
                }
            }
            Purge::Urls(urls) => {
                let mut keys: Vec<String> = urls
                    .iter()
                    .flat_map(|url| match url_spellings(url) {
                        Ok(spellings) => spellings,
                        // Not a URL: the key as given.
                        Err(_) => vec![url.clone()],
                    })
                    .map(|key| self.normalise_url(key))
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                if self.config.custom_key.is_some() {
                    self.store.for_each_entry(|key, entry| {
                        let key = key.key();
                        let base = super::custom_key::base_of(key).unwrap_or(key);
                        if keys.binary_search_by(|k| k.as_str().cmp(base)).is_ok()
                            && self.log.still_valid(entry)
                        {
                            found += 1;
                        }
                    });
                } else {
                    for key in &keys {
                        let key = self.hashed(key.clone());
                        if self
                            .store
                            .with_entry(&key, |e| self.log.still_valid(e))
                            .unwrap_or(false)
                        {
                            found += 1;
                        }
                    }
                }
                for key in &keys {
                    self.invalidate_url(key);
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

/// The cache keys (before a custom key's normalisation) an absolute
/// `http` or `https` URL stands for: the scheme and host lower-cased, and
/// with the scheme's default port both without it and with it (a key
/// keeps the `Host` header as written, so `cdn.test` and `cdn.test:80`
/// are two keys for one origin); another port as given. `Err` saying why
/// for anything else (a relative reference, another scheme, user
/// information, no host).
pub(crate) fn url_spellings(url: &str) -> Result<Vec<String>, &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a URL")?;
    let default_port = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => 80,
        Some(s) if s.eq_ignore_ascii_case("https") => 443,
        Some(_) => return Err("not an http or https URL"),
        None => return Err("not an absolute URL (scheme://host/path)"),
    };
    let scheme = if default_port == 80 { "http" } else { "https" };
    let authority = uri.authority().ok_or("not an absolute URL (no host)")?;
    if authority.as_str().contains('@') {
        return Err("a URL with user information is never a cache key");
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err("not an absolute URL (no host)");
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok(match authority.port_u16() {
        Some(port) if port != default_port => vec![format!("{scheme}://{host}:{port}{path}")],
        _ => vec![
            format!("{scheme}://{host}{path}"),
            format!("{scheme}://{host}:{default_port}{path}"),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::url_spellings;

    #[test]
    fn a_url_stands_for_each_spelling_of_its_origin() {
        let both = |a: &str, b: &str| Ok(vec![a.to_string(), b.to_string()]);
        assert_eq!(
            url_spellings("http://CDN.test/p?q=A"),
            both("http://cdn.test/p?q=A", "http://cdn.test:80/p?q=A")
        );
        assert_eq!(
            url_spellings("HTTPS://cdn.test:443"),
            both("https://cdn.test/", "https://cdn.test:443/")
        );
        assert_eq!(
            url_spellings("http://cdn.test:8080/p"),
            Ok(vec!["http://cdn.test:8080/p".to_string()])
        );
        assert_eq!(
            url_spellings("http://[::1]/p"),
            both("http://[::1]/p", "http://[::1]:80/p")
        );
        for bad in [
            "not a url",
            "/p",
            "ftp://cdn.test/p",
            "http://u@cdn.test/p",
            "cdn.test",
        ] {
            assert!(url_spellings(bad).is_err(), "{bad}");
        }
    }
}
