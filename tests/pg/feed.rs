//! The change feed against a real primary with a streaming replica:
//! writes made outside the library (a plain tokio-postgres client) reach
//! the cache; tables without a replica identity stay writable; large
//! transactions and TRUNCATE; a dropped slot flushes every cache.

use std::time::{Duration, Instant};

use tower_scale::pg::feed::{ChangeFeed, FeedState, SlotKind};
use tower_scale::pg::{Consistency, DbCache, Query};
use tower_scale::testing::LocalCluster;

use crate::{DEADLINE, connect, until};

async fn table(local: &LocalCluster, sql: &str) -> tokio_postgres::Client {
    let plain = local.primary().connect().await.unwrap();
    plain.batch_execute(sql).await.unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    plain
}

fn by_id(id: i64) -> Query {
    Query::read("SELECT name FROM items WHERE id = $1", Consistency::Any)
        .bind(id)
        .for_key("items", id)
}

fn count() -> Query {
    Query::read("SELECT count(*)::int8 FROM items", Consistency::Any)
        .cache_key("items-count")
        .tag("items")
}

/// Reads until the cache answers (the replica has the row and the entry
/// is stored).
async fn cached(cache: &DbCache, q: impl Fn() -> Query) {
    until(
        "a cached entry",
        DEADLINE,
        async || matches!(cache.query(q()).await, Ok(out) if &*out.served_by == "cache"),
    )
    .await;
}

