//! The cache core: hit, miss, bypass, windows, single-flight, invalidation,
//! readiness, eviction, statistics. Time is a mock clock; no test sleeps to
//! wait for a condition.

mod support;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{Err, Origin, Resp, eventually};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_scale::cache::{
    Cache, CacheLayer, CachePolicy, Clock, MockClock, MokaStore, Storable, Store, Windows,
};

const DEADLINE: Duration = Duration::from_secs(10);

type KeyFn = fn(&u64) -> Option<u64>;
type TestCache = Cache<Origin, KeyFn, MokaStore<u64, Resp, Err>>;

fn some_key(k: &u64) -> Option<u64> {
    Some(*k)
}

/// A cache over `origin` with a mock clock, TTL 10 s and no early refresh
/// unless the test asks for it.
fn cache(
    origin: &Origin,
    configure: impl FnOnce(
        tower_scale::cache::CacheLayerBuilder<KeyFn>,
    ) -> tower_scale::cache::CacheLayerBuilder<KeyFn>,
) -> (TestCache, MockClock) {
    let (clock, mock) = Clock::mock();
    let builder = CacheLayer::builder(some_key as KeyFn)
        .time_to_live(Duration::from_secs(10))
        .no_early_refresh()
        .clock(clock)
        .seed(7);
    let layer = configure(builder).build().expect("valid config");
    (
        ServiceBuilder::new().layer(layer).service(origin.clone()),
        mock,
    )
}

async fn get(svc: &mut TestCache, key: u64) -> Result<String, String> {
    svc.ready()
        .await?
        .call(key)
        .await
        .map(|r| r.as_str().to_string())
}

#[tokio::test]
async fn hit_and_miss() {
    let origin = Origin::new();
    let (mut svc, _) = cache(&origin, |b| b);
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    assert_eq!(
        get(&mut svc, 1).await.unwrap(),
        "1#1",
        "served from the cache"
    );
    assert_eq!(get(&mut svc, 2).await.unwrap(), "2#2");
    assert_eq!(origin.calls(), 2);
    let stats = svc.stats();
    assert_eq!((stats.hits, stats.misses, stats.stored), (1, 2, 2));
}

#[tokio::test]
async fn a_hit_returns_the_stored_response_without_copying_it() {
    let origin = Origin::new();
    let (mut svc, _) = cache(&origin, |b| b);
    let a = svc.ready().await.unwrap().call(1).await.unwrap();
    let b = svc.ready().await.unwrap().call(1).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

#[tokio::test]
async fn bypass_goes_to_the_service_every_time() {
    let origin = Origin::new();
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(|k: &u64| (*k != 0).then_some(*k))
        .clock(clock)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
    for _ in 0..3 {
        svc.ready().await.unwrap().call(0).await.unwrap();
    }
    assert_eq!(origin.calls(), 3);
    assert_eq!(svc.stats().bypasses, 3);
    assert_eq!(svc.stats().stored, 0);
}

#[tokio::test]
async fn entries_expire_after_their_ttl_on_the_mock_clock() {
    let origin = Origin::new();
    let (mut svc, clock) = cache(&origin, |b| b);
    get(&mut svc, 1).await.unwrap();
    clock.advance(Duration::from_millis(9_999));
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1", "still fresh");
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        get(&mut svc, 1).await.unwrap(),
        "1#2",
        "expired at exactly the TTL"
    );
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_exactly_once() {
    let origin = Origin::gated();
    origin.open(1);
    let (mut svc, clock) = cache(&origin, |b| {
        b.stale_while_revalidate(Duration::from_secs(20))
    });
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    clock.advance(Duration::from_secs(15));
    // Many stale hits while the (held) refresh runs: all answered at once
    // with the stale value, one refresh.
    for _ in 0..50 {
        assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    }
    eventually("the refresh reaches the origin", DEADLINE, || {
        origin.calls() == 2
    })
    .await;
    origin.open(1);
    eventually("the refreshed entry is stored", DEADLINE, || {
        svc.stats().stored == 2
    })
    .await;
    assert_eq!(
        get(&mut svc, 1).await.unwrap(),
        "1#2",
        "the refreshed entry"
    );
    let stats = svc.stats();
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.stale_hits, 50);
    assert_eq!(origin.calls(), 2, "exactly one background refresh");
}

#[tokio::test]
async fn past_the_swr_window_a_request_waits_for_the_service() {
    let origin = Origin::new();
    let (mut svc, clock) = cache(&origin, |b| {
        b.stale_while_revalidate(Duration::from_secs(5))
    });
    get(&mut svc, 1).await.unwrap();
    clock.advance(Duration::from_secs(16));
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#2");
    assert_eq!(svc.stats().stale_hits, 0);
}

