//! A replica still following a primary that a promotion left behind is
//! fenced by the timeline it receives: it serves no read, as the old
//! primary itself does not.

use tower_scale::pg::{Cluster, Consistency, NodeConfig};
use tower_scale::testing::LocalCluster;

use crate::{DEADLINE, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_following_the_old_primary_serves_no_read() {
    let local = LocalCluster::builder().replicas(2).start().unwrap();
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .replica(NodeConfig::new(local.replica(0).config()))
        .replica(NodeConfig::new(local.replica(1).config()))
        .build()
        .await
        .unwrap();
    let db = cluster.db();
    db.execute("CREATE TABLE t (id int PRIMARY KEY)", &[])
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    // replica-1 is promoted (timeline 2); the old primary goes on, and
    // replica-2 keeps following it on timeline 1.
    let promoted = local.replica(0).connect().await.unwrap();
    promoted
        .execute("SELECT pg_promote(true, 30)", &[])
        .await
        .unwrap();
    let waited = until(
        "the old primary and its replica fenced",
        DEADLINE,
        async || {
            cluster.next_probe().await;
            let status = cluster.status();
            status[0].fenced && status[2].fenced && !status[1].fenced
        },
    )
    .await;
    eprintln!("both fenced {waited:?} after the promotion");
    assert_eq!(cluster.db().primary_name().as_deref(), Some("replica-1"));
    for _ in 0..20 {
        let r = db
            .read_one(Consistency::Any, "SELECT count(*) FROM t", &[])
            .await
            .unwrap();
        assert_eq!(
            &*r.served_by, "replica-1",
            "reads go to the new primary only"
        );
    }
}
