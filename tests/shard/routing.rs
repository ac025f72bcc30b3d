//! Slots and routing: pinned key→slot values, the spread of 10,000 keys,
//! and every key routed to the shard whose ownership table lists its slot.

use std::collections::HashMap;

use tower_scale::shard::{DEFAULT_SLOTS, ShardConsistency, crc32, slot_of};

use crate::{client, database, holders, sharded, shared};

#[test]
fn key_to_slot_values_are_pinned() {
    // CRC-32/ISO-HDLC's check value, then keys of each documented form.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    let s = DEFAULT_SLOTS;
    assert_eq!(slot_of(&0i64, s), 3945);
    assert_eq!(slot_of(&1i64, s), 4095);
    assert_eq!(slot_of(&42i64, s), 1727);
    assert_eq!(slot_of(&-1i64, s), 3868);
    assert_eq!(slot_of(&1_234_567_890_123i64, s), 2411);
    assert_eq!(slot_of(&42i32, s), 1727, "i32 widens to i64");
    assert_eq!(slot_of("", s), 0);
    assert_eq!(slot_of("user:ada", s), 466);
    assert_eq!(slot_of("héllo", s), 566, "UTF-8 bytes");
    assert_eq!(slot_of("42", s), 136, "text is not the integer");
    assert_eq!(slot_of(&String::from("user:ada"), s), 466);
    assert_eq!(slot_of(&[0u8, 255, 16][..], s), 1028);
    assert_eq!(slot_of(&vec![0u8, 255, 16], s), 1028);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_route_to_their_owners_evenly() {
    let locals = shared();
    database(&locals, "routing").await;
    let sharded = sharded(&locals, "routing", |b| b, |b| b).await;
    let clients = [
        client(&locals[0], "routing").await,
        client(&locals[1], "routing").await,
    ];
    // The owners, by SQL on each shard.
    let mut owner_of_slot = HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        for row in c
            .query("SELECT slot FROM tower_scale_shard_slots", &[])
            .await
            .unwrap()
        {
            assert!(
                owner_of_slot.insert(row.get::<_, i32>(0), i).is_none(),
                "one owner per slot"
            );
        }
    }
    assert_eq!(
        owner_of_slot.len(),
        usize::from(DEFAULT_SLOTS),
        "every slot owned"
    );
    let mut per_shard = [0usize; 2];
    for key in 1..=10_000i64 {
        let slot = sharded.slot(&key);
        let shard = sharded.shard_for(&key).expect("owned");
        let expected = owner_of_slot[&i32::from(slot)];
        assert_eq!(
            &*shard,
            format!("shard-{}", expected + 1),
            "key {key} slot {slot}"
        );
        per_shard[expected] += 1;
    }
    println!("10,000 keys: {per_shard:?}");
    for n in per_shard {
        assert!(
            (4750..=5250).contains(&n),
            "split within ±5% of even: {per_shard:?}"
        );
    }
    // A sample actually written lands on its owner, and only there.
    for key in (1..=10_000i64).step_by(97) {
        let slot = i32::from(sharded.slot(&key));
        let w = sharded
            .write(
                &key,
                "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'k')",
                &[&key, &slot],
            )
            .await
            .unwrap();
        let expected = owner_of_slot[&slot];
        assert_eq!(&*w.shard, format!("shard-{}", expected + 1));
        assert_eq!(holders(&clients, key).await, vec![expected], "key {key}");
    }
    // And reads find them there.
    let r = sharded
        .read(
            &9992i64,
            &ShardConsistency::Strong,
            "SELECT name FROM items WHERE id = $1",
            &[&9992i64],
        )
        .await
        .unwrap();
    assert_eq!(r.value.len(), 1);
    assert_eq!(r.value[0].get::<_, String>(0), "k");
}
