//! RFC 9211 `Cache-Status`: the entry this cache adds to the responses that
//! pass through it (on by default, see
//! [`HttpCacheLayerBuilder::cache_status`](super::HttpCacheLayerBuilder::cache_status)).
//!
//! The field is a Structured Fields list whose first member is the cache
//! closest to the origin and whose last is the one closest to the user
//! (RFC 9211 §2): this cache's entry goes after whatever the response
//! already carries (the origin's, an inner cache's), on a line of its own.
//! Those entries are kept byte for byte and never read. Ours is added on
//! the way out only, never stored: a stored response (here or in the
//! shared tier) holds only what the origin sent, and a hit says `hit`, not
//! the miss that stored it.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::cache_control::RequestDirectives;
use super::config::HttpConfig;
use super::freshness::{self, HttpCachePolicy, Usable};
use super::stored::Stored;
use crate::error::ConfigError;

/// The field's name.
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The name an unnamed cache gives itself.
pub(crate) const DEFAULT_NAME: &str = "tower-scale";

/// Why a request went forward (RFC 9211 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// Not eligible: an unsafe method, a request the cache cannot key, a
    /// `no-store` request with nothing stored for it (one with a stale
    /// stored response says `stale`: the cache did take it).
    Bypass,
    /// Nothing stored could be used.
    Miss,
    /// A stored response was fresh, but the request's directives asked for
    /// it to be validated.
    Request,
    /// The stored response was stale (or says `no-cache`).
    Stale,
}

impl Fwd {
    fn token(self) -> &'static [u8] {
        match self {
            Fwd::Bypass => b"bypass",
            Fwd::Miss => b"miss",
            Fwd::Request => b"request",
            Fwd::Stale => b"stale",
        }
    }
}

/// The entry's `detail` (RFC 9211 §2.8): what the other parameters do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Found in the shared tier (`detail=l2`).
    L2,
    /// A stale stored response served because the origin could not be
    /// reached (`detail=unreachable`, RFC 9111 §4.2.4).
    Unreachable,
}

impl Detail {
    fn token(self) -> &'static [u8] {
        match self {
            Detail::L2 => b"l2",
            Detail::Unreachable => b"unreachable",
        }
    }
}

/// What this cache's entry says about one response. Also the note the
/// upstream code leaves in a response's extensions for what only it knows
/// (collapsed, stored, the next hop's status); the service fills in the
/// rest and writes the entry.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Status {
    /// Answered from storage without going forward.
    pub(crate) hit: bool,
    /// Why the request went forward (`None` on a note: the service's).
    pub(crate) fwd: Option<Fwd>,
    /// What the next hop answered, when the client gets another status.
    pub(crate) fwd_status: Option<StatusCode>,
    /// The remaining freshness lifetime, in seconds (negative: stale).
    pub(crate) ttl: Option<i64>,
    /// The response was stored.
    pub(crate) stored: bool,
    /// The request waited for another one's response and reused it.
    pub(crate) collapsed: bool,
    /// The `detail` parameter, if any.
    pub(crate) detail: Option<Detail>,
    /// Made by this cache, not from a stored response (a 504 when the
    /// origin is unreachable and nothing stored may stand in): no entry
    /// (RFC 9211 §2: an intermediary does not add one to a response it
    /// generates locally unless it is based on a stored response).
    pub(crate) generated: bool,
}

impl Status {
    /// A hit with its remaining freshness.
    pub(crate) fn hit(stored: &Stored, age: Duration) -> Self {
        Self {
            hit: true,
            ttl: Some(ttl(stored.lifetime, age)),
            ..Self::default()
        }
    }
}

/// The remaining freshness lifetime in whole seconds, as RFC 9211's `ttl`
/// (negative once stale), from the same whole seconds as the `Age` the
/// response carries: `ttl + Age` is the freshness lifetime. Kept inside
/// the Structured Fields integer range.
pub(crate) fn ttl(lifetime: Duration, age: Duration) -> i64 {
    const MAX: i64 = 999_999_999_999_999;
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX).min(MAX);
    (secs(lifetime) - secs(age)).clamp(-MAX, MAX)
}

