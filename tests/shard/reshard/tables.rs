//! Tables a move could not attribute are refused: at build (declared
//! ones) and at the move's start (undeclared ones with rows).

use tower_scale::shard::ShardedCluster;

use super::MOVING;
use crate::{client, database, shared};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_cannot_be_attributed_is_refused() {
    let locals = shared();
    database(&locals, "reshard_refused").await;
    for local in &locals {
        let c = client(local, "reshard_refused").await;
        c.batch_execute(
            "CREATE TABLE nokey (id int8, v text); \
             CREATE TABLE uuids (id uuid PRIMARY KEY); \
             CREATE TABLE stray (id int8 PRIMARY KEY); \
             CREATE TABLE notes (id int8 PRIMARY KEY, owner int8)",
        )
        .await
        .expect("tables");
    }
    let build = |table: &'static str, key: &'static str| {
        let locals = locals.clone();
        async move {
            let mut builder = ShardedCluster::builder().table(table, key);
            for (i, local) in locals.iter().enumerate() {
                let c = crate::cluster(local, i + 1, "reshard_refused", |b| b).await;
                builder = builder.shard(format!("shard-{}", i + 1), c);
            }
            builder.build().await
        }
    };
    for (table, key, why) in [
        ("missing", "id", "no such table"),
        ("items", "nope", "no column"),
        ("nokey", "id", "no primary key"),
        ("uuids", "id", "type uuid"),
        // A nullable key outside the primary key: a NULL row has no slot.
        ("notes", "owner", "may be NULL"),
    ] {
        let e = build(table, key).await.unwrap_err().to_string();
        assert!(e.contains(why), "{table}.{key}: {e}");
    }
    // `stray` has rows and is not declared: a move refuses to start.
    client(&locals[0], "reshard_refused")
        .await
        .execute("INSERT INTO stray VALUES (1)", &[])
        .await
        .expect("stray row");
    let sharded = build("items", "id").await.expect("items is attributable");
    let e = sharded.move_slots(MOVING, "shard-2").await.unwrap_err();
    assert!(e.to_string().contains("public.stray"), "{e}");
}
