//! The `Cache-Control` parser on stable: property tests and the fuzz seed
//! corpus (fuzz/corpus/cache_control) run as ordinary tests.

use std::time::SystemTime;

use axum::http::header::{AUTHORIZATION, CACHE_CONTROL};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use proptest::prelude::*;
use tower_scale::http::HttpCachePolicy;
use tower_scale::http::cache_control::{
    MAX_DELTA_SECONDS, RequestDirectives, ResponseDirectives, directives,
};
use tower_scale::http::freshness::{NotStored, storable};

/// Pieces of `Cache-Control` lines, good and bad.
const SOUP: [&[u8]; 15] = [
    b"private",
    b"No-Store",
    b"no-cache",
    b"max-age=60",
    b"public",
    b",",
    b" ",
    b"\t",
    b"=",
    b";",
    b"\"",
    b"\\",
    b"x",
    b"\xe9",
    b"\x0b",
];

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_or_overflow(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let r = ResponseDirectives::parse([&data[..]]);
        for v in [r.max_age, r.s_maxage, r.stale_while_revalidate, r.stale_if_error].into_iter().flatten() {
            prop_assert!(v <= MAX_DELTA_SECONDS);
        }
        let _ = RequestDirectives::parse([&data[..]]);
        fuzz_check::check(&data);
    }

    /// Directive names among separators, junk and obs-text bytes: the
    /// fuzz target's checks (nothing lost, nothing unparseable stored).
    #[test]
    fn directive_soup_keeps_the_fuzz_invariants(
        soup in proptest::collection::vec(
            proptest::sample::select(&SOUP[..]),
            0..24,
        )
    ) {
        let data: Vec<u8> = soup.concat();
        fuzz_check::check(&data);
    }

    #[test]
    fn max_age_round_trips(n in any::<u64>(), upper in any::<bool>(), spaces in 0usize..3) {
        let name = if upper { "MAX-AGE" } else { "max-age" };
        let pad = " ".repeat(spaces);
        let text = format!("public,{pad}{name}={n}{pad}, no-transform");
        let r = ResponseDirectives::parse([text.as_bytes()]);
        prop_assert_eq!(r.max_age, Some(n.min(MAX_DELTA_SECONDS)));
        prop_assert!(r.public);
    }

    #[test]
    fn conflicting_duplicates_are_stale(a in 0u64..100_000, b in 0u64..100_000) {
        let text = format!("max-age={a}, max-age={b}");
        let r = ResponseDirectives::parse([text.as_bytes()]);
        prop_assert_eq!(r.max_age, Some(if a == b { a } else { 0 }));
    }

    #[test]
    fn quoted_values_keep_their_commas(s in "[a-z ,]{0,20}") {
        let text = format!("x=\"{s}\", y");
        let ds = directives([text.as_bytes()]);
        prop_assert_eq!(ds.len(), 2);
        prop_assert_eq!(ds[0].value.as_deref(), Some(s.as_str()));
    }
}

/// The fuzz target's checks, compiled here on stable.
mod fuzz_check {
    use axum::http;
    include!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/fuzz_targets/cache_control_check.rs"
    ));
}

#[test]
fn the_fuzz_seed_corpus_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/cache_control");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("seed corpus") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        // As the fuzz target does (two lines), and as one line.
        fuzz_check::check(&data);
        let r = ResponseDirectives::parse([&data[..]]);
        assert!(r.max_age.is_none_or(|v| v <= MAX_DELTA_SECONDS));
        let _ = RequestDirectives::parse([&data[..]]);
        seen += 1;
    }
    assert!(seen >= 20, "the seed corpus has {seen} files");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    assert_eq!(
        ResponseDirectives::parse([&read("public")[..]]).max_age,
        Some(60)
    );
    assert_eq!(
        ResponseDirectives::parse([&read("duplicate")[..]]).max_age,
        Some(0)
    );
    assert_eq!(
        ResponseDirectives::parse([&read("overflow")[..]]).max_age,
        Some(MAX_DELTA_SECONDS)
    );
    assert!(ResponseDirectives::parse([&read("case")[..]]).must_revalidate);
    assert_eq!(
        RequestDirectives::parse([&read("request")[..]]).max_stale,
        Some(None)
    );
    // What RFC 9110 allows: every directive read, nothing unparseable.
    for name in [
        "obs-text-quoted",
        "odd-whitespace",
        "extensions",
        "empty-members",
        "qualified-escapes",
        "escaped-obs-text",
    ] {
        let r = ResponseDirectives::parse([&read(name)[..]]);
        assert!(r.private && !r.unparseable, "{name}: {r:?}");
    }
    let data = read("repeated-lines");
    let (a, b) = data.split_at(data.len() / 2);
    let r = ResponseDirectives::parse([a, b]);
    assert!(r.no_store && r.max_age == Some(60) && !r.unparseable);
    // What it does not: unparseable, the names still read.
    for name in [
        "junk-after-name",
        "space-around-equals",
        "semicolon",
        "obs-text-unquoted",
        "junk-after-quote",
        "control-byte",
        "unterminated",
        "junk",
    ] {
        let r = ResponseDirectives::parse([&read(name)[..]]);
        assert!(r.unparseable, "{name}: {r:?}");
        assert!(r.private || matches!(name, "semicolon" | "unterminated" | "junk"));
    }
}

