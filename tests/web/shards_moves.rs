//! `POST /admin/shards/move` and `GET /admin/shards/moves/{id}` on
//! `axum_users --shards 2` as a real process: a quarter of the slots and
//! their users move from shard-1 to shard-2 while users are created and
//! renamed, every acknowledged write is there afterwards, and the routes
//! answer 401, 400, 404 and 409 as documented.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Client2, KEY, common};

const ADMIN: &str = "move-them";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_through_the_admin_routes_loses_no_user() {
    let service = common::start(
        "axum_users",
        &[
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--token-key",
            KEY,
            "--admin-token",
            ADMIN,
        ],
    );
    let addr = service.addr.clone();
    let auth = [("authorization", "Bearer move-them")];
    let mut client = Client2::new(true);
    let mut users: BTreeMap<i64, String> = BTreeMap::new();
    for i in 0..100 {
        let name = format!("before-{i}");
        let body = Some(serde_json::json!({ "name": name }));
        let r = client.send(&addr, "POST", "/users", body, &[]).await;
        assert_eq!(r.status, 201, "{}", r.body);
        users.insert(r.body["id"].as_i64().unwrap(), name);
    }

    // Bad requests first: each answers without starting anything.
    let post = |body: serde_json::Value| Some(body);
    for (body, headers, status) in [
        (
            post(serde_json::json!({"from": 0, "to": 1023, "shard": "shard-2"})),
            &[][..],
            401,
        ),
        (
            post(serde_json::json!({"from": 10, "to": 5, "shard": "shard-2"})),
            &auth[..],
            400,
        ),
        (
            post(serde_json::json!({"from": 0, "to": 4096, "shard": "shard-2"})),
            &auth[..],
            400,
        ),
        (
            post(serde_json::json!({"from": 0, "to": 10, "shard": "shard-9"})),
            &auth[..],
            400,
        ),
        (
            post(serde_json::json!({"from": 0, "to": 10})),
            &auth[..],
            400,
        ),
        // shard-1 owns 0..=2047 already; 2000..=2100 spans two owners.
        (
            post(serde_json::json!({"from": 0, "to": 10, "shard": "shard-1"})),
            &auth[..],
            400,
        ),
        (
            post(serde_json::json!({"from": 2000, "to": 2100, "shard": "shard-1"})),
            &auth[..],
            400,
        ),
        (post(serde_json::json!("not an object")), &auth[..], 400),
    ] {
        let r = client
            .send(&addr, "POST", "/admin/shards/move", body.clone(), headers)
            .await;
        assert_eq!(r.status, status, "{body:?}: {}", r.body);
        assert!(r.body["error"].is_string(), "{}", r.body);
    }
    let r = client
        .send(&addr, "GET", "/admin/shards/moves/nope", None, &auth)
        .await;
    assert_eq!(r.status, 404);

    // A writer renaming and creating users all along.
    let writer = {
        let addr = addr.clone();
        let ids: Vec<i64> = users.keys().copied().collect();
        tokio::spawn(async move {
            let mut c = Client2::new(false);
            let mut acknowledged = BTreeMap::new();
            let started = Instant::now();
            let mut n = 0usize;
            while started.elapsed() < Duration::from_secs(3) {
                let id = ids[n % ids.len()];
                let name = format!("during-{n}");
                let body = Some(serde_json::json!({ "name": name }));
                let r = c
                    .send(&addr, "PUT", &format!("/users/{id}"), body, &[])
                    .await;
                assert_eq!(r.status, 200, "PUT during the move: {}", r.body);
                acknowledged.insert(id, name);
                if n.is_multiple_of(5) {
                    let name = format!("new-{n}");
                    let body = Some(serde_json::json!({ "name": name }));
                    let r = c.send(&addr, "POST", "/users", body, &[]).await;
                    assert_eq!(r.status, 201, "POST during the move: {}", r.body);
                    acknowledged.insert(r.body["id"].as_i64().unwrap(), name);
                }
                n += 1;
            }
            acknowledged
        })
    };
    let body = Some(serde_json::json!({"from": 1024, "to": 2047, "shard": "shard-2"}));
    let r = client
        .send(&addr, "POST", "/admin/shards/move", body, &auth)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["move"].as_str().unwrap().to_string();
    // Another move of overlapping slots while it runs.
    let body = Some(serde_json::json!({"from": 2000, "to": 2047, "shard": "shard-2"}));
    let r = client
        .send(&addr, "POST", "/admin/shards/move", body, &auth)
        .await;
    assert_eq!(r.status, 409, "{}", r.body);

    let path = format!("/admin/shards/moves/{id}");
    let mut phases = Vec::new();
    let took = common::until("the move is done", Duration::from_secs(60), async || {
        let r = client.send(&addr, "GET", &path, None, &auth).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body["error"].is_null(), "{}", r.body);
        assert!(r.body["rows_copied"].is_u64() && r.body["bytes_behind"].is_u64());
        let phase = r.body["phase"].as_str().unwrap().to_string();
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        r.body["done"] == true
    })
    .await;
    let r = client.send(&addr, "GET", &path, None, &auth).await;
    eprintln!(
        "move {id}: phases {phases:?}, done after {took:?}: {}",
        r.body
    );
    assert_eq!(r.body["phase"], "done");
    let acknowledged = writer.await.unwrap();
    eprintln!("{} writes acknowledged during the move", acknowledged.len());
    users.extend(acknowledged);

    // The map, and every user with its last acknowledged name.
    let r = client
        .send(&addr, "GET", "/admin/shards", None, &auth)
        .await;
    let slots = r.body["slots"].as_array().unwrap();
    let owner_of = |slot: u64| {
        slots
            .iter()
            .find(|s| s["from"].as_u64() <= Some(slot) && Some(slot) <= s["to"].as_u64())
            .map(|s| s["shard"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(owner_of(1024).as_deref(), Some("shard-2"), "{}", r.body);
    assert_eq!(owner_of(1023).as_deref(), Some("shard-1"), "{}", r.body);
    let mut reader = Client2::new(false);
    for (id, name) in &users {
        // Without a cookie: the replicas replay the last writes at once.
        common::until(
            "the user's last name",
            Duration::from_secs(10),
            async || {
                let r = reader
                    .send(&addr, "GET", &format!("/users/{id}"), None, &[])
                    .await;
                r.status == 200 && r.body["name"] == name.as_str()
            },
        )
        .await;
    }
    eprintln!(
        "{} users read back after the move, each with its last name",
        users.len()
    );
}
