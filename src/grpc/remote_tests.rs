//! Unit tests of the gRPC cache's Redis codec.

use std::time::Duration;

use super::*;
use crate::grpc::GrpcCacheLayer;
use http::Version;

const PATH: &str = "/a.B/C";

fn codec_with(methods: &[&str], metadata: &[&str], max_message: usize) -> GrpcRedisCodec {
    let mut b = GrpcCacheLayer::builder().max_message(max_message);
    for m in methods {
        b = b.method(*m, Duration::from_secs(60));
    }
    for m in metadata {
        b = b.key_metadata(*m);
    }
    b.build().unwrap().redis_codec()
}

fn codec() -> GrpcRedisCodec {
    codec_with(&[PATH, "/a.B/D"], &["x-tenant"], 1 << 10)
}

fn message(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

fn key(
    codec: &GrpcRedisCodec,
    path: &str,
    msg: &[u8],
    meta: &[(&'static str, &'static str)],
) -> GrpcKey {
    GrpcKey::new(
        Arc::from(path),
        message(msg),
        &headers(meta),
        codec.config.key_names(),
    )
}

/// A response as `finish` would build it, storable or not.
fn response(key: GrpcKey, status: u16, body: Bytes, trailers: Option<HeaderMap>) -> Fetched {
    Fetched(Some(Arc::new(StoredGrpc::new(
        StatusCode::from_u16(status).unwrap(),
        Version::HTTP_2,
        headers(&[("content-type", "application/grpc"), ("x-served-by", "a")]),
        body,
        trailers,
        key,
        false,
    ))))
}

/// An OK response with one more field in its headers or trailers.
fn with_header(key: GrpcKey, name: &'static str, value: &'static str, trailer: bool) -> Fetched {
    let mut h = headers(&[("content-type", "application/grpc")]);
    let mut t = headers(&[("grpc-status", "0")]);
    let into = if trailer { &mut t } else { &mut h };
    into.append(name, HeaderValue::from_static(value));
    Fetched(Some(Arc::new(StoredGrpc::new(
        StatusCode::OK,
        Version::HTTP_2,
        h,
        message(b"abcde"),
        Some(t),
        key,
        false,
    ))))
}

fn ok(key: GrpcKey) -> Fetched {
    response(
        key,
        200,
        message(b"answer"),
        Some(headers(&[("grpc-status", "0"), ("x-trailer", "t")])),
    )
}

fn stored(f: &Fetched) -> &StoredGrpc {
    f.0.as_deref().unwrap()
}

#[test]
fn a_response_round_trips_and_serves_only_its_own_key() {
    let codec = codec();
    let k = key(
        &codec,
        PATH,
        b"\x08\x01",
        &[("x-tenant", "acme"), ("content-type", "application/grpc")],
    );
    let original = ok(k.clone());
    let back = codec.decode(&codec.encode(&original)).unwrap();
    let (a, b) = (stored(&original), stored(&back));
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.version, Version::HTTP_2);
    assert_eq!(b.headers, a.headers);
    assert_eq!(b.body, a.body);
    assert_eq!(b.trailers, a.trailers);
    assert!(b.key == k);
    assert_eq!(back.weight(), original.weight(), "weighed like the fill");
    assert!(b.serves(&k));
    for other in [
        key(
            &codec,
            PATH,
            b"\x08\x02",
            &[("x-tenant", "acme"), ("content-type", "application/grpc")],
        ),
        key(
            &codec,
            PATH,
            b"\x08\x01",
            &[("x-tenant", "other"), ("content-type", "application/grpc")],
        ),
        key(
            &codec,
            "/a.B/D",
            b"\x08\x01",
            &[("x-tenant", "acme"), ("content-type", "application/grpc")],
        ),
    ] {
        assert!(
            !b.serves(&other),
            "a value from the tier serves its own key only"
        );
        assert!(
            a.serves(&other),
            "a local fill is trusted (the store found it under its key)"
        );
    }
    assert!(codec.encode(&Fetched::CALLER_ONLY).is_empty());
    assert!(codec.decode(&[]).is_none());
}

#[test]
fn keys_round_trip_and_never_share_bytes() {
    let codec = codec();
    let keys = [
        key(&codec, PATH, b"", &[]),
        key(&codec, PATH, b"x", &[]),
        key(&codec, "/a.B/D", b"", &[]),
        key(&codec, PATH, b"", &[("x-tenant", "a")]),
        key(&codec, PATH, b"", &[("x-tenant", "a"), ("x-tenant", "b")]),
        key(&codec, PATH, b"", &[("x-tenant", "a,b")]),
        key(&codec, PATH, b"", &[("grpc-encoding", "gzip")]),
        key(&codec, PATH, b"", &[("grpc-accept-encoding", "gzip")]),
        // A method this instance does not cache (another instance's).
        key(&codec, "/other.S/M", b"", &[]),
    ];
    let encoded: Vec<Vec<u8>> = keys.iter().map(|k| codec.encode_key(k)).collect();
    for (i, (k, e)) in keys.iter().zip(&encoded).enumerate() {
        assert!(codec.decode_key(e).as_ref() == Some(k), "key {i}");
        for (j, other) in encoded.iter().enumerate() {
            assert_eq!(i == j, e == other, "keys {i} and {j}");
        }
        for cut in 0..e.len() {
            assert!(
                codec.decode_key(&e[..cut]).is_none(),
                "key {i} cut at {cut}"
            );
        }
        let mut longer = e.clone();
        longer.push(0);
        assert!(codec.decode_key(&longer).is_none());
    }
    // Other metadata names (another configuration) give other Redis keys.
    let plain = codec_with(&[PATH], &[], 1 << 10);
    assert_ne!(
        plain.encode_key(&key(&plain, PATH, b"", &[])),
        codec.encode_key(&key(&codec, PATH, b"", &[]))
    );
}

