//! Which calls are cached, and under what key: [`GrpcKey`].

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, request};

use super::layer::GrpcConfig;

/// The request headers that are always part of the key, because they
/// change what the message bytes mean (`content-type`: the codec;
/// `grpc-encoding`: the compression of the message) or how the response is
/// encoded (`grpc-accept-encoding`: a server may compress the response with
/// any encoding the caller accepts, and a caller that did not accept it
/// cannot read it).
pub(crate) const PROTOCOL_HEADERS: [HeaderName; 3] = [
    CONTENT_TYPE,
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("grpc-accept-encoding"),
];

/// The cache key of one unary call: its method path, its request message
/// (the length-prefixed bytes as sent), and every value of each metadata
/// key the layer names ([`key_metadata`]) plus the protocol headers
/// `content-type`, `grpc-encoding` and `grpc-accept-encoding`. Nothing
/// else: metadata the layer does not name is not in the key, and calls that
/// differ only in it share one entry.
///
/// [`key_metadata`]: super::GrpcCacheLayerBuilder::key_metadata
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GrpcKey {
    path: Arc<str>,
    message: Bytes,
    /// Each named header with all its values, in the configured order (an
    /// absent header has no values).
    metadata: Box<[(HeaderName, Box<[HeaderValue]>)]>,
}

impl std::fmt::Debug for GrpcKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The message may be large, and metadata may hold credentials.
        f.debug_struct("GrpcKey")
            .field("path", &self.path)
            .field("message_len", &self.message.len())
            .field("metadata", &self.metadata.len())
            .finish()
    }
}

impl GrpcKey {
    /// The key of a call to `path` with `message`, given its headers and
    /// the header names that make up the key.
    pub(crate) fn new(
        path: Arc<str>,
        message: Bytes,
        headers: &HeaderMap,
        names: &[HeaderName],
    ) -> Self {
        let metadata = names
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    headers.get_all(name).iter().cloned().collect(),
                )
            })
            .collect();
        Self {
            path,
            message,
            metadata,
        }
    }

    /// A key from its parts, as the shared tier's codec reads them.
    #[cfg(feature = "redis")]
    pub(crate) fn from_parts(
        path: Arc<str>,
        message: Bytes,
        metadata: Box<[(HeaderName, Box<[HeaderValue]>)]>,
    ) -> Self {
        Self {
            path,
            message,
            metadata,
        }
    }

    /// Each named header with all its values, in the configured order.
    #[cfg(feature = "redis")]
    pub(crate) fn metadata(&self) -> &[(HeaderName, Box<[HeaderValue]>)] {
        &self.metadata
    }

    /// The method path (`/package.Service/Method`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The request message: the gRPC length-prefixed bytes as sent.
    pub fn message(&self) -> &Bytes {
        &self.message
    }

    /// Roughly the bytes this key holds (for the store's byte budget).
    pub(crate) fn size(&self) -> usize {
        let metadata: usize = self
            .metadata
            .iter()
            .map(|(name, values)| {
                name.as_str().len() + values.iter().map(HeaderValue::len).sum::<usize>()
            })
            .sum();
        self.path.len() + self.message.len() + metadata
    }
}

/// The method path of a request the cache may serve, or `None` if it must
/// pass through: not a POST, not an opted-in path, a query string (gRPC
/// has none; a server that reads one would get another caller's answer),
/// not a gRPC content type, or `authorization` metadata that is not part of
/// the key.
pub(crate) fn cacheable(config: &GrpcConfig, parts: &request::Parts) -> Option<Arc<str>> {
    if parts.method != Method::POST || parts.uri.query().is_some() {
        return None;
    }
    let path = config.method_path(parts.uri.path())?;
    let grpc = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return None;
    }
    if parts.headers.contains_key(AUTHORIZATION) && !config.key_names().contains(&AUTHORIZATION) {
        return None;
    }
    Some(path)
}

/// Whether `bytes` is exactly one length-prefixed gRPC message (a
/// compressed-flag byte of 0 or 1, a big-endian `u32` length, then that
/// many bytes): what a unary request and a successful unary response carry.
pub(crate) fn single_message(bytes: &[u8]) -> bool {
    let Some((&[flag, a, b, c, d], rest)) = bytes.split_first_chunk::<5>() else {
        return false;
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    flag <= 1 && usize::try_from(len).is_ok_and(|len| len == rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(extra: &[&'static str]) -> Vec<HeaderName> {
        PROTOCOL_HEADERS
            .iter()
            .cloned()
            .chain(extra.iter().map(|n| HeaderName::from_static(n)))
            .collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn key(pairs: &[(&'static str, &'static str)], extra: &[&'static str]) -> GrpcKey {
        GrpcKey::new(
            Arc::from("/a.B/C"),
            Bytes::from_static(b"\0\0\0\0\x01x"),
            &headers(pairs),
            &names(extra),
        )
    }

    #[test]
    fn chosen_metadata_distinguishes_and_other_metadata_does_not() {
        let tenant = &["x-tenant"];
        assert_ne!(
            key(&[("x-tenant", "a")], tenant),
            key(&[("x-tenant", "b")], tenant)
        );
        assert_ne!(key(&[("x-tenant", "a")], tenant), key(&[], tenant));
        assert_eq!(
            key(&[("x-tenant", "a"), ("x-user", "alice")], tenant),
            key(&[("x-tenant", "a"), ("x-user", "bob")], tenant),
            "metadata not named is not in the key"
        );
    }

    #[test]
    fn every_value_of_a_chosen_key_counts() {
        // A second value the server might read must not share the entry of
        // the first value alone.
        let tenant = &["x-tenant"];
        assert_ne!(
            key(&[("x-tenant", "a")], tenant),
            key(&[("x-tenant", "a"), ("x-tenant", "b")], tenant)
        );
    }

    #[test]
    fn protocol_headers_are_always_in_the_key() {
        assert_ne!(key(&[("grpc-accept-encoding", "gzip")], &[]), key(&[], &[]));
        assert_ne!(
            key(&[("content-type", "application/grpc+json")], &[]),
            key(&[("content-type", "application/grpc")], &[])
        );
        assert_ne!(key(&[("grpc-encoding", "gzip")], &[]), key(&[], &[]));
    }

    #[test]
    fn the_key_does_not_print_its_metadata() {
        let k = key(&[("authorization", "Bearer secret")], &["authorization"]);
        assert!(!format!("{k:?}").contains("secret"));
    }

    #[test]
    fn single_message_framing() {
        assert!(single_message(b"\0\0\0\0\0"));
        assert!(single_message(b"\0\0\0\0\x02ab"));
        assert!(single_message(b"\x01\0\0\0\x01a"));
        assert!(!single_message(b""));
        assert!(!single_message(b"\0\0\0\0"));
        assert!(!single_message(b"\0\0\0\0\x02a"), "truncated");
        assert!(!single_message(b"\0\0\0\0\x01ab"), "trailing bytes");
        assert!(
            !single_message(b"\0\0\0\0\x01a\0\0\0\0\x01b"),
            "two messages"
        );
        assert!(!single_message(b"\x02\0\0\0\x01a"), "bad flag");
        assert!(
            !single_message(b"\0\xff\xff\xff\xffa"),
            "length past the end"
        );
    }
}
