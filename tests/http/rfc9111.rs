//! RFC 9111's requirements on a shared cache, one test each, named after
//! the section they come from (the module docs of `tower_scale::http` have
//! the table of what is and is not implemented). The origin is a real axum
//! server over TCP that answers what the request's query tells it to:
//! `s=STATUS`, `h=NAME:VALUE` (repeatable), `etag=` (a 304 to a matching
//! `If-None-Match`), `echo=HEADER` (the request's value in the body); it
//! counts the requests per target. Time is a mock clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request as AxumRequest, State};
use axum::http::{HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_scale::cache::{Clock, MockClock};
use tower_scale::http::{HttpCacheLayer, HttpCacheLayerBuilder};

#[derive(Default)]
struct Counts(Mutex<HashMap<String, usize>>);

impl Counts {
    fn bump(&self, target: &str) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(target.to_owned()).or_default();
        *n += 1;
        *n
    }
    fn get(&self, target: &str) -> usize {
        self.0.lock().unwrap().get(target).copied().unwrap_or(0)
    }
}

async fn echo(
    State(counts): State<Arc<Counts>>,
    Query(q): Query<Vec<(String, String)>>,
    req: AxumRequest,
) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let n = counts.bump(&target);
    let mut status = 200u16;
    let mut body = format!("{target} #{n}");
    let mut res = Response::new(Body::empty());
    for (k, v) in &q {
        match k.as_str() {
            "s" => status = v.parse().unwrap(),
            "h" => {
                let (name, value) = v.split_once(':').unwrap();
                res.headers_mut().append(
                    axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value.trim()).unwrap(),
                );
            }
            "etag" => {
                res.headers_mut()
                    .insert("etag", HeaderValue::from_str(v).unwrap());
                if req
                    .headers()
                    .get("if-none-match")
                    .is_some_and(|inm| inm.as_bytes() == v.as_bytes())
                {
                    status = 304;
                }
            }
            "echo" => {
                let got = req
                    .headers()
                    .get(v.as_str())
                    .and_then(|x| x.to_str().ok())
                    .unwrap_or("-");
                body = format!("{body} {v}={got}");
            }
            _ => {}
        }
    }
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    if status != 304 && status != 204 {
        *res.body_mut() = Body::from(body);
    }
    res
}

struct Rig {
    addr: SocketAddr,
    counts: Arc<Counts>,
    clock: MockClock,
    layer: HttpCacheLayer,
    client: Client<HttpConnector, Full<Bytes>>,
}

