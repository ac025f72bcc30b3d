//! The fence: writes and reads sent by an instance with a stale map are
//! refused by the old owner and land on (or read from) the new one; a
//! seeded random run of writes racing moves leaves no row on a shard that
//! does not own its slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tower_scale::shard::{ShardConsistency, ShardError, ShardedCluster, SlotRange};

use crate::{Rng, client, database, deaf, holders, sharded, shared};

/// Moves `slot` to `to`, carrying its `items` rows (the copy the
/// resharding issue will automate).
pub(crate) async fn move_with_rows(mover: &ShardedCluster, slot: u16, to: &str) -> u64 {
    let mv = mover
        .begin_move(SlotRange::one(slot), to)
        .await
        .expect("begin move");
    let slot = i32::from(slot);
    let from = mover.map().owner(slot as u16).map(str::to_string);
    if let Some(source) = mv.source() {
        let rows = source
            .query("SELECT id, name FROM items WHERE slot = $1", &[&slot])
            .await
            .expect("copy out");
        for row in rows {
            let (id, name): (i64, String) = (row.get(0), row.get(1));
            mv.target()
                .execute(
                    "INSERT INTO items (id, slot, name) VALUES ($1, $2, $3)",
                    &[&id, &slot, &name],
                )
                .await
                .expect("copy in");
        }
    }
    let version = mv.commit().await.expect("commit move");
    // The old owner's copies go once the claim committed (a reader under
    // a stale lease may read them until then).
    if let Some(from) = from {
        mover
            .shard(&from)
            .expect("shard")
            .db()
            .execute("DELETE FROM items WHERE slot = $1", &[&slot])
            .await
            .expect("delete");
    }
    version
}

