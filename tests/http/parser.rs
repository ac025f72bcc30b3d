//! The `Cache-Control` parser on stable: property tests and the fuzz seed
//! corpus (fuzz/corpus/cache_control) run as ordinary tests.

use proptest::prelude::*;
use tower_scale::http::cache_control::{
    MAX_DELTA_SECONDS, RequestDirectives, ResponseDirectives, directives,
};

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_or_overflow(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let r = ResponseDirectives::parse([&data[..]]);
        for v in [r.max_age, r.s_maxage, r.stale_while_revalidate, r.stale_if_error].into_iter().flatten() {
            prop_assert!(v <= MAX_DELTA_SECONDS);
        }
        let _ = RequestDirectives::parse([&data[..]]);
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

#[test]
fn the_fuzz_seed_corpus_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/cache_control");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("seed corpus") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let r = ResponseDirectives::parse([&data[..]]);
        assert!(r.max_age.is_none_or(|v| v <= MAX_DELTA_SECONDS));
        let _ = RequestDirectives::parse([&data[..]]);
        seen += 1;
    }
    assert!(seen >= 10, "the seed corpus has {seen} files");
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
}
