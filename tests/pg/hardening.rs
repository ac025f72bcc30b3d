//! Hardening: bounded time, true outcomes, a bad query is not a dead node
//! (issue 12). One test per guarantee of the `pg` module docs, against real
//! servers; stalls are SIGSTOP (`Node::pause`). Measured latencies are
//! printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::tls::{MakeTlsConnect, NoTls, NoTlsError, NoTlsStream};
use tower_scale::pg::{
    Cluster, Consistency, ConsistencyToken, DbError, NodeConfig, Operation, RouteReason,
};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, connect, setup_table, until};

/// How long a call may overrun its configured bound on this shared,
/// noisy machine before it counts as a hang.
const SLACK: Duration = Duration::from_millis(1500);

/// Runs `call`, failing the test if it does not finish within 15 s (what
/// today's code did: hang), and returns its result with its latency.
async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(out) => (out, started.elapsed()),
        Err(_) => panic!("{what}: no answer after 15 s, the call hangs"),
    }
}

fn is_timeout(e: &DbError, operation: Operation) -> bool {
    matches!(e, DbError::Timeout { operation: o, .. } if *o == operation)
}

/// Guarantee 1, replica side: the read-your-writes catch-up query on a
/// stalled replica ends within the read-your-writes wait: from the primary
/// when falling back is allowed, else a typed timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stalled_during_a_read_your_writes_read() {
    let local = LocalCluster::start(1).unwrap();
    let wait = Duration::from_millis(500);
    // A slow monitor: the stalled replica stays "healthy", so the reads
    // really meet it.
    let configure = |fallback: bool| {
        move |b: tower_scale::pg::ClusterBuilder| {
            b.probe_interval(Duration::from_secs(60))
                .read_your_writes_wait(wait)
                .read_timeout(Duration::from_secs(1))
                .fallback_to_primary(fallback)
        }
    };
    let with_fallback = connect(&local, configure(true)).await;
    let without = connect(&local, configure(false)).await;
    setup_table(&with_fallback, &local).await;
    for cluster in [&with_fallback, &without] {
        cluster.next_probe().await;
        // A pooled session on the replica, as in any running service.
        let r = cluster
            .db()
            .read_one(Consistency::Any, "SELECT 1", &[])
            .await
            .unwrap();
        assert_eq!(&*r.served_by, "replica-1");
    }
    let w = with_fallback
        .db()
        .query_one("INSERT INTO items (name) VALUES ('ryw') RETURNING id", &[])
        .await
        .unwrap();
    let id: i64 = w.value.get(0);
    local.replica(0).pause().unwrap();

    let read = |cluster: &Cluster| {
        let db = cluster.db();
        async move {
            db.read_opt(
                Consistency::ReadYourWrites(w.token),
                "SELECT name FROM items WHERE id = $1",
                &[&id],
            )
            .await
        }
    };
    let (no_fallback, took_typed) = bounded("RYW read, no fallback", read(&without)).await;
    let (fallback, took_primary) = bounded("RYW read, fallback", read(&with_fallback)).await;
    local.replica(0).resume().unwrap();

    let err = no_fallback.unwrap_err();
    assert!(is_timeout(&err, Operation::CatchUp), "{err:?}");
    let r = fallback.unwrap();
    assert_eq!(&*r.served_by, "primary");
    assert_eq!(r.reason, RouteReason::FallbackToPrimary);
    assert_eq!(
        r.value.map(|row| row.get::<_, String>(0)).as_deref(),
        Some("ryw")
    );
    eprintln!(
        "replica SIGSTOPped during a read-your-writes read (wait {wait:?}): typed timeout \
         after {took_typed:?}; with fallback, the primary answered after {took_primary:?}"
    );
    assert!(took_typed < wait + SLACK, "{took_typed:?}");
    assert!(took_primary < wait + SLACK, "{took_primary:?}");

    // Now caught up, the replica stalls during the read itself: the read
    // timeout, then the primary, or the typed timeout with nowhere to go.
    for cluster in [&with_fallback, &without] {
        until("the replica is back and caught up", DEADLINE, async || {
            cluster.next_probe().await;
            let replica = &cluster.status()[1];
            replica.healthy && replica.lsn >= w.token.lsn()
        })
        .await;
        cluster
            .db()
            .read_one(Consistency::Any, "SELECT 1", &[])
            .await
            .unwrap();
    }
    local.replica(0).pause().unwrap();
    let (no_fallback, took_typed) = bounded("caught-up read, no fallback", read(&without)).await;
    let (fallback, took_primary) = bounded("caught-up read, fallback", read(&with_fallback)).await;
    local.replica(0).resume().unwrap();
    let err = no_fallback.unwrap_err();
    assert!(is_timeout(&err, Operation::Read), "{err:?}");
    let r = fallback.unwrap();
    assert_eq!((&*r.served_by, r.reason), ("primary", RouteReason::Retried));
    eprintln!(
        "replica SIGSTOPped during the read proper (read timeout 1 s): typed timeout after \
         {took_typed:?}; with fallback, the primary answered after {took_primary:?}"
    );
    let read_timeout = Duration::from_secs(1);
    assert!(took_typed < read_timeout + SLACK, "{took_typed:?}");
    assert!(took_primary < read_timeout + SLACK, "{took_primary:?}");
}

