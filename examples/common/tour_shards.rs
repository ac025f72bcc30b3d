//! The tour's step with two shards (`examples/tour.rs` includes it): the
//! users service of `axum_users --shards 2` in-process, users spread over
//! both shards by id, their welcome jobs run by each shard's worker, a
//! listing in id order across the shards page by page, and the slot map
//! the operator sees.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::axum_users::{users, users_shards};
use super::{Error, http_client};

/// `GET`/`POST` with the cookie kept; the status, `x-served-by` and body.
struct Client {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
    cookie: Option<String>,
}

impl Client {
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String, serde_json::Value), Error> {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                bytes::Bytes::from(b.to_string())
            }
            None => bytes::Bytes::new(),
        };
        let send = self
            .http
            .request(req.body(http_body_util::Full::new(payload))?);
        let res = tokio::time::timeout(Duration::from_secs(10), send).await??;
        if let Some(c) = res
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
        {
            self.cookie = c.split(';').next().map(str::to_string);
        }
        let status = res.status().as_u16();
        let by = res
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let bytes = res.into_body().collect().await?.to_bytes();
        Ok((
            status,
            by,
            serde_json::from_slice(&bytes).unwrap_or_default(),
        ))
    }
}

pub async fn shards() -> Result<(), Error> {
    println!("\n10. the users service on two shards (axum_users --shards 2)");
    let t = Instant::now();
    let mut args = users::Args::in_process_sharded(2);
    args.sharding.admin_token = Some("tour-admin".into());
    let backend = users_shards::backend(&args).await?;
    println!(
        "  two LocalClusters (a primary and a replica each) as shard-1 and shard-2, up in {:.2?}",
        t.elapsed()
    );
    let workers = users_shards::start_workers(&backend, 2)?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let app = users_shards::router(&backend, metrics, args.sharding.admin_token.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut client = Client {
        http: http_client(),
        base: format!("http://{addr}"),
        cookie: None,
    };

    let t = Instant::now();
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids = Vec::new();
    for i in 0..100 {
        let body = serde_json::json!({ "name": format!("sharded-{i}") });
        let (status, by, user) = client.send("POST", "/users", Some(body), &[]).await?;
        if status != 201 {
            return Err(format!("POST /users: {status} {user}").into());
        }
        let shard = by.split('/').next().unwrap_or_default().to_string();
        *per_shard.entry(shard).or_default() += 1;
        ids.extend(user["id"].as_i64());
    }
    println!(
        "  100 users created in {:.2?}, by id (from tower_scale::ids, no sequence): {per_shard:?}",
        t.elapsed()
    );
    let (status, by, user) = client
        .send("GET", &format!("/users/{}", ids[99]), None, &[])
        .await?;
    println!("  the last one read back with the cookie: {status} from {by}: {user}");

    // Each welcome job lives on its user's shard, run by that shard's worker.
    let t = Instant::now();
    loop {
        let (_, _, page) = client.send("GET", "/users?limit=1000", None, &[]).await?;
        let users = page["users"].as_array().map_or(&[][..], Vec::as_slice);
        let welcomed = users.iter().filter(|u| u["welcomed"] == true).count();
        if welcomed == 100 {
            println!(
                "  every user welcomed {:.2?} later (a welcome queue and a worker on each shard)",
                t.elapsed()
            );
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{welcomed} of 100 users welcomed after 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t = Instant::now();
    let (mut listed, mut pages, mut after) = (Vec::new(), 0, None::<i64>);
    let mut served = BTreeMap::new();
    loop {
        let path = match after {
            Some(a) => format!("/users?limit=30&after={a}"),
            None => "/users?limit=30".to_string(),
        };
        let (status, by, page) = client.send("GET", &path, None, &[]).await?;
        if status != 200 {
            return Err(format!("GET {path}: {status} {page}").into());
        }
        pages += 1;
        *served.entry(by).or_insert(0) += 1;
        let users = page["users"].as_array().map_or(&[][..], Vec::as_slice);
        listed.extend(users.iter().filter_map(|u| u["id"].as_i64()));
        match page["next"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if listed != ids {
        return Err("the cross-shard listing is not the users in id order".into());
    }
    println!(
        "  GET /users?limit=30, page by page: {} users in id order in {pages} pages ({:.2?}), \
         each page a k-way merge of both shards, served by {served:?}",
        listed.len(),
        t.elapsed()
    );

    hot_key(&client, &backend, &ids).await?;

    let (status, _, _) = client.send("GET", "/admin/shards", None, &[]).await?;
    let auth = [("authorization", "Bearer tour-admin")];
    let (_, _, map) = client.send("GET", "/admin/shards", None, &auth).await?;
    println!("  GET /admin/shards: {status} without the admin token; with it: {map}");

    server.abort();
    for worker in workers {
        worker.shutdown(Duration::from_secs(5)).await;
    }
    drop(backend);
    Ok(())
}

/// The celebrity problem: one user read 2,000 times among 1,000 reads of
/// 99 others, from 8 clients without a cookie (`Any`), while another
/// client renames it 20 times (each write invalidates its entry): the
/// users cache finds it at the top of its hot keys, serves it from memory,
/// and its fills go to the shard's replicas, never to a primary.
async fn hot_key(
    client: &Client,
    backend: &users_shards::ShardedBackend,
    ids: &[i64],
) -> Result<(), Error> {
    let celebrity = ids[7];
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8usize {
        let mut c = Client {
            http: client.http.clone(),
            base: client.base.clone(),
            cookie: None,
        };
        let others: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|&i| i != celebrity)
            .take(99)
            .collect();
        tasks.spawn(async move {
            let mut served: BTreeMap<String, usize> = BTreeMap::new();
            for n in 0..375usize {
                // Two reads in three are the celebrity's.
                let (id, hot) = match n % 3 {
                    2 => (others[(n / 3 + task * 47) % others.len()], false),
                    _ => (celebrity, true),
                };
                let (status, by, _) = c.send("GET", &format!("/users/{id}"), None, &[]).await?;
                if status != 200 {
                    return Err::<_, Error>(format!("GET /users/{id}: {status}").into());
                }
                if hot {
                    *served.entry(by).or_default() += 1;
                }
            }
            Ok(served)
        });
    }
    let mut writer = Client {
        http: client.http.clone(),
        base: client.base.clone(),
        cookie: None,
    };
    let renames = tokio::spawn(async move {
        for n in 0..20 {
            let body = serde_json::json!({ "name": format!("celebrity-{n}") });
            let path = format!("/users/{celebrity}");
            let (status, _, _) = writer.send("PUT", &path, Some(body), &[]).await?;
            if status != 200 {
                return Err::<(), Error>(format!("PUT {path}: {status}").into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    });
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        for (by, n) in done?? {
            *served.entry(by).or_default() += n;
        }
    }
    renames.await??;
    let on_primary: usize = served
        .iter()
        .filter(|(by, _)| by.ends_with("/primary"))
        .map(|(_, n)| n)
        .sum();
    let top = backend.users.hot_keys(3);
    let rank = top.iter().position(|k| k.key == celebrity).map(|r| r + 1);
    println!(
        "  a hot key: user {celebrity} read 2000 times among 1000 reads of 99 others, 8 clients \
         without a cookie, renamed 20 times meanwhile, in {:.2?}: served by {served:?} \
         ({on_primary} from a primary)",
        t.elapsed()
    );
    println!(
        "  the cache's hot keys (a sampled sketch; tower_scale_cache_hot_key_hits{{cache=\"users\",rank}}): \
         {:?}, user {celebrity} at rank {}",
        top.iter().map(|k| (k.key, k.reads)).collect::<Vec<_>>(),
        rank.map_or("none".to_string(), |r| r.to_string())
    );
    if rank != Some(1) || on_primary > 0 {
        return Err(format!(
            "the hot key is at rank {rank:?} with {on_primary} reads from a primary"
        )
        .into());
    }
    Ok(())
}
