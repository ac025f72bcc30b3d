//! Range requests (RFC 9110 §14) answered from a stored response: a
//! single `bytes` range of a complete stored `200` becomes a `206 Partial
//! Content` whose body is a slice of the stored one (no copy), or a `416`
//! when no byte of it exists; `If-Range` (§13.1.5) decides whether the
//! range applies at all.
//!
//! What the cache does not answer: a request for several ranges goes to
//! the origin as sent (see the service). A `Range` the cache cannot read
//! (another unit, bad syntax, `last-pos` below `first-pos`) is ignored, as
//! §14.2 allows: the full response is sent. A `206` is never stored.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;

use super::body::CacheBody;
use super::freshness;
use super::stored::Stored;

/// What a request's `Range` asks for, as far as the cache is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requested {
    /// One byte range.
    Single(Spec),
    /// Several (also several `Range` lines): for the origin to answer.
    Multi,
}

/// One `range-spec` of the `bytes` unit. Numbers too large for a `u64`
/// are read as `u64::MAX`: a first position past any body, a last
/// position or suffix covering all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spec {
    /// `first-last` (`last` absent: to the end).
    From { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// How a stored response answers a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The whole response (no range, or one that does not apply).
    Full,
    /// These bytes of the body.
    Partial(Range<usize>),
    /// No byte of the range exists: a `416`.
    Unsatisfiable,
}

/// A GET without `Range`: the only request whose response may replace
/// (or evict) what is stored for everybody.
pub(crate) fn plain_get(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::GET && !headers.contains_key(http::header::RANGE)
}

/// The request's `Range`, `None` when it has none or one the cache
/// ignores (RFC 9110 §14.2: another unit, or one it cannot read).
pub(crate) fn requested(headers: &HeaderMap) -> Option<Requested> {
    let mut lines = headers.get_all(header::RANGE).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return Some(Requested::Multi);
    }
    let (unit, set) = first
        .as_bytes()
        .split_at(first.as_bytes().iter().position(|&b| b == b'=')?);
    if !unit.eq_ignore_ascii_case(b"bytes") {
        return None;
    }
    let mut found = None;
    let mut several = false;
    // `1#range-spec`: empty members and white space around commas are
    // allowed (RFC 9110 §5.6.1.2); one bad member makes the field invalid.
    for member in set[1..].split(|&b| b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        let spec = spec(member)?;
        if found.is_some() {
            several = true;
        }
        found = Some(spec);
    }
    let spec = found?;
    Some(if several {
        Requested::Multi
    } else {
        Requested::Single(spec)
    })
}

fn spec(member: &[u8]) -> Option<Spec> {
    let dash = member.iter().position(|&b| b == b'-')?;
    let (first, last) = (&member[..dash], &member[dash + 1..]);
    if first.is_empty() {
        return Some(Spec::Suffix(number(last)?));
    }
    let first = number(first)?;
    if last.is_empty() {
        return Some(Spec::From { first, last: None });
    }
    let last = number(last)?;
    // An invalid range-spec (RFC 9110 §14.1.1).
    (last >= first).then_some(Spec::From {
        first,
        last: Some(last),
    })
}

/// `1*DIGIT`, saturating at `u64::MAX`.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// How `stored` answers a request with `headers` asking for `spec`: only
/// a stored `200` is sliced, and only when `If-Range`, if sent, matches.
pub(crate) fn answer(stored: &Stored, headers: &HeaderMap, spec: Spec) -> Answer {
    if stored.status != StatusCode::OK || !if_range_matches(stored, headers) {
        return Answer::Full;
    }
    let len = stored.body.len() as u64;
    let (start, end) = match spec {
        Spec::From { first, .. } if first >= len => return Answer::Unsatisfiable,
        Spec::From { first, last } => (first, last.map_or(len, |l| l.min(len - 1) + 1)),
        Spec::Suffix(0) => return Answer::Unsatisfiable,
        // An empty body has no byte range to send; the whole (empty)
        // response answers it.
        Spec::Suffix(_) if len == 0 => return Answer::Full,
        Spec::Suffix(n) => (len.saturating_sub(n), len),
    };
    // Both are at most the body's length, a `usize`.
    Answer::Partial(start as usize..end as usize)
}

