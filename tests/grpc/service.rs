//! The gRPC cache in front of a scripted upstream (no network): what is
//! stored and what passes through unchanged, frame by frame.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};
use tower_scale::cache::CacheStats;
use tower_scale::grpc::{GrpcCache, GrpcCacheLayer};

const GET: &str = "/users.v1.Users/GetUser";

type Frames =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BodyError>>>>;

#[derive(Debug, Clone, PartialEq)]
struct BodyError;

#[derive(Debug, Clone, PartialEq)]
struct UpstreamError;

/// What the upstream answers: headers and frames, or an error.
type Answer = Result<(StatusCode, HeaderMap, Vec<Result<Frame<Bytes>, BodyError>>), UpstreamError>;

/// How the upstream answers a request (its headers and message).
type Script = dyn Fn(&HeaderMap, &Bytes) -> Answer + Send + Sync;

/// A request as the upstream got it: headers, and body or its error.
type Seen = (HeaderMap, Result<Bytes, String>);

/// A scripted gRPC server: records each request (headers and body, or the
/// body's error) and answers what `answer` says, after `gate` lets it.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Script>,
    gate: Option<Arc<Semaphore>>,
}

impl Upstream {
    fn new(answer: impl Fn(&HeaderMap, &Bytes) -> Answer + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            seen: Arc::default(),
            answer: Arc::new(answer),
            gate: None,
        }
    }

    /// Answers with one message echoing the request and OK trailers.
    fn echo() -> Self {
        Self::new(|_, msg| Ok(ok_response(msg)))
    }

    fn gated(mut self) -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        self.gate = Some(Arc::clone(&gate));
        (self, gate)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn last_seen(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

impl<B> Service<http::Request<B>> for Upstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = http::Response<Frames>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            this.calls.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| format!("{e:?}"));
            this.seen
                .lock()
                .unwrap()
                .push((parts.headers.clone(), body.clone()));
            if let Some(gate) = &this.gate {
                gate.acquire().await.unwrap().forget();
            }
            let (status, headers, frames) =
                (this.answer)(&parts.headers, &body.unwrap_or_default())?;
            let mut res = http::Response::new(StreamBody::new(futures::stream::iter(frames)));
            *res.status_mut() = status;
            *res.headers_mut() = headers;
            Ok(res)
        })
    }
}

/// One length-prefixed gRPC message.
fn message(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

fn grpc_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h
}

fn status_trailers(code: &'static str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(code));
    t
}

fn ok_response(msg: &Bytes) -> (StatusCode, HeaderMap, Vec<Result<Frame<Bytes>, BodyError>>) {
    (
        StatusCode::OK,
        grpc_headers(),
        vec![
            Ok(Frame::data(msg.clone())),
            Ok(Frame::trailers(status_trailers("0"))),
        ],
    )
}

fn request<B>(body: B, metadata: &[(&'static str, &'static str)]) -> http::Request<B> {
    let mut req = http::Request::new(body);
    *req.method_mut() = Method::POST;
    *req.uri_mut() = GET.parse().unwrap();
    req.headers_mut().extend(grpc_headers());
    for (k, v) in metadata {
        req.headers_mut().append(*k, HeaderValue::from_static(v));
    }
    req
}

fn unary(payload: &[u8], metadata: &[(&'static str, &'static str)]) -> http::Request<Full<Bytes>> {
    request(Full::new(message(payload)), metadata)
}

fn layer() -> GrpcCacheLayer {
    GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A response collected: status, headers, data, trailers.
#[derive(Debug, PartialEq)]
struct Collected {
    status: StatusCode,
    headers: HeaderMap,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

async fn call<B>(
    svc: &GrpcCache<Upstream>,
    req: http::Request<B>,
) -> Result<Collected, UpstreamError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send + std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await?;
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("the response body");
    let trailers = collected.trailers().cloned();
    Ok(Collected {
        status: parts.status,
        headers: parts.headers,
        data: collected.to_bytes(),
        trailers,
    })
}

#[tokio::test]
async fn a_hit_returns_the_stored_headers_message_and_trailers() {
    let upstream = Upstream::echo();
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    let a = call(&svc, unary(b"one", &[])).await.unwrap();
    let b = call(&svc, unary(b"one", &[])).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.data, message(b"one"));
    assert_eq!(a.trailers, Some(status_trailers("0")));
    assert_eq!(upstream.calls(), 1);
    let stats = layer.stats();
    assert_eq!((stats.misses, stats.hits, stats.stored), (1, 1, 1));
    assert_eq!(svc.stats(), stats, "the service reports the same core");
}

