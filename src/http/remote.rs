//! Stored HTTP responses in the shared (Redis) tier: the codec.
//!
//! The tier's frame (`cache::redis`) carries the entry's freshness window,
//! tags and version; inside it, this codec's bytes carry each `Vary`
//! variant: status, version, headers, body, trailers, the `Vary` values it
//! was selected by, its tags, its data version stamp (format 2; a value
//! of format 1, written before stamps, decodes as unstamped), and its age
//! when it was written with the wall clock time of the write. Decoding
//!
//! - adds the wall-clock time since the write to the age (so the time a
//!   response spent in Redis counts; a clock that went back adds nothing),
//!   and starts the age's clock again on this instance's [`Clock`];
//! - removes the tag header unless this cache passes it, and drops a
//!   variant whose body is larger than this cache's `max_body`;
//! - re-reads `Cache-Control` (or the targeted field this cache follows,
//!   RFC 9213) from the headers and runs every storing rule
//!   of a shared cache again: a variant that is per-user (`private`,
//!   `no-store`, `Set-Cookie` in headers or trailers unless shared,
//!   `Vary: *`, an unreadable `Cache-Control`), whose `Vary` values do not
//!   name exactly the headers its `Vary` names, or whose tags break the
//!   limits, is dropped; the freshness lifetime is computed again from the
//!   headers;
//! - rejects (a miss, and the tier deletes the value) anything that does not
//!   parse: a wrong format byte, a truncated or oversized field, an invalid
//!   status, header name or value, trailing bytes, or no variant left.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, SET_COOKIE};
use http::{HeaderMap, Method, StatusCode, Version};

use super::cache_control::RequestDirectives;
use super::config::{MAX_TAG_LEN, MAX_TAGS};
use super::freshness::{self, HttpCachePolicy, NotStored};
use super::stored::{HitHead, Stored, StoredVariants, VaryValues};
use crate::cache::redis::RedisCodec;
use crate::cache::{Clock, Tag};

/// The most bytes of one header section decoded.
pub(crate) const MAX_HEADER_BYTES: usize = 256 << 10;
/// The most fields of one header section decoded.
pub(crate) const MAX_FIELDS: usize = 1024;
/// Fields about the connection, not the response: a value carrying one is
/// refused (sent on, they would break the client's connection or stream).
pub(crate) const CONNECTION_FIELDS: [HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Whether every `content-length` of `headers` is `body_len`.
pub(crate) fn length_matches(headers: &HeaderMap, body_len: usize) -> bool {
    headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.to_str().ok().and_then(|v| v.parse::<usize>().ok()) == Some(body_len))
}

/// The format written: 2 adds each variant's stamp after its tags.
const FORMAT: u8 = 2;
/// The format before stamps, still read (its variants are unstamped).
const FORMAT_UNSTAMPED: u8 = 1;
/// At most this many variants decoded (the cache keeps 16 per key).
const MAX_VARIANTS: usize = 16;

/// The [`RedisCodec`] of an HTTP cache's shared tier: from
/// [`HttpCacheLayer::redis_codec`](super::HttpCacheLayer::redis_codec).
/// See the module docs of `http` ("Sharing through Redis").
#[derive(Debug, Clone)]
pub struct HttpRedisCodec {
    clock: Clock,
    rules: HttpCachePolicy,
    /// The largest body this cache stores: a longer one is dropped.
    max_body: usize,
    /// The tag header to strip from what comes back (`None`: it passes).
    strip: Option<HeaderName>,
}

impl HttpRedisCodec {
    pub(crate) fn new(
        clock: Clock,
        rules: HttpCachePolicy,
        max_body: usize,
        strip: Option<HeaderName>,
    ) -> Self {
        Self {
            clock,
            rules,
            max_body,
            strip,
        }
    }
}

