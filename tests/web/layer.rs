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
