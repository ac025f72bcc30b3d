//! Online resharding: a slot range with 100,000 rows moved between two
//! local shards (primaries only), back and forth.
//!
//! ```text
//! cargo bench --features full --bench reshard
//! ```
//!
//! `reshard/move_100k_rows`: one whole move (copy unthrottled, catch-up,
//! cutover, cleanup unthrottled), 100,000 rows (criterion's elements/s is
//! rows moved per second). Printed after it: the copy's rows/s and the
//! cutover's write pause (how long the range's writes were held: p50, p99,
//! max) over the measured moves without a load, then the same over two
//! moves under a write load (8 tasks updating rows of the range), with the
//! latency of the writes that overlapped the cutover.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::shard::reshard::{MoveOptions, MoveReport};
use tower_scale::shard::{DEFAULT_SLOTS, ShardedCluster, SlotRange, slot_of};
use tower_scale::testing::LocalCluster;

const ROWS: usize = 100_000;
/// A quarter of the key space, all of it shard-1's at the start.
const MOVING: SlotRange = SlotRange {
    first: 0,
    last: 1023,
};

fn options() -> MoveOptions {
    MoveOptions::default()
        .copy_rate(0)
        .cleanup_rate(0)
        .batch(5_000)
}

/// Moves [`MOVING`] to the shard that does not own it.
async fn move_once(sharded: &ShardedCluster) -> MoveReport {
    let to = match sharded.map().owner(MOVING.first) {
        Some("shard-1") => "shard-2",
        _ => "shard-1",
    };
    sharded
        .move_slots_with(MOVING, to, options())
        .await
        .expect("move")
        .wait()
        .await
        .expect("move done")
}

fn percentiles(mut d: Vec<Duration>) -> String {
    d.sort_unstable();
    let at = |p: f64| d[((d.len() - 1) as f64 * p).round() as usize];
    if d.is_empty() {
        return "none".into();
    }
    format!("p50 {:?} p99 {:?} max {:?}", at(0.5), at(0.99), at(1.0))
}

fn reshard(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let locals: Vec<LocalCluster> = (0..2)
        .map(|_| LocalCluster::start(0).expect("LocalCluster"))
        .collect();
    let keys: Vec<i64> = (1..)
        .filter(|k| MOVING.slots().contains(&slot_of(k, DEFAULT_SLOTS)))
        .take(ROWS)
        .collect();
    let sharded = rt.block_on(async {
        for local in &locals {
            let c = local.primary().connect().await.expect("connect");
            c.batch_execute(
                "CREATE TABLE items (id int8 PRIMARY KEY, slot int4 NOT NULL, name text NOT NULL)",
            )
            .await
            .expect("items");
        }
        let c = locals[0].primary().connect().await.expect("connect");
        for chunk in keys.chunks(10_000) {
            let slots: Vec<i32> = chunk
                .iter()
                .map(|k| i32::from(slot_of(k, DEFAULT_SLOTS)))
                .collect();
            c.execute(
                "INSERT INTO items SELECT k, s, 'item ' || k FROM unnest($1::int8[], $2::int4[]) AS u(k, s)",
                &[&chunk, &slots],
            )
            .await
            .expect("rows");
        }
        let mut builder = ShardedCluster::builder().table("items", "id");
        for (i, local) in locals.iter().enumerate() {
            let cluster = Cluster::builder()
                .primary(NodeConfig::new(local.primary().config()))
                .build()
                .await
                .expect("cluster");
            builder = builder.shard(format!("shard-{}", i + 1), cluster);
        }
        builder.build().await.expect("sharded")
    });

    let mut reports: Vec<MoveReport> = Vec::new();
    let mut group = c.benchmark_group("reshard");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("move_100k_rows", |b| {
        b.iter_custom(|iterations| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    reports.push(move_once(&sharded).await);
                }
                started.elapsed()
            })
        })
    });
    group.finish();
    let rates: Vec<f64> = reports
        .iter()
        .map(|r| r.rows_copied as f64 / r.copy_time.as_secs_f64().max(1e-6))
        .collect();
    println!(
        "reshard/move_100k_rows without load: {} moves, copy {:.0} rows/s (mean), writes held {}",
        reports.len(),
        rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        percentiles(reports.iter().map(|r| r.pause).collect())
    );

    // Under a write load: 8 tasks updating rows of the range.
    let (held, overlapping) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..8usize)
            .map(|t| {
                let (sharded, stop) = (sharded.clone(), Arc::clone(&stop));
                let keys: Vec<i64> = keys
                    .iter()
                    .copied()
                    .skip(t)
                    .step_by(8)
                    .take(2_000)
                    .collect();
                tokio::spawn(async move {
                    let mut ops = Vec::new();
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let key = keys[n % keys.len()];
                        n += 1;
                        let start = Instant::now();
                        sharded
                            .write(
                                &key,
                                "UPDATE items SET name = 'w' || $2::int8 WHERE id = $1",
                                &[&key, &(n as i64)],
                            )
                            .await
                            .expect("write under load");
                        ops.push((start, start.elapsed()));
                    }
                    ops
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut windows = Vec::new();
        for _ in 0..2 {
            let report = move_once(&sharded).await;
            held.push(report.pause);
            windows.push(report.cutover);
        }
        stop.store(true, Ordering::Relaxed);
        let mut overlapping = Vec::new();
        for t in tasks {
            for (start, lat) in t.await.expect("load task") {
                if windows
                    .iter()
                    .any(|(from, to)| start <= *to && start + lat >= *from)
                {
                    overlapping.push(lat);
                }
            }
        }
        (held, overlapping)
    });
    println!(
        "reshard/move_100k_rows under a write load (8 tasks): writes held {}; the {} writes overlapping a cutover: {}",
        percentiles(held),
        overlapping.len(),
        percentiles(overlapping)
    );
}

criterion_group!(benches, reshard);
criterion_main!(benches);