#[tokio::test]
async fn a_response_too_large_to_buffer_passes_through_unchanged() {
    let big = Bytes::from(vec![7u8; 100]);
    let split = big.clone();
    let upstream = Upstream::new(move |_, _| {
        // Two data frames and OK trailers: a valid message, over the limit.
        let framed = message(&split);
        Ok((
            StatusCode::OK,
            grpc_headers(),
            vec![
                Ok(Frame::data(framed.slice(..50))),
                Ok(Frame::data(framed.slice(50..))),
                Ok(Frame::trailers(status_trailers("0"))),
            ],
        ))
    });
    let layer = GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(60))
        .max_message(64)
        .build()
        .unwrap();
    let svc = layer.layer(upstream.clone());
    for round in 1..=2 {
        let res = call(&svc, unary(b"q", &[])).await.unwrap();
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(res.headers, grpc_headers());
        assert_eq!(res.data, message(&big), "every byte, in order");
        assert_eq!(res.trailers, Some(status_trailers("0")));
        assert_eq!(upstream.calls(), round, "never stored");
    }
    assert_eq!(layer.stats().stored, 0);
}

#[tokio::test]
async fn a_request_too_large_to_buffer_passes_through_unchanged() {
    let upstream = Upstream::echo();
    let layer = GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(60))
        .max_message(64)
        .build()
        .unwrap();
    let svc = layer.layer(upstream.clone());
    let payload = vec![1u8; 200];
    for round in 1..=2 {
        let res = call(&svc, unary(&payload, &[])).await.unwrap();
        assert_eq!(res.data, message(&payload));
        assert_eq!(upstream.last_seen().1, Ok(message(&payload)));
        assert_eq!(upstream.calls(), round);
    }
    assert_eq!(layer.stats().misses, 0, "never reached the core");
}

#[tokio::test]
async fn a_failing_request_body_reaches_the_upstream_as_a_failure() {
    let upstream = Upstream::echo();
    let svc = layer().layer(upstream.clone());
    let body = StreamBody::new(futures::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0"))),
        Err(BodyError),
    ]));
    let _ = call(&svc, request(body, &[])).await;
    let (_, seen) = upstream.last_seen();
    assert!(seen.is_err(), "the error is not swallowed: {seen:?}");
}

#[tokio::test]
async fn chosen_metadata_distinguishes_and_other_metadata_is_ignored() {
    let upstream = Upstream::echo();
    let layer = GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(60))
        .key_metadata("X-Tenant")
        .build()
        .unwrap();
    let svc = layer.layer(upstream.clone());
    call(
        &svc,
        unary(b"m", &[("x-tenant", "a"), ("x-request-id", "1")]),
    )
    .await
    .unwrap();
    call(
        &svc,
        unary(b"m", &[("x-tenant", "a"), ("x-request-id", "2")]),
    )
    .await
    .unwrap();
    assert_eq!(upstream.calls(), 1, "x-request-id is not in the key");
    call(&svc, unary(b"m", &[("x-tenant", "b")])).await.unwrap();
    assert_eq!(upstream.calls(), 2, "x-tenant is");
    call(&svc, unary(b"m", &[])).await.unwrap();
    assert_eq!(upstream.calls(), 3, "no x-tenant is its own key");
    // A second value the server might read is not hidden behind the first.
    call(&svc, unary(b"m", &[("x-tenant", "a"), ("x-tenant", "b")]))
        .await
        .unwrap();
    assert_eq!(upstream.calls(), 4);
    // The response encoding a caller accepts is always in the key.
    call(
        &svc,
        unary(b"m", &[("x-tenant", "a"), ("grpc-accept-encoding", "gzip")]),
    )
    .await
    .unwrap();
    assert_eq!(upstream.calls(), 5);
}

/// Each answer is returned to its caller and never stored.
async fn never_stored(
    answer: impl Fn(&HeaderMap, &Bytes) -> Answer + Send + Sync + 'static,
) -> Vec<Collected> {
    let upstream = Upstream::new(answer);
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    let mut out = Vec::new();
    for round in 1..=2 {
        out.push(call(&svc, unary(b"x", &[])).await.unwrap());
        assert_eq!(upstream.calls(), round);
    }
    assert_eq!(layer.stats().stored, 0);
    out
}

