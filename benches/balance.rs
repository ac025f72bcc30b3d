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
//!
//! Measured (2 cores shared with other builds' benchmarks, load average
//! 5–7): interleaved medians 1.080 (quartiles 1.066, 1.106), 1.052, 1.059
//! and 1.097 (wide quartiles); callgrind (`BALANCE_COUNT`, below) 56,816
//! instructions per balanced request against 48,463 direct (10,838 more
//! before the request's future shrank, p2c's call only picked and
//! peak-EWMA read the clock once per pick).
//!
//! Then, under `cargo bench`, the same two requests interleaved in
//! batches (`interleaved`): the ratio when both see the same load, which
//! the two criterion functions, run one after the other on a shared
//! machine, need not.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group};
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

/// The runtime, the balancer over three origins, the direct client
/// (built with the balancer's own client settings) and the direct URL.
struct Setup {
    rt: tokio::runtime::Runtime,
    balancer: Balancer<Empty<Bytes>>,
    client: Client<HttpConnector, Empty<Bytes>>,
    direct_url: hyper::Uri,
    item: hyper::Uri,
}

fn setup() -> Setup {
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
    let direct_url = format!("http://{}/item", addrs[0]).parse().expect("url");
    Setup {
        rt,
        balancer,
        client,
        direct_url,
        item: "/item".parse().expect("path"),
    }
}

/// One direct miss, body read.
async fn direct(client: &Client<HttpConnector, Empty<Bytes>>, url: &hyper::Uri) -> Bytes {
    let res = client.get(url.clone()).await.expect("response");
    res.into_body().collect().await.expect("body").to_bytes()
}

/// One miss through the balancer, body read; the request built as
/// `client.get` builds it, from a parsed target.
async fn balanced(balancer: &Balancer<Empty<Bytes>>, item: &hyper::Uri) -> Bytes {
    let req = Request::get(item.clone())
        .body(Empty::new())
        .expect("request");
    let res = balancer.clone().oneshot(req).await.expect("infallible");
    res.into_body().collect().await.expect("body").to_bytes()
}

fn proxy(c: &mut Criterion) {
    let Setup {
        rt,
        balancer,
        client,
        direct_url,
        item,
    } = setup();
    let mut group = c.benchmark_group("proxy");
    group.throughput(Throughput::Elements(1));
    group.bench_function("direct_miss", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(direct(&client, &direct_url).await) })
    });
    group.bench_function("balanced_miss", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(balanced(&balancer, &item).await) })
    });
    group.finish();
}

/// The same two requests interleaved, 2,000 of one kind then 2,000 of the
/// other, 30 rounds: the two criterion functions run one after the other,
/// and on a shared machine the load can change between them; here both
/// see the same. Prints the median of the per-round ratios.
fn interleaved() {
    const BATCH: u32 = 2_000;
    const ROUNDS: usize = 30;
    let s = setup();
    let time = |balanced_side: bool| {
        s.rt.block_on(async {
            let started = Instant::now();
            for _ in 0..BATCH {
                let body = if balanced_side {
                    balanced(&s.balancer, &s.item).await
                } else {
                    direct(&s.client, &s.direct_url).await
                };
                black_box(body);
            }
            started.elapsed() / BATCH
        })
    };
    // Warm both: connections opened, the pools filled.
    time(false);
    time(true);
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            // Alternate which goes first.
            let (d, b) = if round % 2 == 0 {
                let d = time(false);
                (d, time(true))
            } else {
                let b = time(true);
                (time(false), b)
            };
            b.as_secs_f64() / d.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "proxy balanced_miss / direct_miss, interleaved ({ROUNDS} rounds of {BATCH}): median {:.3} (quartiles {:.3}, {:.3})",
        ratios[ROUNDS / 2],
        ratios[ROUNDS / 4],
        ratios[3 * ROUNDS / 4]
    );
}

/// `BALANCE_COUNT=balanced:N` (or `direct:N`): both kinds warmed, then
/// `N` requests of the one kind, and nothing else. For instruction counts:
/// run it under `valgrind --tool=callgrind` for two values of `N`; the
/// difference over the difference in `N` is the cost of one request,
/// setup and warm-up excluded.
fn count(spec: &str) {
    let (kind, n) = spec.split_once(':').expect("BALANCE_COUNT=KIND:N");
    let n: u32 = n.parse().expect("BALANCE_COUNT=KIND:N");
    let s = setup();
    s.rt.block_on(async {
        for _ in 0..200 {
            black_box(direct(&s.client, &s.direct_url).await);
            black_box(balanced(&s.balancer, &s.item).await);
        }
        for _ in 0..n {
            let body = match kind {
                "balanced" => balanced(&s.balancer, &s.item).await,
                _ => direct(&s.client, &s.direct_url).await,
            };
            black_box(body);
        }
    });
}

criterion_group!(benches, proxy);

fn main() {
    if let Ok(spec) = std::env::var("BALANCE_COUNT") {
        count(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Only under `cargo bench` (not `cargo test --benches`, nor a filter
    // run that names other functions).
    if std::env::args().any(|a| a == "--bench") {
        interleaved();
    }
}
