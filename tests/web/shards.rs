//! `axum_users` on several shards (issue 22), as a real process: users
//! spread over the shards by id, a listing merged across them page by
//! page, the operator's slot map behind its token, and read-your-writes
//! with the cookie through delayed replicas on every shard.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Client2, KEY, common};
use tower_scale::testing::LocalCluster;

const ADMIN: &str = "let-me-in";

/// The shard part of an `x-served-by` (`shard-1/primary` -> `shard-1`).
fn shard_of(served_by: &str) -> &str {
    served_by.split('/').next().unwrap_or_default()
}

/// Every page of `GET /users?limit={limit}`, following `next`; the ids in
/// the order returned.
async fn list_all(addr: &str, client: &mut Client2, limit: usize) -> (Vec<i64>, usize) {
    let (mut ids, mut pages) = (Vec::new(), 0);
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/users?limit={limit}&after={a}"),
            None => format!("/users?limit={limit}"),
        };
        let r = client.send(addr, "GET", &path, None, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        pages += 1;
        let users = r.body["users"].as_array().expect("users array");
        assert!(users.len() <= limit);
        for u in users {
            assert!(u["name"].is_string() && u["welcomed"].is_boolean(), "{u}");
            ids.push(u["id"].as_i64().expect("id"));
        }
        match r.body["next"].as_i64() {
            Some(next) => {
                assert_eq!(Some(&next), ids.last(), "next is the page's last id");
                after = Some(next);
            }
            None => {
                assert!(r.body["next"].is_null());
                return (ids, pages);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_spread_list_in_order_and_show_their_slots() {
    let started = Instant::now();
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
    let addr = service.addr.as_str();
    eprintln!("two shards up in {:?}", started.elapsed());
    let mut client = Client2::new(true);

    // 200 users: each on the shard its id maps to.
    let t = Instant::now();
    let mut created = BTreeMap::new();
    for i in 0..200 {
        let name = format!("user-{i}");
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
        assert!(r.cookie.is_some(), "a write sets the cookie");
        assert!(r.served_by.ends_with("/primary"), "{}", r.served_by);
        let id = r.body["id"].as_i64().unwrap();
        created.insert(id, (name, shard_of(&r.served_by).to_string()));
    }
    eprintln!("200 users created in {:?}", t.elapsed());
    let mut per_shard = BTreeMap::new();
    for (_, shard) in created.values() {
        *per_shard.entry(shard.clone()).or_insert(0) += 1;
    }
    eprintln!("users per shard: {per_shard:?}");
    assert_eq!(
        per_shard.keys().collect::<Vec<_>>(),
        ["shard-1", "shard-2"],
        "users on both shards"
    );

    // Each readable, from its own shard, with the cookie.
    for (id, (name, shard)) in &created {
        let r = client
            .send(addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        assert_eq!(r.status, 200, "user {id}: {}", r.body);
        assert_eq!(r.body["name"], name.as_str());
        assert_eq!(shard_of(&r.served_by), shard, "{}", r.served_by);
    }

    // Page by page, in id order across the shards.
    let t = Instant::now();
    let (listed, pages) = list_all(addr, &mut client, 37).await;
    eprintln!(
        "listed {} users in {pages} pages in {:?}",
        listed.len(),
        t.elapsed()
    );
    assert_eq!(listed, created.keys().copied().collect::<Vec<_>>());
    assert_eq!(pages, 6);
    // The default page is 50; `after` is exclusive.
    let first = *created.keys().next().unwrap();
    let r = client.send(addr, "GET", "/users", None, &[]).await;
    assert_eq!(r.body["users"].as_array().unwrap().len(), 50);
    let r = client
        .send(
            addr,
            "GET",
            &format!("/users?after={first}&limit=1"),
            None,
            &[],
        )
        .await;
    assert_eq!(
        r.body["users"][0]["id"],
        created.keys().nth(1).copied().unwrap()
    );
    for bad in ["limit=0", "limit=1001", "limit=x", "after=abc", "after="] {
        let r = client
            .send(addr, "GET", &format!("/users?{bad}"), None, &[])
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.body["error"].is_string(), "{bad}: {}", r.body);
    }
    // The single-user routes keep their contracts.
    let r = client.send(addr, "GET", "/users/abc", None, &[]).await;
    assert_eq!(r.status, 400);
    let r = client.send(addr, "GET", "/users/12345", None, &[]).await;
    assert_eq!((r.status, &r.body["error"]), (404, &"not found".into()));
    let (&id, _) = created.iter().next().unwrap();
    let r = client
        .send(
            addr,
            "PUT",
            &format!("/users/{id}"),
            Some(serde_json::json!({ "name": "renamed" })),
            &[],
        )
        .await;
    assert_eq!((r.status, &r.body["name"]), (200, &"renamed".into()));
    let r = client
        .send(addr, "DELETE", &format!("/users/{id}"), None, &[])
        .await;
    assert_eq!(r.status, 204);
    let r = client
        .send(addr, "GET", &format!("/users/{id}"), None, &[])
        .await;
    assert_eq!(r.status, 404, "read your delete");

    // The users cache: a second read is a hit; a write invalidates it and
    // the writer reads its write; a hot id, renamed now and then, is
    // served from the cache and the replicas, never a primary, and ranks
    // first in the gauges.
    let (&id, _) = created.iter().nth(1).unwrap();
    let path = format!("/users/{id}");
    client.send(addr, "GET", &path, None, &[]).await;
    let r = client.send(addr, "GET", &path, None, &[]).await;
    assert_eq!((r.status, r.served_by.as_str()), (200, "cache"));
    let rename = Some(serde_json::json!({ "name": "cached-rename" }));
    let r = client.send(addr, "PUT", &path, rename, &[]).await;
    assert_eq!(r.status, 200);
    let r = client.send(addr, "GET", &path, None, &[]).await;
    assert_eq!(r.body["name"], "cached-rename", "{}", r.served_by);
    let mut anonymous = Client2::new(false);
    let (mut served, mut round) = (BTreeMap::new(), 0);
    // One cache per shard: `users/shard-1`, `users/shard-2`.
    let gauge = |l: &str| {
        l.starts_with("tower_scale_cache_hot_key_hits{cache=\"users/shard-")
            && l.contains("rank=\"1\"}")
    };
    common::until(
        "the hot id ranks first in the gauges (200 reads or more)",
        Duration::from_secs(20),
        async || {
            round += 1;
            for n in 0..100 {
                if n == 0 && round % 4 == 1 {
                    // A write without a cookie: the next reads refill
                    // (from the replica, until the monitor's view of its
                    // position, polled every 250 ms, passes the write).
                    let rename = Some(serde_json::json!({ "name": format!("hot-{n}") }));
                    let r = anonymous.send(addr, "PUT", &path, rename, &[]).await;
                    assert_eq!(r.status, 200);
                }
                let r = anonymous.send(addr, "GET", &path, None, &[]).await;
                assert_eq!(r.status, 200);
                *served.entry(r.served_by).or_insert(0) += 1;
            }
            let m = crate::get_text(addr, "/metrics").await;
            // Its estimated reads: every other id was read a few times.
            m.lines()
                .filter(|l| gauge(l))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .any(|reads| reads >= 200.0)
        },
    )
    .await;
    eprintln!("the hot id served by {served:?}");
    assert!(
        served.keys().all(|by| !by.ends_with("/primary")),
        "{served:?}"
    );
    assert!(served.get("cache").copied().unwrap_or(0) > 0, "{served:?}");
    assert!(
        served.keys().any(|by| by.ends_with("/replica-1")),
        "{served:?}"
    );

    // The operator's view: 401 without or with a wrong token.
    let r = client.send(addr, "GET", "/admin/shards", None, &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.body["error"].is_string());
    // Wrong: another token, the right one with a suffix or a prefix, or
    // under another scheme.
    let near = [
        "Bearer nope".to_string(),
        format!("Bearer {ADMIN}x"),
        format!("Bearer x{ADMIN}"),
        format!("Basic {ADMIN}"),
        format!("Bearer{ADMIN}"),
    ];
    for wrong in &near {
        let wrong = [("authorization", wrong.as_str())];
        let r = client
            .send(addr, "GET", "/admin/shards", None, &wrong)
            .await;
        assert_eq!(r.status, 401, "{wrong:?}");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let lower = format!("bearer {ADMIN}");
    let r = client
        .send(
            addr,
            "GET",
            "/admin/shards",
            None,
            &[("authorization", lower.as_str())],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let bearer = format!("Bearer {ADMIN}");
    let ok = [("authorization", bearer.as_str())];
    let r = client.send(addr, "GET", "/admin/shards", None, &ok).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["version"].as_u64().is_some(), "{}", r.body);
    let slots = r.body["slots"].as_array().unwrap();
    let mut next = 0;
    let mut owners = BTreeMap::new();
    for s in slots {
        assert_eq!(
            s["from"].as_u64(),
            Some(next),
            "ranges cover every slot: {}",
            r.body
        );
        let to = s["to"].as_u64().unwrap();
        *owners
            .entry(s["shard"].as_str().unwrap().to_string())
            .or_insert(0) += to + 1 - next;
        next = to + 1;
    }
    assert_eq!(next, 4096, "{}", r.body);
    eprintln!("slots per shard: {owners:?}");
    assert!(
        owners.keys().eq(["shard-1", "shard-2"]),
        "both shards own slots"
    );

    // Each welcome job ran on its user's shard (a worker per shard).
    let t = Instant::now();
    common::until("every user welcomed", Duration::from_secs(30), async || {
        let r = client
            .send(addr, "GET", "/users?limit=1000", None, &[])
            .await;
        let users = r.body["users"].as_array().cloned().unwrap_or_default();
        users.len() == 199 && users.iter().all(|u| u["welcomed"] == true)
    })
    .await;
    eprintln!("199 users welcomed {:?} after the check began", t.elapsed());

    // SIGTERM: a clean exit that stops both LocalClusters.
    let mut service = service;
    let pid = service.child.id();
    let dirs = super::dirs_owned_by(pid);
    assert_eq!(dirs.len(), 4, "two primaries and two replicas: {dirs:?}");
    super::nix_kill(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    eprintln!("whole test in {:?}", started.elapsed());
}

/// `--shard NAME=PRIMARY,REPLICA` twice, each replica replaying 1 s late:
/// the cookie's reads (single and listed) see every write at once, on
/// both shards; without `--admin-token`, `/admin/*` is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_reads_its_writes_on_every_shard_through_delayed_replicas() {
    let start = || {
        std::thread::spawn(|| {
            LocalCluster::builder()
                .replicas(1)
                .apply_delay(0, Duration::from_secs(1))
                .start()
                .unwrap()
        })
    };
    let (a, b) = (start(), start());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let flag = |name: &str, l: &LocalCluster| {
        format!("{name}={},{}", l.primary().url(), l.replica(0).url())
    };
    let (fa, fb) = (flag("east", &a), flag("west", &b));
    let service = common::start(
        "axum_users",
        &[
            "--listen",
            "127.0.0.1:0",
            "--shard",
            &fa,
            "--shard",
            &fb,
            "--token-key",
            KEY,
            "--instance-id",
            "3",
        ],
    );
    let addr = service.addr.as_str();
    // The replicas have the service's tables (made at its start, replayed
    // a second late): until then a replica cannot answer and reads go to
    // the primaries.
    for local in [&a, &b] {
        local
            .wait_for_replicas(Duration::from_secs(30))
            .await
            .unwrap();
    }
    let mut client = Client2::new(true);
    let mut stale = Client2::new(false);
    let (mut ids, mut shards, mut replica_reads, mut stale_misses) =
        (Vec::new(), BTreeMap::new(), 0, 0);
    for i in 0..30 {
        let name = format!("late-{i}");
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
        let id = r.body["id"].as_i64().unwrap();
        assert_eq!((id >> 12) & 1023, 3, "the id carries --instance-id");
        *shards
            .entry(shard_of(&r.served_by).to_string())
            .or_insert(0) += 1;
        ids.push(id);
        // Without the cookie first: a replica a second behind does not
        // have it yet, and its 404 is cached (stamped at the replica's
        // position)...
        let other = stale
            .send(addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        if other.status == 404 {
            stale_misses += 1;
        }
        // ...which the cookie's read skips: its token is newer.
        let got = client
            .send(addr, "GET", &format!("/users/{id}"), None, &[])
            .await;
        assert_eq!((got.status, &got.body["name"]), (200, &name.clone().into()));
        if got.served_by.ends_with("/replica-1") {
            replica_reads += 1;
        }
    }
    eprintln!(
        "per shard {shards:?}; cookie reads from replicas: {replica_reads}/30; \
         cookieless reads that missed the write: {stale_misses}/30"
    );
    assert!(shards.keys().eq(["east", "west"]), "{shards:?}");
    assert!(
        stale_misses > 0,
        "the replicas were not behind: the test proves nothing"
    );
    // The listing with the cookie has every user at once, on both shards.
    let (listed, _) = list_all(addr, &mut client, 1000).await;
    assert_eq!(listed, ids, "the cookie's listing missed writes");

    // The cookie does not pin reads to the primaries: once the replicas
    // have replayed the writes, they serve the cookie's reads (the
    // listing's: a single user's read is the users cache's from its
    // first fill on).
    let caught_up = common::until(
        "the replicas serve the cookie",
        Duration::from_secs(10),
        async || {
            let r = client
                .send(addr, "GET", "/users?limit=1000", None, &[])
                .await;
            let listed = r.body["users"].as_array().map_or(0, Vec::len);
            r.status == 200
                && listed == ids.len()
                && r.served_by == "east/replica-1, west/replica-1"
        },
    )
    .await;
    eprintln!("a replica served the cookie's read after {caught_up:?}");
    for path in ["/admin/shards", "/admin/anything"] {
        let bearer = [("authorization", "Bearer x")];
        let r = client.send(addr, "GET", path, None, &bearer).await;
        assert_eq!(r.status, 404, "{path} without --admin-token");
    }
    // A second instance given the same --instance-id (a mistake: both
    // would make the same ids) refuses to start, naming the id; the first
    // keeps serving.
    let started = Instant::now();
    let twin = std::process::Command::new(common::example("axum_users"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shard",
            &fa,
            "--shard",
            &fb,
            "--token-key",
            KEY,
            "--instance-id",
            "3",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut twin = twin;
    let deadline = Instant::now() + Duration::from_secs(20);
    while twin.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            twin.kill().unwrap();
            panic!("the twin with a taken --instance-id is still running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = twin.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "the twin exited {} after {:?}: {}",
        out.status,
        started.elapsed(),
        stderr.trim()
    );
    assert!(!out.status.success());
    assert!(stderr.contains("--instance-id 3 is in use"), "{stderr}");
    let body = Some(serde_json::json!({ "name": "after-the-twin" }));
    let r = client.send(addr, "POST", "/users", body, &[]).await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// `--shards` with `--shard` or `--primary` exits 2 with the usage, and
/// so do bad sharding flags and the sharded mode's flags without it.
#[test]
fn shards_with_shard_or_primary_is_a_usage_error() {
    for extra in [
        ["--shards", "2", "--shard", "a=postgresql://localhost/x"],
        ["--shards", "2", "--primary", "postgresql://localhost/x"],
        ["--shards", "0", "--admin-token", "x"],
        ["--shard", "a=", "--admin-token", "x"],
        ["--admin-token", "x", "--workers", "1"],
        ["--instance-id", "1024", "--shards", "1"],
    ] {
        let out = std::process::Command::new(common::example("axum_users"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("usage:"), "{stderr}");
    }
}
