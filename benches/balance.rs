//! The balancer's cost on a miss: a request through [`Balancer`] to one of
//! three loopback origins, against the same request sent by a hyper client
//! straight to one origin, in one group and one run.
//!
//! ```text
//! cargo bench --features balance --bench balance -- --warm-up-time 1 --measurement-time 5
//! ```
//!
//! `proxy/direct_miss`: `hyper_util`'s keep-alive client `GET`s a 1 KiB
//! body from one origin and reads it. `proxy/balanced_miss`: the same
//! request through `tower::Service::call` on the balancer (p2c over
//! peak-EWMA across three such origins, picked in the caller's task, the
//! upstream timeout, the hop-by-hop filtering, the same keep-alive client
//! underneath), body read. Both clients are built alike (Nagle off, the
//! balancer's pool settings), and both keep their connections alive. The
//! origins are axum routers served by hyper on 127.0.0.1, in the same
//! runtime. Target: `balanced_miss / direct_miss` at most 1.10.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt;
use tower_scale::balance::{Balancer, Upstreams};

static BODY: [u8; 1024] = [b'x'; 1024];

async fn origin() -> SocketAddr {
    let app = Router::new().route("/item", get(|| async { Bytes::from_static(&BODY) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn proxy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (addrs, balancer) = rt.block_on(async {
        let addrs = [origin().await, origin().await, origin().await];
        let upstreams = Upstreams::new();
        for a in &addrs {
            upstreams
                .add(format!("http://{a}").parse().expect("url"))
                .expect("upstream");
        }
        let balancer: Balancer<Empty<Bytes>> = Balancer::builder()
            .upstream_timeout(Duration::from_secs(5))
            .slow_start(Duration::ZERO)
            .build(&upstreams)
            .expect("balancer");
        (addrs, balancer)
    });
    // The balancer's own client settings (`BalancerBuilder` defaults).
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(connector);
    let direct_url: hyper::Uri = format!("http://{}/item", addrs[0]).parse().expect("url");

    let mut group = c.benchmark_group("proxy");
    group.throughput(Throughput::Elements(1));
    group.bench_function("direct_miss", |b| {
        b.to_async(&rt).iter(|| {
            let client = client.clone();
            let url = direct_url.clone();
            async move {
                let res = client.get(url).await.expect("response");
                let body = res.into_body().collect().await.expect("body").to_bytes();
                black_box(body)
            }
        })
    });
    let item: hyper::Uri = "/item".parse().expect("path");
    group.bench_function("balanced_miss", |b| {
        b.to_async(&rt).iter(|| {
            let (balancer, item) = (balancer.clone(), &item);
            async move {
                // Built as `client.get` builds it: from a parsed target.
                let req = Request::get(item.clone())
                    .body(Empty::new())
                    .expect("request");
                let res = balancer.oneshot(req).await.expect("infallible");
                let body = res.into_body().collect().await.expect("body").to_bytes();
                black_box(body)
            }
        })
    });
    group.finish();
}

criterion_group!(benches, proxy);
criterion_main!(benches);
