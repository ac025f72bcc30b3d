//! The tour: what tower-scale does, on real servers started for the occasion.
//!
//! ```text
//! cargo run --release --features full --example tour
//! ```
//!
//! It starts the embedded default (a PostgreSQL primary and two streaming
//! replicas from the installed binaries, in temp dirs on free loopback
//! ports), then shows, with timings:
//!
//! 1. one write on the primary read back from every replica;
//! 2. routing: reads spread over the replicas, writes on the primary,
//!    read-your-writes through consistency tokens;
//! 3. a replica killed mid-way with no failed read;
//! 4. the cache tier in front of the database: hits, coalesced misses,
//!    invalidation by tag;
//! 5. the `axum_users` service run in-process over the same cluster, with
//!    one replica lagging by a second: cache hits, reads spread over the
//!    replicas, read-your-writes through the consistency cookie, and a
//!    replica stopped mid-way with no failed request;
//! 6. two instances of the service sharing one Redis: an L1 miss on one is
//!    an L2 hit, and a write on one evicts the other's L1;
//! 7. a plain SQL `UPDATE` reaching the cached service through the change
//!    feed;
//! 8. jobs: `POST /users` enqueues a welcome job in the insert's
//!    transaction and a worker marks the user welcomed; then a worker
//!    killed mid-job (its runtime dropped, as a process killed) and the job
//!    done again, attempt 2, by another once the lease lapses;
//! 9. the load balancer: three origins behind a `Balancer` (p2c over
//!    peak-EWMA), one killed under load with no failed request and its
//!    share moving to the other two, then a fourth added through the
//!    `Upstreams` handle, taking a share;
//! 10. the users service on two shards (`axum_users --shards 2`): users
//!     spread over both by id, their welcome jobs run on their shards, a
//!     listing in id order across the shards page by page, and the slot
//!     map of `GET /admin/shards`;
//! 11. online resharding: a third shard joins and a third of the slots
//!     move to it under writers;
//! 12. two regions 40 ms apart (fault proxies in front of the nodes): local
//!     reads stay local (their p50 shown), then the local region is
//!     black-holed under a read load and the reads move to the other one
//!     with no failed read.
//!
//! Everything it started is stopped on exit.

#[allow(dead_code)]
#[path = "axum_users.rs"]
mod axum_users;
#[path = "common/tour_regions.rs"]
mod tour_regions;
#[path = "common/tour_reshard.rs"]
mod tour_reshard;
#[path = "common/tour_shards.rs"]
mod tour_shards;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tower::{Service, ServiceExt};
use tower_scale::cache::{CacheLayer, CachePolicy, Storable, Windows};
use tower_scale::pg::{Access, Cluster, Consistency, Db, DbError, NodeConfig, Query, QueryOutput};
use tower_scale::testing::LocalCluster;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("tour failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Error> {
    println!("tower-scale tour");
    println!("================");
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| {
        LocalCluster::builder()
            .replicas(2)
            .apply_delay(1, Duration::from_secs(1))
            .start()
    })
    .await??;
    println!(
        "started a PostgreSQL primary and 2 streaming replicas (replica-2 applies WAL 1 s late) in {:.2?}",
        started.elapsed()
    );
    for node in cluster.nodes() {
        println!("  {:<10} {}", node.name(), node.url());
    }

    println!("\n1. one write on the primary, read back from every replica");
    let primary = cluster.primary().connect().await?;
    primary
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS users (id bigserial primary key, name text not null)",
        )
        .await?;
    let t = Instant::now();
    let row = primary
        .query_one(
            "INSERT INTO users (name) VALUES ($1) RETURNING id",
            &[&"ada"],
        )
        .await?;
    // The WAL position after the commit (inside the statement it would be
    // before the commit record, which a delayed replica applies late).
    let lsn_row = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    let (id, lsn): (i64, String) = (row.get(0), lsn_row.get(0));
    println!(
        "  primary    INSERT users(id={id}, name='ada') at WAL position {lsn} in {:.2?}",
        t.elapsed()
    );
    let lsn = tower_scale::testing::parse_lsn(&lsn)?;
    for replica in cluster.replicas() {
        let t = Instant::now();
        replica
            .wait_for_replay(lsn, Duration::from_secs(30))
            .await?;
        let caught_up = t.elapsed();
        let client = replica.connect().await?;
        let t = Instant::now();
        let row = client
            .query_one("SELECT name FROM users WHERE id = $1", &[&id])
            .await?;
        let name: String = row.get(0);
        println!(
            "  {:<10} replayed it after {caught_up:.2?}; SELECT found name='{name}' in {:.2?}",
            replica.name(),
            t.elapsed()
        );
    }

    let db = routing(&cluster).await?;
    failover(&cluster, &db).await?;
    caching(&db).await?;
    users_service(&cluster).await?;
    shared_tier(&cluster).await?;
    change_feed(&cluster).await?;
    jobs(&cluster).await?;
    balancing().await?;
    tour_shards::shards().await?;
    tour_reshard::reshard().await?;
    tour_regions::regions().await?;

    let t = Instant::now();
    drop(db);
    drop(cluster);
    println!(
        "\nstopped every server and removed their temp dirs in {:.2?}",
        t.elapsed()
    );
    println!("tour finished in {:.2?}", started.elapsed());
    Ok(())
}

