//! `axum_users --http-cache` as a real process: an `HttpCacheLayer`
//! outside `DbLayer`, over a LocalCluster whose replica lags. The cookie
//! still gives read-your-writes; a token older than a stored response's
//! stamp is answered from it; tokenless reads never bring back a row the
//! replica had not caught up on; with `--redis` a write on one instance is
//! seen on the other by its token.

use std::time::{Duration, Instant};

use tower_scale::testing::LocalCluster;

use super::{Client2, KEY, common, name, pairs, start_users};

fn http_cached(local: &LocalCluster, extra: &[String]) -> common::Running {
    let mut args = vec!["--http-cache".to_string()];
    args.extend(extra.iter().cloned());
    start_users("axum_users", local, KEY, &args)
}

async fn lagging_cluster() -> LocalCluster {
    tokio::task::block_in_place(|| {
        LocalCluster::builder()
            .replicas(1)
            .apply_delay(0, Duration::from_secs(1))
            .start()
            .unwrap()
    })
}

async fn put(client: &mut Client2, addr: &str, path: &str, name: &str) {
    let r = client
        .send(
            addr,
            "PUT",
            path,
            Some(serde_json::json!({ "name": name })),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "PUT {path}");
}

async fn create(client: &mut Client2, addr: &str, name: &str) -> String {
    create_on(client, addr, name, &[]).await
}

