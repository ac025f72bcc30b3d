//! Query-result caching (feature `change-feed`): reads tagged with the
//! tables they read, against a real primary and replica.
//!
//! The change feed is simulated: after each change the test invalidates
//! exactly the tags the feed sends for it (`tags` module: a row change
//! sends `{table}` and `{table}:{key}`, a `TRUNCATE` `{table}` and
//! `{table}:*`), at the change's commit position.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tower_scale::cache::Tag;
use tower_scale::pg::feed::tags;
use tower_scale::pg::{
    Consistency, ConsistencyToken, Db, DbCache, DbError, Query, QueryOutput, ReadCaching,
};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, connect};

async fn setup(ddl: &str) -> (Arc<LocalCluster>, tower_scale::pg::Cluster) {
    let local = LocalCluster::shared("query_cache", || LocalCluster::builder().replicas(1))
        .expect("LocalCluster");
    let cluster = connect(&local, |b| b).await;
    let admin = local.primary().connect().await.expect("admin session");
    admin.batch_execute(ddl).await.expect("schema");
    local.wait_for_replicas(DEADLINE).await.expect("replica");
    (local, cluster)
}

fn cache(db: Db) -> DbCache {
    DbCache::builder(db)
        .time_to_live(Duration::from_secs(600))
        .build()
        .expect("cache")
}

/// What the change feed sends for a change committed at `token`.
fn feed(cache: &DbCache, sent: &[&str], token: ConsistencyToken) {
    for tag in sent {
        cache
            .invalidator()
            .invalidate_tag_at(Tag::from(*tag), token.version());
    }
}

async fn run(cache: &DbCache, query: Query) -> QueryOutput {
    cache.query(query).await.expect("read")
}

