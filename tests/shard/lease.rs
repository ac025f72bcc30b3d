//! Read leases: a read routed by a stale map under a lease runs without
//! the in-read fence, and still never sees a false "not found" or data
//! older than a write that returned before it began. The other side: a
//! move's claim waits out every lease (the hold).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tower_scale::pg::{Lsn, Role};
use tower_scale::shard::{ShardConsistency, ShardError, ShardedCluster, ShardedToken};

use crate::fence::{move_with_rows, other};
use crate::{DEADLINE, Rng, client, database, sharded, shared, until};

const SQL: &str = "SELECT name FROM items WHERE id = $1";

/// Whether the shard of `client` holds `slot` fenced (a move's release
/// committed, its claim not yet).
async fn fenced(client: &Client, slot: u16) -> bool {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM tower_scale_shard_slots WHERE slot = $1 AND fenced",
            &[&i32::from(slot)],
        )
        .await
        .expect("ownership row")
        .get(0);
    n > 0
}

async fn name(sharded: &ShardedCluster, key: i64, c: &ShardConsistency) -> (String, String) {
    let r = sharded.read(&key, c, SQL, &[&key]).await.expect("read");
    assert_eq!(r.value.len(), 1, "the row, never a false not-found");
    (r.value[0].get::<_, String>(0), r.shard.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_reads_the_old_owner_and_no_write_lands_before_it_runs_out() {
    let locals = shared();
    database(&locals, "lease_stale").await;
    let lease = Duration::from_secs(6);
    // The first to start records its 6 s lease on both shards, so every
    // move holds its claim 6.6 s; it waits that out (the default 2 s
    // would give up first).
    let mover = sharded(
        &locals,
        "lease_stale",
        |b| b,
        |b| b.read_lease(lease).moved_wait(Duration::from_secs(15)),
    )
    .await;
    let clients = [
        client(&locals[0], "lease_stale").await,
        client(&locals[1], "lease_stale").await,
    ];
    let key = 7i64;
    let slot = mover.slot(&key);
    let from = mover.shard_for(&key).expect("owned").to_string();
    let to = other(&from);
    mover
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'before')",
            &[&key, &i32::from(slot)],
        )
        .await
        .expect("insert");
    // Renewed once, at its start: its map stays the one it read then, and
    // its lease runs out 6 s later. Everything up to its reads below
    // happens in that window (the replicas' wait, the move's release).
    let stale = sharded(
        &locals,
        "lease_stale",
        |b| b,
        |b| {
            b.watch_map(false)
                .read_lease(lease)
                .lease_renewal(Duration::from_secs(3600))
        },
    )
    .await;
    let built = Instant::now();
    // Its leased reads go to a replica once its monitor saw the replica
    // replay the position its map read: a commit after it (an xid's
    // commit record, written out before it returns) is past it.
    let old = &clients[usize::from(from == "shard-2")];
    old.batch_execute("SELECT pg_catalog.txid_current()")
        .await
        .expect("a commit");
    let position: Lsn = old
        .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
        .await
        .expect("position")
        .get::<_, String>(0)
        .parse()
        .expect("an lsn");
    until(
        "the stale instance sees its replicas replay its map's position",
        DEADLINE,
        async || {
            let nodes = stale.shard(&from).expect("shard").status();
            nodes
                .iter()
                .filter(|n| n.role == Role::Replica)
                .all(|n| n.lsn >= position)
        },
    )
    .await;
    // Before the move starts, so before its release.
    let before_move = Instant::now();
    let moving = {
        let mover = mover.clone();
        tokio::spawn(async move { move_with_rows(&mover, slot, to).await })
    };
    until("the old owner's release", DEADLINE, async || {
        fenced(old, slot).await
    })
    .await;
    // With 2 s left for the two reads below.
    assert!(
        built.elapsed() < lease - Duration::from_secs(2),
        "the machine took longer than the lease ({lease:?}) to release the slot: nothing tested"
    );
    // The old owner refuses the slot's writes now; the stale lease still
    // reads it there, and finds the row.
    for c in [ShardConsistency::Strong, ShardConsistency::Any] {
        let (value, shard) = name(&stale, key, &c).await;
        assert_eq!(value, "before");
        assert_eq!(
            shard, from,
            "{c:?}: read under the stale lease, on the old owner"
        );
    }
    // A write waits for the claim, which waits out the hold: it lands on
    // the new owner after the stale lease (confirmed before the release)
    // ran out.
    let w = mover
        .write(
            &key,
            "UPDATE items SET name = 'after' WHERE id = $1",
            &[&key],
        )
        .await
        .expect("write after the move");
    let written = before_move.elapsed();
    assert_eq!(&*w.shard, to);
    println!("the write returned {written:?} after the move began (lease {lease:?})");
    // The release came after `before_move`, the claim a hold after it.
    assert!(
        written >= lease,
        "a write landed within the stale lease: {written:?}"
    );
    // So the stale instance, asked now, is fenced in the read again: the
    // old owner refuses, and the new one answers with the write.
    let token = ShardConsistency::ReadYourWrites(w.token);
    for c in [ShardConsistency::Strong, token] {
        let (value, shard) = name(&stale, key, &c).await;
        assert_eq!(value, "after", "{c:?}");
        assert_eq!(shard, to);
    }
    moving.await.expect("move task");
    assert_eq!(crate::holders(&clients, key).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_not_listening_learns_a_move_from_its_lease_renewal() {
    let locals = shared();
    database(&locals, "lease_renew").await;
    let quiet = sharded(&locals, "lease_renew", |b| b, |b| b.watch_map(false)).await;
    let mover = sharded(&locals, "lease_renew", |b| b, |b| b).await;
    let slot = 5u16;
    let to = other(quiet.map().owner(slot).expect("owned")).to_string();
    let version = mover
        .move_ownership(tower_scale::shard::SlotRange::one(slot), &to)
        .await
        .expect("move");
    // No request of its own, no announcement heard: the renewal (every
    // quarter lease) finds the shards' versions moved and refreshes.
    until("the quiet instance's map", DEADLINE, async || {
        quiet.map().owner(slot) == Some(to.as_str())
    })
    .await;
    assert_eq!(quiet.map().version(), version);
}

/// One read's record: when it began and ended, the value it saw.
struct ReadRecord {
    began: Instant,
    value: u64,
    shard: String,
    /// For a read-your-writes read: the write whose token it carried.
    token_of: Option<u64>,
}

type Writes = Arc<Mutex<Vec<(u64, Instant, ShardedToken)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_under_leases_racing_moves_never_see_older_data() {
    let mut rng = Rng::from_env_or_time();
    let locals = shared();
    database(&locals, "lease_race").await;
    // 1 s leases (renewed every 250 ms, within 500 ms: they hold on a
    // busy machine), a 1.12 s hold per move; waits for a claim bounded by
    // the deadline, not by the default 2 s.
    let lease = Duration::from_secs(1);
    let mover = sharded(
        &locals,
        "lease_race",
        |b| b,
        |b| b.read_lease(lease).moved_wait(DEADLINE),
    )
    .await;
    // Readers that hear no announcement: their maps lag each move until
    // a renewal finds it, and they read under their leases meanwhile.
    let mut readers = Vec::new();
    for _ in 0..2 {
        readers.push(
            sharded(
                &locals,
                "lease_race",
                |b| b,
                |b| b.watch_map(false).read_lease(lease).moved_wait(DEADLINE),
            )
            .await,
        );
    }
    let key = 11i64;
    let slot = mover.slot(&key);
    mover
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, '0')",
            &[&key, &i32::from(slot)],
        )
        .await
        .expect("insert");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writes, one after another: (value, when it returned, its token).
    let writes: Writes = Arc::default();
    let writer = {
        let (mover, stop, writes) = (mover.clone(), Arc::clone(&stop), Arc::clone(&writes));
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let w = match mover
                    .write(
                        &key,
                        "UPDATE items SET name = $2 WHERE id = $1",
                        &[&key, &n.to_string()],
                    )
                    .await
                {
                    Ok(w) => w,
                    // Refused twice (the next move fenced the slot while
                    // the write retried): nothing was written.
                    Err(ShardError::Moved { .. } | ShardError::Unowned { .. }) => continue,
                    Err(e) => panic!("write: {e}"),
                };
                writes.lock().unwrap().push((n, Instant::now(), w.token));
            }
        })
    };
    let mut reading = Vec::new();
    for reader in &readers {
        let (reader, stop, writes) = (reader.clone(), Arc::clone(&stop), Arc::clone(&writes));
        reading.push(tokio::spawn(async move {
            let (mut seen, mut moved) = (Vec::new(), 0);
            let mut strong = false;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                // Every other read carries the token of the last write
                // that returned (on the replicas, through the moves).
                strong = !strong;
                let began = Instant::now();
                let last = writes.lock().unwrap().last().cloned();
                let (c, token_of) = match last {
                    Some((n, _, token)) if !strong => {
                        (ShardConsistency::ReadYourWrites(token), Some(n))
                    }
                    _ => (ShardConsistency::Strong, None),
                };
                let r = match reader.read(&key, &c, SQL, &[&key]).await {
                    Ok(r) => r,
                    // Refused twice: the slot moved again while the read
                    // was retried (moves here follow each other closely).
                    // Retryable, and it returned nothing.
                    Err(ShardError::Moved { .. } | ShardError::Unowned { .. }) => {
                        moved += 1;
                        continue;
                    }
                    Err(e) => panic!("read: {e}"),
                };
                assert_eq!(r.value.len(), 1, "the row, never a false not-found");
                seen.push(ReadRecord {
                    began,
                    value: r.value[0].get::<_, String>(0).parse().expect("a number"),
                    shard: r.shard.to_string(),
                    token_of,
                });
            }
            (seen, moved)
        }));
    }
    // Watches each shard's ownership row of the slot: when it held it
    // fenced (released, not yet claimed: the hold).
    let holds: Arc<Mutex<Vec<(String, Instant, Instant)>>> = Arc::default();
    let watcher = {
        let (stop, holds) = (Arc::clone(&stop), Arc::clone(&holds));
        let clients = [
            client(&locals[0], "lease_race").await,
            client(&locals[1], "lease_race").await,
        ];
        tokio::spawn(async move {
            let mut since: [Option<Instant>; 2] = [None, None];
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                for (i, c) in clients.iter().enumerate() {
                    let now = Instant::now();
                    match (fenced(c, slot).await, since[i]) {
                        (true, None) => since[i] = Some(now),
                        (false, Some(start)) => {
                            holds
                                .lock()
                                .unwrap()
                                .push((format!("shard-{}", i + 1), start, now));
                            since[i] = None;
                        }
                        _ => {}
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.below(80))).await;
        let to = other(mover.map().owner(slot).expect("owned"));
        move_with_rows(&mover, slot, to).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    writer.await.expect("writer");
    watcher.await.expect("watcher");
    let holds = holds.lock().unwrap().clone();
    let writes = writes.lock().unwrap().clone();
    let (mut reads, mut moved) = (Vec::new(), 0);
    for r in reading {
        let (seen, m) = r.await.expect("reader");
        reads.extend(seen);
        moved += m;
    }
    // The checker: a strong read sees at least the last write that
    // returned before it began; a read with a write's token, that write.
    let mut stale = Vec::new();
    for r in &reads {
        let floor = match r.token_of {
            Some(n) => n,
            None => writes
                .iter()
                .take_while(|(_, at, _)| *at < r.began)
                .last()
                .map_or(0, |(n, ..)| *n),
        };
        if r.value < floor {
            stale.push(format!(
                "read {} on {} after write {floor} returned ({})",
                r.value,
                r.shard,
                if r.token_of.is_some() {
                    "its token"
                } else {
                    "strong"
                }
            ));
        }
    }
    let with_token = reads.iter().filter(|r| r.token_of.is_some()).count();
    // Reads the old owner answered after it had let go: under a lease
    // (the in-read fence would have refused them).
    let leased_in_hold = reads
        .iter()
        .filter(|r| {
            holds
                .iter()
                .any(|(shard, from, to)| *shard == r.shard && r.began > *from && r.began < *to)
        })
        .count();
    let on_1 = reads.iter().filter(|r| r.shard == "shard-1").count();
    println!(
        "{} reads ({on_1} on shard-1, {with_token} with a token, {moved} refused twice, \
         {leased_in_hold} by the old owner during a hold), {} writes, {} holds seen",
        reads.len(),
        writes.len(),
        holds.len()
    );
    assert!(
        leased_in_hold > 0,
        "no read was served under a lease during a hold"
    );
    assert!(writes.len() > 6, "writes went on through the moves");
    assert!(
        stale.is_empty(),
        "{} stale reads: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_set_up_by_an_earlier_release_records_no_lease() {
    let locals = shared();
    database(&locals, "lease_upgrade").await;
    let first = sharded(&locals, "lease_upgrade", |b| b, |b| b).await;
    let clients = [
        client(&locals[0], "lease_upgrade").await,
        client(&locals[1], "lease_upgrade").await,
    ];
    let recorded = async |c: &Client| -> i64 {
        c.query_one("SELECT lease_ms FROM tower_scale_shard_map", &[])
            .await
            .expect("lease_ms")
            .get(0)
    };
    for c in &clients {
        assert_eq!(recorded(c).await, 300, "a new database records the lease");
        // The table as an earlier release left it.
        c.batch_execute("ALTER TABLE tower_scale_shard_map DROP COLUMN lease_ms")
            .await
            .expect("drop");
    }
    drop(first);
    // This release's instance adds the column as 0: instances of the
    // earlier release may still move slots without the hold.
    let _upgraded = sharded(&locals, "lease_upgrade", |b| b, |b| b).await;
    for c in &clients {
        assert_eq!(recorded(c).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_claim_never_answers_a_leased_read() {
    // Clusters of its own: a paused replica would hold up the other
    // tests' databases on a shared one.
    let starts: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                Arc::new(
                    tower_scale::testing::LocalCluster::builder()
                        .replicas(1)
                        .start()
                        .expect("cluster"),
                )
            })
        })
        .collect();
    let locals: Vec<_> = starts
        .into_iter()
        .map(|s| s.join().expect("start"))
        .collect();
    database(&locals, "lease_floor").await;
    let sharded = sharded(&locals, "lease_floor", |b| b, |b| b).await;
    let key = (1i64..)
        .find(|k| sharded.shard_for(k).as_deref() == Some("shard-1"))
        .expect("a key");
    let slot = sharded.slot(&key);
    sharded
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'moved')",
            &[&key, &i32::from(slot)],
        )
        .await
        .expect("insert");
    locals[1]
        .wait_for_replicas(DEADLINE)
        .await
        .expect("replicas");
    // shard-2's replica stands still: it will not see the claim, nor the
    // row the move brings.
    let replica = locals[1].replica(0).connect().await.expect("replica");
    replica
        .execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .expect("pause");
    until("the replica's replay paused", DEADLINE, async || {
        let state: String = replica
            .query_one("SELECT pg_catalog.pg_get_wal_replay_pause_state()", &[])
            .await
            .expect("pause state")
            .get(0);
        state == "paused"
    })
    .await;
    move_with_rows(&sharded, slot, "shard-2").await;
    // This instance's map and lease are fresh; the replica is behind the
    // position its map read shard-2 at, so it never serves the read.
    for c in [
        ShardConsistency::Any,
        ShardConsistency::BoundedStaleness(DEADLINE),
    ] {
        let r = sharded.read(&key, &c, SQL, &[&key]).await.expect("read");
        assert_eq!(
            r.value.len(),
            1,
            "{c:?}: a false not-found from {}",
            r.served_by
        );
        assert_eq!(r.value[0].get::<_, String>(0), "moved");
        assert_eq!(&*r.shard, "shard-2");
    }
    replica
        .execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .expect("resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_heard_the_release_reads_the_old_owner_during_the_hold() {
    let locals = shared();
    database(&locals, "lease_hold").await;
    // 6 s leases: every move holds its claim 6.6 s; the listener's last
    // renewal before the release (every 250 ms) leaves it about 5.7 s to
    // read under the lease confirmed for the map from before.
    let lease = Duration::from_secs(6);
    let mover = sharded(
        &locals,
        "lease_hold",
        |b| b,
        |b| b.read_lease(lease).moved_wait(Duration::from_secs(15)),
    )
    .await;
    // Listening: it hears the release and has the slot fenced in its map.
    let listener = sharded(
        &locals,
        "lease_hold",
        |b| b,
        |b| {
            b.read_lease(lease)
                .lease_renewal(Duration::from_millis(250))
        },
    )
    .await;
    let clients = [
        client(&locals[0], "lease_hold").await,
        client(&locals[1], "lease_hold").await,
    ];
    let key = 9i64;
    let slot = mover.slot(&key);
    let from = mover.shard_for(&key).expect("owned").to_string();
    mover
        .write(
            &key,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'held')",
            &[&key, &i32::from(slot)],
        )
        .await
        .expect("insert");
    let moving = {
        let mover = mover.clone();
        let to = other(&from);
        tokio::spawn(async move { move_with_rows(&mover, slot, to).await })
    };
    let old = &clients[usize::from(from == "shard-2")];
    until("the listener hears the release", DEADLINE, async || {
        listener.map().fenced_by(slot) == Some(from.as_str())
    })
    .await;
    // Its map has no owner for the slot; the map from before the release
    // still routes it while the lease confirmed for that map holds (the
    // claim waits it out): the old owner answers, and the read does not
    // wait for the claim.
    let (value, shard) = name(&listener, key, &ShardConsistency::Strong).await;
    assert_eq!((value.as_str(), shard.as_str()), ("held", from.as_str()));
    assert!(
        fenced(old, slot).await,
        "the read returned before the claim (the old owner still holds the slot fenced)"
    );
    moving.await.expect("move");
    let (value, shard) = name(&listener, key, &ShardConsistency::Strong).await;
    assert_eq!((value.as_str(), shard.as_str()), ("held", other(&from)));
}