async fn routing(local: &LocalCluster) -> Result<Db, Error> {
    println!("\n2. routing: a Cluster with a pool per node and a monitor");
    let t = Instant::now();
    let mut builder = Cluster::builder().primary(NodeConfig::new(local.primary().config()));
    for replica in local.replicas() {
        builder = builder.replica(NodeConfig::new(replica.config()));
    }
    let cluster = builder.read_timeout(Duration::from_secs(1)).build().await?;
    println!("  connected and probed every node in {:.2?}", t.elapsed());
    for node in cluster.status() {
        println!(
            "  {:<10} {:?}, healthy: {}",
            node.name, node.role, node.healthy
        );
    }
    let db = cluster.db();
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let t = Instant::now();
    for _ in 0..200 {
        let r = db
            .read_one(Consistency::Any, "SELECT count(*) FROM users", &[])
            .await?;
        *served.entry(r.served_by.to_string()).or_default() += 1;
    }
    println!(
        "  200 reads with Consistency::Any in {:.2?}: {served:?}",
        t.elapsed()
    );
    let mut on_replica = 0;
    let t = Instant::now();
    for i in 0..100 {
        let w = db
            .query_one(
                "INSERT INTO users (name) VALUES ($1) RETURNING id",
                &[&format!("user-{i}")],
            )
            .await?;
        let id: i64 = w.value.get(0);
        let r = db
            .read_one(
                Consistency::ReadYourWrites(w.token),
                "SELECT name FROM users WHERE id = $1",
                &[&id],
            )
            .await?;
        if &*r.served_by != "primary" {
            on_replica += 1;
        }
    }
    println!(
        "  100 write-then-read pairs with the write's token in {:.2?}: every read saw its write, \
         {on_replica} of them on a replica",
        t.elapsed()
    );
    Ok(db)
}

async fn failover(local: &LocalCluster, db: &Db) -> Result<(), Error> {
    println!("\n3. a replica killed under a read load");
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (db, stop, done, failed) = (db.clone(), stop.clone(), done.clone(), failed.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if db
                    .read_one(Consistency::Any, "SELECT 1", &[])
                    .await
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    tokio::task::block_in_place(|| local.replica(0).kill())?;
    println!("  killed replica-1 (SIGKILL) with 4 readers running");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await?;
    }
    println!(
        "  {} reads in the {:.2?} after the kill, {} failed (reads that hit the dead replica were retried elsewhere)",
        done.load(Ordering::SeqCst),
        t.elapsed(),
        failed.load(Ordering::SeqCst)
    );
    tokio::task::block_in_place(|| local.replica(0).start())?;
    Ok(())
}

/// Cache read queries by their user id, tagged `user:{id}`.
struct UserReads;

impl CachePolicy<Query, QueryOutput> for UserReads {
    type Key = i64;
    fn key(&self, q: &Query) -> Option<i64> {
        // `Any` reads only: a `Strong` or read-your-writes read must not be
        // answered with what an `Any` read stored.
        if q.access != Access::Read(Consistency::Any) {
            return None;
        }
        q.sql
            .strip_prefix("SELECT name FROM users WHERE id = ")?
            .parse()
            .ok()
    }
    fn storable(&self, id: &i64, out: &QueryOutput, d: &Windows) -> Option<Storable> {
        Some(
            Storable::new(*d)
                .tag(format!("user:{id}"))
                .version(out.lsn.0),
        )
    }
}