fn from_cache(out: &QueryOutput) -> bool {
    &*out.served_by == "cache"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_is_invalidated_by_a_change_to_either_table() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_authors (id bigint PRIMARY KEY, name text NOT NULL);
         CREATE TABLE qc_books (id bigint PRIMARY KEY, author_id bigint NOT NULL, title text NOT NULL);
         INSERT INTO qc_authors VALUES (1, 'ann'), (2, 'bo');
         INSERT INTO qc_books VALUES (10, 1, 'first'), (20, 2, 'other');",
    )
    .await;
    let db = cluster.db();
    let cache = cache(db.clone());
    let sql = "SELECT a.name, b.title FROM qc_authors a JOIN qc_books b ON b.author_id = a.id \
               WHERE a.id = $1 ORDER BY b.id";
    let read = |c: Consistency| Query::read(sql, c).bind(1i64).cache_by_tables();
    let pair = |out: &QueryOutput| -> (String, String) { (out.rows[0].get(0), out.rows[0].get(1)) };

    assert!(!from_cache(&run(&cache, read(Consistency::Any)).await));
    let hit = run(&cache, read(Consistency::Any)).await;
    assert!(from_cache(&hit), "the join was not cached");
    assert_eq!(pair(&hit), ("ann".into(), "first".into()));

    // A change to a row of the second table.
    let w = db
        .execute("UPDATE qc_books SET title = 'second' WHERE id = 10", &[])
        .await
        .expect("update");
    feed(&cache, &["qc_books", "qc_books:10"], w.token);
    let after = run(&cache, read(Consistency::ReadYourWrites(w.token))).await;
    assert!(
        !from_cache(&after),
        "a change to qc_books left the join cached"
    );
    assert_eq!(pair(&after), ("ann".into(), "second".into()));
    let hit = run(&cache, read(Consistency::Any)).await;
    assert!(from_cache(&hit) && pair(&hit).1 == "second");

    // A change to a row of the first table, one the join does not even
    // return: the entry is tagged by table, so it goes too.
    let w = db
        .execute("UPDATE qc_authors SET name = 'bob' WHERE id = 2", &[])
        .await
        .expect("update");
    feed(&cache, &["qc_authors", "qc_authors:2"], w.token);
    let after = run(&cache, read(Consistency::ReadYourWrites(w.token))).await;
    assert!(
        !from_cache(&after),
        "a change to qc_authors left the join cached"
    );
    let w = db
        .execute("UPDATE qc_authors SET name = 'anna' WHERE id = 1", &[])
        .await
        .expect("update");
    feed(&cache, &["qc_authors", "qc_authors:1"], w.token);
    let after = run(&cache, read(Consistency::ReadYourWrites(w.token))).await;
    assert!(!from_cache(&after));
    assert_eq!(pair(&after), ("anna".into(), "second".into()));

    // A change to an unrelated table leaves it alone.
    feed(&cache, &["qc_unrelated", "qc_unrelated:1"], w.token);
    assert!(from_cache(&run(&cache, read(Consistency::Any)).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lookup_survives_other_rows_but_not_its_own_or_a_truncate() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_users (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO qc_users VALUES (1, 'ann'), (2, 'bo');",
    )
    .await;
    let db = cluster.db();
    let cache = cache(db.clone());
    let by_id = |c: Consistency| {
        Query::read("SELECT name FROM qc_users WHERE id = $1", c)
            .bind(1i64)
            .cache_by_tables()
    };
    let literal = || {
        Query::read("SELECT name FROM qc_users WHERE id = 1", Consistency::Any).cache_by_tables()
    };
    let count = || Query::read("SELECT count(*) FROM qc_users", Consistency::Any).cache_by_tables();
    for q in [by_id(Consistency::Any), literal(), count()] {
        run(&cache, q.clone()).await;
        assert!(from_cache(&run(&cache, q).await), "not cached");
    }

    // Another row changes: the lookups of row 1 stay, the count goes.
    let w = db
        .execute("UPDATE qc_users SET name = 'bob' WHERE id = 2", &[])
        .await
        .expect("update");
    feed(&cache, &["qc_users", "qc_users:2"], w.token);
    let kept = run(&cache, by_id(Consistency::Any)).await;
    assert!(
        from_cache(&kept),
        "a change to row 2 evicted the lookup of row 1"
    );
    assert_eq!(kept.rows[0].get::<_, String>(0), "ann");
    assert!(from_cache(&run(&cache, literal()).await));
    assert!(
        !from_cache(&run(&cache, count()).await),
        "the table read stayed"
    );

    // Its own row changes: gone, and the new name is read.
    let w = db
        .execute("UPDATE qc_users SET name = 'anna' WHERE id = 1", &[])
        .await
        .expect("update");
    feed(&cache, &["qc_users", "qc_users:1"], w.token);
    let after = run(&cache, by_id(Consistency::ReadYourWrites(w.token))).await;
    assert!(
        !from_cache(&after),
        "a change to row 1 left its lookup cached"
    );
    assert_eq!(after.rows[0].get::<_, String>(0), "anna");
    assert!(!from_cache(&run(&cache, literal()).await));
    assert!(from_cache(&run(&cache, by_id(Consistency::Any)).await));

    // TRUNCATE: every row, no row named.
    let w = db
        .execute("TRUNCATE qc_users", &[])
        .await
        .expect("truncate");
    feed(&cache, &["qc_users", "qc_users:*"], w.token);
    let after = run(&cache, by_id(Consistency::ReadYourWrites(w.token))).await;
    assert!(!from_cache(&after), "TRUNCATE left the lookup cached");
    assert!(after.rows.is_empty());
    let count = run(&cache, count()).await;
    assert!(!from_cache(&count));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_attributed_to_base_tables_is_never_served_from_the_cache() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_items (id bigint PRIMARY KEY, v text NOT NULL);
         CREATE TABLE qc_prices (item_id bigint NOT NULL, price int NOT NULL);
         INSERT INTO qc_items VALUES (1, 'x'), (2, 'y');
         INSERT INTO qc_prices VALUES (1, 10);
         CREATE VIEW qc_items_view AS SELECT i.id, i.v, p.price FROM qc_items i LEFT JOIN qc_prices p ON p.item_id = i.id;
         CREATE MATERIALIZED VIEW qc_items_mat AS SELECT * FROM qc_items;
         CREATE FUNCTION qc_total() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT sum(price) FROM qc_prices';
         CREATE FUNCTION qc_double(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT x * 2';",
    )
    .await;
    let db = cluster.db();
    let cache = DbCache::builder(db.clone())
        .cache_reads(ReadCaching::AllAnalyzable)
        .build()
        .expect("cache");
    for sql in [
        // Valid PostgreSQL (14+) that sqlparser does not parse.
        "SELECT v FROM qc_items GROUP BY DISTINCT v",
        // A view (it reads qc_prices, which the statement does not name).
        "SELECT v, price FROM qc_items_view WHERE id = 1",
        "SELECT * FROM qc_items_mat",
        // A user function that reads another table; one that reads none
        // (outside pg_catalog all the same); a volatile builtin; a stable one.
        "SELECT id, qc_total() FROM qc_items",
        "SELECT qc_double(id::int) FROM qc_items",
        "SELECT id, random() FROM qc_items",
        "SELECT id, now() FROM qc_items",
        "SELECT id, CURRENT_TIMESTAMP FROM qc_items",
        // The clock through date/time input.
        "SELECT id FROM qc_items WHERE 'now'::timestamptz > '2000-01-01'",
        // No table at all.
        "SELECT 1",
    ] {
        let before = cache.stats();
        for _ in 0..3 {
            let out = run(&cache, Query::read(sql, Consistency::Any)).await;
            assert!(!from_cache(&out), "served from the cache: {sql}");
        }
        let after = cache.stats();
        assert_eq!(after.hits, before.hits, "{sql}");
        assert_eq!(after.bypasses, before.bypasses + 3, "not bypassed: {sql}");
    }
    // A statement the database rejects is its own error, not the cache's.
    let err = cache
        .query(Query::read("SELECT nope FROM qc_items", Consistency::Any))
        .await
        .expect_err("a bad column");
    assert!(matches!(err, DbError::Query { .. }), "{err}");
    assert!(format!("{err:?}").contains("nope"), "{err:?}");
    // The same cache does cache what it can attribute, marked or not, and
    // an immutable builtin is fine.
    let q = || {
        Query::read(
            "SELECT lower(v) FROM qc_items ORDER BY id",
            Consistency::Any,
        )
    };
    run(&cache, q()).await;
    assert!(from_cache(&run(&cache, q()).await));
}

/// A `uuid` parameter without the driver's `uuid` feature.
#[derive(Debug)]
struct Uuid([u8; 16]);

impl ToSql for Uuid {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if !Self::accepts(ty) {
            return Err(format!("a uuid, not {ty}").into());
        }
        self.to_sql(ty, out)
    }
}

