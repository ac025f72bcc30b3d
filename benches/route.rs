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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tower_scale::pg::{Candidate, Cluster, Consistency, NodeConfig, choose_replica};
use tower_scale::testing::LocalCluster;

#[path = "support/mod.rs"]
mod support;

fn route(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let local = support::items_cluster(&rt);
    let (cluster, client, stmt) = rt.block_on(async {
        let client = local.replica(0).connect().await.expect("connect replica");
        let stmt = client
            .prepare(support::ROUTED_READ_SQL)
            .await
            .expect("prepare");
        (support::connect(&local).await, client, stmt)
    });
    let db = cluster.db();

    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let mut id = 0i64;
    group.bench_function("held_client", |b| {
        b.to_async(&rt).iter(|| {
            id = id % support::ITEMS + 1;
            let (client, stmt) = (&client, &stmt);
            async move { black_box(client.query_one(stmt, &[&id]).await.expect("row")) }
        })
    });
    support::routed_read(&mut group, &rt, &db);
    let candidates = [
        Candidate {
            in_flight: 2,
            latency: Duration::from_micros(180),
            rtt: Duration::ZERO,
            lag: Duration::ZERO,
            weight: 1.0,
            same_zone: false,
        },
        Candidate {
            in_flight: 1,
            latency: Duration::from_micros(220),
            rtt: Duration::ZERO,
            lag: Duration::from_millis(5),
            weight: 1.0,
            same_zone: false,
        },
        Candidate {
            in_flight: 0,
            latency: Duration::from_micros(200),
            rtt: Duration::ZERO,
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

/// Rows in the throughput table.
const ROWS: i64 = 100_000;

/// Statements per measured iteration (spread over the tasks).
const BATCH: u64 = 2_000;

/// The same pool `Db` builds for a node: default size, fast recycling.
fn raw_pool(config: tokio_postgres::Config) -> Pool {
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(16).build().expect("pool")
}

/// A random id in 1..=ROWS from a per-task xorshift state.
fn next_id(state: &mut u64) -> i64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state % ROWS as u64) as i64 + 1
}

/// Runs `iters` batches of [`BATCH`] operations over `tasks` concurrent
/// tasks (each takes operations from a shared counter) and returns the
/// elapsed time; `op` runs one statement with an id.
fn spread<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, tasks: usize, op: F) -> Duration
where
    F: Fn(i64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    rt.block_on(async move {
        let started = Instant::now();
        for _ in 0..iters {
            let left = Arc::new(AtomicU64::new(BATCH));
            let mut set = tokio::task::JoinSet::new();
            for t in 0..tasks {
                let (op, left) = (Arc::clone(&op), Arc::clone(&left));
                set.spawn(async move {
                    let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ ((t as u64 + 1) * 0x1234_5678);
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        op(next_id(&mut state)).await;
                    }
                });
            }
            while let Some(done) = set.join_next().await {
                done.expect("task");
            }
        }
        started.elapsed()
    })
}

const READ_SQL: &str = "SELECT id, name FROM items WHERE id = $1";
const WRITE_SQL: &str = "UPDATE items SET n = n + 1 WHERE id = $1";
const TOKEN_SQL: &str =
    "SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.pg_current_wal_lsn()";

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = LocalCluster::start(1).expect("LocalCluster");
    let cluster = rt.block_on(async {
        let primary = local.primary().connect().await.expect("connect");
        primary
            .batch_execute(&format!(
                "CREATE TABLE items (id bigint primary key, name text not null, n bigint not null default 0);
                 INSERT INTO items SELECT g, 'item ' || g, 0 FROM generate_series(1, {ROWS}) g"
            ))
            .await
            .expect("setup");
        local
            .wait_for_replicas(Duration::from_secs(60))
            .await
            .expect("replay");
        Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .replica(NodeConfig::new(local.replica(0).config()))
            .build()
            .await
            .expect("cluster")
    });
    let db = cluster.db();
    let replica_pool = raw_pool(local.replica(0).config());
    let primary_pool = raw_pool(local.primary().config());

    for tasks in [8usize, 32] {
        let mut group = c.benchmark_group(format!("reads_{tasks}"));
        group.throughput(Throughput::Elements(BATCH));
        group.sample_size(10);
        group.bench_function("raw_deadpool", |b| {
            b.iter_custom(|iters| {
                let pool = replica_pool.clone();
                spread(&rt, iters, tasks, move |id| {
                    let pool = pool.clone();
                    async move {
                        let conn = pool.get().await.expect("checkout");
                        let stmt = conn.prepare_cached(READ_SQL).await.expect("prepare");
                        black_box(conn.query_one(&stmt, &[&id]).await.expect("row"));
                    }
                })
            })
        });
        group.bench_function("routed", |b| {
            b.iter_custom(|iters| {
                let db = db.clone();
                spread(&rt, iters, tasks, move |id| {
                    let db = db.clone();
                    async move {
                        let r = db
                            .read_one(Consistency::Any, READ_SQL, &[&id])
                            .await
                            .expect("row");
                        black_box(r);
                    }
                })
            })
        });
        group.finish();
    }

    let mut group = c.benchmark_group("writes_8");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(10);
    group.bench_function("raw_deadpool", |b| {
        b.iter_custom(|iters| {
            let pool = primary_pool.clone();
            spread(&rt, iters, 8, move |id| {
                let pool = pool.clone();
                async move {
                    let conn = pool.get().await.expect("checkout");
                    let stmt = conn.prepare_cached(WRITE_SQL).await.expect("prepare");
                    assert_eq!(conn.execute(&stmt, &[&id]).await.expect("update"), 1);
                }
            })
        })
    });
    // The floor for any token: the same plain pool, with the token query
    // pipelined behind each UPDATE by hand (what the server and the
    // protocol cost, without the library).
    group.bench_function("raw_pipelined_token", |b| {
        b.iter_custom(|iters| {
            let pool = primary_pool.clone();
            spread(&rt, iters, 8, move |id| {
                let pool = pool.clone();
                async move {
                    let conn = pool.get().await.expect("checkout");
                    let stmt = conn.prepare_cached(WRITE_SQL).await.expect("prepare");
                    let token = conn.prepare_cached(TOKEN_SQL).await.expect("prepare");
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let (n, row) =
                        futures::join!(conn.execute(&stmt, &params), conn.query_one(&token, &[]));
                    assert_eq!(n.expect("update"), 1);
                    black_box(row.expect("token"));
                }
            })
        })
    });
    group.bench_function("db_execute", |b| {
        b.iter_custom(|iters| {
            let db = db.clone();
            spread(&rt, iters, 8, move |id| {
                let db = db.clone();
                async move {
                    let w = db.execute(WRITE_SQL, &[&id]).await.expect("update");
                    assert_eq!(w.value, 1);
                    black_box(w.token);
                }
            })
        })
    });
    group.finish();
    drop(db);
    drop(cluster);
    drop(local);
}

criterion_group!(benches, route, throughput);
criterion_main!(benches);
