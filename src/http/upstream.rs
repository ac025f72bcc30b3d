//! Going upstream: misses (coalesced, through the shared tier when one is
//! attached), revalidations, unsafe methods, and what is stored of the
//! answer (RFC 9111), with the tag header read and stripped.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower::{Service, ServiceExt};

use super::body::{Buffered, CacheBody, buffer};
use super::cache_control::RequestDirectives;
use super::config::covers;
use super::freshness::{self, NotStored, Usable};
use super::stand_in::{self, Failure, UpstreamUnreachable};
use super::state::HttpShared;
use super::status::{self, Detail, Fwd, Status};
use super::stored::{
    CacheHit, HitHead, Stored, StoredVariants, hit, per_user, respond, storable_headers, tags_of,
    vary_values,
};
use crate::cache::engine::flight::Join;
use crate::cache::engine::stats::Kind;
use crate::cache::remote::Lease;
use crate::cache::{DataVersion, Entry, Hashed};

type HttpEntry = Entry<StoredVariants, ()>;

/// A stored response to revalidate, with the invalidation sequence number
/// read before it was looked up. A `304` keeps its body, which is no newer
/// than that lookup, so the merge is stored only if nothing touching it
/// was invalidated since then (not merely since the revalidation began:
/// a purge in between would otherwise come back under a later number).
pub(crate) struct Stale {
    pub(crate) stored: Arc<Stored>,
    pub(crate) read_seq: u64,
}

/// What [`fetch`] stored, and whether it is a `304` merged into the stale
/// body (never written to the shared tier: see [`upstream`]).
struct Kept {
    entry: Arc<HttpEntry>,
    merged: bool,
}

/// Removes the tag header unless it is configured to pass through.
pub(crate) fn strip_tags(shared: &HttpShared, headers: &mut HeaderMap) {
    if !shared.config.pass_tag_header {
        headers.remove(&shared.config.tag_header);
    }
}

/// Forwards a request the cache does not answer (the tag header stripped).
pub(crate) async fn pass<S, ReqBody, ResBody>(
    shared: &HttpShared,
    svc: S,
    req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let mut res = svc.oneshot(req).await?;
    strip_tags(shared, res.headers_mut());
    Ok(res.map(CacheBody::stream))
}

/// The stored variant for this request, if it is fresh enough for it and
/// stamped at or above its token.
fn fresh_variant(
    shared: &HttpShared,
    variants: &StoredVariants,
    req: &HeaderMap,
    req_cc: &RequestDirectives,
    token: Option<u64>,
) -> Option<(Arc<Stored>, Duration)> {
    let stored = variants.find(req)?;
    if !covers(stored.stamp, token) {
        return None;
    }
    let age = stored.age(shared.clock.now());
    let usable = freshness::usable(age, stored.lifetime, &stored.cc, req_cc, &shared.rules);
    (usable == Usable::Fresh).then(|| (Arc::clone(stored), age))
}