/// The row tag the feed would send for the one row of `table`, from
/// PostgreSQL's own text output of its key columns.
async fn row_tag_of(db: &Db, table: &str, key_columns: &str) -> String {
    let sql = format!("SELECT {key_columns} FROM {table}");
    let row = db
        .read_one(Consistency::Strong, &sql, &[])
        .await
        .expect("key text");
    let values: Vec<Option<String>> = (0..row.value.len()).map(|i| row.value.get(i)).collect();
    let key = tags::row_key(values.iter().map(Option::as_deref));
    tags::row_tag(table, &key).as_str().to_owned()
}

/// Cached, the entry stays through `wrong` and goes with `right`.
async fn tagged_exactly(cache: &DbCache, query: Query, wrong: &[String], right: &str) {
    run(cache, query.clone()).await;
    assert!(
        from_cache(&run(cache, query.clone()).await),
        "not cached: {query:?}"
    );
    for tag in wrong {
        cache.invalidator().invalidate_tag(tag.as_str());
        assert!(
            from_cache(&run(cache, query.clone()).await),
            "{tag} evicted {query:?}"
        );
    }
    cache.invalidator().invalidate_tag(right);
    assert!(
        !from_cache(&run(cache, query.clone()).await),
        "{right} did not reach {query:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_tags_match_the_feeds_spelling_of_text_uuid_int8_and_composite_keys() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_text_keys (id text PRIMARY KEY, v int);
         INSERT INTO qc_text_keys VALUES (E'a,b\\\\c', 1);
         CREATE TABLE qc_uuid_keys (id uuid PRIMARY KEY, v int);
         INSERT INTO qc_uuid_keys VALUES ('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 1);
         CREATE TABLE qc_int8_keys (id int8 PRIMARY KEY, v int);
         INSERT INTO qc_int8_keys VALUES (-9000000000000000001, 1);
         CREATE TABLE qc_pair_keys (b text, v int, a int4, PRIMARY KEY (a, b));
         INSERT INTO qc_pair_keys VALUES ('x,y', 1, 7);",
    )
    .await;
    let db = cluster.db();
    let cache = cache(db.clone());
    let read = |sql: &str| Query::read(sql, Consistency::Any).cache_by_tables();

    // Text with a comma and a backslash: escaped in the key.
    let right = row_tag_of(&db, "qc_text_keys", "id::text").await;
    assert_eq!(right, "qc_text_keys:a\\,b\\\\c");
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_text_keys WHERE id = $1").bind("a,b\\c"),
        &["qc_text_keys:a,b\\c".into(), "qc_text_keys:*x".into()],
        &right,
    )
    .await;

    // A uuid: lower case and hyphenated, from a parameter or a literal
    // written in upper case.
    let right = row_tag_of(&db, "qc_uuid_keys", "id::text").await;
    assert_eq!(right, "qc_uuid_keys:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    let bytes = [
        0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a,
        0x11,
    ];
    let wrong = ["qc_uuid_keys:A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11".to_owned()];
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_uuid_keys WHERE id = $1").bind(Uuid(bytes)),
        &wrong,
        &right,
    )
    .await;
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_uuid_keys WHERE id = 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'"),
        &wrong,
        &right,
    )
    .await;

    // An int8 beyond 32 bits, negative.
    let right = row_tag_of(&db, "qc_int8_keys", "id::text").await;
    assert_eq!(right, "qc_int8_keys:-9000000000000000001");
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_int8_keys WHERE id = $1").bind(-9_000_000_000_000_000_001i64),
        &["qc_int8_keys".into()],
        &right,
    )
    .await;

    // Two key columns, declared (a, b) but spelled in column order (b, a).
    let right = row_tag_of(&db, "qc_pair_keys", "b::text, a::text").await;
    assert_eq!(right, "qc_pair_keys:x\\,y,7");
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_pair_keys WHERE a = $1 AND b = $2")
            .bind(7i32)
            .bind("x,y"),
        &["qc_pair_keys:7,x\\,y".into()],
        &right,
    )
    .await;
    // One key column unbound: not a row lookup, the table's tag.
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_pair_keys WHERE a = $1").bind(7i32),
        std::slice::from_ref(&right),
        "qc_pair_keys",
    )
    .await;
    // The whole-table tag reaches a row lookup.
    tagged_exactly(
        &cache,
        read("SELECT v FROM qc_pair_keys WHERE a = 7 AND b = 'x,y'"),
        &["qc_pair_keys".into()],
        "qc_pair_keys:*",
    )
    .await;
}

