//! Unit tests of the HTTP cache's Redis codec (`remote.rs`).

use super::*;

fn stored(headers: &[(&str, &str)], vary: VaryValues, tags: &[&str]) -> Arc<Stored> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let cc = freshness::response_directives(&map, &HttpCachePolicy::default());
    Arc::new(Stored {
        status: StatusCode::OK,
        version: Version::HTTP_11,
        headers: map,
        body: Bytes::from_static(b"hello"),
        trailers: None,
        cc,
        lifetime: Duration::from_secs(60),
        initial_age: Duration::from_secs(5),
        stored_at: crate::cache::Instant::default(),
        vary,
        tags: tags.iter().map(|t| Tag::from(*t)).collect(),
        stamp: None,
        hit_head: HitHead::default(),
    })
}

fn codec() -> (HttpRedisCodec, crate::cache::MockClock) {
    let (clock, mock) = Clock::mock();
    let codec = HttpRedisCodec::new(
        clock,
        HttpCachePolicy::default(),
        1 << 20,
        Some(HeaderName::from_static("surrogate-key")),
    );
    (codec, mock)
}

fn shareable() -> StoredVariants {
    let lang = HeaderName::from_static("accept-language");
    StoredVariants(
        vec![
            stored(
                &[("cache-control", "max-age=60"), ("vary", "accept-language")],
                vec![(lang.clone(), Some(b"fr".to_vec()))],
                &["user:1", "page"],
            ),
            stored(
                &[("cache-control", "max-age=60"), ("vary", "accept-language")],
                vec![(lang, None)],
                &[],
            ),
        ]
        .into(),
    )
}

#[test]
fn variants_round_trip_with_the_time_in_the_tier_added_to_their_age() {
    let (codec, mock) = codec();
    mock.advance(Duration::from_secs(3));
    let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let bytes = codec.encode_at(&shareable(), t0);
    let back = codec
        .decode_at(&bytes, t0 + Duration::from_secs(20))
        .unwrap();
    assert_eq!(back.len(), 2);
    let first = &back.0[0];
    assert_eq!(first.body, Bytes::from_static(b"hello"));
    assert_eq!(first.tags.len(), 2);
    assert_eq!(first.lifetime, Duration::from_secs(60), "recomputed");
    // 5 s initial + 3 s on A's clock + 20 s in the tier.
    assert_eq!(first.age(codec.clock.now()), Duration::from_secs(28));
    assert_eq!(back.0[1].vary[0].1, None);
    // A clock that went back adds nothing.
    let back = codec
        .decode_at(&bytes, t0 - Duration::from_secs(50))
        .unwrap();
    assert_eq!(back.0[0].age(codec.clock.now()), Duration::from_secs(8));
}

#[test]
fn per_user_or_inconsistent_variants_are_dropped() {
    let (codec, _) = codec();
    let lang = HeaderName::from_static("accept-language");
    let cases = [
        stored(&[("cache-control", "private, max-age=60")], vec![], &[]),
        stored(&[("cache-control", "no-store")], vec![], &[]),
        stored(
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            vec![],
            &[],
        ),
        stored(
            &[("cache-control", "max-age=60"), ("vary", "*")],
            vec![],
            &[],
        ),
        // Vary names a header its values do not.
        stored(
            &[("cache-control", "max-age=60"), ("vary", "cookie")],
            vec![],
            &[],
        ),
        // Values for a header Vary does not name.
        stored(
            &[("cache-control", "max-age=60")],
            vec![(lang, Some(b"fr".to_vec()))],
            &[],
        ),
    ];
    let now = SystemTime::now();
    for (i, s) in cases.into_iter().enumerate() {
        let one = StoredVariants(vec![s.clone()].into());
        assert!(
            codec.decode_at(&codec.encode_at(&one, now), now).is_none(),
            "case {i}"
        );
        // Next to a good one, only the bad one goes.
        let mut both: Vec<_> = shareable().0.to_vec();
        both.push(s);
        let back = codec
            .decode_at(&codec.encode_at(&StoredVariants(both.into()), now), now)
            .unwrap();
        assert_eq!(back.len(), 2, "case {i}");
    }
    let mut cookie_trailer =
        (*stored(&[("cache-control", "max-age=60")], vec![], &[])).clone_for_test();
    let mut t = HeaderMap::new();
    t.insert(SET_COOKIE, HeaderValue::from_static("a=b"));
    cookie_trailer.trailers = Some(t);
    let one = StoredVariants(vec![Arc::new(cookie_trailer)].into());
    assert!(codec.decode_at(&codec.encode_at(&one, now), now).is_none());
}