/// A miss: one request per key goes upstream; concurrent ones wait and
/// take what it stored if a variant matches their `Vary` headers and is
/// fresh for them (and stamped at or above their token: a request only
/// waits for a fetch led by one whose token is at least its own). With a
/// shared tier, the request that leads asks it first (one round trip) and
/// writes what it stores back to it.
pub(crate) async fn miss<S, ReqBody, ResBody>(
    shared: Arc<HttpShared>,
    svc: S,
    req: Request<ReqBody>,
    key: Hashed<String>,
    token: Option<u64>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let head = req.method() == Method::HEAD;
    let req_cc = shared.request_directives(req.headers());
    let leader = loop {
        match shared.flights.join_fenced(&key, token, &shared.log) {
            Join::Lead(leader) => break Some(leader),
            Join::Alone => break None,
            Join::Wait(flight) => {
                shared.stats.incr(Kind::Coalesced);
                match flight.wait().await {
                    Some(Ok(variants)) => {
                        if let Some((stored, age)) =
                            fresh_variant(&shared, &variants, req.headers(), &req_cc, token)
                        {
                            let mut res = hit(
                                &shared.config,
                                respond(&stored, age, head, req.headers()),
                                CacheHit::Local,
                            );
                            status::note(&shared.config, &mut res, |s| {
                                s.fwd = Some(Fwd::Miss);
                                s.collapsed = true;
                            });
                            return Ok(res);
                        }
                        // Another variant, or not fresh for this request.
                        break None;
                    }
                    // Not stored: go upstream ourselves.
                    Some(Err(())) => break None,
                    None => {} // the leader was cancelled: try to lead
                }
            }
        }
    };
    if head {
        // A HEAD response is never stored; only a stored GET answers HEAD.
        drop(leader);
        return pass(&shared, svc, req).await;
    }
    let mut stale = None;
    if let (Some(tier), true) = (shared.remote.get(), leader.is_some()) {
        // An L1 miss: one round trip to the shared tier.
        let fill_seq = shared.log.current();
        if let Some(entry) = shared.fill_from_remote(tier.as_ref(), &key, fill_seq).await
            && let Some(variants) = entry.response()
        {
            if let Some((stored, age)) =
                fresh_variant(&shared, variants, req.headers(), &req_cc, token)
            {
                if let Some(leader) = leader {
                    leader.complete(&entry.result);
                }
                let mut res = hit(
                    &shared.config,
                    respond(&stored, age, head, req.headers()),
                    CacheHit::SharedTier,
                );
                status::note(&shared.config, &mut res, |s| {
                    *s = Status::hit(&stored, age);
                    s.detail = Some(Detail::L2);
                });
                return Ok(res);
            }
            // Stale or not fresh enough for this request: revalidate it.
            // Never one stamped below its token: neither a 304 nor a
            // stale-if-error may hand this request data older than it.
            stale = variants
                .find(req.headers())
                .filter(|s| covers(s.stamp, token))
                .map(|stored| Stale {
                    stored: Arc::clone(stored),
                    read_seq: fill_seq,
                });
        }
    }
    // A range request goes to the origin as sent and its 206 is never
    // stored: it does not keep the others waiting for this URL (they
    // would all go upstream after it). One of them leads instead.
    let leader = leader.filter(|_| !req.headers().contains_key(header::RANGE));
    let why = stale.as_ref().map(|s| {
        let age = s.stored.age(shared.clock.now());
        status::revalidation(&s.stored, age, &shared.rules)
    });
    let mut result = upstream(&shared, svc, req, &key, stale, true).await;
    if let (Some(why), Ok((res, _))) = (why, &mut result) {
        status::note(&shared.config, res, |s| s.fwd = s.fwd.or(Some(why)));
    }
    if let Some(leader) = leader {
        let value = match &result {
            Ok((_, Some(entry))) => entry.result.clone(),
            _ => Err(()),
        };
        leader.complete(&value);
    }
    result.map(|(res, _)| res)
}

/// [`fetch`] under the shared tier's lease (when one is attached): what it
/// stores is written to the tier, unless an invalidation came since the
/// lease was taken (the tier refuses the put). A `304` merged into a stale
/// body is not written: the body was read before the lease, so another
/// instance's invalidation this one has not heard of yet may have removed
/// it everywhere, and the put (under a newer epoch) would bring it back.
pub(crate) async fn upstream<S, ReqBody, ResBody>(
    shared: &HttpShared,
    svc: S,
    req: Request<ReqBody>,
    key: &Hashed<String>,
    stale: Option<Stale>,
    answers_client: bool,
) -> Result<(Response<CacheBody<ResBody>>, Option<Arc<HttpEntry>>), S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let Some(tier) = shared.remote.get() else {
        let mut result = fetch(shared, svc, req, key, stale, answers_client).await;
        status::note_stored(&shared.config, &mut result);
        return result.map(|(res, kept)| (res, kept.map(|k| k.entry)));
    };
    // Only a fill under a lease taken before it reads may write the tier.
    let lease = match tier.lease(key.key()).await {
        // Another instance is filling it: fill here too, without writing.
        Lease::Busy => Lease::Unavailable,
        lease => lease,
    };
    let mut result = fetch(shared, svc, req, key, stale, answers_client).await;
    status::note_stored(&shared.config, &mut result);
    let shared_entry = match &result {
        Ok((_, Some(kept))) if !kept.merged => shared.remote_entry(key.key(), &kept.entry),
        _ => None,
    };
    match (shared_entry, lease) {
        (Some(entry), Lease::Acquired { .. }) => tier.put(key.key(), entry, lease).await,
        (None, Lease::Acquired { .. }) => tier.release(key.key(), lease).await,
        _ => {}
    }
    result.map(|(res, kept)| (res, kept.map(|k| k.entry)))
}

