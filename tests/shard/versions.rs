//! The map version a write's token carries: the version of the fence row
//! the write took, when it is newer than the writing instance's map (a
//! slot moved away and back while the instance did not look), so a reader
//! with any older map refreshes before it reads.

use tower_scale::shard::{ShardConsistency, ShardedCluster, SlotRange};

use crate::{database, sharded, shared};

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
    let stale = sharded(&locals, "versions", |b| b, |b| b).await;
    let mover = sharded(&locals, "versions", |b| b, |b| b).await;
    let key = (1i64..)
        .find(|k| stale.shard_for(k).as_deref() == Some("shard-1"))
        .unwrap();
    let slot = stale.slot(&key);
    let first = stale.map().version();
    // Away and back: the slot's owner is the one the stale map names, at
    // two versions later.
    give(&mover, slot, "shard-2").await;
    let middle = sharded(&locals, "versions", |b| b, |b| b).await;
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