async fn caching(db: &Db) -> Result<(), Error> {
    println!("\n4. the cache tier in front of the database (tower::Service<Query> for Db)");
    let layer = CacheLayer::builder(UserReads)
        .time_to_live(Duration::from_secs(60))
        .build::<i64, QueryOutput, DbError>()?;
    let invalidator = layer.invalidator();
    let mut users = tower::ServiceBuilder::new()
        .layer(layer)
        .service(db.clone());
    let read = || Query::read("SELECT name FROM users WHERE id = 1", Consistency::Any);
    let t = Instant::now();
    let first = users.ready().await?.call(read()).await?;
    println!(
        "  miss: served by {} in {:.2?}",
        first.served_by,
        t.elapsed()
    );
    let t = Instant::now();
    for _ in 0..10_000 {
        users.ready().await?.call(read()).await?;
    }
    println!("  10,000 hits in {:.2?}", t.elapsed());
    let t = Instant::now();
    let stampede: Vec<_> = (0..500).map(|_| users.clone().oneshot(read())).collect();
    invalidator.invalidate_tag("user:1");
    let mut set = tokio::task::JoinSet::new();
    for f in stampede {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
    let stats = users.stats();
    println!(
        "  after invalidating tag user:1, 500 concurrent reads in {:.2?}: {} database reads in all, \
         {} coalesced",
        t.elapsed(),
        stats.misses - stats.coalesced,
        stats.coalesced
    );
    Ok(())
}

struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    addr: std::net::SocketAddr,
    cookie: Option<String>,
}

struct Reply {
    status: u16,
    served_by: String,
    name: Option<String>,
    id: Option<i64>,
    welcomed: Option<bool>,
}

impl Http {
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        json: Option<String>,
        keep_cookie: bool,
    ) -> Result<Reply, Error> {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let (true, Some(c)) = (keep_cookie, &self.cookie) {
            req = req.header("cookie", c.as_str());
        }
        let body = match json {
            Some(j) => {
                req = req.header("content-type", "application/json");
                bytes::Bytes::from(j)
            }
            None => bytes::Bytes::new(),
        };
        let res = self
            .client
            .request(req.body(http_body_util::Full::new(body))?)
            .await?;
        if keep_cookie
            && let Some(c) = res
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
        {
            self.cookie = c.split(';').next().map(str::to_string);
        }
        let status = res.status().as_u16();
        let served_by = res
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let bytes = res.into_body().collect().await?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        Ok(Reply {
            status,
            served_by,
            name: json
                .get("name")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            id: json.get("id").and_then(|v| v.as_i64()),
            welcomed: json.get("welcomed").and_then(|v| v.as_bool()),
        })
    }
}

/// A keep-alive HTTP/1 client with Nagle off (small requests go out at once).
fn http_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