async fn gone(cache: &DbCache, q: impl Fn() -> Query) -> Duration {
    until(
        "the entry invalidated",
        DEADLINE,
        async || matches!(cache.query(q()).await, Ok(out) if &*out.served_by != "cache"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_plain_client_invalidates_the_row_and_the_table() {
    let local = LocalCluster::start(1).unwrap();
    let plain = table(
        &local,
        "CREATE TABLE items (id int8 PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'old' FROM generate_series(1, 10) g;",
    )
    .await;
    let cluster = connect(&local, |b| b).await;
    let cache = DbCache::builder(cluster.db())
        .time_to_live(Duration::from_secs(3600))
        .build()
        .unwrap();
    let feed = ChangeFeed::builder(&cluster)
        .tables(["items"])
        .invalidates(cache.invalidator().clone())
        .start()
        .await
        .unwrap();
    assert!(feed.streaming(DEADLINE).await, "{:?}", feed.status());
    assert_eq!(feed.status().flushes, 1, "a new slot flushes first");

    let mut delays = Vec::new();
    for round in 0..20i64 {
        let id = round % 10 + 1;
        cached(&cache, || by_id(id)).await;
        cached(&cache, count).await;
        let name = format!("new-{round}");
        plain
            .execute("UPDATE items SET name = $1 WHERE id = $2", &[&name, &id])
            .await
            .unwrap();
        delays.push(gone(&cache, || by_id(id)).await);
        gone(&cache, count).await;
        // The new value, once the replica has it: never the old one again
        // from the cache.
        until("the new name", DEADLINE, async || {
            let out = cache.query(by_id(id)).await.unwrap();
            out.rows.first().map(|r| r.get::<_, String>(0)) == Some(name.clone())
        })
        .await;
    }
    delays.sort();
    println!(
        "commit -> invalidation (plain client, polled): p50 {:?}, max {:?}",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    let status = feed.status();
    assert_eq!(status.state, FeedState::Streaming);
    assert!(status.transactions >= 20, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_stays_writable_and_is_reported() {
    let local = LocalCluster::start(0).unwrap();
    let plain = table(
        &local,
        "CREATE TABLE keyed (id int8 PRIMARY KEY, v text);
         CREATE TABLE loose (a int, b text);
         INSERT INTO loose VALUES (1, 'x'), (2, 'y');
         CREATE TABLE deferred (id int8 PRIMARY KEY DEFERRABLE, v text);
         INSERT INTO deferred VALUES (1, 'x');",
    )
    .await;
    let cluster = connect(&local, |b| b).await;
    let cache = DbCache::builder(cluster.db()).build().unwrap();
    let feed = ChangeFeed::builder(&cluster)
        .invalidates(cache.invalidator().clone())
        .start()
        .await
        .unwrap();
    assert!(feed.streaming(DEADLINE).await, "{:?}", feed.status());
    // Other writers' UPDATE and DELETE on it still succeed.
    plain
        .execute("UPDATE loose SET b = 'z' WHERE a = 1", &[])
        .await
        .unwrap();
    plain
        .execute("DELETE FROM loose WHERE a = 2", &[])
        .await
        .unwrap();
    plain
        .execute("UPDATE keyed SET v = 'z' WHERE id = 1", &[])
        .await
        .unwrap();
    let mut left_out: Vec<String> = feed.status().left_out.into_iter().map(|(t, _)| t).collect();
    left_out.sort();
    assert_eq!(left_out, ["deferred", "loose"]);
    // A named table that does not exist is refused at start.
    let err = ChangeFeed::builder(&cluster)
        .tables(["no_such_table"])
        .publication("other")
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_rows_and_a_truncate() {
    let local = LocalCluster::start(0).unwrap();
    let plain = table(
        &local,
        "CREATE TABLE items (id int8 PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'old' FROM generate_series(1, 10000) g;",
    )
    .await;
    let cluster = connect(&local, |b| b).await;
    let cache = DbCache::builder(cluster.db()).build().unwrap();
    let feed = ChangeFeed::builder(&cluster)
        .tables(["items"])
        .invalidates(cache.invalidator().clone())
        .start()
        .await
        .unwrap();
    assert!(feed.streaming(DEADLINE).await, "{:?}", feed.status());
    cached(&cache, || by_id(5)).await;
    cached(&cache, count).await;
    let before = feed.status().rows;
    plain
        .execute("UPDATE items SET name = 'new'", &[])
        .await
        .unwrap();
    gone(&cache, || by_id(5)).await;
    gone(&cache, count).await;
    until("10,000 rows applied", DEADLINE, async || {
        feed.status().rows >= before + 10_000
    })
    .await;
    cached(&cache, || by_id(5)).await;
    cached(&cache, count).await;
    plain.execute("TRUNCATE items", &[]).await.unwrap();
    gone(&cache, || by_id(5)).await;
    gone(&cache, count).await;
    let out = cache.query(by_id(5)).await.unwrap();
    assert!(out.rows.is_empty(), "the truncated row is still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_flushes_every_cache_and_the_feed_recovers() {
    let local = LocalCluster::start(0).unwrap();
    let plain = table(
        &local,
        "CREATE TABLE items (id int8 PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'old' FROM generate_series(1, 10) g;",
    )
    .await;
    let cluster = connect(&local, |b| b).await;
    let cache = DbCache::builder(cluster.db()).build().unwrap();
    let feed = ChangeFeed::builder(&cluster)
        .tables(["items"])
        .slot("dropped")
        .slot_kind(SlotKind::Permanent)
        .invalidates(cache.invalidator().clone())
        .start()
        .await
        .unwrap();
    assert!(feed.streaming(DEADLINE).await, "{:?}", feed.status());
    let flushes = feed.status().flushes;
    cached(&cache, || by_id(3)).await;
    // Drop the slot from under the feed (its session terminated first).
    until("the slot dropped", DEADLINE, async || {
        let _ = plain
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'dropped' AND active_pid IS NOT NULL",
                &[],
            )
            .await;
        plain
            .execute("SELECT pg_drop_replication_slot('dropped')", &[])
            .await
            .is_ok()
    })
    .await;
    // A change while no slot exists: nothing will stream it.
    plain
        .execute("UPDATE items SET name = 'unseen' WHERE id = 3", &[])
        .await
        .unwrap();
    until("the feed recovered", DEADLINE, async || {
        let s = feed.status();
        s.flushes > flushes && s.state == FeedState::Streaming
    })
    .await;
    let out = cache.query(by_id(3)).await.unwrap();
    assert_eq!(out.rows[0].get::<_, String>(0), "unseen");
    // And it streams again.
    cached(&cache, || by_id(3)).await;
    let started = Instant::now();
    plain
        .execute("UPDATE items SET name = 'seen' WHERE id = 3", &[])
        .await
        .unwrap();
    gone(&cache, || by_id(3)).await;
    println!("after recovery: invalidated in {:?}", started.elapsed());
    feed.drop_slot().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_follows_a_promotion_and_flushes_first() {
    let local = LocalCluster::start(1).unwrap();
    table(
        &local,
        "CREATE TABLE items (id int8 PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'old' FROM generate_series(1, 10) g;",
    )
    .await;
    let cluster = connect(&local, |b| b).await;
    let cache = DbCache::builder(cluster.db())
        .time_to_live(Duration::from_secs(3600))
        .build()
        .unwrap();
    let feed = ChangeFeed::builder(&cluster)
        .tables(["items"])
        .slot_kind(SlotKind::Permanent)
        .invalidates(cache.invalidator().clone())
        .start()
        .await
        .unwrap();
    assert!(feed.streaming(DEADLINE).await, "{:?}", feed.status());
    let flushes = feed.status().flushes;
    cached(&cache, || by_id(4)).await;
    local.primary().stop().unwrap();
    local.replica(0).promote().await.unwrap();
    // The new primary has no slot (PostgreSQL 15 has no failover slots):
    // a slot loss, so every cache is flushed before the feed streams there.
    until("the feed on the promoted replica", DEADLINE, async || {
        let s = feed.status();
        s.state == FeedState::Streaming
            && s.node.as_deref() == Some("replica-1")
            && s.flushes > flushes
    })
    .await;
    let plain = local.replica(0).connect().await.unwrap();
    cached(&cache, || by_id(4)).await;
    plain
        .execute("UPDATE items SET name = 'after' WHERE id = 4", &[])
        .await
        .unwrap();
    gone(&cache, || by_id(4)).await;
    let out = cache.query(by_id(4)).await.unwrap();
    assert_eq!(out.rows[0].get::<_, String>(0), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_logical_wal_is_refused_naming_the_setting() {
    let local = LocalCluster::builder()
        .replicas(0)
        .conf("wal_level = replica")
        .start()
        .unwrap();
    let cluster = connect(&local, |b| b).await;
    let err = ChangeFeed::builder(&cluster).start().await.unwrap_err();
    assert!(err.to_string().contains("wal_level = logical"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_resumes_without_a_flush_unless_its_creator_died_before_the_flush() {
    let local = LocalCluster::start(0).unwrap();
    let plain = table(
        &local,
        "CREATE TABLE items (id int8 PRIMARY KEY, name text NOT NULL);",
    )
    .await;
    let cluster = connect(&local, |b| b).await;
    let cache = DbCache::builder(cluster.db()).build().unwrap();
    let start = || {
        ChangeFeed::builder(&cluster)
            .tables(["items"])
            .slot("marked")
            .slot_kind(SlotKind::Permanent)
            .invalidates(cache.invalidator().clone())
            .start()
    };
    let first = start().await.unwrap();
    assert!(first.streaming(DEADLINE).await, "{:?}", first.status());
    assert_eq!(first.status().flushes, 1, "a new slot flushes");
    // Everything so far (its own flush message included) confirmed.
    let now: String = plain
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let now: tower_scale::pg::Lsn = now.parse().unwrap();
    until("the first holder confirmed", DEADLINE, async || {
        first.status().confirmed.is_some_and(|c| c >= now)
    })
    .await;
    let confirmed = first.status().confirmed.map(|c| c.to_string());
    first.shutdown();
    drop(first);
    // A stop reports what it confirmed to the server before it lets the
    // session go (the standby status goes out once a second otherwise).
    until(
        "the server has the confirmed position",
        DEADLINE,
        async || {
            let row = plain
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn AND NOT active \
                 FROM pg_replication_slots WHERE slot_name = 'marked'",
                    &[&confirmed],
                )
                .await
                .unwrap();
            row.get::<_, bool>(0)
        },
    )
    .await;
    // The same slot again: it resumes, nothing to flush.
    let second = start().await.unwrap();
    assert!(second.streaming(DEADLINE).await, "{:?}", second.status());
    assert_eq!(second.status().flushes, 0, "a resumed slot flushed");
    second.shutdown();
    drop(second);
    // As left by a holder killed between making the slot and writing its
    // flush: the next holder flushes.
    plain
        .batch_execute(
            "COMMENT ON PUBLICATION tower_scale_feed IS 'tower-scale-feed: flush pending for slot marked'",
        )
        .await
        .unwrap();
    let third = start().await.unwrap();
    assert!(third.streaming(DEADLINE).await, "{:?}", third.status());
    assert!(third.status().flushes >= 1, "{:?}", third.status());
    let comment: Option<String> = plain
        .query_one(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = 'tower_scale_feed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        comment, None,
        "the marker is cleared once the flush is written"
    );
    third.drop_slot().await.unwrap();
}
