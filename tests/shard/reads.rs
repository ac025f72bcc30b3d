//! Read-your-writes across shards through lagging replicas, and reads on
//! every shard with one shard stopped or stalled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tower_scale::pg::{Consistency, TokenCodec};
use tower_scale::shard::{ShardConsistency, ShardError, ShardedTokenCodec, merge_sorted, shard_id};
use tower_scale::testing::LocalCluster;

use crate::{DEADLINE, database, sharded};

/// A key whose slot `sharded` gives to `shard`, from `from` up.
fn key_on(sharded: &tower_scale::shard::ShardedCluster, shard: &str, from: i64) -> i64 {
    (from..)
        .find(|k| sharded.shard_for(k).as_deref() == Some(shard))
        .expect("a key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_two_shards_reads_both_writes_through_delayed_replicas() {
    let delay = Duration::from_secs(1);
    let locals: Vec<Arc<LocalCluster>> = (0..2)
        .map(|_| {
            Arc::new(
                LocalCluster::builder()
                    .replicas(1)
                    .apply_delay(0, delay)
                    .start()
                    .unwrap(),
            )
        })
        .collect();
    database(&locals, "ryw").await;
    let sharded = sharded(&locals, "ryw", |b| b, |b| b).await;
    let codec = ShardedTokenCodec::new(
        TokenCodec::new(b"0123456789abcdef0123456789abcdef", sharded.identity()).unwrap(),
    );
    let k1 = key_on(&sharded, "shard-1", 1);
    let k2 = key_on(&sharded, "shard-2", 1);
    let mut token = tower_scale::shard::ShardedToken::new();
    for (k, name) in [(k1, "one"), (k2, "two")] {
        let slot = i32::from(sharded.slot(&k));
        let w = sharded
            .write(
                &k,
                "INSERT INTO items (id, slot, name) VALUES ($1, $2, $3)",
                &[&k, &slot, &name],
            )
            .await
            .unwrap();
        token.merge(&w.token);
    }
    assert_eq!(token.shards().len(), 2);
    // Through a cookie and back.
    let text = codec.encode(&token);
    let token = codec.decode(&text).expect("decodes");
    // The replicas do not have the writes yet (the delay is real)...
    for local in &locals {
        let mut config = local.replica(0).config();
        config.dbname("ryw");
        let (c, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the replica has not applied the write yet");
    }
    // ...and reads presenting the token see both, on both shards.
    let consistency = ShardConsistency::ReadYourWrites(token.clone());
    for (k, name, shard) in [(k1, "one", "shard-1"), (k2, "two", "shard-2")] {
        assert!(matches!(
            consistency.on_shard(shard_id(shard)),
            Consistency::ReadYourWrites(_)
        ));
        let r = sharded
            .read(
                &k,
                &consistency,
                "SELECT name FROM items WHERE id = $1",
                &[&k],
            )
            .await
            .unwrap();
        assert_eq!(r.value.len(), 1, "{shard} sees the write");
        assert_eq!(r.value[0].get::<_, String>(0), name);
        assert_eq!(&*r.shard, shard);
        println!("{shard}: served by {} ({:?})", r.served_by, r.reason);
    }
    // A token that overflowed with other shards' writes: a shard it does
    // not list is read on its primary (its writes may be among the dropped).
    let mut crowded = tower_scale::shard::ShardedToken::new();
    for i in 0..9u64 {
        crowded.add(
            shard_id(&format!("elsewhere-{i}")),
            tower_scale::pg::ConsistencyToken::new(tower_scale::pg::Lsn(1)),
        );
    }
    assert!(crowded.overflowed());
    let r = sharded
        .read(
            &k1,
            &ShardConsistency::ReadYourWrites(crowded),
            "SELECT name FROM items WHERE id = $1",
            &[&k1],
        )
        .await
        .unwrap();
    assert_eq!(r.reason, tower_scale::pg::RouteReason::Primary);
    assert_eq!(r.value[0].get::<_, String>(0), "one");
    let all = sharded
        .read_all(&consistency, "SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(all.sum_i64(0).unwrap(), 2, "both writes, on every shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_all_names_a_stopped_or_stalled_shard_or_returns_partial_rows() {
    let locals: Vec<Arc<LocalCluster>> = (0..2)
        .map(|_| Arc::new(LocalCluster::start(0).unwrap()))
        .collect();
    database(&locals, "all_down").await;
    let short = |b: tower_scale::pg::ClusterBuilder| {
        b.primary_wait(Duration::from_millis(300))
            .read_timeout(Duration::from_secs(1))
            .pool_wait_timeout(Duration::from_secs(1))
            .pool_create_timeout(Duration::from_secs(1))
            .pool_recycle_timeout(Duration::from_secs(1))
            .probe_timeout(Duration::from_millis(300))
    };
    let deadline = Duration::from_millis(700);
    let sharded = sharded(&locals, "all_down", short, |b| b.read_all_timeout(deadline)).await;
    for k in 1..=40i64 {
        let slot = i32::from(sharded.slot(&k));
        sharded
            .write(
                &k,
                "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'x')",
                &[&k, &slot],
            )
            .await
            .unwrap();
    }
    // Every shard answers: merged in order with a limit, counted.
    let all = sharded
        .read_all(
            &ShardConsistency::Strong,
            "SELECT id FROM items ORDER BY id LIMIT 7",
            &[],
        )
        .await
        .unwrap();
    assert!(!all.partial);
    assert_eq!(all.shards.len(), 2);
    let ids: Vec<i64> = all
        .merge_sorted(7, |a, b| a.get::<_, i64>(0).cmp(&b.get::<_, i64>(0)))
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, (1..=7).collect::<Vec<i64>>());
    let lists: Vec<Vec<i64>> = all
        .shards
        .iter()
        .map(|s| s.rows.iter().map(|r| r.get(0)).collect())
        .collect();
    assert_eq!(merge_sorted(lists, 3, |a, b| a.cmp(b)), vec![1, 2, 3]);
    let counts = sharded
        .read_all(&ShardConsistency::Strong, "SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(counts.sum_i64(0).unwrap(), 40);
    // Another column, another type, a sum beyond i64: typed errors.
    assert!(matches!(counts.sum_i64(3), Err(ShardError::Combine(_))));
    let big = sharded
        .read_all(
            &ShardConsistency::Strong,
            "SELECT 9223372036854775807::int8, 'x'",
            &[],
        )
        .await
        .unwrap();
    assert!(matches!(big.sum_i64(0), Err(ShardError::Combine(_))));
    assert!(matches!(big.sum_i64(1), Err(ShardError::Combine(_))));

    // shard-2 stopped: a typed error naming it; partial rows on request.
    locals[1].primary().stop().unwrap();
    let sql = "SELECT id FROM items ORDER BY id";
    let err = sharded
        .read_all(&ShardConsistency::Strong, sql, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ShardError::Shards { failed } if failed.len() == 1),
        "{err}"
    );
    assert_eq!(err.shards(), vec!["shard-2"]);
    assert!(err.to_string().contains("shard-2"), "{err}");
    let partial = sharded
        .read_all_partial(&ShardConsistency::Strong, sql, &[])
        .await
        .unwrap();
    assert!(partial.partial);
    assert_eq!(partial.shards.len(), 1);
    assert_eq!(&*partial.shards[0].shard, "shard-1");
    assert!(!partial.shards[0].rows.is_empty());
    assert_eq!(partial.failed.len(), 1);
    assert_eq!(&*partial.failed[0].0, "shard-2");
    // The map still refreshes (shard-2 keeps the slots it had), and
    // shard-1's keys are still written.
    let map = sharded.refresh().await.unwrap();
    assert_eq!(map.slots_of("shard-2").len(), 2048);
    let k = (100i64..)
        .find(|k| map.owner(sharded.slot(k)) == Some("shard-1"))
        .unwrap();
    let slot = i32::from(sharded.slot(&k));
    sharded
        .write(
            &k,
            "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'y')",
            &[&k, &slot],
        )
        .await
        .unwrap();
    locals[1].primary().start().unwrap();

    // shard-1 stalled (SIGSTOP): the per-shard deadline bounds the wait.
    crate::until("shard-2 answers again", DEADLINE, async || {
        sharded
            .read_all(&ShardConsistency::Strong, sql, &[])
            .await
            .is_ok()
    })
    .await;
    locals[0].primary().pause().unwrap();
    let started = Instant::now();
    let err = sharded
        .read_all(&ShardConsistency::Strong, sql, &[])
        .await
        .unwrap_err();
    let took = started.elapsed();
    let partial = sharded
        .read_all_partial(&ShardConsistency::Strong, sql, &[])
        .await;
    locals[0].primary().resume().unwrap();
    println!("stalled shard: failed after {took:?}: {err}");
    assert_eq!(err.shards(), vec!["shard-1"]);
    assert!(
        took < deadline + Duration::from_millis(500),
        "took {took:?}"
    );
    let partial = partial.unwrap();
    assert!(partial.partial);
    assert_eq!(&*partial.shards[0].shard, "shard-2");
}

/// `read_hot`: with each shard's replica lagging past the lag budget (it
/// applies WAL a second late, writes flow), a plain `Any` read falls back
/// to the primary and a hot read stays on the replica, on both shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_read_stays_on_a_replica_past_the_lag_budget() {
    let locals: Vec<Arc<LocalCluster>> = (0..2)
        .map(|_| {
            Arc::new(
                LocalCluster::builder()
                    .replicas(1)
                    .apply_delay(0, Duration::from_secs(1))
                    .start()
                    .unwrap(),
            )
        })
        .collect();
    database(&locals, "hot").await;
    // The replicas stop replaying before the first start: they have no
    // ownership table yet.
    let replay = |pause: bool| {
        let locals = locals.clone();
        async move {
            for local in &locals {
                let c = local.replica(0).connect().await.unwrap();
                let sql = match pause {
                    true => "SELECT pg_wal_replay_pause()",
                    false => "SELECT pg_wal_replay_resume()",
                };
                c.execute(sql, &[]).await.unwrap();
            }
        }
    };
    replay(true).await;
    let sharded = sharded(
        &locals,
        "hot",
        |b| b.lag_budget(Duration::from_millis(100)),
        |b| b,
    )
    .await;
    let keys = [
        key_on(&sharded, "shard-1", 1),
        key_on(&sharded, "shard-2", 1),
    ];
    let sql = "SELECT name FROM items WHERE id = $1";
    for k in keys {
        let slot = i32::from(sharded.slot(&k));
        sharded
            .write(
                &k,
                "INSERT INTO items (id, slot, name) VALUES ($1, $2, 'hot')",
                &[&k, &slot],
            )
            .await
            .unwrap();
        // A replica without the table (behind the first start) cannot
        // answer: the read goes to the primary, not an error.
        let hot = sharded.read_hot(&k, sql, &[&k]).await.unwrap();
        assert!(hot.served_by.ends_with("-primary"), "{}", hot.served_by);
        assert_eq!(hot.value[0].get::<_, String>(0), "hot");
    }
    // Unless reads may not fall back to the primary: then the replica's
    // error is the answer.
    let strict = crate::sharded(&locals, "hot", |b| b.fallback_to_primary(false), |b| b).await;
    let err = strict
        .read_hot(&keys[0], sql, &[&keys[0]])
        .await
        .unwrap_err();
    let ShardError::Db { source, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        source.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE),
        "the replica's missing table: {err}"
    );
    replay(false).await;
    for local in &locals {
        local.wait_for_replicas(DEADLINE).await.unwrap();
    }
    // Writes flow on both shards all along, so the lag is seen.
    let writer = {
        let sharded = sharded.clone();
        tokio::spawn(async move {
            loop {
                for k in keys {
                    let sql = "UPDATE items SET name = 'hot' WHERE id = $1";
                    sharded.write(&k, sql, &[&k]).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for shard in ["shard-1", "shard-2"] {
        let cluster = sharded.shard(shard).unwrap();
        crate::until(&format!("{shard}'s replica lags"), DEADLINE, async || {
            cluster.next_probe().await;
            cluster.status()[1].lag > Duration::from_millis(300)
        })
        .await;
    }
    for (k, shard) in keys.iter().zip(["shard-1", "shard-2"]) {
        for _ in 0..10 {
            let plain = sharded
                .read(k, &ShardConsistency::Any, sql, &[k])
                .await
                .unwrap();
            assert_eq!(
                (&*plain.shard, &*plain.served_by),
                (shard, &*format!("{shard}-primary")),
                "a plain Any read avoids the lagging replica"
            );
            let hot = sharded.read_hot(k, sql, &[k]).await.unwrap();
            assert_eq!(
                (&*hot.shard, &*hot.served_by, hot.reason),
                (
                    shard,
                    &*format!("{shard}-replica-1"),
                    tower_scale::pg::RouteReason::HotKey
                ),
            );
            assert_eq!(hot.value.len(), 1, "the row, through the fence");
            assert_eq!(hot.value[0].get::<_, String>(0), "hot");
        }
    }
    writer.abort();
}
