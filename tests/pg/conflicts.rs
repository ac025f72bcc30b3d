//! A replica that cancels a read for a conflict with recovery (SQLSTATE
//! 40001) is not blamed for it and the read is retried elsewhere once.

use std::time::Duration;

use tower_scale::pg::{Consistency, RouteReason};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, connect, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cancelled_by_recovery_is_retried_elsewhere() {
    let local = LocalCluster::builder()
        .replicas(1)
        .conf("max_standby_streaming_delay = 0")
        .start()
        .unwrap();
    let cluster = connect(&local, |b| {
        b.readmission_ramp(Duration::ZERO)
            .read_timeout(Duration::from_secs(30))
    })
    .await;
    let db = cluster.db();
    db.execute("CREATE TABLE c (id int)", &[]).await.unwrap();
    db.execute("INSERT INTO c VALUES (1)", &[]).await.unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    // A read that holds a lock on `c` on the replica for 25 s (a loaded
    // machine replays the lock long before it ends: in CI, 4 s were once
    // not enough, and the read ended on the replica uncancelled); the
    // retry on the primary does not sleep.
    let read = tokio::spawn({
        let db = db.clone();
        async move {
            db.read_one(
                Consistency::Any,
                "SELECT count(*) FROM c, pg_sleep(CASE WHEN pg_is_in_recovery() THEN 25 ELSE 0 END)",
                &[],
            )
            .await
        }
    });
    let replica = local.replica(0).connect().await.unwrap();
    until("the read runs on the replica", DEADLINE, async || {
        replica
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' \
                 AND state = 'active' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    // An exclusive lock on the primary: replaying it cancels the read.
    let tx = db.transaction().await.unwrap();
    tx.execute("LOCK TABLE c IN ACCESS EXCLUSIVE MODE", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let r = read.await.unwrap().unwrap();
    eprintln!(
        "cancelled by recovery, then served by {} ({:?})",
        r.served_by, r.reason
    );
    assert_eq!(r.reason, RouteReason::Retried);
    assert_eq!(r.value.get::<_, i64>(0), 1);
    // Not taken out of rotation for it.
    assert!(cluster.status()[1].healthy, "{:?}", cluster.status());
}
