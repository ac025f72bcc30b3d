//! The caching service for HTTP.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tower::{Service, ServiceExt};

use super::body::{Buffered, CacheBody, buffer};
use super::cache_control::{RequestDirectives, ResponseDirectives};
use super::freshness::{self, HttpCachePolicy, NotStored, Usable};
use super::layer::HttpConfig;
use crate::cache::CacheStats;
use crate::cache::flight::{Flights, Join};
use crate::cache::invalidate::InvalidationLog;
use crate::cache::stats::{Kind, Stats};
use crate::cache::{Clock, Hashed, Instant, KeyHasher, PassThrough};

/// One stored response.
pub(crate) struct Stored {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
    cc: ResponseDirectives,
    lifetime: Duration,
    initial_age: Duration,
    stored_at: Instant,
    vary: VaryValues,
}

/// The request header values a stored response was selected by: one pair
/// per name in its `Vary`, `None` when the request did not have it.
type VaryValues = Vec<(HeaderName, Option<Vec<u8>>)>;

/// The `Vary` values of a response to a request with `request` headers
/// (empty for `Vary: *`, which is never stored).
fn vary_values(response: &HeaderMap, request: &HeaderMap) -> VaryValues {
    freshness::vary_names(response)
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            let value = freshness::normalized(request, &name);
            (name, value)
        })
        .collect()
}

/// The `Host` header when there is at most one valid line: `Some(None)`
/// without one, `None` for several lines or an invalid one.
fn single_host(headers: &HeaderMap) -> Option<Option<http::uri::Authority>> {
    let mut lines = headers.get_all(header::HOST).iter();
    let Some(first) = lines.next() else {
        return Some(None);
    };
    if lines.next().is_some() {
        return None;
    }
    let host = first.to_str().ok()?.parse::<http::uri::Authority>().ok()?;
    Some(Some(host))
}

/// `scheme://authority/path?query`, the authority lower-cased.
fn key_of(scheme: &str, authority: &http::uri::Authority, uri: &http::Uri) -> String {
    let authority = authority.as_str();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut key = String::with_capacity(scheme.len() + authority.len() + path.len() + 3);
    key.push_str(scheme);
    key.push_str("://");
    key.extend(authority.chars().map(|c| c.to_ascii_lowercase()));
    key.push_str(path);
    key
}

impl Stored {
    fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    fn matches(&self, req: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| freshness::normalized(req, name).as_deref() == value.as_deref())
    }

    fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(header::ETAG)
    }

    fn weight(&self) -> u32 {
        u32::try_from(self.body.len() + 512).unwrap_or(u32::MAX)
    }
}

/// The variants stored under one primary key (one per distinct set of
/// values of the headers named by `Vary`), newest first.
pub(crate) struct Variants(Vec<Arc<Stored>>);

const MAX_VARIANTS: usize = 16;

pub(crate) struct HttpShared {
    pub(crate) store: moka::sync::Cache<Hashed<String>, Arc<Variants>, PassThrough>,
    pub(crate) config: HttpConfig,
    pub(crate) rules: HttpCachePolicy,
    pub(crate) clock: Clock,
    pub(crate) hasher: KeyHasher,
    pub(crate) log: InvalidationLog<String>,
    pub(crate) flights: Arc<Flights<String, Arc<Stored>, ()>>,
    pub(crate) stats: Stats,
}

impl HttpShared {
    pub(crate) fn new(config: HttpConfig, clock: Clock) -> Self {
        let hasher = KeyHasher::new();
        let store = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_k: &Hashed<String>, v: &Arc<Variants>| {
                v.0.iter()
                    .map(|s| s.weight())
                    .fold(0u32, u32::saturating_add)
            })
            .build_with_hasher(PassThrough);
        let rules = config.rules.clone();
        Self {
            store,
            log: InvalidationLog::new(hasher.clone(), 100_000),
            hasher,
            config,
            rules,
            clock,
            flights: Arc::new(Flights::new()),
            stats: Stats::new(),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.store.run_pending_tasks();
        self.stats.snapshot(0, self.store.entry_count())
    }

