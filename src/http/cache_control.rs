//! `Cache-Control` parsing (RFC 9111 §5.2), for responses and requests.
//!
//! The parser never fails: whatever the bytes, it returns directives, and
//! anything it cannot read is taken the safe way.
//!
//! Choices the RFC leaves open, made here:
//! - A `max-age` or `s-maxage` whose value is not a number, or that appears
//!   twice with different values, makes the response stale (RFC 9111
//!   §4.2.1 encourages treating invalid freshness information as stale).
//!   Identical duplicates are accepted.
//! - Values over 2^31 seconds are taken as 2^31 (§1.2.2).
//! - Qualified `no-cache="field"` and `private="field"` are treated as
//!   their unqualified forms (allowed by §5.2.2.4 and §5.2.2.7): this cache
//!   does not strip fields.
//! - Invalid `stale-while-revalidate`, `stale-if-error`, `max-stale` and
//!   `min-fresh` values are ignored (no extra staleness is ever granted by a
//!   value that does not parse); an invalid request `max-age` counts as 0.
//! - Directive names are case-insensitive; unknown directives are ignored.
//! - Header values that are not visible ASCII are ignored as a whole.

use http::HeaderMap;
use http::header::{CACHE_CONTROL, PRAGMA};

/// The largest delta-seconds value (§1.2.2): 2^31.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Response directives that matter to a shared cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseDirectives {
    /// `max-age` in seconds (0 when invalid or conflicting).
    pub max_age: Option<u64>,
    /// `s-maxage` in seconds (0 when invalid or conflicting).
    pub s_maxage: Option<u64>,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (qualified or not).
    pub no_cache: bool,
    /// `private` (qualified or not).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `immutable`.
    pub immutable: bool,
    /// `stale-while-revalidate` (RFC 5861) in seconds.
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861) in seconds.
    pub stale_if_error: Option<u64>,
}

/// Request directives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestDirectives {
    /// `max-age`: the client accepts a response no older than this.
    pub max_age: Option<u64>,
    /// `max-stale`: `Some(None)` accepts any staleness, `Some(Some(n))` up to `n` s.
    pub max_stale: Option<Option<u64>>,
    /// `min-fresh`: the response must stay fresh at least this long.
    pub min_fresh: Option<u64>,
    /// `no-cache` (or `Pragma: no-cache` without `Cache-Control`).
    pub no_cache: bool,
    /// `no-store`.
    pub no_store: bool,
    /// `only-if-cached`.
    pub only_if_cached: bool,
}

/// One directive as written: lower-cased name and unquoted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// The name, lower-cased.
    pub name: String,
    /// The value, if any, with quoted-string escapes removed.
    pub value: Option<String>,
}

/// Splits `Cache-Control` field values into directives (§5.2: a list of
/// `token [ "=" ( token / quoted-string ) ]`, commas inside quotes kept).
pub fn directives<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Vec<Directive> {
    let mut out = Vec::new();
    for value in values {
        let Ok(text) = std::str::from_utf8(value) else {
            continue;
        };
        if !text
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            continue;
        }
        split_list(text, &mut out);
    }
    out
}

fn split_list(text: &str, out: &mut Vec<Directive>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Skip separators and white space.
        while i < bytes.len() && matches!(bytes[i], b',' | b' ' | b'\t') {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && !matches!(bytes[i], b',' | b'=' | b' ' | b'\t') {
            i += 1;
        }
        let name = text[start..i].to_ascii_lowercase();
        while i < bytes.len() && matches!(bytes[i], b' ' | b'\t') {
            i += 1;
        }
        let mut value = None;
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
            while i < bytes.len() && matches!(bytes[i], b' ' | b'\t') {
                i += 1;
            }
            if i < bytes.len() && bytes[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    v.push(bytes[i] as char);
                    i += 1;
                }
                i += 1; // the closing quote, if any
                value = Some(v);
            } else {
                let vstart = i;
                while i < bytes.len() && !matches!(bytes[i], b',' | b' ' | b'\t') {
                    i += 1;
                }
                value = Some(text[vstart..i].to_string());
            }
        }
        // Anything else up to the next comma is junk; skip it.
        while i < bytes.len() && bytes[i] != b',' {
            i += 1;
        }
        if !name.is_empty() {
            out.push(Directive { name, value });
        }
    }
}

/// A delta-seconds value: `None` when it is not `1*DIGIT`.
pub fn delta_seconds(value: Option<&str>) -> Option<u64> {
    let v = value?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        v.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |n| n.min(MAX_DELTA_SECONDS)),
    )
}

/// Folds one freshness directive: invalid or conflicting values give 0.
fn fold_strict(slot: &mut Option<u64>, value: Option<&str>) {
    let parsed = delta_seconds(value).unwrap_or(0);
    *slot = match *slot {
        None => Some(parsed),
        Some(existing) if existing == parsed => Some(existing),
        Some(_) => Some(0),
    };
}

/// Folds an optional extension: invalid values are ignored, the first valid one wins.
fn fold_lenient(slot: &mut Option<u64>, value: Option<&str>) {
    if slot.is_none() {
        *slot = delta_seconds(value);
    }
}