async fn create_on(client: &mut Client2, addr: &str, name: &str, extra: &[(&str, &str)]) -> String {
    let r = client
        .send(
            addr,
            "POST",
            "/users",
            Some(serde_json::json!({ "name": name })),
            extra,
        )
        .await;
    assert_eq!(r.status, 201);
    format!("/users/{}", r.body["id"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_sees_its_writes_and_older_tokens_hit_stamped_responses() {
    let local = lagging_cluster().await;
    let app = tokio::task::block_in_place(|| http_cached(&local, &[]));
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut writer = Client2::new(true);
    let (seen, _) = pairs(&app.addr, &mut writer, 200).await;
    assert_eq!(seen, 200, "every read with the cookie saw its write");

    // The response leaves with its freshness and without its tag.
    let path = create(&mut writer, &app.addr, "ada").await;
    let first = writer.send(&app.addr, "GET", &path, None, &[]).await;
    assert_eq!(name(&first), Some("ada"));
    let raw = reqwest_like_get(&app.addr, &path).await;
    assert_eq!(raw.0.as_deref(), Some("s-maxage=30"));
    assert!(!raw.1, "the tag header is stripped");
    // The same token again: stamped at or above it, a hit. (The stamp is
    // the LSN the app knew its node had replayed, a lower bound that can
    // trail the token for a moment: then the read refetched.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = writer.send(&app.addr, "GET", &path, None, &[]).await;
        assert_eq!(name(&again), Some("ada"));
        if again.served_by == "cache" {
            // RFC 9211: the HTTP cache says so too.
            let status = again.cache_status.as_deref().unwrap_or_default();
            assert!(status.starts_with("users-http; hit; ttl="), "{status}");
            break;
        }
        let status = again.cache_status.as_deref().unwrap_or_default();
        assert!(
            status.starts_with("users-http; fwd="),
            "a refetch: {status}"
        );
        assert!(
            Instant::now() < deadline,
            "never a hit: {}",
            again.served_by
        );
    }

    // Older tokens than the stamp: A writes X, then B writes Y (a newer
    // token) and reads X, which stores X stamped at or above B's token;
    // A's read of X (its older token) is a hit and sees its own write.
    let (mut hits, rounds) = (0, 20);
    let mut a = Client2::new(true);
    let mut b = Client2::new(true);
    let x = create(&mut a, &app.addr, "x").await;
    let y = create(&mut b, &app.addr, "y").await;
    for i in 0..rounds {
        let want = format!("x-{i}");
        put(&mut a, &app.addr, &x, &want).await;
        put(&mut b, &app.addr, &y, &format!("y-{i}")).await;
        let by_b = b.send(&app.addr, "GET", &x, None, &[]).await;
        assert_eq!(name(&by_b), Some(want.as_str()), "B's token is newer");
        let by_a = a.send(&app.addr, "GET", &x, None, &[]).await;
        assert_eq!(name(&by_a), Some(want.as_str()), "A sees its write");
        if by_a.served_by == "cache" {
            hits += 1;
        }
    }
    eprintln!("older tokens: {hits}/{rounds} answered by the HTTP cache");
    assert!(hits > 0, "a token older than the stamp is a hit");
}

/// `Cache-Control` and whether `surrogate-key` is there, for a tokenless GET.
async fn reqwest_like_get(addr: &str, path: &str) -> (Option<String>, bool) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = hyper::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let cc = res
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_string());
    let tagged = res.headers().contains_key("surrogate-key");
    let _ = res.into_body().collect().await;
    (cc, tagged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_tokenless_read_is_answered_but_not_stored() {
    let local = lagging_cluster().await;
    let app = tokio::task::block_in_place(|| http_cached(&local, &[]));
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut writer = Client2::new(true);
    let mut tokenless = Client2::new(false);
    for round in 0..5 {
        let path = create(&mut writer, &app.addr, "old").await;
        local
            .wait_for_replicas(Duration::from_secs(30))
            .await
            .unwrap();
        // Stored with the old row once a read's stamp reaches the
        // creation's LSN (the app learns its replica's position by polling).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = tokenless.send(&app.addr, "GET", &path, None, &[]).await;
            assert_eq!(name(&got), Some("old"));
            if got.served_by == "cache" {
                break;
            }
            assert!(Instant::now() < deadline, "never stored: {}", got.served_by);
        }
        put(&mut writer, &app.addr, &path, "new").await;
        // The write removed it; the lagging replica still has the old
        // row: answered, never stored (the tag was invalidated at the
        // write's LSN, above the read's).
        let lagging = tokenless.send(&app.addr, "GET", &path, None, &[]).await;
        if round == 0 {
            eprintln!(
                "after the write, tokenless: {:?} from {}",
                name(&lagging),
                lagging.served_by
            );
        }
        assert_ne!(lagging.served_by, "cache", "the write removed the entry");
        let mine = writer.send(&app.addr, "GET", &path, None, &[]).await;
        assert_eq!(name(&mine), Some("new"), "the writer's token");
        local
            .wait_for_replicas(Duration::from_secs(30))
            .await
            .unwrap();
        for _ in 0..5 {
            let after = tokenless.send(&app.addr, "GET", &path, None, &[]).await;
            assert_eq!(
                name(&after),
                Some("new"),
                "the lagging read did not put the old row back ({})",
                after.served_by
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_stamped_responses_through_redis() {
    let local = tokio::task::block_in_place(|| LocalCluster::start(1).unwrap());
    let redis = tower_scale::testing::LocalRedis::start().unwrap();
    let flags = ["--redis".to_string(), redis.url()];
    let a = tokio::task::block_in_place(|| http_cached(&local, &flags));
    let b = tokio::task::block_in_place(|| http_cached(&local, &flags));
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = Client2::new(true);
    // Both instances behind one name, as behind a load balancer: the
    // cache key holds the authority.
    const HOST: &[(&str, &str)] = &[("host", "users.test")];
    // Users created first, then read on A (which writes them to Redis)
    // and on B, with no write in between: a fill whose lease predates one
    // of A's queued invalidations reaching Redis writes nothing (the tier
    // is fail-open, and so is a fill before A's connection is up). A new
    // batch until B answers one from Redis.
    let deadline = Instant::now() + Duration::from_secs(30);
    let path = 'found: loop {
        let mut batch = Vec::new();
        for _ in 0..20 {
            batch.push(create_on(&mut client, &a.addr, "shared", HOST).await);
        }
        let mut last = String::new();
        for path in batch {
            let on_a = client.send(&a.addr, "GET", &path, None, HOST).await;
            assert_eq!(name(&on_a), Some("shared"));
            let on_b = client.send(&b.addr, "GET", &path, None, HOST).await;
            assert_eq!(name(&on_b), Some("shared"), "the token read on B");
            if on_b.served_by == "cache-l2" {
                break 'found path;
            }
            last = on_b.served_by;
        }
        if Instant::now() >= deadline {
            for (n, addr) in [("A", &a.addr), ("B", &b.addr)] {
                let m = crate::get_text(addr, "/metrics").await;
                for l in m.lines().filter(|l| {
                    l.contains("users-http") || l.contains("redis") || l.contains("remote")
                }) {
                    eprintln!("{n}: {l}");
                }
            }
            panic!("B never answered from the shared tier (last: {last})");
        }
    };
    // A write on A; the token read on B sees it, every time.
    for i in 0..20 {
        let want = format!("renamed-{i}");
        client
            .send(
                &a.addr,
                "PUT",
                &path,
                Some(serde_json::json!({ "name": want })),
                HOST,
            )
            .await;
        let on_b = client.send(&b.addr, "GET", &path, None, HOST).await;
        assert_eq!(name(&on_b), Some(want.as_str()), "from {}", on_b.served_by);
    }
}

#[test]
fn http_cache_is_a_flag_of_axum_users_only() {
    let out = std::process::Command::new(common::example("tonic_users"))
        .args(["--listen", "127.0.0.1:0", "--http-cache"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--http-cache"));
}
