//! Connections a DBA can plan for: `pool_size` is the most pooled sessions
//! an instance opens to one node (the monitor's probe is one more), before
//! and after a replica is promoted; the pools are reported on
//! `Cluster::status()` and as `tower_scale_db_pool_connections` gauges.

use std::time::Duration;

use tower_scale::pg::{Cluster, Consistency, NodeConfig, Role};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, until};

/// Sessions the cluster holds open on `node`: pooled (the node config's
/// application name) and the probe's.
async fn sessions(node: &tower_scale::testing::Node) -> (i64, i64) {
    let client = node.connect().await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE application_name = 'tower-scale-test'), \
                    count(*) FILTER (WHERE application_name = 'tower-scale-monitor') \
             FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The process-wide Prometheus recorder (this test binary's only one).
fn recorder() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("install the recorder")
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_bounds_the_sessions_per_node_before_and_after_a_promotion() {
    let metrics = recorder();
    let local = LocalCluster::start(1).unwrap();
    let cluster = Cluster::builder()
        // Names of their own: the recorder is process-wide and the other
        // tests in this binary build clusters whose nodes are `primary` and
        // `replica-1` (their gauges would overwrite these; failed once in CI).
        .primary(NodeConfig::new(local.primary().config()).name("pools-primary"))
        .replica(NodeConfig::new(local.replica(0).config()).name("pools-replica"))
        .pool_size(3)
        .probe_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let db = cluster.db();
    db.execute("CREATE TABLE t (id int primary key, n bigint)", &[])
        .await
        .unwrap();
    db.execute("INSERT INTO t VALUES (1, 0)", &[])
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();

    // Twelve tasks reading and writing at once, on three sessions a node.
    let load = |db: tower_scale::pg::Db| async move {
        let mut set = tokio::task::JoinSet::new();
        for t in 0..12 {
            let db = db.clone();
            set.spawn(async move {
                for _ in 0..20 {
                    if t % 3 == 0 {
                        db.execute("UPDATE t SET n = n + 1 WHERE id = 1", &[])
                            .await
                            .unwrap();
                    } else {
                        db.read_one(Consistency::Any, "SELECT n FROM t WHERE id = 1", &[])
                            .await
                            .unwrap();
                    }
                }
            });
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
    };
    load(db.clone()).await;
    for node in local.nodes() {
        let (pooled, probe) = sessions(node).await;
        eprintln!("{}: {pooled} pooled sessions, {probe} probe", node.name());
        assert!(pooled <= 3, "{}: {pooled} pooled sessions", node.name());
        assert!(probe <= 1, "{}: {probe} probe sessions", node.name());
    }
    let status = cluster.status();
    for node in &status {
        assert_eq!(node.pool.max, 3, "{node:?}");
        assert!(node.pool.open <= 3 && node.pool.open >= 1, "{node:?}");
        assert_eq!(node.pool.in_use, 0, "{node:?}");
        assert_eq!(node.pool.idle, node.pool.open, "{node:?}");
    }
    cluster.next_probe().await;
    let text = metrics.render();
    for state in ["max", "open", "in_use", "idle", "waiting"] {
        let line =
            format!("tower_scale_db_pool_connections{{node=\"pools-replica\",state=\"{state}\"}}");
        assert!(text.contains(&line), "no {line} in:\n{text}");
    }
    assert!(
        text.contains("tower_scale_db_pool_connections{node=\"pools-primary\",state=\"max\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("tower_scale_db_node_healthy{node=\"pools-replica\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tower_scale_db_node_primary{node=\"pools-primary\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tower_scale_db_node_primary{node=\"pools-replica\"} 0"),
        "{text}"
    );

    // The primary goes; the replica is promoted and takes the writes on
    // the same three sessions at most (its read-only pool is closed).
    local.primary().stop().unwrap();
    local.replica(0).promote().await.unwrap();
    until("the replica is seen promoted", DEADLINE, async || {
        cluster.next_probe().await;
        cluster.status()[1].role == Role::Primary
    })
    .await;
    load(db.clone()).await;
    cluster.next_probe().await;
    let text = metrics.render();
    assert!(
        text.contains("tower_scale_db_node_healthy{node=\"pools-primary\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("tower_scale_db_node_primary{node=\"pools-replica\"} 1"),
        "{text}"
    );
    let (pooled, probe) = sessions(local.replica(0)).await;
    eprintln!("promoted replica-1: {pooled} pooled sessions, {probe} probe");
    assert!(pooled <= 3, "promoted: {pooled} pooled sessions");
    let status = cluster.status();
    assert_eq!(status[1].pool.max, 3);
    assert!(status[1].pool.open <= 3, "{:?}", status[1]);
}