/// One generated `Cache-Control` member, as written, and what it is.
#[derive(Debug, Clone)]
struct Member {
    text: Vec<u8>,
    /// The directive name it stands for (lower-cased), if a well-formed one.
    name: Option<String>,
    /// Within what `http-cache-semantics` parses like RFC 9110: lower-case
    /// name, a value without quotes, commas, `=`, escapes or obs-text.
    oracle_safe: bool,
}

const FLAGS: [&str; 7] = [
    "no-store",
    "no-cache",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "immutable",
];

fn random_case(name: &str, upper: &[bool]) -> String {
    name.chars()
        .zip(upper.iter().cycle())
        .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
        .collect()
}

/// A quoted string with escapes, commas, `=` and obs-text bytes (only
/// letters, digits and spaces when `oracle_safe`).
fn quoted(oracle_safe: bool) -> BoxedStrategy<(Vec<u8>, bool)> {
    let plain = "[a-zA-Z0-9 ]{1,4}".prop_map(|s| (s.into_bytes(), true));
    let piece = if oracle_safe {
        plain.boxed()
    } else {
        prop_oneof![
            plain,
            Just((b", ".to_vec(), false)),
            Just((b"=".to_vec(), false)),
            Just((b"\\\"".to_vec(), false)),
            Just((b"\\\\".to_vec(), false)),
            (0x80u8..=0xff).prop_map(|b| (vec![b], false)),
            Just((b"\t".to_vec(), true)),
        ]
        .boxed()
    };
    proptest::collection::vec(piece, 0..5)
        .prop_map(move |pieces| {
            let safe = oracle_safe && pieces.iter().all(|(_, s)| *s);
            let mut text = b"\"".to_vec();
            for (p, _) in pieces {
                text.extend(p);
            }
            text.push(b'"');
            (text, safe)
        })
        .boxed()
}

fn value(oracle_safe: bool) -> BoxedStrategy<(Vec<u8>, bool)> {
    let token = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,8}".prop_map(|s| (s.into_bytes(), true));
    if oracle_safe {
        token.boxed()
    } else {
        prop_oneof![token, quoted(false)].boxed()
    }
}

/// Well-formed members: known directives (any case, qualified or not),
/// `max-age` / `s-maxage` (token or quoted), unknown extensions with or
/// without values, empty members. `oracle_safe`: only what
/// `http-cache-semantics` reads like RFC 9110.
fn member_of(oracle_safe: bool) -> impl Strategy<Value = Member> {
    let flag = (
        proptest::sample::select(&FLAGS[..]),
        proptest::collection::vec(any::<bool>().prop_map(move |u| u && !oracle_safe), 1..4),
        proptest::option::of(value(oracle_safe)),
    )
        .prop_map(|(name, upper, value)| {
            let mut text = random_case(name, &upper).into_bytes();
            let mut safe = !upper.iter().any(|&u| u);
            if let Some((v, s)) = value {
                text.push(b'=');
                text.extend(v);
                safe &= s;
            }
            Member {
                text,
                name: Some(name.to_string()),
                oracle_safe: safe,
            }
        });
    let age = (
        proptest::sample::select(&["max-age", "s-maxage"][..]),
        0u64..100_000,
        any::<bool>().prop_map(move |q| q && !oracle_safe),
    )
        .prop_map(|(name, n, quote)| Member {
            text: if quote {
                format!("{name}=\"{n}\"")
            } else {
                format!("{name}={n}")
            }
            .into_bytes(),
            name: Some(name.to_string()),
            oracle_safe: !quote,
        });
    let extension =
        ("x-[a-z0-9-]{0,6}", proptest::option::of(value(oracle_safe))).prop_map(|(name, value)| {
            let mut text = name.clone().into_bytes();
            let mut safe = true;
            if let Some((v, s)) = value {
                text.push(b'=');
                text.extend(v);
                safe = s;
            }
            Member {
                text,
                name: Some(name),
                oracle_safe: safe,
            }
        });
    let empty = Just(Member {
        text: Vec::new(),
        name: None,
        oracle_safe: true,
    });
    prop_oneof![3 => flag, 2 => age, 2 => extension, 1 => empty]
}

