//! A cached hit against the uncached axum router, in-process.
//!
//! ```text
//! cargo bench --features full --bench http
//! ```
//!
//! `http_hit/axum_static`: an axum router returning a fixed 1 KiB body with
//! `Cache-Control: public, max-age=3600`. `http_hit/axum_cached_hit`: the
//! same router wrapped by the HTTP cache, a hit (routing and the handler
//! skipped). Both through `tower::Service::call`, the request built and the
//! body collected in each iteration.
//!
//! `http_hit/axum_cached_full_hit_64k` and `http_hit/axum_cached_range_hit`:
//! the same stored 64 KiB body, asked for whole and for a 4 KiB range of it
//! (`Range: bytes=8192-12287`, a `206`), measured the same way; the
//! full-hit request carries a `Referer` of the same size in its place, so
//! the two loops build equal requests.

use std::hint::black_box;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use axum::routing::get;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_scale::http::HttpCacheLayer;

static BODY: [u8; 1024] = [b'x'; 1024];
static BODY_64K: [u8; 65536] = [b'y'; 65536];

fn app() -> Router {
    Router::new()
        .route(
            "/static",
            get(|| async {
                (
                    [(header::CACHE_CONTROL, "public, max-age=3600")],
                    Bytes::from_static(&BODY),
                )
            }),
        )
        .route(
            "/big",
            get(|| async {
                (
                    [(header::CACHE_CONTROL, "public, max-age=3600")],
                    Bytes::from_static(&BODY_64K),
                )
            }),
        )
        .route("/other", get(|| async { "other" }))
}

fn request() -> Request<Body> {
    Request::get("/static")
        .header(header::HOST, "bench.local")
        .body(Body::empty())
        .expect("request")
}

/// The same request as [`range_request`] less the range: it carries a
/// header of the same size the cache ignores (`Referer`, a standard name
/// like `Range`), so both loops build, fill and drop the same request map
/// and the comparison measures what the cache does with a `Range`.
fn big_request() -> Request<Body> {
    Request::get("/big")
        .header(header::HOST, "bench.local")
        .header(header::REFERER, "bytes=8192-12287")
        .body(Body::empty())
        .expect("request")
}

/// A 4 KiB range of `/big`.
fn range_request() -> Request<Body> {
    Request::get("/big")
        .header(header::HOST, "bench.local")
        .header(header::RANGE, "bytes=8192-12287")
        .body(Body::empty())
        .expect("request")
}

fn http_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("http_hit");
    group.throughput(Throughput::Elements(1));

    let plain = app();
    group.bench_function("axum_static", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = plain.clone();
            async move {
                let res = ServiceExt::<Request<Body>>::ready(&mut svc)
                    .await
                    .expect("ready")
                    .call(request())
                    .await
                    .expect("response");
                black_box(res.into_body().collect().await.expect("body").to_bytes())
            }
        })
    });

    let layer = HttpCacheLayer::builder().build().expect("config");
    let cached = ServiceBuilder::new().layer(layer.clone()).service(app());
    rt.block_on(async {
        let res = ServiceExt::<Request<Body>>::oneshot(cached.clone(), request())
            .await
            .expect("fill");
        assert_eq!(
            res.into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .len(),
            1024
        );
    });
    group.bench_function("axum_cached_hit", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = cached.clone();
            async move {
                let res = ServiceExt::<Request<Body>>::ready(&mut svc)
                    .await
                    .expect("ready")
                    .call(request())
                    .await
                    .expect("response");
                black_box(res.into_body().collect().await.expect("body").to_bytes())
            }
        })
    });

    rt.block_on(async {
        let res = ServiceExt::<Request<Body>>::oneshot(cached.clone(), big_request())
            .await
            .expect("fill");
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), 65536);
        let res = ServiceExt::<Request<Body>>::oneshot(cached.clone(), range_request())
            .await
            .expect("range hit");
        assert_eq!(res.status(), 206);
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), 4096);
    });
    group.bench_function("axum_cached_full_hit_64k", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = cached.clone();
            async move {
                let res = ServiceExt::<Request<Body>>::ready(&mut svc)
                    .await
                    .expect("ready")
                    .call(big_request())
                    .await
                    .expect("response");
                black_box(res.into_body().collect().await.expect("body").to_bytes())
            }
        })
    });
    group.bench_function("axum_cached_range_hit", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = cached.clone();
            async move {
                let res = ServiceExt::<Request<Body>>::ready(&mut svc)
                    .await
                    .expect("ready")
                    .call(range_request())
                    .await
                    .expect("response");
                black_box(res.into_body().collect().await.expect("body").to_bytes())
            }
        })
    });
    assert_eq!(
        layer.stats().misses,
        2,
        "every benchmarked request was a hit (two fills)"
    );
    group.finish();
}

criterion_group!(benches, http_hit);
criterion_main!(benches);