/// Guarantee 1, primary side: a write, a statement in a transaction,
/// `COMMIT` and `BEGIN` on a stalled primary each end with a typed timeout
/// within the write timeout; what was rolled back is absent afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_stalled_during_writes_and_transactions() {
    let local = LocalCluster::start(0).unwrap();
    let bound = Duration::from_millis(800);
    let cluster = connect(&local, |b| {
        b.probe_interval(Duration::from_secs(60))
            .write_timeout(bound)
            .pool_create_timeout(bound)
    })
    .await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    // Pooled sessions, as in any running service.
    let warm: Vec<_> = (0..4)
        .map(|_| db.execute("SELECT pg_sleep(0.05)", &[]))
        .collect();
    for w in futures::future::join_all(warm).await {
        w.unwrap();
    }
    let in_statement = db.transaction().await.unwrap();
    in_statement
        .execute("INSERT INTO items (name) VALUES ('tx-statement')", &[])
        .await
        .unwrap();
    let in_commit = db.transaction().await.unwrap();
    in_commit
        .execute("INSERT INTO items (name) VALUES ('tx-commit')", &[])
        .await
        .unwrap();

    local.primary().pause().unwrap();
    // All at once: the first timeout asks the monitor to probe, and a
    // primary seen down turns later calls into `NoPrimary` instead.
    let (
        (write, took_write),
        (statement, took_statement),
        (commit, took_commit),
        (begin, took_begin),
    ) = tokio::join!(
        bounded(
            "write",
            db.execute("INSERT INTO items (name) VALUES ('write')", &[]),
        ),
        bounded(
            "statement",
            in_statement.execute("INSERT INTO items (name) VALUES ('tx-statement-2')", &[]),
        ),
        bounded("commit", in_commit.commit()),
        bounded("begin", db.transaction()),
    );
    let (after_timeout, _) =
        bounded("commit after a timed-out statement", in_statement.commit()).await;
    local.primary().resume().unwrap();

    let write = write.unwrap_err();
    assert!(is_timeout(&write, Operation::Write), "{write:?}");
    assert!(write.may_have_committed());
    let statement = statement.unwrap_err();
    assert!(
        is_timeout(&statement, Operation::Statement),
        "{statement:?}"
    );
    assert!(!statement.may_have_committed());
    let after_timeout = after_timeout.unwrap_err();
    assert!(
        matches!(after_timeout, DbError::RolledBack { .. }),
        "{after_timeout:?}"
    );
    let commit = commit.unwrap_err();
    assert!(is_timeout(&commit, Operation::Commit), "{commit:?}");
    assert!(commit.may_have_committed());
    let begin = begin.unwrap_err();
    assert!(
        is_timeout(&begin, Operation::Begin) || matches!(begin, DbError::PoolTimeout { .. }),
        "{begin:?}"
    );
    eprintln!(
        "primary SIGSTOPped (write timeout {bound:?}): write {took_write:?}, statement in a \
         transaction {took_statement:?}, COMMIT {took_commit:?}, BEGIN {took_begin:?}"
    );
    for took in [took_write, took_statement, took_commit, took_begin] {
        assert!(took < bound + SLACK, "{took:?}");
    }

    // The transaction whose statement timed out was rolled back.
    until("the primary answers again", DEADLINE, async || {
        db.read_query(Consistency::Strong, "SELECT 1", &[])
            .await
            .is_ok()
    })
    .await;
    let r = db
        .read_query(Consistency::Strong, "SELECT name FROM items", &[])
        .await
        .unwrap();
    let names: Vec<String> = r.value.iter().map(|row| row.get(0)).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("tx-statement")),
        "{names:?}"
    );
    eprintln!(
        "outcomes reported unknown: write present={}, COMMIT present={}",
        names.iter().any(|n| n == "write"),
        names.iter().any(|n| n == "tx-commit")
    );
}

