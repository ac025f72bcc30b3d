//! Moves stopped (aborted, or their process killed with SIGKILL) during
//! the copy, the catch-up or between the release and the claim, rolled
//! back and resumed; values the stream leaves out (TOAST) and primary keys
//! it changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tower_scale::shard::ShardedCluster;
use tower_scale::shard::reshard::{MoveOptions, MovePhase};
use tower_scale::testing::LocalCluster;

use super::{MOVING, moving, no_move_slots, owned_moving, preload, rows, shard1_keys};
use crate::{DEADLINE, client, database, sharded, shared, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stopped_mid_copy_rolls_back_clean_then_resumes() {
    let locals = shared();
    database(&locals, "reshard_rollback").await;
    let sharded = sharded(
        &locals,
        "reshard_rollback",
        |b| b,
        |b| b.table("items", "id"),
    )
    .await;
    let clients = [
        client(&locals[0], "reshard_rollback").await,
        client(&locals[1], "reshard_rollback").await,
    ];
    let preloaded = shard1_keys(1, 3_000);
    preload(&clients[0], &preloaded).await;
    let version = sharded.map().version();

    // Slow enough to be stopped half way.
    let handle = sharded
        .move_slots_with(
            MOVING,
            "shard-2",
            MoveOptions::default().copy_rate(1_000).batch(100),
        )
        .await
        .expect("move starts");
    let id = handle.id().to_owned();
    let mut progress = handle.subscribe();
    tokio::time::timeout(DEADLINE, progress.wait_for(|p| p.rows_copied > 0))
        .await
        .expect("copying within the deadline")
        .expect("progress");
    handle.abort().await;
    let partial = rows(&clients[1]).await.len();
    assert!(partial > 0 && partial < preloaded.iter().filter(|k| moving(**k)).count());
    let phase: String = clients[1]
        .query_one(
            "SELECT phase FROM tower_scale_shard_moves WHERE id = $1",
            &[&id],
        )
        .await
        .expect("record")
        .get(0);
    assert_eq!(phase, "copying", "the partial copy is marked");
    assert_eq!(
        sharded.refresh().await.unwrap().version(),
        version,
        "map unchanged"
    );

    // A second move of those slots is refused while this one is unfinished.
    let refused = sharded.move_slots(MOVING, "shard-2").await.unwrap_err();
    assert!(refused.to_string().contains(&id), "{refused}");

    sharded.rollback_move(&id).await.expect("rollback");
    assert!(rows(&clients[1]).await.is_empty(), "the target is clean");
    no_move_slots(&clients[0]).await;
    assert_eq!(rows(&clients[0]).await.len(), preloaded.len());

    // Resumed (a new snapshot): the move completes.
    let report = sharded
        .resume_move(&id, MoveOptions::default())
        .await
        .expect("resume")
        .wait()
        .await
        .expect("resumed move succeeds");
    let on = [rows(&clients[0]).await, rows(&clients[1]).await];
    let moved = preloaded.iter().filter(|k| moving(**k)).count();
    assert_eq!(report.rows_copied as usize, moved);
    assert_eq!(on[1].len(), moved);
    assert_eq!(on[0].len(), preloaded.len() - moved);
    assert!(on[1].keys().all(|k| moving(*k)));
    no_move_slots(&clients[0]).await;
    println!("resumed move {id}: {report:?}");
}

/// Not a test on its own (ignored): the process a SIGKILL test kills. It
/// does nothing unless `RESHARD_CHILD` is set (to `copy` or `catch_up`), with
/// `RESHARD_PORTS` (the shards' primary ports) and `RESHARD_DB`; then it
/// starts a move of [`MOVING`] and prints its phases until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the process the SIGKILL test starts and kills (RESHARD_CHILD)"]
async fn killed_child() {
    let Ok(mode) = std::env::var("RESHARD_CHILD") else {
        return;
    };
    let ports = std::env::var("RESHARD_PORTS").expect("RESHARD_PORTS");
    let db = std::env::var("RESHARD_DB").expect("RESHARD_DB");
    let mut builder = ShardedCluster::builder().table("items", "id");
    for (i, port) in ports.split(',').enumerate() {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port.parse().expect("port"))
            .user("postgres")
            .dbname(&db);
        let cluster = tower_scale::pg::Cluster::builder()
            .primary(tower_scale::pg::NodeConfig::new(config).name(format!("child-{i}")))
            .build()
            .await
            .expect("cluster");
        builder = builder.shard(format!("shard-{}", i + 1), cluster);
    }
    let sharded = builder.build().await.expect("sharded");
    let options = match mode.as_str() {
        "copy" => MoveOptions::default().copy_rate(1_000).batch(100),
        // Caught up, waiting for a cut_over that never comes.
        _ => MoveOptions::default().manual_cutover(true),
    };
    let handle = sharded
        .move_slots_with(MOVING, "shard-2", options)
        .await
        .expect("move");
    println!("CHILD move {}", handle.id());
    let mut progress = handle.subscribe();
    loop {
        let p = progress.borrow_and_update().clone();
        println!(
            "CHILD phase {} copied {} applied {}",
            p.phase, p.rows_copied, p.rows_applied
        );
        if progress.changed().await.is_err() {
            break;
        }
    }
    println!("CHILD ended: {:?}", handle.wait().await);
}

