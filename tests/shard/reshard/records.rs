//! A finished move is never resumed or rolled back: its range may have
//! moved on, and deleting "its" partial rows would delete another move's.

use tower_scale::shard::ShardError;
use tower_scale::shard::reshard::MoveOptions;

use super::{MOVING, moving, preload, rows, shard1_keys};
use crate::{DEADLINE, client, database, sharded, shared};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_move_is_not_resumed_or_rolled_back_under_the_next_one() {
    let locals = shared();
    let db = "reshard_records";
    database(&locals, db).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let sharded = sharded(&locals, db, |b| b, |b| b.table("items", "id")).await;
    let keys = shard1_keys(1, 600);
    preload(&clients[0], &keys).await;
    let moved: usize = keys.iter().filter(|k| moving(**k)).count();

    // M1 there, done; M2 back, caught up and waiting to cut over.
    let first = sharded.move_slots(MOVING, "shard-2").await.unwrap();
    let first_id = first.id().to_string();
    first.wait().await.unwrap();
    let back = sharded
        .move_slots_with(
            MOVING,
            "shard-1",
            MoveOptions::default().manual_cutover(true),
        )
        .await
        .unwrap();
    let mut progress = back.subscribe();
    tokio::time::timeout(DEADLINE, progress.wait_for(|p| p.caught_up))
        .await
        .expect("caught up in time")
        .unwrap();

    let resumed = sharded.resume_move(&first_id, MoveOptions::default()).await;
    assert!(
        matches!(&resumed, Err(ShardError::Setup(m)) if m.contains("finished")),
        "{:?}",
        resumed.map(|h| h.id().to_string())
    );
    let rolled = sharded.rollback_move(&first_id).await;
    assert!(
        matches!(&rolled, Err(ShardError::Setup(m)) if m.contains("finished")),
        "{rolled:?}"
    );

    back.cut_over();
    back.wait().await.unwrap();
    let on_one = rows(&clients[0]).await;
    let on_two = rows(&clients[1]).await;
    assert_eq!(on_one.len(), keys.len(), "every row back on shard-1");
    assert_eq!(
        on_two.keys().filter(|k| moving(**k)).count(),
        0,
        "none left on shard-2 after the cleanup"
    );
    eprintln!("{moved} rows moved there and back; M1 refused resume and rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_overlapping_moves_at_once_start_one() {
    let locals = shared();
    let db = "reshard_race";
    database(&locals, db).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let one = sharded(&locals, db, |b| b, |b| b.table("items", "id")).await;
    let two = super::sharded_again(&locals, db, |b| b).await;
    preload(&clients[0], &shard1_keys(1, 200)).await;
    let manual = || MoveOptions::default().manual_cutover(true);
    let half = tower_scale::shard::SlotRange::new(MOVING.first, MOVING.first + 100);
    let (a, b) = tokio::join!(
        one.move_slots_with(MOVING, "shard-2", manual()),
        two.move_slots_with(half, "shard-2", manual()),
    );
    let started: Vec<_> = [a, b].into_iter().filter_map(Result::ok).collect();
    assert_eq!(started.len(), 1, "exactly one of the two starts");
    let handle = started.into_iter().next().expect("one");
    let id = handle.id().to_owned();
    handle.abort().await;
    one.rollback_move(&id).await.expect("rollback");
    super::no_move_slots(&clients[0]).await;
}
