//! `DbCache`: the database cache with no policy to write keeps
//! read-your-writes through a lagging replica (issue 14).

use std::time::Duration;

use tower_scale::pg::{Consistency, ConsistencyToken, DbCache, Query};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, connect};

const SQL: &str = "SELECT name FROM cached_items WHERE id = $1";

fn read(consistency: Consistency) -> Query {
    Query::read(SQL, consistency)
        .bind(1i64)
        .for_key("cached_items", 1)
}

async fn name_of(cache: &DbCache, consistency: Consistency) -> (String, String) {
    let out = cache.query(read(consistency)).await.expect("read");
    let row = out.rows.first().expect("the row");
    (row.get::<_, String>(0), out.served_by.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_cache_keeps_read_your_writes_through_a_lagging_replica() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .expect("LocalCluster");
    let cluster = connect(&local, |b| b).await;
    let db = cluster.db();
    db.execute(
        "CREATE TABLE cached_items (id bigint primary key, name text not null)",
        &[],
    )
    .await
    .expect("table");
    db.execute("INSERT INTO cached_items VALUES (1, 'v-1')", &[])
        .await
        .expect("row");
    local.wait_for_replicas(DEADLINE).await.expect("replica");
    // The new user's cache: no policy, a TTL long enough to serve stale
    // data if the stamps did not keep it out.
    let cache = DbCache::builder(db)
        .time_to_live(Duration::from_secs(600))
        .build()
        .expect("cache");
    let (mut stale_any, mut older_token_hits) = (0, 0);
    let mut previous: Option<ConsistencyToken> = None;
    for i in 0..200 {
        let name = format!("v{i}");
        let w = cache
            .query(
                Query::write("UPDATE cached_items SET name = $1 WHERE id = $2")
                    .bind(name.clone())
                    .bind(1i64)
                    .for_key("cached_items", 1),
            )
            .await
            .expect("write");
        let token = w.token.expect("a write's token");
        // Tokenless: may be stale (the replica is a second behind).
        let (any, _) = name_of(&cache, Consistency::Any).await;
        if any != name {
            stale_any += 1;
        }
        // The writer's token: its write, every time.
        let (mine, by) = name_of(&cache, Consistency::ReadYourWrites(token)).await;
        assert_eq!(
            mine, name,
            "pair {i}: the token read missed its write ({by})"
        );
        // An older token is satisfied by what the newer read stored.
        if let Some(older) = previous {
            let (seen, by) = name_of(&cache, Consistency::ReadYourWrites(older)).await;
            assert!(
                seen == name || seen == format!("v{}", i - 1),
                "pair {i}: an older token read {seen}"
            );
            if by == "cache" {
                older_token_hits += 1;
            }
        }
        previous = Some(token);
    }
    // The replica catches up: a tokenless read sees the last write (no
    // fill from the lagging replica was stored over it).
    local.wait_for_replicas(DEADLINE).await.expect("replica");
    let (last, by) = name_of(&cache, Consistency::Any).await;
    assert_eq!(last, "v199", "a stale row came back ({by})");
    let stats = cache.stats();
    eprintln!(
        "DbCache over a replica 1 s behind: 200/200 token reads saw their write; \
         {stale_any}/200 tokenless reads were stale; {older_token_hits}/199 older-token \
         reads were cache hits; {} fills kept out by a write's stamp",
        stats.not_stored
    );
    assert!(
        stale_any > 0,
        "no tokenless read was stale: the test could not fail"
    );
    assert!(older_token_hits > 0, "older tokens never hit the cache");
    assert!(
        stats.not_stored > 0,
        "no stale fill was kept out: the test could not fail"
    );
}

/// What is cached, under which key, and what a token asks of an entry.
#[test]
fn the_policy_keys_reads_by_statement_and_name_and_leaves_the_rest_alone() {
    use tower_scale::cache::CachePolicy;
    use tower_scale::pg::{Lsn, QueryPolicy};
    let p = QueryPolicy;
    let name =
        Query::read("SELECT name FROM users WHERE id = $1", Consistency::Any).for_key("users", 7);
    let email =
        Query::read("SELECT email FROM users WHERE id = $1", Consistency::Any).for_key("users", 7);
    assert_ne!(p.key(&name), p.key(&email), "two statements under one name");
    // One statement, one key name, other parameters: other keys (the key
    // name is the caller's, the parameters decide what the row is).
    let docs = "SELECT body FROM docs WHERE id = $1 AND owner = $2";
    let alice = Query::read(docs, Consistency::Any)
        .bind(7i64)
        .bind("alice")
        .for_key("docs", 7);
    let bob = Query::read(docs, Consistency::Any)
        .bind(7i64)
        .bind("bob")
        .for_key("docs", 7);
    assert_ne!(p.key(&alice), p.key(&bob), "alice's row answered bob");
    assert!(
        p.key(&Query::read(SQL, Consistency::Any)).is_none(),
        "no cache_key: not cached"
    );
    assert!(
        p.key(&Query::read(SQL, Consistency::Strong).for_key("t", 1))
            .is_none()
    );
    let bounded = Consistency::BoundedStaleness(Duration::from_secs(1));
    assert!(p.key(&Query::read(SQL, bounded).for_key("t", 1)).is_none());
    assert!(
        p.key(&Query::write("UPDATE t SET a = 1").for_key("t", 1))
            .is_none()
    );
    let token = ConsistencyToken::new(Lsn(42));
    let ryw = Query::read(SQL, Consistency::ReadYourWrites(token)).for_key("t", 1);
    assert_eq!(p.min_version(&ryw), Some(42));
    let unknown = Query::read(
        SQL,
        Consistency::ReadYourWrites(ConsistencyToken::unknown()),
    )
    .for_key("t", 1);
    assert_eq!(
        p.min_version(&unknown),
        Some(u64::MAX),
        "no entry serves the unknown token"
    );
    assert_eq!(p.min_version(&name), None);
}

/// A read named with `cache_key` alone (no tag) is invalidated by a write
/// tagged with that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_named_without_a_tag_is_invalidated_by_its_name() {
    let local = LocalCluster::start(0).expect("LocalCluster");
    let cluster = connect(&local, |b| b).await;
    let db = cluster.db();
    db.execute("CREATE TABLE named (id bigint primary key, v text)", &[])
        .await
        .expect("table");
    db.execute("INSERT INTO named VALUES (1, 'old')", &[])
        .await
        .expect("row");
    let cache = DbCache::builder(db).build().expect("cache");
    let read = || {
        Query::read("SELECT v FROM named WHERE id = $1", Consistency::Any)
            .bind(1i64)
            .cache_key("named:1")
    };
    let value = |out: tower_scale::pg::QueryOutput| out.rows[0].get::<_, String>(0);
    assert_eq!(value(cache.query(read()).await.expect("read")), "old");
    let hit = cache.query(read()).await.expect("read");
    assert_eq!(&*hit.served_by, "cache");
    cache
        .query(Query::write("UPDATE named SET v = 'new' WHERE id = 1").tag("named:1"))
        .await
        .expect("write");
    let after = cache.query(read()).await.expect("read");
    assert_ne!(
        &*after.served_by, "cache",
        "the write's tag did not reach it"
    );
    assert_eq!(value(after), "new");
}