#[test]
fn targeted_fields_rule_what_comes_back_as_they_rule_what_is_stored() {
    let (codec, _) = codec();
    let now = SystemTime::now();
    let round_trip = |headers: &[(&str, &str)]| {
        let one = StoredVariants(vec![stored(headers, vec![], &[])].into());
        codec.decode_at(&codec.encode_at(&one, now), now)
    };
    // A targeted `private` or `no-store` keeps a permissive
    // `Cache-Control` from sharing it.
    for cdn in ["private", "no-store", "max-age=60, private"] {
        let back = round_trip(&[
            ("cache-control", "public, max-age=60"),
            ("cdn-cache-control", cdn),
        ]);
        assert!(back.is_none(), "{cdn}");
    }
    // A targeted `max-age` stores what `Cache-Control` forbids, with its
    // lifetime (`Expires` ignored).
    let back = round_trip(&[
        ("cache-control", "no-store"),
        ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ("cdn-cache-control", "max-age=600"),
    ])
    .unwrap();
    assert_eq!(back.0[0].lifetime, Duration::from_secs(600));
    // An invalid one is ignored: `Cache-Control` rules.
    assert!(
        round_trip(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=600;")
        ])
        .is_none()
    );
    // Another cache's target list: its own fields.
    let off = HttpRedisCodec::new(
        Clock::new(),
        HttpCachePolicy {
            targeted_fields: Vec::new(),
            ..HttpCachePolicy::default()
        },
        1 << 20,
        None,
    );
    let one = StoredVariants(
        vec![stored(
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "private"),
            ],
            vec![],
            &[],
        )]
        .into(),
    );
    assert!(off.decode_at(&off.encode_at(&one, now), now).is_some());
}

#[test]
fn this_caches_tag_header_and_body_limit_apply_to_what_comes_back() {
    let (clock, _) = Clock::mock();
    let writer = HttpRedisCodec::new(clock.clone(), HttpCachePolicy::default(), 1 << 20, None);
    let reader = HttpRedisCodec::new(
        clock,
        HttpCachePolicy::default(),
        4,
        Some(HeaderName::from_static("surrogate-key")),
    );
    let tagged = stored(
        &[("cache-control", "max-age=60"), ("surrogate-key", "user:1")],
        vec![],
        &["user:1"],
    );
    let now = SystemTime::now();
    let bytes = writer.encode_at(&StoredVariants(vec![tagged].into()), now);
    let back = writer.decode_at(&bytes, now).unwrap();
    assert!(back.0[0].headers.contains_key("surrogate-key"), "passed");
    assert!(
        reader.decode_at(&bytes, now).is_none(),
        "5 bytes of body, over the reader's max_body"
    );
    let reader = HttpRedisCodec::new(
        Clock::mock().0,
        HttpCachePolicy::default(),
        1 << 20,
        Some(HeaderName::from_static("surrogate-key")),
    );
    let back = reader.decode_at(&bytes, now).unwrap();
    assert!(!back.0[0].headers.contains_key("surrogate-key"), "stripped");
    assert_eq!(back.0[0].tags.len(), 1, "the tags themselves stay");
}