#[tokio::test]
async fn stale_if_error_answers_with_the_stale_entry() {
    let origin = Origin::new();
    let (mut svc, clock) = cache(&origin, |b| b.stale_if_error(Duration::from_secs(60)));
    get(&mut svc, 1).await.unwrap();
    origin.set_failing(true);
    clock.advance(Duration::from_secs(20));
    assert_eq!(
        get(&mut svc, 1).await.unwrap(),
        "1#1",
        "stale instead of the error"
    );
    assert_eq!(svc.stats().stale_if_error, 1);
    assert_eq!(origin.calls(), 2, "the service was asked first");
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        get(&mut svc, 1).await.unwrap_err(),
        "1 failed #3",
        "past the window"
    );
    origin.set_failing(false);
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#4");
}

#[tokio::test]
async fn errors_are_not_cached_by_default() {
    let origin = Origin::new();
    origin.set_failing(true);
    let (mut svc, _) = cache(&origin, |b| b);
    assert!(get(&mut svc, 1).await.is_err());
    assert!(get(&mut svc, 1).await.is_err());
    assert_eq!(origin.calls(), 2);
    assert_eq!(svc.stats().stored, 0);
    assert_eq!(svc.stats().inner_errors, 2);
}

#[tokio::test]
async fn negative_caching_stores_errors_for_their_own_ttl() {
    let origin = Origin::new();
    origin.set_failing(true);
    let (mut svc, clock) = cache(&origin, |b| b.negative_ttl(Duration::from_secs(2)));
    assert_eq!(get(&mut svc, 1).await.unwrap_err(), "1 failed #1");
    assert_eq!(
        get(&mut svc, 1).await.unwrap_err(),
        "1 failed #1",
        "the cached error"
    );
    assert_eq!(origin.calls(), 1);
    clock.advance(Duration::from_secs(2));
    origin.set_failing(false);
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#2", "negative TTL over");
}

