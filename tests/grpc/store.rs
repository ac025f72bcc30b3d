//! The store choice: `build()` (moka) and `build_quick()` (quick_cache)
//! serve the same, and both keep to the byte bound, counting evictions.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_scale::grpc::{GrpcBody, GrpcCacheLayer, GrpcCacheLayerBuilder};

const METHOD: &str = "/store.v1.Store/Get";

/// One length-prefixed gRPC message of `n` bytes of `fill`.
fn message(fill: u8, n: usize) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(n).unwrap().to_be_bytes());
    out.resize(5 + n, fill);
    Bytes::from(out)
}

fn builder() -> GrpcCacheLayerBuilder {
    GrpcCacheLayer::builder()
        .method(METHOD, Duration::from_secs(60))
        .max_bytes(16 << 10)
}

/// 200 distinct calls of 1 KiB answers through a 16 KiB cache: the store
/// evicts to stay within the bound; then each call again gets its own
/// answer, from the store or the server.
async fn bounded_and_evicting(layer: GrpcCacheLayer) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let svc = layer.layer(service_fn(
        move |req: http::Request<GrpcBody<Full<Bytes>>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let request = req.into_body().collect().await.unwrap().to_bytes();
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                // The answer names the request: a hit must give the right one.
                let answer = message(request[5], 1000);
                let body = Full::new(answer).with_trailers(async { Some(Ok(trailers)) });
                Ok::<_, Infallible>(http::Response::new(body))
            }
        },
    ));
    let call = |i: u8| {
        let svc = svc.clone();
        async move {
            let req = http::Request::post(METHOD)
                .header("content-type", "application/grpc")
                .body(Full::new(message(i, 1)))
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        }
    };
    for i in 0..200u8 {
        assert_eq!(call(i).await, message(i, 1000));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 200);
    let stats = layer.stats();
    assert_eq!(stats.stored, 200);
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(
        stats.entries <= 16,
        "about 1.3 KiB each in 16 KiB: {stats:?}"
    );
    // Whatever was kept, each call gets its own answer again.
    for i in 0..200u8 {
        assert_eq!(call(i).await, message(i, 1000));
    }
    let (stats, made) = (layer.stats(), calls.load(Ordering::SeqCst));
    assert_eq!(stats.hits as usize, 400 - made, "{stats:?}");
}

#[tokio::test]
async fn the_moka_store_keeps_to_the_byte_bound() {
    bounded_and_evicting(builder().build().unwrap()).await;
}

#[cfg(feature = "quick-cache")]
#[tokio::test]
async fn the_quick_cache_store_keeps_to_the_byte_bound() {
    bounded_and_evicting(builder().build_quick().unwrap()).await;
}

#[cfg(feature = "quick-cache")]
#[test]
fn build_quick_checks_the_configuration_too() {
    assert!(
        GrpcCacheLayer::builder().build_quick().is_err(),
        "no method"
    );
    assert!(builder().max_bytes(0).build_quick().is_err());
    assert!(
        builder()
            .method("Get", Duration::from_secs(1))
            .build_quick()
            .is_err()
    );
}
