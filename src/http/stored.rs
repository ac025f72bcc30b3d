//! What the HTTP cache stores: one response ([`Stored`]) with the `Vary`
//! values that select it and its tags, the variants of one URL
//! ([`StoredVariants`]), and how a stored response is answered.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::Body;

use super::body::CacheBody;
use super::cache_control::ResponseDirectives;
use super::config::HttpConfig;
use super::config::{MAX_TAG_LEN, MAX_TAGS};
use super::freshness;
use super::range::{self, Answer, Spec};
use super::status::{self, Status};
use crate::cache::{Instant, Tag};

/// One stored response.
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) cc: ResponseDirectives,
    pub(crate) lifetime: Duration,
    pub(crate) initial_age: Duration,
    pub(crate) stored_at: Instant,
    pub(crate) vary: VaryValues,
    /// The tags the response carried (sorted, deduplicated).
    pub(crate) tags: Box<[Tag]>,
    /// The version of the data it was built from (its
    /// [`DataVersion`](crate::cache::DataVersion)), if it said.
    pub(crate) stamp: Option<u64>,
    /// The header map of its hits, kept for the current second of age.
    pub(crate) hit_head: HitHead,
}

/// The header map of a variant's hits (the stored fields, `Age` and this
/// cache's `Cache-Status` entry), kept for the second of age it was built
/// for: `Age` and the entry's `ttl` change once a second, and building them
/// on every hit (two allocations, the number formatting, and a map that
/// grew and rehashed to take them) was most of what the cache added to a
/// hit's response. A hit clones the kept map. Never stored elsewhere or
/// sent to the shared tier.
#[derive(Default)]
pub(crate) struct HitHead(RwLock<Option<Arc<HitHeaders>>>);

struct HitHeaders {
    /// The whole seconds of age the map was built for.
    age_secs: u64,
    /// The cache name the status entry was built with (`None`: off).
    name: Option<Bytes>,
    headers: HeaderMap,
    /// The last `206`'s headers (`headers` with `Content-Range` and
    /// `Content-Length`) and the range they are for: a hit on the same
    /// range in the same second clones them, as a full hit clones
    /// `headers`; another range clones them and replaces the two values
    /// (no entry added, so the map never grows), then keeps its own.
    partial: RwLock<Option<(Range<usize>, HeaderMap)>>,
}

impl HitHead {
    /// The headers of a hit on `stored` at `age`: the kept map when it was
    /// built for the same second and cache name, else a new one (then
    /// kept, unless another hit is storing one at the same moment).
    fn headers(&self, config: &HttpConfig, stored: &Stored, age: Duration) -> HeaderMap {
        self.kept(config, stored, age).headers.clone()
    }

    /// The headers of a `206` hit on `stored` at `age` for `range` (see
    /// [`range::partial_headers`]).
    fn partial_headers(
        &self,
        config: &HttpConfig,
        stored: &Stored,
        age: Duration,
        range: &Range<usize>,
    ) -> HeaderMap {
        let kept = self.kept(config, stored, age);
        let mut headers = match &*crate::sync::read(&kept.partial) {
            Some((last, headers)) if last == range => return headers.clone(),
            Some((_, headers)) => headers.clone(),
            None => kept.headers.clone(),
        };
        range::partial_headers(&mut headers, range, stored.body.len());
        if let Ok(mut slot) = kept.partial.try_write() {
            *slot = Some((range.clone(), headers.clone()));
        }
        headers
    }

    /// The kept maps for this second of age and cache name, built when
    /// there are none.
    fn kept(&self, config: &HttpConfig, stored: &Stored, age: Duration) -> Arc<HitHeaders> {
        let age_secs = age.as_secs();
        let kept = crate::sync::read(&self.0).clone();
        if let Some(kept) = kept.filter(|k| k.age_secs == age_secs && k.name == config.cache_status)
        {
            return kept;
        }
        // Room for every distinct name plus the two added (capacity counts
        // names, not values: a name repeated 25,000 times is one), never a
        // panic: a map too large for that is cloned as is.
        let mut headers = match HeaderMap::try_with_capacity(stored.headers.keys_len() + 2) {
            Ok(mut headers) => {
                for (name, value) in &stored.headers {
                    headers.append(name.clone(), value.clone());
                }
                headers
            }
            Err(_) => stored.headers.clone(),
        };
        config.strip_targeted(&mut headers);
        // (A map already at the size limit keeps no room for these two.)
        let _ = headers.try_insert(header::AGE, HeaderValue::from(age_secs));
        if let Some(value) = config
            .cache_status
            .as_ref()
            .and_then(|name| status::value(name, stored.status, &Status::hit(stored, age)))
        {
            let _ = headers.try_append(status::CACHE_STATUS, value);
        }
        let built = Arc::new(HitHeaders {
            age_secs,
            name: config.cache_status.clone(),
            headers,
            partial: RwLock::new(None),
        });
        if let Ok(mut slot) = self.0.try_write() {
            *slot = Some(Arc::clone(&built));
        }
        built
    }
}