/// Why a stored response the request cannot be answered with goes
/// forward: `request` when it is fresh by itself and only the request's
/// directives (`no-cache`, `max-age`, `min-fresh`) keep it from being used,
/// `stale` otherwise.
pub(crate) fn revalidation(stored: &Stored, age: Duration, rules: &HttpCachePolicy) -> Fwd {
    let alone = freshness::usable(
        age,
        stored.lifetime,
        &stored.cc,
        &RequestDirectives::default(),
        rules,
    );
    if alone == Usable::Fresh {
        Fwd::Request
    } else {
        Fwd::Stale
    }
}

/// The name as it is written in the field: an sf-token as is, anything
/// else printable ASCII as an sf-string; a name an sf-string cannot hold
/// (control characters, non-ASCII) is refused. Empty: [`DEFAULT_NAME`].
pub(crate) fn encode_name(name: &str) -> Result<Bytes, ConfigError> {
    if name.is_empty() {
        return Ok(Bytes::from_static(DEFAULT_NAME.as_bytes()));
    }
    if is_token(name.as_bytes()) {
        return Ok(Bytes::copy_from_slice(name.as_bytes()));
    }
    if let Some(bad) = name.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(ConfigError::OutOfRange {
            field: "name",
            reason: format!(
                "the Cache-Status entry names the cache as a Structured Fields token or \
                 string, which holds printable ASCII only; {name:?} has {bad:?} (use \
                 another name, or turn `cache_status` off)"
            ),
        });
    }
    let mut quoted = Vec::with_capacity(name.len() + 8);
    quoted.push(b'"');
    for &b in name.as_bytes() {
        if b == b'"' || b == b'\\' {
            quoted.push(b'\\');
        }
        quoted.push(b);
    }
    quoted.push(b'"');
    Ok(Bytes::from(quoted))
}

/// An sf-token (RFC 8941 §3.3.4): `( ALPHA / "*" ) *( tchar / ":" / "/" )`.
fn is_token(s: &[u8]) -> bool {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b);
    match s.split_first() {
        Some((first, rest)) => {
            (first.is_ascii_alphabetic() || *first == b'*') && rest.iter().all(|&b| tchar(b))
        }
        None => false,
    }
}

/// Leaves a note for the service on a response from upstream (nothing
/// when the field is off).
pub(crate) fn note<B>(config: &HttpConfig, res: &mut Response<B>, f: impl FnOnce(&mut Status)) {
    if config.cache_status.is_some() {
        f(res.extensions_mut().get_or_insert_default::<Status>());
    }
}

/// Notes `stored` on a fetch's response when it was stored.
pub(crate) fn note_stored<B, T, E>(
    config: &HttpConfig,
    result: &mut Result<(Response<B>, Option<T>), E>,
) {
    if let Ok((res, Some(_))) = result {
        note(config, res, |s| s.stored = true);
    }
}

/// Notes a stale stored response standing in for an error
/// (`stale-if-error`, or an unreachable origin with `detail`): its
/// (negative) ttl and, after an HTTP error, the status the next hop gave.
pub(crate) fn note_stood_in<B>(
    config: &HttpConfig,
    res: &mut Response<B>,
    stored: &Stored,
    age: Duration,
    fwd_status: Option<StatusCode>,
    detail: Option<Detail>,
) {
    note(config, res, |s| {
        s.ttl = Some(ttl(stored.lifetime, age));
        s.fwd_status = fwd_status;
        s.detail = detail;
    });
}

/// Writes the entry for a response that went (or may have gone) upstream:
/// the note left on it, the request going forward for `why` unless the
/// note says otherwise. The note is removed.
pub(crate) fn finish<B>(config: &HttpConfig, mut res: Response<B>, why: Fwd) -> Response<B> {
    if let Some(name) = &config.cache_status {
        let mut status = res.extensions_mut().remove::<Status>().unwrap_or_default();
        if status.generated {
            return res;
        }
        if !status.hit && status.fwd.is_none() {
            status.fwd = Some(why);
        }
        write(name, &mut res, &status);
    }
    res
}

/// Appends this cache's entry, `NAME` then its parameters, as the last
/// line of the field (when it is on).
#[inline]
pub(crate) fn stamp<B>(config: &HttpConfig, res: &mut Response<B>, status: &Status) {
    if let Some(name) = &config.cache_status {
        write(name, res, status);
    }
}

