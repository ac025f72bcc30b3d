//! Random sequences of reads, invalidations and clock moves against the
//! cache: a read of key k only ever returns k's data, and a read right after
//! k was invalidated always goes to the service.
//!
//! cargo +nightly fuzz run cache_ops
#![no_main]

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tower::{Service, service_fn};
use tower_scale::cache::{CacheLayer, CachePolicy, Clock, Storable, Windows};

struct Tagged;
impl CachePolicy<u8, Arc<(u8, u64)>> for Tagged {
    type Key = u8;
    fn key(&self, k: &u8) -> Option<u8> {
        (*k != 255).then_some(*k)
    }
    fn storable(&self, k: &u8, _: &Arc<(u8, u64)>, d: &Windows) -> Option<Storable> {
        Some(Storable::new(*d).tag(if k % 2 == 0 { "even" } else { "odd" }))
    }
}

fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the origin answers at once"),
    }
}

fuzz_target!(|ops: &[u8]| {
    let calls = Arc::new(AtomicU64::new(0));
    let origin = {
        let calls = calls.clone();
        service_fn(move |k: u8| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Ok::<_, ()>(Arc::new((k, n))))
        })
    };
    let (clock, mock) = Clock::mock();
    let layer = CacheLayer::builder(Tagged)
        .time_to_live(Duration::from_secs(5))
        .stale_while_revalidate(Duration::from_secs(3))
        .max_entries(4)
        .clock(clock)
        .build()
        .expect("config");
    let invalidator = layer.invalidator();
    let mut svc = tower::Layer::layer(&layer, origin);
    let must_miss = Rc::new(Cell::new(0u16));
    for pair in ops.chunks(2) {
        let (op, key) = (pair[0] % 5, pair.get(1).copied().unwrap_or(0) % 9);
        let key = if key == 8 { 255 } else { key };
        match op {
            0 | 1 => {
                let before = calls.load(Ordering::SeqCst);
                let r = now(svc.call(key)).expect("the origin never fails");
                assert_eq!(r.0, key, "a read of {key} returned another key's data");
                if key != 255 && must_miss.get() & (1 << key) != 0 {
                    assert!(calls.load(Ordering::SeqCst) > before, "{key} served after invalidation");
                }
                if key != 255 {
                    must_miss.set(must_miss.get() & !(1 << key));
                }
            }
            2 => {
                invalidator.invalidate_key(&key);
                if key != 255 {
                    must_miss.set(must_miss.get() | (1 << key));
                }
            }
            3 => {
                let even = key % 2 == 0;
                invalidator.invalidate_tag(if even { "even" } else { "odd" });
                for k in 0..8u8 {
                    if (k % 2 == 0) == even {
                        must_miss.set(must_miss.get() | (1 << k));
                    }
                }
            }
            _ => mock.advance(Duration::from_secs(u64::from(key))),
        }
    }
});
