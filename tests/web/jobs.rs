//! The welcome job (issue 20 item 6): `POST /users` enqueues it in the
//! insert's transaction, a worker in the same process marks the user
//! welcomed and invalidates `user:{id}`; `--workers 0` leaves the job
//! waiting; a `users` table from before `welcomed_at` gets the column.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tower_scale::testing::LocalCluster;

use super::{Client2, KEY, Reply, start_users};

const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `GET /users/{id}` until it says `"welcomed": true`; how long that
/// took.
pub(super) async fn until_welcomed(client: &mut Client2, addr: &str, id: i64) -> Duration {
    let started = Instant::now();
    loop {
        let r = client
            .send(addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        assert_eq!(r.status, 200, "GET /users/{id}: {}", r.body);
        assert_user_shape(&r.body);
        if r.body["welcomed"] == true {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "user {id} not welcomed after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A user object: exactly `id`, `name` and `welcomed`, of their types.
pub(super) fn assert_user_shape(body: &serde_json::Value) {
    let keys: BTreeSet<&str> = body
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {body}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["id", "name", "welcomed"]),
        "fields of {body}"
    );
    assert!(body["id"].is_i64() && body["name"].is_string() && body["welcomed"].is_boolean());
}

async fn create(client: &mut Client2, addr: &str, name: &str) -> Reply {
    let r = client
        .send(
            addr,
            "POST",
            "/users",
            Some(serde_json::json!({ "name": name })),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_user_shape(&r.body);
    assert_eq!(r.body["name"], name);
    assert_eq!(r.body["welcomed"], false, "not welcomed at creation");
    r
}

/// The welcome job of user `id` in the jobs table: its state and attempts.
async fn job_of(plain: &tokio_postgres::Client, id: i64) -> Option<(String, i32)> {
    plain
        .query_opt(
            "SELECT state, attempts FROM tower_scale_jobs
             WHERE queue = 'welcome' AND (payload->>'user')::bigint = $1",
            &[&id],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_is_welcomed_by_the_worker_in_its_process() {
    let local = tokio::task::block_in_place(|| LocalCluster::start(1).unwrap());
    // No change feed: only the worker's own invalidation can replace a
    // cached `"welcomed": false`.
    let app = tokio::task::block_in_place(|| {
        start_users("axum_users", &local, KEY, &["--no-change-feed".into()])
    });
    local.wait_for_replicas(DEADLINE).await.unwrap();
    let plain = local.primary().connect().await.unwrap();
    let mut client = Client2::new(true);
    let mut delays = Vec::new();
    for i in 0..20 {
        let created = create(&mut client, &app.addr, &format!("welcome-{i}")).await;
        let started = Instant::now();
        assert!(created.cookie.is_some(), "the commit's token in the cookie");
        assert_eq!(created.served_by, "primary");
        let id = created.body["id"].as_i64().unwrap();
        until_welcomed(&mut client, &app.addr, id).await;
        delays.push(started.elapsed());
        let welcomed_at: Option<std::time::SystemTime> = plain
            .query_one("SELECT welcomed_at FROM users WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert!(welcomed_at.is_some());
    }
    delays.sort();
    println!(
        "POST /users to a GET saying \"welcomed\": true (20 users, replica in step, the cookie's token): \
         min {:?}, median {:?}, max {:?}",
        delays[0], delays[10], delays[19]
    );
    // Done jobs are deleted.
    let started = Instant::now();
    loop {
        let left: i64 = plain
            .query_one(
                "SELECT count(*) FROM tower_scale_jobs WHERE queue = 'welcome'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "{left} welcome jobs left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_workers_0_the_job_waits_and_another_instance_runs_it() {
    let local = tokio::task::block_in_place(|| LocalCluster::start(0).unwrap());
    let idle = tokio::task::block_in_place(|| {
        start_users("axum_users", &local, KEY, &["--workers".into(), "0".into()])
    });
    let plain = local.primary().connect().await.unwrap();
    let mut client = Client2::new(false);
    let created = create(&mut client, &idle.addr, "waiting").await;
    let id = created.body["id"].as_i64().unwrap();
    // Committed with the user, before the 201: no worker took it.
    assert_eq!(job_of(&plain, id).await, Some(("ready".into(), 0)));
    for _ in 0..2 {
        let r = client
            .send(&idle.addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        assert_user_shape(&r.body);
        assert_eq!(r.body["welcomed"], false);
    }
    assert_eq!(
        job_of(&plain, id).await,
        Some(("ready".into(), 0)),
        "still waiting"
    );
    // An instance with workers takes it; its write reaches the idle
    // instance's cache through the change feed, like any write.
    let busy = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &[]));
    let on_busy = until_welcomed(&mut client, &busy.addr, id).await;
    let on_idle = until_welcomed(&mut client, &idle.addr, id).await;
    println!(
        "a job left by --workers 0 done by another instance: welcomed there after {on_busy:?}, \
         then on the idle instance (change feed) {on_idle:?} later"
    );
    // Deleted once the worker settles it (in its next batch).
    let started = Instant::now();
    while let Some(job) = job_of(&plain, id).await {
        assert!(started.elapsed() < DEADLINE, "never deleted: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_table_from_before_welcomed_at_gets_the_column() {
    let local = tokio::task::block_in_place(|| LocalCluster::start(0).unwrap());
    let plain = local.primary().connect().await.unwrap();
    plain
        .batch_execute(
            "CREATE TABLE users (id bigserial primary key, name text not null);
             INSERT INTO users (name) VALUES ('old-timer');",
        )
        .await
        .unwrap();
    let app = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &[]));
    let column: Option<String> = plain
        .query_opt(
            "SELECT data_type FROM information_schema.columns
             WHERE table_name = 'users' AND column_name = 'welcomed_at'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert_eq!(column.as_deref(), Some("timestamp with time zone"));
    let mut client = Client2::new(true);
    // The old row: there, never enqueued, so never welcomed.
    let old = client.send(&app.addr, "GET", "/users/1", None, &[]).await;
    assert_eq!(old.status, 200);
    assert_eq!(
        old.body,
        serde_json::json!({ "id": 1, "name": "old-timer", "welcomed": false })
    );
    let renamed = client
        .send(
            &app.addr,
            "PUT",
            "/users/1",
            Some(serde_json::json!({ "name": "old-timer-2" })),
            &[],
        )
        .await;
    assert_eq!(
        (renamed.status, &renamed.body),
        (
            200,
            &serde_json::json!({ "id": 1, "name": "old-timer-2", "welcomed": false })
        )
    );
    let created = create(&mut client, &app.addr, "newcomer").await;
    let id = created.body["id"].as_i64().unwrap();
    until_welcomed(&mut client, &app.addr, id).await;
    // A second instance on the table that has the column starts as well.
    let again = tokio::task::block_in_place(|| start_users("axum_users", &local, KEY, &[]));
    let r = client
        .send(&again.addr, "GET", &format!("/users/{id}"), None, &[])
        .await;
    assert_eq!(r.body["welcomed"], true);
    let deleted = client
        .send(&again.addr, "DELETE", "/users/1", None, &[])
        .await;
    assert_eq!(deleted.status, 204);
}

#[test]
fn bad_workers_values_print_usage_and_exit_2() {
    for (name, value) in [
        ("axum_users", Some("x")),
        ("axum_users", Some("-1")),
        ("axum_users", Some("1000000")),
        ("axum_users", None),
        ("tonic_users", Some("2")),
    ] {
        let mut args = vec!["--listen", "127.0.0.1:0", "--workers"];
        args.extend(value);
        let out = std::process::Command::new(super::common::example(name))
            .args(&args)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}");
        assert!(
            stderr.contains("usage:") && stderr.contains("--workers"),
            "{name} {args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// In-process, where the test decides when the worker starts: a user
/// cached as `"welcomed": false` (a hit) is read again as `true` once the
/// worker has run, with no change feed, in the users cache and in the
/// HTTP cache (`--http-cache`).
#[cfg(all(feature = "queue", feature = "change-feed", feature = "shard"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_s_update_evicts_the_cached_user() {
    use super::axum_users::{self, users};
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn send(
        app: &axum::Router,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, Option<String>, serde_json::Value) {
        // The HTTP cache keys by authority: a Host, as a client sends.
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "users.test");
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Body::from(body.unwrap_or_default().to_string()))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let by = res
            .headers()
            .get("x-served-by")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let cookie = res
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_string);
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            by,
            cookie,
            serde_json::from_slice(&bytes).unwrap_or_default(),
        )
    }

    let local = tokio::task::block_in_place(|| LocalCluster::start(1).unwrap());
    let backend = users::backend(&users::Args::in_process(&local))
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    let metrics = || {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle()
    };
    let (http_app, _tier, http) = axum_users::http_cached_router(&backend, metrics(), None)
        .await
        .unwrap();
    let plain_app = axum_users::router(&backend, metrics());
    for (mode, app, http) in [
        ("users cache", plain_app, None),
        ("HTTP cache", http_app, Some(http)),
    ] {
        let (status, _, cookie, body) =
            send(&app, "POST", "/users", None, Some(r#"{"name":"eve"}"#)).await;
        assert_eq!(
            (status, &body["welcomed"]),
            (201, &serde_json::json!(false))
        );
        let id = body["id"].as_i64().unwrap();
        let path = format!("/users/{id}");
        let cookie = cookie.unwrap();
        // Cached as not welcomed: a hit.
        let started = Instant::now();
        loop {
            let (_, by, _, body) = send(&app, "GET", &path, Some(&cookie), None).await;
            assert_eq!(body["welcomed"], false, "{mode}: no worker yet");
            if by == "cache" {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "{mode}: never cached");
        }
        let depth = backend.welcome.depth().await.unwrap();
        assert_eq!(depth.ready, 1, "{mode}: the job waits");
        let worker = axum_users::users_app::welcome_worker(&backend, http, 1)
            .start()
            .unwrap();
        let started = Instant::now();
        let by = loop {
            let (_, by, _, body) = send(&app, "GET", &path, Some(&cookie), None).await;
            if body["welcomed"] == true {
                break by;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{mode}: the cached user was never invalidated"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        println!(
            "{mode}: cached \"welcomed\": false replaced by true {:?} after the worker started (read from {by})",
            started.elapsed()
        );
        assert_ne!(by, "cache", "{mode}: read again after the invalidation");
        let started = Instant::now();
        loop {
            let (_, by, _, body) = send(&app, "GET", &path, Some(&cookie), None).await;
            assert_eq!(body["welcomed"], true, "{mode}: from {by}");
            if by == "cache" {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "{mode}: never cached again");
        }
        let report = worker.shutdown(Duration::from_secs(5)).await;
        assert_eq!(report.unsettled, 0, "{mode}: {report:?}");
    }
    backend.cluster.shutdown();
}
