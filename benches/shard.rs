//! Sharding's cost on the read path, beside the unsharded routed read in
//! the same run.
//!
//! ```text
//! cargo bench --features full --bench shard
//! ```
//!
//! `route/routed_read`: one row by primary key through `Db` with `Any`
//! (the `route` bench's measurement, the same code). `shard/routed_read`:
//! the same query on the same replica through `ShardedCluster::read`
//! (slot, map lookup, the read lease's check, the statement wrapped to
//! add `tower_scale_owned`; without a lease, the in-read fence). The
//! cluster is the only
//! shard, so both reads run on the same server. `shard/route`: the key →
//! shard decision alone (CRC-32 of the key, map lookup).
//!
//! `SHARD_COUNT=KIND:N` (see `count`) runs one kind of read `N` times for
//! instruction counts under callgrind.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group};
use tower_scale::shard::{ShardConsistency, ShardedCluster};

#[path = "support/mod.rs"]
mod support;

/// The runtime, the local cluster, a plain cluster on it and the same as
/// the only shard of a sharded cluster (its fence table replayed).
fn setup() -> (
    tokio::runtime::Runtime,
    tower_scale::testing::LocalCluster,
    tower_scale::pg::Cluster,
    ShardedCluster,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let local = support::items_cluster(&rt);
    let (cluster, sharded) = rt.block_on(async {
        let sharded = ShardedCluster::builder()
            .shard("shard-1", support::connect(&local).await)
            .build()
            .await
            .expect("sharded");
        // The fence's table, replayed before measuring.
        local
            .wait_for_replicas(std::time::Duration::from_secs(30))
            .await
            .expect("replay");
        (support::connect(&local).await, sharded)
    });
    (rt, local, cluster, sharded)
}

fn shard(c: &mut Criterion) {
    let (rt, local, cluster, sharded) = setup();
    let db = cluster.db();

    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    support::routed_read(&mut group, &rt, &db);
    group.finish();

    let mut group = c.benchmark_group("shard");
    group.throughput(Throughput::Elements(1));
    let mut key = 0i64;
    group.bench_function("route", |b| {
        b.iter(|| {
            key = key.wrapping_add(1);
            black_box(sharded.shard_for(black_box(&key)))
        })
    });
    let mut id = 0i64;
    group.bench_function("routed_read", |b| {
        b.to_async(&rt).iter(|| {
            id = id % support::ITEMS + 1;
            let sharded = &sharded;
            async move {
                let r = sharded
                    .read(
                        &id,
                        &ShardConsistency::Any,
                        support::ROUTED_READ_SQL,
                        &[&id],
                    )
                    .await
                    .expect("read");
                assert_eq!(r.value.len(), 1);
                assert_eq!(&*r.served_by, "replica-1");
                black_box(r)
            }
        })
    });
    group.finish();

    // The two reads interleaved, 1,000 at a time, which goes first
    // alternating: the machine's other load hits both alike (criterion
    // runs one function after the other).
    let plain = || {
        rt.block_on(async {
            let started = std::time::Instant::now();
            for id in 1..=1000i64 {
                let id = id % support::ITEMS + 1;
                black_box(
                    db.read_one(
                        tower_scale::pg::Consistency::Any,
                        support::ROUTED_READ_SQL,
                        &[&id],
                    )
                    .await
                    .expect("row"),
                );
            }
            started.elapsed()
        })
    };
    let fenced = || {
        rt.block_on(async {
            let started = std::time::Instant::now();
            for id in 1..=1000i64 {
                let id = id % support::ITEMS + 1;
                black_box(
                    sharded
                        .read(
                            &id,
                            &ShardConsistency::Any,
                            support::ROUTED_READ_SQL,
                            &[&id],
                        )
                        .await
                        .expect("row"),
                );
            }
            started.elapsed()
        })
    };
    let mut ratios = Vec::new();
    for round in 0..21 {
        let (p, f) = if round % 2 == 0 {
            let p = plain();
            (p, fenced())
        } else {
            let f = fenced();
            (plain(), f)
        };
        ratios.push(f.as_secs_f64() / p.as_secs_f64());
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    println!(
        "interleaved shard/routed_read / route/routed_read (21 rounds of 1,000 each): \
         median {:.3} (quartiles {:.3}, {:.3}; all: {})",
        q(0.5),
        q(0.25),
        q(0.75),
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(db);
    drop(cluster);
    drop(sharded);
    drop(local);
}

/// `SHARD_COUNT=fenced:N` (or `plain:N`): both reads warmed, then `N`
/// reads of the one kind, and nothing else. For instruction counts: run
/// it under `valgrind --tool=callgrind` for two values of `N`; the
/// difference over the difference in `N` is the cost of one read, setup
/// and warm-up excluded (the server's work is another process's).
fn count(spec: &str) {
    let (kind, n) = spec.split_once(':').expect("SHARD_COUNT=KIND:N");
    let n: i64 = n.parse().expect("SHARD_COUNT=KIND:N");
    let (rt, _local, cluster, sharded) = setup();
    let db = cluster.db();
    rt.block_on(async {
        let plain = async |id: i64| {
            db.read_one(
                tower_scale::pg::Consistency::Any,
                support::ROUTED_READ_SQL,
                &[&id],
            )
            .await
            .expect("row");
        };
        let fenced = async |id: i64| {
            let r = sharded
                .read(
                    &id,
                    &ShardConsistency::Any,
                    support::ROUTED_READ_SQL,
                    &[&id],
                )
                .await
                .expect("read");
            assert_eq!(r.value.len(), 1);
        };
        for id in 1..=200 {
            plain(id).await;
            fenced(id).await;
        }
        for i in 0..n {
            let id = i % support::ITEMS + 1;
            match kind {
                "fenced" => fenced(id).await,
                _ => plain(id).await,
            }
        }
    });
}

criterion_group!(benches, shard);

fn main() {
    if let Ok(spec) = std::env::var("SHARD_COUNT") {
        count(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
