//! Consistency tokens that travel with the client (cookies, headers, gRPC
//! metadata): authenticated, bound to one cluster, short-lived.
//!
//! A token is `base64url(version | cluster | lsn | issued_at | mac)`:
//! one version byte, the cluster's identity (8 bytes), the LSN (8), the
//! issue time in Unix seconds (8), and the first 16 bytes of an HMAC-SHA256
//! over the rest, 55 characters in all. Decoding never fails loudly: a token
//! that is the wrong length, malformed, signed with an unknown key, from
//! another cluster, expired, or issued in the future is ignored (`None`),
//! and the request gets the default consistency. Verification is constant
//! time ([`hmac::Mac::verify_truncated_left`]). Keys rotate: tokens are
//! signed with the current key and accepted with it or any previous one.
//! The unknown token ([`ConsistencyToken::unknown`], a commit whose position
//! could not be learned) travels as the highest LSN and comes back unknown:
//! the client's reads go to the primary until it expires.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::lsn::{ConsistencyToken, Lsn};
use crate::error::ConfigError;

const VERSION: u8 = 1;
const PAYLOAD: usize = 1 + 8 + 8 + 8;
const MAC: usize = 16;
/// The length of an encoded token.
pub const TOKEN_LEN: usize = (PAYLOAD + MAC).div_ceil(3) * 4 - 1;

/// A deterministic 64-bit identity for a cluster, from a name both app
/// instances agree on (for example the primary's address and database).
pub fn cluster_identity(name: &str) -> u64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(id)
}

/// Signs and checks consistency tokens.
///
/// Every instance serving the same clients must use the same key and
/// cluster identity; rotate by signing with a new key and accepting the
/// old one for a token lifetime.
///
/// ```
/// use std::time::Duration;
/// use tower_scale::pg::{ConsistencyToken, Lsn, TokenCodec, cluster_identity};
///
/// let cluster = cluster_identity("10.0.0.1:5432/app");
/// let codec = TokenCodec::new(b"0123456789abcdef0123456789abcdef", cluster)?
///     .max_age(Duration::from_secs(30));
/// let text = codec.encode(ConsistencyToken::new(Lsn(0x16_B374_D848)));
/// assert_eq!(codec.decode(&text), Some(ConsistencyToken::new(Lsn(0x16_B374_D848))));
/// // Tampered, foreign or garbage tokens are ignored, never an error.
/// assert_eq!(codec.decode("not a token"), None);
/// let other = TokenCodec::new(b"another key, at least 16 bytes", cluster)?;
/// assert_eq!(other.decode(&text), None);
/// // Rotation: sign with the new key, still accept the old one.
/// let rotated = TokenCodec::new(b"the next key, 32 bytes of random", cluster)?
///     .accept_previous(b"0123456789abcdef0123456789abcdef");
/// assert!(rotated.decode(&text).is_some());
/// # Ok::<(), tower_scale::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct TokenCodec {
    current: Vec<u8>,
    previous: Vec<Vec<u8>>,
    cluster: u64,
    max_age: Duration,
    skew: Duration,
}

impl fmt::Debug for TokenCodec {
    /// Never shows the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCodec")
            .field("keys", &(1 + self.previous.len()))
            .field("cluster", &format_args!("{:#018x}", self.cluster))
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl TokenCodec {
    /// A codec signing with `key` (at least 16 bytes; 32 random bytes
    /// recommended) for the cluster `cluster` (see [`cluster_identity`]).
    /// Tokens live 60 s by default.
    pub fn new(key: &[u8], cluster: u64) -> Result<Self, ConfigError> {
        if key.len() < 16 {
            return Err(ConfigError::OutOfRange {
                field: "token key",
                reason: format!("at least 16 bytes are needed, got {}", key.len()),
            });
        }
        Ok(Self {
            current: key.to_vec(),
            previous: Vec::new(),
            cluster,
            max_age: Duration::from_secs(60),
            skew: Duration::from_secs(5),
        })
    }

    /// Also accepts tokens signed with `key` (a key being rotated out).
    pub fn accept_previous(mut self, key: &[u8]) -> Self {
        self.previous.push(key.to_vec());
        self
    }

    /// How long a token is honoured (default 60 s).
    #[must_use]
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }

    /// How long a token lives.
    pub fn lifetime(&self) -> Duration {
        self.max_age
    }

