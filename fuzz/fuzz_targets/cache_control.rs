//! `Cache-Control` parsing on arbitrary bytes: never panics, never grants
//! more than 2^31 seconds, never loses `private` / `no-store` /
//! `no-cache`, and what it cannot parse is never stored (see
//! `cache_control_check.rs`, which tests/http/parser.rs also runs over the
//! corpus on stable).
//!
//! cargo +nightly fuzz run cache_control fuzz/corpus/cache_control
#![no_main]

use libfuzzer_sys::fuzz_target;

mod cache_control_check;

fuzz_target!(|data: &[u8]| cache_control_check::check(data));