/// Guarantee 2: waiting for a pooled connection is not server failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_above_the_pool_size_neither_evicts_nor_moves_reads() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| {
        b.pool_size(2).read_timeout(Duration::from_secs(1))
    })
    .await;
    let db = cluster.db();
    db.read_one(Consistency::Any, "SELECT 1", &[])
        .await
        .unwrap();
    let primary_queries = cluster.status()[0].queries;
    let started = Instant::now();
    let reads: Vec<_> = (0..6)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                db.read_one(
                    Consistency::Any,
                    "SELECT pg_is_in_recovery() FROM pg_sleep(0.6)",
                    &[],
                )
                .await
            })
        })
        .collect();
    for read in reads {
        let r = read.await.unwrap().unwrap();
        assert_eq!(&*r.served_by, "replica-1", "{:?}", r.reason);
        assert!(r.value.get::<_, bool>(0));
    }
    eprintln!(
        "six 0.6 s reads through a pool of 2 with a 1 s read timeout: all on the replica in {:?}",
        started.elapsed()
    );
    let status = cluster.status();
    assert!(
        status[1].healthy,
        "the replica left the rotation: {status:?}"
    );
    assert_eq!(
        status[0].queries, primary_queries,
        "reads went to the primary"
    );
}

/// Guarantee 3: bad parameters and bad statements are the caller's typed
/// errors; no node leaves the rotation, nothing is retried elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_typed_errors_and_no_node_leaves_the_rotation() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| b).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    db.read_one(Consistency::Any, "SELECT 1", &[])
        .await
        .unwrap();
    let select = "SELECT name FROM items WHERE id = $1";
    let insert = "INSERT INTO items (name) VALUES ($1)";
    let primary_queries = cluster.status()[0].queries;
    for i in 0..200 {
        let (result, client) = match i % 4 {
            0 => (db.read_opt(Consistency::Any, select, &[]).await, true),
            1 => (
                db.read_opt(Consistency::Any, select, &[&"seven"]).await,
                true,
            ),
            2 => (
                db.read_opt(Consistency::Any, "SELECT 1", &[&1i64]).await,
                true,
            ),
            _ => (
                db.read_opt(Consistency::Any, "SELECT nope FROM items", &[])
                    .await,
                false,
            ),
        };
        let e = result.unwrap_err();
        match &e {
            DbError::Query { node, .. } => assert_eq!(&**node, "replica-1", "retried: {e}"),
            other => panic!("read {i}: not a query error: {other:?}"),
        }
        assert_eq!(e.is_client_error(), client, "read {i}: {e}");
        assert!(!e.is_connection_error(), "read {i}: {e}");
    }
    assert_eq!(
        cluster.status()[0].queries,
        primary_queries,
        "a bad read was retried on the primary"
    );
    for i in 0..200 {
        let (result, client) = match i % 4 {
            0 => (db.execute(insert, &[]).await, true),
            1 => (db.execute(insert, &[&7i64]).await, true),
            2 => (db.execute(insert, &[&"a", &"b"]).await, true),
            _ => (
                db.execute("INSERT INTO items (name) VALUES (NULL)", &[])
                    .await,
                false,
            ),
        };
        let e = result.unwrap_err();
        assert!(matches!(e, DbError::Query { .. }), "write {i}: {e:?}");
        assert_eq!(e.is_client_error(), client, "write {i}: {e}");
        assert!(!e.may_have_committed(), "write {i}: {e}");
    }
    let status = cluster.status();
    assert!(status.iter().all(|n| n.healthy), "{status:?}");
    let mut on_replica = 0;
    for i in 0..50 {
        let name = format!("good-{i}");
        let w = db.execute(insert, &[&name]).await.unwrap();
        let r = db
            .read_query(
                Consistency::ReadYourWrites(w.token),
                "SELECT name FROM items WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap();
        assert_eq!(r.value.len(), 1);
        if &*r.served_by == "replica-1" {
            on_replica += 1;
        }
    }
    let count: i64 = db
        .read_one(Consistency::Strong, "SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .value
        .get(0);
    assert_eq!(count, 50, "none of the bad writes wrote anything");
    eprintln!(
        "400 bad statements: typed errors, every node in rotation; then 100 good ones \
         ({on_replica}/50 token reads on the replica)"
    );
    assert!(on_replica > 0, "the replica still serves reads");
}

/// Guarantee 4: `commit` never reports a rolled-back transaction committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_after_a_failed_statement_is_an_error() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = connect(&local, |b| b).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    let insert = "INSERT INTO items (name) VALUES ($1)";

    let tx = db.transaction().await.unwrap();
    tx.execute(insert, &[&"lost"]).await.unwrap();
    let failed = tx.query("SELECT 1 / 0", &[]).await.unwrap_err();
    assert_eq!(failed.code().map(|c| c.code()), Some("22012"), "{failed}");
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, DbError::RolledBack { .. }), "{err:?}");
    assert!(!err.may_have_committed());

    // A savepoint that recovered the transaction: it commits.
    let tx = db.transaction().await.unwrap();
    tx.execute(insert, &[&"kept"]).await.unwrap();
    tx.execute("SAVEPOINT s", &[]).await.unwrap();
    tx.query("SELECT 1 / 0", &[]).await.unwrap_err();
    tx.execute("ROLLBACK TO SAVEPOINT s", &[]).await.unwrap();
    let token = tx.commit().await.unwrap();
    assert!(!token.is_unknown());

    // A client error sends nothing: the transaction goes on.
    let tx = db.transaction().await.unwrap();
    let e = tx.execute(insert, &[]).await.unwrap_err();
    assert!(e.is_client_error(), "{e}");
    tx.execute(insert, &[&"after a client error"])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // COMMIT itself failing (a deferred unique constraint).
    db.execute(
        "CREATE TABLE deferred (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)",
        &[],
    )
    .await
    .unwrap();
    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO deferred VALUES (1), (1)", &[])
        .await
        .unwrap();
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, DbError::RolledBack { .. }), "{err:?}");
    assert_eq!(err.code().map(|c| c.code()), Some("23505"), "{err}");

    // A statement abandoned mid-flight (its future dropped): cancelled on
    // the server, and the transaction can only roll back.
    let tx = db.transaction().await.unwrap();
    tx.execute(insert, &[&"abandoned"]).await.unwrap();
    let slow = tx.query("SELECT pg_sleep(60)", &[]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), slow)
            .await
            .is_err()
    );
    let err = tx.execute(insert, &[&"after abandon"]).await.unwrap_err();
    assert!(matches!(err, DbError::RolledBack { .. }), "{err:?}");
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, DbError::RolledBack { .. }), "{err:?}");
    let admin = local.primary().connect().await.unwrap();
    until(
        "the abandoned statement is cancelled",
        DEADLINE,
        async || {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == 0
        },
    )
    .await;

    let r = db
        .read_query(
            Consistency::Strong,
            "SELECT name FROM items ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = r.value.iter().map(|row| row.get(0)).collect();
    assert_eq!(names, ["kept", "after a client error"]);
    let n: i64 = db
        .read_one(Consistency::Strong, "SELECT count(*) FROM deferred", &[])
        .await
        .unwrap()
        .value
        .get(0);
    assert_eq!(n, 0);
}

