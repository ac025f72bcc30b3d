//! The key a response is stored under: the target URI, from exactly one
//! authority (see "The key" in the module docs).

use http::Version;
use http::header::{self, HeaderMap};

use super::state::HttpShared;

/// The `Host` header when there is at most one valid line: `Some(None)`
/// without one, `None` for several lines or an invalid one.
fn single_host(headers: &HeaderMap) -> Option<Option<http::uri::Authority>> {
    let mut lines = headers.get_all(header::HOST).iter();
    let Some(first) = lines.next() else {
        return Some(None);
    };
    if lines.next().is_some() {
        return None;
    }
    let host = first.to_str().ok()?.parse::<http::uri::Authority>().ok()?;
    Some(Some(host))
}

/// `scheme://authority/path?query`, the authority lower-cased.
pub(crate) fn key_of(scheme: &str, authority: &http::uri::Authority, uri: &http::Uri) -> String {
    let authority = authority.as_str();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut key = String::with_capacity(scheme.len() + authority.len() + path.len() + 3);
    key.push_str(scheme);
    key.push_str("://");
    let start = key.len();
    key.push_str(authority);
    // In place, byte-wise (ASCII only changes; `key` stays UTF-8).
    key[start..].make_ascii_lowercase();
    key.push_str(path);
    key
}

impl HttpShared {
    /// The primary key: the target URI (scheme, authority, path and
    /// query). Never from `X-Forwarded-*` or any other header but `Host`.
    ///
    /// `None` (neither stored nor served from the cache) when the request
    /// names no authority, or two: an absolute-form target whose authority
    /// is not byte for byte the `Host` header's, or more than one `Host`
    /// line. The origin may build its response from either, so no one key
    /// is right. Also `None` for an HTTP/1 absolute-form target without
    /// `Host`, and for an authority with upper-case letters.
    pub(crate) fn key(&self, parts: &http::request::Parts) -> Option<String> {
        let scheme = self.scheme(parts);
        let host = single_host(&parts.headers)?;
        let authority = match (parts.uri.authority(), host) {
            // HTTP/2 and HTTP/3 carry the authority in the target (the
            // `:authority` pseudo-header). An HTTP/1 absolute-form target
            // without `Host` names an authority that an origin reading
            // `Host` never sees: not cached.
            (Some(target), None) => {
                if !matches!(parts.version, Version::HTTP_2 | Version::HTTP_3) {
                    return None;
                }
                target.clone()
            }
            // Byte for byte: `A.TEST:80` and `a.test` are one origin to
            // RFC 9110, but the origin sees the `Host` as written.
            (Some(target), Some(host)) => {
                if target.as_str() != host.as_str() {
                    return None;
                }
                target.clone()
            }
            (None, Some(host)) => host,
            (None, None) => return None,
        };
        // Keys are lower-case (so invalidation finds every spelling); an
        // authority that is not is not cached, so what is stored under a
        // key is what an origin saw for exactly that spelling.
        if authority.as_str().bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let key = key_of(scheme, &authority, &parts.uri);
        match self.custom_parts(parts, &key) {
            None => Some(key),
            Some((base, kp, cache)) => cache.then(|| kp.finish(base)),
        }
    }

    /// The custom key function applied to `parts`, whose default key is
    /// `key`: the key's scheme and authority, the parts the function made,
    /// and whether it caches the request (`None` without a function).
    fn custom_parts<'k>(
        &self,
        parts: &http::request::Parts,
        key: &'k str,
    ) -> Option<(&'k str, super::KeyParts, bool)> {
        let custom = self.config.custom_key.as_ref()?;
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let base = key.strip_suffix(pq)?;
        let mut kp = super::KeyParts::new(pq);
        let cache = (custom.0)(parts, &mut kp);
        Some((base, kp, cache))
    }

    /// The key's URL part under the custom key function (its normalised
    /// path and query, no extra parts): what an unsafe request invalidates.
    /// Whether the function would cache the request does not matter here.
    fn normalised(&self, parts: &http::request::Parts, key: String) -> String {
        match self.custom_parts(parts, &key) {
            Some((base, kp, _)) => format!("{base}{}", kp.path_and_query()),
            None => key,
        }
    }

    /// Invalidates the entry under `url` (a key without extra parts) and,
    /// with a custom key, every entry whose key adds parts to it.
    pub(crate) fn invalidate_url(&self, url: &str) {
        use crate::cache::Invalidation;
        use crate::cache::engine::log::InvalidateTarget;
        self.invalidate(Invalidation::Key(url.to_owned()), 0);
        if self.config.custom_key.is_some() {
            self.invalidate(Invalidation::Tag(crate::cache::Tag::from(url)), 0);
        }
    }

    /// `url` (a key without parts) as the custom key function normalises
    /// its path and query (unchanged without one).
    pub(crate) fn normalise_url(&self, url: String) -> String {
        if self.config.custom_key.is_none() {
            return url;
        }
        match http::Request::get(url.as_str()).body(()) {
            Ok(req) => {
                let (parts, ()) = req.into_parts();
                self.normalised(&parts, url)
            }
            Err(_) => url,
        }
    }

    pub(crate) fn scheme<'a>(&'a self, parts: &'a http::request::Parts) -> &'a str {
        parts
            .uri
            .scheme_str()
            .unwrap_or(self.config.default_scheme.as_str())
    }

    /// Every key an unsafe request may change: its key, or when the target
    /// and `Host` disagree, the key under each of them (invalidating too
    /// much is safe; too little is not).
    pub(crate) fn invalidation_keys(&self, parts: &http::request::Parts) -> Vec<String> {
        if self.config.custom_key.is_none()
            && let Some(key) = self.key(parts)
        {
            return vec![key];
        }
        let scheme = self.scheme(parts);
        let hosts = parts
            .headers
            .get_all(header::HOST)
            .iter()
            .filter_map(|v| v.to_str().ok()?.parse::<http::uri::Authority>().ok());
        let mut keys: Vec<String> = parts
            .uri
            .authority()
            .cloned()
            .into_iter()
            .chain(hosts)
            .map(|a| self.normalised(parts, key_of(scheme, &a, &parts.uri)))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// The cache key of `location` relative to `base`, if it has the same origin.
pub(super) fn same_origin(base: &http::Uri, location: &str) -> Option<String> {
    let (scheme, authority) = (base.scheme_str()?, base.authority()?.as_str());
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    let uri: http::Uri = location.parse().ok()?;
    let same = uri.scheme_str() == Some(scheme)
        && uri
            .authority()
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(authority));
    same.then(|| {
        format!(
            "{scheme}://{}{}",
            authority.to_ascii_lowercase(),
            uri.path_and_query().map_or("/", |p| p.as_str())
        )
    })
}
