//! The tour's resharding step (`examples/tour.rs` includes it): a third
//! shard joins two with no slots, and a third of the slots move to it,
//! rows and all, while four writers insert and update rows on them;
//! afterwards every acknowledged write is on its owner exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::shard::{ShardedCluster, SlotRange};
use tower_scale::testing::LocalCluster;

use super::Error;

/// The writers' keys: each task its own, inserted then updated in turns.
const KEYS_PER_WRITER: i64 = 2_000;
const WRITERS: i64 = 4;

pub async fn reshard() -> Result<(), Error> {
    println!(
        "\n11. online resharding: a third shard joins, a third of the slots move to it under writes"
    );
    let t = Instant::now();
    let starts: Vec<_> = (0..3)
        .map(|_| tokio::task::spawn_blocking(|| LocalCluster::builder().replicas(0).start()))
        .collect();
    let mut locals = Vec::new();
    for s in starts {
        locals.push(s.await??);
    }
    let mut builder = ShardedCluster::builder()
        .table("items", "id")
        // shard-3 joins with no slots.
        .initial_map(vec![
            (SlotRange::new(0, 2047), "shard-1".to_string()),
            (SlotRange::new(2048, 4095), "shard-2".to_string()),
        ]);
    for (i, local) in locals.iter().enumerate() {
        let cluster = Cluster::builder()
            .primary(NodeConfig::new(local.primary().config()))
            .build()
            .await?;
        cluster
            .db()
            .execute(
                "CREATE TABLE items (id int8 PRIMARY KEY, version int8 NOT NULL)",
                &[],
            )
            .await?;
        builder = builder.shard(format!("shard-{}", i + 1), cluster);
    }
    let sharded = builder.build().await?;
    println!(
        "  three LocalClusters as shard-1 (slots 0-2047), shard-2 (2048-4095) and shard-3 (none), up in {:.2?}",
        t.elapsed()
    );
    // Rows on every slot before the move.
    for key in 0..2_000i64 {
        sharded
            .write(
                &key,
                "INSERT INTO items (id, version) VALUES ($1, 0)",
                &[&key],
            )
            .await?;
    }

    // Four writers: each inserts its keys, then updates them, in turns,
    // keeping the last version each write acknowledged.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (sharded, stop) = (sharded.clone(), Arc::clone(&stop));
        writers.spawn(async move {
            let mut acked: HashMap<i64, i64> = HashMap::new();
            let (mut failed, mut round) = (0u64, 0i64);
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                round += 1;
                for k in 0..KEYS_PER_WRITER / 20 {
                    let key = 1_000_000 + w * KEYS_PER_WRITER + (round * 7 + k) % KEYS_PER_WRITER;
                    let r = sharded
                        .write(
                            &key,
                            "INSERT INTO items (id, version) VALUES ($1, $2) \
                             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                            &[&key, &round],
                        )
                        .await;
                    match r {
                        Ok(_) => {
                            acked.insert(key, round);
                        }
                        Err(_) => failed += 1,
                    }
                }
            }
            (acked, failed)
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third of the slots: the upper third of each of the two shards.
    let mut pauses = Vec::new();
    let mut copied = 0;
    let t = Instant::now();
    for range in [SlotRange::new(1366, 2047), SlotRange::new(3414, 4095)] {
        let report = sharded.move_slots(range, "shard-3").await?.wait().await?;
        pauses.push(report.pause);
        copied += report.rows_copied + report.rows_applied;
    }
    let moved = t.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (mut acked, mut failed) = (HashMap::new(), 0);
    while let Some(done) = writers.join_next().await {
        let (a, f) = done?;
        acked.extend(a);
        failed += f;
    }

    // Every acknowledged write on its owner, once, at its version.
    let map = sharded.map();
    let mut on: Vec<HashMap<i64, i64>> = Vec::new();
    for local in &locals {
        let c = local.primary().connect().await?;
        let rows = c.query("SELECT id, version FROM items", &[]).await?;
        on.push(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    }
    let index = |name: &str| {
        name.trim_start_matches("shard-")
            .parse::<usize>()
            .unwrap_or(1)
            - 1
    };
    let (mut lost, mut doubled) = (0, 0);
    for (key, version) in &acked {
        let owner = index(map.owner(sharded.slot(key)).unwrap_or("shard-1"));
        if on[owner].get(key) != Some(version) {
            lost += 1;
        }
        doubled += (0..3)
            .filter(|&i| i != owner && on[i].contains_key(key))
            .count();
    }
    let per_shard: Vec<usize> = on.iter().map(HashMap::len).collect();
    println!(
        "  slots 1366-2047 and 3414-4095 moved to shard-3 in {moved:.2?} ({copied} rows copied or \
         streamed) while 4 writers ran: writes held {:?} and {:?} at the cutovers",
        pauses[0], pauses[1]
    );
    println!(
        "  {} keys written and acknowledged, {failed} writes refused, {lost} lost, {doubled} on a \
         shard that does not own them; rows per shard now {per_shard:?}",
        acked.len()
    );
    if lost + doubled > 0 || failed > 0 {
        return Err(format!("{lost} lost, {doubled} doubled, {failed} refused").into());
    }
    drop(sharded);
    drop(locals);
    Ok(())
}
