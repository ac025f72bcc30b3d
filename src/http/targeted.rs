//! Targeted cache control (RFC 9213): `CDN-Cache-Control` and other fields
//! that address one kind of cache, read as Structured Fields dictionaries.
//!
//! The cache keeps a *target list*, an ordered list of field names
//! ([`HttpCacheLayerBuilder::targeted_fields`](super::HttpCacheLayerBuilder::targeted_fields),
//! default `["cdn-cache-control"]`). For each response, the first field of
//! the list that is present, parses as an RFC 8941 dictionary and is not
//! empty is the response's cache policy for this cache, and its
//! `Cache-Control` and `Expires` are ignored (§2.1). A field that is empty
//! or does not parse is ignored as a whole, as if absent (§2.2): the next
//! one is tried, then `Cache-Control` and `Expires`.
//!
//! The targeted field replaces those two fields only: the rules on
//! `Authorization`, `Set-Cookie`, `Vary`, the request's directives and the
//! 304 merge apply as they do with `Cache-Control`.
//!
//! How a valid field's members are read, choices made here:
//!
//! - Parsing is strict RFC 8941 (the version RFC 9213 cites): keys are
//!   lower case, no white space around `=`, integers of at most 15 digits,
//!   no RFC 9651 dates or display strings. One bad byte anywhere makes
//!   the whole field invalid. Field lines are joined with `, ` first.
//! - A key given twice takes its last value (RFC 8941 §4.2.2).
//! - Parameters on members are ignored (RFC 9213 §2.2).
//! - `no-store`, `no-cache`, `private`, `public`, `must-revalidate`,
//!   `proxy-revalidate` and `immutable` count unless their value is the
//!   Boolean false (`no-store=?0` is absent). Any other value counts as
//!   the directive: `no-cache="set-cookie"` is a qualified `no-cache`,
//!   taken as the unqualified one, as in `Cache-Control` (see
//!   [`cache_control`](super::cache_control)); and a `private` or
//!   `no-store` with an odd value is still kept, never dropped.
//! - `max-age` and `s-maxage` must be non-negative Integers. Any other
//!   value (a Decimal, a String, a Token, a negative number, a Boolean,
//!   an inner list) is invalid freshness information and makes the
//!   response stale (lifetime 0), as RFC 9111 §4.2.1 encourages and as
//!   this cache does for `Cache-Control`; it never grants heuristic
//!   freshness instead.
//! - `stale-while-revalidate` and `stale-if-error` with any value but a
//!   non-negative Integer are ignored (no staleness granted).
//! - Values above 2^31 seconds are taken as 2^31 (RFC 9111 §1.2.2).
//! - Unknown members are ignored, so `CDN-Cache-Control: none` (RFC 9213
//!   §3.1) is valid and selects a policy without directives:
//!   `Cache-Control` is ignored and only heuristic freshness applies.

use http::{HeaderMap, HeaderName};
use sfv::{BareItem, Dictionary, ListEntry, Parser, Version};

use super::cache_control::{MAX_DELTA_SECONDS, ResponseDirectives};

/// `CDN-Cache-Control` (RFC 9213 §3), the default target list's one field.
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The directives of the first field of `targets` that `headers` carries
/// with a valid, non-empty dictionary; `None` when there is none (then
/// `Cache-Control` and `Expires` apply).
pub fn select(headers: &HeaderMap, targets: &[HeaderName]) -> Option<ResponseDirectives> {
    targets.iter().find_map(|name| {
        let mut lines = headers.get_all(name).iter().peekable();
        lines.peek()?;
        parse(lines.map(|v| v.as_bytes()))
    })
}

/// Parses the lines of one targeted field: `None` when they are not a
/// valid RFC 8941 dictionary or it is empty (RFC 9213 §2.2: the field is
/// then ignored as a whole).
pub fn parse<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Option<ResponseDirectives> {
    let mut joined: Vec<u8> = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(line);
    }
    let dictionary: Dictionary = Parser::new(&joined)
        .with_version(Version::Rfc8941)
        .parse()
        .ok()?;
    if dictionary.is_empty() {
        return None;
    }
    let mut d = ResponseDirectives {
        targeted: true,
        ..ResponseDirectives::default()
    };
    for (key, entry) in &dictionary {
        match key.as_str() {
            "max-age" => d.max_age = Some(seconds(entry).unwrap_or(0)),
            "s-maxage" => d.s_maxage = Some(seconds(entry).unwrap_or(0)),
            "stale-while-revalidate" => d.stale_while_revalidate = seconds(entry),
            "stale-if-error" => d.stale_if_error = seconds(entry),
            "no-store" => d.no_store = present(entry),
            "no-cache" => d.no_cache = present(entry),
            "private" => d.private = present(entry),
            "public" => d.public = present(entry),
            "must-revalidate" => d.must_revalidate = present(entry),
            "proxy-revalidate" => d.proxy_revalidate = present(entry),
            "immutable" => d.immutable = present(entry),
            _ => {}
        }
    }
    Some(d)
}

/// A non-negative Integer member (parameters ignored), capped at 2^31.
fn seconds(entry: &ListEntry) -> Option<u64> {
    let ListEntry::Item(item) = entry else {
        return None;
    };
    let n = i64::from(item.bare_item.as_integer()?);
    u64::try_from(n).ok().map(|n| n.min(MAX_DELTA_SECONDS))
}

