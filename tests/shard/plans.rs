//! The read fence under cached plans: a read is `SELECT * FROM (statement)
//! WHERE EXISTS (the slot's ownership row, unfenced, at the reader's
//! version or later) OR tower_scale_shard_refuse(slot, version)`, the
//! refusal an error with SQLSTATE `TSMOV`. Its guarantee: a read that
//! starts after a change of ownership committed sees the change, on the
//! primary and on a replica that replayed it, whatever plan the session
//! cached (generic, custom, `auto`); a row of the statement's never
//! stands for "owned", and "not found" is an empty answer.

use tower_scale::shard::SlotRange;

use crate::{DEADLINE, database, sharded, shared};

/// The shape of the library's fenced read, its slot and version last.
const FENCED: &str = "SELECT * FROM (SELECT id, name FROM items WHERE id = $1) _tsu \
     WHERE EXISTS (SELECT FROM tower_scale_shard_slots \
     WHERE slot=$2 AND version>=$3 AND NOT fenced) OR tower_scale_shard_refuse($2,$3)";

/// A raw session on `node`'s database `db` with `mode` as its
/// `plan_cache_mode`, and [`FENCED`] prepared on it.
async fn session(
    node: &tower_scale::testing::Node,
    db: &str,
    mode: &str,
) -> (tokio_postgres::Client, tokio_postgres::Statement) {
    let mut config = node.config();
    config.dbname(db);
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET plan_cache_mode = {mode}"))
        .await
        .expect("plan_cache_mode");
    let statement = client.prepare(FENCED).await.expect("prepare");
    (client, statement)
}

/// Whether the fenced read answers (rows, or none) for `slot` at `min`,
/// rather than refuses (SQLSTATE `TSMOV`).
async fn owned(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    slot: u16,
    min: u64,
) -> bool {
    match client
        .query(statement, &[&1i64, &i32::from(slot), &(min as i64)])
        .await
    {
        Ok(_) => true,
        Err(e) if e.code().map(|c| c.code()) == Some("TSMOV") => false,
        Err(e) => panic!("fenced read: {e:?}"),
    }
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
