//! Routing overhead against the cheapest real query, on a LocalCluster.
//!
//! ```text
//! cargo bench --features full --bench route
//! ```
//!
//! `route/held_client`: a connected tokio-postgres client runs a prepared
//! single-row `SELECT` by primary key on a replica. `route/routed_read`: the
//! same query through `Db` with `Any` consistency (routing, pool checkout
//! and the statement cache included). `route/choose_replica`: the routing
//! decision alone.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_scale::pg::{Candidate, Cluster, Consistency, NodeConfig, choose_replica};
use tower_scale::testing::LocalCluster;

fn route(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let local = LocalCluster::start(1).expect("LocalCluster");
    let (cluster, client, stmt) = rt.block_on(async {
        let primary = local.primary().connect().await.expect("connect");
        primary
            .batch_execute(
                "CREATE TABLE items (id bigint primary key, name text not null);
                 INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g",
            )
            .await
            .expect("setup");
        local
            .wait_for_replicas(Duration::from_secs(30))
            .await
            .expect("replay");
        let client = local.replica(0).connect().await.expect("connect replica");
        let stmt = client
            .prepare("SELECT id, name FROM items WHERE id = $1")
            .await
            .expect("prepare");
        let cluster = Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .replica(NodeConfig::new(local.replica(0).config()))
            .build()
            .await
            .expect("cluster");
        (cluster, client, stmt)
    });
    let db = cluster.db();

    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let mut id = 0i64;
    group.bench_function("held_client", |b| {
        b.to_async(&rt).iter(|| {
            id = id % 1000 + 1;
            let (client, stmt) = (&client, &stmt);
            async move { black_box(client.query_one(stmt, &[&id]).await.expect("row")) }
        })
    });
    group.bench_function("routed_read", |b| {
        b.to_async(&rt).iter(|| {
            id = id % 1000 + 1;
            let db = &db;
            async move {
                let r = db
                    .read_one(
                        Consistency::Any,
                        "SELECT id, name FROM items WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .expect("row");
                assert_eq!(&*r.served_by, "replica-1");
                black_box(r)
            }
        })
    });
    let candidates = [
        Candidate {
            in_flight: 2,
            latency: Duration::from_micros(180),
            lag: Duration::ZERO,
            weight: 1.0,
            same_zone: false,
        },
        Candidate {
            in_flight: 1,
            latency: Duration::from_micros(220),
            lag: Duration::from_millis(5),
            weight: 1.0,
            same_zone: false,
        },
        Candidate {
            in_flight: 0,
            latency: Duration::from_micros(200),
            lag: Duration::ZERO,
            weight: 0.4,
            same_zone: false,
        },
    ];
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    group.bench_function("choose_replica", |b| {
        b.iter(|| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            black_box(choose_replica(black_box(&candidates), x))
        })
    });
    group.finish();
    drop(db);
    drop(cluster);
    drop(local);
}

criterion_group!(benches, route);
criterion_main!(benches);