/// The request header values a stored response was selected by: one pair
/// per name in its `Vary`, `None` when the request did not have it.
pub(crate) type VaryValues = Vec<(HeaderName, Option<Vec<u8>>)>;

/// The `Vary` values of a response to a request with `request` headers
/// (empty for `Vary: *`, which is never stored).
pub(crate) fn vary_values(response: &HeaderMap, request: &HeaderMap) -> VaryValues {
    freshness::vary_names(response)
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            let value = freshness::normalized(request, &name);
            (name, value)
        })
        .collect()
}

/// The tags in `name`'s values (space-separated, several lines allowed),
/// sorted and deduplicated; `Err` when they cannot be read (not visible
/// ASCII), are too many or one is too long: such a response is not stored,
/// since an invalidation of a tag it could not record would miss it.
pub(crate) fn tags_of(headers: &HeaderMap, name: &HeaderName) -> Result<Vec<Tag>, ()> {
    let mut tags: Vec<&str> = Vec::new();
    for value in headers.get_all(name) {
        let text = value.to_str().map_err(|_| ())?;
        for tag in text.split_ascii_whitespace() {
            if tag.len() > MAX_TAG_LEN || tags.len() >= MAX_TAGS * 4 {
                return Err(());
            }
            tags.push(tag);
        }
    }
    tags.sort_unstable();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        return Err(());
    }
    Ok(tags.into_iter().map(Tag::from).collect())
}

impl Stored {
    pub(crate) fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    pub(crate) fn matches(&self, req: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| freshness::normalized(req, name).as_deref() == value.as_deref())
    }

    pub(crate) fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(header::ETAG)
    }

    pub(crate) fn weight(&self) -> u32 {
        u32::try_from(self.body.len() + 512).unwrap_or(u32::MAX)
    }

    /// How much longer it is fresh at `now`.
    pub(crate) fn fresh_for(&self, now: Instant) -> Duration {
        self.lifetime.saturating_sub(self.age(now))
    }
}

/// The responses the HTTP cache holds under one key: one per distinct set
/// of values of the request headers their `Vary` names, newest first.
///
/// Opaque: it is the value type of the HTTP cache's store and of its shared
/// tier (`RedisTier<String, StoredVariants>`, encoded by
/// [`HttpCacheLayer::redis_codec`](super::HttpCacheLayer::redis_codec)).
#[derive(Clone)]
pub struct StoredVariants(pub(crate) Arc<[Arc<Stored>]>);

impl StoredVariants {
    /// How many variants there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stored variant for a request with these headers.
    pub(crate) fn find(&self, req: &HeaderMap) -> Option<&Arc<Stored>> {
        self.0.iter().find(|s| s.matches(req))
    }
}

impl fmt::Debug for StoredVariants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| (s.status, s.body.len())))
            .finish()
    }
}

/// In the extensions of every response the HTTP cache answered from what
/// it stores rather than with the origin's answer to that request: a hit
/// (fresh, or stale while it revalidates), a request that waited for
/// another one's fetch of the same URL and took its stored response, a
/// response from the shared tier, or a stale one served because the
/// origin failed (`stale-if-error`). A response the origin revalidated
/// (a 304 merged into the stored one) is the origin's answer and has none.
///
/// A layer outside the cache can read it, for example to say who served a
/// response:
///
/// ```
/// use axum::http::{HeaderValue, Response};
/// use tower_scale::http::CacheHit;
///
/// fn served_by<B>(mut res: Response<B>) -> Response<B> {
///     let by = match res.extensions().get::<CacheHit>() {
///         Some(CacheHit::SharedTier) => "cache-l2",
///         Some(_) => "cache",
///         None => return res,
///     };
///     res.headers_mut().insert("x-served-by", HeaderValue::from_static(by));
///     res
/// }
/// # let _ = served_by::<()>;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheHit {
    /// From this instance's store.
    Local,
    /// From the shared tier (Redis), on this instance's miss.
    SharedTier,
}