    /// The primary key: the target URI (scheme, authority, path and
    /// query). Never from `X-Forwarded-*` or any other header but `Host`.
    ///
    /// `None` (neither stored nor served from the cache) when the request
    /// names no authority, or two: an absolute-form target whose authority
    /// is not byte for byte the `Host` header's, or more than one `Host`
    /// line. The origin may build its response from either, so no one key
    /// is right. Also `None` for an HTTP/1 absolute-form target without
    /// `Host`, and for an authority with upper-case letters.
    fn key(&self, parts: &http::request::Parts) -> Option<String> {
        let scheme = self.scheme(parts);
        let host = single_host(&parts.headers)?;
        let authority = match (parts.uri.authority(), host) {
            // HTTP/2 and HTTP/3 carry the authority in the target (the
            // `:authority` pseudo-header). An HTTP/1 absolute-form target
            // without `Host` names an authority that an origin reading
            // `Host` never sees: not cached.
            (Some(target), None) => {
                if !matches!(parts.version, Version::HTTP_2 | Version::HTTP_3) {
                    return None;
                }
                target.clone()
            }
            // Byte for byte: `A.TEST:80` and `a.test` are one origin to
            // RFC 9110, but the origin sees the `Host` as written.
            (Some(target), Some(host)) => {
                if target.as_str() != host.as_str() {
                    return None;
                }
                target.clone()
            }
            (None, Some(host)) => host,
            (None, None) => return None,
        };
        // Keys are lower-case (so invalidation finds every spelling); an
        // authority that is not is not cached, so what is stored under a
        // key is what an origin saw for exactly that spelling.
        if authority.as_str().bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        Some(key_of(scheme, &authority, &parts.uri))
    }

    fn scheme<'a>(&'a self, parts: &'a http::request::Parts) -> &'a str {
        parts
            .uri
            .scheme_str()
            .unwrap_or(self.config.default_scheme.as_str())
    }