/// Guarantee 5: a write that committed is reported committed even when its
/// token cannot be had; the token then sends reads to the primary at once.
/// (The token query is made to fail after the commit by switching the
/// session to a role that may not call `pg_current_wal_lsn()`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_token_fails_is_reported_committed() {
    let local = LocalCluster::start(1).unwrap();
    let wait = Duration::from_secs(2);
    let cluster = connect(&local, |b| b.read_your_writes_wait(wait)).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    db.execute(
        "DO $$ BEGIN
             CREATE ROLE no_lsn NOLOGIN;
             GRANT SELECT, INSERT ON items TO no_lsn;
             GRANT USAGE ON SEQUENCE items_id_seq TO no_lsn;
             REVOKE EXECUTE ON FUNCTION pg_catalog.pg_current_wal_lsn() FROM PUBLIC;
         END $$",
        &[],
    )
    .await
    .unwrap();
    // Through a function: `Db` refuses a session-level `set_config` in
    // its own statements (it would leak to the pool's next user).
    db.execute(
        "CREATE FUNCTION become_no_lsn() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN PERFORM set_config('role', 'no_lsn', false); END $$",
        &[],
    )
    .await
    .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();

    let w = db
        .query_one(
            "WITH w AS (INSERT INTO items (name) VALUES ('committed') RETURNING id) \
             SELECT id, become_no_lsn() FROM w",
            &[],
        )
        .await
        .expect("a committed write is reported committed");
    assert!(w.token.is_unknown(), "{:?}", w.token);
    let id: i64 = w.value.get(0);
    let started = Instant::now();
    let r = db
        .read_opt(
            Consistency::ReadYourWrites(w.token),
            "SELECT name FROM items WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(&*r.served_by, "primary");
    assert!(r.value.is_some());
    assert!(took < wait / 2, "waited for a replica: {took:?}");
    eprintln!("read with the unknown token: primary, no catch-up wait ({took:?})");

    // The same through a transaction's COMMIT.
    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO items (name) VALUES ('tx-committed')", &[])
        .await
        .unwrap();
    tx.query("SELECT become_no_lsn()", &[]).await.unwrap();
    let token = tx.commit().await.expect("committed");
    assert!(token.is_unknown());

    // The sessions the role was switched on were not reused: later writes
    // get real tokens.
    for _ in 0..20 {
        let w = db
            .execute("INSERT INTO items (name) VALUES ('after')", &[])
            .await
            .unwrap();
        assert!(!w.token.is_unknown());
    }
    let n: i64 = db
        .read_one(
            Consistency::Strong,
            "SELECT count(*) FROM items WHERE name IN ('committed', 'tx-committed')",
            &[],
        )
        .await
        .unwrap()
        .value
        .get(0);
    assert_eq!(n, 2);
    // The unknown token travels signed and comes back unknown.
    let codec = tower_scale::pg::TokenCodec::new(&[7u8; 32], cluster.identity()).unwrap();
    let back = codec.decode(&codec.encode(ConsistencyToken::unknown()));
    assert!(back.is_some_and(|t| t.is_unknown()));
}