/// The answer for a request's own `Range`, parsed here (a multi-range
/// request never gets this far: it goes to the origin).
pub(crate) fn answer_for(stored: &Stored, headers: &HeaderMap) -> Answer {
    match requested(headers) {
        Some(Requested::Single(spec)) => answer(stored, headers, spec),
        _ => Answer::Full,
    }
}

/// `If-Range` (RFC 9110 §13.1.5): absent, or a strong entity tag equal to
/// the stored strong `ETag`, or a date equal to the stored
/// `Last-Modified` when that is a strong validator (the stored `Date` at
/// least 60 seconds after it, §8.8.2.2). A weak tag never matches.
fn if_range_matches(stored: &Stored, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::IF_RANGE) else {
        return true;
    };
    let value = value.as_bytes().trim_ascii();
    if value.starts_with(b"\"") {
        return stored
            .etag()
            .is_some_and(|etag| etag.as_bytes().trim_ascii() == value && value.len() >= 2);
    }
    if value.starts_with(b"W/") {
        return false;
    }
    let Some(since) = std::str::from_utf8(value)
        .ok()
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return false;
    };
    let modified = freshness::date(&stored.headers, header::LAST_MODIFIED);
    let date = freshness::date(&stored.headers, header::DATE);
    match (modified, date) {
        (Some(modified), Some(date)) => {
            modified == since
                && date
                    .duration_since(modified)
                    .is_ok_and(|d| d >= Duration::from_secs(60))
        }
        _ => false,
    }
}

/// `Content-Range: bytes first-last/len` for `range` of a `len`-byte
/// body (`bytes */len` for none): written on the stack, then one
/// allocation of the exact size.
fn content_range(range: Option<&Range<usize>>, len: usize) -> HeaderValue {
    let mut text = Digits::default();
    write_content_range(&mut text, range, len);
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(text.as_ref()))
        .expect("digits, spaces, '-', '*' and '/'")
}

/// The `Content-Range` and `Content-Length` values of a `206` for `range`
/// of a `len`-byte body: both written into one buffer, which becomes one
/// allocation ([`Bytes::from_owner`]) the two values are slices of.
pub(crate) fn partial_values(range: &Range<usize>, len: usize) -> (HeaderValue, HeaderValue) {
    let mut text = Digits::default();
    write_content_range(&mut text, Some(range), len);
    let split = text.len();
    text.uint(range.len() as u64);
    let both = Bytes::from_owner(text);
    let value = |bytes: Bytes| {
        HeaderValue::from_maybe_shared(bytes).expect("digits, spaces, '-', '*' and '/'")
    };
    (value(both.slice(..split)), value(both.slice(split..)))
}

/// A buffer for a `Content-Range` value (`bytes `, three numbers of at
/// most 20 digits and two separators) and a `Content-Length` one (at most
/// 20 digits).
type Digits = super::stack_buf::StackBuf<96>;

/// Writes `bytes first-last/len` (`bytes */len` for no range).
fn write_content_range(text: &mut Digits, range: Option<&Range<usize>>, len: usize) {
    text.push(b"bytes ");
    match range {
        Some(range) => {
            text.uint(range.start as u64);
            text.push(b"-");
            text.uint((range.end - 1) as u64);
        }
        None => text.push(b"*"),
    }
    text.push(b"/");
    text.uint(len as u64);
}

