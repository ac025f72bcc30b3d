//! The map fan-out with a real move: an instance that did not run the
//! move has the new map shortly after the cutover (measured from the
//! target's claim), and one not listening learns of it by a refused write.

use std::time::{Duration, Instant};

use tower_scale::shard::ShardConsistency;

use super::{MOVING, moving, preload, shard1_keys, sharded_again, slot};
use crate::{DEADLINE, client, database, sharded, shared};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_has_the_new_map_shortly_after_the_cutover() {
    let locals = shared();
    database(&locals, "reshard_fanout").await;
    let items = |b: tower_scale::shard::ShardedClusterBuilder| b.table("items", "id");
    let mover = sharded(&locals, "reshard_fanout", |b| b, items).await;
    let listening = sharded(&locals, "reshard_fanout", |b| b, items).await;
    let deaf = sharded_again(&locals, "reshard_fanout", crate::deaf).await;
    let keys = shard1_keys(1, 400);
    preload(&client(&locals[0], "reshard_fanout").await, &keys).await;

    // Watches the listening instance's map from before the move starts.
    let watcher = {
        let listening = listening.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + DEADLINE;
            while listening.map().owner(MOVING.first) != Some("shard-2") {
                assert!(Instant::now() < deadline, "the new map never arrived");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Instant::now()
        })
    };
    let report = mover
        .move_slots(MOVING, "shard-2")
        .await
        .expect("move")
        .wait()
        .await
        .expect("move done");
    let seen = watcher.await.expect("watcher");
    let (_, claimed) = report.cutover;
    let when = match seen.checked_duration_since(claimed) {
        Some(after) => format!("{after:?} after"),
        None => format!("{:?} before", claimed.duration_since(seen)),
    };
    eprintln!(
        "the other instance had the new map {when} the mover saw its claim commit \
         (the move: {} rows copied, write pause {:?})",
        report.rows_copied, report.pause
    );
    assert_eq!(listening.map().version(), report.version);

    // Not listening: the old map until shard-1 refuses a write.
    assert_eq!(deaf.map().owner(MOVING.first), Some("shard-1"));
    let key = *keys.iter().find(|k| moving(**k)).expect("a moving key");
    let s = i32::from(slot(key));
    let w = deaf
        .write(
            &key,
            "UPDATE items SET name = 'after' WHERE id = $1 AND slot = $2",
            &[&key, &s],
        )
        .await
        .expect("write");
    assert_eq!(
        &*w.shard, "shard-2",
        "refused by shard-1, retried on shard-2"
    );
    assert_eq!(deaf.map().version(), report.version);
    let r = listening
        .read(
            &key,
            &ShardConsistency::ReadYourWrites(w.token),
            "SELECT name FROM items WHERE id = $1",
            &[&key],
        )
        .await
        .expect("read");
    assert_eq!(r.value[0].get::<_, String>(0), "after");
}
