//! One change feed per shard: each consumes its own shard's commits and
//! feeds the same invalidator.

use tower_scale::cache::CacheLayer;
use tower_scale::shard::ShardConsistency;

use crate::{DEADLINE, database, sharded, shared};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_runs_its_own_feed_into_one_invalidator() {
    let locals = shared();
    database(&locals, "feeds").await;
    let sharded = sharded(&locals, "feeds", |b| b, |b| b).await;
    let layer = CacheLayer::builder(|id: &u64| Some(*id))
        .build::<u64, String, ()>()
        .unwrap();
    let feeds = sharded
        .change_feeds(|name, feed| {
            feed.tables(["items"])
                .slot(format!("feeds_{}", name.replace('-', "_")))
                .invalidates(layer.invalidator())
        })
        .await
        .unwrap();
    assert_eq!(feeds.len(), 2);
    for (name, feed) in &feeds {
        assert!(
            feed.streaming(DEADLINE).await,
            "{name}: {:?}",
            feed.status()
        );
    }
    let before = layer.stats().invalidations;
    let mut written = Vec::new();
    for shard in ["shard-1", "shard-2"] {
        let key = (1i64..)
            .find(|k| sharded.shard_for(k).as_deref() == Some(shard))
            .unwrap();
        let slot = i32::from(sharded.slot(&key));
        let w = sharded
            .write(
                &key,
                "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'f')",
                &[&key, &slot],
            )
            .await
            .unwrap();
        written.push((shard, w.token));
    }
    for ((name, feed), (shard, token)) in feeds.iter().zip(&written) {
        assert_eq!(&**name, *shard);
        let lsn = match ShardConsistency::ReadYourWrites(token.clone())
            .on_shard(tower_scale::shard::shard_id(shard))
        {
            tower_scale::pg::Consistency::ReadYourWrites(t) => t.lsn(),
            other => panic!("{other:?}"),
        };
        assert!(
            feed.applied_through(lsn, DEADLINE).await,
            "{name} applied its shard's write"
        );
    }
    let after = layer.stats().invalidations;
    println!("invalidations: {before} -> {after}");
    assert!(
        after >= before + 2,
        "both shards' writes reached the one invalidator"
    );
}