/// A connector that counts the TLS connections asked of it (plain TCP
/// underneath).
#[derive(Clone)]
struct CountingTls(Arc<AtomicUsize>);

impl<S> MakeTlsConnect<S> for CountingTls {
    type Stream = NoTlsStream;
    type TlsConnect = NoTls;
    type Error = NoTlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<NoTls, NoTlsError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        <NoTls as MakeTlsConnect<S>>::make_tls_connect(&mut NoTls, domain)
    }
}

/// Guarantee 6: cancelling a dropped query uses the cluster's connector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_uses_the_clusters_tls_connector() {
    let local = LocalCluster::start(0).unwrap();
    let made = Arc::new(AtomicUsize::new(0));
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .build_with_tls(CountingTls(made.clone()))
        .await
        .unwrap();
    let db = cluster.db();
    db.execute("SELECT 1", &[]).await.unwrap();
    let before = made.load(Ordering::SeqCst);
    let slow = db.execute("SELECT pg_sleep(60)", &[]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow)
            .await
            .is_err()
    );
    let admin = local.primary().connect().await.unwrap();
    let took = until(
        "the query is cancelled through the cluster's connector",
        Duration::from_secs(10),
        async || {
            let running: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            running == 0 && made.load(Ordering::SeqCst) > before
        },
    )
    .await;
    eprintln!("dropped query cancelled through the cluster's connector after {took:?}");
}

/// A `DbLayer` on a cluster that is never reached, a token, its text, and
/// what the layer reads from a `Cookie` line of raw bytes.
#[cfg(feature = "http")]
async fn cookie_reader() -> (
    ConsistencyToken,
    String,
    impl Fn(&[u8]) -> Option<ConsistencyToken>,
) {
    use http::HeaderMap;
    use http::header::{COOKIE, HeaderValue};
    use tower_scale::pg::DbLayer;
    use tower_scale::pg::{Lsn, TokenCodec};

    let cluster = Cluster::builder()
        .primary(NodeConfig::from_url("postgresql://app@127.0.0.1:1/app").unwrap())
        .probe_timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let codec = TokenCodec::new(&[9u8; 32], cluster.identity()).unwrap();
    let token = ConsistencyToken::new(Lsn(0x16_B374_D848));
    let text = codec.encode(token);
    let layer = DbLayer::builder(cluster.db(), codec).build();
    let token_of = move |line: &[u8]| {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_bytes(line).unwrap());
        layer.token_of(&headers)
    };
    (token, text, token_of)
}