#[test]
fn storing_rules_are_checked_again_whatever_wrote_the_value() {
    let codec = codec();
    let k = || key(&codec, PATH, b"q", &[]);
    let ok_trailers = || Some(headers(&[("grpc-status", "0")]));
    let two = [message(b"a"), message(b"b")].concat();
    let cases = [
        ("HTTP 500", response(k(), 500, message(b"a"), ok_trailers())),
        (
            "a gRPC error",
            response(
                k(),
                200,
                message(b"a"),
                Some(headers(&[("grpc-status", "13")])),
            ),
        ),
        (
            "no status",
            response(k(), 200, message(b"a"), Some(HeaderMap::new())),
        ),
        ("no trailers", response(k(), 200, message(b"a"), None)),
        (
            "two messages",
            response(k(), 200, Bytes::from(two), ok_trailers()),
        ),
        (
            "cut message",
            response(k(), 200, message(b"abc").slice(..6), ok_trailers()),
        ),
        (
            "no message",
            response(k(), 200, Bytes::new(), ok_trailers()),
        ),
        (
            "over max_message",
            response(k(), 200, message(&[7; 1100]), ok_trailers()),
        ),
        (
            "a request over max_message",
            ok(key(&codec, PATH, &[7; 1100], &[])),
        ),
        ("a request that is not one message", {
            let mut bad = key(&codec, PATH, b"", &[]);
            bad = GrpcKey::from_parts(
                Arc::from(bad.path()),
                Bytes::from_static(b"\0\0\0\0\x05ab"),
                bad.metadata().to_vec().into_boxed_slice(),
            );
            ok(bad)
        }),
        (
            "a method not cached here",
            ok(key(&codec, "/other.S/M", b"q", &[])),
        ),
        (
            "a connection field",
            with_header(k(), "connection", "close", false),
        ),
        (
            "transfer-encoding",
            with_header(k(), "transfer-encoding", "chunked", false),
        ),
        (
            "a wrong content-length",
            with_header(k(), "content-length", "3", false),
        ),
        (
            "content-length in trailers",
            with_header(k(), "content-length", "10", true),
        ),
        (
            "a trailer connection field",
            with_header(k(), "keep-alive", "5", true),
        ),
    ];
    for (what, value) in cases {
        let bytes = codec.encode(&value);
        assert!(codec.decode(&bytes).is_none(), "{what}");
    }
    // A content-length that is the message's is kept.
    let exact = with_header(k(), "content-length", "10", false);
    assert!(codec.decode(&codec.encode(&exact)).is_some());
    // Another configuration's key metadata: not a key this cache makes.
    let plain = codec_with(&[PATH], &[], 1 << 10);
    let theirs = plain.encode(&ok(key(&plain, PATH, b"q", &[])));
    assert!(plain.decode(&theirs).is_some());
    assert!(codec.decode(&theirs).is_none());
    // A smaller max_message here than on the writer.
    let small = codec_with(&[PATH, "/a.B/D"], &["x-tenant"], 8);
    assert!(small.decode(&codec.encode(&ok(k()))).is_none());
}

#[test]
fn garbage_never_panics_and_decodes_to_nothing_or_a_valid_value() {
    let codec = codec();
    let k = key(&codec, PATH, b"\x08\x01", &[("x-tenant", "acme")]);
    let bytes = codec.encode(&ok(k));
    for cut in 0..bytes.len() {
        assert!(codec.decode(&bytes[..cut]).is_none(), "cut at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(codec.decode(&longer).is_none(), "trailing bytes");
    let mut wrong = bytes.clone();
    wrong[0] = FORMAT + 1;
    assert!(codec.decode(&wrong).is_none(), "another format");
    let mut decoded = 0;
    for i in 0..bytes.len() {
        for x in [0x00, 0xff, 0x80, 0x01, 0x0a, 0x30] {
            let mut b = bytes.clone();
            b[i] = x;
            let Some(value) = codec.decode(&b) else {
                continue;
            };
            decoded += 1;
            let s = stored(&value);
            assert!(s.storable(), "byte {i} = {x:#x}");
            assert_eq!(s.status, StatusCode::OK);
            assert!(single_message(&s.body) && s.body.len() <= 1 << 10);
            assert!(codec.config.method(s.key.path()).is_some());
            assert!(s.serves(&s.key) && s.is_from_tier());
        }
    }
    assert!(
        decoded > 0,
        "some flips (in header values, say) still decode"
    );
    // Lengths far beyond the input, and too many fields.
    let mut huge = vec![FORMAT];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert!(codec.decode(&huge).is_none());
    let mut w = Writer(vec![FORMAT]);
    w.key(&key(&codec, PATH, b"", &[]));
    w.u16(200);
    w.u8(3);
    w.len(MAX_FIELDS + 1);
    for _ in 0..=MAX_FIELDS {
        w.bytes(b"x-a");
        w.bytes(b"1");
    }
    w.bytes(&message(b""));
    w.u8(1);
    w.headers(&headers(&[("grpc-status", "0")]));
    assert!(codec.decode(&w.0).is_none(), "too many header fields");
}

impl StoredGrpc {
    fn is_from_tier(&self) -> bool {
        // A local fill serves any key it is asked with; this one does not.
        !self.serves(&GrpcKey::new(
            Arc::from("/x.Y/Z"),
            Bytes::new(),
            &HeaderMap::new(),
            &[],
        ))
    }
}
