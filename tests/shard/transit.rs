//! A cutover that fails between its two commits: the source's fence
//! committed, the target's claim did not (its session killed). The
//! ownership tables name exactly one holder of the range at every step
//! (the source, fenced; then the target), the fenced range is neither
//! written nor read by a stale instance meanwhile, and finishing or
//! lifting the fence gives it one serving owner again.

use std::time::Duration;

use tower_scale::shard::{ShardConsistency, ShardError, SlotRange};

use crate::{DEADLINE, client, database, deaf, holders, sharded, shared, until};

/// `(shard index, version, fenced)` of every row listing `slot`, by SQL
/// on each shard's primary.
async fn listed(clients: &[tokio_postgres::Client], slot: u16) -> Vec<(usize, i64, bool)> {
    let mut out = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for row in c
            .query(
                "SELECT version, fenced FROM tower_scale_shard_slots WHERE slot = $1",
                &[&i32::from(slot)],
            )
            .await
            .expect("ownership rows")
        {
            out.push((i, row.get(0), row.get(1)));
        }
    }
    out
}

/// The holder by the tables' rule: the highest version; exactly one.
fn holder(rows: &[(usize, i64, bool)]) -> (usize, bool) {
    let top = rows.iter().map(|r| r.1).max().expect("a holder");
    let at_top: Vec<_> = rows.iter().filter(|r| r.1 == top).collect();
    assert_eq!(
        at_top.len(),
        1,
        "one holder at the highest version: {rows:?}"
    );
    (at_top[0].0, at_top[0].2)
}