fn write<B>(name: &Bytes, res: &mut Response<B>, status: &Status) {
    if let Some(value) = value(name, res.status(), status) {
        res.headers_mut().append(CACHE_STATUS, value);
    }
}

/// This cache's entry for a response with status `res_status`: `NAME`
/// then its parameters.
pub(crate) fn value(name: &Bytes, res_status: StatusCode, status: &Status) -> Option<HeaderValue> {
    // The parameters are short and bounded: built on the stack, then one
    // allocation of the exact size for the value.
    let mut params = Params::default();
    if status.hit {
        params.push(b"; hit");
    }
    if let Some(fwd) = status.fwd {
        params.push(b"; fwd=");
        params.push(fwd.token());
        if let Some(code) = status.fwd_status
            && code != res_status
        {
            params.push(b"; fwd-status=");
            params.int(i64::from(code.as_u16()));
        }
    }
    if let Some(ttl) = status.ttl {
        params.push(b"; ttl=");
        params.int(ttl);
    }
    if status.stored {
        params.push(b"; stored");
    }
    if status.collapsed {
        params.push(b"; collapsed");
    }
    if let Some(detail) = status.detail {
        params.push(b"; detail=");
        params.push(detail.token());
    }
    let mut value = Vec::with_capacity(name.len() + params.len());
    value.extend_from_slice(name);
    value.extend_from_slice(params.as_ref());
    // Capacity equals length: the `Bytes` takes the buffer over.
    HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
}

/// The parameters (at most about 100 bytes).
type Params = super::stack_buf::StackBuf<128>;

#[cfg(test)]
mod tests {
    use super::*;

    fn line(status: Status, res_status: StatusCode) -> String {
        let mut res = Response::new(());
        *res.status_mut() = res_status;
        write(&Bytes::from_static(b"c"), &mut res, &status);
        res.headers()[CACHE_STATUS].to_str().unwrap().to_string()
    }

    #[test]
    fn names_are_tokens_or_strings_or_refused() {
        assert_eq!(encode_name("").unwrap(), "tower-scale");
        assert_eq!(
            encode_name("edge-1.example:8080/a").unwrap(),
            "edge-1.example:8080/a"
        );
        assert_eq!(encode_name("*x").unwrap(), "*x");
        assert_eq!(encode_name("My Cache").unwrap(), "\"My Cache\"");
        assert_eq!(encode_name("1st").unwrap(), "\"1st\"");
        assert_eq!(encode_name("a\"b\\c").unwrap(), "\"a\\\"b\\\\c\"");
        assert_eq!(encode_name("a,b;c=d").unwrap(), "\"a,b;c=d\"");
        assert!(encode_name("tab\there").is_err());
        assert!(encode_name("line\nbreak").is_err());
        assert!(encode_name("caché").is_err());
    }

    #[test]
    fn parameters_are_written_in_order_with_signed_integers() {
        let hit = Status {
            hit: true,
            ttl: Some(-412),
            ..Status::default()
        };
        assert_eq!(line(hit, StatusCode::OK), "c; hit; ttl=-412");
        let reval = Status {
            fwd: Some(Fwd::Stale),
            fwd_status: Some(StatusCode::NOT_MODIFIED),
            stored: true,
            ..Status::default()
        };
        assert_eq!(
            line(reval, StatusCode::OK),
            "c; fwd=stale; fwd-status=304; stored"
        );
        assert_eq!(
            line(reval, StatusCode::NOT_MODIFIED),
            "c; fwd=stale; stored",
            "fwd-status defaults to the response's status"
        );
        let l2 = Status {
            hit: true,
            ttl: Some(0),
            detail: Some(Detail::L2),
            ..Status::default()
        };
        assert_eq!(line(l2, StatusCode::OK), "c; hit; ttl=0; detail=l2");
        let big = Status {
            hit: true,
            ttl: Some(ttl(Duration::MAX, Duration::ZERO)),
            ..Status::default()
        };
        assert_eq!(line(big, StatusCode::OK), "c; hit; ttl=999999999999999");
        assert_eq!(
            ttl(Duration::ZERO, Duration::MAX),
            -999_999_999_999_999,
            "within the sf-integer range"
        );
        assert_eq!(
            ttl(Duration::from_secs(60), Duration::from_millis(10_900)),
            50
        );
    }
}
