//! The messages on the invalidation channel: the sending instance, the
//! invalidation's version, a kind byte, then the payload (the key's
//! bytes, the tag, nothing, or a heartbeat's send time).

/// An invalidation of a key; the payload is the codec's key bytes.
pub(super) const MSG_KEY: u8 = 0;
/// An invalidation of a tag; the payload is the tag.
pub(super) const MSG_TAG: u8 = 1;
/// An invalidation of everything; no payload.
pub(super) const MSG_ALL: u8 = 2;
/// A heartbeat; the payload is its sender's clock time (nanoseconds).
pub(super) const MSG_HEARTBEAT: u8 = 3;

/// A message as it goes on the channel.
pub(super) fn encode(instance: u64, kind: u8, version: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + payload.len());
    out.extend_from_slice(&instance.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// A message read from the channel.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Message<'a> {
    /// The instance that sent it.
    pub(super) from: u64,
    pub(super) version: u64,
    pub(super) kind: u8,
    pub(super) payload: &'a [u8],
}

/// The message in `bytes`; `None` if they are too short for its head.
pub(super) fn decode(bytes: &[u8]) -> Option<Message<'_>> {
    let (Some(from), Some(version), Some(&kind)) = (
        bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        bytes.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        bytes.get(16),
    ) else {
        return None;
    };
    Some(Message {
        from: u64::from_be_bytes(from),
        version: u64::from_be_bytes(version),
        kind,
        payload: bytes.get(17..).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips() {
        let bytes = encode(7, MSG_TAG, 42, b"users");
        assert_eq!(
            decode(&bytes),
            Some(Message {
                from: 7,
                version: 42,
                kind: MSG_TAG,
                payload: b"users",
            })
        );
        let bytes = encode(u64::MAX, MSG_ALL, 0, &[]);
        let m = decode(&bytes).expect("decodes");
        assert_eq!((m.from, m.kind, m.payload), (u64::MAX, MSG_ALL, &[][..]));
    }

    #[test]
    fn a_message_shorter_than_its_head_is_none() {
        let bytes = encode(1, MSG_KEY, 2, b"k");
        for cut in 0..17 {
            assert!(decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(decode(&bytes[..17]).expect("head only").payload, b"");
    }
}
