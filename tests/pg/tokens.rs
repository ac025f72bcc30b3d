//! A write's token covers its commit (one round trip for both), under
//! asynchronous commit too, and a transaction's commit carries its token
//! in the same round trip.

use std::time::{Duration, Instant};

use tower_scale::pg::{Cluster, Consistency, DbError, Lsn, NodeConfig};
use tower_scale::testing::{FaultProxy, LocalCluster};

use super::DEADLINE;

/// Under `synchronous_commit = off` a commit returns before its WAL is
/// written out, so the primary's *write* position can trail the commit
/// record; the WAL writer is made to sleep 10 s so the window stays open.
/// A token taken from the write position would let a replica that has
/// replayed everything written (but not the commit) serve the read: the
/// read-your-writes read would see the old value. With the token taken
/// from the insert position, every read presenting it sees its write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_covers_its_commit_under_asynchronous_commit() {
    let local = LocalCluster::builder()
        .replicas(1)
        .conf("wal_writer_delay = 10s")
        .conf("wal_writer_flush_after = 0")
        .start()
        .unwrap();
    let mut primary = local.primary().config();
    primary.options("-c synchronous_commit=off");
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(primary))
        .replica(NodeConfig::new(local.replica(0).config()))
        // Short: a replica that never gets the commit in time sends the
        // read to the primary quickly.
        .read_your_writes_wait(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let db = cluster.db();
    let direct = local.primary().connect().await.unwrap();
    direct
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS counter (id int primary key, n bigint not null); \
             INSERT INTO counter VALUES (1, 0) ON CONFLICT DO NOTHING",
        )
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    let replica = local.replica(0).connect().await.unwrap();
    let mut window_seen = 0;
    let mut on_replica = 0;
    for n in 1..=30i64 {
        // Autocommit writes and transactions in turn.
        let token = if n % 2 == 0 {
            let w = db
                .execute("UPDATE counter SET n = $1 WHERE id = 1", &[&n])
                .await
                .unwrap();
            assert_eq!(w.value, 1);
            w.token
        } else {
            let tx = db.transaction().await.unwrap();
            tx.execute("UPDATE counter SET n = $1 WHERE id = 1", &[&n])
                .await
                .unwrap();
            tx.commit().await.unwrap()
        };
        assert!(!token.is_unknown());
        // What a replica at or past the token holds, read directly in one
        // snapshot with its replay position.
        let row = replica
            .query_one(
                "SELECT pg_last_wal_replay_lsn()::text, n FROM counter WHERE id = 1",
                &[],
            )
            .await
            .unwrap();
        let replayed: Lsn = row.get::<_, String>(0).parse().unwrap();
        let seen: i64 = row.get(1);
        if replayed >= token.lsn() {
            assert_eq!(
                seen, n,
                "a replica at {replayed} >= token {token:?} lacks write {n}"
            );
        } else {
            window_seen += 1;
        }
        // Through the library: read-your-writes always sees the write.
        let r = db
            .read_one(
                Consistency::ReadYourWrites(token),
                "SELECT n FROM counter WHERE id = 1",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.value.get::<_, i64>(0), n, "served by {}", r.served_by);
        if &*r.served_by != "primary" {
            on_replica += 1;
        }
    }
    eprintln!(
        "asynchronous commit: 30/30 token reads saw their write ({on_replica} on the replica); \
         {window_seen}/30 tokens were ahead of the replica's replay when read"
    );
    // The window existed (the test could fail): most commits were not yet
    // on the replica when their token was checked.
    assert!(
        window_seen > 0,
        "no write was ever behind: the test could not fail"
    );
}

