//! `DbLayer` in-process: routing by method, per-route overrides, the
//! explicit extractors, and where the token goes.

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_scale::pg::{Cluster, ConsistencyToken, Lsn, NodeConfig, TokenCodec};
use tower_scale::pg::{DbLayer, Primary, Replica, RequestDb, Route};
use tower_scale::testing::LocalCluster;

async fn show(db: RequestDb) -> String {
    format!("{:?}", db.consistency())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_method_override_and_extractor() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .build()
        .await
        .unwrap();
    let codec = TokenCodec::new(&[7u8; 32], cluster.identity()).unwrap();
    let token = codec.encode(ConsistencyToken::new(Lsn(42)));
    let layer = DbLayer::builder(cluster.db(), codec)
        .route("/admin", Route::Primary)
        .route("/reports", Route::Replicas)
        .build();
    let app: Router = Router::new()
        .route("/users", get(show).post(show))
        .route("/admin/stats", get(show))
        .route("/reports/daily", get(show).post(show))
        .route(
            "/explicit/primary",
            get(|Primary(db): Primary| async move { format!("{:?}", db.consistency()) }),
        )
        .route(
            "/explicit/replica",
            axum::routing::post(
                |Replica(db): Replica| async move { format!("{:?}", db.consistency()) },
            ),
        )
        .layer(layer);
    let call = |method: &'static str, path: &'static str, token: Option<String>| {
        let app = app.clone();
        async move {
            let mut req = Request::builder().method(method).uri(path);
            if let Some(t) = token {
                req = req.header("cookie", format!("other=1; tower_scale_token={t}"));
            }
            let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
        }
    };
    assert_eq!(call("GET", "/users", None).await, "Any");
    assert!(
        call("GET", "/users", Some(token.clone()))
            .await
            .starts_with("ReadYourWrites")
    );
    assert_eq!(call("POST", "/users", None).await, "Strong");
    assert_eq!(
        call("GET", "/admin/stats", None).await,
        "Strong",
        "override: primary"
    );
    assert_eq!(
        call("POST", "/reports/daily", None).await,
        "Any",
        "override: replicas"
    );
    assert_eq!(call("GET", "/explicit/primary", None).await, "Strong");
    assert_eq!(call("POST", "/explicit/replica", None).await, "Any");
    assert_eq!(
        call("GET", "/users", Some("forged".into())).await,
        "Any",
        "a bad token is ignored"
    );
}

/// The token is found wherever it is among the request's fields (header,
/// any `Cookie` line, several of each), the newest valid one wins, and a
/// request with neither gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_token_among_headers_and_cookies_wins() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .build()
        .await
        .unwrap();
    let codec = TokenCodec::new(&[7u8; 32], cluster.identity()).unwrap();
    let old = codec.encode(ConsistencyToken::new(Lsn(10)));
    let new = codec.encode(ConsistencyToken::new(Lsn(20)));
    let layer = DbLayer::builder(cluster.db(), codec).build();
    let lsn_of = |fields: Vec<(&'static str, String)>| {
        let mut req = Request::builder().uri("/");
        for (k, v) in fields {
            req = req.header(k, v);
        }
        layer
            .token_of(req.body(()).unwrap().headers())
            .map(|t| t.lsn())
    };
    assert_eq!(lsn_of(vec![]), None);
    assert_eq!(lsn_of(vec![("accept", "*/*".into())]), None);
    assert_eq!(
        lsn_of(vec![("x-consistency-token", old.clone())]),
        Some(Lsn(10))
    );
    assert_eq!(
        lsn_of(vec![
            ("x-consistency-token", new.clone()),
            ("cookie", format!("a=1; tower_scale_token={old}")),
        ]),
        Some(Lsn(20)),
        "header newer than cookie"
    );
    assert_eq!(
        lsn_of(vec![
            ("cookie", "a=1".into()),
            ("x-consistency-token", old.clone()),
            ("accept", "*/*".into()),
            ("cookie", format!("tower_scale_token=\"{new}\"; b=2")),
        ]),
        Some(Lsn(20)),
        "a later cookie line, quoted, newer than the header"
    );
    assert_eq!(
        lsn_of(vec![
            ("x-consistency-token", "forged".into()),
            ("x-consistency-token", old.clone()),
            ("cookie", "tower_scale_token=forged".into()),
        ]),
        Some(Lsn(10)),
        "forged values are skipped, the valid one kept"
    );
}

/// `RequestDb::cached`: a write through the database cache puts its token
/// in the response, and a read through it with that cookie sees the write
/// (from a replica that has it or the primary, never a stale cache entry);
/// the read's data version reaches the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_queries_carry_the_token_and_the_data_version() {
    use axum::extract::State;
    use axum::routing::put;
    use tower_scale::cache::DataVersion;
    use tower_scale::pg::{DbCache, Query};

    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, std::time::Duration::from_millis(500))
        .start()
        .unwrap();
    let cluster = Cluster::builder()
        .primary(NodeConfig::new(local.primary().config()))
        .replica(NodeConfig::new(local.replica(0).config()))
        .build()
        .await
        .unwrap();
    let db = cluster.db();
    db.execute("CREATE TABLE users (id bigint primary key, name text)", &[])
        .await
        .unwrap();
    db.execute("INSERT INTO users VALUES (1, 'ada')", &[])
        .await
        .unwrap();
    local
        .wait_for_replicas(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let users = DbCache::builder(db.clone()).build().unwrap();
    let codec = TokenCodec::new(&[7u8; 32], cluster.identity()).unwrap();
    let app: Router = Router::new()
        .route(
            "/users/1",
            get(|State(users): State<DbCache>, db: RequestDb| async move {
                let q = Query::read("SELECT name FROM users WHERE id = $1", db.consistency())
                    .bind(1i64)
                    .for_key("users", 1);
                let out = db.cached(&users, q).await.unwrap();
                out.rows[0].get::<_, String>(0)
            })
            .merge(put(
                |State(users): State<DbCache>, db: RequestDb, name: String| async move {
                    let q = Query::write("UPDATE users SET name = $1 WHERE id = $2")
                        .bind(name)
                        .bind(1i64)
                        .for_key("users", 1);
                    db.cached(&users, q).await.unwrap();
                    "ok"
                },
            )),
        )
        .with_state(users)
        .layer(DbLayer::builder(cluster.db(), codec).build());
    let send = |req: Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(req).await.unwrap() }
    };
    // Warm the cache with the old name.
    let res = send(Request::get("/users/1").body(Body::empty()).unwrap()).await;
    assert!(
        res.extensions().get::<DataVersion>().is_some(),
        "no data version"
    );
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ada");
    for round in 0..5 {
        let name = format!("name {round}");
        let res = send(
            Request::put("/users/1")
                .body(Body::from(name.clone()))
                .unwrap(),
        )
        .await;
        let cookie = res
            .headers()
            .get("set-cookie")
            .expect("the write's token in the response")
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let req = Request::get("/users/1")
            .header("cookie", cookie)
            .body(Body::empty())
            .unwrap();
        let body = send(req)
            .await
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(
            body,
            name.as_bytes(),
            "round {round}: the cookie's read missed its write"
        );
    }
}
