//! The tour's step with two regions (`examples/tour.rs` includes it): a
//! cluster whose region b is 40 ms away through fault proxies, local reads
//! staying local, then the local region black-holed under a read load and
//! the reads moving to region b with no failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower_scale::pg::{Cluster, Consistency, NodeConfig};
use tower_scale::testing::LocalCluster;

use super::Error;

pub(crate) async fn regions() -> Result<(), Error> {
    println!("\n12. two regions 40 ms apart, and the local one going dark");
    let started = Instant::now();
    let local = tokio::task::spawn_blocking(|| {
        LocalCluster::builder().replicas(2).client_groups(1).start()
    })
    .await??;
    let app = local.client_group(0);
    // Region b (the primary and replica-2) is 20 ms away each way.
    for node in [0, 2] {
        app.proxy(node)
            .set_latency(Duration::from_millis(20), Duration::ZERO);
    }
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(app.config(0)).region("b"))
        .replica(NodeConfig::new(app.config(1)).region("a"))
        .replica(NodeConfig::new(app.config(2)).region("b"))
        .local_region("a")
        .read_timeout(Duration::from_secs(1))
        .pool_create_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster
        .status()
        .iter()
        .all(|n| n.healthy && !n.rtt.is_zero())
    {
        if Instant::now() > deadline {
            return Err("the nodes were not all probed within 30 s".into());
        }
        cluster.next_probe().await;
    }
    println!(
        "  started a primary and 2 replicas in {:.2?}; the application runs in region a:",
        started.elapsed()
    );
    for n in cluster.status() {
        println!(
            "  {:<10} region {} probe round trip {:>5.1} ms",
            n.name,
            n.region.as_deref().unwrap_or("-"),
            n.rtt.as_secs_f64() * 1e3
        );
    }
    let db = cluster.db();
    let (mut latencies, mut local_reads) = (Vec::new(), 0);
    for _ in 0..200 {
        let t = Instant::now();
        let r = db.read_one(Consistency::Any, "SELECT 1", &[]).await?;
        latencies.push(t.elapsed());
        local_reads += usize::from(&*r.served_by == "replica-1");
    }
    latencies.sort_unstable();
    println!(
        "  200 Any reads: {local_reads} served in region a, p50 {:.2?} (region b is 40 ms away)",
        latencies[latencies.len() / 2]
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed, moved) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (db, stop, done, failed, moved) = (
            db.clone(),
            stop.clone(),
            done.clone(),
            failed.clone(),
            moved.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match db.read_one(Consistency::Any, "SELECT 1", &[]).await {
                    Ok(r) if &*r.served_by != "replica-1" => {
                        moved.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let before = (done.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    app.proxy(1).black_hole();
    let mut detected = None;
    while t.elapsed() < Duration::from_millis(2000) {
        if detected.is_none()
            && cluster
                .status()
                .iter()
                .any(|n| n.name == "replica-1" && !n.healthy)
        {
            detected = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await?;
    }
    println!(
        "  region a black-holed (connections hang) under 4 readers: out of rotation after {}; \
         {} reads in {:.2?}, {} moved to region b, {} failed",
        detected.map_or("-".into(), |d| format!("{d:.2?}")),
        done.load(Ordering::SeqCst) - before.0,
        t.elapsed(),
        moved.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst) - before.1,
    );
    drop(db);
    drop(cluster);
    tokio::task::block_in_place(|| drop(local));
    Ok(())
}
