//! Unsafe methods (RFC 9111 §4.4): forwarded, and what they may have
//! changed invalidated.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use tower::{Service, ServiceExt};

use super::body::CacheBody;
use super::key::same_origin;
use super::state::HttpShared;
use super::upstream::strip_tags;

/// POST, PUT, PATCH, DELETE...: forwarded; on success, the target URI and
/// a same-origin `Location` / `Content-Location` are invalidated, and the
/// target URI also when the outcome is unknown.
pub(crate) async fn unsafe_method<S, ReqBody, ResBody>(
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
    let res = svc.oneshot(Request::from_parts(parts, body)).await;
    // No answer from the origin (an inner error, a response marked
    // unreachable: a timeout, a reset after the request was sent): the
    // write may have happened, so what it may have changed goes.
    let outcome_unknown = match &res {
        Err(_) => true,
        Ok(res) => res
            .extensions()
            .get::<super::UpstreamUnreachable>()
            .is_some(),
    };
    if outcome_unknown {
        for target in &targets {
            shared.invalidate_url(target);
        }
    }
    let mut res = res?;
    if res.status().is_success() || res.status().is_redirection() {
        for target in &targets {
            shared.invalidate_url(target);
            let Ok(base) = target.parse::<http::Uri>() else {
                continue;
            };
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let Some(loc) = res.headers().get(&name).and_then(|v| v.to_str().ok()) else {
                    continue;
                };
                if let Some(key) = same_origin(&base, loc) {
                    shared.invalidate_url(&shared.normalise_url(key));
                }
            }
        }
    }
    strip_tags(&shared, res.headers_mut());
    Ok(res.map(CacheBody::stream))
}
