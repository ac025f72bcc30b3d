//! The sharded `axum_users`' users cache across instances and shards, as
//! real processes: an instance hears a move made elsewhere and drops the
//! moved slot's entries, the cookie reads its write across the move, and
//! shards whose WAL positions differ widely (each is its own numbering)
//! do not keep each other's reads out of the cache.

use std::time::Duration;

use super::{Client2, KEY, common};
use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::shard::{ShardedCluster, SlotRange};
use tower_scale::testing::LocalCluster;

/// The shard part of an `x-served-by` (`east/primary` -> `east`).
fn shard_of(served_by: &str) -> &str {
    served_by.split('/').next().unwrap_or_default()
}

/// Two instances on `east` and `west` (no replicas): east's WAL is ~48 MB
/// ahead of west's. A user on west, read twice through instance 1, is a
/// hit the second time (one cache over both shards took east's position,
/// where its change feed started, as the floor for every fill). Then the
/// user's slot moves to east (its row copied in the move, by an operator's
/// handle): instance 1 hears of it and reads the user from east; instance
/// 2 renames it, and instance 1 answers the cookie with the new name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_hears_a_move_reads_the_cookies_write_and_shards_keep_their_own_positions() {
    let start = || std::thread::spawn(|| LocalCluster::builder().replicas(0).start().unwrap());
    let (a, b) = (start(), start());
    let (east, west) = (a.join().unwrap(), b.join().unwrap());
    {
        // Three WAL segments on east: its positions pass west's by far.
        let c = east.primary().connect().await.unwrap();
        c.batch_execute("CREATE TABLE wal_filler (n int)")
            .await
            .unwrap();
        for n in 0..3 {
            c.execute("INSERT INTO wal_filler VALUES ($1)", &[&n])
                .await
                .unwrap();
            c.execute("SELECT pg_switch_wal()", &[]).await.unwrap();
        }
    }
    let flags = [
        format!("east={}", east.primary().url()),
        format!("west={}", west.primary().url()),
    ];
    let instance = |id: &'static str| {
        common::start(
            "axum_users",
            &[
                "--listen",
                "127.0.0.1:0",
                "--shard",
                &flags[0],
                "--shard",
                &flags[1],
                "--token-key",
                KEY,
                "--instance-id",
                id,
            ],
        )
    };
    let (one, two) = (instance("1"), instance("2"));
    let (one, two) = (one.addr.as_str(), two.addr.as_str());
    let mut client = Client2::new(true);

    // A user on west (ids are time-ordered: create until one lands there).
    let mut on_west = None;
    for i in 0..50 {
        let body = serde_json::json!({ "name": format!("w-{i}") });
        let r = client.send(one, "POST", "/users", Some(body), &[]).await;
        assert_eq!(r.status, 201, "{}", r.body);
        if shard_of(&r.served_by) == "west" {
            on_west = r.body["id"].as_i64();
            break;
        }
    }
    let id = on_west.expect("a user on west within 50 creates");
    let path = format!("/users/{id}");
    // Its welcome job's update invalidates it: let that happen first.
    common::until(
        "the user is welcomed",
        Duration::from_secs(10),
        async || {
            let r = client.send(one, "GET", &path, None, &[]).await;
            r.body["welcomed"] == true
        },
    )
    .await;
    // West's reads are stored (and hit) once its change feed has started
    // and the monitor's view of its position passed the latest
    // invalidation: with one cache over both shards, east's positions
    // (the floor its feed's start set) would keep them out for good.
    let mut anonymous = Client2::new(false);
    let stored = common::until(
        "a hit on west's user",
        Duration::from_secs(10),
        async || anonymous.send(one, "GET", &path, None, &[]).await.served_by == "cache",
    )
    .await;
    eprintln!("west's user read from the cache {stored:?} after its welcome");
    let first = anonymous.send(one, "GET", &path, None, &[]).await;
    assert_eq!(first.status, 200);
    // Instance 1's cache now holds the user from west.
    let cached = client.send(one, "GET", &path, None, &[]).await;
    assert_eq!(
        (cached.status, &cached.body["name"]),
        (200, &first.body["name"])
    );

    // The move, by an operator's handle: the row is copied in the move's
    // target transaction, the ownership changes with it.
    let handle = |local: &LocalCluster| {
        let url = local.primary().url();
        async move {
            Cluster::builder()
                .primary(NodeConfig::from_url(&url).unwrap())
                .build()
                .await
                .unwrap()
        }
    };
    let sharded = ShardedCluster::builder()
        .shard("east", handle(&east).await)
        .shard("west", handle(&west).await)
        .build()
        .await
        .unwrap();
    let slot = sharded.slot(&id);
    let row = west
        .primary()
        .connect()
        .await
        .unwrap()
        .query_one("SELECT name FROM users WHERE id = $1", &[&id])
        .await
        .unwrap();
    let name: String = row.get(0);
    let mv = sharded
        .begin_move(SlotRange::one(slot), "east")
        .await
        .unwrap();
    mv.target()
        .execute(
            "INSERT INTO users (id, name) VALUES ($1, $2)",
            &[&id, &name],
        )
        .await
        .unwrap();
    mv.commit().await.unwrap();

    // Instance 1 hears the move (the map announcement on the shards'
    // primaries): its cache drops the slot's entries, and the next read
    // fills from east.
    common::until(
        "instance 1 reads the user from east",
        Duration::from_secs(10),
        async || {
            let r = anonymous.send(one, "GET", &path, None, &[]).await;
            r.status == 200 && shard_of(&r.served_by) == "east"
        },
    )
    .await;
    // Instance 2 renames it (its map too came from the announcement),
    // and its cookie carries the new map's version.
    let rename = Some(serde_json::json!({ "name": "after-the-move" }));
    let r = client.send(two, "PUT", &path, rename, &[]).await;
    assert_eq!(
        (r.status, shard_of(&r.served_by)),
        (200, "east"),
        "{}",
        r.body
    );
    // Instance 1 never heard of the move: the cookie still reads the write.
    let r = client.send(one, "GET", &path, None, &[]).await;
    assert_eq!(
        (r.status, &r.body["name"]),
        (200, &"after-the-move".into()),
        "instance 1 answered the cookie from {}",
        r.served_by
    );
    assert_eq!(shard_of(&r.served_by), "east", "{}", r.served_by);
    // And its cache no longer answers anyone with the moved slot's entry.
    let r = anonymous.send(one, "GET", &path, None, &[]).await;
    assert_eq!(r.body["name"], "after-the-move", "{}", r.served_by);
}