pub(crate) fn other(shard: &str) -> &'static str {
    if shard == "shard-1" {
        "shard-2"
    } else {
        "shard-1"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_is_refused_by_the_old_owner_and_lands_on_the_new() {
    let locals = shared();
    database(&locals, "fence_write").await;
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook = Arc::clone(&heard);
    let stale = sharded(
        &locals,
        "fence_write",
        |b| b,
        move |b| deaf(b).on_slots_moved(move |slots| hook.lock().unwrap().extend_from_slice(slots)),
    )
    .await;
    let mover = sharded(&locals, "fence_write", |b| b, |b| b).await;
    let clients = [
        client(&locals[0], "fence_write").await,
        client(&locals[1], "fence_write").await,
    ];
    let key = 42i64;
    let slot = stale.slot(&key);
    let slot_i = i32::from(slot);
    assert_eq!(stale.map().owner(slot), Some("shard-1"));
    let version = mover
        .move_ownership(SlotRange::one(slot), "shard-2")
        .await
        .unwrap();
    assert_eq!(version, 2);
    assert_eq!(
        stale.map().owner(slot),
        Some("shard-1"),
        "this instance's map is stale"
    );
    let w = stale
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'a')",
            &[&key, &slot_i],
        )
        .await
        .unwrap();
    assert_eq!(&*w.shard, "shard-2");
    assert_eq!(w.token.map_version(), 2);
    assert_eq!(holders(&clients, key).await, vec![1], "only on the owner");
    assert_eq!(
        stale.map().owner(slot),
        Some("shard-2"),
        "refreshed by the refusal"
    );
    assert_eq!(
        *heard.lock().unwrap(),
        vec![slot],
        "the moved slot, for its cache entries"
    );

    // The same through a transaction: moved back, the stale instance's
    // transaction starts on the old owner's successor.
    move_with_rows(&mover, slot, "shard-1").await;
    let tx = stale.transaction(&key).await.unwrap();
    assert_eq!(&**tx.shard(), "shard-1");
    tx.execute("UPDATE items SET name = 'b' WHERE id = $1", &[&key])
        .await
        .unwrap();
    let token = tx.commit().await.unwrap();
    assert_eq!(token.map_version(), 3);
    assert_eq!(holders(&clients, key).await, vec![0]);

    // A shard refuses a slot it does not own, whoever asks: the fence
    // query itself finds no row there.
    let own = clients[1]
        .query(
            "SELECT 1 FROM tower_scale_shard_slots WHERE slot = $1 FOR SHARE",
            &[&slot_i],
        )
        .await
        .unwrap();
    assert!(own.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_returns_the_row_never_a_false_not_found() {
    let locals = shared();
    database(&locals, "fence_read").await;
    let stale = sharded(&locals, "fence_read", |b| b, deaf).await;
    let mover = sharded(&locals, "fence_read", |b| b, |b| b).await;
    let clients = [
        client(&locals[0], "fence_read").await,
        client(&locals[1], "fence_read").await,
    ];
    let key = 7i64;
    let slot = stale.slot(&key);
    let slot_i = i32::from(slot);
    let first = stale.shard_for(&key).unwrap();
    mover
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'seven')",
            &[&key, &slot_i],
        )
        .await
        .unwrap();
    let sql = "SELECT id, name FROM items WHERE id = $1";
    let mut now_at = first.to_string();
    for (round, consistency) in [
        ShardConsistency::Strong,
        ShardConsistency::Any,
        ShardConsistency::Strong,
    ]
    .into_iter()
    .enumerate()
    {
        now_at = other(&now_at).to_string();
        // The reader knows where the row is now; then it moves.
        stale.refresh().await.unwrap();
        move_with_rows(&mover, slot, &now_at).await;
        assert_ne!(
            stale.map().owner(slot),
            Some(now_at.as_str()),
            "round {round}: stale map"
        );
        let owner = if now_at == "shard-1" { 0 } else { 1 };
        assert_eq!(
            holders(&clients, key).await,
            vec![owner],
            "the old owner has no row left"
        );
        let r = stale.read(&key, &consistency, sql, &[&key]).await.unwrap();
        assert_eq!(
            r.value.len(),
            1,
            "round {round} ({consistency:?}): the row, not a false 404"
        );
        assert_eq!(r.value[0].get::<_, String>("name"), "seven");
        assert_eq!(r.value[0].get::<_, i64>(0), key);
        if consistency == ShardConsistency::Strong {
            assert_eq!(&*r.shard, now_at);
        } else {
            // `Any` may be answered by the old owner's replica that has
            // not replayed the move yet: its own consistent snapshot (the
            // slot still owned there, the row with it), as stale as `Any`
            // allows, never empty.
            println!("round {round}: {consistency:?} answered by {}", r.served_by);
        }
        // A key that does not exist is still "not found", from the owner.
        let missing = 1_000_000 + i64::from(round as u8);
        let r = stale
            .read(&missing, &consistency, sql, &[&missing])
            .await
            .unwrap();
        assert!(r.value.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_moves_leave_no_row_on_a_shard_that_does_not_own_it() {
    let mut rng = Rng::from_env_or_time();
    let locals = shared();
    database(&locals, "fence_race").await;
    // Not listening for announcements: its map lags every move.
    let writer = sharded(&locals, "fence_race", |b| b, deaf).await;
    let mover = sharded(&locals, "fence_race", |b| b, |b| b).await;
    let clients = [
        client(&locals[0], "fence_race").await,
        client(&locals[1], "fence_race").await,
    ];
    // Six hot slots, three on each shard at first.
    let hot: Vec<u16> = (0..6u16)
        .map(|i| {
            if i < 3 {
                100 + i * 500
            } else {
                2100 + (i - 3) * 500
            }
        })
        .collect();
    let mut ids: Vec<Vec<i64>> = vec![Vec::new(); hot.len()];
    let mut id = 0i64;
    while ids.iter().map(Vec::len).sum::<usize>() < 480 {
        id += 1;
        let slot = writer.slot(&id);
        if let Some(i) = hot.iter().position(|&h| h == slot) {
            ids[i].push(id);
        }
    }
    let mut work: Vec<i64> = ids.into_iter().flatten().collect();
    for i in (1..work.len()).rev() {
        work.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let done = Arc::new(AtomicBool::new(false));
    let moves = Arc::new(AtomicU64::new(0));
    let mover_task = {
        let (done, moves, hot) = (Arc::clone(&done), Arc::clone(&moves), hot.clone());
        let mut rng = Rng(rng.next() | 1);
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) || moves.load(Ordering::Relaxed) < 10 {
                let slot = hot[rng.below(hot.len() as u64) as usize];
                let to = other(mover.map().owner(slot).expect("owned"));
                move_with_rows(&mover, slot, to).await;
                moves.fetch_add(1, Ordering::Relaxed);
                for _ in 0..rng.below(4) {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let chunks: Vec<Vec<i64>> = work
        .chunks(work.len().div_ceil(4))
        .map(<[i64]>::to_vec)
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut moved) = (Vec::new(), Vec::new());
            for id in chunk {
                let slot = i32::from(writer.slot(&id));
                match writer
                    .write(
                        &id,
                        "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'r')",
                        &[&id, &slot],
                    )
                    .await
                {
                    Ok(_) => ok.push(id),
                    Err(ShardError::Moved { .. }) => moved.push(id),
                    Err(e) => panic!("write {id}: {e}"),
                }
            }
            (ok, moved)
        }));
    }
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        let (o, m) = t.await.unwrap();
        ok.extend(o);
        refused.extend(m);
    }
    done.store(true, Ordering::Release);
    mover_task.await.unwrap();
    println!(
        "{} writes, {} refused after the retry, {} moves, writer's map version {}",
        ok.len(),
        refused.len(),
        moves.load(Ordering::Relaxed),
        writer.map().version()
    );
    assert!(
        writer.map().version() > 1,
        "the writer learned of moves from refusals"
    );
    for (i, c) in clients.iter().enumerate() {
        let stray: i64 = c
            .query_one(
                "SELECT count(*) FROM items i WHERE NOT EXISTS \
                 (SELECT 1 FROM tower_scale_shard_slots s WHERE s.slot = i.slot)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            stray,
            0,
            "rows on shard-{} for slots it does not own",
            i + 1
        );
    }
    let mut total = 0i64;
    for c in &clients {
        total += c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    assert_eq!(total, ok.len() as i64, "every acknowledged write, once");
    for id in ok.iter().take(50) {
        assert_eq!(holders(&clients, *id).await.len(), 1);
    }
    for id in &refused {
        assert!(
            holders(&clients, *id).await.is_empty(),
            "a refused write wrote nothing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_moves_get_versions_in_commit_order() {
    let locals = shared();
    database(&locals, "fence_versions").await;
    let a = sharded(&locals, "fence_versions", |b| b, |b| b).await;
    let b = sharded(&locals, "fence_versions", |b| b, |b| b).await;
    // Each mover sends its two slots away and back, six times.
    let run = |mover: ShardedCluster, slots: [u16; 2]| {
        tokio::spawn(async move {
            let mut versions = Vec::new();
            for round in 0..6 {
                for slot in slots {
                    let home = if slot < 2048 { "shard-1" } else { "shard-2" };
                    let to = if round % 2 == 0 { other(home) } else { home };
                    versions.push(
                        mover
                            .move_ownership(SlotRange::one(slot), to)
                            .await
                            .unwrap(),
                    );
                    // A mover's map only ever moves forward.
                    assert!(mover.map().version() >= *versions.last().unwrap());
                }
            }
            versions
        })
    };
    let (va, vb) = (run(a.clone(), [10, 3000]), run(b.clone(), [20, 3010]));
    let mut all = va.await.unwrap();
    all.extend(vb.await.unwrap());
    all.sort_unstable();
    assert_eq!(
        all,
        (2..=25).collect::<Vec<u64>>(),
        "one version per move, no two alike"
    );
    let fresh = a.refresh().await.unwrap();
    assert_eq!(fresh.version(), 25);
    assert_eq!(fresh.owner(10), Some("shard-1"));
    assert_eq!(fresh.owner(3010), Some("shard-2"));
    assert_eq!(*b.refresh().await.unwrap(), *fresh, "both instances agree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_that_fails_on_the_old_owner_is_moved_not_failed() {
    let locals = shared();
    database(&locals, "fence_fails").await;
    let stale = sharded(&locals, "fence_fails", |b| b, deaf).await;
    let mover = sharded(&locals, "fence_fails", |b| b, |b| b).await;
    let clients = [
        client(&locals[0], "fence_fails").await,
        client(&locals[1], "fence_fails").await,
    ];
    let key = 42i64;
    let slot = stale.slot(&key);
    let slot_i = i32::from(slot);
    let sql = "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'x')";
    mover.write(&key, sql, &[&key, &slot_i]).await.unwrap();
    // Moved without its row: the old owner keeps a row the new one lacks.
    mover
        .move_ownership(SlotRange::one(slot), "shard-2")
        .await
        .unwrap();
    // On the old owner the insert would violate the key; the fence runs
    // first and refuses the slot, so the write is retried, not failed.
    let w = stale.write(&key, sql, &[&key, &slot_i]).await.unwrap();
    assert_eq!(&*w.shard, "shard-2");
    assert_eq!(holders(&clients, key).await, vec![0, 1]);
    // A statement that fails on the owner is the caller's error, and
    // nothing of it is committed.
    let err = stale.write(&key, sql, &[&key, &slot_i]).await.unwrap_err();
    assert!(
        matches!(&err, ShardError::Db { shard, .. } if &**shard == "shard-2"),
        "{err}"
    );
    assert!(!err.may_have_committed());
    let n: i64 = clients[1]
        .query_one("SELECT count(*) FROM items WHERE id = $1", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}
