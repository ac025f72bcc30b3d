//! Online resharding against real servers: half of shard-1's slots and
//! their rows moved to shard-2 under a write load (`load`), and moves
//! stopped, killed, rolled back and resumed (`faults`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tower_scale::shard::{
    DEFAULT_SLOTS, ShardedCluster, ShardedClusterBuilder, SlotRange, slot_of,
};
use tower_scale::testing::LocalCluster;

use crate::{DEADLINE, until};

mod cutover;
mod fanout;
mod faults;
mod load;
mod records;
mod tables;

/// shard-1 owns 0..=2047 (the even split by name); this is its upper half.
pub(crate) const MOVING: SlotRange = SlotRange {
    first: 1024,
    last: 2047,
};

pub(crate) fn slot(key: i64) -> u16 {
    slot_of(&key, DEFAULT_SLOTS)
}

pub(crate) fn moving(key: i64) -> bool {
    MOVING.slots().contains(&slot(key))
}

/// `n` keys from `from` on whose slot shard-1 owns (0..=2047).
pub(crate) fn shard1_keys(from: i64, n: usize) -> Vec<i64> {
    (from..).filter(|k| slot(*k) < 2048).take(n).collect()
}

/// Loads `keys` into shard-1's `items` directly (one statement).
pub(crate) async fn preload(c: &tokio_postgres::Client, keys: &[i64]) {
    let slots: Vec<i32> = keys.iter().map(|k| i32::from(slot(*k))).collect();
    let names: Vec<String> = keys.iter().map(|k| format!("pre-{k}")).collect();
    c.execute(
        "INSERT INTO items (id, slot, name) SELECT * FROM unnest($1::int8[], $2::int4[], $3::text[])",
        &[&keys, &slots, &names],
    )
    .await
    .expect("preload");
}

/// The rows of `items` on a shard: id → name.
pub(crate) async fn rows(c: &tokio_postgres::Client) -> HashMap<i64, String> {
    c.query("SELECT id, name FROM items", &[])
        .await
        .expect("rows")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Polls until shard `c` has no replication slot or publication of a move.
pub(crate) async fn no_move_slots(c: &tokio_postgres::Client) {
    until("the move's slot and publication dropped", DEADLINE, async || {
        let n: i64 = c
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'tower\\_scale\\_move\\_%') \
                 + (SELECT count(*) FROM pg_publication WHERE pubname LIKE 'tower\\_scale\\_move\\_%')",
                &[],
            )
            .await
            .expect("slots")
            .get(0);
        n == 0
    })
    .await;
}

/// A second instance on the same databases (primaries only), configured
/// by `configure` ([`crate::deaf`] for one whose map stays stale until a shard
/// refuses one of its requests).
pub(crate) async fn sharded_again(
    locals: &[Arc<LocalCluster>],
    db: &str,
    configure: impl FnOnce(ShardedClusterBuilder) -> ShardedClusterBuilder,
) -> ShardedCluster {
    let mut builder = configure(
        ShardedCluster::builder()
            .table("items", "id")
            .read_lease(crate::TEST_LEASE),
    );
    for (i, local) in locals.iter().enumerate() {
        let mut config = local.primary().config();
        config.dbname(db);
        let cluster = tower_scale::pg::Cluster::builder()
            .primary(tower_scale::pg::NodeConfig::new(config).name(format!("other-{i}")))
            .build()
            .await
            .expect("cluster");
        builder = builder.shard(format!("shard-{}", i + 1), cluster);
    }
    builder.build().await.expect("the other instance")
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// How many slots of [`MOVING`] each shard's ownership table lists.
pub(crate) async fn owned_moving(clients: &[tokio_postgres::Client]) -> Vec<i64> {
    let mut out = Vec::new();
    for c in clients {
        out.push(
            c.query_one(
                "SELECT count(*) FROM tower_scale_shard_slots WHERE slot BETWEEN $1 AND $2",
                &[&i32::from(MOVING.first), &i32::from(MOVING.last)],
            )
            .await
            .expect("owned")
            .get(0),
        );
    }
    out
}