#[tokio::test]
async fn an_error_reaches_every_waiter_and_is_not_stored() {
    let origin = Origin::gated();
    origin.set_failing(true);
    let (svc, _) = cache(&origin, |b| b);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.spawn(async move { svc.oneshot(5).await });
    }
    eventually("all 19 waiters joined", DEADLINE, || {
        svc.stats().coalesced == 19
    })
    .await;
    origin.open(1);
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap_err(), "5 failed #1");
    }
    assert_eq!(origin.calls(), 1);
    assert_eq!(svc.stats().stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_inner_call() {
    let origin = Origin::gated();
    let (svc, _) = cache(&origin, |b| b);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let svc = svc.clone();
        tasks.spawn(async move { svc.oneshot(42).await });
    }
    eventually("999 requests wait on the leader", DEADLINE, || {
        svc.stats().coalesced == 999
    })
    .await;
    assert_eq!(svc.in_flight(), 1);
    origin.open(1);
    let mut answers = 0;
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap().as_str(), "42#1");
        answers += 1;
    }
    assert_eq!(answers, 1000);
    assert_eq!(origin.calls(), 1, "exactly one inner call");
    assert_eq!(svc.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_on_different_keys_do_not_wait_for_each_other() {
    let mut origin = Origin::gated();
    origin.gated_keys = Some(vec![1]); // key 1 is slow, key 2 is not
    let (svc, _) = cache(&origin, |b| b);
    let slow = tokio::spawn(svc.clone().oneshot(1));
    eventually("the slow fill is in flight", DEADLINE, || {
        svc.in_flight() == 1
    })
    .await;
    let fast = tokio::time::timeout(DEADLINE, svc.clone().oneshot(2))
        .await
        .expect("key 2 was blocked by key 1's fill");
    assert_eq!(fast.unwrap().as_str(), "2#2");
    assert!(!slow.is_finished());
    origin.open(1);
    assert_eq!(slow.await.unwrap().unwrap().as_str(), "1#1");
}

#[tokio::test]
async fn a_cancelled_leader_does_not_strand_its_waiters() {
    let origin = Origin::gated();
    let (svc, _) = cache(&origin, |b| b);
    let leader = tokio::spawn(svc.clone().oneshot(9));
    eventually("the leader calls the origin", DEADLINE, || {
        origin.calls() == 1
    })
    .await;
    let waiter = tokio::spawn(svc.clone().oneshot(9));
    eventually("the waiter joins", DEADLINE, || svc.stats().coalesced == 1).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    // The waiter takes over and makes the call itself.
    eventually("the waiter takes over", DEADLINE, || origin.calls() == 2).await;
    assert_eq!(origin.dropped_unfinished.load(Ordering::SeqCst), 1);
    origin.open(1);
    assert_eq!(waiter.await.unwrap().unwrap().as_str(), "9#2");
    assert_eq!(svc.in_flight(), 0);
}

#[tokio::test]
async fn hits_are_served_while_the_inner_service_is_not_ready() {
    let (mock, mut handle) = tower_test::mock::pair::<u64, Resp>();
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .clock(clock)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .map_err(|e: tower::BoxError| Arc::new(e.to_string()))
        .service(mock);

    // Fill key 1.
    handle.allow(1);
    let fill = tokio::spawn(svc.clone().oneshot(1));
    let (req, respond) = handle.next_request().await.unwrap();
    assert_eq!(req, 1);
    respond.send_response(Arc::new("one".to_string()));
    assert_eq!(fill.await.unwrap().unwrap().as_str(), "one");

    // The inner service now applies backpressure.
    handle.allow(0);
    let mut task = tokio_test::task::spawn(());
    task.enter(|cx, _| {
        assert!(svc.poll_ready(cx).is_ready(), "the cache stays ready");
    });
    let mut hit = tokio_test::task::spawn(svc.call(1));
    match hit.poll() {
        std::task::Poll::Ready(Ok(r)) => assert_eq!(r.as_str(), "one"),
        other => panic!("a hit must be ready at once, got {other:?}"),
    }
    // A miss waits for the inner service's readiness in its own future.
    let mut miss = Box::pin(svc.call(2));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(miss.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the miss waits for the inner service");
    let origin = tokio::spawn(async move {
        handle.allow(1);
        let (req, respond) = handle.next_request().await.unwrap();
        respond.send_response(Arc::new(format!("answer to {req}")));
    });
    assert_eq!(miss.await.unwrap().as_str(), "answer to 2");
    origin.await.unwrap();
}

#[tokio::test]
async fn invalidate_by_key_tag_and_all() {
    struct Tagged;
    impl CachePolicy<u64, Resp> for Tagged {
        type Key = u64;
        fn key(&self, k: &u64) -> Option<u64> {
            Some(*k)
        }
        fn storable(&self, k: &u64, _: &Resp, d: &Windows) -> Option<Storable> {
            Some(Storable::new(*d).tag(if k.is_multiple_of(2) { "even" } else { "odd" }))
        }
    }
    let origin = Origin::new();
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(Tagged).clock(clock).build().unwrap();
    let inv = layer.invalidator();
    let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
    for k in 1..=4 {
        svc.ready().await.unwrap().call(k).await.unwrap();
    }
    assert_eq!(origin.calls(), 4);
    inv.invalidate_tag("even");
    for k in 1..=4 {
        svc.ready().await.unwrap().call(k).await.unwrap();
    }
    assert_eq!(origin.calls(), 6, "2 and 4 refetched, 1 and 3 still cached");
    inv.invalidate_key(&1);
    svc.ready().await.unwrap().call(1).await.unwrap();
    svc.ready().await.unwrap().call(3).await.unwrap();
    assert_eq!(origin.calls(), 7, "only key 1 refetched");
    inv.invalidate_all();
    for k in 1..=4 {
        svc.ready().await.unwrap().call(k).await.unwrap();
    }
    assert_eq!(origin.calls(), 11);
    assert_eq!(svc.stats().invalidations, 3);
}

#[tokio::test]
async fn an_invalidation_during_a_fill_keeps_that_fill_out() {
    for by_tag in [false, true] {
        struct Tagged;
        impl CachePolicy<u64, Resp> for Tagged {
            type Key = u64;
            fn key(&self, k: &u64) -> Option<u64> {
                Some(*k)
            }
            fn storable(&self, k: &u64, _: &Resp, d: &Windows) -> Option<Storable> {
                Some(Storable::new(*d).tag(format!("user:{k}")))
            }
        }
        let origin = Origin::gated();
        let (clock, _) = Clock::mock();
        let layer = CacheLayer::builder(Tagged).clock(clock).build().unwrap();
        let inv = layer.invalidator();
        let svc = ServiceBuilder::new().layer(layer).service(origin.clone());
        let fill = tokio::spawn(svc.clone().oneshot(12));
        eventually("the fill is at the origin", DEADLINE, || {
            origin.calls() == 1
        })
        .await;
        // The data changes while the old value is in flight.
        if by_tag {
            inv.invalidate_tag("user:12");
        } else {
            inv.invalidate_key(&12);
        }
        origin.open(2);
        assert_eq!(
            fill.await.unwrap().unwrap().as_str(),
            "12#1",
            "the caller still gets it"
        );
        assert_eq!(svc.stats().not_stored, 1, "by_tag={by_tag}");
        let next = svc.clone().oneshot(12).await.unwrap();
        assert_eq!(
            next.as_str(),
            "12#2",
            "the stale fill was not stored (by_tag={by_tag})"
        );
    }
}

/// A policy whose responses say which version of the data they reflect:
/// `"{key}#{n}"` is stamped with the version the test put in `VERSION`.
struct Versioned {
    version: Arc<std::sync::atomic::AtomicU64>,
}

impl CachePolicy<(u64, u64), Resp> for Versioned {
    type Key = u64;
    fn key(&self, req: &(u64, u64)) -> Option<u64> {
        Some(req.0)
    }
    fn min_version(&self, req: &(u64, u64)) -> Option<u64> {
        (req.1 > 0).then_some(req.1)
    }
    fn storable(&self, k: &u64, _: &Resp, d: &Windows) -> Option<Storable> {
        Some(
            Storable::new(*d)
                .tag(format!("user:{k}"))
                .version(self.version.load(Ordering::SeqCst)),
        )
    }
}

#[tokio::test]
async fn a_fill_older_than_the_last_invalidation_is_served_but_not_stored() {
    let origin = Origin::new();
    let version = Arc::new(std::sync::atomic::AtomicU64::new(50));
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(Versioned {
        version: version.clone(),
    })
    .clock(clock)
    .build()
    .unwrap();
    let inv = layer.invalidator();
    let origin_by_pair = tower::service_fn({
        let origin = origin.clone();
        move |(k, _): (u64, u64)| origin.clone().oneshot(k)
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(origin_by_pair);
    // A write committed at version 100 invalidates user:7.
    inv.invalidate_tag_at("user:7", 100);
    // A lagging replica still answers with data at version 50: served, not stored.
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((7, 0))
            .await
            .unwrap()
            .as_str(),
        "7#1"
    );
    assert_eq!(svc.stats().not_stored, 1);
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((7, 0))
            .await
            .unwrap()
            .as_str(),
        "7#2"
    );
    // Once the data reflects version 100 or later, it is stored again.
    version.store(120, Ordering::SeqCst);
    svc.ready().await.unwrap().call((7, 0)).await.unwrap();
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((7, 0))
            .await
            .unwrap()
            .as_str(),
        "7#3"
    );
    assert_eq!(svc.stats().stored, 1);
    // Key invalidations at a version work the same way.
    inv.invalidate_key_at(&7, 200);
    svc.ready().await.unwrap().call((7, 0)).await.unwrap();
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((7, 0))
            .await
            .unwrap()
            .as_str(),
        "7#5"
    );
}