fn wall_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// A response's HTTP version as one byte of a tier value (the HTTP and
/// gRPC codecs share it).
pub(crate) fn version_code(v: Version) -> u8 {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

/// The version [`version_code`] wrote; `None` for any other byte.
pub(crate) fn version_of(code: u8) -> Option<Version> {
    Some(match code {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return None,
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        // Every length the cache stores fits (bodies are buffered up to
        // `max_body`); a longer field is cut, and then fails to decode.
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn headers(&mut self, h: &HeaderMap) {
        self.u32(u32::try_from(h.len()).unwrap_or(u32::MAX));
        for (name, value) in h {
            self.bytes(name.as_str().as_bytes());
            self.bytes(value.as_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
    /// A header section: at most [`MAX_FIELDS`] fields and
    /// [`MAX_HEADER_BYTES`] bytes (a value that asks for more is refused
    /// before `HeaderMap` could overflow), and no connection field.
    fn headers(&mut self) -> Option<HeaderMap> {
        let n = usize::try_from(self.u32()?).ok()?;
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
            let name = HeaderName::from_bytes(name).ok()?;
            if CONNECTION_FIELDS.contains(&name) {
                return None;
            }
            map.try_append(name, HeaderValue::from_bytes(value).ok()?)
                .ok()?;
        }
        Some(map)
    }
}

impl HttpRedisCodec {
    fn encode_at(&self, variants: &StoredVariants, wall: SystemTime) -> Vec<u8> {
        let now = self.clock.now();
        let mut w = Writer(Vec::with_capacity(
            variants.0.iter().map(|s| s.body.len() + 512).sum::<usize>(),
        ));
        w.u8(FORMAT);
        w.u64(wall_ms(wall));
        let n = variants.0.len().min(MAX_VARIANTS);
        w.u16(u16::try_from(n).unwrap_or(0));
        for s in variants.0.iter().take(n) {
            w.u16(s.status.as_u16());
            w.u8(version_code(s.version));
            w.u64(u64::try_from(s.age(now).as_millis()).unwrap_or(u64::MAX));
            w.headers(&s.headers);
            w.bytes(&s.body);
            match &s.trailers {
                Some(t) => {
                    w.u8(1);
                    w.headers(t);
                }
                None => w.u8(0),
            }
            w.u16(u16::try_from(s.vary.len()).unwrap_or(u16::MAX));
            for (name, value) in &s.vary {
                w.bytes(name.as_str().as_bytes());
                match value {
                    Some(v) => {
                        w.u8(1);
                        w.bytes(v);
                    }
                    None => w.u8(0),
                }
            }
            w.u16(u16::try_from(s.tags.len()).unwrap_or(u16::MAX));
            for t in s.tags.iter() {
                w.bytes(t.as_str().as_bytes());
            }
            match s.stamp {
                Some(v) => {
                    w.u8(1);
                    w.u64(v);
                }
                None => w.u8(0),
            }
        }
        w.0
    }

    /// Decodes what [`encode_at`](Self::encode_at) wrote, as read at wall
    /// time `wall`; `None` when it does not parse or nothing shareable is
    /// left.
    fn decode_at(&self, bytes: &[u8], wall: SystemTime) -> Option<StoredVariants> {
        let mut r = Reader(bytes);
        let stamped = match r.u8()? {
            FORMAT => true,
            FORMAT_UNSTAMPED => false,
            _ => return None,
        };
        let written = r.u64()?;
        let in_tier = Duration::from_millis(wall_ms(wall).saturating_sub(written));
        let n = usize::from(r.u16()?);
        if n > MAX_VARIANTS {
            return None;
        }
        let now = self.clock.now();
        let mut out = Vec::new();
        for _ in 0..n {
            let status = StatusCode::from_u16(r.u16()?).ok()?;
            let version = version_of(r.u8()?)?;
            let age = Duration::from_millis(r.u64()?).saturating_add(in_tier);
            let mut headers = r.headers()?;
            let body = r.bytes()?;
            // A length that is not the body's would break the connection.
            if !length_matches(&headers, body.len()) {
                return None;
            }
            let body = (body.len() <= self.max_body).then(|| Bytes::copy_from_slice(body));
            let mut trailers = match r.u8()? {
                0 => None,
                1 => Some(r.headers()?),
                _ => return None,
            };
            // Another instance may pass the tag header; this one may not.
            if let Some(tag_header) = &self.strip {
                headers.remove(tag_header);
                if let Some(t) = trailers.as_mut() {
                    t.remove(tag_header);
                }
            }
            let mut vary: VaryValues = Vec::new();
            for _ in 0..r.u16()? {
                let name = HeaderName::from_bytes(r.bytes()?).ok()?;
                let value = match r.u8()? {
                    0 => None,
                    1 => Some(r.bytes()?.to_vec()),
                    _ => return None,
                };
                vary.push((name, value));
            }
            let tag_count = usize::from(r.u16()?);
            if tag_count > MAX_TAGS {
                return None;
            }
            let mut tags = Vec::with_capacity(tag_count);
            for _ in 0..tag_count {
                let t = std::str::from_utf8(r.bytes()?).ok()?;
                if t.is_empty() || t.len() > MAX_TAG_LEN || !t.bytes().all(|b| b.is_ascii_graphic())
                {
                    return None;
                }
                tags.push(Tag::from(t));
            }
            let stamp = if stamped {
                match r.u8()? {
                    0 => None,
                    1 => Some(r.u64()?),
                    _ => return None,
                }
            } else {
                None
            };
            // A body larger than this cache stores is not kept.
            let Some(body) = body else {
                continue;
            };
            // Every rule of a shared cache, again: whatever wrote this value.
            let cc = freshness::response_directives(&headers, &self.rules);
            let lifetime = match freshness::storable(
                &Method::GET,
                &HeaderMap::new(),
                &RequestDirectives::default(),
                status,
                &headers,
                &cc,
                &self.rules,
            ) {
                Ok(lifetime) => lifetime,
                Err(NotStored::NoFreshness) => Duration::ZERO,
                Err(_) => continue,
            };
            let cookie_trailer = trailers
                .as_ref()
                .is_some_and(|t| t.contains_key(SET_COOKIE));
            if cookie_trailer && self.rules.shared && !self.rules.share_set_cookie {
                continue;
            }
            let mut named: Vec<&str> = vary.iter().map(|(n, _)| n.as_str()).collect();
            named.sort_unstable();
            named.dedup();
            let mut declared: Vec<HeaderName> = freshness::vary_names(&headers).unwrap_or_default();
            declared.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            declared.dedup();
            if named.len() != vary.len()
                || !named
                    .iter()
                    .copied()
                    .eq(declared.iter().map(HeaderName::as_str))
            {
                continue;
            }
            out.push(Arc::new(Stored {
                status,
                version,
                headers,
                body,
                trailers,
                cc,
                lifetime,
                initial_age: age,
                stored_at: now,
                vary,
                tags: tags.into_boxed_slice(),
                stamp,
                hit_head: HitHead::default(),
            }));
        }
        if !r.0.is_empty() || out.is_empty() {
            return None;
        }
        Some(StoredVariants(out.into()))
    }
}

impl RedisCodec<String, StoredVariants> for HttpRedisCodec {
    fn encode_key(&self, key: &String) -> Vec<u8> {
        key.as_bytes().to_vec()
    }

    fn decode_key(&self, bytes: &[u8]) -> Option<String> {
        String::from_utf8(bytes.to_vec()).ok()
    }

    fn encode(&self, response: &StoredVariants) -> Vec<u8> {
        self.encode_at(response, SystemTime::now())
    }

    fn decode(&self, bytes: &[u8]) -> Option<StoredVariants> {
        self.decode_at(bytes, SystemTime::now())
    }
}

#[cfg(test)]
#[path = "remote_tests.rs"]
mod tests;