/// Runs [`killed_child`] in a child process in `mode` and kills it
/// (SIGKILL) once `ready` accepts one of its lines; returns the move id.
async fn run_and_kill(
    locals: &[Arc<LocalCluster>],
    db: &str,
    mode: &str,
    ready: impl Fn(&str) -> bool,
) -> String {
    use tokio::io::AsyncBufReadExt;
    let ports: Vec<String> = locals
        .iter()
        .map(|l| l.primary().port().to_string())
        .collect();
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "reshard::faults::killed_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RESHARD_CHILD", mode)
        .env("RESHARD_PORTS", ports.join(","))
        .env("RESHARD_DB", db)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("child");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut id = String::new();
    let seen = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            // The harness prints its test line without a newline first.
            if let Some(at) = line.find("CHILD move ") {
                id = line[at + "CHILD move ".len()..].to_owned();
            }
            assert!(
                !line.starts_with("CHILD ended"),
                "the child's move ended: {line}"
            );
            if ready(&line) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "the child reached the point to be killed at"
    );
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("wait");
    assert!(!status.success(), "killed: {status:?}");
    assert!(!id.is_empty());
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_killed_during_copy_or_catch_up_changes_nothing_and_resumes() {
    let locals = shared();
    for mode in ["copy", "catch_up"] {
        let db = format!("reshard_kill_{mode}");
        database(&locals, &db).await;
        let sharded = sharded(&locals, &db, |b| b, |b| b.table("items", "id")).await;
        let clients = [client(&locals[0], &db).await, client(&locals[1], &db).await];
        let preloaded = shard1_keys(1, 3_000);
        preload(&clients[0], &preloaded).await;
        let mut expected: HashMap<i64, String> =
            preloaded.iter().map(|k| (*k, format!("pre-{k}"))).collect();
        let version = sharded.map().version();

        // Writes to moving keys while the child runs (and is killed).
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (sharded, stop) = (sharded.clone(), Arc::clone(&stop));
            let keys: Vec<i64> = preloaded.iter().copied().filter(|k| moving(*k)).collect();
            tokio::spawn(async move {
                let mut written = HashMap::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let key = keys[n % keys.len()];
                    n += 1;
                    let name = format!("w-{n}");
                    let w = sharded
                        .write(
                            &key,
                            "UPDATE items SET name = $2 WHERE id = $1 RETURNING id",
                            &[&key, &name],
                        )
                        .await
                        .expect("a write while the move is killed");
                    assert_eq!(w.value.len(), 1);
                    written.insert(key, name);
                }
                written
            })
        };
        // Killed once the copy wrote rows, or once the stream applied some.
        let id = run_and_kill(&locals, &db, mode, |line| {
            let words: Vec<&str> = line.split(' ').collect();
            match (mode, words.as_slice()) {
                ("copy", ["CHILD", "phase", "copying", "copied", n, ..]) => *n != "0",
                ("catch_up", ["CHILD", "phase", "catching_up", .., "applied", n]) => *n != "0",
                _ => false,
            }
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        expected.extend(writer.await.expect("writer"));

        // Killed: the map and the ownership tables unchanged, the partial
        // copy marked, the temporary slot gone with its session.
        assert_eq!(
            sharded.refresh().await.unwrap().version(),
            version,
            "{mode}"
        );
        assert_eq!(
            owned_moving(&clients).await,
            vec![MOVING.len() as i64, 0],
            "{mode}"
        );
        let phase: String = clients[1]
            .query_one(
                "SELECT phase FROM tower_scale_shard_moves WHERE id = $1",
                &[&id],
            )
            .await
            .expect("record")
            .get(0);
        let partial = rows(&clients[1]).await.len();
        println!("{mode}: killed move {id} in phase {phase} with {partial} rows on the target");
        assert!(partial > 0, "{mode}: a partial copy on the target");
        let marked = if mode == "copy" {
            "copying"
        } else {
            "catching_up"
        };
        assert_eq!(phase, marked, "{mode}: the partial copy is marked");
        until("the killed move's slot dropped", DEADLINE, async || {
            let n: i64 = clients[0]
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'tower\\_scale\\_move\\_%'",
                    &[],
                )
                .await
                .expect("slots")
                .get(0);
            n == 0
        })
        .await;

        let report = sharded
            .resume_move(&id, MoveOptions::default())
            .await
            .expect("resume")
            .wait()
            .await
            .expect("the resumed move succeeds");
        assert_eq!(
            owned_moving(&clients).await,
            vec![0, MOVING.len() as i64],
            "{mode}"
        );
        let on = [rows(&clients[0]).await, rows(&clients[1]).await];
        for (key, name) in &expected {
            let (owner, other) = if moving(*key) { (1, 0) } else { (0, 1) };
            assert_eq!(on[owner].get(key), Some(name), "{mode}: key {key}");
            assert!(!on[other].contains_key(key), "{mode}: key {key} on both");
        }
        assert_eq!(on[0].len() + on[1].len(), expected.len(), "{mode}");
        no_move_slots(&clients[0]).await;
        println!("{mode}: resumed: {report:?}");
    }
}