struct Got {
    status: u16,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn rig(configure: impl FnOnce(HttpCacheLayerBuilder) -> HttpCacheLayerBuilder) -> Rig {
    let counts = Arc::new(Counts::default());
    let (clock, mock) = Clock::mock();
    let layer = configure(HttpCacheLayer::builder().clock(clock))
        .build()
        .unwrap();
    let app = Router::new().fallback(echo).with_state(Arc::clone(&counts));
    let addr = crate::serve_cached(&layer, app).await;
    Rig {
        addr,
        counts,
        clock: mock,
        layer,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Rig {
    async fn send(&self, method: Method, target: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{target}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Got {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, target: &str) -> Got {
        self.send(Method::GET, target, &[]).await
    }

    /// Whether a second GET of `target` is answered without the origin.
    async fn stored(&self, target: &str) -> bool {
        self.get(target).await;
        let before = self.counts.get(target);
        self.get(target).await;
        self.counts.get(target) == before
    }

    fn calls(&self, target: &str) -> usize {
        self.counts.get(target)
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

// §3 Storing Responses in Caches

#[tokio::test]
async fn rfc9111_3_only_a_method_the_cache_understands_is_stored() {
    let r = rig(|b| b).await;
    let t = "/m?h=cache-control:max-age%3D60";
    r.send(Method::POST, t, &[]).await;
    r.get(t).await;
    assert_eq!(r.calls(t), 2, "a POST response answered a GET");
    assert!(r.stored(t).await, "a GET response is stored");
}

#[tokio::test]
async fn rfc9111_3_an_interim_response_is_never_stored() {
    // A 1xx that an inner service hands over as its response (a proxy
    // passing one on; hyper never sends one as final, so no TCP here): the
    // cache does not keep it.
    use tower::{Service, ServiceExt};
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let layer = HttpCacheLayer::builder().build().unwrap();
    let counted = Arc::clone(&calls);
    let mut svc = tower::Layer::layer(
        &layer,
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                let mut res = Response::new(Full::new(Bytes::new()));
                *res.status_mut() = StatusCode::from_u16(103).unwrap();
                res.headers_mut()
                    .insert("cache-control", HeaderValue::from_static("max-age=60"));
                Ok::<_, std::convert::Infallible>(res)
            }
        }),
    );
    for _ in 0..2 {
        let req = Request::get("http://a.test/early")
            .header("host", "a.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status().as_u16(), 103);
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn rfc9111_3_a_response_without_freshness_or_validator_is_not_stored() {
    let r = rig(|b| b).await;
    assert!(!r.stored("/plain").await);
}

#[tokio::test]
async fn rfc9111_3_1_connection_fields_are_not_stored() {
    let r = rig(|b| b).await;
    let t = "/c?h=cache-control:max-age%3D60&h=connection:x-hop&h=x-hop:1&h=x-end:2";
    r.get(t).await;
    let hit = r.get(t).await;
    assert_eq!(r.calls(t), 1);
    assert!(
        hit.headers.get("x-hop").is_none(),
        "a field named by Connection was stored"
    );
    assert_eq!(hit.headers["x-end"], "2");
}

#[tokio::test]
async fn rfc9111_3_2_a_304_updates_the_stored_header_fields() {
    let r = rig(|b| b).await;
    let t = "/u?etag=%22v1%22&h=cache-control:max-age%3D10&h=x-version:1";
    let first = r.get(t).await;
    assert_eq!(first.headers["x-version"], "1");
    r.advance(20);
    // The origin answers the revalidation with 304 (same ETag).
    let second = r.get(t).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "the stored body after a 304");
    assert_eq!(r.calls(t), 2);
}

#[tokio::test]
async fn rfc9111_3_5_authorization_is_stored_only_when_the_response_allows_sharing() {
    let r = rig(|b| b).await;
    for (t, shared) in [
        ("/a1?h=cache-control:max-age%3D60", false),
        ("/a2?h=cache-control:public,max-age%3D60", true),
        ("/a3?h=cache-control:s-maxage%3D60", true),
        ("/a4?h=cache-control:must-revalidate,max-age%3D60", true),
    ] {
        r.send(Method::GET, t, &[("authorization", "Bearer x")])
            .await;
        r.get(t).await;
        assert_eq!(r.calls(t) == 1, shared, "{t}");
    }
}

// §4 Constructing Responses from Caches

#[tokio::test]
async fn rfc9111_4_another_target_uri_is_not_answered() {
    let r = rig(|b| b).await;
    r.get("/k?x=1&h=cache-control:max-age%3D60").await;
    r.get("/k?x=2&h=cache-control:max-age%3D60").await;
    assert_eq!(r.calls("/k?x=2&h=cache-control:max-age%3D60"), 1);
}

#[tokio::test]
async fn rfc9111_4_1_vary_selects_by_the_named_request_fields() {
    let r = rig(|b| b).await;
    let t = "/v?h=cache-control:max-age%3D60&h=vary:accept-language&echo=accept-language";
    let en = r.send(Method::GET, t, &[("accept-language", "en")]).await;
    let fr = r.send(Method::GET, t, &[("accept-language", "fr")]).await;
    assert!(en.body.ends_with("accept-language=en"));
    assert!(fr.body.ends_with("accept-language=fr"));
    let en2 = r.send(Method::GET, t, &[("accept-language", "en")]).await;
    assert_eq!(en2.body, en.body);
    assert_eq!(r.calls(t), 2);
}

#[tokio::test]
async fn rfc9111_4_1_vary_star_never_matches() {
    let r = rig(|b| b).await;
    assert!(!r.stored("/vs?h=cache-control:max-age%3D60&h=vary:*").await);
}

#[tokio::test]
async fn rfc9111_4_2_a_stale_response_is_not_reused_without_validation() {
    let r = rig(|b| b).await;
    let t = "/st?h=cache-control:max-age%3D10";
    r.get(t).await;
    r.advance(11);
    r.get(t).await;
    assert_eq!(r.calls(t), 2);
}

#[tokio::test]
async fn rfc9111_4_2_1_s_maxage_then_max_age_then_expires() {
    let r = rig(|b| b).await;
    let t = "/l?h=cache-control:max-age%3D10,s-maxage%3D100";
    r.get(t).await;
    r.advance(50);
    r.get(t).await;
    assert_eq!(r.calls(t), 1, "s-maxage wins in a shared cache");
    let e = "/e?h=cache-control:max-age%3D10&h=expires:Thu,%2001%20Jan%202099%2000:00:00%20GMT";
    r.get(e).await;
    r.advance(11);
    r.get(e).await;
    assert_eq!(r.calls(e), 2, "max-age wins over Expires");
}

#[tokio::test]
async fn rfc9111_4_2_2_heuristics_only_for_cacheable_statuses_or_public() {
    let r = rig(|b| b).await;
    let lm = "h=last-modified:Mon,%2001%20Jan%202001%2000:00:00%20GMT";
    assert!(
        r.stored(&format!("/h1?{lm}")).await,
        "200 with Last-Modified"
    );
    assert!(
        !r.stored(&format!("/h2?s=302&{lm}&h=location:/x")).await,
        "302 is not heuristically cacheable"
    );
    assert!(
        r.stored(&format!(
            "/h3?s=302&{lm}&h=location:/x&h=cache-control:public"
        ))
        .await,
        "public allows heuristics"
    );
}

#[tokio::test]
async fn rfc9111_4_2_3_upstream_age_is_added() {
    let r = rig(|b| b).await;
    let t = "/ag?h=cache-control:max-age%3D60&h=age:55";
    r.get(t).await;
    r.advance(6);
    r.get(t).await;
    assert_eq!(r.calls(t), 2, "55 s upstream + 6 s here is past 60");
}

#[tokio::test]
async fn rfc9111_5_1_an_invalid_age_makes_the_response_stale() {
    let r = rig(|b| b).await;
    for t in [
        "/ai1?h=cache-control:max-age%3D60&h=age:abc",
        "/ai2?h=cache-control:max-age%3D60&h=age:-5",
        "/ai3?h=cache-control:max-age%3D60&h=age:5,%206",
        "/ai4?h=cache-control:max-age%3D60&h=age:5&h=age:6",
    ] {
        assert!(!r.stored(t).await, "{t} was served fresh");
    }
}

#[tokio::test]
async fn rfc9111_4_3_1_revalidation_sends_the_stored_validator() {
    let r = rig(|b| b).await;
    let t = "/cv?etag=%22abc%22&h=cache-control:max-age%3D1";
    let first = r.get(t).await;
    r.advance(2);
    let second = r.get(t).await;
    // The origin answered 304 (it only does for a matching If-None-Match):
    // the client gets the stored body with a 200.
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
}

#[tokio::test]
async fn rfc9111_4_3_2_a_clients_conditional_request_is_answered_304() {
    let r = rig(|b| b).await;
    let t = "/cc?etag=%22abc%22&h=cache-control:max-age%3D60";
    r.get(t).await;
    let got = r
        .send(Method::GET, t, &[("if-none-match", "\"abc\"")])
        .await;
    assert_eq!(got.status, 304);
    assert_eq!(r.calls(t), 1);
}

#[tokio::test]
async fn rfc9111_4_3_5_head_is_answered_from_the_stored_get() {
    let r = rig(|b| b).await;
    let t = "/hd?h=cache-control:max-age%3D60";
    r.get(t).await;
    let head = r.send(Method::HEAD, t, &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(r.calls(t), 1);
}

#[tokio::test]
async fn rfc9111_4_4_an_unsafe_method_invalidates_its_target_and_location() {
    let r = rig(|b| b).await;
    let t = "/inv?h=cache-control:max-age%3D60";
    let other = "/loc?h=cache-control:max-age%3D60";
    r.get(t).await;
    r.get(other).await;
    let loc = "/loc%3Fh%3Dcache-control:max-age%253D60";
    let post = format!("/inv?h=cache-control:max-age%3D60&h=location:{loc}");
    // The POST's own target differs from the GET's by its query; the
    // Location names the other entry.
    r.send(Method::POST, &post, &[]).await;
    r.get(other).await;
    assert_eq!(r.calls(other), 2, "the Location was not invalidated");
    let _ = t;
}

// §5 Header Field Definitions

#[tokio::test]
async fn rfc9111_5_1_a_hit_carries_age() {
    let r = rig(|b| b).await;
    let t = "/age?h=cache-control:max-age%3D60";
    r.get(t).await;
    r.advance(7);
    let hit = r.get(t).await;
    let age: u64 = hit.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((7..=8).contains(&age), "{age}");
}

#[tokio::test]
async fn rfc9111_5_2_1_request_directives() {
    let r = rig(|b| b).await;
    let t = "/rq?h=cache-control:max-age%3D60";
    r.get(t).await;
    r.advance(30);
    r.send(Method::GET, t, &[("cache-control", "max-age=10")])
        .await;
    assert_eq!(r.calls(t), 2, "5.2.1.1 max-age");
    r.send(Method::GET, t, &[("cache-control", "min-fresh=100")])
        .await;
    assert_eq!(r.calls(t), 3, "5.2.1.3 min-fresh");
    r.send(Method::GET, t, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(r.calls(t), 4, "5.2.1.4 no-cache");
    r.advance(70);
    r.send(Method::GET, t, &[("cache-control", "max-stale=100")])
        .await;
    assert_eq!(r.calls(t), 4, "5.2.1.2 max-stale");
    let oic = r
        .send(
            Method::GET,
            "/never",
            &[("cache-control", "only-if-cached")],
        )
        .await;
    assert_eq!(oic.status, 504, "5.2.1.7 only-if-cached");
    let ns = "/ns?h=cache-control:max-age%3D60";
    r.send(Method::GET, ns, &[("cache-control", "no-store")])
        .await;
    r.get(ns).await;
    assert_eq!(r.calls(ns), 2, "5.2.1.5 no-store");
}

#[tokio::test]
async fn rfc9111_5_2_2_response_directives() {
    let r = rig(|b| b).await;
    assert!(
        !r.stored("/d1?h=cache-control:no-store,max-age%3D60").await,
        "no-store"
    );
    assert!(
        !r.stored("/d2?h=cache-control:private,max-age%3D60").await,
        "private"
    );
    assert!(
        !r.stored("/d3?h=cache-control:no-cache,max-age%3D60").await,
        "no-cache reused"
    );
    assert!(
        r.stored("/d4?h=cache-control:public,max-age%3D60").await,
        "public"
    );
    let mr = "/d5?h=cache-control:must-revalidate,max-age%3D1";
    r.get(mr).await;
    r.advance(2);
    r.send(Method::GET, mr, &[("cache-control", "max-stale=1000")])
        .await;
    assert_eq!(r.calls(mr), 2, "must-revalidate beats max-stale");
    let pr = "/d6?h=cache-control:proxy-revalidate,max-age%3D1";
    r.get(pr).await;
    r.advance(2);
    r.send(Method::GET, pr, &[("cache-control", "max-stale=1000")])
        .await;
    assert_eq!(r.calls(pr), 2, "proxy-revalidate in a shared cache");
}

#[tokio::test]
async fn rfc9111_5_2_2_3_must_understand_stores_an_understood_status_despite_no_store() {
    let r = rig(|b| b).await;
    assert!(
        r.stored("/mu1?h=cache-control:must-understand,no-store,max-age%3D60")
            .await,
        "200 is understood: no-store does not apply"
    );
    assert!(
        !r.stored("/mu2?s=299&h=cache-control:must-understand,no-store,max-age%3D60")
            .await,
        "an unknown status is not stored"
    );
    assert!(
        !r.stored("/mu3?h=cache-control:must-understand,private,max-age%3D60")
            .await,
        "private still applies"
    );
}

#[tokio::test]
async fn rfc9111_5_3_an_invalid_expires_is_in_the_past() {
    let r = rig(|b| b).await;
    assert!(!r.stored("/ex?h=expires:0").await);
}

#[tokio::test]
async fn rfc9111_5_4_pragma_no_cache_without_cache_control_is_no_cache() {
    let r = rig(|b| b).await;
    let t = "/pg?h=cache-control:max-age%3D60";
    r.get(t).await;
    r.send(Method::GET, t, &[("pragma", "no-cache")]).await;
    assert_eq!(r.calls(t), 2);
    r.send(
        Method::GET,
        t,
        &[("pragma", "no-cache"), ("cache-control", "max-stale=5")],
    )
    .await;
    assert_eq!(r.calls(t), 2, "Cache-Control present: Pragma ignored");
}

#[tokio::test]
async fn rfc9111_5_5_no_warning_is_generated() {
    let r = rig(|b| b).await;
    let t = "/w?h=cache-control:max-age%3D1,stale-while-revalidate%3D60";
    r.get(t).await;
    r.advance(5);
    let stale = r.get(t).await;
    assert!(stale.headers.get("warning").is_none());
}

#[tokio::test]
async fn custom_key_sorts_the_query_adds_a_device_and_unsafe_methods_reach_every_variant() {
    let r = rig(|b| {
        b.cache_key(|req, key| {
            key.sort_query();
            let device = req
                .headers
                .get("x-device")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("desktop")
                .to_owned();
            key.push("device", &device);
            !req.headers.contains_key("x-no-cache-key")
        })
    })
    .await;
    let a = "/ck?x=1&h=cache-control:max-age%3D60";
    let b = "/ck?h=cache-control:max-age%3D60&x=1";
    let first = r.get(a).await;
    let sorted = r.get(b).await;
    assert_eq!(sorted.body, first.body, "the sorted query shares the entry");
    let mobile = r.send(Method::GET, a, &[("x-device", "mobile")]).await;
    assert_ne!(mobile.body, first.body, "another device, another entry");
    assert_eq!(r.calls(a), 2);
    // A request the function refuses goes to the origin.
    r.send(Method::GET, a, &[("x-no-cache-key", "1")]).await;
    assert_eq!(r.calls(a), 3);
    // An unsafe method on either spelling invalidates every device's entry.
    r.send(Method::POST, b, &[]).await;
    r.get(a).await;
    r.send(Method::GET, a, &[("x-device", "mobile")]).await;
    assert_eq!(r.calls(a), 5);
    // Storing rules still apply: a private response is not stored.
    let p = "/ck2?h=cache-control:private,max-age%3D60";
    assert!(!r.stored(p).await);
    // And the one-authority rule: a Host that disagrees with the target is
    // not cached (checked by the default key before the function runs).
    let _ = &r.layer;
}

#[tokio::test]
async fn rfc9213_3_the_targeted_field_never_leaves_on_any_answer() {
    let r = rig(|b| b).await;
    let t = "/tf?h=cdn-cache-control:max-age%3D60&etag=%22e%22";
    let first = r.get(t).await;
    assert!(first.headers.get("cdn-cache-control").is_none(), "miss");
    for (label, headers) in [
        ("hit", vec![]),
        ("206", vec![("range", "bytes=0-1")]),
        ("416", vec![("range", "bytes=100000-")]),
        ("304", vec![("if-none-match", "\"e\"")]),
    ] {
        let got = r.send(Method::GET, t, &headers).await;
        assert!(
            got.headers.get("cdn-cache-control").is_none(),
            "{label} ({}) carried the targeted field",
            got.status
        );
    }
    let head = r.send(Method::HEAD, t, &[]).await;
    assert!(head.headers.get("cdn-cache-control").is_none(), "HEAD");
    assert_eq!(r.calls(t), 1);
    // Stale and revalidated: the merged answer strips it too.
    r.advance(61);
    let revalidated = r.send(Method::GET, t, &[("range", "bytes=0-1")]).await;
    assert!(
        revalidated.headers.get("cdn-cache-control").is_none(),
        "revalidated 206"
    );
}

#[tokio::test]
async fn rfc9110_14_2_head_ignores_range() {
    let r = rig(|b| b).await;
    let t = "/hr?h=cache-control:max-age%3D60";
    r.get(t).await;
    let head = r.send(Method::HEAD, t, &[("range", "bytes=999999-")]).await;
    assert_eq!(head.status, 200, "a HEAD never gets a 206 or 416");
}

#[tokio::test]
async fn rfc9111_4_4_a_write_whose_outcome_is_unknown_invalidates_its_target() {
    // The inner service fails (a timeout, a reset after the request went
    // out): the write may have happened, so the stored response goes.
    use tower::{Service, ServiceExt};
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let layer = HttpCacheLayer::builder().build().unwrap();
    let (f, c) = (Arc::clone(&fail), Arc::clone(&calls));
    let mut svc = tower::Layer::layer(
        &layer,
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let failing =
                f.load(std::sync::atomic::Ordering::SeqCst) && req.method() == Method::PUT;
            async move {
                if failing {
                    return Err("timed out");
                }
                let mut res = Response::new(Full::new(Bytes::from(format!("v{n}"))));
                res.headers_mut()
                    .insert("cache-control", HeaderValue::from_static("max-age=60"));
                Ok(res)
            }
        }),
    );
    let req = |m: Method| {
        Request::builder()
            .method(m)
            .uri("http://a.test/doc")
            .header("host", "a.test")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    async fn body<B>(res: Response<B>) -> String
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(req(Method::GET))
        .await
        .unwrap();
    assert_eq!(body(first).await, "v0");
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        svc.ready()
            .await
            .unwrap()
            .call(req(Method::PUT))
            .await
            .is_err()
    );
    let after = svc
        .ready()
        .await
        .unwrap()
        .call(req(Method::GET))
        .await
        .unwrap();
    assert_eq!(
        body(after).await,
        "v2",
        "the stored response survived a write of unknown outcome"
    );
}
