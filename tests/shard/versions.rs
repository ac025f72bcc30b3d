//! The map version a write's token carries: the version of the fence row
//! the write took, when it is newer than the writing instance's map (a
//! slot moved away and back while the instance did not look), so a reader
//! with any older map refreshes before it reads.

use tower_scale::shard::{ShardConsistency, ShardedCluster, SlotRange};

use crate::{database, deaf, sharded, shared};

async fn give(mover: &ShardedCluster, slot: u16, to: &str) -> u64 {
    mover
        .begin_move(SlotRange::one(slot), to)
        .await
        .expect("begin move")
        .commit()
        .await
        .expect("commit move")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_stale_map_carries_the_fence_rows_version() {
    let locals = shared();
    database(&locals, "versions").await;
    // Not listening for announcements: its map stays stale.
    let stale = sharded(&locals, "versions", |b| b, deaf).await;
    let mover = sharded(&locals, "versions", |b| b, |b| b).await;
    let key = (1i64..)
        .find(|k| stale.shard_for(k).as_deref() == Some("shard-1"))
        .unwrap();
    let slot = stale.slot(&key);
    let first = stale.map().version();
    // Away and back: the slot's owner is the one the stale map names, at
    // two versions later.
    give(&mover, slot, "shard-2").await;
    let middle = sharded(&locals, "versions", |b| b, deaf).await;
    assert_eq!(middle.map().owner(slot), Some("shard-2"));
    let back = give(&mover, slot, "shard-1").await;
    assert_eq!(back, first + 2);
    assert_eq!(stale.map().version(), first, "the writer's map is stale");

    let slot_i = i32::from(slot);
    let w = stale
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'back')",
            &[&key, &slot_i],
        )
        .await
        .unwrap();
    assert_eq!(&*w.shard, "shard-1", "no refusal: the stale map was right");
    assert_eq!(
        w.token.map_version(),
        back,
        "the token carries the fence row's version, not the writer's map's"
    );
    // A reader whose map has the slot on shard-2 refreshes first (the
    // token is newer) and reads the write on shard-1's primary or a
    // replica that has it.
    let r = middle
        .read(
            &key,
            &ShardConsistency::ReadYourWrites(w.token.clone()),
            "SELECT name FROM items WHERE id = $1",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(&*r.shard, "shard-1");
    assert_eq!(r.value[0].get::<_, String>(0), "back");
    assert_eq!(middle.map().version(), back, "refreshed by the token");
}

/// The fan-out: an instance that did not make the move sees the new map
/// (and its hook fires) within a notification's delay of the move's
/// commit, without a request of its own; one with the fan-out off keeps
/// its map until a shard refuses its write, then lands on the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_hears_a_move_and_one_not_listening_learns_by_a_refusal() {
    let locals = shared();
    database(&locals, "fanout").await;
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook = std::sync::Arc::clone(&heard);
    let listening = sharded(
        &locals,
        "fanout",
        |b| b,
        move |b| b.on_slots_moved(move |slots| hook.lock().unwrap().extend_from_slice(slots)),
    )
    .await;
    let deaf = sharded(&locals, "fanout", |b| b, deaf).await;
    let mover = sharded(&locals, "fanout", |b| b, |b| b).await;
    let key = (1i64..)
        .find(|k| mover.shard_for(k).as_deref() == Some("shard-1"))
        .unwrap();
    let slot = mover.slot(&key);
    let before = listening.map().version();
    let started = std::time::Instant::now();
    let version = give(&mover, slot, "shard-2").await;
    let moved = started.elapsed();
    crate::until(
        "the listening instance's map",
        crate::DEADLINE,
        async || listening.map().owner(slot) == Some("shard-2"),
    )
    .await;
    eprintln!(
        "map version {before} -> {version}: the move took {moved:?} (its commits and its own \
         refresh); the other instance had the new map {:?} after the move began",
        started.elapsed()
    );
    assert_eq!(listening.map().version(), version);
    assert!(heard.lock().unwrap().contains(&slot), "the hook fired");
    assert_eq!(
        deaf.map().version(),
        before,
        "not listening: still the old map"
    );
    let slot_i = i32::from(slot);
    let w = deaf
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'moved')",
            &[&key, &slot_i],
        )
        .await
        .unwrap();
    assert_eq!(
        &*w.shard, "shard-2",
        "refused by shard-1, retried on shard-2"
    );
    assert_eq!(deaf.map().version(), version);
}

/// A slot moved away and back while a replica of its owner stood still:
/// the replica still shows the owner's first grant of the slot, and the
/// data from before the round trip. A token carrying a write made while
/// the slot was away must not be answered from it (the read fence asks
/// for a grant at least as new as the reader's map's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_move_away_and_back_does_not_answer_a_newer_token() {
    let starts: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                std::sync::Arc::new(
                    tower_scale::testing::LocalCluster::builder()
                        .replicas(1)
                        .start()
                        .unwrap(),
                )
            })
        })
        .collect();
    let locals: Vec<_> = starts.into_iter().map(|s| s.join().unwrap()).collect();
    database(&locals, "round_trip").await;
    let sharded = sharded(&locals, "round_trip", |b| b, |b| b).await;
    let key = (1i64..)
        .find(|k| sharded.shard_for(k).as_deref() == Some("shard-1"))
        .unwrap();
    let slot = sharded.slot(&key);
    let slot_i = i32::from(slot);
    let first = sharded
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'first')",
            &[&key, &slot_i],
        )
        .await
        .unwrap();
    for local in &locals {
        local
            .wait_for_replicas(crate::DEADLINE)
            .await
            .expect("replicas");
    }
    // shard-1's replica stands still from here.
    let replica = locals[0].replica(0).connect().await.unwrap();
    replica
        .execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .unwrap();
    crate::fence::move_with_rows(&sharded, slot, "shard-2").await;
    let away = sharded
        .write(
            &key,
            "UPDATE items SET name = 'written away' WHERE id = $1",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(&*away.shard, "shard-2");
    crate::fence::move_with_rows(&sharded, slot, "shard-1").await;
    let mut token = first.token.clone();
    token.merge(&away.token);
    for _ in 0..5 {
        let r = sharded
            .read(
                &key,
                &ShardConsistency::ReadYourWrites(token.clone()),
                "SELECT name FROM items WHERE id = $1",
                &[&key],
            )
            .await
            .unwrap();
        assert_eq!(
            (r.value[0].get::<_, String>(0), &*r.shard),
            ("written away".to_string(), "shard-1"),
            "served by {}",
            r.served_by
        );
    }
    replica
        .execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .unwrap();
}