#[tokio::test]
async fn an_entry_stamped_at_or_above_an_invalidation_version_survives_it() {
    // A change feed's invalidation can arrive after a read of the changed
    // row was stored: an entry that reflects the change stays; one below it,
    // and any entry after an invalidation without a version, goes.
    let origin = Origin::new();
    let version = Arc::new(std::sync::atomic::AtomicU64::new(120));
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(Versioned {
        version: version.clone(),
    })
    .clock(clock)
    .build()
    .unwrap();
    let inv = layer.invalidator();
    let origin_by_pair = tower::service_fn({
        let origin = origin.clone();
        move |(k, _): (u64, u64)| origin.clone().oneshot(k)
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(origin_by_pair);
    async fn get<S>(svc: &mut S) -> String
    where
        S: Service<(u64, u64), Response = Resp>,
        S::Error: std::fmt::Debug,
    {
        svc.ready()
            .await
            .unwrap()
            .call((7, 0))
            .await
            .unwrap()
            .as_str()
            .to_string()
    }
    assert_eq!(get(&mut svc).await, "7#1");
    inv.invalidate_tag_at("user:7", 100);
    assert_eq!(
        get(&mut svc).await,
        "7#1",
        "stamped 120, the change at 100: kept"
    );
    inv.invalidate_tag_at("user:7", 130);
    assert_eq!(
        get(&mut svc).await,
        "7#2",
        "a change at 130 is not in it: gone"
    );
    version.store(200, Ordering::SeqCst);
    assert_eq!(get(&mut svc).await, "7#3");
    inv.invalidate_tag_at("user:7", 150);
    assert_eq!(
        get(&mut svc).await,
        "7#3",
        "stamped 200 reflects 130 and 150"
    );
    inv.invalidate_tag("user:7");
    assert_eq!(get(&mut svc).await, "7#4", "no version: always gone");
}

#[tokio::test]
async fn a_request_skips_entries_older_than_its_minimum_version() {
    let origin = Origin::new();
    let version = Arc::new(std::sync::atomic::AtomicU64::new(10));
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(Versioned {
        version: version.clone(),
    })
    .clock(clock)
    .build()
    .unwrap();
    let origin_by_pair = tower::service_fn({
        let origin = origin.clone();
        move |(k, _): (u64, u64)| origin.clone().oneshot(k)
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(origin_by_pair);
    svc.ready().await.unwrap().call((1, 0)).await.unwrap(); // stored at version 10
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((1, 10))
            .await
            .unwrap()
            .as_str(),
        "1#1",
        "10 >= 10: hit"
    );
    version.store(30, Ordering::SeqCst);
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((1, 20))
            .await
            .unwrap()
            .as_str(),
        "1#2",
        "needs 20: skips the entry"
    );
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call((1, 20))
            .await
            .unwrap()
            .as_str(),
        "1#2",
        "the new entry (30) serves it"
    );
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn early_refresh_is_probabilistic_near_expiry_and_reproducible_by_seed() {
    async fn run(seed: u64) -> (u64, u64) {
        let (clock, mock) = Clock::mock();
        let mut origin = Origin::new();
        // Each fill takes 1 s on the mock clock: XFetch weighs by it.
        origin.tick = Some((mock.clone(), Duration::from_secs(1)));
        let layer = CacheLayer::builder(some_key as KeyFn)
            .time_to_live(Duration::from_secs(60))
            .early_refresh(1.0)
            .clock(clock)
            .seed(seed)
            .build()
            .unwrap();
        let mut svc: TestCache = ServiceBuilder::new().layer(layer).service(origin.clone());
        svc.ready().await.unwrap().call(1).await.unwrap();
        // Far from expiry (59 s left, 1 s recompute): never refreshed early.
        for _ in 0..10_000 {
            svc.ready().await.unwrap().call(1).await.unwrap();
        }
        assert_eq!(
            svc.stats().early_refreshes,
            0,
            "no early refresh far from expiry"
        );
        // 2 s before expiry each hit refreshes with probability e^-2 (13.5%).
        mock.advance(Duration::from_secs(57));
        let mut hits_before_refresh = 0;
        while svc.stats().early_refreshes == 0 {
            svc.ready().await.unwrap().call(1).await.unwrap();
            hits_before_refresh += 1;
            assert!(
                hits_before_refresh < 1_000,
                "an early refresh is all but certain by now"
            );
        }
        eventually("the early refresh reached the origin", DEADLINE, || {
            origin.calls() == 2
        })
        .await;
        (hits_before_refresh, svc.stats().early_refreshes)
    }
    let (a, refreshes) = run(1).await;
    assert_eq!(refreshes, 1);
    let (b, _) = run(1).await;
    assert_eq!(a, b, "the same seed gives the same decisions");
    let mut others = Vec::new();
    for seed in 2..=6 {
        others.push(run(seed).await.0);
    }
    eprintln!("hits before the early refresh: seed 1 -> {a}, seeds 2..6 -> {others:?}");
}

#[tokio::test]
async fn weight_bounded_stores_evict() {
    let origin = Origin::new();
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(some_key as KeyFn)
        .clock(clock)
        .max_weight(1_000, |r: &Resp| 100 + r.len() as u32)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
    for k in 0..50 {
        svc.ready().await.unwrap().call(k).await.unwrap();
    }
    svc.store().run_pending_tasks();
    let weight = svc.store().weighted_size();
    assert!(weight <= 1_000, "weighted size {weight} over the bound");
    assert!(svc.stats().evictions > 0);
    assert!(svc.stats().entries < 50);
}

#[cfg(feature = "quick-cache")]
#[tokio::test]
async fn the_quick_cache_store_hits_and_evicts_by_weight() {
    let origin = Origin::new();
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(some_key as KeyFn)
        .clock(clock)
        .max_weight(2_000, |r: &Resp| 100 + r.len() as u32)
        .build_quick()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
    svc.ready().await.unwrap().call(1).await.unwrap();
    svc.ready().await.unwrap().call(1).await.unwrap();
    assert_eq!(origin.calls(), 1);
    for k in 0..100 {
        svc.ready().await.unwrap().call(k).await.unwrap();
    }
    assert!(svc.store().weighted_size() <= 2_000);
    assert!(svc.stats().evictions > 0);
}

/// Keys whose hashes all collide.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Colliding(u64);
impl Hash for Colliding {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(0);
    }
}

#[tokio::test]
async fn colliding_hashes_never_share_an_entry() {
    let origin = Origin::new();
    let (clock, _) = Clock::mock();
    let layer = CacheLayer::builder(|k: &u64| Some(Colliding(*k)))
        .clock(clock)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
    for k in 0..20u64 {
        let r = svc.ready().await.unwrap().call(k).await.unwrap();
        assert!(r.starts_with(&format!("{k}#")));
    }
    for k in 0..20u64 {
        let r = svc.ready().await.unwrap().call(k).await.unwrap();
        assert!(r.starts_with(&format!("{k}#")), "key {k} got {r}");
    }
    assert_eq!(origin.calls(), 20);
}

#[tokio::test]
async fn background_refreshes_stop_when_the_cache_is_dropped() {
    let origin = Origin::gated();
    origin.open(1);
    let (mut svc, clock) = cache(&origin, |b| {
        b.stale_while_revalidate(Duration::from_secs(60))
    });
    get(&mut svc, 1).await.unwrap();
    clock.advance(Duration::from_secs(11));
    get(&mut svc, 1).await.unwrap(); // starts a refresh that hangs at the gate
    eventually("the refresh is at the origin", DEADLINE, || {
        origin.calls() == 2
    })
    .await;
    drop(svc);
    eventually("the refresh task was cancelled", DEADLINE, || {
        origin.dropped_unfinished.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_background_refreshes_but_keeps_serving() {
    let origin = Origin::gated();
    origin.open(1);
    let (mut svc, clock) = cache(&origin, |b| {
        b.stale_while_revalidate(Duration::from_secs(60))
    });
    get(&mut svc, 1).await.unwrap();
    svc.shutdown();
    clock.advance(Duration::from_secs(11));
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    assert_eq!(svc.stats().refreshes, 0);
    assert_eq!(origin.calls(), 1);
}

#[test]
fn bad_configuration_is_refused() {
    use tower_scale::cache::BuildError;
    let build =
        |b: tower_scale::cache::CacheLayerBuilder<KeyFn>| b.build::<u64, Resp, Err>().map(|_| ());
    let base = || CacheLayer::builder(some_key as KeyFn);
    assert!(matches!(
        build(base().time_to_live(Duration::ZERO)),
        Err(BuildError::ZeroDuration {
            field: "time_to_live",
            ..
        })
    ));
    assert!(matches!(
        build(base().max_entries(0)),
        Err(BuildError::Zero {
            field: "max_entries"
        })
    ));
    assert!(matches!(
        build(base().ttl_jitter(1.5)),
        Err(BuildError::OutOfRange { .. })
    ));
    assert!(matches!(
        build(base().early_refresh(f64::NAN)),
        Err(BuildError::OutOfRange { .. })
    ));
    assert!(matches!(
        build(base().negative_ttl(Duration::ZERO)),
        Err(BuildError::ZeroDuration { .. })
    ));
    assert!(build(base()).is_ok());
    let err = build(base().max_entries(0)).unwrap_err();
    assert!(err.to_string().contains("max_entries"), "{err}");
}

#[tokio::test]
async fn ttl_jitter_spreads_expiries_below_the_ttl() {
    let origin = Origin::new();
    let (mut svc, clock) = cache(&origin, |b| b.ttl_jitter(0.5));
    for k in 0..100 {
        get(&mut svc, k).await.unwrap();
    }
    clock.advance(Duration::from_millis(7_500));
    for k in 0..100 {
        get(&mut svc, k).await.unwrap();
    }
    let refetched = origin.calls() - 100;
    // TTLs are uniform in 5..10 s: about half expired by 7.5 s.
    assert!(
        (20..=80).contains(&refetched),
        "{refetched} of 100 expired by 7.5 s"
    );
    clock.advance(Duration::from_millis(2_500));
    let before = origin.calls();
    for k in 0..100 {
        get(&mut svc, k).await.unwrap();
    }
    assert!(origin.calls() - before > 0);
}

/// The fuzz target's invariants (fuzz/fuzz_targets/cache_ops.rs), on
/// stable, over seeded random sequences: a read of key k only ever returns
/// k's data, and a read right after k was invalidated (by key or by tag)
/// always reaches the service.
#[tokio::test]
async fn random_operation_sequences_keep_the_invariants() {
    struct Tagged;
    impl CachePolicy<u64, Resp> for Tagged {
        type Key = u64;
        fn key(&self, k: &u64) -> Option<u64> {
            Some(*k)
        }
        fn storable(&self, k: &u64, _: &Resp, d: &Windows) -> Option<Storable> {
            Some(Storable::new(*d).tag(if k.is_multiple_of(2) { "even" } else { "odd" }))
        }
    }
    let mut rng = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _sequence in 0..200 {
        let origin = Origin::new();
        let (clock, mock) = Clock::mock();
        let layer = CacheLayer::builder(Tagged)
            .time_to_live(Duration::from_secs(5))
            .stale_while_revalidate(Duration::from_secs(3))
            .max_entries(4)
            .clock(clock)
            .seed(next())
            .build()
            .unwrap();
        let inv = layer.invalidator();
        let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
        let mut must_miss = [false; 8];
        for _ in 0..200 {
            let key = next() % 8;
            match next() % 5 {
                0 | 1 => {
                    let before = origin.calls();
                    let r = svc.ready().await.unwrap().call(key).await.unwrap();
                    assert!(
                        r.starts_with(&format!("{key}#")),
                        "read of {key} returned {r}"
                    );
                    if must_miss[key as usize] {
                        assert!(
                            origin.calls() > before,
                            "{key} served after its invalidation"
                        );
                    }
                    must_miss[key as usize] = false;
                }
                2 => {
                    inv.invalidate_key(&key);
                    must_miss[key as usize] = true;
                }
                3 => {
                    inv.invalidate_tag(if key % 2 == 0 { "even" } else { "odd" });
                    for k in (0..8).filter(|k| k % 2 == key % 2) {
                        must_miss[k as usize] = true;
                    }
                }
                _ => mock.advance(Duration::from_secs(next() % 9)),
            }
        }
    }
}

#[tokio::test]
async fn statistics_reach_the_metrics_facade() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let origin = Origin::new();
    let (mut svc, _) = cache(&origin, |b| b);
    get(&mut svc, 1).await.unwrap();
    get(&mut svc, 1).await.unwrap();
    get(&mut svc, 1).await.unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || svc.stats().record_metrics("users"));
    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str| {
        snapshot
            .iter()
            .find(|(key, ..)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "cache" && l.value() == "users")
            })
            .map(|(.., v)| v)
    };
    assert_eq!(
        value("tower_scale_cache_hits_total"),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(
        value("tower_scale_cache_misses_total"),
        Some(&DebugValue::Counter(1))
    );
    assert!(value("tower_scale_cache_entries").is_some());
}

#[path = "../common/history.rs"]
mod history;

/// Guarantee 1 (same instance, exact), as a model-based test: many seeded
/// runs of writers (write, then invalidate by key, tag, group tag or all)
/// against readers, with fills that take 0–5 ms and overlap the
/// invalidations; no read that starts after an invalidation returned may
/// see an older version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_after_an_invalidation_sees_older_data() {
    let (mut checked, mut coalesced, mut fenced_fills, mut loads) = (0, 0, 0, 0);
    for seed in [1u64, 2, 3, 4] {
        let model = history::Model::new(6, seed);
        // Odd seeds: long TTLs; even seeds: 20 ms TTLs with 20 ms of
        // stale-while-revalidate, so background refreshes race too.
        let (ttl, swr) = if seed % 2 == 1 {
            (Duration::from_secs(60), Duration::ZERO)
        } else {
            (Duration::from_millis(20), Duration::from_millis(20))
        };
        let mut builder = CacheLayer::builder(history::TagPolicy)
            .time_to_live(ttl)
            .seed(seed);
        if !swr.is_zero() {
            builder = builder.stale_while_revalidate(swr);
        }
        let layer = builder.build().expect("valid config");
        let invalidator = layer.invalidator();
        let svc: history::Svc = ServiceBuilder::new().layer(layer).service(model.origin());
        let run = history::run(
            &model,
            &[(svc.clone(), invalidator)],
            history::Load {
                seed,
                readers: 8,
                writers: 3,
                reads_each: 300,
                writes_each: 150,
                max_time: Duration::from_secs(6),
                write_pause: Duration::from_millis(2),
            },
        )
        .await;
        assert_eq!(run.failed, 0);
        let verdict = history::check(&run, None);
        assert!(
            verdict.violations.is_empty(),
            "seed {seed}: {} of {} reads saw data older than a returned invalidation, e.g. {:?}",
            verdict.violations.len(),
            verdict.checked,
            &verdict.violations[..verdict.violations.len().min(5)]
        );
        let stats = svc.stats();
        checked += verdict.checked;
        coalesced += stats.coalesced;
        fenced_fills += stats.not_stored;
        loads += model.loads.load(std::sync::atomic::Ordering::Relaxed);
    }
    eprintln!(
        "checked {checked} reads: {coalesced} joined a fill in flight, {fenced_fills} fills overlapped an invalidation and were not stored, {loads} loads"
    );
    assert!(coalesced > 0, "no read overlapped an in-flight fill");
    assert!(fenced_fills > 0, "no fill overlapped an invalidation");
}

