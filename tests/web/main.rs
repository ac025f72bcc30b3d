//! Routing and caching as one stack, over HTTP: the `axum_users` example
//! run as real processes against a LocalCluster, driven by a real client
//! that keeps (or drops) the consistency cookie.

#[path = "../common/mod.rs"]
mod common;
#[cfg(feature = "change-feed")]
mod feed;
mod grpc;
mod http_cache;
mod jobs;
mod layer;
#[cfg(feature = "shard")]
mod shards;
#[cfg(feature = "shard")]
mod shards_cache;
#[cfg(feature = "reshard")]
mod shards_moves;

// In-process for `jobs`, where a test decides when the worker starts.
#[cfg(all(feature = "queue", feature = "change-feed", feature = "reshard"))]
#[path = "../../examples/axum_users.rs"]
#[allow(dead_code, unreachable_pub)]
mod axum_users;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_scale::pg::{Cluster, ConsistencyToken, Lsn, NodeConfig, TokenCodec};
use tower_scale::testing::LocalCluster;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

/// Starts a users example against `local`'s nodes with `key` and `extra` flags.
pub(crate) fn start_users(
    example: &str,
    local: &LocalCluster,
    key: &str,
    extra: &[String],
) -> common::Running {
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--primary".into(),
        local.primary().url(),
    ];
    for r in local.replicas() {
        args.push("--replica".into());
        args.push(r.url());
    }
    args.push("--token-key".into());
    args.push(key.into());
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::start(example, &args)
}

fn users(local: &LocalCluster, key: &str) -> common::Running {
    start_users("axum_users", local, key, &[])
}

/// The body of `GET {path}` as text (`/metrics`).
async fn get_text(addr: &str, path: &str) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

struct Reply {
    status: u16,
    served_by: String,
    /// The RFC 9211 `Cache-Status` field, if any.
    cache_status: Option<String>,
    cookie: Option<String>,
    body: serde_json::Value,
}

struct Client2 {
    http: Client<HttpConnector, Full<Bytes>>,
    cookie: Option<String>,
    keep_cookie: bool,
}

impl Client2 {
    fn new(keep_cookie: bool) -> Self {
        Self {
            http: Client::builder(TokioExecutor::new()).build_http(),
            cookie: None,
            keep_cookie,
        }
    }

