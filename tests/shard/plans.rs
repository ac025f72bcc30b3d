//! The read fence is a function, `tower_scale_shard_fence(slot, min_version)`
//! over `tower_scale_shard_owns`, rebuilt from `tower_scale_shard_slots` in every transaction that
//! changes it and inlined into each read's plan. Its guarantee: a read
//! that starts after a change of ownership committed sees the change, on
//! the primary and on a replica that replayed it, whatever plan the
//! session cached (generic, custom); and the function answers what the
//! table says, under concurrent random changes, for every slot.

use tower_scale::shard::SlotRange;

use crate::{DEADLINE, Rng, database, sharded, shared};

/// The shape of the library's fenced read, its slot and version last.
const FENCED: &str = "SELECT * FROM (SELECT id, name FROM items WHERE id = $1) _tsu \
     WHERE tower_scale_shard_fence($2,$3)";

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

/// One random change of the table, as SQL (a range of slots, a version).
fn change(rng: &mut Rng) -> String {
    let first = rng.below(64);
    let last = first + rng.below(8);
    let version = 1 + rng.below(5);
    match rng.below(5) {
        0 => format!(
            "INSERT INTO tower_scale_shard_slots (slot, version) \
             SELECT s, {version} FROM generate_series({first}, {last}) s \
             ON CONFLICT (slot) DO UPDATE SET version = EXCLUDED.version, fenced = false"
        ),
        1 => format!("DELETE FROM tower_scale_shard_slots WHERE slot BETWEEN {first} AND {last}"),
        2 => format!(
            "UPDATE tower_scale_shard_slots SET fenced = true WHERE slot BETWEEN {first} AND {last}"
        ),
        3 => format!(
            "UPDATE tower_scale_shard_slots SET fenced = false WHERE slot BETWEEN {first} AND {last}"
        ),
        _ => format!(
            "UPDATE tower_scale_shard_slots SET version = {version} \
             WHERE slot BETWEEN {first} AND {last}"
        ),
    }
}

/// Slots (of the first 80) where the function and the table disagree for
/// some least version 0..=6.
const DISAGREE: &str = "SELECT s, m FROM generate_series(0, 79) s CROSS JOIN generate_series(0, 6) m \
     LEFT JOIN tower_scale_shard_slots t ON t.slot = s \
     WHERE tower_scale_shard_owns(s, m) IS DISTINCT FROM \
       coalesce(NOT t.fenced AND t.version >= m, false) ORDER BY s, m LIMIT 5";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_answers_what_the_table_says_under_concurrent_changes() {
    let locals = shared();
    database(&locals, "fence_model").await;
    // Sets the tables and the function up on shard-1 (and shard-2).
    let cluster = sharded(&locals, "fence_model", |b| b, |b| b.watch_map(false)).await;
    drop(cluster);
    let mut rng = Rng::from_env_or_time();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(std::sync::Arc::new(
            crate::client(&locals[0], "fence_model").await,
        ));
    }
    let checker = crate::client(&locals[0], "fence_model").await;
    for round in 0..30 {
        // Three sessions each commit (or roll back) a transaction of one
        // to three changes, at once.
        let mut tasks = tokio::task::JoinSet::new();
        for client in &clients {
            let statements: Vec<String> = (0..1 + rng.below(3)).map(|_| change(&mut rng)).collect();
            let commit = rng.below(4) > 0;
            let client = std::sync::Arc::clone(client);
            tasks.spawn(async move {
                let result = async {
                    client.batch_execute("BEGIN").await?;
                    for statement in &statements {
                        client.batch_execute(statement).await?;
                    }
                    client
                        .batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
                        .await
                }
                .await;
                if result.is_err() {
                    // A deadlock between two sessions' row locks: one
                    // rolled back, which is a change too.
                    let _ = client.batch_execute("ROLLBACK").await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let wrong = checker.query(DISAGREE, &[]).await.expect("check");
        let wrong: Vec<(i32, i32)> = wrong.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(
            wrong.is_empty(),
            "round {round}: the function disagrees with the table at (slot, version) {wrong:?}"
        );
    }
    // A change at REPEATABLE READ is refused at its commit, and undone.
    let before: i64 = checker
        .query_one(
            "SELECT count(*) FROM tower_scale_shard_slots WHERE fenced",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    let refused = checker
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; \
             UPDATE tower_scale_shard_slots SET fenced = NOT fenced; COMMIT",
        )
        .await
        .expect_err("refused");
    assert!(
        refused.to_string().contains("READ COMMITTED")
            || format!("{refused:?}").contains("READ COMMITTED"),
        "{refused:?}"
    );
    let _ = checker.batch_execute("ROLLBACK").await;
    let after: i64 = checker
        .query_one(
            "SELECT count(*) FROM tower_scale_shard_slots WHERE fenced",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(before, after, "the refused change was undone");
    // TRUNCATE: nothing owned.
    checker
        .batch_execute("TRUNCATE tower_scale_shard_slots")
        .await
        .expect("truncate");
    assert!(
        checker
            .query(DISAGREE, &[])
            .await
            .expect("check")
            .is_empty()
    );
}