/// Guarantee 5: a failed fill or a failed background refresh never
/// replaces, with a cached error, a good entry that stale-while-revalidate
/// or stale-if-error may still serve.
#[tokio::test]
async fn negative_caching_never_replaces_a_servable_stale_entry() {
    let origin = Origin::new();
    let (mut svc, clock) = cache(&origin, |b| {
        b.stale_while_revalidate(Duration::from_secs(10))
            .stale_if_error(Duration::from_secs(60))
            .negative_ttl(Duration::from_secs(30))
    });
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    origin.set_failing(true);
    // Stale inside SWR: served, and its background refresh fails.
    clock.advance(Duration::from_secs(12));
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    eventually("the refresh failed", DEADLINE, || {
        svc.stats().inner_errors == 1 && svc.in_flight() == 0
    })
    .await;
    assert_eq!(
        get(&mut svc, 1).await.unwrap(),
        "1#1",
        "the failed refresh did not replace the stale entry with its error"
    );
    // Past SWR, inside stale-if-error: the failed fill falls back to it,
    // and again stores no error over it.
    clock.advance(Duration::from_secs(10));
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    assert_eq!(get(&mut svc, 1).await.unwrap(), "1#1");
    assert!(svc.stats().stale_if_error >= 2, "{:?}", svc.stats());
    // Once nothing good is left to serve, errors are cached as asked.
    clock.advance(Duration::from_secs(60));
    let calls = origin.calls();
    assert!(get(&mut svc, 1).await.is_err());
    assert!(get(&mut svc, 1).await.is_err());
    assert_eq!(
        origin.calls(),
        calls + 1,
        "the second error came from the cache"
    );
}

