//! Reading the fence as an attacker would: tokens with 100 shards or
//! forged counts, slot numbers out of range, swapped shard names, odd
//! keys and statement shapes.

use std::time::{Duration, SystemTime};

use tower_scale::pg::{Consistency, ConsistencyToken, Lsn, TokenCodec};
use tower_scale::shard::{
    MAX_TOKEN_LEN, MAX_TOKEN_SHARDS, ShardConsistency, ShardError, ShardedCluster, ShardedToken,
    ShardedTokenCodec, SlotRange, shard_id,
};

use crate::{cluster, database, sharded, shared};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn codec(identity: u64) -> ShardedTokenCodec {
    ShardedTokenCodec::new(TokenCodec::new(KEY, identity).unwrap())
}

#[test]
fn a_token_for_100_shards_keeps_8_and_sends_the_rest_to_their_primaries() {
    let mut token = ShardedToken::new();
    for i in 0..100u64 {
        token.add(
            shard_id(&format!("shard-{i}")),
            ConsistencyToken::new(Lsn(1000 + i)),
        );
    }
    assert_eq!(token.shards().len(), MAX_TOKEN_SHARDS);
    assert!(token.overflowed());
    // The highest positions are kept.
    let kept = token.shards().iter().map(|(_, t)| t.lsn().0).min().unwrap();
    assert_eq!(kept, 1092);
    let c = codec(9);
    let text = c.encode(&token);
    assert!(
        text.len() <= MAX_TOKEN_LEN && MAX_TOKEN_LEN < 4096,
        "{} chars",
        text.len()
    );
    let back = c.decode(&text).expect("decodes");
    assert_eq!(back, token);
    // A dropped shard: its primary (the unknown token), never "any replica".
    assert_eq!(
        back.for_shard(shard_id("shard-0")),
        Consistency::ReadYourWrites(ConsistencyToken::unknown())
    );
    assert_eq!(
        back.for_shard(shard_id("shard-99")),
        Consistency::ReadYourWrites(ConsistencyToken::new(Lsn(1099)))
    );
    // Without overflow, a shard never written needs nothing.
    let one = ShardedToken::single(shard_id("a"), ConsistencyToken::new(Lsn(5)), 1);
    assert_eq!(one.for_shard(shard_id("b")), Consistency::Any);
}

