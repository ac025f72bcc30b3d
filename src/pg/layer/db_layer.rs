//! [`DbLayer`], its builder, and how it reads a request: the route, the
//! client's token (header or cookie), and how it writes the new token back.

use std::fmt;
use std::sync::Arc;

use http::header::{COOKIE, HeaderName, HeaderValue, SET_COOKIE};
use http::{HeaderMap, Method};
use tower::Layer;

use super::service::DbRouting;
use crate::pg::{ConsistencyToken, Db, TokenCodec};

/// Where a route's queries go by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// By method: safe methods read from replicas, unsafe ones the primary.
    ByMethod,
    /// Everything on the primary.
    Primary,
    /// Reads from replicas, whatever the method.
    Replicas,
}

#[derive(Debug)]
struct Settings {
    cookie: String,
    header: HeaderName,
    secure: bool,
    overrides: Vec<(String, Route)>,
    /// gRPC mode: the method paths that read; every other one writes.
    grpc_reads: Option<std::collections::HashSet<String>>,
}

/// Configures and builds a [`DbLayer`].
#[must_use]
#[derive(Debug)]
pub struct DbLayerBuilder {
    db: Db,
    codec: TokenCodec,
    settings: Settings,
}

impl DbLayerBuilder {
    /// The cookie name (default `tower_scale_token`).
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.settings.cookie = name.into();
        self
    }

    /// The header name (default `x-consistency-token`).
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.settings.header = name;
        self
    }

    /// Marks the cookie `Secure` (HTTPS only).
    pub fn secure_cookie(mut self, yes: bool) -> Self {
        self.settings.secure = yes;
        self
    }

    /// Routes requests whose path starts with `prefix` as `route`
    /// (the longest matching prefix wins).
    pub fn route(mut self, prefix: impl Into<String>, route: Route) -> Self {
        self.settings.overrides.push((prefix.into(), route));
        self.settings
            .overrides
            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        self
    }

    /// gRPC mode, for tonic servers: the token travels in the metadata key
    /// (`x-consistency-token` unless [`header_name`](Self::header_name)
    /// says otherwise), no cookie is set, and requests are classified by
    /// method path: the ones listed read from replicas, every other (and
    /// unknown) method goes to the primary.
    pub fn grpc<I, P>(mut self, read_methods: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.settings.grpc_reads = Some(read_methods.into_iter().map(Into::into).collect());
        self
    }

    /// Builds the layer.
    pub fn build(self) -> DbLayer {
        DbLayer {
            shared: Arc::new(Shared {
                db: self.db,
                codec: self.codec,
                settings: self.settings,
            }),
        }
    }
}

/// Puts a per-request [`RequestDb`](super::RequestDb) into the request extensions and the
/// consistency token into responses; see the [module docs](super).
///
/// Cloning it (once per request, into the request's state) is one atomic
/// increment: everything it holds is behind one `Arc`.
///
/// ```no_run
/// use axum::{Router, routing::{get, post}};
/// use tower_scale::pg::{Cluster, DbLayer, NodeConfig, RequestDb, Route, TokenCodec};
///
/// async fn show(db: RequestDb) -> String {
///     // A replica, or read-your-writes when the client sent a token.
///     match db.read_one("SELECT count(*) FROM users", &[]).await {
///         Ok(r) => r.value.get::<_, i64>(0).to_string(),
///         Err(e) => e.to_string(),
///     }
/// }
///
/// async fn create(db: RequestDb, name: String) -> String {
///     // The primary; the token reaches the response (cookie and header).
///     match db.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await {
///         Ok(_) => "created".into(),
///         Err(e) => e.to_string(),
///     }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = Cluster::builder()
///     .primary(NodeConfig::from_url("postgresql://app@10.0.0.1/app")?)
///     .replica(NodeConfig::from_url("postgresql://app@10.0.0.2/app")?)
///     .identity("users-db") // the same on every instance
///     .build()
///     .await?;
/// // The same key on every instance that serves these clients.
/// let codec = TokenCodec::new(b"32 random bytes, from a secret..", cluster.identity())?;
/// let layer = DbLayer::builder(cluster.db(), codec)
///     .secure_cookie(true)
///     // A POST that only reads: replicas (read-your-writes with a token).
///     .route("/search", Route::Replicas)
///     .build();
/// let app: Router = Router::new()
///     .route("/users", get(show).post(create))
///     .layer(layer);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(listener, app).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DbLayer {
    shared: Arc<Shared>,
}

struct Shared {
    db: Db,
    codec: TokenCodec,
    settings: Settings,
}

impl fmt::Debug for DbLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbLayer")
            .field("codec", &self.shared.codec)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl DbLayer {
    /// A layer routing through `db`, with tokens from `codec`.
    pub fn builder(db: Db, codec: TokenCodec) -> DbLayerBuilder {
        DbLayerBuilder {
            db,
            codec,
            settings: Settings {
                cookie: "tower_scale_token".into(),
                header: HeaderName::from_static("x-consistency-token"),
                secure: false,
                overrides: Vec::new(),
                grpc_reads: None,
            },
        }
    }
}

