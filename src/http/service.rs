//! The caching service for HTTP: the hit path, and the hand-off to
//! [`upstream`](super::upstream) for everything else.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tokio_util::sync::DropGuard;
use tower::Service;

use super::body::CacheBody;
use super::config::{HttpConfig, covers};
use super::freshness::{self, Usable};
use super::future::HttpResponseFuture;
use super::range::{self, Requested};
use super::state::HttpShared;
use super::status::{self, Fwd};
use super::stored::respond_hit;
use super::unsafe_method::unsafe_method;
use super::upstream::{Stale, miss, pass, upstream};
use crate::cache::Invalidator;
use crate::cache::engine::stats::Kind;
use crate::cache::{CacheStats, Store};

/// Caches the responses of an HTTP service as an RFC 9111 shared (or
/// private) cache; see the [module docs](super).
pub struct HttpCache<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<HttpShared>,
    /// Stops the shared tier's tasks when the last handle goes.
    pub(crate) life: Arc<DropGuard>,
}

impl<S: Clone> Clone for HttpCache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            life: Arc::clone(&self.life),
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
    /// The counters so far (the core cache's [`CacheStats`], evictions
    /// included).
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }

    /// Removes the stored responses for a target URI
    /// (`scheme://authority/path?query`), here and, with a shared tier, on
    /// every instance. The same as `invalidator().invalidate_key(uri)`,
    /// and with a [custom key](super::HttpCacheLayerBuilder::cache_key)
    /// also every entry whose key adds parts to `uri`.
    pub fn invalidate(&self, uri: &str) {
        self.shared.invalidate_url(uri);
    }

    /// A handle to invalidate stored responses by key (the cache key
    /// string, `scheme://authority/path?query`), by tag (see
    /// [`HttpCacheLayerBuilder::tag_header`](super::HttpCacheLayerBuilder::tag_header)),
    /// or all; the same type the core cache gives, with the same
    /// guarantees.
    pub fn invalidator(&self) -> Invalidator<String> {
        Invalidator::new(self.shared.clone())
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

/// A response that went forward, on its way out: the targeted fields
/// stripped (unless they pass) and this cache's `Cache-Status` entry added.
/// (A hit's header map is built without them: see `HitHead`.)
fn leave<B>(config: &HttpConfig, mut res: Response<B>, why: Fwd) -> Response<B> {
    config.strip_targeted(res.headers_mut());
    status::finish(config, res, why)
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
        // The handles a request that goes upstream needs are cloned on
        // that path only: a hit takes no reference count.
        let sh = &*self.shared;
        let (parts, body) = req.into_parts();
        if !is_safe(&parts.method) {
            let (shared, svc) = (Arc::clone(&self.shared), self.inner.clone());
            return HttpResponseFuture::boxed(async move {
                let res = unsafe_method(Arc::clone(&shared), svc, Request::from_parts(parts, body));
                let res = res.await?;
                Ok(leave(&shared.config, res, Fwd::Bypass))
            });
        }
        // Several ranges are the origin's to answer (and never stored).
        // Only a GET has ranges (RFC 9110 §14.2: ignored for other
        // methods, HEAD included).
        let requested = (parts.method == Method::GET)
            .then(|| range::requested(&parts.headers))
            .flatten();
        let (range, multi) = match requested {
            Some(Requested::Single(spec)) => (Some(spec), false),
            Some(Requested::Multi) => (None, true),
            None => (None, false),
        };
        let key = match (&parts.method, sh.key(&parts)) {
            (&Method::GET | &Method::HEAD, Some(key)) if !multi => key,
            _ => {
                sh.stats.incr(Kind::Bypasses);
                let (shared, svc) = (Arc::clone(&self.shared), self.inner.clone());
                return HttpResponseFuture::boxed(async move {
                    let res = pass(&shared, svc, Request::from_parts(parts, body)).await?;
                    Ok(leave(&shared.config, res, Fwd::Bypass))
                });
            }
        };
        let key = sh.hashed(key);
        let req_cc = sh.request_directives(&parts.headers);
        let head = parts.method == Method::HEAD;
        let now = sh.clock.now();
        let token = sh.request_version(&parts.headers);
        // Read before the lookup: a revalidation's 304 keeps the body found
        // now, so it is stored only if nothing touching it was invalidated
        // since (one atomic load).
        let read_seq = sh.log.current();
        // A variant stamped below the request's token is not answered
        // from: the request is a miss, and its response replaces it.
        let found = sh.entry(&key, now).and_then(|entry| {
            let stored = entry.response()?.find(&parts.headers)?.clone();
            covers(stored.stamp, token).then_some((entry, stored))
        });
        if let Some((entry, stored)) = found {
            let age = stored.age(now);
            match freshness::usable(age, stored.lifetime, &stored.cc, &req_cc, &sh.rules) {
                Usable::Fresh => {
                    sh.stats.incr(Kind::Hits);
                    let res = respond_hit(&sh.config, &stored, age, head, &parts.headers, range);
                    return HttpResponseFuture::ready(Ok(res));
                }
                Usable::StaleWhileRevalidate => {
                    sh.stats.incr(Kind::StaleHits);
                    let res = respond_hit(&sh.config, &stored, age, head, &parts.headers, range);
                    // One background revalidation per entry at a time (the
                    // entry's flag, no lock; the task's flight join keeps
                    // it to one per key even across entries).
                    if entry.claim_refresh()
                        && let Ok(rt) = tokio::runtime::Handle::try_current()
                    {
                        // A refresh for everybody: the whole response, not
                        // this client's range of it.
                        let mut parts = parts;
                        parts.headers.remove(http::header::RANGE);
                        parts.headers.remove(http::header::IF_RANGE);
                        let req = Request::from_parts(parts, body);
                        let (shared, svc) = (Arc::clone(&self.shared), self.inner.clone());
                        let stale = Stale { stored, read_seq };
                        rt.spawn(async move {
                            if let crate::cache::engine::flight::Join::Lead(leader) =
                                shared.flights.join_fenced(&key, None, &shared.log)
                            {
                                shared.stats.incr(Kind::Refreshes);
                                let _ = upstream(&shared, svc, req, &key, Some(stale), false).await;
                                drop(leader);
                            }
                            // A later stale hit may try again.
                            entry
                                .refreshing
                                .store(false, std::sync::atomic::Ordering::Release);
                        });
                    }
                    return HttpResponseFuture::ready(Ok(res));
                }
                Usable::Revalidate => {
                    sh.stats.incr(Kind::Misses);
                    let why = status::revalidation(&stored, age, &sh.rules);
                    let (shared, svc) = (Arc::clone(&self.shared), self.inner.clone());
                    let stale = Stale { stored, read_seq };
                    return HttpResponseFuture::boxed(async move {
                        let req = Request::from_parts(parts, body);
                        let (res, _) = upstream(&shared, svc, req, &key, Some(stale), true).await?;
                        Ok(leave(&shared.config, res, why))
                    });
                }
            }
        }
        sh.stats.incr(Kind::Misses);
        if req_cc.only_if_cached {
            let mut res = Response::new(CacheBody::empty());
            *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
            return HttpResponseFuture::ready(Ok(res));
        }
        // A `no-store` request is not one the cache may store for: unless
        // storage answers it, it bypasses the cache.
        let why = if req_cc.no_store {
            Fwd::Bypass
        } else {
            Fwd::Miss
        };
        let (shared, svc) = (Arc::clone(&self.shared), self.inner.clone());
        HttpResponseFuture::boxed(async move {
            let req = Request::from_parts(parts, body);
            let res = miss(Arc::clone(&shared), svc, req, key, token).await?;
            Ok(leave(&shared.config, res, why))
        })
    }
}
