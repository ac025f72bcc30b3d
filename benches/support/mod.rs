//! Setup shared by the `route` and `shard` benches: a LocalCluster with
//! an `items` table, and the routed read both measure.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::Duration;

use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;
use tower_scale::pg::{Cluster, Consistency, Db, NodeConfig};
use tower_scale::testing::LocalCluster;

/// The read `route/routed_read` measures.
pub const ROUTED_READ_SQL: &str = "SELECT id, name FROM items WHERE id = $1";

/// Rows in `items`.
pub const ITEMS: i64 = 1000;

/// A primary and one replica with `items` (1000 rows) replayed.
pub fn items_cluster(rt: &tokio::runtime::Runtime) -> LocalCluster {
    let local = LocalCluster::start(1).expect("LocalCluster");
    rt.block_on(async {
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
    });
    local
}

/// A `Cluster` on `local` with default settings (nodes `primary`, `replica-1`).
pub async fn connect(local: &LocalCluster) -> Cluster {
    Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .replica(NodeConfig::new(local.replica(0).config()))
        .build()
        .await
        .expect("cluster")
}

/// `route/routed_read`: one row by primary key through `Db` with `Any`.
pub fn routed_read(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    db: &Db,
) {
    let mut id = 0i64;
    group.bench_function("routed_read", |b| {
        b.to_async(rt).iter(|| {
            id = id % ITEMS + 1;
            async move {
                let r = db
                    .read_one(Consistency::Any, ROUTED_READ_SQL, &[&id])
                    .await
                    .expect("row");
                assert_eq!(&*r.served_by, "replica-1");
                black_box(r)
            }
        })
    });
}
