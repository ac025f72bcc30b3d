//! The read fence under cached plans: a read is the statement as a
//! lateral subquery of the slot's ownership row (unfenced, at the
//! reader's version or later), one statement, one snapshot; no row at all
//! is a refusal. Its guarantee: a read that starts after a change of
//! ownership committed sees the change, on the primary and on a replica
//! that replayed it, whatever plan the session cached (generic, custom,
//! `auto`).

use tower_scale::shard::{ShardConsistency, SlotRange};

use crate::{DEADLINE, database, deaf, sharded, shared};

/// The shape of the library's fenced read, its slot and version last.
const FENCED: &str = "SELECT _tsq.* FROM (SELECT FROM tower_scale_shard_slots WHERE slot=$2 \
     AND version>=$3 AND NOT fenced) _tso LEFT JOIN LATERAL (SELECT _tsu.*,true tower_scale_owned \
     FROM (SELECT id, name FROM items WHERE id = $1) _tsu) _tsq ON true";

/// A raw session on `node`'s database `db` with `mode` as its
/// `plan_cache_mode`, and [`FENCED`] prepared on it.
async fn session(
    node: &tower_scale::testing::Node,
    db: &str,
    mode: &str,
) -> (tokio_postgres::Client, tokio_postgres::Statement) {
    let client = crate::node_client(node, db).await;
    client
        .batch_execute(&format!("SET plan_cache_mode = {mode}"))
        .await
        .expect("plan_cache_mode");
    let statement = client.prepare(FENCED).await.expect("prepare");
    (client, statement)
}

/// Whether the fenced read answers for `slot` at `min` (a row: the
/// statement's, or the one of an owned slot whose statement found
/// nothing) rather than refuses (no row).
async fn owned(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    slot: u16,
    min: u64,
) -> bool {
    let rows = client
        .query(statement, &[&1i64, &i32::from(slot), &(min as i64)])
        .await
        .expect("fenced read");
    !rows.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_plans_see_every_change_of_ownership() {
    let locals = shared();
    database(&locals, "fence_plans").await;
    let mover = sharded(&locals, "fence_plans", |b| b, |b| b.watch_map(false)).await;
    let slot = 11u16;
    let first = mover.map().owner(slot).expect("owned").to_string();
    let at = |name: &str| usize::from(name != "shard-1");
    let version = 0;
    // Every shard's primary and replica, each with every plan cache mode.
    let mut sessions = Vec::new();
    for (i, local) in locals.iter().enumerate() {
        let nodes = std::iter::once(local.primary()).chain(local.replicas().iter());
        for (n, node) in nodes.enumerate() {
            for mode in ["force_generic_plan", "force_custom_plan", "auto"] {
                let (client, statement) = session(node, "fence_plans", mode).await;
                sessions.push((i, n > 0, mode, client, statement));
            }
        }
    }
    // Plans cached: beyond the five custom plans `auto` starts with.
    for (i, _, mode, client, statement) in &sessions {
        for _ in 0..8 {
            assert_eq!(
                owned(client, statement, slot, version).await,
                *i == at(&first),
                "shard-{} ({mode}) before any move",
                i + 1
            );
        }
    }
    let mut holder = first.clone();
    for round in 0..3 {
        let to = if holder == "shard-1" {
            "shard-2"
        } else {
            "shard-1"
        };
        let moved_at = mover
            .move_ownership(SlotRange::one(slot), to)
            .await
            .expect("move");
        holder = to.to_string();
        // Each replica replays the move before its sessions are asked.
        for local in &locals {
            local.wait_for_replicas(DEADLINE).await.expect("replicas");
        }
        for (i, replica, mode, client, statement) in &sessions {
            let holds = *i == at(&holder);
            let node = if *replica { "replica" } else { "primary" };
            let what = format!("round {round}: shard-{} {node} ({mode})", i + 1);
            assert_eq!(
                owned(client, statement, slot, moved_at).await,
                holds,
                "{what}, at the move's version {moved_at}"
            );
            // An older grant than the reader's map is no grant: a version
            // above the holder's is refused everywhere.
            assert!(
                !owned(client, statement, slot, moved_at + 1).await,
                "{what}, above the move's version"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_the_planner_proves_empty_is_answered_by_the_owner() {
    // The ownership row drives the read: a statement planned away (a
    // false condition here; a partition pruned, or a constraint excluding
    // it, alike) is still refused by a shard without the slot, and
    // answered (nothing) by the owner, never "not found" from the old
    // owner. (A fence filtering the statement from above was planned away
    // with it: tried and withdrawn.)
    let locals = shared();
    database(&locals, "fence_empty").await;
    let stale = sharded(&locals, "fence_empty", |b| b, deaf).await;
    let mover = sharded(&locals, "fence_empty", |b| b, |b| b.watch_map(false)).await;
    let key = 5i64;
    let slot = stale.slot(&key);
    let sql = "SELECT id, name FROM items WHERE false AND id = $1";
    let mut holder = stale.shard_for(&key).expect("owner").to_string();
    for round in 0..2 {
        let to = if holder == "shard-1" {
            "shard-2"
        } else {
            "shard-1"
        };
        // Warm the stale instance's pooled plans on the old owner.
        for _ in 0..6 {
            let r = stale
                .read(&key, &ShardConsistency::Strong, sql, &[&key])
                .await
                .expect("read");
            assert!(r.value.is_empty());
        }
        mover
            .move_ownership(SlotRange::one(slot), to)
            .await
            .expect("move");
        holder = to.to_string();
        let r = stale
            .read(&key, &ShardConsistency::Strong, sql, &[&key])
            .await
            .expect("read");
        assert!(
            r.value.is_empty(),
            "round {round}: nothing, by the statement"
        );
        assert_eq!(&*r.shard, to, "round {round}: answered by the owner");
    }
}
