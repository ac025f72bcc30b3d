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

/// A transaction holding one of the range's slots (its fence row `FOR
/// SHARE`) for 2 s: each cutover attempt waits for that row at most
/// `max_pause`, gives up (releasing the rows it had locked) and tries
/// again; writes to the range's other slots are held at most about that
/// long and none fails; the move completes once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_on_the_range_delays_the_cutover_within_its_bound() {
    let locals = shared();
    let db = "reshard_long_tx";
    database(&locals, db).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let sharded = sharded(&locals, db, |b| b, |b| b.table("items", "id")).await;
    let keys = shard1_keys(1, 400);
    preload(&clients[0], &keys).await;
    let in_range: Vec<i64> = keys.iter().copied().filter(|k| moving(*k)).collect();
    let held_key = in_range[0];
    let held_slot = slot(held_key);
    let others: Vec<i64> = in_range
        .iter()
        .copied()
        .filter(|k| slot(*k) != held_slot)
        .take(40)
        .collect();

    let handle = sharded
        .move_slots_with(
            MOVING,
            "shard-2",
            MoveOptions::default()
                .manual_cutover(true)
                .max_pause(Duration::from_millis(200))
                .cutover_attempts(50),
        )
        .await
        .expect("move");
    let mut progress = handle.subscribe();
    tokio::time::timeout(DEADLINE, progress.wait_for(|p| p.caught_up))
        .await
        .expect("caught up in time")
        .expect("progress");
    // Begun once the move's slot exists (a transaction holding an xid
    // delays the slot's creation, not the cutover).
    let tx = sharded
        .transaction(&held_key)
        .await
        .expect("the long transaction");
    // Writes to the range's other slots all along.
    let writer = {
        let sharded = sharded.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let started = Instant::now();
            let mut n = 0usize;
            while started.elapsed() < Duration::from_millis(3000) {
                let key = others[n % others.len()];
                let t = Instant::now();
                sharded
                    .write(&key, "UPDATE items SET name = 'w' WHERE id = $1", &[&key])
                    .await
                    .expect("no write fails during the cutover attempts");
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        })
    };
    handle.cut_over();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    tx.execute("UPDATE items SET name = 'held' WHERE id = $1", &[&held_key])
        .await
        .expect("the long transaction's write");
    tx.commit().await.expect("the long transaction commits");
    let report = tokio::time::timeout(DEADLINE, handle.wait())
        .await
        .expect("the move ends")
        .expect("the move completes");
    let (writes, slowest) = writer.await.expect("writer");
    eprintln!(
        "{writes} writes to the range while a transaction held one of its slots for 2 s: \
         the slowest took {slowest:?}; the move took {} cutover attempts, writes held {:?} by the last",
        report.cutover_attempts, report.pause
    );
    // Each attempt waits for the held row at most max_pause, then gives
    // up and lets the writes through: several attempts in 2 s (one that
    // waited for the row would have been the only one before the commit).
    assert!(
        report.cutover_attempts >= 4,
        "{} attempts: the first ones waited past max_pause",
        report.cutover_attempts
    );
    let on_two = rows(&clients[1]).await;
    assert_eq!(on_two.get(&held_key).map(String::as_str), Some("held"));
}