impl ResponseDirectives {
    /// Parses every `Cache-Control` field of a response.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::parse(headers.get_all(CACHE_CONTROL).iter().map(|v| v.as_bytes()))
    }

    /// Parses `Cache-Control` field values.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut d = Self::default();
        for Directive { name, value } in directives(values) {
            let value = value.as_deref();
            match name.as_str() {
                "max-age" => fold_strict(&mut d.max_age, value),
                "s-maxage" => fold_strict(&mut d.s_maxage, value),
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "immutable" => d.immutable = true,
                "stale-while-revalidate" => fold_lenient(&mut d.stale_while_revalidate, value),
                "stale-if-error" => fold_lenient(&mut d.stale_if_error, value),
                _ => {}
            }
        }
        d
    }
}

impl RequestDirectives {
    /// Parses a request's `Cache-Control`, or `Pragma: no-cache` when it
    /// has no `Cache-Control` (RFC 9111 §5.4).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        if headers.contains_key(CACHE_CONTROL) {
            return Self::parse(headers.get_all(CACHE_CONTROL).iter().map(|v| v.as_bytes()));
        }
        let pragma_no_cache = directives(headers.get_all(PRAGMA).iter().map(|v| v.as_bytes()))
            .iter()
            .any(|d| d.name == "no-cache");
        Self {
            no_cache: pragma_no_cache,
            ..Self::default()
        }
    }

    /// Parses `Cache-Control` field values of a request.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut d = Self::default();
        for Directive { name, value } in directives(values) {
            let value = value.as_deref();
            match name.as_str() {
                "max-age" => {
                    let v = delta_seconds(value).unwrap_or(0);
                    d.max_age = Some(d.max_age.map_or(v, |m| m.min(v)));
                }
                "max-stale" if d.max_stale.is_none() => {
                    d.max_stale = match value {
                        None => Some(None),
                        Some(_) => delta_seconds(value).map(Some),
                    };
                }
                "min-fresh" => fold_lenient(&mut d.min_fresh, value),
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(s: &str) -> ResponseDirectives {
        ResponseDirectives::parse([s.as_bytes()])
    }

    #[test]
    fn response_directives() {
        let d = resp("public, max-age=60, s-maxage=\"120\", stale-while-revalidate=30");
        assert!(d.public);
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(120));
        assert_eq!(d.stale_while_revalidate, Some(30));
        let d = resp("No-Store, PRIVATE=\"set-cookie, x\", no-cache=\"a\"");
        assert!(d.no_store && d.private && d.no_cache);
    }

    #[test]
    fn invalid_or_conflicting_max_age_is_stale() {
        assert_eq!(resp("max-age=abc").max_age, Some(0));
        assert_eq!(resp("max-age=").max_age, Some(0));
        assert_eq!(resp("max-age").max_age, Some(0));
        assert_eq!(resp("max-age=-1").max_age, Some(0));
        assert_eq!(resp("max-age=10, max-age=20").max_age, Some(0));
        assert_eq!(resp("max-age=10, max-age=10").max_age, Some(10));
        assert_eq!(
            ResponseDirectives::parse(["max-age=10".as_bytes(), "max-age=30".as_bytes()]).max_age,
            Some(0)
        );
        assert_eq!(
            resp("max-age=99999999999999999999").max_age,
            Some(MAX_DELTA_SECONDS)
        );
    }

    #[test]
    fn invalid_extensions_grant_nothing() {
        let d = resp("max-age=5, stale-while-revalidate=x, stale-if-error=");
        assert_eq!(d.stale_while_revalidate, None);
        assert_eq!(d.stale_if_error, None);
    }

    #[test]
    fn request_directives_and_pragma() {
        let d = RequestDirectives::parse([
            "max-age=0, max-stale, min-fresh=5, only-if-cached".as_bytes()
        ]);
        assert_eq!(d.max_age, Some(0));
        assert_eq!(d.max_stale, Some(None));
        assert_eq!(d.min_fresh, Some(5));
        assert!(d.only_if_cached);
        let mut h = HeaderMap::new();
        h.insert(PRAGMA, "no-cache".parse().unwrap());
        assert!(RequestDirectives::from_headers(&h).no_cache);
        h.insert(CACHE_CONTROL, "max-age=10".parse().unwrap());
        assert!(
            !RequestDirectives::from_headers(&h).no_cache,
            "Pragma only without Cache-Control"
        );
    }

    #[test]
    fn quoted_commas_and_escapes() {
        let ds = directives(["a=\"x, y\", b=\"q\\\"z\", c".as_bytes()]);
        assert_eq!(ds.len(), 3);
        assert_eq!(ds[0].value.as_deref(), Some("x, y"));
        assert_eq!(ds[1].value.as_deref(), Some("q\"z"));
        assert_eq!(ds[2].name, "c");
    }

    #[test]
    fn garbage_is_harmless() {
        for s in [
            "",
            ",,,",
            "=",
            "\"",
            "max-age=\"",
            "a b c",
            "\u{7f}",
            "max-age==5",
        ] {
            let _ = resp(s);
            let _ = RequestDirectives::parse([s.as_bytes()]);
        }
        assert_eq!(
            ResponseDirectives::parse([&[0xff, 0xfe][..]]),
            ResponseDirectives::default()
        );
    }
}
