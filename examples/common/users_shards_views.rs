//! The cross-shard views of the sharded users service
//! (`users_shards.rs`): `GET /users`, the listing in id order across the
//! shards, and `GET /admin/shards`, the operator's slot map.

use axum::Json;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::users::User;
use super::users_app;
use super::users_shards::{
    AppState, DEFAULT_LIMIT, MAX_LIMIT, REQUEST_DEADLINE, row_error, within,
};

/// `limit` and `after` of `GET /users`, or the 400 message.
fn list_params(query: Option<&str>) -> Result<(usize, i64), String> {
    let (mut limit, mut after) = (DEFAULT_LIMIT, i64::MIN);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit must be an integer from 1 to {MAX_LIMIT}"))?;
            }
            "after" => {
                after = v
                    .parse::<i64>()
                    .map_err(|_| "after must be a user id (an integer)".to_string())?;
            }
            _ => {}
        }
    }
    Ok((limit, after))
}

/// `GET /users?limit=N&after=ID`: the users after `ID` in id order
/// across shards (each shard's first `N + 1`, merged), and `next`, the
/// `after` of the next page (`null` on the last).
pub(crate) async fn list(
    State(app): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let (limit, after) = match list_params(uri.query()) {
        Ok(p) => p,
        Err(message) => return users_app::error(StatusCode::BAD_REQUEST, message),
    };
    let consistency = app.consistency(&headers);
    let per_shard = (limit + 1) as i64;
    let all = match within(app.cluster.read_all(
        &consistency,
        "SELECT id, name, welcomed_at IS NOT NULL FROM users WHERE id > $1 ORDER BY id LIMIT $2",
        &[&after, &per_shard],
    ))
    .await
    {
        Ok(all) => all,
        Err(res) => return res,
    };
    let id_of = |r: &tokio_postgres::Row| r.try_get::<_, i64>(0).unwrap_or(i64::MAX);
    let rows = all.merge_sorted(limit + 1, |a, b| id_of(a).cmp(&id_of(b)));
    let more = rows.len() > limit;
    let mut out = Vec::with_capacity(limit.min(rows.len()));
    for row in rows.into_iter().take(limit) {
        match User::from_row(row) {
            Ok(u) => {
                out.push(serde_json::json!({"id": u.id, "name": u.name, "welcomed": u.welcomed}))
            }
            Err(e) => return row_error(e),
        }
    }
    let next = match (more, out.last()) {
        (true, Some(last)) => last["id"].clone(),
        _ => serde_json::Value::Null,
    };
    let by: Vec<String> = all
        .shards
        .iter()
        .map(|s| format!("{}/{}", s.shard, s.served_by))
        .collect();
    let mut res = Json(serde_json::json!({"users": out, "next": next})).into_response();
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    users_app::served_by(res, HeaderValue::from_str(&by.join(", ")).ok())
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in
/// time independent of where they differ).
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, given)| given.trim())
    else {
        return false;
    };
    // Compared over SHA-256 digests: the time depends on neither where
    // they differ nor the token's length.
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(given), sha2::Sha256::digest(token));
    a.iter().zip(b.iter()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// `GET /admin/shards`: the slot map, `{"version": V, "slots": [{"from":
/// A, "to": B, "shard": "NAME"}, ...]}`, refreshed from the shards (the
/// map this instance has when they do not answer in time).
/// The answer to an `/admin/*` request without the admin token (401), or
/// to any without `--admin-token` (404); `None`: go on.
pub(crate) fn admin_denied(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = app.admin_token.as_deref() else {
        return Some(users_app::error(StatusCode::NOT_FOUND, "no such route"));
    };
    if !authorized(headers, token) {
        return Some(users_app::error(StatusCode::UNAUTHORIZED, "unauthorized"));
    }
    None
}

pub(crate) async fn admin_shards(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&app, &headers) {
        return denied;
    }
    let map = match tokio::time::timeout(REQUEST_DEADLINE, app.cluster.refresh()).await {
        Ok(Ok(map)) => map,
        _ => app.cluster.map(),
    };
    let slots: Vec<serde_json::Value> = map
        .ranges()
        .into_iter()
        .map(|(range, owner)| {
            let r = range.slots();
            serde_json::json!({"from": r.start(), "to": r.end(), "shard": owner})
        })
        .collect();
    Json(serde_json::json!({"version": map.version(), "slots": slots})).into_response()
}