    fn mac(key: &[u8], payload: &[u8]) -> Option<Hmac<Sha256>> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).ok()?;
        mac.update(payload);
        Some(mac)
    }

    /// The cluster identity tokens are bound to.
    #[cfg(feature = "shard")]
    pub(crate) fn cluster(&self) -> u64 {
        self.cluster
    }

    /// Appends the MAC of `bytes` (signed with the current key).
    #[cfg(feature = "shard")]
    pub(crate) fn sign(&self, bytes: &mut Vec<u8>) {
        if let Some(mac) = Self::mac(&self.current, bytes) {
            bytes.extend_from_slice(&mac.finalize().into_bytes()[..MAC]);
        }
    }

    /// The payload of `bytes` (payload then MAC) if a known key signed it.
    #[cfg(feature = "shard")]
    pub(crate) fn verified<'a>(&self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        let (payload, tag) = bytes.split_at_checked(bytes.len().checked_sub(MAC)?)?;
        std::iter::once(&self.current)
            .chain(&self.previous)
            .any(|key| {
                Self::mac(key, payload).is_some_and(|m| m.verify_truncated_left(tag).is_ok())
            })
            .then_some(payload)
    }

    /// True if a token issued at `issued` (Unix seconds) is current at `now`.
    #[cfg(feature = "shard")]
    pub(crate) fn fresh(&self, issued: u64, now: SystemTime) -> bool {
        let issued = UNIX_EPOCH + Duration::from_secs(issued);
        issued <= now + self.skew && now.duration_since(issued).unwrap_or_default() <= self.max_age
    }

    /// Encodes `token`, issued now.
    pub fn encode(&self, token: ConsistencyToken) -> String {
        self.encode_at(token, SystemTime::now())
    }

    /// Encodes `token` as issued at `now`.
    pub fn encode_at(&self, token: ConsistencyToken, now: SystemTime) -> String {
        let issued = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut bytes = Vec::with_capacity(PAYLOAD + MAC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.cluster.to_be_bytes());
        bytes.extend_from_slice(&token.lsn().0.to_be_bytes());
        bytes.extend_from_slice(&issued.to_be_bytes());
        if let Some(mac) = Self::mac(&self.current, &bytes) {
            bytes.extend_from_slice(&mac.finalize().into_bytes()[..MAC]);
        }
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The token in `text`, or `None` if it is not a valid, current token
    /// of this cluster signed with a known key.
    pub fn decode(&self, text: &str) -> Option<ConsistencyToken> {
        self.decode_at(text, SystemTime::now())
    }

    /// Like [`decode`](Self::decode), at a given time.
    pub fn decode_at(&self, text: &str, now: SystemTime) -> Option<ConsistencyToken> {
        let text = text.trim();
        if text.len() != TOKEN_LEN {
            return None; // cheap rejection of huge or truncated input
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() != PAYLOAD + MAC || bytes[0] != VERSION {
            return None;
        }
        let (payload, tag) = bytes.split_at(PAYLOAD);
        let signed = std::iter::once(&self.current)
            .chain(&self.previous)
            .any(|key| {
                Self::mac(key, payload).is_some_and(|m| m.verify_truncated_left(tag).is_ok())
            });
        if !signed {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&payload[i..i + 8]);
            u64::from_be_bytes(w)
        };
        if word(1) != self.cluster {
            return None;
        }
        let issued = UNIX_EPOCH + Duration::from_secs(word(17));
        let now_plus_skew = now + self.skew;
        if issued > now_plus_skew {
            return None; // from the future
        }
        if now.duration_since(issued).unwrap_or_default() > self.max_age {
            return None; // expired
        }
        Some(ConsistencyToken::new(Lsn(word(9))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn codec() -> TokenCodec {
        TokenCodec::new(KEY, cluster_identity("db-1:5432/app")).unwrap()
    }

    #[test]
    fn round_trip() {
        let t = ConsistencyToken::new(Lsn(0x16_B374_D848));
        let text = codec().encode(t);
        assert_eq!(text.len(), TOKEN_LEN);
        assert_eq!(codec().decode(&text), Some(t));
    }

    #[test]
    fn anything_invalid_is_ignored() {
        let c = codec();
        let t = ConsistencyToken::new(Lsn(42));
        let text = c.encode(t);
        let now = SystemTime::now();
        // Tampered: every single-character change is rejected.
        for i in 0..text.len() {
            let mut chars: Vec<char> = text.chars().collect();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let forged: String = chars.into_iter().collect();
            if forged != text {
                assert_eq!(c.decode(&forged), None, "position {i}");
            }
        }
        assert_eq!(c.decode(""), None);
        assert_eq!(c.decode(&"A".repeat(10_000)), None);
        assert_eq!(c.decode("not a token at all"), None);
        assert_eq!(c.decode(&"!".repeat(TOKEN_LEN)), None);
        // Another key, another cluster.
        let other_key = TokenCodec::new(
            b"fedcba9876543210fedcba9876543210",
            cluster_identity("db-1:5432/app"),
        )
        .unwrap();
        assert_eq!(other_key.decode(&text), None);
        let other_cluster = TokenCodec::new(KEY, cluster_identity("db-2:5432/app")).unwrap();
        assert_eq!(other_cluster.decode(&text), None);
        // Expired, and issued in the future.
        let old = c.encode_at(t, now - Duration::from_secs(61));
        assert_eq!(c.decode(&old), None);
        let future = c.encode_at(t, now + Duration::from_secs(3600));
        assert_eq!(c.decode(&future), None);
    }

    #[test]
    fn unknown_tokens_stay_unknown() {
        let c = codec();
        let text = c.encode(ConsistencyToken::unknown());
        assert_eq!(text.len(), TOKEN_LEN);
        let back = c.decode(&text).unwrap();
        assert!(back.is_unknown());
        let old = c.encode_at(
            ConsistencyToken::unknown(),
            SystemTime::now() - Duration::from_secs(61),
        );
        assert_eq!(c.decode(&old), None, "and expires like any token");
    }

    #[test]
    fn rotated_keys_are_accepted() {
        let old = codec();
        let token = old.encode(ConsistencyToken::new(Lsn(7)));
        let new = TokenCodec::new(
            b"a brand new key, 32 bytes long!!",
            cluster_identity("db-1:5432/app"),
        )
        .unwrap()
        .accept_previous(KEY);
        assert_eq!(new.decode(&token), Some(ConsistencyToken::new(Lsn(7))));
        let fresh = new.encode(ConsistencyToken::new(Lsn(8)));
        assert_eq!(
            old.decode(&fresh),
            None,
            "the old codec does not know the new key"
        );
        assert!(!format!("{new:?}").contains("brand"));
        assert!(TokenCodec::new(b"short", 1).is_err());
    }
}