async fn users_service(local: &LocalCluster) -> Result<(), Error> {
    println!("\n5. the users service (examples/axum_users.rs) in-process");
    let args = axum_users::users::Args::in_process(local);
    let backend = axum_users::users::backend(&args).await?;
    let metrics = axum_users::users::install_metrics()?;
    let app = axum_users::router(&backend, metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(
            axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .await
    });
    local.wait_for_replicas(Duration::from_secs(30)).await?;
    let mut http = Http {
        client: http_client(),
        addr,
        cookie: None,
    };
    println!("  serving on http://{addr}");

    let created = http
        .send("POST", "/users", Some(r#"{"name":"grace"}"#.into()), true)
        .await?;
    let id = created.id.ok_or("no id")?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let t = Instant::now();
    for _ in 0..100 {
        let r = http
            .send("GET", &format!("/users/{id}"), None, true)
            .await?;
        *tally.entry(r.served_by).or_default() += 1;
    }
    println!(
        "  100 GETs of one user in {:.2?}, served by: {tally:?}",
        t.elapsed()
    );

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let r = http
            .send(
                "POST",
                "/users",
                Some(format!(r#"{{"name":"spread-{i}"}}"#)),
                false,
            )
            .await?;
        let r = http
            .send("GET", &format!("/users/{}", r.id.unwrap_or(0)), None, false)
            .await?;
        *tally.entry(r.served_by).or_default() += 1;
    }
    local.wait_for_replicas(Duration::from_secs(30)).await?;
    for i in 0..30 {
        let r = http
            .send("GET", &format!("/users/{}", id + 1 + i), None, false)
            .await?;
        *tally.entry(r.served_by).or_default() += 1;
    }
    println!("  60 first reads of new users, served by: {tally:?}");

    let (mut seen, mut stale) = (0, 0);
    for i in 0..50 {
        let name = format!("v{i}");
        http.send(
            "PUT",
            &format!("/users/{id}"),
            Some(format!(r#"{{"name":"{name}"}}"#)),
            true,
        )
        .await?;
        if http
            .send("GET", &format!("/users/{id}"), None, true)
            .await?
            .name
            .as_deref()
            == Some(&name)
        {
            seen += 1;
        }
        let other = format!("w{i}");
        http.send(
            "PUT",
            &format!("/users/{id}"),
            Some(format!(r#"{{"name":"{other}"}}"#)),
            false,
        )
        .await?;
        if http
            .send("GET", &format!("/users/{id}"), None, false)
            .await?
            .name
            .as_deref()
            != Some(&other)
        {
            stale += 1;
        }
    }
    println!(
        "  50 PUT-then-GET pairs with the cookie: {seen}/50 saw their write; without it: {stale}/50 read stale data"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let mut client = Http {
            client: http.client.clone(),
            addr,
            cookie: None,
        };
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client
                    .send("GET", &format!("/users/{}", id + 1), None, false)
                    .await
                {
                    Ok(r) if r.status == 200 || r.status == 404 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| local.replica(0).stop())?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await?;
    }
    println!(
        "  replica-1 stopped (pg_ctl stop -m fast) under 4 concurrent readers: {} requests, {} failed",
        done.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    tokio::task::block_in_place(|| local.replica(0).start())?;
    server.abort();
    backend.cluster.shutdown();
    Ok(())
}

async fn shared_tier(local: &LocalCluster) -> Result<(), Error> {
    println!("\n6. two instances sharing one Redis (L1 + L2, invalidation fan-out)");
    let redis = tokio::task::spawn_blocking(tower_scale::testing::LocalRedis::start).await??;
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("random key: {e}"))?;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let args = axum_users::users::Args {
            listen: "127.0.0.1:0".parse()?,
            primary: Some(local.primary().url()),
            replicas: local.replicas().iter().map(|r| r.url()).collect(),
            token_key: Some(key.clone()),
            redis: Some(redis.url()),
            http_cache: false,
            no_change_feed: true,
            workers: None,
            sharding: Default::default(),
        };
        let backend = axum_users::users::backend(&args).await?;
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let app = axum_users::router(&backend, handle);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            axum::serve(
                axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                    let _ = tcp.set_nodelay(true);
                }),
                app,
            )
            .await
        });
        instances.push((backend, addr));
    }
    let client = http_client();
    let mut a = Http {
        client: client.clone(),
        addr: instances[0].1,
        cookie: None,
    };
    let mut b = Http {
        client,
        addr: instances[1].1,
        cookie: None,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !instances
        .iter()
        .all(|(be, _)| be.redis.as_ref().is_some_and(|r| r.stats().heartbeats > 0))
    {
        if Instant::now() > deadline {
            return Err("the instances did not subscribe to Redis".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "  instance A on http://{}, instance B on http://{}, Redis at {}",
        instances[0].1,
        instances[1].1,
        redis.url()
    );
    let created = a
        .send("POST", "/users", Some(r#"{"name":"linus"}"#.into()), true)
        .await?;
    let id = created.id.ok_or("no id")?;
    let path = format!("/users/{id}");
    let on_a = a.send("GET", &path, None, true).await?;
    b.cookie = a.cookie.clone();
    let on_b = b.send("GET", &path, None, true).await?;
    let again = b.send("GET", &path, None, true).await?;
    println!(
        "  GET on A: {} ({}); then on B: served by {}, then by {}",
        on_a.name.unwrap_or_default(),
        on_a.served_by,
        on_b.served_by,
        again.served_by
    );
    let fanout_before = instances[1]
        .0
        .redis
        .as_ref()
        .map_or(0, |r| r.stats().fanout_received);
    let t = Instant::now();
    a.send("PUT", &path, Some(r#"{"name":"torvalds"}"#.into()), true)
        .await?;
    while instances[1]
        .0
        .redis
        .as_ref()
        .map_or(0, |r| r.stats().fanout_received)
        == fanout_before
    {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("B never heard of A's write".into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let heard = t.elapsed();
    b.cookie = a.cookie.clone();
    let after = b.send("GET", &path, None, true).await?;
    println!(
        "  PUT on A; B heard of it after {heard:.2?} and then read {:?} (served by {})",
        after.name.unwrap_or_default(),
        after.served_by
    );
    for (backend, _) in &instances {
        backend.cluster.shutdown();
    }
    Ok(())
}

async fn change_feed(local: &LocalCluster) -> Result<(), Error> {
    println!("\n7. a write from outside the library reaches the cache (the change feed)");
    let args = axum_users::users::Args::in_process(local);
    let backend = axum_users::users::backend(&args).await?;
    let feed = axum_users::users::change_feed("tour", &backend, None)
        .await
        .ok_or("the change feed did not start")?;
    if !feed.streaming(Duration::from_secs(30)).await {
        return Err(format!("the change feed is not streaming: {:?}", feed.status()).into());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let app = axum_users::router(&backend, handle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut client = Http {
        client: http_client(),
        addr,
        cookie: None,
    };
    let created = client
        .send("POST", "/users", Some(r#"{"name":"grace"}"#.into()), true)
        .await?;
    let id = created.id.ok_or("no id")?;
    let path = format!("/users/{id}");
    // Tokenless reads from here on: only the feed can make them see the
    // change below.
    client.cookie = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.send("GET", &path, None, false).await?;
        if r.served_by == "cache" {
            break;
        }
        if Instant::now() > deadline {
            return Err("the read was never cached".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("  GET {path} is served by the cache (TTL 60 s)");
    let plain = local.primary().connect().await?;
    plain
        .execute("UPDATE users SET name = 'hopper' WHERE id = $1", &[&id])
        .await?;
    let t = Instant::now();
    println!(
        "  psql-style client: UPDATE users SET name = 'hopper' WHERE id = {id} (not through the library)"
    );
    loop {
        let r = client.send("GET", &path, None, false).await?;
        if r.name.as_deref() == Some("hopper") {
            println!(
                "  a tokenless GET read 'hopper' {:.2?} after the commit (served by {}); the feed applied {} transactions",
                t.elapsed(),
                r.served_by,
                feed.status().transactions
            );
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the change never reached the service".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.abort();
    drop(feed);
    backend.cluster.shutdown();
    Ok(())
}

/// Reads `/users/{id}` with the cookie until it says `"welcomed": true`.
async fn until_welcomed(http: &mut Http, id: i64, within: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + within;
    while http
        .send("GET", &format!("/users/{id}"), None, true)
        .await?
        .welcomed
        != Some(true)
    {
        if Instant::now() > deadline {
            return Err(format!("user {id} was never welcomed").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn jobs(local: &LocalCluster) -> Result<(), Error> {
    use tower_scale::queue::{Job, Queue, Worker};
    println!("\n8. jobs: a welcome job per new user, and a worker killed mid-job");
    let args = axum_users::users::Args::in_process(local);
    let backend = axum_users::users::backend(&args).await?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let app = axum_users::router(&backend, handle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut client = Http {
        client: http_client(),
        addr,
        cookie: None,
    };
    // The services of steps 5 to 7 enqueued jobs and ran no worker.
    let waiting = backend.welcome.depth().await?.ready;
    let t = Instant::now();
    let worker = axum_users::users_app::welcome_worker(&backend, None, 2)
        .poll_interval(Duration::from_millis(100))
        .start()?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = client
            .send(
                "POST",
                "/users",
                Some(format!(r#"{{"name":"job-{i}"}}"#)),
                true,
            )
            .await?;
        if r.status != 201 || r.welcomed != Some(false) {
            return Err(format!("POST /users: {} welcomed={:?}", r.status, r.welcomed).into());
        }
        ids.push(r.id.ok_or("no id")?);
    }
    for id in &ids {
        until_welcomed(&mut client, *id, Duration::from_secs(10)).await?;
    }
    let flowed = t.elapsed();
    while worker.stats().processed < waiting + 5 {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the worker never finished the waiting jobs".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "  5 POST /users, each user and its welcome job in one transaction, answered \"welcomed\": false"
    );
    println!(
        "  a worker (2 slots) welcomed all 5 within {flowed:.2?}, behind the {waiting} jobs steps 5 to 7 \
         left (no worker there): {} jobs done in {:.2?}",
        worker.stats().processed,
        t.elapsed()
    );
    worker.shutdown(Duration::from_secs(5)).await;

    // Worker A: its own runtime and connections, as a process of its own;
    // its handler hangs. Dropping the runtime kills it mid-job: no release,
    // no more lease renewals.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("worker-a")
        .enable_all()
        .build()?;
    let (took, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let url = local.primary().url();
    doomed.spawn(async move {
        let cluster = Cluster::builder()
            .primary(NodeConfig::from_url(&url)?)
            .build()
            .await?;
        let queue = Queue::builder(cluster.db(), axum_users::users::WELCOME_QUEUE)
            .build()
            .await?;
        let _worker = Worker::new(
            queue,
            tower::service_fn(move |job: Job| {
                let _ = took.send((job.id, job.attempt));
                std::future::pending::<Result<(), std::convert::Infallible>>()
            }),
        )
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .start()?;
        std::future::pending::<()>().await;
        Ok::<(), Error>(())
    });
    let r = client
        .send(
            "POST",
            "/users",
            Some(r#"{"name":"interrupted"}"#.into()),
            true,
        )
        .await?;
    let id = r.id.ok_or("no id")?;
    let (job, attempt) = tokio::time::timeout(Duration::from_secs(10), taken.recv())
        .await?
        .ok_or("worker A stopped")?;
    println!(
        "  worker A (lease 1 s) took job {job} (user {id}), attempt {attempt}; its handler hangs"
    );
    doomed.shutdown_background();
    let killed = Instant::now();
    println!("  worker A killed mid-job (its runtime and connections dropped, nothing released)");
    let (again, mut rerun) = tokio::sync::mpsc::unbounded_channel();
    let welcome = axum_users::users_app::Welcome::new(&backend, None);
    let worker = Worker::new(
        backend.welcome.clone(),
        tower::service_fn(move |job: Job| {
            let _ = again.send((job.id, job.attempt, killed.elapsed()));
            welcome.clone().oneshot(job)
        }),
    )
    .poll_interval(Duration::from_millis(100))
    .start()?;
    until_welcomed(&mut client, id, Duration::from_secs(10)).await?;
    let (job, attempt, after) = rerun.recv().await.ok_or("worker B stopped")?;
    println!(
        "  worker B took job {job} again {after:.2?} after the kill (A's lease lapsed), attempt {attempt}; \
         user {id} read back \"welcomed\": true {:.2?} after the kill",
        killed.elapsed()
    );
    worker.shutdown(Duration::from_secs(5)).await;
    server.abort();
    backend.cluster.shutdown();
    Ok(())
}

/// An origin for step 9: answers its name; every connection is a task of
/// its server task, so aborting that kills it whole (listener and
/// connections), as a process killed.
struct Origin {
    name: &'static str,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start(name: &'static str) -> Result<Origin, Error> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let app = axum::Router::new().fallback(move || async move {
            ([("x-origin", name), ("cache-control", "no-store")], name)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Origin { name, addr, server })
    }

    fn url(&self) -> Result<hyper::Uri, Error> {
        Ok(format!("http://{}", self.addr).parse()?)
    }
}

type Balanced = tower_scale::balance::Balancer<http_body_util::Empty<bytes::Bytes>>;

/// Sends GETs through `balancer` from `clients` tasks for `run`; the
/// answers per origin (`failed` for anything but a 200).
async fn spread(balancer: &Balanced, clients: usize, run: Duration) -> BTreeMap<String, u64> {
    let until = Instant::now() + run;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let balancer = balancer.clone();
        tasks.spawn(async move {
            use http_body_util::BodyExt;
            let mut seen = BTreeMap::<String, u64>::new();
            while Instant::now() < until {
                let req = hyper::Request::get("/item").body(http_body_util::Empty::new());
                let Ok(req) = req else { continue };
                let Ok(res) = balancer.clone().oneshot(req).await;
                let origin = match res.headers().get("x-origin").map(|v| v.to_str()) {
                    Some(Ok(name)) if res.status() == 200 => name.to_string(),
                    _ => "failed".to_string(),
                };
                let read = res.into_body().collect().await.is_ok();
                let origin = if read { origin } else { "failed".into() };
                *seen.entry(origin).or_default() += 1;
            }
            seen
        });
    }
    let mut all = BTreeMap::new();
    while let Some(Ok(seen)) = tasks.join_next().await {
        for (origin, n) in seen {
            *all.entry(origin).or_default() += n;
        }
    }
    all
}

/// `origin-1 34%, origin-2 33%, ...` of the answers.
fn shares(seen: &BTreeMap<String, u64>) -> String {
    let total: u64 = seen.values().sum();
    seen.iter()
        .map(|(origin, n)| format!("{origin} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn balancing() -> Result<(), Error> {
    use tower_scale::balance::{Balancer, Upstreams};
    println!("\n9. the load balancer: three origins, one killed under load, a fourth added");
    let mut origins = vec![
        Origin::start("origin-1").await?,
        Origin::start("origin-2").await?,
        Origin::start("origin-3").await?,
    ];
    let upstreams = Upstreams::new();
    for origin in &origins {
        upstreams.add(origin.url()?)?;
    }
    let balancer: Balanced = Balancer::builder()
        .upstream_timeout(Duration::from_secs(2))
        .slow_start(Duration::from_millis(300))
        .build(&upstreams)?;
    let phase = Duration::from_millis(300);
    let before = spread(&balancer, 4, phase).await;
    let total: u64 = before.values().sum();
    println!(
        "  a Balancer over 3 origins, 4 clients for {phase:.0?}: {total} GETs, {}",
        shares(&before)
    );

    // `origin-2` killed a third of the way into the next phase.
    let load = {
        let balancer = balancer.clone();
        tokio::spawn(async move { spread(&balancer, 4, 3 * phase).await })
    };
    tokio::time::sleep(phase).await;
    let mut killed = origins.remove(1);
    killed.server.abort();
    let t = Instant::now();
    let _ = (&mut killed.server).await;
    let during = load.await?;
    let failed = during.get("failed").copied().unwrap_or(0);
    let status = upstreams.status();
    let out = status
        .iter()
        .find(|s| s.url.authority().map(|a| a.as_str()) == Some(&killed.addr.to_string()));
    println!(
        "  {} killed under load (requests that failed on it and went to another: {}; ejected {} time(s)): \
         {} GETs, {failed} failed; {}",
        killed.name,
        out.map_or(0, |s| s.retries),
        out.map_or(0, |s| s.ejections),
        during.values().sum::<u64>(),
        shares(&during)
    );
    if failed > 0 {
        return Err(format!("{failed} requests failed while {} was killed", killed.name).into());
    }
    let after = spread(&balancer, 4, phase).await;
    println!(
        "  then, {:.1?} after the kill: {}",
        t.elapsed(),
        shares(&after)
    );
    if after.contains_key(killed.name) || after.contains_key("failed") {
        return Err(format!("after the kill: {after:?}").into());
    }

    let fourth = Origin::start("origin-4").await?;
    upstreams.add(fourth.url()?)?;
    upstreams.remove(&killed.url()?);
    let added = spread(&balancer, 4, 2 * phase).await;
    println!(
        "  origin-4 added (Upstreams::add; slow start 300 ms), origin-2 removed: {}",
        shares(&added)
    );
    if !added.contains_key(fourth.name) || added.contains_key("failed") {
        return Err(format!("with origin-4 added: {added:?}").into());
    }
    for origin in origins.iter().chain([&fourth]) {
        origin.server.abort();
    }
    Ok(())
}