/// The catalog lookup times out on a stalled replica: the read still
/// succeeds (elsewhere, uncached), and the failure is not remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_catalog_lookup_leaves_the_read_uncached_not_failed() {
    let local = LocalCluster::start(1).expect("LocalCluster");
    // The monitor's probe outlasts the read timeout: the lookup sees the
    // stall first.
    let cluster = connect(&local, |b| {
        b.read_timeout(Duration::from_millis(300))
            .probe_timeout(Duration::from_secs(3))
    })
    .await;
    let db = cluster.db();
    db.execute(
        "CREATE TABLE qc_stalled (id bigint PRIMARY KEY, v text NOT NULL)",
        &[],
    )
    .await
    .expect("table");
    db.execute("INSERT INTO qc_stalled VALUES (1, 'x')", &[])
        .await
        .expect("row");
    local.wait_for_replicas(DEADLINE).await.expect("replica");
    let cache = cache(db.clone());
    let read = || {
        Query::read("SELECT v FROM qc_stalled WHERE id = $1", Consistency::Any)
            .bind(1i64)
            .cache_by_tables()
    };
    // A pooled session to the replica, so the lookup finds one and sends
    // its queries (rather than wait to open one).
    super::until("a read on the replica", DEADLINE, async || {
        let r = db.read_one(Consistency::Any, "SELECT 1", &[]).await;
        r.is_ok_and(|r| &*r.served_by == "replica-1")
    })
    .await;
    local.replica(0).pause().expect("pause");
    let out = cache.query(read()).await;
    let marked_down = !cluster.status()[1].healthy;
    local.replica(0).resume().expect("resume");
    let out = out.expect("the read failed because the lookup did");
    assert!(!from_cache(&out));
    assert_eq!(out.rows[0].get::<_, String>(0), "x");
    assert_eq!(cache.stats().hits, 0);
    assert!(marked_down, "the stalled replica is still in rotation");
    // Asked again, and cached this time.
    run(&cache, read()).await;
    assert!(
        from_cache(&run(&cache, read()).await),
        "the failure was remembered"
    );
}

