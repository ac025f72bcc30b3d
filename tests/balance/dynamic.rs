//! Upstreams added and removed at run time through the handle, and the
//! handle's and the balancer's lifetimes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tower_scale::balance::{Balancer, BuildError, Upstreams};

use crate::{Origin, Req, builder, eventually, get, send, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_upstream_keeps_its_requests_in_flight() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    a.set_delay(Duration::from_millis(300));
    let set = upstreams([a.url()]);
    let balancer = builder().build(&set).unwrap();
    let in_flight: Vec<_> = (0..6)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move { send(&balancer, get("/slow")).await })
        })
        .collect();
    eventually("six requests reach a", Duration::from_secs(5), || async {
        a.hits() == 6
    })
    .await;
    // Swap a for b while a holds six requests.
    assert!(set.add(b.url()).unwrap());
    assert!(set.remove(&a.url()));
    assert_eq!(set.list().len(), 1);
    for task in in_flight {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.origin.as_deref(), Some("a"));
    }
    for _ in 0..20 {
        assert_eq!(
            send(&balancer, get("/next")).await.origin.as_deref(),
            Some("b")
        );
    }
    assert_eq!(a.hits(), 6, "a removed upstream gets no new request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_upstream_takes_traffic_and_set_replaces_the_list() {
    let (a, b, c) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    let set = upstreams([a.url()]);
    let balancer = builder()
        .slow_start(Duration::from_secs(1))
        .build(&set)
        .unwrap();
    for _ in 0..10 {
        assert_eq!(send(&balancer, get("/")).await.origin.as_deref(), Some("a"));
    }
    set.add(b.url()).unwrap();
    eventually("b takes traffic", Duration::from_secs(5), || async {
        send(&balancer, get("/")).await.status == 200 && b.hits() > 0
    })
    .await;
    // A reloaded list: a goes, c comes, b stays (its counters with it).
    let b_requests = set.status()[1].requests;
    let changed = set.set([b.url(), c.url()]).unwrap();
    assert_eq!((changed.added.len(), changed.removed.len()), (1, 1));
    assert!(set.status()[0].requests >= b_requests);
    let a_hits = a.hits();
    eventually("c takes traffic", Duration::from_secs(5), || async {
        send(&balancer, get("/")).await.status == 200 && c.hits() > 0
    })
    .await;
    assert_eq!(a.hits(), a_hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_leaves_the_set_as_it_was() {
    let a = Origin::start("a").await;
    let set = upstreams([a.url()]);
    let balancer = builder().build(&set).unwrap();
    drop(set);
    for _ in 0..5 {
        assert_eq!(send(&balancer, get("/")).await.status, 200);
    }
    // The balancer's own handle still changes the set.
    let b = Origin::start("b").await;
    balancer.upstreams().add(b.url()).unwrap();
    balancer.upstreams().remove(&a.url());
    assert_eq!(send(&balancer, get("/")).await.origin.as_deref(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_live_balancer_per_set_and_dropping_it_stops_its_health_checks() {
    let a = Origin::start("a").await;
    let set = upstreams([a.url()]);
    let first: Balancer<Req> = builder()
        .health_path(Some("/health".into()))
        .health_interval(Duration::from_millis(20))
        .build(&set)
        .unwrap();
    let second = builder().build::<Req>(&set);
    assert_eq!(second.err(), Some(BuildError::UpstreamsInUse));
    let checks = || a.state.health_hits.load(Ordering::SeqCst);
    eventually("health checks run", Duration::from_secs(5), || async {
        checks() >= 3
    })
    .await;
    let clone = first.clone();
    drop(first);
    // A clone keeps it alive.
    let seen = checks();
    eventually(
        "checks go on while a clone lives",
        Duration::from_secs(5),
        || async { checks() > seen + 2 },
    )
    .await;
    drop(clone);
    // Stopped: no check for several intervals in a row.
    eventually("health checks stop", Duration::from_secs(5), || async {
        let before = checks();
        tokio::time::sleep(Duration::from_millis(100)).await;
        checks() == before
    })
    .await;
    // And the set can feed a new balancer.
    eventually("the set is free again", Duration::from_secs(5), || async {
        builder().build::<Req>(&set).is_ok()
    })
    .await;
}

#[test]
fn build_outside_a_runtime_is_an_error() {
    let set = Upstreams::new();
    assert_eq!(
        builder().build::<Req>(&set).err(),
        Some(BuildError::NoRuntime)
    );
    let bad = Balancer::builder()
        .ejection_base(Duration::from_secs(5))
        .ejection_max(Duration::from_secs(1))
        .build::<Req>(&set);
    assert!(matches!(bad, Err(BuildError::Config(_))), "{bad:?}");
    let bad = Balancer::builder()
        .health_path(Some("health".into()))
        .build::<Req>(&set);
    assert!(matches!(bad, Err(BuildError::Config(_))), "{bad:?}");
    let bad = Balancer::builder()
        .upstream_timeout(Duration::ZERO)
        .build::<Req>(&set);
    assert!(matches!(bad, Err(BuildError::Config(_))), "{bad:?}");
}

#[test]
fn durations_that_would_overflow_an_instant_are_refused() {
    let set = Upstreams::new();
    for builder in [
        builder().upstream_timeout(Duration::MAX),
        builder().ejection_base(Duration::MAX),
        builder().ejection_max(Duration::MAX),
        builder().slow_start(Duration::MAX),
    ] {
        let err = builder.build::<Req>(&set).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("over a year"), "{err}");
    }
}