    /// Every key an unsafe request may change: its key, or when the target
    /// and `Host` disagree, the key under each of them (invalidating too
    /// much is safe; too little is not).
    fn invalidation_keys(&self, parts: &http::request::Parts) -> Vec<String> {
        if let Some(key) = self.key(parts) {
            return vec![key];
        }
        let scheme = self.scheme(parts);
        let hosts = parts
            .headers
            .get_all(header::HOST)
            .iter()
            .filter_map(|v| v.to_str().ok()?.parse::<http::uri::Authority>().ok());
        let mut keys: Vec<String> = parts
            .uri
            .authority()
            .cloned()
            .into_iter()
            .chain(hosts)
            .map(|a| key_of(scheme, &a, &parts.uri))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn lookup(&self, key: &Hashed<String>, req: &HeaderMap) -> Option<Arc<Stored>> {
        let variants = self.store.get(key)?;
        variants.0.iter().find(|s| s.matches(req)).cloned()
    }

    /// Stores a response unless an invalidation of its key happened since
    /// `fill_seq` (insert, then check again: see `cache::invalidate`). It
    /// takes the place of the variant with its own `Vary` values and, after
    /// a 304 changed them, of the variant it was merged into (`replaces`).
    fn insert(
        &self,
        key: &Hashed<String>,
        stored: Arc<Stored>,
        fill_seq: u64,
        replaces: Option<&VaryValues>,
    ) -> bool {
        if !self.log.may_store(key, &[], fill_seq, None) {
            self.stats.incr(Kind::NotStored);
            return false;
        }
        let mut variants: Vec<Arc<Stored>> = self
            .store
            .get(key)
            .map(|v| {
                v.0.iter()
                    .filter(|s| s.vary != stored.vary && Some(&s.vary) != replaces)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        variants.insert(0, stored);
        variants.truncate(MAX_VARIANTS);
        self.store.insert(key.clone(), Arc::new(Variants(variants)));
        if !self.log.may_store(key, &[], fill_seq, None) {
            self.store.invalidate(key);
            self.stats.incr(Kind::NotStored);
            return false;
        }
        self.stats.incr(Kind::Stored);
        true
    }

    /// Drops every stored variant of a key (a response that replaced them
    /// may not be kept).
    fn forget(&self, key: &Hashed<String>) {
        self.store.invalidate(key);
    }

    pub(crate) fn invalidate(&self, key: &str) {
        let key = self.hasher.hashed(key.to_string());
        self.log.mark_key(key.clone(), 0);
        self.store.invalidate(&key);
        self.stats.incr(Kind::Invalidations);
    }

    fn request_directives(&self, headers: &HeaderMap) -> RequestDirectives {
        let mut d = RequestDirectives::from_headers(headers);
        let honour = &self.config.honour;
        if !honour.no_cache {
            d.no_cache = false;
        }
        if !honour.no_store {
            d.no_store = false;
        }
        if !honour.max_age {
            d.max_age = None;
        }
        if !honour.max_stale {
            d.max_stale = None;
        }
        if !honour.min_fresh {
            d.min_fresh = None;
        }
        if !honour.only_if_cached {
            d.only_if_cached = false;
        }
        d
    }
}

/// Builds the response for a stored entry: a fresh `Response` with the
/// stored status, headers (cloned, not re-parsed), body and trailers, and
/// a correct `Age`; a 304 when the client's own validators match.
fn respond<B: Body>(
    stored: &Stored,
    age: Duration,
    head: bool,
    req: &HeaderMap,
) -> Response<CacheBody<B>> {
    if client_validator_matches(stored, req) {
        let mut res = Response::new(CacheBody::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        // `Set-Cookie` only reaches here when the response carrying it is
        // this client's own (a revalidation), or sharing it is configured.
        for name in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::VARY,
            header::LAST_MODIFIED,
            header::SET_COOKIE,
        ] {
            for v in stored.headers.get_all(&name) {
                res.headers_mut().append(name.clone(), v.clone());
            }
        }
        res.headers_mut()
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
        return res;
    }
    let body = if head {
        CacheBody::empty()
    } else {
        CacheBody::full(stored.body.clone(), stored.trailers.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = stored.status;
    *res.version_mut() = stored.version;
    *res.headers_mut() = stored.headers.clone();
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(age.as_secs()));
    res
}

/// `If-None-Match` (weak comparison) takes precedence over
/// `If-Modified-Since` (RFC 9110 §13.2.2).
fn client_validator_matches(stored: &Stored, req: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Some(etag) = stored.etag().and_then(|e| e.to_str().ok()) else {
            return false;
        };
        let Ok(list) = inm.to_str() else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return list
            .split(',')
            .any(|t| t.trim() == "*" || weak(t) == weak(etag));
    }
    if let Some(ims) = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    {
        let (Ok(since), Some(modified)) = (
            httpdate::parse_http_date(ims),
            freshness::date(&stored.headers, header::LAST_MODIFIED),
        ) else {
            return false;
        };
        return modified <= since;
    }
    false
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// The headers worth storing: hop-by-hop fields (and those `Connection`
/// names) and `Age` removed.
fn storable_headers(mut headers: HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    for name in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(name.as_str());
    }
    headers.remove(header::AGE);
    headers
}

/// Caches the responses of an HTTP service as an RFC 9111 shared (or
/// private) cache; see the [module docs](super).
pub struct HttpCache<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<HttpShared>,
}

impl<S: Clone> Clone for HttpCache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for HttpCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCache")
            .field("inner", &self.inner)
            .field("entries", &self.shared.store.entry_count())
            .finish()
    }
}

impl<S> HttpCache<S> {
    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }

    /// Removes the stored responses for a target URI
    /// (`scheme://authority/path?query`).
    pub fn invalidate(&self, uri: &str) {
        self.shared.invalidate(uri);
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`HttpCache`]: ready at once for a hit, boxed otherwise.
    pub struct HttpResponseFuture<T> {
        ready: Option<T>,
        pending: Option<BoxFuture<T>>,
    }
}

impl<T> fmt::Debug for HttpResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponseFuture")
            .field("ready", &self.ready.is_some())
            .finish()
    }
}