/// Turns `headers` (a stored response's, with `Age` and any status entry)
/// into a `206`'s for `range` of a `len`-byte body.
pub(crate) fn partial_headers(headers: &mut HeaderMap, range: &Range<usize>, len: usize) {
    let (content_range, content_length) = partial_values(range, len);
    // `try_insert`: a map at its size limit is left as it is, never a panic.
    let _ = headers.try_insert(header::CONTENT_RANGE, content_range);
    let _ = headers.try_insert(header::CONTENT_LENGTH, content_length);
}

/// The `206` for `range` of `stored`: `headers` as made by
/// [`partial_headers`], the slice of the body (none for `HEAD`), no
/// trailers (they describe the whole body).
pub(crate) fn partial<B: Body>(
    stored: &Stored,
    head: bool,
    headers: HeaderMap,
    range: Range<usize>,
) -> Response<CacheBody<B>> {
    let body = if head {
        CacheBody::empty()
    } else {
        CacheBody::full(stored.body.slice(range), None)
    };
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::PARTIAL_CONTENT;
    *res.version_mut() = stored.version;
    *res.headers_mut() = headers;
    res
}

/// The `416` for a range of `stored` that has no byte: `Content-Range:
/// bytes */len` (RFC 9110 §15.5.17), the stored validators, `Date`,
/// `Vary` and `age`, no body.
pub(crate) fn unsatisfiable<B: Body>(stored: &Stored, age: Duration) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::empty());
    *res.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    *res.version_mut() = stored.version;
    let headers = res.headers_mut();
    for name in [
        header::DATE,
        header::ETAG,
        header::LAST_MODIFIED,
        header::VARY,
    ] {
        for v in stored.headers.get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    headers.insert(
        header::CONTENT_RANGE,
        content_range(None, stored.body.len()),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Requested> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(value).unwrap());
        requested(&headers)
    }

    fn from(first: u64, last: Option<u64>) -> Option<Requested> {
        Some(Requested::Single(Spec::From { first, last }))
    }

    #[test]
    fn rfc9110_14_1_1_the_grammar_is_read_strictly_and_numbers_saturate() {
        assert_eq!(parse("bytes=0-499"), from(0, Some(499)));
        assert_eq!(parse("bytes=9500-"), from(9500, None));
        assert_eq!(
            parse("bytes=-500"),
            Some(Requested::Single(Spec::Suffix(500)))
        );
        assert_eq!(
            parse("Bytes=1-1"),
            from(1, Some(1)),
            "the unit is case-insensitive"
        );
        assert_eq!(parse("bytes=,\t1-2 ,,"), from(1, Some(2)), "empty members");
        assert_eq!(parse("bytes=0-1,3-4"), Some(Requested::Multi));
        assert_eq!(
            parse("bytes=99999999999999999999-"),
            from(u64::MAX, None),
            "too large: past any body"
        );
        for ignored in [
            "bytes=5-4",
            "bytes=",
            "bytes=,",
            "bytes",
            "items=0-1",
            "bytes=a-b",
            "bytes=1 -2",
            "bytes=-",
            "bytes=--1",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=0-1,x",
        ] {
            assert_eq!(parse(ignored), None, "{ignored}");
        }
    }

    #[test]
    fn content_range_is_written_exactly() {
        assert_eq!(content_range(Some(&(0..1)), 1), "bytes 0-0/1");
        assert_eq!(
            content_range(Some(&(10..usize::MAX)), usize::MAX),
            format!("bytes 10-{}/{}", usize::MAX - 1, usize::MAX)
        );
        assert_eq!(content_range(None, 1000), "bytes */1000");
    }

    #[test]
    fn partial_values_are_written_exactly() {
        let (range, length) = partial_values(&(8192..12288), 65536);
        assert_eq!(range, "bytes 8192-12287/65536");
        assert_eq!(length, "4096");
        let (range, length) = partial_values(&(0..usize::MAX), usize::MAX);
        assert_eq!(range, format!("bytes 0-{}/{}", usize::MAX - 1, usize::MAX));
        assert_eq!(length, usize::MAX.to_string());
    }
}
