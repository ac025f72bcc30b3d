//! Stored gRPC responses in the shared (Redis) tier: the codec.
//!
//! The tier's frame (`cache::redis`) carries the entry's freshness and tags
//! (the method path); inside it, this codec's bytes carry the key the
//! response was written for (path, request message, key metadata), then
//! the response: status, HTTP version, headers, the one message, trailers.
//! Redis keys are the key's own bytes (every length written in full, so two
//! keys never share bytes).
//!
//! Decoding re-checks everything, whatever wrote the value: a wrong format
//! byte, a truncated or oversized field, trailing bytes, an invalid status,
//! header name or value, a method this cache does not cache, other key
//! metadata names than this cache's, a request or response that is not one
//! well-formed message within `max_message`, a status other than HTTP 200
//! with `grpc-status: 0` in the trailers, header sections over
//! [`MAX_HEADER_BYTES`] or [`MAX_FIELDS`] fields, connection fields
//! ([`CONNECTION_FIELDS`]) or a `content-length` that is not the message's:
//! all are a miss (and the tier deletes the value). A decoded response remembers its key and is
//! served only for a call with that key.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::fetch::{Fetched, StoredGrpc};
use super::key::{GrpcKey, single_message};
use super::layer::GrpcConfig;
use crate::cache::redis::RedisCodec;
use crate::http::remote::{
    CONNECTION_FIELDS, MAX_FIELDS, MAX_HEADER_BYTES, length_matches, version_code, version_of,
};

/// The value format.
const FORMAT: u8 = 1;
/// The key format.
const KEY_FORMAT: u8 = 1;
/// Whether a decoded header section may be sent on with a message of
/// `body_len` bytes: no connection fields, and a `content-length`, if
/// any, that is the message's.
fn sendable(headers: &HeaderMap, body_len: usize) -> bool {
    length_matches(headers, body_len) && !CONNECTION_FIELDS.iter().any(|f| headers.contains_key(f))
}

/// The [`RedisCodec`] of a gRPC cache's shared tier: from
/// [`GrpcCacheLayer::redis_codec`](super::GrpcCacheLayer::redis_codec),
/// which describes what it checks.
#[derive(Debug, Clone)]
pub struct GrpcRedisCodec {
    config: Arc<GrpcConfig>,
}

impl GrpcRedisCodec {
    pub(crate) fn new(config: Arc<GrpcConfig>) -> Self {
        Self { config }
    }
}

/// Every length is a full `u64`: nothing is ever cut, so distinct keys
/// always encode to distinct bytes.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn len(&mut self, n: usize) {
        self.0
            .extend_from_slice(&u64::try_from(n).unwrap_or(u64::MAX).to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
    fn headers(&mut self, h: &HeaderMap) {
        self.len(h.len());
        for (name, value) in h {
            self.bytes(name.as_str().as_bytes());
            self.bytes(value.as_bytes());
        }
    }
    fn key(&mut self, key: &GrpcKey) {
        self.bytes(key.path().as_bytes());
        self.bytes(key.message());
        self.len(key.metadata().len());
        for (name, values) in key.metadata() {
            self.bytes(name.as_str().as_bytes());
            self.len(values.len());
            for value in values {
                self.bytes(value.as_bytes());
            }
        }
    }
}

/// A key's parts as read: path, message, metadata.
type KeyParts<'a> = (&'a str, &'a [u8], Vec<(HeaderName, Box<[HeaderValue]>)>);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn len(&mut self) -> Option<usize> {
        usize::try_from(u64::from_be_bytes(self.take(8)?.try_into().ok()?)).ok()
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
    /// A header section within the limits.
    fn headers(&mut self) -> Option<HeaderMap> {
        let n = self.len()?;
        if n > MAX_FIELDS {
            return None;
        }
        let mut map = HeaderMap::new();
        let mut size = 0usize;
        for _ in 0..n {
            let name = self.bytes()?;
            let value = self.bytes()?;
            size = size.saturating_add(name.len() + value.len());
            if size > MAX_HEADER_BYTES {
                return None;
            }
            map.append(
                HeaderName::from_bytes(name).ok()?,
                HeaderValue::from_bytes(value).ok()?,
            );
        }
        Some(map)
    }
    /// A key's parts: its path, message and metadata, each well-formed.
    fn key(&mut self) -> Option<KeyParts<'a>> {
        let path = std::str::from_utf8(self.bytes()?).ok()?;
        let message = self.bytes()?;
        let mut metadata = Vec::new();
        for _ in 0..self.len()? {
            let name = HeaderName::from_bytes(self.bytes()?).ok()?;
            let mut values = Vec::new();
            for _ in 0..self.len()? {
                values.push(HeaderValue::from_bytes(self.bytes()?).ok()?);
            }
            metadata.push((name, values.into_boxed_slice()));
        }
        Some((path, message, metadata))
    }
}