impl<T> Future for HttpResponseFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        if let Some(v) = this.ready.take() {
            return Poll::Ready(v);
        }
        match this.pending {
            Some(fut) => fut.as_mut().poll(cx),
            None => panic!("HttpResponseFuture polled after completion"),
        }
    }
}

impl<T> HttpResponseFuture<T> {
    fn ready(v: T) -> Self {
        Self {
            ready: Some(v),
            pending: None,
        }
    }
    fn boxed(f: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            ready: None,
            pending: Some(Box::pin(f)),
        }
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpCache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = HttpResponseFuture<Result<Self::Response, S::Error>>;

    /// Always ready: hits never wait for the inner service; a request that
    /// goes upstream waits for its own clone's readiness.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        let svc = self.inner.clone();
        let (parts, body) = req.into_parts();
        if !is_safe(&parts.method) {
            return HttpResponseFuture::boxed(unsafe_method(
                shared,
                svc,
                Request::from_parts(parts, body),
            ));
        }
        let key = match (&parts.method, shared.key(&parts)) {
            (&Method::GET | &Method::HEAD, Some(key)) => key,
            _ => {
                shared.stats.incr(Kind::Bypasses);
                return HttpResponseFuture::boxed(pass(svc, Request::from_parts(parts, body)));
            }
        };
        let key = shared.hasher.hashed(key);
        let req_cc = shared.request_directives(&parts.headers);
        let head = parts.method == Method::HEAD;
        if let Some(stored) = shared.lookup(&key, &parts.headers) {
            let now = shared.clock.now();
            let age = stored.age(now);
            match freshness::usable(age, stored.lifetime, &stored.cc, &req_cc, &shared.rules) {
                Usable::Fresh => {
                    shared.stats.incr(Kind::Hits);
                    return HttpResponseFuture::ready(Ok(respond(
                        &stored,
                        age,
                        head,
                        &parts.headers,
                    )));
                }
                Usable::StaleWhileRevalidate => {
                    shared.stats.incr(Kind::StaleHits);
                    let res = respond(&stored, age, head, &parts.headers);
                    if shared.flights.len() < 10_000
                        && let Ok(rt) = tokio::runtime::Handle::try_current()
                    {
                        let req = Request::from_parts(parts, body);
                        rt.spawn(async move {
                            // One background revalidation per key.
                            if let Join::Lead(leader) =
                                shared.flights.join_fenced(&key, None, &shared.log)
                            {
                                shared.stats.incr(Kind::Refreshes);
                                let _ = fetch(&shared, svc, req, &key, Some(stored)).await;
                                drop(leader);
                            }
                        });
                    }
                    return HttpResponseFuture::ready(Ok(res));
                }
                Usable::Revalidate => {
                    shared.stats.incr(Kind::Misses);
                    return HttpResponseFuture::boxed(async move {
                        fetch(
                            &shared,
                            svc,
                            Request::from_parts(parts, body),
                            &key,
                            Some(stored),
                        )
                        .await
                        .map(|(res, _)| res)
                    });
                }
            }
        }
        shared.stats.incr(Kind::Misses);
        if req_cc.only_if_cached {
            let mut res = Response::new(CacheBody::empty());
            *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
            return HttpResponseFuture::ready(Ok(res));
        }
        HttpResponseFuture::boxed(miss(shared, svc, Request::from_parts(parts, body), key))
    }
}

async fn pass<S, ReqBody, ResBody>(
    svc: S,
    req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let res = svc.oneshot(req).await?;
    Ok(res.map(CacheBody::stream))
}

/// POST, PUT, PATCH, DELETE...: forwarded; on success, the target URI and
/// a same-origin `Location` / `Content-Location` are invalidated.
async fn unsafe_method<S, ReqBody, ResBody>(
    shared: Arc<HttpShared>,
    svc: S,
    req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let (parts, body) = req.into_parts();
    let targets = shared.invalidation_keys(&parts);
    let res = svc.oneshot(Request::from_parts(parts, body)).await?;
    if res.status().is_success() || res.status().is_redirection() {
        for target in &targets {
            shared.invalidate(target);
            let Ok(base) = target.parse::<http::Uri>() else {
                continue;
            };
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let Some(loc) = res.headers().get(&name).and_then(|v| v.to_str().ok()) else {
                    continue;
                };
                if let Some(key) = same_origin(&base, loc) {
                    shared.invalidate(&key);
                }
            }
        }
    }
    Ok(res.map(CacheBody::stream))
}