/// `res`, marked as answered from the cache.
pub(crate) fn hit<B>(config: &HttpConfig, mut res: Response<B>, how: CacheHit) -> Response<B> {
    // Off unless asked for: the extension map costs two allocations a hit.
    if config.mark_hits {
        res.extensions_mut().insert(how);
    }
    res
}

/// Builds the response for a stored entry: a fresh `Response` with the
/// stored status, headers (cloned, not re-parsed), body and trailers, and
/// a correct `Age`; a 304 when the client's own validators match, else a
/// 206 or 416 when the client asked for a range of a stored 200 (see
/// [`range`]).
pub(crate) fn respond<B: Body>(
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
    let answer = range::answer_for(stored, req);
    if answer == Answer::Unsatisfiable {
        return range::unsatisfiable(stored, age);
    }
    let mut headers = stored.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    match answer {
        Answer::Partial(range) => {
            range::partial_headers(&mut headers, &range, stored.body.len());
            range::partial(stored, head, headers, range)
        }
        _ => stored_response(stored, head, headers),
    }
}

/// `stored`'s status, version, body and trailers (no body for `HEAD`)
/// with `headers`.
fn stored_response<B: Body>(
    stored: &Stored,
    head: bool,
    headers: HeaderMap,
) -> Response<CacheBody<B>> {
    let body = if head {
        CacheBody::empty()
    } else {
        CacheBody::full(stored.body.clone(), stored.trailers.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = stored.status;
    *res.version_mut() = stored.version;
    *res.headers_mut() = headers;
    res
}

/// The response for a hit (fresh, or stale while it revalidates) on
/// `stored`: what [`respond`] builds, marked as a hit, with this cache's
/// `Cache-Status` entry: the header map is a clone of the one the
/// variant's [`HitHead`] keeps for this second of age. `range` is the
/// request's single byte range, if it asked for one.
pub(crate) fn respond_hit<B: Body>(
    config: &HttpConfig,
    stored: &Stored,
    age: Duration,
    head: bool,
    req: &HeaderMap,
    range: Option<Spec>,
) -> Response<CacheBody<B>> {
    let answer = match range {
        Some(spec) => range::answer(stored, req, spec),
        None => Answer::Full,
    };
    if answer == Answer::Unsatisfiable || client_validator_matches(stored, req) {
        let mut res = hit(config, respond(stored, age, head, req), CacheHit::Local);
        status::stamp(config, &mut res, &Status::hit(stored, age));
        return res;
    }
    let res = match answer {
        Answer::Partial(range) => {
            let headers = stored.hit_head.partial_headers(config, stored, age, &range);
            range::partial(stored, head, headers, range)
        }
        _ => stored_response(stored, head, stored.hit_head.headers(config, stored, age)),
    };
    hit(config, res, CacheHit::Local)
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
pub(crate) fn storable_headers(mut headers: HeaderMap) -> HeaderMap {
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

/// Whether a response says by itself that it is per-user (`private`,
/// `no-store`, `Set-Cookie`, a `Cache-Control` that cannot be read, `Vary:
/// *`), or varies on other headers than the stored one: whoever asked.
pub(crate) fn per_user(
    rules: &super::freshness::HttpCachePolicy,
    stored: &Stored,
    status: StatusCode,
    headers: &HeaderMap,
    cc: &ResponseDirectives,
) -> bool {
    let alone = freshness::storable(
        &http::Method::GET,
        &HeaderMap::new(),
        &super::cache_control::RequestDirectives::default(),
        status,
        headers,
        cc,
        rules,
    );
    let names = |vary: &VaryValues| {
        let mut names: Vec<HeaderName> = vary.iter().map(|(n, _)| n.clone()).collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names
    };
    let vary_changed = names(&vary_values(headers, &HeaderMap::new())) != names(&stored.vary);
    !matches!(alone, Ok(_) | Err(freshness::NotStored::NoFreshness)) || vary_changed
}
