//! A region goes dark: its replicas black-holed under a read load (their
//! connections hang, nothing is refused). Reads move to the next region
//! with no failure, each within the read timeout plus one retry; when the
//! region comes back its share of reads ramps up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tower_scale::pg::{Consistency, RouteReason};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, instance, measured, ms, quantile, until};

/// One read as a reader saw it.
#[derive(Debug, Clone)]
struct Sample {
    started: Instant,
    took: Duration,
    served_by: Option<String>,
    retried: bool,
}

const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Nodes: primary and replica-3 in region b (40 ms away), replica-1 and
/// replica-2 in the local region a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_black_holed_under_load_fails_no_read_and_comes_back_gradually() {
    let local = LocalCluster::builder()
        .replicas(3)
        .client_groups(1)
        .start()
        .unwrap();
    let app = local.client_group(0);
    for node in [0, 3] {
        app.proxy(node)
            .set_latency(Duration::from_millis(20), Duration::ZERO);
    }
    let labels = [("b", "b1"), ("a", "a1"), ("a", "a1"), ("b", "b1")];
    let ramp = Duration::from_secs(2);
    let cluster = instance(app, &labels, |b| {
        b.local_region("a")
            .read_timeout(READ_TIMEOUT)
            // Opening a session on a dark node hangs too: bounded alike.
            .pool_create_timeout(READ_TIMEOUT)
            .probe_timeout(Duration::from_millis(500))
            .readmission_ramp(ramp)
    })
    .await;
    measured(&cluster).await;
    let db = cluster.db();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (db, samples, failures, stop) =
            (db.clone(), samples.clone(), failures.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = db.read_one(Consistency::Any, "SELECT 1", &[]).await;
                let took = started.elapsed();
                let sample = match r {
                    Ok(r) => Sample {
                        started,
                        took,
                        served_by: Some(r.served_by.to_string()),
                        retried: r.reason == RouteReason::Retried,
                    },
                    Err(e) => {
                        failures.lock().await.push(e.to_string());
                        Sample {
                            started,
                            took,
                            served_by: None,
                            retried: false,
                        }
                    }
                };
                samples.lock().await.push(sample);
                // A steady load, not a spin: ~100 reads/s per reader.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let in_region = |s: &Sample| matches!(s.served_by.as_deref(), Some("replica-1" | "replica-2"));
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Region a goes dark.
    let dark = Instant::now();
    app.proxy(1).black_hole();
    app.proxy(2).black_hole();
    let detected = until("region a out of rotation", DEADLINE, async || {
        cluster
            .status()
            .iter()
            .filter(|n| n.region.as_deref() == Some("a"))
            .all(|n| !n.healthy)
    })
    .await;
    let moved =
        until("reads served by region b", DEADLINE, async || {
            samples.lock().await.iter().any(|s| {
                s.started >= dark + detected && s.served_by.as_deref() == Some("replica-3")
            })
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Region a comes back: its share ramps up over the re-admission ramp.
    let back = Instant::now();
    app.proxy(1).restore();
    app.proxy(2).restore();
    let readmitted = until("region a back in rotation", DEADLINE, async || {
        cluster
            .status()
            .iter()
            .filter(|n| n.region.as_deref() == Some("a"))
            .all(|n| n.healthy)
    })
    .await;
    let window = Duration::from_millis(500);
    let mut shares = Vec::new();
    let share_in = |all: &[Sample], from: Instant| {
        let w: Vec<&Sample> = all
            .iter()
            .filter(|s| s.started >= from && s.started < from + window)
            .collect();
        (w.iter().filter(|s| in_region(s)).count(), w.len())
    };
    let ramp_start = back + readmitted;
    until(
        "region a serving 90% of the reads again",
        DEADLINE,
        async || {
            let all = samples.lock().await;
            let n = shares.len() as u32;
            let from = ramp_start + window * n;
            if Instant::now() < from + window {
                return false;
            }
            let (local, total) = share_in(&all, from);
            shares.push((local, total));
            total > 0 && local * 10 >= total * 9
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    let all = samples.lock().await.clone();
    let failures = failures.lock().await.clone();
    let mut during: Vec<Duration> = all
        .iter()
        .filter(|s| s.started >= dark && s.started < back)
        .map(|s| s.took)
        .collect();
    let retried = all.iter().filter(|s| s.retried).count();
    let slowest = during.iter().max().copied().unwrap_or_default();
    println!(
        "region a dark: detected (both replicas out of rotation) after {:.0} ms, a read served by region b {:.0} ms after that; \
         {} reads during the outage, {} failed, {retried} retried once elsewhere, p50 {:.1} ms, slowest {:.0} ms \
         (bound: read timeout {:.0} ms + one retry)",
        ms(detected),
        ms(moved),
        during.len(),
        failures.len(),
        ms(quantile(&mut during, 0.5)),
        ms(slowest),
        ms(READ_TIMEOUT),
    );
    let ramp_text: Vec<String> = shares
        .iter()
        .map(|(l, t)| format!("{:.0}%", *l as f64 * 100.0 / (*t).max(1) as f64))
        .collect();
    println!(
        "region a back: in rotation after {:.0} ms; its share of reads per 500 ms window: {}",
        ms(readmitted),
        ramp_text.join(" → ")
    );
    assert!(
        failures.is_empty(),
        "{} failed reads: {failures:?}",
        failures.len()
    );
    let outage_reads = all
        .iter()
        .filter(|s| s.started >= dark + detected && s.started < back)
        .count();
    assert!(outage_reads > 0);
    // Gradual: the first window after re-admission is not yet back to 90%.
    let (first_local, first_total) = shares[0];
    assert!(
        shares.len() > 1 && first_local * 10 < first_total * 9,
        "region a took its full share back at once: {ramp_text:?}"
    );
}