/// The cache key of `location` relative to `base`, if it has the same origin.
fn same_origin(base: &http::Uri, location: &str) -> Option<String> {
    let (scheme, authority) = (base.scheme_str()?, base.authority()?.as_str());
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    let uri: http::Uri = location.parse().ok()?;
    let same = uri.scheme_str() == Some(scheme)
        && uri
            .authority()
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(authority));
    same.then(|| {
        format!(
            "{scheme}://{}{}",
            authority.to_ascii_lowercase(),
            uri.path_and_query().map_or("/", |p| p.as_str())
        )
    })
}

/// A miss: one request per key goes upstream; concurrent ones wait and
/// take its stored response if it matches their `Vary` headers.
async fn miss<S, ReqBody, ResBody>(
    shared: Arc<HttpShared>,
    svc: S,
    req: Request<ReqBody>,
    key: Hashed<String>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let head = req.method() == Method::HEAD;
    let leader = loop {
        match shared.flights.join_fenced(&key, None, &shared.log) {
            Join::Lead(leader) => break Some(leader),
            Join::Alone => break None,
            Join::Wait(flight) => {
                shared.stats.incr(Kind::Coalesced);
                match flight.wait().await {
                    Some(Ok(stored)) if stored.matches(req.headers()) => {
                        let age = stored.age(shared.clock.now());
                        return Ok(respond(&stored, age, head, req.headers()));
                    }
                    // Not stored, or another variant: go upstream ourselves.
                    Some(_) => break None,
                    None => {} // the leader was cancelled: try to lead
                }
            }
        }
    };
    if head {
        // A HEAD response is never stored; only a stored GET answers HEAD.
        drop(leader);
        return pass(svc, req).await;
    }
    let (res, stored) = fetch(&shared, svc, req, &key, None).await?;
    if let Some(leader) = leader {
        leader.complete(&stored.ok_or(()));
    }
    Ok(res)
}

/// A GET without `Range`: the only request whose response may replace
/// (or evict) what is stored for everybody.
fn plain_get(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET && !headers.contains_key(header::RANGE)
}

/// Whether a response says by itself that it is per-user (`private`,
/// `no-store`, `Set-Cookie`, a `Cache-Control` that cannot be read, `Vary:
/// *`), or varies on other headers than the stored one: whoever asked.
fn per_user(
    shared: &HttpShared,
    stored: &Stored,
    status: StatusCode,
    headers: &HeaderMap,
    cc: &ResponseDirectives,
) -> bool {
    let alone = freshness::storable(
        &Method::GET,
        &HeaderMap::new(),
        &RequestDirectives::default(),
        status,
        headers,
        cc,
        &shared.rules,
    );
    let names = |vary: &VaryValues| {
        let mut names: Vec<HeaderName> = vary.iter().map(|(n, _)| n.clone()).collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names
    };
    let vary_changed = names(&vary_values(headers, &HeaderMap::new())) != names(&stored.vary);
    !matches!(alone, Ok(_) | Err(NotStored::NoFreshness)) || vary_changed
}