/// On database `db`: a move copied and caught up, then put in the state a
/// death between its cutover's two commits leaves: the source's fence
/// committed (with its record), no claim. Returns the sharded cluster,
/// clients of both primaries, the move's id and the preloaded keys.
/// Also returns the shared clusters: the servers stop when the last
/// holder of them lets go (the set-up's own copy is dropped on return).
async fn died_in_transit(
    db: &str,
) -> (
    Vec<std::sync::Arc<tower_scale::testing::LocalCluster>>,
    tower_scale::shard::ShardedCluster,
    [tokio_postgres::Client; 2],
    String,
    Vec<i64>,
) {
    let locals = shared();
    database(&locals, db).await;
    let sharded = sharded(&locals, db, |b| b, |b| b.table("items", "id")).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    let preloaded = shard1_keys(1, 2_000);
    preload(&clients[0], &preloaded).await;
    let handle = sharded
        .move_slots_with(
            MOVING,
            "shard-2",
            MoveOptions::default().manual_cutover(true),
        )
        .await
        .expect("move");
    let id = handle.id().to_owned();
    let mut progress = handle.subscribe();
    tokio::time::timeout(
        DEADLINE,
        progress.wait_for(|p| p.phase == MovePhase::CatchingUp),
    )
    .await
    .expect("caught up in time")
    .expect("progress");
    handle.abort().await;
    let (first, last) = (i32::from(MOVING.first), i32::from(MOVING.last));
    clients[0]
        .execute(
            "UPDATE tower_scale_shard_slots SET fenced = true WHERE slot BETWEEN $1 AND $2",
            &[&first, &last],
        )
        .await
        .expect("fence");
    clients[0]
        .execute(
            "UPDATE tower_scale_shard_moves SET phase = 'released' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("record");
    let map = sharded.refresh().await.expect("refresh");
    assert_eq!(
        map.owner(MOVING.first),
        None,
        "in transit: nobody serves it"
    );
    assert_eq!(map.fenced_by(MOVING.first), Some("shard-1"), "one holder");
    // The tables: the source lists every slot of the range, the target none.
    assert_eq!(owned_moving(&clients).await, vec![MOVING.len() as i64, 0]);
    (locals, sharded, clients, id, preloaded)
}

async fn phases(clients: &[tokio_postgres::Client], id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in clients {
        out.push(
            c.query_one(
                "SELECT phase FROM tower_scale_shard_moves WHERE id = $1",
                &[&id],
            )
            .await
            .expect("record")
            .get(0),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_died_between_fence_and_claim_resumes_to_the_target() {
    let (_locals, sharded, clients, id, preloaded) = died_in_transit("reshard_transit").await;
    let report = sharded
        .resume_move(&id, MoveOptions::default())
        .await
        .expect("resume")
        .wait()
        .await
        .expect("the claim finishes");
    assert_eq!(owned_moving(&clients).await, vec![0, MOVING.len() as i64]);
    let on = [rows(&clients[0]).await, rows(&clients[1]).await];
    let moved = preloaded.iter().filter(|k| moving(**k)).count();
    assert_eq!((on[0].len(), on[1].len()), (preloaded.len() - moved, moved));
    assert_eq!(report.rows_cleaned as usize, moved);
    assert_eq!(phases(&clients, &id).await, vec!["done", "done"]);
    no_move_slots(&clients[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_died_between_fence_and_claim_rolls_back_to_the_source() {
    let (_locals, sharded, clients, id, preloaded) = died_in_transit("reshard_transit_back").await;
    sharded.rollback_move(&id).await.expect("rollback");
    // The source serves the range again with every row; the target holds
    // neither the range nor a row of it.
    assert_eq!(owned_moving(&clients).await, vec![MOVING.len() as i64, 0]);
    let map = sharded.map();
    assert_eq!(map.owner(MOVING.first), Some("shard-1"));
    assert_eq!(map.fenced_by(MOVING.first), None);
    assert_eq!(rows(&clients[0]).await.len(), preloaded.len());
    assert!(rows(&clients[1]).await.is_empty());
    let key = *preloaded
        .iter()
        .find(|k| moving(**k))
        .expect("a moving key");
    let w = sharded
        .write(
            &key,
            "UPDATE items SET name = 'back' WHERE id = $1",
            &[&key],
        )
        .await
        .expect("write");
    assert_eq!(&*w.shard, "shard-1");
    assert_eq!(
        phases(&clients, &id).await,
        vec!["rolled_back", "rolled_back"]
    );
    no_move_slots(&clients[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toasted_values_and_primary_key_changes_streamed_during_the_catch_up_arrive_intact() {
    let locals = shared();
    let db = "reshard_toast";
    database(&locals, db).await;
    let clients = [client(&locals[0], db).await, client(&locals[1], db).await];
    for c in &clients {
        c.batch_execute(
            "CREATE TABLE docs (id int8 PRIMARY KEY, big text NOT NULL, n int4 NOT NULL); \
             CREATE TABLE notes (id int8 PRIMARY KEY, user_id int8 NOT NULL, body text NOT NULL)",
        )
        .await
        .expect("tables");
    }
    let keys: Vec<i64> = shard1_keys(1, 400)
        .into_iter()
        .filter(|k| moving(*k))
        .take(10)
        .collect();
    // ~22 KB of hex per row: stored out of line (TOASTed), so an UPDATE of
    // another column streams it as "unchanged".
    clients[0]
        .execute(
            "INSERT INTO docs SELECT k, (SELECT string_agg(md5(random()::text || g), '') \
             FROM generate_series(1, 700) g WHERE k IS NOT NULL), 0 FROM unnest($1::int8[]) k",
            &[&keys],
        )
        .await
        .expect("docs");
    // Note 1's body is TOASTed too: its primary key changes during the
    // catch-up, the body streamed as "unchanged".
    clients[0]
        .execute(
            "INSERT INTO notes VALUES (1, $1, (SELECT string_agg(md5(random()::text || g), '') \
             FROM generate_series(1, 700) g))",
            &[&keys[0]],
        )
        .await
        .expect("note");
    let body: String = clients[0]
        .query_one("SELECT md5(body) FROM notes WHERE id = 1", &[])
        .await
        .expect("body")
        .get(0);
    // Rows whose shard key an update takes out of the range during the
    // catch-up: a note (shard key outside its primary key) and an item
    // (the shard key is its primary key).
    let staying = *shard1_keys(1, 400)
        .iter()
        .find(|k| !moving(**k))
        .expect("a key that stays");
    clients[0]
        .execute("INSERT INTO notes VALUES (2, $1, 'leaves')", &[&keys[1]])
        .await
        .expect("note 2");
    clients[0]
        .execute(
            "INSERT INTO items (id, slot, name) VALUES ($1, 0, 'leaves')",
            &[&keys[2]],
        )
        .await
        .expect("item");
    let before = digests(&clients[0]).await;
    let sharded = sharded(
        &locals,
        db,
        |b| b,
        |b| {
            b.table("items", "id")
                .table("docs", "id")
                .table("notes", "user_id")
        },
    )
    .await;
    let handle = sharded
        .move_slots_with(
            MOVING,
            "shard-2",
            MoveOptions::default().manual_cutover(true),
        )
        .await
        .expect("move");
    let mut progress = handle.subscribe();
    tokio::time::timeout(
        DEADLINE,
        progress.wait_for(|p| p.phase == MovePhase::CatchingUp),
    )
    .await
    .expect("catching up in time")
    .expect("progress");
    // Streamed, not copied: an update leaving the big value untouched, and
    // a note whose primary key changes.
    for key in &keys {
        sharded
            .write(key, "UPDATE docs SET n = n + 1 WHERE id = $1", &[key])
            .await
            .expect("update");
    }
    sharded
        .write(&keys[0], "UPDATE notes SET id = 1000 WHERE id = 1", &[])
        .await
        .expect("a new primary key");
    clients[0]
        .execute("UPDATE notes SET user_id = $1 WHERE id = 2", &[&staying])
        .await
        .expect("a note's shard key out of the range");
    clients[0]
        .execute(
            "UPDATE items SET id = $1 WHERE id = $2",
            &[&staying, &keys[2]],
        )
        .await
        .expect("an item's key out of the range");
    tokio::time::timeout(
        DEADLINE,
        progress.wait_for(|p| p.rows_applied > keys.len() as u64),
    )
    .await
    .expect("applied in time")
    .expect("progress");
    handle.cut_over();
    handle.wait().await.expect("the move succeeds");
    let after = digests(&clients[1]).await;
    let expected: Vec<_> = before
        .into_iter()
        .map(|(id, d, n)| (id, d, n + 1))
        .collect();
    assert_eq!(after, expected, "big values intact, the small one updated");
    assert!(digests(&clients[0]).await.is_empty());
    let ids: Vec<i64> = clients[1]
        .query("SELECT id FROM notes", &[])
        .await
        .expect("notes")
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1000], "the old key gone, the new one there");
    let moved_body: String = clients[1]
        .query_one("SELECT md5(body) FROM notes WHERE id = 1000", &[])
        .await
        .expect("the renamed note keeps its body")
        .get(0);
    assert_eq!(moved_body, body);
    // The rows that left the range: on the source only (before the fix the
    // target kept them, with their old shard keys, after the cleanup).
    let source_notes: Vec<(i64, i64)> = clients[0]
        .query("SELECT id, user_id FROM notes ORDER BY id", &[])
        .await
        .expect("notes")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(source_notes, vec![(2, staying)]);
    assert_eq!(
        rows(&clients[0]).await.keys().copied().collect::<Vec<_>>(),
        vec![staying]
    );
    assert!(
        rows(&clients[1]).await.is_empty(),
        "no ghost item on the target"
    );
}

/// `docs` on a shard: (id, md5 of `big`, n), by id.
async fn digests(c: &tokio_postgres::Client) -> Vec<(i64, String, i32)> {
    c.query("SELECT id, md5(big), n FROM docs ORDER BY id", &[])
        .await
        .expect("digests")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}
