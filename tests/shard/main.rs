//! Sharding against real servers (two or three LocalClusters): routing,
//! the write and read fences under stale maps and racing moves,
//! read-your-writes across shards, cross-shard reads with a shard down or
//! stalled, and hostile inputs. Every wait polls with a deadline.
//!
//! Tests that do not break servers share two LocalClusters (a primary and
//! a replica each) and take a database of their own on them.

use std::sync::Arc;
use std::time::Duration;

use tower_scale::pg::{Cluster, ClusterBuilder, NodeConfig};
use tower_scale::shard::{ShardedCluster, ShardedClusterBuilder};
use tower_scale::testing::LocalCluster;

#[path = "../common/mod.rs"]
mod common;

#[cfg(feature = "change-feed")]
mod feed;
mod fence;
mod hostile;
mod lease;
mod metrics;
mod plans;
mod reads;
#[cfg(feature = "reshard")]
mod reshard;
mod routing;
mod transit;
mod versions;

pub(crate) use common::until;

pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// The read lease of the tests' instances (a move holds its range this
/// long plus 10% after the release: shorter than the default 1 s keeps
/// the moving tests quick).
pub(crate) const TEST_LEASE: Duration = Duration::from_millis(300);

/// An instance whose map stays stale until a shard refuses one of its
/// requests: no announcements heard, no read lease (so no renewals: every
/// read is fenced in the read).
pub(crate) fn deaf(b: ShardedClusterBuilder) -> ShardedClusterBuilder {
    b.watch_map(false).read_lease(Duration::ZERO)
}

/// The two shared clusters (a primary and one replica each).
pub(crate) fn shared() -> Vec<Arc<LocalCluster>> {
    (1..=2)
        .map(|i| {
            LocalCluster::shared(&format!("shard-{i}"), || {
                LocalCluster::builder().replicas(1)
            })
            .expect("LocalCluster")
        })
        .collect()
}

/// Creates database `db` (dropped first if left over) on every cluster's
/// primary, with the `items` table, and waits for the replicas.
pub(crate) async fn database(locals: &[Arc<LocalCluster>], db: &str) {
    for local in locals {
        let admin = local.primary().connect().await.expect("connect");
        for statement in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("CREATE DATABASE {db}"),
        ] {
            admin.batch_execute(&statement).await.expect(&statement);
        }
        node_client(local.primary(), db)
            .await
            .batch_execute(
                "CREATE TABLE items (id int8 PRIMARY KEY, slot int4 NOT NULL, name text NOT NULL)",
            )
            .await
            .expect("items");
        local.wait_for_replicas(DEADLINE).await.expect("replicas");
    }
}

/// A raw client on database `db` of `local`'s primary.
pub(crate) async fn client(local: &LocalCluster, db: &str) -> tokio_postgres::Client {
    node_client(local.primary(), db).await
}

/// A raw client on database `db` of `node`.
pub(crate) async fn node_client(
    node: &tower_scale::testing::Node,
    db: &str,
) -> tokio_postgres::Client {
    let mut config = node.config();
    config.dbname(db);
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// A `Cluster` on database `db` of `local`, nodes named `shard-{i}-...`.
pub(crate) async fn cluster(
    local: &LocalCluster,
    i: usize,
    db: &str,
    configure: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
) -> Cluster {
    let node = |n: &tower_scale::testing::Node, name: String| {
        let mut config = n.config();
        config.dbname(db);
        NodeConfig::new(config).name(name)
    };
    let mut builder =
        Cluster::builder().primary(node(local.primary(), format!("shard-{i}-primary")));
    for (r, replica) in local.replicas().iter().enumerate() {
        builder = builder.replica(node(replica, format!("shard-{i}-replica-{}", r + 1)));
    }
    configure(builder).build().await.expect("cluster")
}

/// A sharded cluster over database `db` of each of `locals`, shards named
/// `shard-1`, `shard-2`, ...
pub(crate) async fn sharded(
    locals: &[Arc<LocalCluster>],
    db: &str,
    configure: impl Fn(ClusterBuilder) -> ClusterBuilder,
    sharding: impl FnOnce(ShardedClusterBuilder) -> ShardedClusterBuilder,
) -> ShardedCluster {
    let mut builder = ShardedCluster::builder().read_lease(TEST_LEASE);
    for (i, local) in locals.iter().enumerate() {
        let c = cluster(local, i + 1, db, &configure).await;
        builder = builder.shard(format!("shard-{}", i + 1), c);
    }
    sharding(builder).build().await.expect("sharded cluster")
}

/// Where the row of `id` is, by SQL on every shard's primary: the shards
/// holding it.
pub(crate) async fn holders(clients: &[tokio_postgres::Client], id: i64) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let n: i64 = c
            .query_one("SELECT count(*) FROM items WHERE id = $1", &[&id])
            .await
            .expect("count")
            .get(0);
        if n > 0 {
            out.push(i);
        }
    }
    out
}

/// A seeded xorshift generator (tests print the seed).
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn from_env_or_time() -> Self {
        let seed = std::env::var("SHARD_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        println!("seed {seed} (rerun with SHARD_SEED={seed})");
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
