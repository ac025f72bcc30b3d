//! Moves under a write load, with a stale second instance; tables a
//! move could not attribute; read-your-writes across a move.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower_scale::shard::reshard::{MoveOptions, MovePhase};
use tower_scale::shard::{ShardConsistency, ShardedCluster};
use tower_scale::testing::LocalCluster;

use super::{
    MOVING, moving, no_move_slots, percentile, preload, rows, shard1_keys, sharded_again, slot,
};
use crate::{DEADLINE, client, database, sharded, shared, until};

/// What the load expects on the owner of each row: `None` once deleted.
#[derive(Default)]
struct Expected {
    /// `items`: id → name.
    items: HashMap<i64, Option<String>>,
    /// `notes`: id → (user_id, its shard key; body).
    notes: HashMap<i64, (i64, Option<String>)>,
}

/// One load task, its operations in turn: insert a new item, update one
/// of its items, insert a note (a table whose shard key, `user_id`, is
/// not its primary key), delete one of its notes, delete one of its
/// items. Records the last acknowledged state of each row and each
/// operation's (start, latency).
async fn load_task(
    sharded: ShardedCluster,
    task: i64,
    mut owned: Vec<i64>,
    mut notes: Vec<(i64, i64)>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
) -> (Expected, Vec<(Instant, Duration)>) {
    let mut expected = Expected::default();
    let mut ops = Vec::new();
    let mut fresh = (1_000_000 + task * 100_000..).filter(|k| moving(*k));
    let mut n = 0i64;
    // Paced (at most ~170 operations a second per task): the catch-up
    // must outrun the writes to the range, and one source's stream
    // decodes ~2,000 transactions a second on this shared machine with
    // these debug builds.
    let mut pace = tokio::time::interval(Duration::from_millis(6));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        n += 1;
        let name = format!("t{task}-{n}");
        let start = Instant::now();
        let op = if owned.len() < 4 { 0 } else { n % 5 };
        let pick = |len: usize| (n as usize * 7) % len.max(1);
        let result = match op {
            0 => {
                let Some(key) = fresh.next() else { break };
                let s = i32::from(slot(key));
                let r = sharded
                    .write(
                        &key,
                        "INSERT INTO items (id, slot, name) VALUES ($1, $2, $3) RETURNING id",
                        &[&key, &s, &name],
                    )
                    .await;
                r.map(|w| {
                    owned.push(key);
                    expected.items.insert(key, Some(name.clone()));
                    w.value.len()
                })
            }
            1 => {
                let key = owned[pick(owned.len())];
                sharded
                    .write(
                        &key,
                        "UPDATE items SET name = $2 WHERE id = $1 RETURNING id",
                        &[&key, &name],
                    )
                    .await
                    .map(|w| {
                        expected.items.insert(key, Some(name.clone()));
                        w.value.len()
                    })
            }
            2 => {
                let user = owned[pick(owned.len())];
                let id = 10_000_000 * (task + 1) + n;
                sharded
                    .write(
                        &user,
                        "INSERT INTO notes (id, user_id, body) VALUES ($1, $2, $3) RETURNING id",
                        &[&id, &user, &name],
                    )
                    .await
                    .map(|w| {
                        notes.push((id, user));
                        expected.notes.insert(id, (user, Some(name.clone())));
                        w.value.len()
                    })
            }
            3 if !notes.is_empty() => {
                let (id, user) = notes.swap_remove(pick(notes.len()));
                sharded
                    .write(
                        &user,
                        "DELETE FROM notes WHERE id = $1 RETURNING id",
                        &[&id],
                    )
                    .await
                    .map(|w| {
                        expected.notes.insert(id, (user, None));
                        w.value.len()
                    })
            }
            _ => {
                let key = owned.swap_remove(pick(owned.len()));
                // Its notes stay (no foreign key): rows of its slot.
                sharded
                    .write(
                        &key,
                        "DELETE FROM items WHERE id = $1 RETURNING id",
                        &[&key],
                    )
                    .await
                    .map(|w| {
                        expected.items.insert(key, None);
                        w.value.len()
                    })
            }
        };
        ops.push((start, start.elapsed()));
        done.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(1) => {}
            Ok(found) => {
                eprintln!("task {task}: operation {op} touched {found} rows");
                errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("task {task}: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    (expected, ops)
}

/// The rows of `notes` on a shard: id → (user_id, body).
async fn notes(c: &tokio_postgres::Client) -> HashMap<i64, (i64, String)> {
    c.query("SELECT id, user_id, body FROM notes", &[])
        .await
        .expect("notes")
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_of_a_shard_moves_under_write_load_losing_nothing() {
    let locals = shared();
    database(&locals, "reshard_load").await;
    let clients = [
        client(&locals[0], "reshard_load").await,
        client(&locals[1], "reshard_load").await,
    ];
    for c in &clients {
        c.batch_execute(
            "CREATE TABLE notes (id int8 PRIMARY KEY, user_id int8 NOT NULL, body text NOT NULL)",
        )
        .await
        .expect("notes");
    }
    let sharded = sharded(
        &locals,
        "reshard_load",
        |b| b,
        |b| b.table("items", "id").table("notes", "user_id"),
    )
    .await;
    // Two instances that do not run the move: one not listening to the
    // map announcements (it learns of the move when the old owner refuses
    // it), one listening (it hears the move).
    let other = sharded_again(&locals, "reshard_load", crate::deaf).await;
    let heard: Arc<std::sync::Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let hook = Arc::clone(&heard);
    let listening = sharded_again(&locals, "reshard_load", move |b| {
        b.on_slots_moved(move |slots| {
            let now = Instant::now();
            let mut heard = hook.lock().expect("hook");
            heard.extend(slots.iter().map(|s| (now, *s)));
        })
    })
    .await;
    let preloaded = shard1_keys(1, 6_000);
    preload(&clients[0], &preloaded).await;
    // A note for every third preloaded key.
    let pre_notes: Vec<(i64, i64)> = preloaded
        .iter()
        .step_by(3)
        .enumerate()
        .map(|(i, user)| (i as i64 + 1, *user))
        .collect();
    let (ids, users): (Vec<i64>, Vec<i64>) = pre_notes.iter().copied().unzip();
    clients[0]
        .execute(
            "INSERT INTO notes SELECT i, u, 'pre' FROM unnest($1::int8[], $2::int8[]) AS x(i, u)",
            &[&ids, &users],
        )
        .await
        .expect("preload notes");
    let mut expected = Expected {
        items: preloaded
            .iter()
            .map(|k| (*k, Some(format!("pre-{k}"))))
            .collect(),
        notes: pre_notes
            .iter()
            .map(|(id, user)| (*id, (*user, Some("pre".to_owned()))))
            .collect(),
    };

    // 8 tasks, each on its own eighth of the preloaded moving keys and
    // their notes, and on new moving keys.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8i64)
        .map(|t| {
            let owned: Vec<i64> = preloaded
                .iter()
                .copied()
                .filter(|k| moving(*k) && k.rem_euclid(8) == t)
                .collect();
            let notes: Vec<(i64, i64)> = pre_notes
                .iter()
                .copied()
                .filter(|(_, u)| moving(*u) && u.rem_euclid(8) == t)
                .collect();
            tokio::spawn(load_task(
                sharded.clone(),
                t,
                owned,
                notes,
                Arc::clone(&stop),
                Arc::clone(&errors),
                Arc::clone(&done),
            ))
        })
        .collect();
    until("the load runs", DEADLINE, async || {
        done.load(Ordering::Relaxed) >= 200
    })
    .await;

    let move_started = Instant::now();
    let handle = sharded
        .move_slots_with(MOVING, "shard-2", MoveOptions::default().copy_rate(8_000))
        .await
        .expect("move starts");
    let id = handle.id().to_owned();
    let mut progress = handle.subscribe();
    let watcher = tokio::spawn(async move {
        let mut phases = vec![progress.borrow().phase];
        while progress.changed().await.is_ok() {
            let p = progress.borrow().phase;
            if phases.last() != Some(&p) {
                phases.push(p);
            }
        }
        phases
    });
    let last = handle.subscribe();
    let report = match tokio::time::timeout(Duration::from_secs(60), handle.wait()).await {
        Ok(result) => result.expect("the move succeeds"),
        Err(_) => panic!("the move did not end within 60 s: {:?}", *last.borrow()),
    };
    let moved_in = move_started.elapsed();
    // The listening instance has the new map within a second of the
    // cutover, with no request of its own, and its hooks got the range.
    until(
        "the listening instance hears the move",
        DEADLINE,
        async || listening.map().owner(MOVING.first) == Some("shard-2"),
    )
    .await;
    let last_heard = heard
        .lock()
        .expect("hook")
        .iter()
        .filter(|(_, s)| MOVING.slots().contains(s))
        .map(|(at, _)| *at)
        .max()
        .expect("the listening instance's hook got the range");
    let heard_after = last_heard.saturating_duration_since(report.cutover.0);
    println!("the listening instance had the new owner {heard_after:?} after the cutover began");
    assert!(heard_after < Duration::from_secs(1), "{heard_after:?}");
    // Writes go on a little after the move, on the new owner.
    // (and to a few thousand operations in all).
    let after = (done.load(Ordering::Relaxed) + 300).max(3_000);
    until("writes after the move", DEADLINE, async || {
        done.load(Ordering::Relaxed) >= after
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    for t in tasks {
        let (written, timings) = t.await.expect("load task");
        expected.items.extend(written.items);
        expected.notes.extend(written.notes);
        ops.extend(timings);
    }
    let phases = watcher.await.expect("watcher");
    println!("move {id}: phases {phases:?}");
    assert_eq!(phases.last(), Some(&MovePhase::Done));
    assert!(phases.contains(&MovePhase::CuttingOver), "{phases:?}");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no caller got an error");

    // Every acknowledged write exactly once, on the owner only.
    let map = sharded.map();
    assert!(MOVING.slots().all(|s| map.owner(s) == Some("shard-2")));
    assert!(map.owner(MOVING.first - 1) == Some("shard-1"));
    let on = [rows(&clients[0]).await, rows(&clients[1]).await];
    let notes_on = [notes(&clients[0]).await, notes(&clients[1]).await];
    let mut wrong = Vec::new();
    for (key, name) in &expected.items {
        let (owner, other) = if moving(*key) { (1, 0) } else { (0, 1) };
        if on[owner].get(key) != name.as_ref() || on[other].contains_key(key) {
            wrong.push(format!(
                "item {key}: {name:?}, shard-1 {:?}, shard-2 {:?}",
                on[0].get(key),
                on[1].get(key)
            ));
        }
    }
    for (id, (user, body)) in &expected.notes {
        let (owner, other) = if moving(*user) { (1, 0) } else { (0, 1) };
        let want = body.as_ref().map(|b| (*user, b.clone()));
        if notes_on[owner].get(id) != want.as_ref() || notes_on[other].contains_key(id) {
            wrong.push(format!(
                "note {id}: {want:?}, shard-1 {:?}, shard-2 {:?}",
                notes_on[0].get(id),
                notes_on[1].get(id)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} rows wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let deleted = expected.items.values().filter(|v| v.is_none()).count()
        + expected.notes.values().filter(|v| v.1.is_none()).count();
    let checked = expected.items.len() + expected.notes.len();
    // The other instance, its map stale, reads the moved rows right and
    // writes them on the new owner.
    assert_eq!(other.map().owner(MOVING.first), Some("shard-1"), "stale");
    // Moved rows that survived the load (preloaded or inserted by it: a
    // long load can delete every preloaded one, and a loop over none of
    // them checked nothing; it failed so in CI, the map never refreshed).
    let mut live: Vec<i64> = expected
        .items
        .iter()
        .filter_map(|(k, v)| (moving(*k) && v.is_some()).then_some(*k))
        .collect();
    live.sort_unstable();
    live.truncate(20);
    assert!(!live.is_empty(), "no moved row survived the load");
    for key in live {
        let read = other
            .read(
                &key,
                &ShardConsistency::Any,
                "SELECT name FROM items WHERE id = $1",
                &[&key],
            )
            .await
            .expect("a stale read");
        assert_eq!(read.shard.as_ref(), "shard-2");
        assert_eq!(read.value.len(), 1, "never a false not-found");
        assert_eq!(
            Some(read.value[0].get::<_, String>(0)),
            expected.items.get(&key).cloned().flatten()
        );
        let w = other
            .write(
                &key,
                "UPDATE items SET name = name WHERE id = $1 RETURNING id",
                &[&key],
            )
            .await
            .expect("a stale write");
        assert_eq!((w.shard.as_ref(), w.value.len()), ("shard-2", 1));
    }
    if other.map().owner(MOVING.first) != Some("shard-2") {
        // Seen once in CI, not reproduced: what the tables and the map say.
        let mut listed = Vec::new();
        for c in &clients {
            listed.push(
                c.query(
                    "SELECT slot, version, fenced FROM tower_scale_shard_slots \
                     WHERE slot BETWEEN $1 AND $2 ORDER BY slot LIMIT 3",
                    &[&i32::from(MOVING.first), &i32::from(MOVING.last)],
                )
                .await
                .expect("ownership rows")
                .iter()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1), r.get::<_, bool>(2)))
                .collect::<Vec<_>>(),
            );
        }
        panic!(
            "not refreshed: the stale instance's map {:?}; the tables {listed:?}",
            other.map()
        );
    }
    let stray_1 = on[0].keys().filter(|k| moving(**k)).count()
        + notes_on[0].values().filter(|(u, _)| moving(*u)).count();
    let extra_2 = on[1]
        .keys()
        .filter(|k| !matches!(expected.items.get(k), Some(Some(_))))
        .count()
        + notes_on[1]
            .keys()
            .filter(|id| !matches!(expected.notes.get(id), Some((_, Some(_)))))
            .count();
    assert_eq!(stray_1, 0, "no moved row left on shard-1 after cleanup");
    assert_eq!(extra_2, 0, "no row on shard-2 that no write made");

    // The write pause: latencies of the writes that overlapped the cutover.
    let (held_from, held_to) = report.cutover;
    let mut paused: Vec<Duration> = ops
        .iter()
        .filter(|(start, lat)| *start <= held_to && *start + *lat >= held_from)
        .map(|(_, lat)| *lat)
        .collect();
    paused.sort_unstable();
    let mut all: Vec<Duration> = ops.iter().map(|(_, l)| *l).collect();
    all.sort_unstable();
    println!(
        "moved {} rows ({} preloaded on shard-1, reads capped at 8000/s) in {:?} (copy {:?}, {:.0} rows/s copied), \
         {} applied from the stream, {} cleaned; {} ops, {} rows checked ({} deleted); cutover attempt(s) {}, \
         writes held {:?}; pause of the {} writes overlapping it: p50 {:?} p99 {:?} max {:?}; \
         all writes: p50 {:?} p99 {:?} max {:?}",
        report.rows_copied,
        preloaded.len(),
        moved_in,
        report.copy_time,
        report.rows_copied as f64 / report.copy_time.as_secs_f64().max(1e-3),
        report.rows_applied,
        report.rows_cleaned,
        ops.len(),
        checked,
        deleted,
        report.cutover_attempts,
        report.pause,
        paused.len(),
        percentile(&paused, 0.5),
        percentile(&paused, 0.99),
        paused.last().copied().unwrap_or_default(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or_default(),
    );
    assert!(
        ops.len() >= 3_000,
        "a few thousand operations ran: {}",
        ops.len()
    );
    assert!(
        report.rows_applied > 0,
        "writes landed during the copy and were streamed"
    );
    assert!(
        report.pause <= Duration::from_secs(2),
        "writes held {:?}",
        report.pause
    );
    no_move_slots(&clients[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_across_a_move_to_a_lagging_replica() {
    // shard-2's replica replays a second late: it shows neither the copy
    // nor the claim for a while after the cutover.
    let starts: Vec<_> = [None, Some(Duration::from_secs(1))]
        .into_iter()
        .map(|delay| {
            tokio::task::spawn_blocking(move || {
                let builder = LocalCluster::builder().replicas(1);
                let builder = match delay {
                    Some(d) => builder.apply_delay(0, d),
                    None => builder,
                };
                Arc::new(builder.start().expect("LocalCluster"))
            })
        })
        .collect();
    let mut locals = Vec::new();
    for s in starts {
        locals.push(s.await.expect("start"));
    }
    database(&locals, "reshard_ryw").await;
    // The slots this instance saw change owner (cache tags to invalidate).
    let seen_moved: Arc<std::sync::Mutex<Vec<u16>>> = Arc::default();
    let hook = Arc::clone(&seen_moved);
    let sharded = sharded(
        &locals,
        "reshard_ryw",
        |b| b,
        move |b| {
            b.table("items", "id").on_slots_moved(move |slots| {
                hook.lock().expect("hook").extend_from_slice(slots);
            })
        },
    )
    .await;
    // The ownership tables on the replicas too.
    for local in &locals {
        local.wait_for_replicas(DEADLINE).await.expect("replicas");
    }
    let key = shard1_keys(1, 200)
        .into_iter()
        .find(|k| moving(*k))
        .expect("a key");
    let s = i32::from(slot(key));
    let before = sharded
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'before') RETURNING id",
            &[&key, &s],
        )
        .await
        .expect("write on the source");
    sharded
        .move_slots(MOVING, "shard-2")
        .await
        .expect("move")
        .wait()
        .await
        .expect("move done");
    // (Twice, where the instance saw the range released before claimed.)
    let mut moved: Vec<u16> = seen_moved.lock().expect("hook").clone();
    moved.sort_unstable();
    moved.dedup();
    assert_eq!(
        moved,
        MOVING.slots().collect::<Vec<_>>(),
        "on_slots_moved got the range once the move committed"
    );
    let read = |token: ShardConsistency| {
        let sharded = sharded.clone();
        async move {
            let r = sharded
                .read(
                    &key,
                    &token,
                    "SELECT name FROM items WHERE id = $1",
                    &[&key],
                )
                .await
                .expect("read");
            (
                r.shard.to_string(),
                r.value.first().map(|row| row.get::<_, String>(0)),
            )
        }
    };
    // The source's token names no LSN of shard-2: the lagging replica
    // does not own the slot yet, so the read goes to the primary.
    assert_eq!(
        read(ShardConsistency::ReadYourWrites(before.token)).await,
        ("shard-2".into(), Some("before".into()))
    );
    let after = sharded
        .write(
            &key,
            "UPDATE items SET name = 'after' WHERE id = $1 RETURNING id",
            &[&key],
        )
        .await
        .expect("write on the target");
    assert_eq!(after.shard.as_ref(), "shard-2");
    assert_eq!(
        read(ShardConsistency::ReadYourWrites(after.token)).await,
        ("shard-2".into(), Some("after".into()))
    );
    assert_eq!(
        read(ShardConsistency::Any).await.1.as_deref(),
        Some("after")
    );
}
