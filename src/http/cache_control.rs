//! `Cache-Control` parsing (RFC 9111 §5.2), for responses and requests.
//!
//! The parser never fails and never panics: whatever the bytes, it returns
//! directives, and what it cannot read is taken the safe way.
//!
//! **Fail safe.** A field line is read as RFC 9110 §5.6 allows: a list of
//! `token [ "=" ( token / quoted-string ) ]` members with optional white
//! space (spaces and tabs) around the commas, empty members, quoted strings
//! holding commas, escapes and obs-text bytes (above 0x7F), unknown
//! extensions with or without values, and the directives of every line of a
//! repeated field taken together. A member that breaks that grammar (junk
//! after a directive, white space around `=`, an empty or unquoted non-token
//! value, an unterminated quoted string, control bytes) does not hide the
//! line's other directives: each member's leading name still counts, so
//! `private`, `no-store` and `no-cache` are never dropped. And a response
//! with such a line is marked [`ResponseDirectives::unparseable`], which
//! makes it **not storable** (never "storable without `private`").
//!
//! Choices the RFC leaves open, made here:
//! - A `max-age` or `s-maxage` whose value is not a number, or that appears
//!   twice with different values, makes the response stale (RFC 9111
//!   §4.2.1 encourages treating invalid freshness information as stale).
//!   Identical duplicates are accepted.
//! - Values over 2^31 seconds are taken as 2^31 (§1.2.2).
//! - Qualified `no-cache="field"` and `private="field"` are treated as
//!   their unqualified forms (allowed by §5.2.2.4 and §5.2.2.7): this cache
//!   does not strip fields. Any value given to `no-store`, `no-cache` or
//!   `private` still counts as the directive.
//! - Invalid `stale-while-revalidate`, `stale-if-error`, `max-stale` and
//!   `min-fresh` values are ignored (no extra staleness is ever granted by a
//!   value that does not parse); an invalid request `max-age` counts as 0.
//! - Directive names are case-insensitive; unknown directives are ignored.
//! - In a request, a malformed member counts by its leading name too (a
//!   client's `no-store` or `no-cache` is never dropped); nothing else
//!   follows from it, since a request's directives only ever concern that
//!   request.

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
    /// `must-understand` (RFC 9111 §5.2.2.3): store only a status code the
    /// cache understands, and then `no-store` does not apply.
    pub must_understand: bool,
    /// `stale-while-revalidate` (RFC 5861) in seconds.
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861) in seconds.
    pub stale_if_error: Option<u64>,
    /// A field line broke the list grammar somewhere: what it meant cannot
    /// be known for sure, so the response is not stored.
    pub unparseable: bool,
    /// Read from a targeted field (RFC 9213, see [`targeted`](super::targeted)):
    /// the response's `Cache-Control` and `Expires` were ignored.
    pub targeted: bool,
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
    /// The value, if any, with quoted-string escapes removed (bytes above
    /// 0x7F are kept as the chars U+0080..=U+00FF).
    pub value: Option<String>,
}

/// The directives of some field lines, and whether any line broke the
/// grammar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirectiveList {
    /// Every member's directive, in order (a malformed member by its
    /// leading name and whatever value could be read).
    pub directives: Vec<Directive>,
    /// Some member did not fit `token [ "=" ( token / quoted-string ) ]`.
    pub malformed: bool,
}

/// Splits `Cache-Control` field values into directives (§5.2: a list of
/// `token [ "=" ( token / quoted-string ) ]`, commas inside quotes kept).
/// Malformed members are included by their leading name; see [`parse_list`]
/// to learn whether there were any.
pub fn directives<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Vec<Directive> {
    parse_list(values).directives
}

/// Splits field values into directives and says whether any member was
/// malformed. Works on bytes: no line is skipped for not being UTF-8 or
/// visible ASCII.
pub fn parse_list<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> DirectiveList {
    let mut list = DirectiveList::default();
    for value in values {
        if !split_list(value, &mut list.directives) {
            list.malformed = true;
        }
    }
    list
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `qdtext` (RFC 9110 §5.6.4): HTAB, SP, VCHAR but `"` and `\`, obs-text.
fn is_qdtext(b: u8) -> bool {
    b == b'\t'
        || b == b' '
        || b == 0x21
        || (0x23..=0x5b).contains(&b)
        || (0x5d..=0x7e).contains(&b)
        || b >= 0x80
}

/// What may follow `\` in a quoted-pair: HTAB, SP, VCHAR, obs-text.
fn is_quotable(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn skip_ows(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && is_ows(bytes[i]) {
        i += 1;
    }
    i
}

/// Reads a quoted string starting at the opening quote; returns the value,
/// the index after it, and whether it was well formed. Unterminated, it
/// ends at the first comma after the opening quote: a stray quote (or a
/// `\"` before the end) does not swallow the directives after it.
fn quoted_string(bytes: &[u8], mut i: usize) -> (String, usize, bool) {
    let open = i;
    let mut value = String::new();
    let mut ok = true;
    i += 1; // the opening quote
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' {
            return (value, i + 1, ok);
        }
        if b == b'\\' {
            match bytes.get(i + 1) {
                Some(&q) if is_quotable(q) => {
                    value.push(char::from(q));
                    i += 2;
                    continue;
                }
                _ => ok = false,
            }
        } else if is_qdtext(b) {
            value.push(char::from(b));
        } else {
            ok = false;
        }
        i += 1;
    }
    // Unterminated.
    let end = next_comma(bytes, open);
    let value = String::from_utf8_lossy(&bytes[(open + 1).min(end)..end]).into_owned();
    (value, end, false)
}