/// Read three times; none served from the cache, every one bypassing it.
async fn never_cached(cache: &DbCache, query: Query) {
    let before = cache.stats();
    for _ in 0..3 {
        let out = run(cache, query.clone()).await;
        assert!(!from_cache(&out), "served from the cache: {query:?}");
    }
    let after = cache.stats();
    assert_eq!(after.hits, before.hits, "{query:?}");
    assert_eq!(
        after.bypasses,
        before.bypasses + 3,
        "not bypassed: {query:?}"
    );
}

/// `u.order_count` is the call `order_count(u)` when the table has no such
/// column: a user function that reads another table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_called_with_column_syntax_is_not_taken_for_a_column() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_fn_users (id bigint PRIMARY KEY, name text NOT NULL);
         CREATE TABLE qc_fn_orders (id bigint PRIMARY KEY, user_id bigint NOT NULL);
         INSERT INTO qc_fn_users VALUES (1, 'ann');
         INSERT INTO qc_fn_orders VALUES (10, 1);
         CREATE FUNCTION order_count(qc_fn_users) RETURNS bigint LANGUAGE sql STABLE
             AS 'SELECT count(*) FROM qc_fn_orders WHERE user_id = $1.id';",
    )
    .await;
    let db = cluster.db();
    let cache = cache(db.clone());
    let read = |sql: &str| {
        Query::read(sql, Consistency::Any)
            .bind(1i64)
            .cache_by_tables()
    };
    for sql in [
        "SELECT u.order_count FROM qc_fn_users u WHERE u.id = $1",
        "SELECT (u).order_count FROM qc_fn_users u WHERE u.id = $1",
        "SELECT qc_fn_users.order_count FROM qc_fn_users WHERE id = $1",
        "SELECT name FROM qc_fn_users u WHERE id = $1 AND u.order_count > 0",
        // A system column that changes with no logical change.
        "SELECT u.ctid FROM qc_fn_users u WHERE u.id = $1",
    ] {
        let out = run(&cache, read(sql)).await;
        assert_eq!(out.rows.len(), 1, "{sql}");
        never_cached(&cache, read(sql)).await;
    }
    // The count does change with qc_fn_orders.
    db.execute("INSERT INTO qc_fn_orders VALUES (11, 1)", &[])
        .await
        .expect("insert");
    let strong = Query::read(
        "SELECT u.order_count FROM qc_fn_users u WHERE u.id = $1",
        Consistency::Strong,
    )
    .bind(1i64);
    let out = run(&cache, strong).await;
    assert_eq!(out.rows[0].get::<_, i64>(0), 2);
    // Real columns, qualified, are cached (by the row).
    let q = read("SELECT u.name, u.tableoid FROM qc_fn_users u WHERE u.id = $1");
    tagged_exactly(&cache, q, &["qc_fn_users".into()], "qc_fn_users:1").await;
}

