//! Two shards whose nodes have the same names keep separate
//! `tower_scale_db_*` series through the `cluster` label, and a move
//! shows in the shard metrics.

use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::shard::{ShardConsistency, ShardedCluster, SlotRange};

use crate::{database, shared};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_keep_their_own_series() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the recorder (this binary's only one)");
    let locals = shared();
    database(&locals, "metrics").await;
    let mut builder = ShardedCluster::builder();
    for (i, local) in locals.iter().enumerate() {
        let mut primary = local.primary().config();
        primary.dbname("metrics");
        let mut replica = local.replica(0).config();
        replica.dbname("metrics");
        // Default node names (`primary`, `replica-1`) on both shards.
        let cluster = Cluster::builder()
            .primary(NodeConfig::new(primary))
            .replica(NodeConfig::new(replica))
            .name(format!("metrics-{}", i + 1))
            .build()
            .await
            .unwrap();
        builder = builder.shard(format!("metrics-{}", i + 1), cluster);
    }
    let sharded = builder.build().await.unwrap();
    // Reads on shard 1 only.
    let key = (0i64..)
        .find(|k| sharded.shard_for(k).as_deref() == Some("metrics-1"))
        .unwrap();
    for _ in 0..5 {
        sharded
            .read(&key, &ShardConsistency::Strong, "SELECT 1", &[])
            .await
            .unwrap();
    }
    // Under the instance's read lease (held since its start): none of
    // them was fenced in the read.
    let label = "{cluster=\"metrics-1,metrics-2\"}";
    let fenced = |text: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("tower_scale_shard_fenced_reads_total{label} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(fenced(&recorder.render()), 0.0, "{}", recorder.render());
    let slot = sharded.slot(&key);
    sharded
        .move_ownership(SlotRange::one(slot), "metrics-2")
        .await
        .unwrap();
    let text = recorder.render();
    let series = |cluster: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("tower_scale_db_queries_total{")
                    && l.contains("node=\"primary\"")
                    && l.contains(&format!("cluster=\"{cluster}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let (one, two) = (series("metrics-1").unwrap(), series("metrics-2").unwrap());
    println!("queries on metrics-1's primary {one}, on metrics-2's {two}");
    assert!(
        one >= 5.0 + two,
        "shard 1's reads counted on shard 1 alone: {one} vs {two}"
    );
    assert!(
        text.contains(&format!("tower_scale_shard_slots_moved_total{label} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("tower_scale_shard_map_version{label} 2")),
        "{text}"
    );
}