/// A write and its token are one round trip: with 100 ms each way injected
/// between the application and the primary, an autocommit write (its
/// statements prepared) completes in one 200 ms round trip, not two, and
/// so does a transaction's commit with its token. (A protocol property,
/// not a speed: the bound is half a round trip from either answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_and_its_token_take_one_round_trip() {
    let local = LocalCluster::start(0).unwrap();
    let proxy = FaultProxy::start(([127, 0, 0, 1], local.primary().port()).into())
        .await
        .unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user("postgres")
        .dbname("postgres");
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(config))
        .pool_size(1)
        .build()
        .await
        .unwrap();
    let db = cluster.db();
    let direct = local.primary().connect().await.unwrap();
    direct
        .batch_execute("CREATE TABLE t (id int primary key, n bigint); INSERT INTO t VALUES (1, 0)")
        .await
        .unwrap();
    // Prepare the statements on the one pooled connection.
    db.execute("UPDATE t SET n = n + 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let mut tx = db.transaction().await.unwrap();
    tx.execute("UPDATE t SET n = n + 1 WHERE id = 1", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let one_way = Duration::from_millis(100);
    proxy.set_latency(one_way, Duration::ZERO);
    let started = Instant::now();
    let w = db
        .execute("UPDATE t SET n = n + 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let write = started.elapsed();
    assert!(!w.token.is_unknown());
    let started = Instant::now();
    tx = db.transaction().await.unwrap();
    let begin = started.elapsed();
    tx.execute("UPDATE t SET n = n + 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let started = Instant::now();
    let token = tx.commit().await.unwrap();
    let commit = started.elapsed();
    assert!(!token.is_unknown() && token > w.token);
    eprintln!(
        "round trip {:?}: autocommit write + token {write:?}, BEGIN {begin:?}, COMMIT + token {commit:?}",
        one_way * 2
    );
    assert!(
        write < one_way * 3,
        "the write took two round trips: {write:?}"
    );
    assert!(
        commit < one_way * 3,
        "the commit took two round trips: {commit:?}"
    );
}

/// Statements that would leave a pooled session in a transaction block or
/// with changed settings are refused before anything is sent, so the
/// writes after them commit; a statement that fails to prepare leaves no
/// prepared statement behind; `COPY ... FROM STDIN` is refused at once and
/// blames no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_session_never_keeps_a_transaction_or_a_setting() {
    // A cluster of one pooled session on `local`'s primary.
    async fn one_session(local: &LocalCluster) -> Cluster {
        Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .pool_size(1)
            .build()
            .await
            .unwrap()
    }
    let local = LocalCluster::start(0).unwrap();
    let cluster = one_session(&local).await;
    let db = cluster.db();
    db.execute("CREATE TABLE t (id int)", &[]).await.unwrap();
    for refused in [
        "BEGIN",
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "START TRANSACTION READ ONLY",
        "SET default_transaction_read_only = on",
        "SET statement_timeout = '1ms'",
        "DISCARD ALL",
        "DEALLOCATE ALL",
        "PREPARE q AS SELECT 1",
        "LISTEN c",
    ] {
        let err = db.execute(refused, &[]).await.unwrap_err();
        assert!(matches!(err, DbError::Refused { .. }), "{refused}: {err:?}");
        assert!(
            err.is_client_error() && !err.may_have_committed(),
            "{refused}"
        );
        let err = db
            .read_query(Consistency::Any, refused, &[])
            .await
            .unwrap_err();
        assert!(
            matches!(err, DbError::Refused { .. }),
            "read {refused}: {err:?}"
        );
        let w = db.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
        assert!(!w.token.is_unknown());
    }
    // Every insert committed: counted on another connection.
    let direct = local.primary().connect().await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 9);
    let idle_in_tx: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(idle_in_tx, 0);

    // Failed preparations on a fresh session leave nothing prepared.
    let fresh = one_session(&local).await;
    let fresh_db = fresh.db();
    for _ in 0..50 {
        let err = fresh_db
            .execute("SELECT * FROM no_such_table", &[])
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("42P01"), "{err}");
    }
    let prepared: i64 = fresh_db
        .read_one(
            Consistency::Strong,
            "SELECT count(*) FROM pg_prepared_statements",
            &[],
        )
        .await
        .unwrap()
        .value
        .get(0);
    assert!(prepared <= 3, "{prepared} statements left prepared");

    // COPY from the client: refused at once, the primary stays in rotation.
    let started = Instant::now();
    let err = db.execute("COPY t FROM STDIN", &[]).await.unwrap_err();
    assert!(matches!(err, DbError::Refused { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(cluster.status()[0].healthy);
}

/// A session-level `set_config` (the pooled session's `search_path`
/// changed for whoever gets it next) and temporary objects (a temporary
/// `users` shadows the real one for later requests) are refused before
/// anything is sent; a transaction-local `set_config` and `ON COMMIT DROP`
/// are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_session_keeps_no_set_config_or_temporary_object() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .pool_size(1)
        .build()
        .await
        .unwrap();
    let db = cluster.db();
    db.execute("CREATE TABLE IF NOT EXISTS shadowed (id int)", &[])
        .await
        .unwrap();
    for refused in [
        "SELECT set_config('search_path', 'evil', false)",
        "SELECT pg_catalog.set_config('search_path', 'evil', 'false'::bool)",
        "CREATE TEMP TABLE shadowed (id int)",
        "CREATE TEMPORARY VIEW shadowed_v AS SELECT 1 AS id",
        "SELECT 1 AS id INTO TEMP shadowed",
    ] {
        let err = db.execute(refused, &[]).await.unwrap_err();
        assert!(matches!(err, DbError::Refused { .. }), "{refused}: {err:?}");
        let err = db
            .read_query(Consistency::Strong, refused, &[])
            .await
            .unwrap_err();
        assert!(
            matches!(err, DbError::Refused { .. }),
            "read {refused}: {err:?}"
        );
        let tx = db.transaction().await.unwrap();
        let err = tx.execute(refused, &[]).await.unwrap_err();
        assert!(
            matches!(err, DbError::Refused { .. }),
            "tx {refused}: {err:?}"
        );
        tx.rollback().await.unwrap();
    }
    for fine in [
        "SELECT set_config('application_name', 'local', true)",
        "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
    ] {
        db.execute(fine, &[]).await.unwrap();
        let tx = db.transaction().await.unwrap();
        tx.execute(fine, &[]).await.unwrap();
        tx.commit().await.unwrap();
    }
    // The one session is as it was.
    let row = db
        .read_one(
            Consistency::Strong,
            "SELECT current_setting('search_path'), current_setting('application_name'), \
             (SELECT count(*) FROM pg_catalog.pg_class WHERE relpersistence = 't')",
            &[],
        )
        .await
        .unwrap();
    let path: String = row.value.get(0);
    let name: String = row.value.get(1);
    let temporary: i64 = row.value.get(2);
    assert_eq!(path, "\"$user\", public");
    assert_ne!(name, "local");
    assert_eq!(temporary, 0);
}
