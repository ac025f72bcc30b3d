//! A custom cache key ([`HttpCacheLayerBuilder::cache_key`]): the path and
//! query normalised, and request-derived parts added, with every safety
//! rule of the default key kept.
//!
//! [`HttpCacheLayerBuilder::cache_key`]: super::HttpCacheLayerBuilder::cache_key

use std::fmt;
use std::sync::Arc;

/// What a custom cache key function may change: the path and query (for
/// example sorted query parameters) and extra parts taken from the request
/// (for example a device class from a header). The scheme and authority
/// stay the cache's own (so the one-authority rule still applies), `Vary`
/// still selects among the variants, and every storing rule still decides
/// what is stored.
///
/// ```
/// use tower_scale::http::{HttpCacheLayer, KeyParts};
///
/// let layer = HttpCacheLayer::builder()
///     .cache_key(|req: &http::request::Parts, key: &mut KeyParts| {
///         key.sort_query();
///         let mobile = req
///             .headers
///             .get("user-agent")
///             .and_then(|v| v.to_str().ok())
///             .is_some_and(|ua| ua.contains("Mobile"));
///         key.push("device", if mobile { "mobile" } else { "desktop" });
///         true // false: this request is not cached
///     })
///     .build();
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts {
    path_and_query: String,
    extra: Vec<(String, String)>,
}

/// A path and query [`KeyParts::set_path_and_query`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a path and query for a cache key: {0:?}")]
pub struct InvalidPath(pub String);

impl KeyParts {
    pub(crate) fn new(path_and_query: &str) -> Self {
        Self {
            path_and_query: path_and_query.to_owned(),
            extra: Vec::new(),
        }
    }

    /// The path and query the key uses (the request's, until changed).
    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// Replaces the path and query (it must start with `/` and be a valid
    /// URI path and query).
    pub fn set_path_and_query(&mut self, pq: impl Into<String>) -> Result<(), InvalidPath> {
        let pq = pq.into();
        if !pq.starts_with('/') || pq.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(InvalidPath(pq));
        }
        self.path_and_query = pq;
        Ok(())
    }

    /// Sorts the query's `&`-separated parameters (byte order, stable), so
    /// `?b=2&a=1` and `?a=1&b=2` share an entry. Empty parameters are
    /// dropped; a query that ends up empty leaves no `?`.
    pub fn sort_query(&mut self) {
        let Some((path, query)) = self.path_and_query.split_once('?') else {
            return;
        };
        let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        params.sort_unstable();
        let mut out = String::with_capacity(self.path_and_query.len());
        out.push_str(path);
        if !params.is_empty() {
            out.push('?');
            out.push_str(&params.join("&"));
        }
        self.path_and_query = out;
    }

    /// Adds a part taken from the request (`name` and `value` are written
    /// escaped: no value can make one key look like another).
    pub fn push(&mut self, name: &str, value: &str) {
        self.extra.push((name.to_owned(), value.to_owned()));
    }

    /// The key: `base` (scheme and authority) and the path and query, then
    /// each extra part on a line of its own (a URI has no line breaks, so
    /// a key with parts never equals one without).
    pub(crate) fn finish(&self, base: &str) -> String {
        let mut key = String::with_capacity(base.len() + self.path_and_query.len() + 16);
        key.push_str(base);
        key.push_str(&self.path_and_query);
        for (name, value) in &self.extra {
            key.push('\n');
            escape_into(&mut key, name);
            key.push('=');
            escape_into(&mut key, value);
        }
        key
    }
}

/// `\`, `=` and line breaks escaped with `\`.
fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// The base key (no extra parts) of a key, which is also the tag every
/// entry with extra parts carries, so invalidating a URL reaches them all.
pub(crate) fn base_of(key: &str) -> Option<&str> {
    key.split_once('\n').map(|(base, _)| base)
}

/// What the builder keeps.
pub(crate) type KeyFn = dyn Fn(&http::request::Parts, &mut KeyParts) -> bool + Send + Sync;

/// The user's key function.
#[derive(Clone)]
pub(crate) struct CustomKey(pub(crate) Arc<KeyFn>);

impl fmt::Debug for CustomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CustomKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_never_collide_and_queries_sort() {
        let mut a = KeyParts::new("/p?b=2&a=1&");
        a.sort_query();
        assert_eq!(a.path_and_query(), "/p?a=1&b=2");
        a.push("device", "mobile");
        let mut b = KeyParts::new("/p?a=1&b=2");
        b.push("device", "mobile\ndevice=x");
        assert_ne!(a.finish("http://h"), b.finish("http://h"));
        assert_eq!(a.finish("http://h"), "http://h/p?a=1&b=2\ndevice=mobile");
        assert_eq!(base_of(&a.finish("http://h")), Some("http://h/p?a=1&b=2"));
        let mut c = KeyParts::new("/");
        assert!(c.set_path_and_query("no-slash").is_err());
        assert!(c.set_path_and_query("/a b").is_err());
        assert!(c.set_path_and_query("/ok?x=1").is_ok());
        let mut d = KeyParts::new("/only?&&");
        d.sort_query();
        assert_eq!(d.path_and_query(), "/only");
    }
}