#[tokio::test]
async fn grpc_errors_are_not_stored() {
    // In the trailers.
    let res = never_stored(|_, m| {
        Ok((
            StatusCode::OK,
            grpc_headers(),
            vec![
                Ok(Frame::data(m.clone())),
                Ok(Frame::trailers(status_trailers("5"))),
            ],
        ))
    })
    .await;
    assert_eq!(res[0].trailers, Some(status_trailers("5")));
    // A trailers-only response.
    let res = never_stored(|_, _| {
        let mut h = grpc_headers();
        h.insert("grpc-status", HeaderValue::from_static("7"));
        Ok((StatusCode::OK, h, vec![]))
    })
    .await;
    assert_eq!(res[0].headers["grpc-status"], "7");
    // OK in the trailers, but an HTTP error.
    never_stored(|_, m| {
        let (_, h, f) = ok_response(m);
        Ok((StatusCode::SERVICE_UNAVAILABLE, h, f))
    })
    .await;
}

#[tokio::test]
async fn responses_that_are_not_one_whole_message_with_ok_trailers_are_not_stored() {
    // OK in the headers, a message, and no trailers: a cut stream.
    never_stored(|_, m| {
        let mut h = grpc_headers();
        h.insert("grpc-status", HeaderValue::from_static("0"));
        Ok((StatusCode::OK, h, vec![Ok(Frame::data(m.clone()))]))
    })
    .await;
    // Trailers without grpc-status, even with OK in the headers.
    never_stored(|_, m| {
        let mut h = grpc_headers();
        h.insert("grpc-status", HeaderValue::from_static("0"));
        Ok((
            StatusCode::OK,
            h,
            vec![
                Ok(Frame::data(m.clone())),
                Ok(Frame::trailers(HeaderMap::new())),
            ],
        ))
    })
    .await;
    // Two messages for a unary call.
    never_stored(|_, m| {
        let two = [m.clone(), m.clone()].concat();
        let (s, h, mut f) = ok_response(m);
        f[0] = Ok(Frame::data(Bytes::from(two)));
        Ok((s, h, f))
    })
    .await;
    // A truncated message.
    never_stored(|_, m| {
        let (s, h, mut f) = ok_response(m);
        f[0] = Ok(Frame::data(m.slice(..m.len() - 1)));
        Ok((s, h, f))
    })
    .await;
}

#[tokio::test]
async fn a_failing_response_body_answers_unavailable_and_is_not_stored() {
    let res = never_stored(|_, m| {
        Ok((
            StatusCode::OK,
            grpc_headers(),
            vec![Ok(Frame::data(m.slice(..2))), Err(BodyError)],
        ))
    })
    .await;
    assert_eq!(res[0].headers["grpc-status"], "14");
}

#[tokio::test]
async fn an_inner_error_reaches_its_caller_and_is_not_stored() {
    let upstream = Upstream::new(|_, _| Err(UpstreamError));
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    for round in 1..=2 {
        assert_eq!(
            call(&svc, unary(b"x", &[])).await.unwrap_err(),
            UpstreamError
        );
        assert_eq!(upstream.calls(), round);
    }
    let stats = layer.stats();
    assert_eq!((stats.inner_errors, stats.stored), (2, 0));
}

#[tokio::test]
async fn calls_that_are_not_plain_unary_grpc_pass_through() {
    let upstream = Upstream::echo();
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    let mut expected = 0;
    for _ in 0..2 {
        let mut get = unary(b"x", &[]);
        *get.method_mut() = Method::GET;
        let mut query = unary(b"x", &[]);
        *query.uri_mut() = format!("{GET}?user=alice").parse().unwrap();
        let mut json = unary(b"x", &[]);
        json.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        let garbage = request(Full::new(Bytes::from_static(b"not a grpc frame")), &[]);
        let credentialed = unary(b"x", &[("authorization", "Bearer alice")]);
        let mut other_path = unary(b"x", &[]);
        *other_path.uri_mut() = "/users.v1.Users/CreateUser".parse().unwrap();
        for req in [get, query, json, garbage, credentialed, other_path] {
            call(&svc, req).await.unwrap();
            expected += 1;
            assert_eq!(upstream.calls(), expected);
        }
    }
    assert_eq!(layer.stats().misses, 0);
}

/// Yields until `done` (no sleeping): bounded, so a broken test fails.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never became true");
}

