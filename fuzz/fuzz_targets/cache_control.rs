//! `Cache-Control` parsing on arbitrary bytes: never panics, and never
//! grants more than 2^31 seconds.
//!
//! cargo +nightly fuzz run cache_control fuzz/corpus/cache_control
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_scale::http::cache_control::{MAX_DELTA_SECONDS, RequestDirectives, ResponseDirectives};

fuzz_target!(|data: &[u8]| {
    let (a, b) = data.split_at(data.len() / 2);
    let r = ResponseDirectives::parse([a, b]);
    for v in [r.max_age, r.s_maxage, r.stale_while_revalidate, r.stale_if_error].into_iter().flatten() {
        assert!(v <= MAX_DELTA_SECONDS);
    }
    let q = RequestDirectives::parse([data]);
    assert!(q.max_age.is_none_or(|v| v <= MAX_DELTA_SECONDS));
});
