//! An origin server that can be killed whole: shared by the balancer's
//! tests and the `http_proxy` process tests (`tests/http/balance_proxy.rs`
//! includes this file).

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Accepts on `listener` and serves `app`; every connection is a task of
/// this one, so aborting it closes the listener and every connection (an
/// origin killed).
pub async fn serve(listener: TcpListener, app: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}