impl DbLayer {
    /// The database requests are routed through.
    pub(super) fn db(&self) -> &Db {
        &self.shared.db
    }
}

impl<S> Layer<S> for DbLayer {
    type Service = DbRouting<S>;
    fn layer(&self, inner: S) -> DbRouting<S> {
        DbRouting {
            inner,
            layer: self.clone(),
        }
    }
}

/// Cookie values of `name` in the request (all `Cookie` header lines). A
/// value may be sent in double quotes (RFC 6265 `cookie-value`); the quotes
/// are not part of it.
#[cfg(test)]
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(move |line| cookie_values(line, name))
}

/// Cookie values of `name` on one `Cookie` header line.
fn cookie_values<'a>(line: &'a HeaderValue, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    line.as_bytes()
        // Pair by pair on the raw bytes: one cookie with a non-ASCII value
        // must not hide the others on the line.
        .split(|&b| b == b';')
        .filter_map(move |pair| {
            if !pair.is_ascii() {
                return None;
            }
            let pair = std::str::from_utf8(pair).ok()?;
            let (k, v) = pair.split_once('=')?;
            (k.trim() == name).then_some(unquote(v.trim()))
        })
}

/// `"value"` → `value`; anything else as it is.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

impl DbLayer {
    /// The newest valid token a request presents.
    ///
    /// One pass over the request's fields comparing names: nothing is
    /// hashed, and nothing is decoded, allocated or verified unless the
    /// token header or a `Cookie` line is there. (Two header-map lookups,
    /// each hashing a name, cost more than this scan for the fields
    /// requests carry; the token layer is on every request's path.)
    /// At most eight token values are looked at (each decoded is an HMAC per
    /// key): the rest are ignored.
    pub fn token_of(&self, headers: &HeaderMap) -> Option<ConsistencyToken> {
        let settings = &self.shared.settings;
        let codec = &self.shared.codec;
        let mut newest = None;
        // At most this many candidates are decoded (each an HMAC per key):
        // a request stuffed with forged tokens costs a bounded amount.
        let mut budget = MAX_TOKEN_CANDIDATES;
        for (name, value) in headers {
            if budget == 0 {
                break;
            }
            let token = if name == COOKIE {
                cookie_values(value, &settings.cookie)
                    .take(budget)
                    .inspect(|_| budget -= 1)
                    .filter_map(|v| codec.decode(v))
                    .max()
            } else if *name == settings.header {
                budget -= 1;
                value.to_str().ok().and_then(|v| codec.decode(v))
            } else {
                continue;
            };
            newest = newest.max(token);
        }
        newest
    }

    pub(super) fn route_of(&self, path: &str, method: &Method) -> Route {
        let settings = &self.shared.settings;
        if let Some(reads) = &settings.grpc_reads {
            return if reads.contains(path) {
                Route::Replicas
            } else {
                Route::Primary
            };
        }
        let route = settings
            .overrides
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(Route::ByMethod, |(_, r)| *r);
        match route {
            Route::ByMethod if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) => {
                Route::Replicas
            }
            Route::ByMethod => Route::Primary,
            other => other,
        }
    }

    pub(super) fn set_token(&self, headers: &mut HeaderMap, token: ConsistencyToken) {
        let settings = &self.shared.settings;
        let encoded = self.shared.codec.encode(token);
        if settings.grpc_reads.is_some() {
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                headers.insert(settings.header.clone(), v);
            }
            return;
        }
        let max_age = self.shared.codec.lifetime().as_secs();
        let cookie = format!(
            "{}={encoded}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}{}",
            settings.cookie,
            if settings.secure { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            headers.append(SET_COOKIE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            headers.insert(settings.header.clone(), v);
        }
    }
}

/// How many token values (cookies named like the token's, token headers) a
/// request may present before the rest are ignored.
const MAX_TOKEN_CANDIDATES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(cookie_lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in cookie_lines {
            headers.append(COOKIE, HeaderValue::from_str(line).unwrap());
        }
        headers
    }

    #[test]
    fn cookie_values_plain_and_quoted() {
        let name = "tower_scale_token";
        let h = request(&[
            "a=1; tower_scale_token=plain",
            r#"tower_scale_token="quoted"; b=2"#,
            r#"tower_scale_token = "spaced" "#,
        ]);
        let values: Vec<&str> = cookies(&h, name).collect();
        assert_eq!(values, ["plain", "quoted", "spaced"]);
        // Unbalanced or lone quotes are left alone (and then fail to decode).
        let h = request(&[r#"tower_scale_token="open"#, r#"tower_scale_token=""#]);
        let values: Vec<&str> = cookies(&h, name).collect();
        assert_eq!(values, [r#""open"#, r#"""#]);
        // Only the cookie of that name; an empty quoted value is empty.
        let h = request(&[r#"other="x"; tower_scale_token="""#]);
        let values: Vec<&str> = cookies(&h, name).collect();
        assert_eq!(values, [""]);
    }
}