fn member() -> impl Strategy<Value = Member> {
    member_of(false)
}

/// A member that breaks the grammar: junk bytes, white space around `=`,
/// an unterminated quote, a `;` separator, control bytes.
fn junk() -> impl Strategy<Value = Member> {
    let bytes = proptest::collection::vec(
        prop_oneof![
            Just(b'"'),
            Just(b';'),
            Just(b'='),
            Just(b' '),
            Just(b'\\'),
            0u8..0x20,
            0x7fu8..=0xff,
            b'a'..=b'z',
        ],
        1..8,
    );
    prop_oneof![
        bytes.prop_map(|text| Member {
            text,
            name: None,
            oracle_safe: false,
        }),
        Just(Member {
            text: b"max-age = 60".to_vec(),
            name: None,
            oracle_safe: false,
        }),
        Just(Member {
            text: b"x=\"open".to_vec(),
            name: None,
            oracle_safe: false,
        }),
    ]
}

/// Field lines from members: commas with random white space, split over
/// one to three lines; and where each member starts (line, offset).
fn lines(
    members: &[Member],
    ows: &[(u8, u8)],
    cuts: &[usize],
) -> (Vec<Vec<u8>>, Vec<(usize, usize)>) {
    let ws = |n: u8| -> &'static [u8] {
        match n % 4 {
            0 => b"",
            1 => b" ",
            2 => b"\t",
            _ => b" \t ",
        }
    };
    let mut out = vec![Vec::new()];
    let mut starts = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if cuts.contains(&i) {
            out.push(Vec::new());
        }
        let index = out.len() - 1;
        let line = &mut out[index];
        let (before, after) = ows.get(i).copied().unwrap_or((0, 1));
        if !line.is_empty() {
            line.extend_from_slice(ws(before));
            line.push(b',');
        }
        line.extend_from_slice(ws(after));
        starts.push((index, line.len()));
        line.extend_from_slice(&m.text);
    }
    (out, starts)
}

/// Whether `offset` in `line` is inside a quoted string (a junk member's
/// `"` opens one: what follows it is a value, not a directive).
fn quoted_at(line: &[u8], offset: usize) -> bool {
    let (mut quoted, mut i) = (false, 0);
    while i < offset {
        match line[i] {
            b'"' => quoted = !quoted,
            b'\\' if quoted => i += 1,
            _ => {}
        }
        i += 1;
    }
    quoted
}

/// Whether a member named `name` stands outside quoted strings.
fn present_unquoted(
    members: &[Member],
    lines: &[Vec<u8>],
    starts: &[(usize, usize)],
    name: &str,
) -> bool {
    members.iter().zip(starts).any(|(m, &(line, offset))| {
        m.name.as_deref() == Some(name) && !quoted_at(&lines[line], offset)
    })
}

fn present(members: &[Member], name: &str) -> bool {
    members.iter().any(|m| m.name.as_deref() == Some(name))
}

fn ours(
    lines: &[Vec<u8>],
    authorization: bool,
    request_no_store: bool,
) -> Result<std::time::Duration, NotStored> {
    let mut req = HeaderMap::new();
    if authorization {
        req.insert(AUTHORIZATION, HeaderValue::from_static("Bearer a"));
    }
    if request_no_store {
        req.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let mut res = HeaderMap::new();
    for line in lines {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            res.append(CACHE_CONTROL, v);
        }
    }
    let cc = ResponseDirectives::parse(lines.iter().map(Vec::as_slice));
    storable(
        &Method::GET,
        &req,
        &RequestDirectives::from_headers(&req),
        StatusCode::OK,
        &res,
        &cc,
        &HttpCachePolicy::default(),
    )
}

