//! A cutover attempt that runs past its bound rolls back (writes go on at
//! the source) and the next one completes the move.

use std::time::{Duration, Instant};

use tower_scale::shard::reshard::{MoveOptions, MovePhase};

use super::{MOVING, moving, owned_moving, preload, rows, shard1_keys, slot};
use crate::{DEADLINE, client, database, sharded, shared};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_past_its_bound_rolls_back_and_the_next_attempt_moves() {
    let locals = shared();
    let db = "reshard_cutover";
    database(&locals, db).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let sharded = sharded(&locals, db, |b| b, |b| b.table("items", "id")).await;
    let keys = shard1_keys(1, 1_000);
    preload(&clients[0], &keys).await;
    let fresh: Vec<i64> = (100_000..).filter(|k| moving(*k)).take(2).collect();
    let insert = |key: i64| {
        let sharded = sharded.clone();
        async move {
            let s = i32::from(slot(key));
            let started = Instant::now();
            let w = sharded
                .write(
                    &key,
                    "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'fresh') RETURNING id",
                    &[&key, &s],
                )
                .await
                .expect("a write during the cutover attempts");
            (w.shard.to_string(), started.elapsed())
        }
    };

    let handle = sharded
        .move_slots_with(
            MOVING,
            "shard-2",
            MoveOptions::default()
                .manual_cutover(true)
                .max_pause(Duration::from_millis(300)),
        )
        .await
        .expect("move");
    let mut progress = handle.subscribe();
    tokio::time::timeout(DEADLINE, progress.wait_for(|p| p.caught_up))
        .await
        .expect("caught up in time")
        .expect("progress");
    // The target's table locked: the stream cannot apply the next write,
    // so the first attempt's marker cannot come through.
    let mut blocker = client(&locals[1], db).await;
    let lock = blocker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let (shard, _) = insert(fresh[0]).await;
    assert_eq!(shard, "shard-1");
    handle.cut_over();
    tokio::time::timeout(
        DEADLINE,
        progress.wait_for(|p| p.phase == MovePhase::CuttingOver),
    )
    .await
    .expect("an attempt")
    .expect("progress");
    // A write arriving now waits for the attempt, then goes on at the
    // source (the attempt rolled back): nothing is refused.
    let (shard, waited) = insert(fresh[1]).await;
    assert_eq!(shard, "shard-1", "the source still owns the range");
    assert!(waited < Duration::from_secs(2), "held {waited:?}");
    tokio::time::timeout(
        DEADLINE,
        progress.wait_for(|p| p.phase == MovePhase::CatchingUp),
    )
    .await
    .expect("the attempt given up")
    .expect("progress");
    assert_eq!(owned_moving(&clients).await, vec![MOVING.len() as i64, 0]);
    lock.rollback().await.expect("unlock");

    let report = handle.wait().await.expect("the next attempt moves");
    println!(
        "attempts {}, the write during the first waited {waited:?}, the last held writes {:?}",
        report.cutover_attempts, report.pause
    );
    // The first gave up (the target was locked); a later one moved (on a
    // loaded machine the second can give up too).
    assert!(report.cutover_attempts >= 2, "{}", report.cutover_attempts);
    assert_eq!(owned_moving(&clients).await, vec![0, MOVING.len() as i64]);
    let on = rows(&clients[1]).await;
    for key in &fresh {
        assert_eq!(on.get(key).map(String::as_str), Some("fresh"), "key {key}");
    }
    let moved = keys.iter().filter(|k| moving(**k)).count() + fresh.len();
    assert_eq!(on.len(), moved);
}
