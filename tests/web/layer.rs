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
