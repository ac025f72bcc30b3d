//! Regions 40 ms apart: local reads stay local, read-your-writes reads
//! cross to the nearest replica that has the write.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tower_scale::pg::{Consistency, RouteReason};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, instance, measured, ms, quantile};

/// Nodes: primary and replica-2 in region b (40 ms round trip from the
/// application in region a), replica-1 in region a (replay delayed by 2 s),
/// replica-3 in region c (100 ms). Replication crosses the same distances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reads_stay_local_and_read_your_writes_crosses_to_the_nearest_replica() {
    let local = LocalCluster::builder()
        .replicas(3)
        .apply_delay(0, Duration::from_secs(2))
        .client_groups(1)
        .replication_proxies(true)
        .start()
        .unwrap();
    let app = local.client_group(0);
    let one_way = |ms| Duration::from_millis(ms);
    for (node, latency) in [(0, 20), (2, 20), (3, 50)] {
        app.proxy(node)
            .set_latency(one_way(latency), Duration::ZERO);
    }
    // From the primary (b): to a 20 ms, to c 50 ms, each way.
    for (replica, latency) in [(0, 20), (2, 50)] {
        let proxy = local.replication_proxy(replica).unwrap();
        proxy.set_latency(one_way(latency), Duration::ZERO);
    }
    let labels = [("b", "b1"), ("a", "a1"), ("b", "b1"), ("c", "c1")];
    let cluster = instance(app, &labels, |b| {
        b.local_region("a")
            .local_zone("a1")
            .local_wait(Duration::from_millis(100))
            .read_your_writes_wait(Duration::from_secs(1))
            .readmission_ramp(Duration::ZERO)
    })
    .await;
    let db = cluster.db();
    db.execute(
        "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL)",
        &[],
    )
    .await
    .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    measured(&cluster).await;
    for n in cluster.status() {
        println!(
            "node {:<10} region {:?} rtt {:>6.1} ms",
            n.name,
            n.region.as_deref().unwrap_or("-"),
            ms(n.rtt)
        );
    }
    let rtt: HashMap<String, Duration> = cluster
        .status()
        .into_iter()
        .map(|n| (n.name, n.rtt))
        .collect();
    assert!(
        rtt["replica-2"] > rtt["replica-1"] && rtt["replica-3"] > rtt["replica-2"],
        "the monitor's round trips do not reflect the distances: {rtt:?}"
    );

    // `Any` reads: served in region a, at the local round trip.
    let direct = {
        let (client, conn) = app.config(1).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    };
    let mut local_rtt = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        direct.simple_query("SELECT 1").await.unwrap();
        local_rtt.push(started.elapsed());
    }
    let (mut latencies, mut in_region, reads) = (Vec::new(), 0, 400);
    for _ in 0..reads {
        let started = Instant::now();
        let r = db
            .read_one(Consistency::Any, "SELECT 1", &[])
            .await
            .unwrap();
        latencies.push(started.elapsed());
        if &*r.served_by == "replica-1" {
            in_region += 1;
        }
    }
    let share = in_region as f64 / reads as f64;
    println!(
        "Any reads: {in_region}/{reads} in the local region ({:.1}%), p50 {:.2} ms, p99 {:.2} ms; \
         local round trip p50 {:.2} ms; region b is 40 ms away",
        share * 100.0,
        ms(quantile(&mut latencies, 0.5)),
        ms(quantile(&mut latencies, 0.99)),
        ms(quantile(&mut local_rtt, 0.5)),
    );
    assert!(share >= 0.95, "only {:.1}% local", share * 100.0);

    // Read-your-writes: the local replica replays 2 s late, so each read
    // waits 100 ms at most for it, then goes to replica-2 (40 ms), never to
    // replica-3 (100 ms), and the primary only if replica-2 does not catch
    // up within the wait.
    let mut served: HashMap<String, usize> = HashMap::new();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    let mut latencies = Vec::new();
    for i in 0..20 {
        let name = format!("item-{i}");
        let w = db
            .query_one(
                "INSERT INTO items (name) VALUES ($1) RETURNING id",
                &[&name],
            )
            .await
            .unwrap();
        let id: i64 = w.value.get(0);
        let started = Instant::now();
        let r = db
            .read_opt(
                Consistency::ReadYourWrites(w.token),
                "SELECT name FROM items WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        latencies.push(started.elapsed());
        let row = r
            .value
            .unwrap_or_else(|| panic!("{} missed the write", r.served_by));
        assert_eq!(row.get::<_, String>(0), name);
        *served.entry(r.served_by.to_string()).or_default() += 1;
        *reasons.entry(format!("{:?}", r.reason)).or_default() += 1;
    }
    println!(
        "read-your-writes with the local replica 2 s behind: served by {served:?}, reasons {reasons:?}, \
         p50 {:.1} ms",
        ms(quantile(&mut latencies, 0.5))
    );
    assert!(!served.contains_key("replica-1"), "{served:?}");
    assert!(
        !served.contains_key("replica-3"),
        "the farther region served: {served:?}"
    );
    let nearest = served.get("replica-2").copied().unwrap_or(0);
    assert!(
        nearest >= 15,
        "the nearest replica with the write served {nearest}/20: {served:?}"
    );
    assert!(
        reasons
            .get(&format!("{:?}", RouteReason::CrossRegion))
            .copied()
            .unwrap_or(0)
            == nearest,
        "{reasons:?}"
    );
}