/// Guarantee 1 on the single-flight path, deterministically: a request
/// that starts after an invalidation returned does not join a fill that
/// began before it, for a key, a tag and everything alike.
#[tokio::test]
async fn a_request_after_an_invalidation_starts_its_own_fill() {
    for how in ["key", "all"] {
        let origin = Origin::gated();
        let (svc, _) = cache(&origin, |b| b);
        let invalidator = svc.invalidator();
        let first = tokio::spawn(svc.clone().oneshot(1));
        eventually("the first fill reached the origin", DEADLINE, || {
            origin.calls() == 1
        })
        .await;
        match how {
            "key" => invalidator.invalidate_key(&1),
            _ => invalidator.invalidate_all(),
        }
        let second = tokio::spawn(svc.clone().oneshot(1));
        eventually("the second request made its own fill", DEADLINE, || {
            origin.calls() == 2
        })
        .await;
        origin.open(2);
        assert_eq!(first.await.unwrap().unwrap().as_str(), "1#1");
        assert_eq!(
            second.await.unwrap().unwrap().as_str(),
            "1#2",
            "{how}: the later request got the fill that began after the invalidation"
        );
    }
}

/// A request inside its stale-if-error window that joins a fill without a
/// fallback of its own (a background refresh) still gets the stale entry
/// when that fill fails.
#[tokio::test]
async fn a_waiter_keeps_its_own_stale_if_error_fallback() {
    let origin = Origin::gated();
    let (svc, clock) = cache(&origin, |b| {
        b.stale_while_revalidate(Duration::from_secs(10))
            .stale_if_error(Duration::from_secs(60))
    });
    origin.open(1);
    assert_eq!(svc.clone().oneshot(1).await.unwrap().as_str(), "1#1");
    origin.set_failing(true);
    // Stale inside SWR: served; the refresh waits at the gate.
    clock.advance(Duration::from_secs(15));
    assert_eq!(svc.clone().oneshot(1).await.unwrap().as_str(), "1#1");
    eventually("the refresh reached the origin", DEADLINE, || {
        origin.calls() == 2
    })
    .await;
    // Past SWR, inside stale-if-error: this request joins the refresh.
    clock.advance(Duration::from_secs(10));
    let waiter = tokio::spawn(svc.clone().oneshot(1));
    eventually("the request joined the refresh", DEADLINE, || {
        svc.stats().coalesced == 1
    })
    .await;
    origin.open(1);
    assert_eq!(
        waiter.await.unwrap().unwrap().as_str(),
        "1#1",
        "the failed refresh's error was replaced by the request's own fallback"
    );
}