#[test]
fn garbage_never_panics_and_never_decodes_partly() {
    let (codec, _) = codec();
    let now = SystemTime::now();
    let bytes = codec.encode_at(&shareable(), now);
    for cut in 0..bytes.len() {
        assert!(
            codec.decode_at(&bytes[..cut], now).is_none(),
            "cut at {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(codec.decode_at(&longer, now).is_none(), "trailing bytes");
    let mut wrong = bytes.clone();
    wrong[0] = 3;
    assert!(codec.decode_at(&wrong, now).is_none(), "another format");
    // Every single-byte change: no panic (some decode to other values).
    for i in 0..bytes.len() {
        for x in [0x00, 0xff, 0x80, 0x0a] {
            let mut b = bytes.clone();
            b[i] = x;
            let _ = codec.decode_at(&b, now);
        }
    }
    // Lengths far beyond the input.
    let mut huge = vec![FORMAT];
    huge.extend_from_slice(&0u64.to_be_bytes());
    huge.extend_from_slice(&1u16.to_be_bytes());
    huge.extend_from_slice(&200u16.to_be_bytes());
    huge.push(2);
    huge.extend_from_slice(&0u64.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(codec.decode_at(&huge, now).is_none());
}

impl Stored {
    fn clone_for_test(&self) -> Stored {
        Stored {
            status: self.status,
            version: self.version,
            headers: self.headers.clone(),
            body: self.body.clone(),
            trailers: self.trailers.clone(),
            cc: self.cc.clone(),
            lifetime: self.lifetime,
            initial_age: self.initial_age,
            stored_at: self.stored_at,
            vary: self.vary.clone(),
            tags: self.tags.clone(),
            stamp: self.stamp,
            hit_head: HitHead::default(),
        }
    }
}

fn encoded_with(codec: &HttpRedisCodec, headers: &[(&str, &str)]) -> Vec<u8> {
    let lang = HeaderName::from_static("accept-language");
    let mut all = vec![("cache-control", "max-age=60"), ("vary", "accept-language")];
    all.extend_from_slice(headers);
    let variants = StoredVariants(vec![stored(&all, vec![(lang, None)], &[])].into());
    codec.encode_at(&variants, UNIX_EPOCH + Duration::from_secs(1_000))
}

#[test]
fn hostile_header_sections_are_refused_not_trusted() {
    let (codec, _) = codec();
    let at = UNIX_EPOCH + Duration::from_secs(1_000);
    assert!(codec.decode_at(&encoded_with(&codec, &[]), at).is_some());
    // Fields that would break the client's connection or stream.
    for field in [
        "connection",
        "transfer-encoding",
        "upgrade",
        "keep-alive",
        "proxy-connection",
    ] {
        let bytes = encoded_with(&codec, &[(field, "close")]);
        assert!(codec.decode_at(&bytes, at).is_none(), "{field}");
    }
    // A length that is not the body's ("hello" is 5 bytes).
    assert!(
        codec
            .decode_at(&encoded_with(&codec, &[("content-length", "6")]), at)
            .is_none()
    );
    assert!(
        codec
            .decode_at(&encoded_with(&codec, &[("content-length", "5")]), at)
            .is_some()
    );
    // More fields than a header section may have (HeaderMap would
    // overflow and panic long before a million).
    let names: Vec<String> = (0..MAX_FIELDS + 1).map(|i| format!("h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    assert!(codec.decode_at(&encoded_with(&codec, &many), at).is_none());
    // A section over the byte bound.
    let big = "x".repeat(MAX_HEADER_BYTES);
    assert!(
        codec
            .decode_at(&encoded_with(&codec, &[("x-big", &big)]), at)
            .is_none()
    );
}

#[test]
fn stamps_round_trip_per_variant_and_old_values_decode_unstamped() {
    let (codec, _) = codec();
    let at = UNIX_EPOCH + Duration::from_secs(1_000);
    let lang = HeaderName::from_static("accept-language");
    let headers = [("cache-control", "max-age=60"), ("vary", "accept-language")];
    let mut fr = stored(&headers, vec![(lang.clone(), Some(b"fr".to_vec()))], &[]).clone_for_test();
    fr.stamp = Some(u64::MAX - 1);
    let mut de = stored(&headers, vec![(lang.clone(), Some(b"de".to_vec()))], &[]).clone_for_test();
    de.stamp = Some(0);
    let none = stored(&headers, vec![(lang.clone(), None)], &[]);
    let variants = StoredVariants(vec![Arc::new(fr), Arc::new(de), none].into());
    let back = codec
        .decode_at(&codec.encode_at(&variants, at), at)
        .unwrap();
    let stamps: Vec<Option<u64>> = back.0.iter().map(|s| s.stamp).collect();
    assert_eq!(stamps, [Some(u64::MAX - 1), Some(0), None]);
    // A value written before stamps (format 1: no stamp byte) decodes,
    // unstamped.
    let one = StoredVariants(vec![stored(&headers, vec![(lang, None)], &[])].into());
    let mut old = codec.encode_at(&one, at);
    assert_eq!(old.pop(), Some(0), "the last byte is the stamp flag");
    old[0] = 1;
    let back = codec.decode_at(&old, at).unwrap();
    assert_eq!(back.0[0].stamp, None);
    // A format-1 value with a stamp byte has trailing bytes; a bad flag fails.
    let mut trailing = codec.encode_at(&one, at);
    trailing[0] = 1;
    assert!(codec.decode_at(&trailing, at).is_none());
    let mut flag = codec.encode_at(&one, at);
    *flag.last_mut().unwrap() = 2;
    assert!(codec.decode_at(&flag, at).is_none());
}