/// Whether a flag member counts: anything but the Boolean false.
fn present(entry: &ListEntry) -> bool {
    !matches!(entry, ListEntry::Item(item) if item.bare_item == BareItem::Boolean(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Option<ResponseDirectives> {
        parse([s.as_bytes()])
    }

    #[test]
    fn members_map_to_directives() {
        let d = one(
            "max-age=60, s-maxage=120, no-cache, private, public, must-revalidate, \
             proxy-revalidate, immutable, stale-while-revalidate=30, stale-if-error=40",
        )
        .unwrap();
        assert!(d.targeted && !d.unparseable);
        assert_eq!((d.max_age, d.s_maxage), (Some(60), Some(120)));
        assert_eq!(
            (d.stale_while_revalidate, d.stale_if_error),
            (Some(30), Some(40))
        );
        assert!(d.no_cache && d.private && d.public && d.must_revalidate);
        assert!(d.proxy_revalidate && d.immutable && !d.no_store);
        assert!(one("no-store").unwrap().no_store);
    }

    #[test]
    fn invalid_or_empty_fields_are_ignored_as_a_whole() {
        for s in [
            "",
            "   ",
            "max-age = 60",
            "Max-Age=60",
            "max-age=60,",
            ",max-age=60",
            "max-age=60;",
            "max-age=1234567890123456",
            "max-age=60, no-store junk",
            "no-store, x=\"unterminated",
            "private, x=\u{e9}",
            "max-age=@1659578233",
            "x=%\"display\"",
            "\tmax-age=60",
        ] {
            assert_eq!(one(s), None, "{s:?}");
        }
        assert_eq!(parse([&b"private, x=\"\xff\""[..]]), None);
        assert_eq!(parse(std::iter::empty()), None);
    }

    #[test]
    fn odd_but_valid_white_space_is_fine() {
        let d = one("  max-age=60 ,\tno-cache\t,  private  ").unwrap();
        assert_eq!(d.max_age, Some(60));
        assert!(d.no_cache && d.private);
    }

    #[test]
    fn lines_are_joined() {
        let d = parse([&b"max-age=60"[..], b"private"]).unwrap();
        assert_eq!(d.max_age, Some(60));
        assert!(d.private);
        assert_eq!(parse([&b"max-age=60"[..], b""]), None, "an empty line");
        assert_eq!(parse([&b"max-age=60"[..], b"Private"]), None);
    }

    #[test]
    fn the_last_of_duplicate_keys_wins() {
        assert_eq!(one("max-age=10, max-age=20").unwrap().max_age, Some(20));
        assert!(!one("no-store, no-store=?0").unwrap().no_store);
        assert!(one("no-store=?0, no-store").unwrap().no_store);
    }

    #[test]
    fn parameters_are_ignored() {
        let d = one("max-age=60;foo=bar;baz, private;x=?0, no-store=?0;y=1").unwrap();
        assert_eq!(d.max_age, Some(60));
        assert!(d.private && !d.no_store);
    }

    #[test]
    fn flags_count_unless_false() {
        assert!(!one("no-store=?0").unwrap().no_store);
        for s in [
            "no-store=?1",
            "no-store=1",
            "no-store=\"x\"",
            "no-store=tok",
            "no-store=(a b)",
        ] {
            assert!(one(s).unwrap().no_store, "{s}");
        }
        assert!(one("no-cache=\"set-cookie\"").unwrap().no_cache);
        assert!(one("private=\"x\"").unwrap().private);
    }

    #[test]
    fn invalid_freshness_values_are_stale() {
        for s in [
            "max-age=-1",
            "max-age=1.5",
            "max-age=\"60\"",
            "max-age=sixty",
            "max-age",
            "max-age=?1",
            "max-age=(60)",
            "max-age=:AAA=:",
        ] {
            assert_eq!(one(s).unwrap().max_age, Some(0), "{s}");
        }
        assert_eq!(one("s-maxage=-5").unwrap().s_maxage, Some(0));
    }

    #[test]
    fn invalid_stale_extensions_grant_nothing() {
        let d = one("max-age=5, stale-while-revalidate=-1, stale-if-error=2.5").unwrap();
        assert_eq!((d.stale_while_revalidate, d.stale_if_error), (None, None));
        let d = one("stale-while-revalidate, stale-if-error=\"9\"").unwrap();
        assert_eq!((d.stale_while_revalidate, d.stale_if_error), (None, None));
    }

    #[test]
    fn huge_integers_are_capped() {
        let d = one("max-age=999999999999999, stale-if-error=999999999999999").unwrap();
        assert_eq!(d.max_age, Some(MAX_DELTA_SECONDS));
        assert_eq!(d.stale_if_error, Some(MAX_DELTA_SECONDS));
    }

    #[test]
    fn unknown_members_still_select_the_field() {
        let d = one("none").unwrap();
        assert!(d.targeted);
        assert_eq!(d.max_age, None);
        assert!(!d.no_store && !d.private);
    }

    #[test]
    fn select_takes_the_first_present_valid_field() {
        let mine = HeaderName::from_static("myapp-cdn-cache-control");
        let targets = [mine.clone(), CDN_CACHE_CONTROL];
        let mut h = HeaderMap::new();
        assert_eq!(select(&h, &targets), None);
        h.insert(CDN_CACHE_CONTROL, "max-age=20".parse().unwrap());
        assert_eq!(select(&h, &targets).unwrap().max_age, Some(20));
        h.insert(mine.clone(), "max-age=10".parse().unwrap());
        assert_eq!(select(&h, &targets).unwrap().max_age, Some(10));
        h.insert(mine.clone(), "max-age=10;".parse().unwrap());
        assert_eq!(
            select(&h, &targets).unwrap().max_age,
            Some(20),
            "an invalid first field is skipped"
        );
        h.insert(mine, "".parse().unwrap());
        assert_eq!(select(&h, &targets).unwrap().max_age, Some(20), "empty");
        assert_eq!(select(&h, &[]), None, "an empty list turns it off");
    }
}