/// A cache named on the builder publishes its statistics by itself, under
/// its name, while it lives; nothing needs to call `record_metrics`.
#[tokio::test(start_paused = true)]
async fn a_named_cache_publishes_its_metrics() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The only global recorder this test binary installs.
    recorder.install().expect("recorder");
    let origin = Origin::new();
    let layer = CacheLayer::builder(|k: &u64| Some(*k))
        .name("named-test")
        .metrics_interval(Duration::from_millis(100))
        .build::<u64, Resp, Err>()
        .expect("layer");
    let mut svc = tower::Layer::layer(&layer, origin.clone());
    for _ in 0..3 {
        svc.ready()
            .await
            .expect("ready")
            .call(7)
            .await
            .expect("call");
    }
    let hits = |snapshotter: &metrics_util::debugging::Snapshotter| {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(key, _, _, value)| {
                let key = key.key();
                let ours = key.name() == "tower_scale_cache_hits_total"
                    && key
                        .labels()
                        .any(|l| l.key() == "cache" && l.value() == "named-test");
                match value {
                    metrics_util::debugging::DebugValue::Counter(n) if ours => Some(n),
                    _ => None,
                }
            })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(hits(&snapshotter), Some(2), "two hits after the first miss");
    // A second cache under the same name adds its figures to the first's.
    let twin = CacheLayer::builder(|k: &u64| Some(*k))
        .name("named-test")
        .metrics_interval(Duration::from_millis(100))
        .build::<u64, Resp, Err>()
        .expect("layer");
    let mut twin_svc = tower::Layer::layer(&twin, origin.clone());
    for _ in 0..2 {
        twin_svc
            .ready()
            .await
            .expect("ready")
            .call(8)
            .await
            .expect("call");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    // (The debugging recorder's snapshot hands out what was added since
    // the last one.)
    assert_eq!(hits(&snapshotter), Some(1), "2 + 1 hits under one name");
    // Outside a runtime a named cache is refused with a clear error.
    let built = std::thread::spawn(|| {
        CacheLayer::builder(|k: &u64| Some(*k))
            .name("no-runtime")
            .build::<u64, Resp, Err>()
            .err()
            .map(|e| e.to_string())
    })
    .join()
    .expect("thread");
    assert!(
        built.is_some_and(|e| e.contains("Tokio runtime")),
        "a named cache built outside a runtime must fail to build"
    );
    // A zero interval is refused (it would spin).
    let zero = CacheLayer::builder(|k: &u64| Some(*k))
        .name("zero")
        .metrics_interval(Duration::ZERO)
        .build::<u64, Resp, Err>();
    assert!(zero.is_err());
}

/// A fill that replaces an expired entry of the same key is not an
/// eviction, on quick_cache as on moka; capacity evictions are counted.
#[tokio::test]
async fn replacing_an_entry_is_not_an_eviction() {
    let origin = Origin::new();
    let (clock, mock) = Clock::mock();
    let layer = CacheLayer::builder(some_key as KeyFn)
        .time_to_live(Duration::from_secs(10))
        .no_early_refresh()
        .clock(clock)
        .max_entries(64)
        .build_quick()
        .expect("valid config");
    let mut svc = ServiceBuilder::new().layer(layer).service(origin.clone());
    for round in 0..3 {
        svc.ready().await.unwrap().call(1).await.unwrap();
        mock.advance(Duration::from_secs(11));
        assert_eq!(svc.stats().evictions, 0, "round {round}");
    }
    for k in 0..1_000 {
        svc.ready().await.unwrap().call(k).await.unwrap();
    }
    let evicted = svc.stats().evictions;
    assert!(
        evicted >= 900,
        "{evicted} evictions for 1,000 keys in 64 slots"
    );
}