/// The first comma at or after `i`, quotes or not (or the end).
fn next_comma(bytes: &[u8], i: usize) -> usize {
    bytes
        .iter()
        .skip(i)
        .position(|&b| b == b',')
        .map_or(bytes.len(), |p| i + p)
}

/// Skips to the next comma that is not inside a quoted string.
/// A quote never closed counts for nothing: the junk ends at the first
/// comma after it.
fn skip_junk(bytes: &[u8], mut i: usize) -> usize {
    let mut quoted = false;
    let mut open = i;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                quoted = !quoted;
                open = i;
            }
            b'\\' if quoted => i += 1,
            b',' if !quoted => return i,
            _ => {}
        }
        i += 1;
    }
    if quoted {
        next_comma(bytes, open)
    } else {
        bytes.len()
    }
}

/// Splits one field line; `false` when some member broke the grammar.
fn split_list(bytes: &[u8], out: &mut Vec<Directive>) -> bool {
    let mut well_formed = true;
    let mut i = 0;
    loop {
        // Separators, white space and empty members.
        while i < bytes.len() && (bytes[i] == b',' || is_ows(bytes[i])) {
            i += 1;
        }
        if i >= bytes.len() {
            return well_formed;
        }
        let start = i;
        while i < bytes.len() && is_tchar(bytes[i]) {
            i += 1;
        }
        let name = String::from_utf8_lossy(&bytes[start..i]).to_ascii_lowercase();
        let mut ok = !name.is_empty();
        let mut value = None;
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
            if i < bytes.len() && bytes[i] == b'"' {
                let (v, next, quoted_ok) = quoted_string(bytes, i);
                ok &= quoted_ok;
                value = Some(v);
                i = next;
            } else {
                let vstart = i;
                while i < bytes.len() && is_tchar(bytes[i]) {
                    i += 1;
                }
                ok &= i > vstart;
                value = Some(String::from_utf8_lossy(&bytes[vstart..i]).into_owned());
            }
        }
        i = skip_ows(bytes, i);
        if i < bytes.len() && bytes[i] != b',' {
            // Junk (white space around `=`, a second value, bytes that are
            // not a token...): the member is malformed; go on at the next
            // comma outside quotes.
            ok = false;
            i = skip_junk(bytes, i);
        }
        well_formed &= ok;
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
        let list = parse_list(values);
        let mut d = Self {
            unparseable: list.malformed,
            ..Self::default()
        };
        for Directive { name, value } in list.directives {
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
                "must-understand" => d.must_understand = true,
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
    fn an_unbalanced_quote_does_not_swallow_a_later_directive() {
        for line in [
            &br#"x="\", no-store"#[..],
            br#"x="abc, no-store"#,
            br#"x"y, no-store"#,
            br#"x=a"b, no-store"#,
        ] {
            let d = RequestDirectives::parse([line]);
            assert!(d.no_store, "{}", String::from_utf8_lossy(line));
            let r = ResponseDirectives::parse([line]);
            assert!(
                r.no_store && r.unparseable,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
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
            ResponseDirectives {
                unparseable: true,
                ..ResponseDirectives::default()
            }
        );
    }

    #[test]
    fn what_rfc_9110_allows_keeps_every_directive() {
        for line in [
            &b"x=\"caf\xe9, \\\"q\\\"\", private, max-age=5"[..],
            b"\t ,, private ,\tmax-age=5\t,",
            b"foo, bar=baz, qux=\"a=b\", private, max-age=5",
            b"private,max-age=5,",
            b"  private  ,  max-age=5  ",
        ] {
            let d = ResponseDirectives::parse([line]);
            assert!(
                d.private && !d.unparseable,
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(d.max_age, Some(5), "{:?}", String::from_utf8_lossy(line));
        }
        let lines = [&b"no-store"[..], b"", b"x=\"\xff\"", b"no-cache"];
        let d = ResponseDirectives::parse(lines);
        assert!(d.no_store && d.no_cache && !d.unparseable);
    }

    #[test]
    fn a_line_that_breaks_the_grammar_is_unparseable_but_keeps_its_names() {
        for line in [
            "private garbage, max-age=5",
            "max-age=5, private\"x\"",
            "max-age = 5, private",
            "max-age=5;private",
            "private, x=\"unterminated",
            "private, x=",
            "private, =5",
            "private, x=\u{e9}",
            "private, x=\"a\"b",
            "private\u{7f}",
        ] {
            let d = resp(line);
            assert!(d.unparseable, "{line}");
            assert!(d.private || line.starts_with("max-age=5;"), "{line}");
        }
        let mut control = b"private, max-age=5".to_vec();
        control.push(0x0b);
        assert!(ResponseDirectives::parse([&control[..]]).unparseable);
        let d = ResponseDirectives::parse([&b"max-age=60"[..], b"public; private"]);
        assert!(d.unparseable, "one bad line of several");
        assert!(
            RequestDirectives::parse([&b"no-store junk, x=\"y"[..]]).no_store,
            "a request keeps its no-store"
        );
    }
}
