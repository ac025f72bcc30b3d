//! Memory cost per cached entry, measured: the growth of the process's
//! resident set while the layer stores 200,000 entries of 256-byte values,
//! for each store, minus the values themselves.
//!
//! ```text
//! cargo bench --features full --bench cache_memory
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tower::{Layer, Service, service_fn};
use tower_scale::cache::CacheLayer;

const ENTRIES: u64 = 200_000;
const VALUE_BYTES: usize = 256;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn ready<F: Future>(fut: F) -> F::Output {
    match pin!(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the origin answers at once"),
    }
}

fn origin() -> impl Service<
    u64,
    Response = Bytes,
    Error = Infallible,
    Future = std::future::Ready<Result<Bytes, Infallible>>,
> + Clone
+ Send
+ 'static {
    service_fn(|k: u64| std::future::ready(Ok(Bytes::from(vec![(k % 251) as u8; VALUE_BYTES]))))
}

fn measure(name: &str, fill: impl FnOnce() -> Box<dyn std::any::Any>) {
    let before = resident_bytes();
    let keep = fill();
    let after = resident_bytes();
    let per_entry = (after.saturating_sub(before)) as f64 / ENTRIES as f64;
    // A Bytes made from a Vec owns its 256-byte buffer plus a 32-byte header.
    let payload = (VALUE_BYTES + 32) as f64;
    println!(
        "{name:<28} {per_entry:>7.0} bytes per entry in all, {:>5.0} bytes of cache overhead per entry",
        per_entry - payload
    );
    drop(keep);
}

/// Each measurement runs in a fresh process, so memory freed by one is not
/// reused by the next.
fn main() {
    let Some(which) = std::env::var_os("CACHE_MEMORY_CASE") else {
        println!("{ENTRIES} entries of {VALUE_BYTES}-byte values (resident set growth)");
        for case in ["vec", "moka", "quick"] {
            let out = std::process::Command::new(std::env::current_exe().expect("self"))
                .env("CACHE_MEMORY_CASE", case)
                .output()
                .expect("run a measurement");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        return;
    };
    match which.to_str() {
        Some("vec") => measure_vec(),
        Some("moka") => measure_moka(),
        _ => measure_quick(),
    }
}

fn measure_vec() {
    measure("bare Vec<(u64, Bytes)>", || {
        let v: Vec<(u64, Bytes)> = (0..ENTRIES)
            .map(|k| (k, Bytes::from(vec![(k % 251) as u8; VALUE_BYTES])))
            .collect();
        Box::new(v)
    });
}

fn measure_moka() {
    measure("layer on moka", || {
        let layer = CacheLayer::builder(|k: &u64| Some(*k))
            .time_to_live(Duration::from_secs(3600))
            .max_entries(2 * ENTRIES)
            .build()
            .expect("config");
        let mut svc = layer.layer(origin());
        for k in 0..ENTRIES {
            ready(svc.call(k)).expect("fill");
        }
        tower_scale::cache::Store::run_pending_tasks(svc.store());
        Box::new(svc)
    });
}

fn measure_quick() {
    measure("layer on quick_cache", || {
        let layer = CacheLayer::builder(|k: &u64| Some(*k))
            .time_to_live(Duration::from_secs(3600))
            .max_entries(2 * ENTRIES)
            .build_quick()
            .expect("config");
        let mut svc = layer.layer(origin());
        for k in 0..ENTRIES {
            ready(svc.call(k)).expect("fill");
        }
        Box::new(svc)
    });
}