/// Guarantee 7: a quoted token cookie is accepted.
#[cfg(feature = "http")]
#[tokio::test]
async fn a_quoted_token_cookie_is_accepted() {
    let (token, text, token_of) = cookie_reader().await;
    for cookie in [
        format!("tower_scale_token={text}"),
        format!("tower_scale_token=\"{text}\""),
        format!("a=1; tower_scale_token=\"{text}\"; b=\"2\""),
    ] {
        assert_eq!(token_of(cookie.as_bytes()), Some(token), "{cookie}");
    }
    for bad in [
        format!("tower_scale_token=\"{text}"),
        format!("tower_scale_token=\"\"{text}\"\""),
    ] {
        assert_eq!(token_of(bad.as_bytes()), None, "{bad}");
    }
}

/// Writes through a clean promotion under load: every write reported
/// committed is there afterwards, every write reported failed is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_promotion_are_reported_truly() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| {
        b.write_timeout(Duration::from_secs(2))
            .primary_wait(Duration::from_millis(300))
    })
    .await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    let stop = Arc::new(AtomicBool::new(false));
    let on_promoted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|task| {
            let (db, stop, on_promoted, done, failures) = (
                db.clone(),
                stop.clone(),
                on_promoted.clone(),
                done.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let (mut committed, mut failed, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let name = format!("w{task}-{n}");
                    match db
                        .execute("INSERT INTO items (name) VALUES ($1)", &[&name])
                        .await
                    {
                        Ok(w) => {
                            if &*w.served_by == "replica-1" {
                                on_promoted.fetch_add(1, Ordering::SeqCst);
                            }
                            committed.push(name);
                        }
                        Err(e) if e.may_have_committed() => unknown.push(name),
                        Err(e) => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            failed.push((name, e.to_string()));
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                (committed, failed, unknown)
            })
        })
        .collect();
    until("writes flow", DEADLINE, async || {
        done.load(Ordering::SeqCst) > 200
    })
    .await;
    tokio::task::block_in_place(|| local.primary().stop()).unwrap();
    until(
        "writes fail while there is no primary",
        DEADLINE,
        async || failures.load(Ordering::SeqCst) >= 4,
    )
    .await;
    local.replica(0).promote().await.unwrap();
    until(
        "writes land on the promoted replica",
        DEADLINE,
        async || on_promoted.load(Ordering::SeqCst) > 100,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (mut committed, mut failed, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
    for w in writers {
        let (c, f, u) = w.await.unwrap();
        committed.extend(c);
        failed.extend(f);
        unknown.extend(u);
    }
    let r = db
        .read_query(Consistency::Strong, "SELECT name FROM items", &[])
        .await
        .unwrap();
    let present: std::collections::HashSet<String> = r.value.iter().map(|row| row.get(0)).collect();
    for name in &committed {
        assert!(
            present.contains(name),
            "{name} was reported committed and is lost"
        );
    }
    for (name, e) in &failed {
        assert!(
            !present.contains(name),
            "{name} was reported failed ({e}) and is present"
        );
    }
    let unknown_present = unknown.iter().filter(|n| present.contains(*n)).count();
    eprintln!(
        "through a promotion: {} committed (all present), {} failed (all absent), \
         {} unknown ({unknown_present} present)",
        committed.len(),
        failed.len(),
        unknown.len()
    );
    assert!(
        !failed.is_empty(),
        "no write met the missing primary: the test could not fail"
    );
}

/// Guarantee 3: SQL text the driver cannot send (a NUL byte) is the
/// caller's error, raised before anything is sent: no node leaves the
/// rotation, nothing is retried, nothing commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_with_a_nul_byte_is_a_client_error() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| b.probe_interval(Duration::from_secs(60))).await;
    setup_table(&cluster, &local).await;
    cluster.next_probe().await;
    let db = cluster.db();
    db.read_one(Consistency::Any, "SELECT 1", &[])
        .await
        .unwrap();
    let sql = "SELECT 1 --\0";
    let primary_queries = cluster.status()[0].queries;
    for _ in 0..3 {
        let e = db.read_opt(Consistency::Any, sql, &[]).await.unwrap_err();
        match &e {
            DbError::Query { node, .. } => assert_eq!(&**node, "replica-1", "retried: {e}"),
            other => panic!("not a query error: {other:?}"),
        }
        assert!(e.is_client_error(), "{e}");
        assert!(!e.is_connection_error(), "{e}");
    }
    assert_eq!(
        cluster.status()[0].queries,
        primary_queries,
        "the read was retried on the primary"
    );
    for _ in 0..3 {
        let e = db.execute(sql, &[]).await.unwrap_err();
        assert!(matches!(e, DbError::Query { .. }), "{e:?}");
        assert!(e.is_client_error(), "{e}");
        assert!(!e.may_have_committed(), "{e}");
        let e = db
            .query_one("INSERT INTO items (name) VALUES ('x') --\0", &[])
            .await
            .unwrap_err();
        assert!(e.is_client_error() && !e.may_have_committed(), "{e}");
    }
    // In a transaction: nothing sent, the transaction goes on.
    let tx = db.transaction().await.unwrap();
    let e = tx.execute(sql, &[]).await.unwrap_err();
    assert!(e.is_client_error(), "{e}");
    tx.execute("INSERT INTO items (name) VALUES ('after nul')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let status = cluster.status();
    assert!(status.iter().all(|n| n.healthy), "{status:?}");
    let r = db
        .read_one(Consistency::Any, "SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(&*r.served_by, "replica-1");
    let n: i64 = db
        .read_one(Consistency::Strong, "SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .value
        .get(0);
    assert_eq!(n, 1, "only the transaction's insert");
}

/// Guarantee 5: a write through `query_one` that returned two rows
/// committed: its error says it may have, and carries the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_one_write_with_two_rows_is_not_reported_uncommitted() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = connect(&local, |b| b).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    let sql = "INSERT INTO items (name) VALUES ('a'), ('b') RETURNING id";
    let e = db.query_one(sql, &[]).await.unwrap_err();
    assert!(
        matches!(
            e,
            DbError::RowCount {
                rows: 2,
                written: Some(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.may_have_committed(), "{e}");
    // A read's row count says nothing about a commit.
    let e = db
        .read_one(Consistency::Strong, "SELECT id FROM items", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::RowCount { rows: 2, .. }), "{e:?}");
    assert!(!e.may_have_committed(), "{e}");

    // Through DbLayer: the committed write's token still reaches the
    // response.
    #[cfg(feature = "http")]
    {
        use http::header::{COOKIE, HeaderValue, SET_COOKIE};
        use http::{HeaderMap, Request, Response};
        use tower::{Layer, ServiceExt};
        use tower_scale::pg::TokenCodec;
        use tower_scale::pg::{DbLayer, RequestDb};

        let codec = TokenCodec::new(&[3u8; 32], cluster.identity()).unwrap();
        let layer = DbLayer::builder(cluster.db(), codec).build();
        let service = layer
            .clone()
            .layer(tower::service_fn(|req: Request<()>| async move {
                let db = req
                    .extensions()
                    .get::<RequestDb>()
                    .cloned()
                    .ok_or("no RequestDb")?;
                let e = db
                    .query_one(
                        "INSERT INTO items (name) VALUES ('c'), ('d') RETURNING id",
                        &[],
                    )
                    .await
                    .err()
                    .ok_or("query_one succeeded")?;
                assert!(e.may_have_committed(), "{e}");
                Ok::<_, &'static str>(Response::new(()))
            }));
        let req = Request::post("/items").body(()).unwrap();
        let res = service.oneshot(req).await.unwrap();
        let set = res
            .headers()
            .get(SET_COOKIE)
            .expect("the token cookie")
            .to_str()
            .unwrap();
        let pair = set.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_str(pair).unwrap());
        let token = layer.token_of(&headers).expect("a valid token");
        assert!(!token.is_unknown());
    }

    let n: i64 = db
        .read_one(Consistency::Strong, "SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .value
        .get(0);
    let expected = if cfg!(feature = "http") { 4 } else { 2 };
    assert_eq!(n, expected, "the rows are there");
}

/// Guarantee 5: the unknown token goes to the primary even when reads may
/// not fall back to it: that is its rule, not a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unknown_token_reads_from_the_primary_without_fallback() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| b.fallback_to_primary(false)).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    db.execute("INSERT INTO items (name) VALUES ('u')", &[])
        .await
        .unwrap();
    for _ in 0..5 {
        let r = db
            .read_one(
                Consistency::ReadYourWrites(ConsistencyToken::unknown()),
                "SELECT count(*) FROM items",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(&*r.served_by, "primary");
        assert_eq!(r.reason, RouteReason::Primary);
        assert_eq!(r.value.get::<_, i64>(0), 1);
    }
}

/// Guarantee 7: a cookie with a non-ASCII value on the same line does not
/// hide the token.
#[cfg(feature = "http")]
#[tokio::test]
async fn a_non_ascii_cookie_does_not_hide_the_token() {
    let (token, text, token_of) = cookie_reader().await;
    for line in [
        format!("n=Jos\u{e9}; tower_scale_token={text}"),
        format!("tower_scale_token={text}; n=Jos\u{e9}"),
        format!("a=\u{1f600}; tower_scale_token=\"{text}\"; b=\u{e9}"),
    ] {
        assert_eq!(token_of(line.as_bytes()), Some(token), "{line}");
    }
    // Latin-1 bytes, not UTF-8.
    let mut line = b"n=Jos\xe9; tower_scale_token=".to_vec();
    line.extend_from_slice(text.as_bytes());
    assert_eq!(token_of(&line), Some(token));
    // A token value with non-ASCII bytes is not accepted.
    let bad = format!("tower_scale_token={text}\u{e9}");
    assert_eq!(token_of(bad.as_bytes()), None);
}

/// Guarantee 4: transaction control sent through the transaction itself
/// is refused before it is sent (so `ROLLBACK` then `BEGIN` can never make
/// `commit` report half a transaction committed); the transaction goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_inside_a_transaction_is_not_a_commit() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = connect(&local, |b| b).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    let insert = "INSERT INTO items (name) VALUES ($1)";

    let mut kept = Vec::new();
    for control in [
        "ROLLBACK",
        "ABORT",
        "COMMIT",
        "END",
        "BEGIN",
        "START TRANSACTION",
        "PREPARE TRANSACTION 'x'",
        "SET search_path = elsewhere",
    ] {
        let name = format!("after {control}");
        let tx = db.transaction().await.unwrap();
        tx.execute(insert, &[&name]).await.unwrap();
        let err = tx.execute(control, &[]).await.unwrap_err();
        assert!(matches!(err, DbError::Refused { .. }), "{control}: {err:?}");
        assert!(
            err.is_client_error() && !err.may_have_committed(),
            "{control}: {err}"
        );
        tx.commit().await.unwrap();
        kept.push(name);
    }
    // An aborted transaction still fails at the guard with 25P02.
    let tx = db.transaction().await.unwrap();
    tx.execute(insert, &[&"failed"]).await.unwrap();
    tx.query("SELECT 1 / 0", &[]).await.unwrap_err();
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, DbError::RolledBack { .. }), "{err:?}");
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    assert!(!err.may_have_committed());
    // The guard does not disturb a plain commit, nor the user's savepoints.
    let tx = db.transaction().await.unwrap();
    tx.execute("SAVEPOINT tower_scale_guard", &[])
        .await
        .unwrap();
    tx.execute(insert, &[&"kept"]).await.unwrap();
    let token = tx.commit().await.unwrap();
    assert!(!token.is_unknown());

    let r = db
        .read_query(
            Consistency::Strong,
            "SELECT name FROM items ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = r.value.iter().map(|row| row.get(0)).collect();
    kept.push("kept".into());
    assert_eq!(names, kept);
}

/// A request stuffed with forged token cookies costs a bounded number of
/// HMACs: past eight candidates the rest are not looked at (a real token
/// among the first eight is still found).
#[cfg(feature = "http")]
#[tokio::test]
async fn forged_token_cookies_cost_a_bounded_amount() {
    let (token, text, token_of) = cookie_reader().await;
    let forged = "A".repeat(text.len());
    let mut first = format!("tower_scale_token={text}");
    for _ in 0..5_000 {
        first.push_str(&format!("; tower_scale_token={forged}"));
    }
    assert_eq!(
        token_of(first.as_bytes()),
        Some(token),
        "the real one came first"
    );
    let mut last = String::new();
    for _ in 0..5_000 {
        last.push_str(&format!("tower_scale_token={forged}; "));
    }
    last.push_str(&format!("tower_scale_token={text}"));
    assert_eq!(token_of(last.as_bytes()), None, "looked past the budget");
}
