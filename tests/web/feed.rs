//! The change feed in the users service, as real processes sharing one
//! Redis: a row changed with plain SQL is seen on every instance; the
//! holder killed with SIGKILL while rows change, the other instance takes
//! over and misses nothing.

use std::time::{Duration, Instant};

use tower_scale::testing::{LocalCluster, LocalRedis};

use crate::{Client2, KEY, name, start_users};

const DEADLINE: Duration = Duration::from_secs(30);

async fn is_holder(addr: &str) -> bool {
    crate::get_text(addr, "/metrics")
        .await
        .lines()
        .any(|l| l.starts_with("tower_scale_feed_holder{") && l.trim_end().ends_with(" 1"))
}

async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond().await {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_write_reaches_every_instance_and_a_killed_holder_loses_nothing() {
    let local = LocalCluster::start(1).unwrap();
    let redis = LocalRedis::start().unwrap();
    let flags = ["--redis".to_string(), redis.url()];
    let mut a = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    until("A holds the feed", async || is_holder(&a.addr).await).await;
    let b = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    let plain = local.primary().connect().await.unwrap();
    let ids: Vec<i64> = plain
        .query(
            "INSERT INTO users (name) SELECT 'old-' || g FROM generate_series(1, 1000) g RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    // Tokenless clients: only an invalidation can make them see a change.
    let mut client = Client2::new(false);
    assert!(!is_holder(&b.addr).await, "two holders");

    // A row changed with plain SQL, seen on both instances.
    let probe = ids[0];
    let path = format!("/users/{probe}");
    for addr in [&a.addr, &b.addr] {
        until("the probe cached", async || {
            client.send(addr, "GET", &path, None, &[]).await.served_by == "cache"
        })
        .await;
    }
    plain
        .execute(
            "UPDATE users SET name = 'from-psql' WHERE id = $1",
            &[&probe],
        )
        .await
        .unwrap();
    let committed = Instant::now();
    for (label, addr) in [("A (holder)", &a.addr), ("B", &b.addr)] {
        until("the SQL write seen", async || {
            name(&client.send(addr, "GET", &path, None, &[]).await) == Some("from-psql")
        })
        .await;
        println!(
            "plain SQL UPDATE seen by a tokenless GET on {label} {:?} after the commit",
            committed.elapsed()
        );
    }

    // Pre-fill B's L1 and the shared L2 with every row's old value.
    let filled = Instant::now();
    for id in &ids[1..] {
        let r = client
            .send(&b.addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        assert_eq!(r.status, 200);
    }
    // Update every row, one transaction each; SIGKILL the holder after a
    // fifth of them.
    let mut takeover = None;
    for (i, id) in ids[1..].iter().enumerate() {
        if i == ids.len() / 5 {
            a.child.kill().unwrap();
            a.child.wait().unwrap();
            let killed = Instant::now();
            let addr = b.addr.clone();
            takeover = Some(tokio::spawn(async move {
                while !is_holder(&addr).await {
                    assert!(killed.elapsed() < DEADLINE, "B never took over");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                killed.elapsed()
            }));
        }
        plain
            .execute("UPDATE users SET name = 'new-' || id WHERE id = $1", &[id])
            .await
            .unwrap();
    }
    let takeover = takeover.unwrap().await.unwrap();
    println!("takeover: B holds the feed {takeover:?} after A was killed (SIGKILL)");
    // A sentinel committed after every update: once B shows it, the feed
    // applied everything before it (commit order).
    plain
        .execute(
            "UPDATE users SET name = 'sentinel' WHERE id = $1",
            &[&probe],
        )
        .await
        .unwrap();
    until("the sentinel seen on B", async || {
        name(&client.send(&b.addr, "GET", &path, None, &[]).await) == Some("sentinel")
    })
    .await;
    local.wait_for_replicas(DEADLINE).await.unwrap();
    // A new instance reads through the same L2.
    let c = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    let mut stale = Vec::new();
    for id in &ids[1..] {
        let want = format!("new-{id}");
        for addr in [&b.addr, &c.addr] {
            let r = client
                .send(addr, "GET", &format!("/users/{id}"), None, &[])
                .await;
            if name(&r) != Some(want.as_str()) {
                stale.push((*id, addr.clone(), r.served_by.clone(), r.body.clone()));
            }
        }
    }
    // The check is meaningful only while the old entries could still be
    // alive (the service's TTL is 60 s).
    assert!(
        filled.elapsed() < Duration::from_secs(60),
        "took too long to mean anything"
    );
    assert!(
        stale.is_empty(),
        "{} stale reads: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_holder_is_replaced_and_nothing_is_missed() {
    let local = LocalCluster::start(1).unwrap();
    let redis = LocalRedis::start().unwrap();
    let flags = ["--redis".to_string(), redis.url()];
    let a = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    until("A holds the feed", async || is_holder(&a.addr).await).await;
    let b = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    let plain = local.primary().connect().await.unwrap();
    let id: i64 = plain
        .query_one(
            "INSERT INTO users (name) VALUES ('before') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    local.wait_for_replicas(DEADLINE).await.unwrap();
    let mut client = Client2::new(false);
    let path = format!("/users/{id}");
    until("cached on B", async || {
        client
            .send(&b.addr, "GET", &path, None, &[])
            .await
            .served_by
            == "cache"
    })
    .await;
    // A stalls (its process stopped, its connections open): the server
    // ends its replication session after the stall timeout, and the lease
    // with it.
    let pid = a.child.id().to_string();
    let signal = |s: &str| {
        let ok = std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    signal("-STOP");
    let stalled = Instant::now();
    plain
        .execute("UPDATE users SET name = 'during' WHERE id = $1", &[&id])
        .await
        .unwrap();
    until("B takes over", async || is_holder(&b.addr).await).await;
    let takeover = stalled.elapsed();
    until("the change made during the stall seen on B", async || {
        name(&client.send(&b.addr, "GET", &path, None, &[]).await) == Some("during")
    })
    .await;
    println!("takeover from a stalled holder: {takeover:?} (stall timeout 5 s)");
    signal("-CONT");
    // A comes back and stands by: one holder.
    until("A stands by", async || !is_holder(&a.addr).await).await;
    assert!(is_holder(&b.addr).await, "no holder after A came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_logical_wal_gets_one_warning_and_the_service_runs() {
    use std::io::{BufRead, BufReader, Read};
    let local = LocalCluster::builder()
        .replicas(0)
        .conf("wal_level = replica")
        .start()
        .unwrap();
    let mut child = std::process::Command::new(crate::common::example("axum_users"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--primary",
            &local.primary().url(),
        ])
        .args(["--token-key", KEY])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line was {line:?}"))
        .to_string();
    let mut client = Client2::new(false);
    let created = client
        .send(
            &addr,
            "POST",
            "/users",
            Some(serde_json::json!({ "name": "w" })),
            &[],
        )
        .await;
    assert_eq!(created.status, 201);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("wal_level")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("wal_level = logical"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_flushes_every_instance_and_the_shared_tier() {
    let local = LocalCluster::start(1).unwrap();
    let redis = LocalRedis::start().unwrap();
    let flags = ["--redis".to_string(), redis.url()];
    let a = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    until("A holds the feed", async || is_holder(&a.addr).await).await;
    let b = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    let plain = local.primary().connect().await.unwrap();
    let id: i64 = plain
        .query_one("INSERT INTO users (name) VALUES ('old') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    local.wait_for_replicas(DEADLINE).await.unwrap();
    let mut client = Client2::new(false);
    let path = format!("/users/{id}");
    until("cached on B (L1 and L2)", async || {
        client
            .send(&b.addr, "GET", &path, None, &[])
            .await
            .served_by
            == "cache"
    })
    .await;
    // The slot goes (its session terminated first), and a change is made
    // while no slot exists: no stream will carry it.
    until("the slot dropped", async || {
        let _ = plain
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = 'tower_scale_users' AND active_pid IS NOT NULL",
                &[],
            )
            .await;
        plain
            .execute("SELECT pg_drop_replication_slot('tower_scale_users')", &[])
            .await
            .is_ok()
    })
    .await;
    plain
        .execute("UPDATE users SET name = 'unseen' WHERE id = $1", &[&id])
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    // The new slot's flush reaches B's L1 and the shared tier.
    until("B reads the change", async || {
        name(&client.send(&b.addr, "GET", &path, None, &[]).await) == Some("unseen")
    })
    .await;
    let c = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &flags));
    let r = client.send(&c.addr, "GET", &path, None, &[]).await;
    assert_eq!(name(&r), Some("unseen"), "served by {}", r.served_by);
    let again = client.send(&b.addr, "GET", &path, None, &[]).await;
    assert_eq!(name(&again), Some("unseen"));
}