/// `u(uid, id)` renames the table's columns: `id` there is `name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_alias_list_is_not_read_as_the_key() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_renamed (id text PRIMARY KEY, name text NOT NULL);
         INSERT INTO qc_renamed VALUES ('1', 'x'), ('2', '1');",
    )
    .await;
    let cache = cache(cluster.db());
    let q = Query::read(
        "SELECT uid FROM qc_renamed u(uid, id) WHERE id = $1",
        Consistency::Any,
    )
    .bind("1")
    .cache_by_tables();
    // The row read is '2' (its name is '1'): row '1''s tag must not be the
    // entry's only way out; the table's is.
    assert_eq!(
        run(&cache, q.clone()).await.rows[0].get::<_, String>(0),
        "2"
    );
    tagged_exactly(&cache, q, &[], "qc_renamed").await;
}

/// With `only_published`, a table outside the publication is read
/// uncached; a partition counts as published through its root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_published_tables_are_cached_when_asked() {
    let (_local, cluster) = setup(
        "CREATE TABLE qc_pub_in (id bigint PRIMARY KEY, v text NOT NULL);
         CREATE TABLE qc_pub_out (id bigint PRIMARY KEY, v text NOT NULL);
         CREATE TABLE qc_pub_parted (id bigint, v text NOT NULL, PRIMARY KEY (id)) PARTITION BY RANGE (id);
         CREATE TABLE qc_pub_parted_1 PARTITION OF qc_pub_parted FOR VALUES FROM (0) TO (100);
         INSERT INTO qc_pub_in VALUES (1, 'a');
         INSERT INTO qc_pub_out VALUES (1, 'b');
         INSERT INTO qc_pub_parted VALUES (1, 'c');
         CREATE PUBLICATION qc_pub FOR TABLE qc_pub_in, qc_pub_parted;
         CREATE PUBLICATION qc_pub_root FOR TABLE qc_pub_parted WITH (publish_via_partition_root = true);",
    )
    .await;
    let db = cluster.db();
    let only = |publication: &str| {
        DbCache::builder(db.clone())
            .time_to_live(Duration::from_secs(600))
            .only_published(publication)
            .build()
            .expect("cache")
    };
    let read = |sql: &str| Query::read(sql, Consistency::Any).cache_by_tables();
    let cached = async |cache: &DbCache, sql: &str| {
        run(cache, read(sql)).await;
        from_cache(&run(cache, read(sql)).await)
    };
    let published = only("qc_pub");
    assert!(cached(&published, "SELECT v FROM qc_pub_in").await);
    assert!(cached(&published, "SELECT v FROM qc_pub_parted").await);
    assert!(cached(&published, "SELECT v FROM qc_pub_parted_1").await);
    never_cached(&published, read("SELECT v FROM qc_pub_out")).await;
    never_cached(
        &published,
        read("SELECT i.v FROM qc_pub_in i JOIN qc_pub_out o ON o.id = i.id"),
    )
    .await;
    let via_root = only("qc_pub_root");
    assert!(cached(&via_root, "SELECT v FROM qc_pub_parted_1 WHERE id = 1").await);
    assert!(cached(&via_root, "SELECT v FROM qc_pub_parted").await);
    never_cached(&via_root, read("SELECT v FROM qc_pub_in")).await;
    // No such publication: nothing is cached.
    never_cached(&only("qc_pub_none"), read("SELECT v FROM qc_pub_in")).await;
    // Without the option, as before: cached whatever the publication.
    assert!(cached(&cache(db.clone()), "SELECT v FROM qc_pub_out").await);
}

/// The future of a read that marks its statement for a lookup, dropped
/// before its first poll: the next read is still analysed and cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_dropped_before_its_first_poll_leaves_no_mark() {
    use tower::Service;
    let (_local, cluster) = setup(
        "CREATE TABLE qc_unpolled (id bigint PRIMARY KEY, v text NOT NULL);
         INSERT INTO qc_unpolled VALUES (1, 'x');",
    )
    .await;
    let cache = cache(cluster.db());
    let read = || Query::read("SELECT v FROM qc_unpolled", Consistency::Any).cache_by_tables();
    let unpolled = cache.clone().call(read());
    drop(unpolled);
    run(&cache, read()).await;
    assert!(
        from_cache(&run(&cache, read()).await),
        "the statement stayed marked as being looked up"
    );
}