#[tokio::test]
async fn concurrent_identical_calls_are_coalesced() {
    let (upstream, gate) = Upstream::echo().gated();
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, unary(b"c", &[])).await }
    });
    until(|| upstream.calls() == 1).await;
    let second = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, unary(b"c", &[])).await }
    });
    until(|| layer.stats().coalesced == 1).await;
    gate.add_permits(1);
    let (a, b) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_coalesced_caller_of_a_response_too_large_makes_its_own_call() {
    // The request fits in 16 bytes, the response (four times the
    // payload) does not.
    let (upstream, gate) = Upstream::new(|_, m| {
        let payload = m.slice(5..).repeat(4);
        Ok(ok_response(&message(&payload)))
    })
    .gated();
    let layer = GrpcCacheLayer::builder()
        .method(GET, Duration::from_secs(60))
        .max_message(16)
        .build()
        .unwrap();
    let svc = layer.layer(upstream.clone());
    let payload = b"four";
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, unary(payload, &[])).await }
    });
    until(|| upstream.calls() == 1).await;
    let second = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, unary(payload, &[])).await }
    });
    until(|| layer.stats().coalesced == 1).await;
    gate.add_permits(2);
    let (a, b) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert_eq!(a.data, message(&payload.repeat(4)));
    assert_eq!(a, b);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn one_store_whatever_the_body_types() {
    let upstream = Upstream::echo();
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    call(&svc, unary(b"b", &[])).await.unwrap();
    // The same message in another request body type, in two frames.
    let framed = message(b"b");
    let body = StreamBody::new(futures::stream::iter(vec![
        Ok::<_, Infallible>(Frame::data(framed.slice(..3))),
        Ok(Frame::data(framed.slice(3..))),
    ]));
    let res = call(&svc, request(body, &[])).await.unwrap();
    assert_eq!(res.data, framed);
    assert_eq!(upstream.calls(), 1, "a hit across body types");
    assert_eq!(layer.stats().hits, 1);
}

#[tokio::test]
async fn invalidating_a_method_drops_its_entries() {
    let upstream = Upstream::echo();
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    call(&svc, unary(b"i", &[])).await.unwrap();
    layer.invalidator().invalidate_tag(GET);
    call(&svc, unary(b"i", &[])).await.unwrap();
    assert_eq!(upstream.calls(), 2);
    layer.invalidator().invalidate_all();
    call(&svc, unary(b"i", &[])).await.unwrap();
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn stats_of_several_layers_add_up() {
    let (a, b) = (layer(), layer());
    let (sa, sb) = (a.layer(Upstream::echo()), b.layer(Upstream::echo()));
    call(&sa, unary(b"s", &[])).await.unwrap();
    call(&sa, unary(b"s", &[])).await.unwrap();
    call(&sb, unary(b"s", &[])).await.unwrap();
    let total: CacheStats = a.stats() + b.stats();
    assert_eq!((total.misses, total.hits, total.stored), (2, 1, 2));
    assert_eq!(
        [a.stats(), b.stats()].into_iter().sum::<CacheStats>(),
        total
    );
}

#[test]
fn configuration_errors_surface_at_build() {
    let ok = || GrpcCacheLayer::builder().method(GET, Duration::from_secs(1));
    assert!(ok().build().is_ok());
    assert!(GrpcCacheLayer::builder().build().is_err(), "no method");
    for path in ["GetUser", "/GetUser", "//GetUser", "/a.B/", "/a.B/C/D", ""] {
        let built = GrpcCacheLayer::builder()
            .method(path, Duration::from_secs(1))
            .build();
        assert!(built.is_err(), "{path:?}");
    }
    assert!(ok().max_message(0).build().is_err());
    assert!(ok().max_entries(0).build().is_err());
    assert!(ok().max_bytes(0).build().is_err());
    assert!(ok().key_metadata("bad header").build().is_err());
    let err = ok().method(GET, Duration::ZERO).build().unwrap_err();
    assert!(err.to_string().contains("ttl"), "{err}");
}

#[tokio::test]
async fn an_error_goes_only_to_its_caller_not_to_the_calls_coalesced_with_it() {
    // The upstream fails the call whose own metadata asks for too little
    // time; a caller coalesced with it must not get that error.
    let (upstream, gate) = Upstream::new(|headers, m| {
        if headers.contains_key("grpc-timeout") {
            let mut h = grpc_headers();
            h.insert("grpc-status", HeaderValue::from_static("4"));
            return Ok((StatusCode::OK, h, vec![]));
        }
        Ok(ok_response(m))
    })
    .gated();
    let layer = layer();
    let svc = layer.layer(upstream.clone());
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, unary(b"d", &[("grpc-timeout", "1n")])).await }
    });
    until(|| upstream.calls() == 1).await;
    let second = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, unary(b"d", &[])).await }
    });
    until(|| layer.stats().coalesced == 1).await;
    gate.add_permits(2);
    let (a, b) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert_eq!(a.headers["grpc-status"], "4", "the caller's own error");
    assert_eq!(b.trailers, Some(status_trailers("0")), "its own call");
    assert_eq!(upstream.calls(), 2);
    assert_eq!(layer.stats().stored, 1, "the good answer is stored");
}