fn oracle(lines: &[Vec<u8>], authorization: bool, request_no_store: bool) -> bool {
    let mut req = Request::get("http://a.example/").body(()).expect("request");
    if authorization {
        req.headers_mut()
            .insert(AUTHORIZATION, HeaderValue::from_static("Bearer a"));
    }
    if request_no_store {
        req.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let mut res = Response::new(());
    for line in lines {
        res.headers_mut().append(
            CACHE_CONTROL,
            HeaderValue::from_bytes(line).expect("oracle-safe lines are valid"),
        );
    }
    let options = http_cache_semantics::CacheOptions {
        shared: true,
        ..Default::default()
    };
    http_cache_semantics::CachePolicy::new_options(&req, &res, SystemTime::now(), options)
        .is_storable()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Lists RFC 9110 allows: every directive is read, none is lost, and
    /// nothing is flagged unparseable.
    #[test]
    fn generated_lists_lose_no_directive(
        members in proptest::collection::vec(member(), 0..8),
        ows in proptest::collection::vec((any::<u8>(), any::<u8>()), 8),
        cuts in proptest::collection::vec(0usize..8, 0..3),
    ) {
        let (lines, _) = lines(&members, &ows, &cuts);
        let r = ResponseDirectives::parse(lines.iter().map(Vec::as_slice));
        prop_assert!(!r.unparseable, "{:?}", lines);
        prop_assert_eq!(r.private, present(&members, "private"));
        prop_assert_eq!(r.no_store, present(&members, "no-store"));
        prop_assert_eq!(r.no_cache, present(&members, "no-cache"));
        prop_assert_eq!(r.public, present(&members, "public"));
        prop_assert_eq!(r.must_revalidate, present(&members, "must-revalidate"));
        prop_assert_eq!(r.max_age.is_some(), present(&members, "max-age"));
        prop_assert_eq!(r.s_maxage.is_some(), present(&members, "s-maxage"));
        let names: Vec<String> = directives(lines.iter().map(Vec::as_slice))
            .into_iter()
            .map(|d| d.name)
            .collect();
        let expected: Vec<String> = members.iter().filter_map(|m| m.name.clone()).collect();
        prop_assert_eq!(names, expected);
        let q = RequestDirectives::parse(lines.iter().map(Vec::as_slice));
        prop_assert_eq!(q.no_store, present(&members, "no-store"));
        prop_assert_eq!(q.no_cache, present(&members, "no-cache"));
    }

    /// With junk members anywhere, `private` and `no-store` still keep the
    /// response out of a shared cache, and `no-cache` is kept or the
    /// response is not stored at all.
    #[test]
    fn junk_never_makes_a_per_user_response_shared(
        members in proptest::collection::vec(prop_oneof![3 => member(), 1 => junk()], 1..10),
        ows in proptest::collection::vec((any::<u8>(), any::<u8>()), 10),
        cuts in proptest::collection::vec(0usize..10, 0..3),
    ) {
        let (lines, starts) = lines(&members, &ows, &cuts);
        let r = ResponseDirectives::parse(lines.iter().map(Vec::as_slice));
        let present = |name| present_unquoted(&members, &lines, &starts, name);
        if present("private") {
            prop_assert!(r.private || r.unparseable);
        }
        if present("no-store") {
            prop_assert!(r.no_store || r.unparseable);
        }
        if present("no-cache") {
            prop_assert!(r.no_cache || r.unparseable);
        }
        if present("private") || present("no-store") {
            prop_assert!(ours(&lines, false, false).is_err());
        }
    }

    /// Against `http-cache-semantics` where it parses like RFC 9110
    /// (lower-case names; values without quotes, commas, `=`, escapes or
    /// obs-text): this cache stores nothing it would refuse, and with
    /// explicit freshness and no repeated directive the two agree.
    #[test]
    fn storable_agrees_with_http_cache_semantics(
        members in proptest::collection::vec(member_of(true), 0..8),
        ows in proptest::collection::vec((any::<u8>(), any::<u8>()), 8),
        cuts in proptest::collection::vec(0usize..8, 0..3),
        authorization in any::<bool>(),
        request_no_store in any::<bool>(),
    ) {
        prop_assert!(members.iter().all(|m| m.oracle_safe));
        let (lines, _) = lines(&members, &ows, &cuts);
        let ours = ours(&lines, authorization, request_no_store);
        let theirs = oracle(&lines, authorization, request_no_store);
        if ours.is_ok() {
            prop_assert!(theirs, "stored what the oracle refuses: {:?}", lines);
        }
        // The oracle reads a repeated directive as `must-revalidate`
        // (which lets an `Authorization` response be stored): compare
        // outcomes only without repeats.
        let mut names: Vec<_> = members.iter().filter_map(|m| m.name.as_deref()).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        let repeats = names.len() != count;
        if !repeats && (present(&members, "max-age") || present(&members, "s-maxage")) {
            prop_assert_eq!(ours.is_ok(), theirs, "{:?} {:?}", lines, ours);
        }
    }
}