/// Goes upstream (conditionally when a stored response with validators is
/// given), then stores and answers per RFC 9111.
async fn fetch<S, ReqBody, ResBody>(
    shared: &HttpShared,
    svc: S,
    req: Request<ReqBody>,
    key: &Hashed<String>,
    stale: Option<Arc<Stored>>,
) -> Result<(Response<CacheBody<ResBody>>, Option<Arc<Stored>>), S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let (mut parts, body) = req.into_parts();
    let client_headers = parts.headers.clone();
    let req_cc = shared.request_directives(&client_headers);
    let method = parts.method.clone();
    let head = method == Method::HEAD;
    if let Some(stored) = &stale {
        // Revalidate: a conditional request, not a refetch.
        parts.headers.remove(header::IF_NONE_MATCH);
        parts.headers.remove(header::IF_MODIFIED_SINCE);
        if let Some(etag) = stored.etag() {
            parts.headers.insert(header::IF_NONE_MATCH, etag.clone());
        } else if let Some(lm) = stored.headers.get(header::LAST_MODIFIED) {
            parts.headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }
    let fill_seq = shared.log.current();
    let request_time = SystemTime::now();
    let result = svc.oneshot(Request::from_parts(parts, body)).await;
    let response_time = SystemTime::now();
    let now = shared.clock.now();
    let res = match result {
        Ok(res) => res,
        Err(e) => {
            if let Some(stored) = &stale {
                let staleness = stored.age(now).saturating_sub(stored.lifetime);
                if freshness::stale_if_error_allows(staleness, &stored.cc, &shared.rules) {
                    shared.stats.incr(Kind::StaleIfError);
                    return Ok((
                        respond(stored, stored.age(now), head, &client_headers),
                        None,
                    ));
                }
            }
            shared.stats.incr(Kind::InnerErrors);
            return Err(e);
        }
    };
    if let Some(stored) = &stale {
        if res.status() == StatusCode::NOT_MODIFIED {
            // Freshen the stored response with the 304's headers (§4.3.4).
            let mut headers = stored.headers.clone();
            // A 304 describes the stored body, never its length (RFC 9111 §3.2).
            let mut update = storable_headers(res.headers().clone());
            update.remove(header::CONTENT_LENGTH);
            for name in update.keys() {
                headers.remove(name);
            }
            for (name, value) in update.iter() {
                headers.append(name.clone(), value.clone());
            }
            // A 304 never narrows `Vary`: the stored body was selected by
            // the stored names, so the merged response varies on both
            // (read from the raw 304, even when `Connection` lists it).
            if res.headers().contains_key(header::VARY) {
                let names: Vec<HeaderValue> = stored
                    .headers
                    .get_all(header::VARY)
                    .iter()
                    .chain(res.headers().get_all(header::VARY))
                    .cloned()
                    .collect();
                headers.remove(header::VARY);
                for value in names {
                    headers.append(header::VARY, value);
                }
            }
            let cc = ResponseDirectives::from_headers(&headers);
            // The merged response is a new response to this client's
            // request: every storing and sharing rule applies to it again
            // (a 304 may add `Set-Cookie`, `private`, `no-store`, `Vary`),
            // and it is selected by this request's `Vary` values. First
            // what the response says, whoever asked; then this request.
            let check = |req_headers: &HeaderMap, req_cc: &RequestDirectives| {
                match freshness::storable(
                    &Method::GET,
                    req_headers,
                    req_cc,
                    stored.status,
                    &headers,
                    &cc,
                    &shared.rules,
                ) {
                    // Kept to be revalidated again, as before the 304.
                    Err(NotStored::NoFreshness) => Ok(Duration::ZERO),
                    other => other,
                }
            };
            // What the raw 304 says too: a `Set-Cookie`, `private` or
            // `no-store` that `Connection` lists is still per-user.
            let raw_cc = ResponseDirectives::from_headers(res.headers());
            let raw = match freshness::storable(
                &Method::GET,
                &HeaderMap::new(),
                &RequestDirectives::default(),
                stored.status,
                res.headers(),
                &raw_cc,
                &shared.rules,
            ) {
                Err(NotStored::NoFreshness) => Ok(Duration::ZERO),
                other => other,
            };
            let shareable = raw.and(check(&HeaderMap::new(), &RequestDirectives::default()));
            let decision = shareable.and_then(|_| check(&client_headers, &req_cc));
            let updated = Arc::new(Stored {
                status: stored.status,
                version: stored.version,
                vary: vary_values(&headers, &client_headers),
                headers,
                body: stored.body.clone(),
                trailers: stored.trailers.clone(),
                cc,
                lifetime: decision.unwrap_or(Duration::ZERO),
                initial_age: freshness::initial_age(res.headers(), request_time, response_time),
                stored_at: now,
            });
            shared.stats.incr(Kind::Refreshes);
            let kept = match (shareable, decision) {
                (_, Ok(_)) => {
                    shared.insert(key, Arc::clone(&updated), fill_seq, Some(&stored.vary))
                }
                // The origin now says the response is per-user (or cannot
                // be read): only this client gets it, and what was stored
                // goes too.
                (Err(_), _) => {
                    shared.stats.incr(Kind::NotStored);
                    if plain_get(&method, &client_headers) {
                        shared.forget(key);
                    }
                    false
                }
                // This client's `no-store` or `Authorization`: its 304 is
                // not stored, and the stored response it validated stays
                // as it was (a client cannot evict it for everybody).
                (Ok(_), Err(_)) => {
                    shared.stats.incr(Kind::NotStored);
                    false
                }
            };
            let age = updated.age(now);
            let res = respond(&updated, age, head, &client_headers);
            return Ok((res, kept.then_some(updated)));
        }
        if res.status().is_server_error() {
            let staleness = stored.age(now).saturating_sub(stored.lifetime);
            if freshness::stale_if_error_allows(staleness, &stored.cc, &shared.rules) {
                shared.stats.incr(Kind::StaleIfError);
                return Ok((
                    respond(stored, stored.age(now), head, &client_headers),
                    None,
                ));
            }
        }
    }
    let cc = ResponseDirectives::from_headers(res.headers());
    let decision = freshness::storable(
        &method,
        &client_headers,
        &req_cc,
        res.status(),
        res.headers(),
        &cc,
        &shared.rules,
    );
    let Ok(lifetime) = decision else {
        shared.stats.incr(Kind::NotStored);
        // The new response replaces the stored one and may not be kept,
        // but only the response itself says so: a request's HEAD,
        // `no-store`, `Authorization` or `Range` cannot evict the stored
        // response for everybody.
        if let Some(stored) = &stale
            && res.status().is_success()
            && plain_get(&method, &client_headers)
            && per_user(shared, stored, res.status(), res.headers(), &cc)
        {
            shared.forget(key);
        }
        return Ok((res.map(CacheBody::stream), None));
    };
    let declared = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > shared.config.max_body) {
        shared.stats.incr(Kind::NotStored);
        return Ok((res.map(CacheBody::stream), None));
    }
    let (res_parts, res_body) = res.into_parts();
    let (data, trailers) = match buffer(res_body, shared.config.max_body).await {
        Buffered::Complete { data, trailers } => (data, trailers),
        Buffered::Passthrough(body) => {
            shared.stats.incr(Kind::NotStored);
            return Ok((Response::from_parts(res_parts, body), None));
        }
    };
    let rules = &shared.rules;
    let cookie_trailer = trailers
        .as_ref()
        .is_some_and(|t| t.contains_key(header::SET_COOKIE));
    if cookie_trailer && rules.shared && !rules.share_set_cookie {
        // A `Set-Cookie` is per user wherever it is written.
        shared.stats.incr(Kind::NotStored);
        if stale.is_some() && res_parts.status.is_success() && plain_get(&method, &client_headers) {
            shared.forget(key);
        }
        let body = CacheBody::full(data, trailers);
        return Ok((Response::from_parts(res_parts, body), None));
    }
    let vary = vary_values(&res_parts.headers, &client_headers);
    let stored = Arc::new(Stored {
        status: res_parts.status,
        version: res_parts.version,
        headers: storable_headers(res_parts.headers.clone()),
        body: data,
        trailers,
        cc,
        lifetime,
        initial_age: freshness::initial_age(&res_parts.headers, request_time, response_time),
        stored_at: now,
        vary,
    });
    let kept = shared.insert(key, Arc::clone(&stored), fill_seq, None);
    let mut res = Response::from_parts(
        res_parts,
        CacheBody::full(stored.body.clone(), stored.trailers.clone()),
    );
    res.headers_mut().remove(header::AGE);
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(stored.initial_age.as_secs()));
    Ok((res, kept.then_some(stored)))
}