#[test]
fn forged_foreign_expired_or_garbled_tokens_are_ignored() {
    use base64::Engine;
    let c = codec(9);
    let mut token = ShardedToken::single(shard_id("shard-1"), ConsistencyToken::new(Lsn(77)), 4);
    token.add(shard_id("shard-2"), ConsistencyToken::new(Lsn(88)));
    let text = c.encode(&token);
    for i in 0..text.len() {
        let mut chars: Vec<char> = text.chars().collect();
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let forged: String = chars.into_iter().collect();
        if forged != text {
            assert_eq!(c.decode(&forged), None, "position {i}");
        }
    }
    // A count of 200 entries, a flag nobody defined, a huge input.
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&text)
        .unwrap();
    for (at, value) in [(26usize, 200u8), (26, 9), (25, 0x80)] {
        let mut bad = raw.clone();
        bad[at] = value;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bad);
        assert_eq!(c.decode(&forged), None);
    }
    assert_eq!(c.decode(&"A".repeat(100_000)), None);
    assert_eq!(c.decode(""), None);
    // Another cluster identity; expired; from the future.
    assert_eq!(codec(10).decode(&text), None);
    let now = SystemTime::now();
    assert_eq!(
        c.decode(&c.encode_at(&token, now - Duration::from_secs(61))),
        None
    );
    assert_eq!(
        c.decode(&c.encode_at(&token, now + Duration::from_secs(3600))),
        None
    );
    // A single cluster's token is not a sharded one, and the reverse.
    let single = TokenCodec::new(KEY, 9).unwrap();
    let single_text = single.encode(ConsistencyToken::new(Lsn(5)));
    assert_eq!(c.decode(&single_text), None);
    assert_eq!(single.decode(&text), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_slots_names_and_setups_are_refused() {
    let locals = shared();
    database(&locals, "hostile_setup").await;
    let sharded = sharded(&locals, "hostile_setup", |b| b, |b| b).await;
    for range in [
        SlotRange::new(4096, 4096),
        SlotRange::new(0, 65535),
        SlotRange::new(9, 3),
    ] {
        let err = sharded.begin_move(range, "shard-2").await.unwrap_err();
        assert!(
            matches!(err, ShardError::SlotOutOfRange { .. }),
            "{range}: {err}"
        );
        let err = sharded.lift_fence(range).await.unwrap_err();
        assert!(
            matches!(err, ShardError::SlotOutOfRange { .. }),
            "lift_fence {range}: {err}"
        );
    }
    let err = sharded
        .move_ownership(SlotRange::one(1), "shard-9")
        .await
        .unwrap_err();
    assert!(matches!(err, ShardError::UnknownShard(_)), "{err}");
    let err = sharded
        .move_ownership(SlotRange::one(1), "shard-1")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ShardError::Setup(_)),
        "already the owner: {err}"
    );
    let err = sharded
        .move_ownership(SlotRange::new(2040, 2050), "shard-1")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ShardError::Setup(_)),
        "spans two owners: {err}"
    );
    assert_eq!(sharded.map().version(), 1, "nothing moved");

    // Another instance with the names swapped, or another slot count, or
    // one shard twice: refused before routing anything.
    let one = cluster(&locals[0], 1, "hostile_setup", |b| b).await;
    let two = cluster(&locals[1], 2, "hostile_setup", |b| b).await;
    let swapped = ShardedCluster::builder()
        .shard("shard-1", two.clone())
        .shard("shard-2", one.clone())
        .build()
        .await
        .unwrap_err();
    assert!(
        swapped.to_string().contains("records itself as"),
        "{swapped}"
    );
    let recount = ShardedCluster::builder()
        .shard("shard-1", one.clone())
        .shard("shard-2", two.clone())
        .slots(1024)
        .build()
        .await
        .unwrap_err();
    assert!(recount.to_string().contains("4096 slots"), "{recount}");
    for bad in [
        ShardedCluster::builder()
            .shard("shard-1", one.clone())
            .shard("shard-1", two.clone()),
        ShardedCluster::builder()
            .shard("shard-1", one.clone())
            .slots(0),
        ShardedCluster::builder()
            .shard("shard-1", one.clone())
            .slots(u16::MAX),
        ShardedCluster::builder(),
    ] {
        assert!(matches!(bad.build().await, Err(ShardError::Setup(_))));
    }

    // A first start that stopped half way (shard-2's slots never written):
    // the next start finishes the initial map instead of leaving half the
    // key space without an owner.
    crate::client(&locals[1], "hostile_setup")
        .await
        .execute("DELETE FROM tower_scale_shard_slots", &[])
        .await
        .unwrap();
    let restarted = ShardedCluster::builder()
        .shard("shard-1", one)
        .shard("shard-2", two)
        .build()
        .await
        .unwrap();
    assert_eq!(restarted.map().owner(3000), Some("shard-2"));
    assert_eq!(restarted.map().slots_of("shard-2").len(), 2048);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_keys_and_statement_shapes_read_right() {
    let locals = shared();
    database(&locals, "hostile_shapes").await;
    let sharded = sharded(&locals, "hostile_shapes", |b| b, |b| b).await;
    // A megabyte of key, NUL bytes, an empty key: all route.
    let big = "k".repeat(1 << 20);
    for key in [big.as_str(), "\0\0", ""] {
        assert!(sharded.shard_for(key).is_some());
        let r = sharded
            .read(key, &ShardConsistency::Strong, "SELECT $1::text", &[&"x"])
            .await
            .unwrap();
        assert_eq!(r.value.len(), 1);
    }
    // A statement naming more parameters than given is refused: the
    // fence's own parameter comes after the caller's and must not bind.
    let err = sharded
        .read(
            &1i64,
            &ShardConsistency::Strong,
            "SELECT $1::int4 + $2::int4",
            &[&1i32],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("$2"), "{err}");
    let key = 5i64;
    let slot = i32::from(sharded.slot(&key));
    let mut token = tower_scale::shard::ShardedToken::new();
    for i in 0..50i64 {
        let w = sharded
            .write(
                &key,
                "INSERT INTO items (id, slot, name) VALUES ($1, $2, $3)",
                &[&(1000 + i), &slot, &format!("n{i:02}")],
            )
            .await
            .unwrap();
        token.merge(&w.token);
    }
    // From a replica that has every write (or the primary).
    let consistency = ShardConsistency::ReadYourWrites(token);
    let read = |sql: &'static str| {
        let (sharded, consistency) = (sharded.clone(), consistency.clone());
        async move {
            sharded
                .read(&key, &consistency, sql, &[&slot])
                .await
                .unwrap()
                .value
        }
    };
    // Order kept, descending; a trailing semicolon and a trailing comment.
    let rows =
        read("SELECT id, name FROM items WHERE slot = $1 ORDER BY id DESC; -- newest first").await;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, (1000..1050).rev().collect::<Vec<_>>());
    // Duplicate column names, a CTE, VALUES, an empty result.
    let rows = read("SELECT id, id, name FROM items WHERE slot = $1 AND id = 1007").await;
    assert_eq!(
        (rows[0].get::<_, i64>(0), rows[0].get::<_, i64>(1)),
        (1007, 1007)
    );
    let rows =
        read("WITH x AS (SELECT count(*) AS n FROM items WHERE slot = $1) SELECT n FROM x").await;
    assert_eq!(rows[0].get::<_, i64>(0), 50);
    let rows = read("SELECT * FROM (VALUES (1), (2)) v(a) WHERE $1::int4 IS NOT NULL").await;
    assert_eq!(rows.len(), 2);
    let rows = read("SELECT id FROM items WHERE slot = $1 AND false").await;
    assert!(rows.is_empty(), "a true 'not found'");
    // A statement that is not a query is the caller's error, typed.
    let err = sharded
        .read(
            &key,
            &ShardConsistency::Any,
            "DELETE FROM items WHERE slot = $1",
            &[&slot],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ShardError::Db { .. }), "{err}");
    // A statement that would change the pooled session is refused before
    // it is fenced (checked once, when first fenced), and again the
    // second time (a refusal is not kept).
    for _ in 0..2 {
        let err = sharded
            .read(
                &key,
                &ShardConsistency::Any,
                "SELECT set_config('search_path', 'evil', false)",
                &[],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ShardError::Db {
                    source: tower_scale::pg::DbError::Refused { .. },
                    ..
                }
            ),
            "{err}"
        );
    }
    // Eight parameters (the fence's ninth on the stack) and twelve (past it).
    for n in [8usize, 12] {
        let values: Vec<i32> = (1..=n as i32).collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let sql = format!(
            "SELECT {}",
            (1..=n)
                .map(|i| format!("${i}::int4"))
                .collect::<Vec<_>>()
                .join(" + ")
        );
        let rows = sharded
            .read(&key, &ShardConsistency::Strong, &sql, &params)
            .await
            .unwrap()
            .value;
        let sum: i32 = rows[0].get(0);
        assert_eq!(sum, values.iter().sum::<i32>(), "{n} parameters");
    }
}

