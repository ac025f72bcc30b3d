//! The versioned frame a value is stored in: format byte, absolute
//! fresh-until (Unix ms), the stale windows, the version, the tags, then
//! the codec's bytes. A frame that does not decode (truncated, another
//! format) is `None`, never a panic: the tier treats it as a miss.

use crate::cache::Tag;

/// The frame's format byte; a frame with another one does not decode.
const FORMAT: u8 = 1;

/// The frame around a value: format, absolute fresh-until (Unix ms), the
/// stale windows, the version, the tags, then the codec's bytes. `None`
/// when the tags do not fit the frame (more than 65,535, or one longer than
/// 65,535 bytes): such an entry stays out of the tier rather than travel
/// under a cut tag that its invalidation would not reach.
pub(super) fn encode_frame(
    entry_bytes: &[u8],
    fresh_until: u64,
    swr: u64,
    sie: u64,
    version: Option<u64>,
    tags: &[Tag],
) -> Option<Vec<u8>> {
    let count = u16::try_from(tags.len()).ok()?;
    if tags
        .iter()
        .any(|t| u16::try_from(t.as_str().len()).is_err())
    {
        return None;
    }
    let mut out = Vec::with_capacity(entry_bytes.len() + 40);
    out.push(FORMAT);
    out.extend_from_slice(&fresh_until.to_be_bytes());
    out.extend_from_slice(&swr.to_be_bytes());
    out.extend_from_slice(&sie.to_be_bytes());
    out.push(u8::from(version.is_some()));
    out.extend_from_slice(&version.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for tag in tags {
        let t = tag.as_str().as_bytes();
        let len = u16::try_from(t.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(t);
    }
    out.extend_from_slice(entry_bytes);
    Some(out)
}

/// A decoded frame; `body` borrows the codec's bytes.
#[derive(Debug)]
pub(super) struct Frame<'a> {
    pub(super) fresh_until: u64,
    pub(super) swr: u64,
    pub(super) sie: u64,
    pub(super) version: Option<u64>,
    pub(super) tags: Vec<Tag>,
    pub(super) body: &'a [u8],
}

pub(super) fn decode_frame(bytes: &[u8]) -> Option<Frame<'_>> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    };
    let u64_at = |at: &mut usize| -> Option<u64> {
        let mut w = [0u8; 8];
        w.copy_from_slice(take(at, 8)?);
        Some(u64::from_be_bytes(w))
    };
    if *take(&mut at, 1)?.first()? != FORMAT {
        return None;
    }
    let fresh_until = u64_at(&mut at)?;
    let swr = u64_at(&mut at)?;
    let sie = u64_at(&mut at)?;
    let has_version = *take(&mut at, 1)?.first()? == 1;
    let version = u64_at(&mut at)?;
    let mut n = [0u8; 2];
    n.copy_from_slice(take(&mut at, 2)?);
    let mut tags = Vec::new();
    for _ in 0..u16::from_be_bytes(n) {
        let mut l = [0u8; 2];
        l.copy_from_slice(take(&mut at, 2)?);
        let t = take(&mut at, usize::from(u16::from_be_bytes(l)))?;
        tags.push(Tag::from(std::str::from_utf8(t).ok()?));
    }
    Some(Frame {
        fresh_until,
        swr,
        sie,
        version: has_version.then_some(version),
        tags,
        body: bytes.get(at..)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed part before the tags: format, three windows, version flag
    /// and version, tag count.
    const HEAD: usize = 1 + 8 * 3 + 1 + 8 + 2;

    fn sample() -> Vec<u8> {
        encode_frame(
            b"body bytes",
            1_700_000_000_000,
            30_000,
            60_000,
            Some(42),
            &[Tag::from("users"), Tag::from("user:7")],
        )
        .expect("fits")
    }

    #[test]
    fn tags_that_do_not_fit_keep_the_entry_out_of_the_tier() {
        let long = Tag::from("t".repeat(usize::from(u16::MAX) + 1));
        assert!(encode_frame(b"x", 1, 2, 3, None, &[long]).is_none());
        let many: Vec<Tag> = (0..=u32::from(u16::MAX))
            .map(|i| Tag::from(i.to_string()))
            .collect();
        assert!(encode_frame(b"x", 1, 2, 3, None, &many).is_none());
        let edge = Tag::from("t".repeat(usize::from(u16::MAX)));
        let bytes = encode_frame(b"x", 1, 2, 3, None, std::slice::from_ref(&edge)).expect("fits");
        assert_eq!(decode_frame(&bytes).expect("decodes").tags, vec![edge]);
    }

    #[test]
    fn a_frame_round_trips() {
        let bytes = sample();
        let f = decode_frame(&bytes).expect("decodes");
        assert_eq!(f.fresh_until, 1_700_000_000_000);
        assert_eq!(f.swr, 30_000);
        assert_eq!(f.sie, 60_000);
        assert_eq!(f.version, Some(42));
        assert_eq!(f.tags, vec![Tag::from("users"), Tag::from("user:7")]);
        assert_eq!(f.body, b"body bytes");
    }

    #[test]
    fn no_version_no_tags_and_an_empty_body_round_trip() {
        let bytes = encode_frame(b"", 0, 0, 0, None, &[]).expect("fits");
        assert_eq!(bytes.len(), HEAD);
        let f = decode_frame(&bytes).expect("decodes");
        assert_eq!((f.fresh_until, f.swr, f.sie), (0, 0, 0));
        assert_eq!(f.version, None);
        assert!(f.tags.is_empty());
        assert!(f.body.is_empty());
    }

    #[test]
    fn version_zero_is_not_none() {
        let bytes = encode_frame(b"x", 1, 2, 3, Some(0), &[]).expect("fits");
        assert_eq!(decode_frame(&bytes).expect("decodes").version, Some(0));
    }

    #[test]
    fn an_empty_tag_round_trips() {
        let bytes = encode_frame(b"x", 1, 2, 3, None, &[Tag::from("")]).expect("fits");
        let f = decode_frame(&bytes).expect("decodes");
        assert_eq!(f.tags, vec![Tag::from("")]);
        assert_eq!(f.body, b"x");
    }

    #[test]
    fn every_truncation_of_the_head_and_tags_is_none() {
        let bytes = sample();
        // Up to the end of the tags a cut frame is incomplete; after it,
        // only the body is shorter (the body has no length of its own).
        let tags_end = bytes.len() - b"body bytes".len();
        for cut in 0..tags_end {
            assert!(
                decode_frame(&bytes[..cut]).is_none(),
                "a frame cut at {cut} of {tags_end} decoded"
            );
        }
        for cut in tags_end..=bytes.len() {
            let f = decode_frame(&bytes[..cut]).expect("the tags are whole");
            assert_eq!(f.body, &b"body bytes"[..cut - tags_end]);
        }
    }

    #[test]
    fn another_format_byte_is_none() {
        let mut bytes = sample();
        for format in [0u8, 2, 0x7f, 0xff] {
            bytes[0] = format;
            assert!(decode_frame(&bytes).is_none(), "format {format} decoded");
        }
    }

    #[test]
    fn a_tag_that_is_not_utf8_is_none() {
        let mut bytes = encode_frame(b"x", 1, 2, 3, None, &[Tag::from("ab")]).expect("fits");
        // The tag's bytes follow the head and their two-byte length.
        bytes[HEAD + 2] = 0xff;
        assert!(decode_frame(&bytes).is_none());
    }

    #[test]
    fn a_tag_count_or_length_past_the_end_is_none() {
        let mut bytes = encode_frame(b"", 1, 2, 3, None, &[Tag::from("ab")]).expect("fits");
        bytes[HEAD - 2..HEAD].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(decode_frame(&bytes).is_none());
        let mut bytes = encode_frame(b"", 1, 2, 3, None, &[Tag::from("ab")]).expect("fits");
        bytes[HEAD..HEAD + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(decode_frame(&bytes).is_none());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: every length up to 80, many
        // contents, some starting with the right format byte.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..80 {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if i == 0 && x.is_multiple_of(2) {
                            FORMAT
                        } else {
                            x as u8
                        }
                    })
                    .collect();
                let _ = decode_frame(&bytes);
            }
        }
    }
}