    async fn send(
        &mut self,
        addr: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(c) = self.cookie.as_ref().filter(|_| self.keep_cookie) {
            req = req.header("cookie", c.as_str());
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let res = self
            .http
            .request(req.body(Full::new(payload)).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let served_by = res
            .headers()
            .get("x-served-by")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let cache_status = res
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let cookie = res
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_string);
        if cookie.is_some() {
            self.cookie = cookie.clone();
        }
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Reply {
            status,
            served_by,
            cache_status,
            cookie,
            body,
        }
    }
}

fn name(reply: &Reply) -> Option<&str> {
    reply.body.get("name").and_then(|v| v.as_str())
}

/// 200 write-then-read pairs (alternating POST and PUT); returns how many
/// reads saw their write and how many were served by a replica or the cache.
async fn pairs(addr: &str, client: &mut Client2, n: usize) -> (usize, usize) {
    let (mut seen, mut off_primary) = (0, 0);
    let mut id = 0;
    for i in 0..n {
        let want = format!("name-{i}");
        if i % 2 == 0 {
            let r = client
                .send(
                    addr,
                    "POST",
                    "/users",
                    Some(serde_json::json!({ "name": want })),
                    &[],
                )
                .await;
            assert_eq!(r.status, 201);
            id = r.body["id"].as_i64().unwrap();
        } else {
            let r = client
                .send(
                    addr,
                    "PUT",
                    &format!("/users/{id}"),
                    Some(serde_json::json!({ "name": want })),
                    &[],
                )
                .await;
            assert_eq!(r.status, 200);
        }
        let got = client
            .send(addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        if got.status == 200 && name(&got) == Some(want.as_str()) {
            seen += 1;
        }
        if got.served_by != "primary" {
            off_primary += 1;
        }
    }
    (seen, off_primary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_gives_read_your_writes_through_a_lagging_replica() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .unwrap();
    let app = tokio::task::block_in_place(|| users(&local, KEY));
    // The app created its table; let the (lagging) replica have it too.
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut with_cookie = Client2::new(true);
    let (seen, _) = pairs(&app.addr, &mut with_cookie, 200).await;
    assert_eq!(seen, 200, "every read with the cookie saw its write");
    let mut without = Client2::new(false);
    let (seen, _) = pairs(&app.addr, &mut without, 50).await;
    eprintln!("without the cookie: {seen}/50 reads saw their write");
    assert!(
        seen < 50,
        "without the cookie at least one read is stale (the test can fail)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_undelayed_replica_reads_leave_the_primary() {
    let local = LocalCluster::start(1).unwrap();
    let app = tokio::task::block_in_place(|| users(&local, KEY));
    // The app created its table; let the (lagging) replica have it too.
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = Client2::new(true);
    let (seen, off_primary) = pairs(&app.addr, &mut client, 200).await;
    eprintln!(
        "undelayed replica: {seen}/200 saw their write, {off_primary}/200 served by a replica or the cache"
    );
    assert_eq!(seen, 200);
    assert!(off_primary >= 160, "{off_primary}/200 off the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_meet_cache_stamps_and_a_lagging_fill_is_not_stored() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .unwrap();
    let app = tokio::task::block_in_place(|| users(&local, KEY));
    // The app created its table; let the (lagging) replica have it too.
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = Client2::new(true);
    let created = client
        .send(
            &app.addr,
            "POST",
            "/users",
            Some(serde_json::json!({ "name": "old" })),
            &[],
        )
        .await;
    let id = created.body["id"].as_i64().unwrap();
    // The welcome worker's write comes first: it would evict the entry
    // this test expects a hit on.
    jobs::until_welcomed(&mut client, &app.addr, id).await;
    let path = format!("/users/{id}");
    let first = client.send(&app.addr, "GET", &path, None, &[]).await;
    assert_eq!(name(&first), Some("old"));
    let second = client.send(&app.addr, "GET", &path, None, &[]).await;
    assert_eq!(
        second.served_by, "cache",
        "an entry filled at or above the token is a hit"
    );
    // The replica has the old row; then a write, and a tokenless read
    // served by the lagging replica (which still has the old row).
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    client
        .send(
            &app.addr,
            "PUT",
            &path,
            Some(serde_json::json!({ "name": "new" })),
            &[],
        )
        .await;
    let mut tokenless = Client2::new(false);
    let lagging = tokenless.send(&app.addr, "GET", &path, None, &[]).await;
    assert_eq!(
        name(&lagging),
        Some("old"),
        "served by {}",
        lagging.served_by
    );
    assert_eq!(lagging.served_by, "replica-1");
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let after = tokenless.send(&app.addr, "GET", &path, None, &[]).await;
    assert_eq!(
        name(&after),
        Some("new"),
        "the lagging read did not put the old row back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_ignored_safely_and_quickly() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .unwrap();
    let a = tokio::task::block_in_place(|| users(&local, KEY));
    let b = tokio::task::block_in_place(|| users(&local, OTHER_KEY));
    // The app created its table; let the (lagging) replica have it too.
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = Client2::new(true);
    let created = client
        .send(
            &a.addr,
            "POST",
            "/users",
            Some(serde_json::json!({ "name": "x" })),
            &[],
        )
        .await;
    let token = created.cookie.clone().unwrap();
    let path = format!("/users/{}", created.body["id"]);
    // Signed with another key: ignored by instance b, which reads the lagging replica.
    let mut carry = Client2::new(true);
    carry.cookie = Some(token.clone());
    let other = carry.send(&b.addr, "GET", &path, None, &[]).await;
    assert_eq!(
        other.status, 404,
        "b ignored a's token and read the lagging replica"
    );
    assert_eq!(other.served_by, "replica-1");
    // Garbage of every kind: answered normally and quickly.
    let cluster = Cluster::builder()
        .primary(NodeConfig::from_url(&local.primary().url()).unwrap())
        .build()
        .await
        .unwrap();
    let key: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let codec = TokenCodec::new(&key, cluster.identity()).unwrap();
    let future = codec.encode_at(
        ConsistencyToken::new(Lsn(u64::MAX)),
        std::time::SystemTime::now() + Duration::from_secs(3600),
    );
    let expired = codec.encode_at(
        ConsistencyToken::new(Lsn(1)),
        std::time::SystemTime::now() - Duration::from_secs(3600),
    );
    let valid = codec.encode(ConsistencyToken::new(Lsn(1)));
    let mut forged = valid.clone().into_bytes();
    forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let huge = "A".repeat(6000);
    let mut plain = Client2::new(false);
    for bad in [
        huge.as_str(),
        "!!!",
        "",
        forged.as_str(),
        future.as_str(),
        expired.as_str(),
        "tower_scale_token=;;;",
    ] {
        let started = Instant::now();
        let r = plain
            .send(&a.addr, "GET", &path, None, &[("x-consistency-token", bad)])
            .await;
        assert!(matches!(r.status, 200 | 404), "{}: {}", bad.len(), r.status);
        let cookie = format!("tower_scale_token={bad}");
        let r2 = plain
            .send(&a.addr, "GET", &path, None, &[("cookie", cookie.as_str())])
            .await;
        assert!(matches!(r2.status, 200 | 404));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a bad token made the request wait"
        );
    }
    // A valid token of this cluster and key is honoured (it sees the write).
    let r = plain
        .send(
            &a.addr,
            "GET",
            &path,
            None,
            &[(
                "x-consistency-token",
                token.trim_start_matches("tower_scale_token="),
            )],
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_a_key_share_clients() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .unwrap();
    let a = tokio::task::block_in_place(|| users(&local, KEY));
    let b = tokio::task::block_in_place(|| users(&local, KEY));
    // The app created its table; let the (lagging) replica have it too.
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = Client2::new(true);
    for i in 0..20 {
        let want = format!("shared-{i}");
        let created = client
            .send(
                &a.addr,
                "POST",
                "/users",
                Some(serde_json::json!({ "name": want })),
                &[],
            )
            .await;
        let got = client
            .send(
                &b.addr,
                "GET",
                &format!("/users/{}", created.body["id"]),
                None,
                &[],
            )
            .await;
        assert_eq!(
            name(&got),
            Some(want.as_str()),
            "a write on a, read on b with the token"
        );
    }
}

#[test]
fn bad_flags_print_usage_and_exit_2() {
    for name in ["axum_users", "tonic_users"] {
        for args in [
            vec![],
            vec!["--listen"],
            vec!["--listen", "127.0.0.1:0", "--token-key", "abc"],
            vec![
                "--listen",
                "127.0.0.1:0",
                "--replica",
                "postgresql://x@127.0.0.1/x",
            ],
            vec!["--bogus"],
        ] {
            let out = std::process::Command::new(common::example(name))
                .args(&args)
                .output()
                .expect("run");
            assert_eq!(out.status.code(), Some(2), "{name} {args:?}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("usage:"),
                "{name} {args:?}"
            );
            assert!(out.stdout.is_empty());
        }
    }
}

/// The temp dirs of local servers started by process `pid`.
fn dirs_owned_by(pid: u32) -> std::collections::BTreeSet<std::path::PathBuf> {
    // As root the servers' dirs are under /tmp, else under the temp dir.
    std::fs::read_dir("/tmp")
        .into_iter()
        .chain(std::fs::read_dir(std::env::temp_dir()))
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("tower-scale.owner"))
                .is_ok_and(|o| o.split_whitespace().next() == Some(&pid.to_string()))
        })
        .collect()
}

#[test]
fn sigterm_shuts_down_cleanly_and_stops_the_local_cluster() {
    // No --primary: the example starts (and must stop) its own cluster.
    let mut app = common::start("axum_users", &["--listen", "127.0.0.1:0"]);
    let pid = app.child.id();
    let dirs = dirs_owned_by(pid);
    assert_eq!(dirs.len(), 3, "a primary and two replicas: {dirs:?}");
    nix_kill(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

fn nix_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_redis_tier() {
    let local = LocalCluster::start(1).unwrap();
    let redis = tower_scale::testing::LocalRedis::start().unwrap();
    let start = |local: &LocalCluster| {
        start_users(
            "axum_users",
            local,
            KEY,
            &["--redis".to_string(), redis.url()],
        )
    };
    let a = tokio::task::block_in_place(|| start(&local));
    let b = tokio::task::block_in_place(|| start(&local));
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = Client2::new(true);
    // A user created and read on A is in Redis once A's tier is connected
    // (the tier is fail-open: a read on A before its connection is up
    // fills without writing Redis), so B reads it from there: a new user
    // per round until that happens. B's L1 misses each new user; until
    // B's subscription is up it does not trust its L1 either, which only
    // means more L2 reads.
    let deadline = Instant::now() + Duration::from_secs(20);
    let path = loop {
        let created = client
            .send(
                &a.addr,
                "POST",
                "/users",
                Some(serde_json::json!({ "name": "shared" })),
                &[],
            )
            .await;
        let path = format!("/users/{}", created.body["id"]);
        let on_a = client.send(&a.addr, "GET", &path, None, &[]).await;
        assert_eq!(name(&on_a), Some("shared"));
        let on_b = client.send(&b.addr, "GET", &path, None, &[]).await;
        assert_eq!(name(&on_b), Some("shared"));
        if on_b.served_by == "cache-l2" {
            break path;
        }
        assert!(
            Instant::now() < deadline,
            "B never read from the shared tier (last: {})",
            on_b.served_by
        );
    };
    // A write on A evicts B's copy: B reads the new name.
    client
        .send(
            &a.addr,
            "PUT",
            &path,
            Some(serde_json::json!({ "name": "renamed" })),
            &[],
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while name(&client.send(&b.addr, "GET", &path, None, &[]).await) != Some("renamed") {
        assert!(Instant::now() < deadline, "B kept the old row");
    }
}

/// `GET /users/{id}` reads plain-digit ids straight from the path and
/// everything else through axum's `Path`: both answer as before (a
/// percent-encoded id is the same id, a non-integer or one past `i64` is a
/// 400, a negative id a 404), and the JSON is what serde writes, escapes
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_and_json_answer_as_before() {
    let local = LocalCluster::start(0).unwrap();
    let app = tokio::task::block_in_place(|| users(&local, KEY));
    let mut client = Client2::new(false);
    let odd = "quote \" backslash \\ tab \t é";
    let created = client
        .send(
            &app.addr,
            "POST",
            "/users",
            Some(serde_json::json!({ "name": odd })),
            &[],
        )
        .await;
    assert_eq!(created.status, 201);
    let id = created.body["id"].as_i64().unwrap();
    jobs::assert_user_shape(&created.body);
    // Welcomed first, so that the body below does not change under the
    // test when the worker's write lands.
    jobs::until_welcomed(&mut client, &app.addr, id).await;
    let expected = serde_json::json!({ "id": id, "name": odd, "welcomed": true });
    for _ in 0..2 {
        // A miss, then a hit: the same body.
        let r = client
            .send(&app.addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        assert_eq!((r.status, &r.body), (200, &expected));
    }
    let encoded: String = id
        .to_string()
        .bytes()
        .map(|b| format!("%{b:02X}"))
        .collect();
    let r = client
        .send(&app.addr, "GET", &format!("/users/{encoded}"), None, &[])
        .await;
    assert_eq!((r.status, &r.body), (200, &expected), "percent-encoded id");
    let r = client
        .send(&app.addr, "GET", &format!("/users/+{id}"), None, &[])
        .await;
    assert_eq!(
        (r.status, &r.body),
        (200, &expected),
        "a leading plus, as Path parses it"
    );
    for bad in ["abc", "1.5", "99999999999999999999", "-", "12a"] {
        let r = client
            .send(&app.addr, "GET", &format!("/users/{bad}"), None, &[])
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.body["error"], "the id must be an integer", "{bad}");
    }
    let r = client.send(&app.addr, "GET", "/users/-7", None, &[]).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (404, Some("not found"))
    );
    let r = client
        .send(&app.addr, "GET", "/users/999999999999999999", None, &[])
        .await;
    assert_eq!(r.status, 404, "18 digits: read from the path, not found");
}
