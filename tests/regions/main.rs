//! Data centers that fail, against real servers behind fault proxies
//! (LocalCluster client groups and replication proxies): region-aware
//! routing with measured distances, a region going dark, a partitioned
//! primary fenced by its timeline. Figures are printed; every wait polls
//! with a generous deadline.

use std::time::Duration;

use tower_scale::pg::{Cluster, ClusterBuilder, NodeConfig};
use tower_scale::testing::{ClientGroup, LocalCluster};

#[path = "../common/mod.rs"]
mod common;

pub(crate) use common::until;

pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

mod dark;
mod partition;
mod routing;
mod stale_replica;

/// A cluster handle for one application instance: it reaches every node
/// through `group`'s proxies; `labels[i]` is node `i`'s (region, zone).
pub(crate) async fn instance(
    group: &ClientGroup,
    labels: &[(&str, &str)],
    configure: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
) -> Cluster {
    let node = |i: usize| {
        let (region, zone) = labels[i];
        NodeConfig::new(group.config(i)).region(region).zone(zone)
    };
    let mut builder = Cluster::builder().primary(node(0));
    for i in 1..labels.len() {
        builder = builder.replica(node(i));
    }
    configure(builder).build().await.expect("cluster")
}

/// Waits until the monitor of `cluster` sees every node healthy with a
/// measured round trip.
pub(crate) async fn measured(cluster: &Cluster) {
    until(
        "every node probed with a round trip",
        DEADLINE,
        async || {
            cluster
                .status()
                .iter()
                .all(|n| n.healthy && !n.rtt.is_zero())
        },
    )
    .await;
}

/// The `q`-quantile of `samples` (sorted in place).
pub(crate) fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The test ground's network: a client group reaches each node through its
/// own proxy, and a replica's replication goes through one too; a black
/// hole on one stops that path only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_groups_and_replication_go_through_their_own_proxies() {
    let local = LocalCluster::builder()
        .replicas(1)
        .client_groups(2)
        .replication_proxies(true)
        .start()
        .unwrap();
    let (a, b) = (local.client_group(0), local.client_group(1));
    let connect = |config: tokio_postgres::Config| async move {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(client)
    };
    let a_primary = connect(a.config(0)).await.unwrap();
    a_primary
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    // Group B loses the primary; group A does not.
    b.proxy(0).black_hole();
    // The handshake hangs (the proxy accepts, nothing answers).
    let hung = tokio::time::timeout(Duration::from_millis(300), connect(b.config(0))).await;
    assert!(hung.is_err(), "B reached a black-holed primary");
    a_primary
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    b.proxy(0).restore();
    assert!(b.proxy(0).stats().accepted >= 1);
    // Replication partitioned: the replica stops replaying, the primary
    // still commits; healed, it catches up.
    let replication = local.replication_proxy(0).expect("replication proxy");
    assert!(
        replication.stats().live >= 1,
        "the replica streams through its proxy"
    );
    replication.black_hole();
    a_primary
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    let lsn = local.primary().current_lsn().await.unwrap();
    let stuck = local
        .replica(0)
        .wait_for_replay(lsn, Duration::from_millis(500))
        .await;
    assert!(stuck.is_err(), "the replica replayed through a black hole");
    replication.restore();
    local
        .replica(0)
        .wait_for_replay(lsn, DEADLINE)
        .await
        .unwrap();
    let replica = connect(a.config(1)).await.unwrap();
    let n: i64 = replica
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}