/// Goes upstream (conditionally when a stored response with validators is
/// given), then stores and answers per RFC 9111. In a background
/// revalidation (`answers_client` false) an unreachable origin leaves the
/// stored response as it is and nobody is answered stale for it.
async fn fetch<S, ReqBody, ResBody>(
    shared: &HttpShared,
    svc: S,
    req: Request<ReqBody>,
    key: &Hashed<String>,
    stale: Option<Stale>,
    answers_client: bool,
) -> Result<(Response<CacheBody<ResBody>>, Option<Kept>), S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let tag_header = &shared.config.tag_header;
    let (mut parts, body) = req.into_parts();
    let client_headers = parts.headers.clone();
    let req_cc = shared.request_directives(&client_headers);
    let method = parts.method.clone();
    let head = method == Method::HEAD;
    let (stale, read_seq) = match stale {
        Some(s) => (Some(s.stored), s.read_seq),
        None => (None, u64::MAX),
    };
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
    // When the origin failed, a stored response may stand in (or a 504).
    let stood_in = |failure| {
        let stored = stale.as_deref()?;
        let (client, cc) = (&client_headers, &req_cc);
        stand_in::answer(shared, stored, failure, answers_client, head, client, cc)
    };
    let mut res = match result {
        Ok(res) => res,
        Err(e) => {
            if let Some(res) = stood_in(Failure::ServiceError) {
                return Ok((res, None));
            }
            shared.stats.incr(Kind::InnerErrors);
            return Err(e);
        }
    };
    // A response the inner service made because it could not reach the
    // origin is never stored, nor replaces what is.
    let unreachable = res.extensions().get::<UpstreamUnreachable>().is_some();
    let failure = if unreachable {
        Some(Failure::Unreachable(res.status()))
    } else {
        let status = res.status();
        status.is_server_error().then_some(Failure::Status(status))
    };
    if let Some(served) = failure.and_then(stood_in) {
        return Ok((served, None));
    }
    if unreachable {
        shared.stats.incr(Kind::NotStored);
        strip_tags(shared, res.headers_mut());
        return Ok((res.map(CacheBody::stream), None));
    }
    // The version of the data the origin built this response from.
    let stamp = res.extensions().get::<DataVersion>().map(|v| v.0);
    if let Some(stored) = &stale
        && res.status() == StatusCode::NOT_MODIFIED
    {
        // Freshen the stored response with the 304's headers (§4.3.4).
        let mut headers = stored.headers.clone();
        // A 304 describes the stored body, never its length (RFC 9111 §3.2).
        let mut update = storable_headers(res.headers().clone());
        update.remove(header::CONTENT_LENGTH);
        // Tags: the 304's when it carries the header, else the stored ones.
        let tags = if res.headers().contains_key(tag_header) {
            tags_of(res.headers(), tag_header)
        } else {
            Ok(stored.tags.to_vec())
        };
        strip_tags(shared, &mut update);
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
        let cc = freshness::response_directives(&headers, &shared.rules);
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
        // What the raw 304 says too, over the stored fields it does not
        // replace: a `Set-Cookie`, `private` or `no-store` that
        // `Connection` lists is still per-user, and the directives are
        // chosen as for the merged response (a stored targeted field the
        // 304 does not resend still replaces its `Cache-Control`).
        let mut raw_headers = stored.headers.clone();
        for name in res.headers().keys() {
            raw_headers.remove(name);
        }
        for (name, value) in res.headers() {
            raw_headers.append(name.clone(), value.clone());
        }
        let raw_cc = freshness::response_directives(&raw_headers, &shared.rules);
        let raw = match freshness::storable(
            &Method::GET,
            &HeaderMap::new(),
            &RequestDirectives::default(),
            stored.status,
            &raw_headers,
            &raw_cc,
            &shared.rules,
        ) {
            Err(NotStored::NoFreshness) => Ok(Duration::ZERO),
            other => other,
        };
        let shareable = raw.and(check(&HeaderMap::new(), &RequestDirectives::default()));
        let decision = shareable.and_then(|_| check(&client_headers, &req_cc));
        // Tags that cannot be read keep it out (an invalidation of them
        // would miss it); what was stored stays, as for this client's
        // own reasons below.
        let decision = match &tags {
            Ok(_) => decision,
            Err(()) => Err(NotStored::NoStore),
        };
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
            tags: tags.unwrap_or_default().into_boxed_slice(),
            // The origin found the stored body current as of the 304's
            // data, so it reflects the newer of the two.
            stamp: match (stored.stamp, stamp) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            hit_head: HitHead::default(),
        });
        shared.stats.incr(Kind::Refreshes);
        // As of the stale lookup: the body is that old.
        let merge_seq = fill_seq.min(read_seq);
        let kept = match (shareable, decision) {
            (_, Ok(_)) => shared.insert(key, Arc::clone(&updated), merge_seq, Some(&stored.vary)),
            // The origin now says the response is per-user (or cannot
            // be read): only this client gets it, and what was stored
            // goes too.
            (Err(_), _) => {
                shared.stats.incr(Kind::NotStored);
                if super::range::plain_get(&method, &client_headers) {
                    shared.forget(key);
                }
                None
            }
            // This client's `no-store` or `Authorization`: its 304 is
            // not stored, and the stored response it validated stays
            // as it was (a client cannot evict it for everybody).
            (Ok(_), Err(_)) => {
                shared.stats.incr(Kind::NotStored);
                None
            }
        };
        let age = updated.age(now);
        let mut res = respond(&updated, age, head, &client_headers);
        status::note(&shared.config, &mut res, |s| {
            s.fwd_status = Some(StatusCode::NOT_MODIFIED);
        });
        let kept = kept.map(|entry| Kept {
            entry,
            merged: true,
        });
        return Ok((res, kept));
    }
    // The tags are read before the header goes; what reaches the client
    // from here on has it stripped (unless configured to pass).
    let tags = tags_of(res.headers(), tag_header);
    if !shared.config.pass_tag_header {
        res.headers_mut().remove(tag_header);
    }
    let cc = freshness::response_directives(res.headers(), &shared.rules);
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
            && super::range::plain_get(&method, &client_headers)
            && per_user(&shared.rules, stored, res.status(), res.headers(), &cc)
        {
            shared.forget(key);
        }
        return Ok((res.map(CacheBody::stream), None));
    };
    let Ok(tags) = tags else {
        // Tags that cannot be read: an invalidation of them would miss it.
        shared.stats.incr(Kind::NotStored);
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
    let (data, mut trailers) = match buffer(res_body, shared.config.max_body).await {
        Buffered::Complete { data, trailers } => (data, trailers),
        Buffered::Passthrough(body) => {
            shared.stats.incr(Kind::NotStored);
            return Ok((Response::from_parts(res_parts, body), None));
        }
    };
    // Tags are read from the header section only; a buffered body's
    // trailers lose the field too.
    if let Some(t) = trailers.as_mut() {
        strip_tags(shared, t);
    }
    let rules = &shared.rules;
    let cookie_trailer = trailers
        .as_ref()
        .is_some_and(|t| t.contains_key(header::SET_COOKIE));
    if cookie_trailer && rules.shared && !rules.share_set_cookie {
        // A `Set-Cookie` is per user wherever it is written.
        shared.stats.incr(Kind::NotStored);
        if stale.is_some()
            && res_parts.status.is_success()
            && super::range::plain_get(&method, &client_headers)
        {
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
        tags: tags.into_boxed_slice(),
        stamp,
        hit_head: HitHead::default(),
    });
    let kept = shared
        .insert(key, Arc::clone(&stored), fill_seq, None)
        .map(|entry| Kept {
            entry,
            merged: false,
        });
    let mut res = Response::from_parts(
        res_parts,
        CacheBody::full(stored.body.clone(), stored.trailers.clone()),
    );
    res.headers_mut().remove(header::AGE);
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(stored.initial_age.as_secs()));
    Ok((res, kept))
}