/// An instance over database `db` of both shared clusters, the shards
/// listed in `order`.
async fn first_start(
    locals: Vec<std::sync::Arc<tower_scale::testing::LocalCluster>>,
    db: &'static str,
    order: [usize; 2],
) -> Result<tower_scale::shard::ShardedCluster, tower_scale::shard::ShardError> {
    let mut builder = tower_scale::shard::ShardedCluster::builder();
    for i in order {
        let c = cluster(&locals[i], i + 1, db, |b| b).await;
        builder = builder.shard(format!("shard-{}", i + 1), c);
    }
    builder.build().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_with_shards_in_opposite_orders_agree_on_one_map() {
    let locals = shared();
    database(&locals, "shard_first_start").await;
    // Two instances on fresh databases, the shards listed in opposite
    // orders, built at the same time: each would claim its own even split.
    let (a, b) = tokio::join!(
        first_start(locals.clone(), "shard_first_start", [0, 1]),
        first_start(locals.clone(), "shard_first_start", [1, 0])
    );
    let (a, b) = (a.expect("sharded cluster"), b.expect("sharded cluster"));
    let (ma, mb) = (a.map(), b.map());
    assert_eq!(ma.ranges(), mb.ranges(), "{ma:?} vs {mb:?}");
    // No slot listed by both shards' tables.
    let mut listed = std::collections::HashMap::new();
    for (i, local) in locals.iter().enumerate() {
        let c = crate::client(local, "shard_first_start").await;
        for row in c
            .query("SELECT slot FROM tower_scale_shard_slots", &[])
            .await
            .unwrap()
        {
            let slot: i32 = row.get(0);
            if let Some(other) = listed.insert(slot, i) {
                panic!("slot {slot} listed by shard {other} and shard {i}");
            }
        }
    }
    assert_eq!(listed.len(), 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_on_a_repeatable_read_database_both_start() {
    let locals = shared();
    database(&locals, "shard_rr_start").await;
    for local in locals.iter() {
        let admin = local.primary().connect().await.expect("connect");
        admin
            .batch_execute(
                "ALTER DATABASE shard_rr_start SET default_transaction_isolation = 'repeatable read'",
            )
            .await
            .expect("default isolation");
    }
    // The set-up lock held by another session while both instances start:
    // both wait for it, each with its first statement sent (under
    // REPEATABLE READ, with a snapshot taken before the wait).
    const SETUP_LOCK: i64 = 0x7473_7368_6172_6401;
    let holder = crate::client(&locals[0], "shard_rr_start").await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&SETUP_LOCK])
        .await
        .expect("lock");
    let (a, b) = (
        tokio::spawn(first_start(locals.clone(), "shard_rr_start", [0, 1])),
        tokio::spawn(first_start(locals.clone(), "shard_rr_start", [0, 1])),
    );
    crate::until(
        "both instances wait for the set-up lock",
        crate::DEADLINE,
        async || {
            holder
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await
                .expect("locks")
                .get::<_, i64>(0)
                == 2
        },
    )
    .await;
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&SETUP_LOCK])
        .await
        .expect("unlock");
    let (a, b) = (a.await.expect("task"), b.await.expect("task"));
    let (a, b) = (
        a.expect("the first instance"),
        b.expect("the second instance"),
    );
    assert_eq!(a.map().ranges(), b.map().ranges());
}