impl GrpcRedisCodec {
    /// The key a value was written for, if this cache could make it: a
    /// method it caches, one message within `max_message`, its own key
    /// metadata names in its order.
    fn read_key(&self, r: &mut Reader<'_>) -> Option<GrpcKey> {
        let (path, message, metadata) = r.key()?;
        let path = self.config.method_path(path)?;
        if message.len() > self.config.max_message() || !single_message(message) {
            return None;
        }
        let names = metadata.iter().map(|(name, _)| name);
        if !names.eq(self.config.key_names()) {
            return None;
        }
        Some(GrpcKey::from_parts(
            path,
            Bytes::copy_from_slice(message),
            metadata.into_boxed_slice(),
        ))
    }

    fn decode_value(&self, bytes: &[u8]) -> Option<Fetched> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT {
            return None;
        }
        let key = self.read_key(&mut r)?;
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let version = version_of(r.u8()?)?;
        let headers = r.headers()?;
        let body = r.bytes()?;
        if body.len() > self.config.max_message() {
            return None;
        }
        let trailers = match r.u8()? {
            0 => None,
            1 => Some(r.headers()?),
            _ => return None,
        };
        if !r.0.is_empty()
            || !sendable(&headers, body.len())
            || trailers.as_ref().is_some_and(|t| {
                !sendable(t, body.len()) || t.contains_key(http::header::CONTENT_LENGTH)
            })
        {
            return None;
        }
        let body = Bytes::copy_from_slice(body);
        let stored = StoredGrpc::new(status, version, headers, body, trailers, key, true);
        // HTTP 200, `grpc-status: 0`, exactly one message: as for a fill.
        stored.storable().then(|| Fetched(Some(Arc::new(stored))))
    }
}

impl RedisCodec<GrpcKey, Fetched> for GrpcRedisCodec {
    fn encode_key(&self, key: &GrpcKey) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(key.size() + 64));
        w.u8(KEY_FORMAT);
        w.key(key);
        w.0
    }

    /// Any well-formed key (another instance may cache methods this one
    /// does not: its invalidations then match nothing here).
    fn decode_key(&self, bytes: &[u8]) -> Option<GrpcKey> {
        let mut r = Reader(bytes);
        if r.u8()? != KEY_FORMAT {
            return None;
        }
        let (path, message, metadata) = r.key()?;
        if !r.0.is_empty() {
            return None;
        }
        let path = self
            .config
            .method_path(path)
            .unwrap_or_else(|| Arc::from(path));
        Some(GrpcKey::from_parts(
            path,
            Bytes::copy_from_slice(message),
            metadata.into_boxed_slice(),
        ))
    }

    /// A response that is not held (never stored, so never written) encodes
    /// to nothing, which decodes to a miss.
    fn encode(&self, response: &Fetched) -> Vec<u8> {
        let Some(stored) = &response.0 else {
            return Vec::new();
        };
        let mut w = Writer(Vec::with_capacity(
            stored.key.size() + stored.body.len() + 512,
        ));
        w.u8(FORMAT);
        w.key(&stored.key);
        w.u16(stored.status.as_u16());
        w.u8(version_code(stored.version));
        w.headers(&stored.headers);
        w.bytes(&stored.body);
        match &stored.trailers {
            Some(t) => {
                w.u8(1);
                w.headers(t);
            }
            None => w.u8(0),
        }
        w.0
    }

    fn decode(&self, bytes: &[u8]) -> Option<Fetched> {
        self.decode_value(bytes)
    }
}

#[cfg(test)]
#[path = "remote_tests.rs"]
mod tests;