/// A write that may have committed (here: it timed out) still invalidates
/// its tags, at the primary's position read after the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_may_have_committed_still_invalidates() {
    let local = LocalCluster::start(0).expect("LocalCluster");
    let cluster = connect(&local, |b| b.write_timeout(Duration::from_millis(100))).await;
    let db = cluster.db();
    db.execute("CREATE TABLE slow (id bigint primary key, v text)", &[])
        .await
        .expect("table");
    db.execute("INSERT INTO slow VALUES (1, 'old')", &[])
        .await
        .expect("row");
    let cache = DbCache::builder(db).build().expect("cache");
    let read = || {
        Query::read("SELECT v FROM slow WHERE id = $1", Consistency::Any)
            .bind(1i64)
            .for_key("slow", 1)
    };
    cache.query(read()).await.expect("read");
    assert_eq!(
        &*cache.query(read()).await.expect("read").served_by,
        "cache"
    );
    let timed_out = cache
        .query(
            Query::write("UPDATE slow SET v = 'new' WHERE id = 1 RETURNING pg_sleep(1)")
                .for_key("slow", 1),
        )
        .await
        .expect_err("the write outlives the write timeout");
    assert!(timed_out.may_have_committed(), "{timed_out}");
    let after = cache.query(read()).await.expect("read");
    assert_ne!(
        &*after.served_by, "cache",
        "the entry survived a write that may have committed"
    );
}
