//! Issue 12's guarantees written against the API of 09f87a2 (before the
//! fixes), to show each failing there. Replaced by `hardening.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::tls::{MakeTlsConnect, NoTls, NoTlsError, NoTlsStream};
use tower_scale::pg::{Cluster, Consistency, DbError, NodeConfig};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, connect, setup_table, until};

async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(out) => (out, started.elapsed()),
        Err(_) => panic!("{what}: no answer after 15 s, the call hangs"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_a_replica_stalled_during_a_read_your_writes_read() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| {
        b.probe_interval(Duration::from_secs(60))
            .read_your_writes_wait(Duration::from_millis(500))
            .read_timeout(Duration::from_secs(1))
    })
    .await;
    setup_table(&cluster, &local).await;
    cluster.next_probe().await;
    let db = cluster.db();
    db.read_one(Consistency::Any, "SELECT 1", &[])
        .await
        .unwrap();
    let w = db
        .query_one("INSERT INTO items (name) VALUES ('ryw') RETURNING id", &[])
        .await
        .unwrap();
    let id: i64 = w.value.get(0);
    local.replica(0).pause().unwrap();
    let (r, took) = bounded(
        "RYW read",
        db.read_opt(
            Consistency::ReadYourWrites(w.token),
            "SELECT name FROM items WHERE id = $1",
            &[&id],
        ),
    )
    .await;
    local.replica(0).resume().unwrap();
    r.unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_a_primary_stalled_during_a_write() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = connect(&local, |b| b.probe_interval(Duration::from_secs(60))).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO items (name) VALUES ('a')", &[])
        .await
        .unwrap();
    local.primary().pause().unwrap();
    let (write, statement) = tokio::join!(
        bounded(
            "write",
            db.execute("INSERT INTO items (name) VALUES ('w')", &[])
        ),
        bounded(
            "statement",
            tx.execute("INSERT INTO items (name) VALUES ('b')", &[])
        ),
    );
    local.primary().resume().unwrap();
    assert!(write.0.is_err() && statement.0.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_a_burst_above_the_pool_size_neither_evicts_nor_moves_reads() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| {
        b.pool_size(2).read_timeout(Duration::from_secs(1))
    })
    .await;
    let db = cluster.db();
    db.read_one(Consistency::Any, "SELECT 1", &[])
        .await
        .unwrap();
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
    }
    assert!(cluster.status()[1].healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g3_a_bad_parameter_is_not_a_dead_node() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = connect(&local, |b| b).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    db.read_one(Consistency::Any, "SELECT 1", &[])
        .await
        .unwrap();
    let e = db
        .read_opt(
            Consistency::Any,
            "SELECT name FROM items WHERE id = $1",
            &[],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::Query { .. }), "{e:?}");
    assert!(cluster.status()[1].healthy, "the replica left the rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_commit_after_a_failed_statement_is_an_error() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = connect(&local, |b| b).await;
    setup_table(&cluster, &local).await;
    let db = cluster.db();
    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO items (name) VALUES ('lost')", &[])
        .await
        .unwrap();
    tx.query("SELECT 1 / 0", &[]).await.unwrap_err();
    let result = tx.commit().await;
    assert!(
        result.is_err(),
        "a rolled-back transaction reported committed: {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_a_commit_whose_token_fails_is_reported_committed() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = connect(&local, |b| b).await;
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
    let w = db
        .query_one(
            "WITH w AS (INSERT INTO items (name) VALUES ('committed') RETURNING id) \
             SELECT id, set_config('role', 'no_lsn', false) FROM w",
            &[],
        )
        .await;
    let admin = local.primary().connect().await.unwrap();
    let n: i64 = admin
        .query_one("SELECT count(*) FROM items WHERE name = 'committed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "it committed");
    w.expect("a committed write is reported committed");
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g6_cancellation_uses_the_clusters_tls_connector() {
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
    until(
        "a cancel through the cluster's connector",
        Duration::from_secs(10),
        async || made.load(Ordering::SeqCst) > before,
    )
    .await;
    let _ = DEADLINE;
}

#[cfg(feature = "http")]
#[tokio::test]
async fn g7_a_quoted_token_cookie_is_accepted() {
    use http::HeaderMap;
    use http::header::{COOKIE, HeaderValue};
    use tower_scale::http::DbLayer;
    use tower_scale::pg::{ConsistencyToken, Lsn, TokenCodec};
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
    let mut headers = HeaderMap::new();
    headers.insert(
        COOKIE,
        HeaderValue::from_str(&format!("tower_scale_token=\"{text}\"")).unwrap(),
    );
    assert_eq!(layer.token_of(&headers), Some(token));
}
