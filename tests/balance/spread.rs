//! How requests spread: evenly over equal origins, away from a slow one.

use std::time::Duration;

use crate::{Origin, builder, by_origin, load, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_equal_origins_share_within_15_percent() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    ];
    let set = upstreams(origins.iter().map(Origin::url));
    let balancer = builder().build(&set).unwrap();
    // Uniform load: every origin answers after the same 10 ms (long enough
    // that the scheduler's hiccups on this shared machine stay small next
    // to it).
    for o in &origins {
        o.set_delay(Duration::from_millis(10));
    }
    let total = 3000;
    let answers = load(&balancer, 12, total, None).await;
    let counts = by_origin(&answers);
    println!("uniform load, {total} requests over 3 origins: {counts:?}");
    assert_eq!(answers.len(), total);
    assert!(answers.iter().all(|a| a.status == 200), "{counts:?}");
    let even = total as f64 / 3.0;
    for o in &origins {
        let n = o.hits() as f64;
        let off = (n - even) / even;
        println!("  {}: {n} ({:+.1}% of even)", o.state.name, off * 100.0);
        assert!(
            off.abs() <= 0.15,
            "{} got {n}, more than 15% off {even:.0}: {counts:?}",
            o.state.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_times_slower_origin_gets_measurably_less() {
    let origins = [
        Origin::start("fast-1").await,
        Origin::start("fast-2").await,
        Origin::start("slow").await,
    ];
    origins[0].set_delay(Duration::from_millis(2));
    origins[1].set_delay(Duration::from_millis(2));
    origins[2].set_delay(Duration::from_millis(20));
    let set = upstreams(origins.iter().map(Origin::url));
    let balancer = builder().build(&set).unwrap();
    let total = 1500;
    let answers = load(&balancer, 12, total, None).await;
    assert!(answers.iter().all(|a| a.status == 200));
    let (f1, f2, slow) = (origins[0].hits(), origins[1].hits(), origins[2].hits());
    let fast_mean = (f1 + f2) as f64 / 2.0;
    let ratio = slow as f64 / fast_mean;
    println!(
        "fast 2 ms, fast 2 ms, slow 20 ms; {total} requests: {f1} / {f2} / {slow} (slow gets {:.2} of a fast origin's share)",
        ratio
    );
    // Even would be 1.0; peak-EWMA sends the slow one a fraction.
    assert!(
        ratio < 0.5,
        "slow origin got {slow}, fast ones {f1} and {f2}"
    );
}