/// Kills the sessions holding an uncommitted write on `c`'s database (the
/// move's target transaction), and waits until they are gone.
async fn kill_open_writers(c: &tokio_postgres::Client) {
    let sql = "SELECT pid FROM pg_catalog.pg_stat_activity WHERE datname = current_database() \
               AND pid <> pg_catalog.pg_backend_pid() AND backend_xid IS NOT NULL";
    let pids: Vec<i32> = c
        .query(sql, &[])
        .await
        .expect("sessions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 1, "the move's target transaction alone");
    c.execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pids[0]])
        .await
        .expect("terminate");
    until("the session gone", DEADLINE, async || {
        c.query(sql, &[]).await.expect("sessions").is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_lost_after_the_fence_leaves_one_holder_and_no_stale_service() {
    let locals = shared();
    let db = "transit";
    database(&locals, db).await;
    let mover = sharded(&locals, db, |b| b, |b| b).await;
    let stale = sharded(
        &locals,
        db,
        |b| b,
        |b| deaf(b).moved_wait(Duration::from_millis(300)),
    )
    .await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let key = 11i64;
    let slot = mover.slot(&key);
    let slot_i = i32::from(slot);
    assert_eq!(mover.map().owner(slot), Some("shard-1"));
    mover
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'before')",
            &[&key, &slot_i],
        )
        .await
        .expect("write");
    assert_eq!(holder(&listed(&clients, slot).await), (0, false));

    // The cutover: the source's rows locked and fenced, the target's claim
    // written; the row copied in the target's transaction; then the
    // target's session dies before its commit.
    let mv = mover
        .begin_move(SlotRange::one(slot), "shard-2")
        .await
        .expect("begin move");
    mv.target()
        .execute(
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'before')",
            &[&key, &slot_i],
        )
        .await
        .expect("copy in");
    kill_open_writers(&clients[1]).await;
    let err = mv.commit().await.expect_err("the claim's commit fails");
    println!("commit: {err}");

    // One holder: the source, fenced; the target lists nothing.
    let rows = listed(&clients, slot).await;
    assert_eq!(holder(&rows), (0, true), "{rows:?}");
    assert!(rows.iter().all(|r| r.0 == 0), "{rows:?}");
    let map = mover.refresh().await.expect("refresh");
    assert_eq!(map.owner(slot), None, "no shard serves it");
    assert_eq!(map.fenced_by(slot), Some("shard-1"));

    // A stale instance (its map says shard-1 owns it, unfenced) is refused
    // by the fence for writes and reads alike, past its moved wait; the
    // row is unchanged everywhere.
    assert_eq!(stale.map().owner(slot), Some("shard-1"), "stale");
    let w = stale
        .write(
            &key,
            "UPDATE items SET name = 'lost' WHERE id = $1",
            &[&key],
        )
        .await;
    assert!(
        matches!(
            w,
            Err(ShardError::Unowned { .. } | ShardError::Moved { .. })
        ),
        "the write is refused, not applied: {w:?}"
    );
    for consistency in [ShardConsistency::Strong, ShardConsistency::Any] {
        let r = stale
            .read(
                &key,
                &consistency,
                "SELECT name FROM items WHERE id = $1",
                &[&key],
            )
            .await;
        assert!(
            matches!(
                r,
                Err(ShardError::Unowned { .. } | ShardError::Moved { .. })
            ),
            "{consistency:?}: {r:?}"
        );
    }
    let name: String = clients[0]
        .query_one("SELECT name FROM items WHERE id = $1", &[&key])
        .await
        .expect("source row")
        .get(0);
    assert_eq!(name, "before");
    assert_eq!(holders(&clients, key).await, vec![0], "no partial claim");

    // Finishing the move from there: the target holds it, the source's
    // fenced row is gone; the stale instance's write lands on the target.
    clients[1]
        .execute(
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'before')",
            &[&key, &slot_i],
        )
        .await
        .expect("the copy a resume would make");
    let version = mover
        .move_ownership(SlotRange::one(slot), "shard-2")
        .await
        .expect("finish");
    let rows = listed(&clients, slot).await;
    assert_eq!(rows, vec![(1, version as i64, false)], "source forgotten");
    let w = stale
        .write(
            &key,
            "UPDATE items SET name = 'after' WHERE id = $1",
            &[&key],
        )
        .await
        .expect("write after");
    assert_eq!(&*w.shard, "shard-2");
    let name: String = clients[1]
        .query_one("SELECT name FROM items WHERE id = $1", &[&key])
        .await
        .expect("target row")
        .get(0);
    assert_eq!(name, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifted_fence_serves_the_range_again_from_its_holder() {
    let locals = shared();
    let db = "transit_lift";
    database(&locals, db).await;
    let mover = sharded(&locals, db, |b| b, |b| b).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let key = 12i64;
    let slot = mover.slot(&key);
    let slot_i = i32::from(slot);
    mover
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'kept')",
            &[&key, &slot_i],
        )
        .await
        .expect("write");
    let mv = mover
        .begin_move(SlotRange::one(slot), "shard-2")
        .await
        .expect("begin move");
    let claim_version = mv.version();
    kill_open_writers(&clients[1]).await;
    mv.commit().await.expect_err("the claim's commit fails");
    assert_eq!(holder(&listed(&clients, slot).await), (0, true));
    // Another instance starting now sees the range fenced by its holder.
    let fresh = sharded(&locals, db, |b| b, |b| b).await;
    assert_eq!(fresh.map().fenced_by(slot), Some("shard-1"));
    let before = fresh.map().version();

    mover.lift_fence(SlotRange::one(slot)).await.expect("lift");
    let rows = listed(&clients, slot).await;
    assert_eq!(holder(&rows), (0, false), "{rows:?}");
    // The other instance hears of it (the version went up) and serves it.
    until("the lifted fence announced", DEADLINE, async || {
        fresh.map().version() > before
    })
    .await;
    let r = fresh
        .read(
            &key,
            &ShardConsistency::Strong,
            "SELECT name FROM items WHERE id = $1",
            &[&key],
        )
        .await
        .expect("read");
    assert_eq!(r.value[0].get::<_, String>(0), "kept");
    // A claim whose COMMIT was still pending when the fence was lifted, and
    // lands now: the lift regranted the slot above the claim's version, so
    // the holder stays the holder (one holder by the tables' rule).
    clients[1]
        .execute(
            "INSERT INTO tower_scale_shard_slots (slot, version) VALUES ($1, $2)",
            &[&slot_i, &(claim_version as i64)],
        )
        .await
        .expect("the late claim");
    assert_eq!(holder(&listed(&clients, slot).await), (0, false));
    let map = fresh.refresh().await.expect("refresh");
    assert_eq!(map.owner(slot), Some("shard-1"));
    let w = fresh
        .write(
            &key,
            "UPDATE items SET name = 'again' WHERE id = $1",
            &[&key],
        )
        .await
        .expect("write");
    assert_eq!(&*w.shard, "shard-1");
}
