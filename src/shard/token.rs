//! Consistency tokens across shards: the commit LSN of each shard written,
//! capped, with the map version the writes were routed by.
//!
//! Encoded (`base64url`, no padding) as `version 2 | cluster (8) | issued
//! (8) | map version (8) | flags (1) | n (1) | n × (shard id (8), LSN (8))
//! | HMAC-SHA256 (16)`, signed and checked by a [`TokenCodec`] (same keys,
//! rotation, lifetime and identity rules as a single cluster's tokens; a
//! single cluster's token never decodes as a sharded one and back). At
//! most [`MAX_TOKEN_SHARDS`] shards are carried: 228 characters at most,
//! far below a cookie's 4 KB. When a token would hold more, the shards
//! with the lowest LSNs are dropped and the token is marked *overflowed*:
//! for its lifetime, reads presenting it on a shard it does not list go to
//! that shard's primary (the unknown token), so it never claims less than
//! the writes it stands for.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::pg::{Consistency, ConsistencyToken, Lsn, TokenCodec, cluster_identity};

/// The most shards a [`ShardedToken`] lists.
pub const MAX_TOKEN_SHARDS: usize = 8;

const VERSION: u8 = 2;
const HEADER: usize = 1 + 8 + 8 + 8 + 1 + 1;
const ENTRY: usize = 16;
const MAC: usize = 16;
const FLAG_OVERFLOW: u8 = 1;
/// The longest encoded token.
pub const MAX_TOKEN_LEN: usize = (HEADER + MAX_TOKEN_SHARDS * ENTRY + MAC).div_ceil(3) * 4;

/// The id a shard has in tokens: [`cluster_identity`] of its name.
pub fn shard_id(name: &str) -> u64 {
    cluster_identity(name)
}

/// What reads must see across shards: per shard, the position of the
/// writes made with it (see the module docs of `shard::token`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ShardedToken {
    map_version: u64,
    /// (shard id, token), sorted by shard id.
    entries: Vec<(u64, ConsistencyToken)>,
    overflow: bool,
}

impl ShardedToken {
    /// An empty token (no writes).
    pub fn new() -> Self {
        Self::default()
    }

    /// A token for one write on shard `shard_id` routed by map `map_version`.
    pub fn single(shard_id: u64, token: ConsistencyToken, map_version: u64) -> Self {
        Self {
            map_version,
            entries: vec![(shard_id, token)],
            overflow: false,
        }
    }

    /// Adds one shard's write (keeping the newer position per shard).
    pub fn add(&mut self, shard_id: u64, token: ConsistencyToken) {
        match self.entries.binary_search_by_key(&shard_id, |e| e.0) {
            Ok(i) => self.entries[i].1 = self.entries[i].1.max(token),
            Err(i) => self.entries.insert(i, (shard_id, token)),
        }
        self.cap();
    }

    /// Both tokens' writes.
    pub fn merge(&mut self, other: &ShardedToken) {
        self.map_version = self.map_version.max(other.map_version);
        self.overflow |= other.overflow;
        for &(id, token) in &other.entries {
            self.add(id, token);
        }
    }

    /// `later`'s writes over this token's, where `later` answers a request
    /// that presented this token (its writes were made after this token's
    /// were acknowledged or abandoned): on the shards `later` lists, its
    /// position replaces this token's, also an
    /// [unknown](ConsistencyToken::unknown) one (a commit whose answer was
    /// lost: a write acknowledged on the same primary afterwards has the
    /// later position); the other shards keep theirs. This is how a
    /// single cluster's cookie works: a write's token replaces it.
    /// [`merge`](Self::merge) keeps the higher position, so an unknown
    /// one would send that shard's reads to its primary for the token's
    /// lifetime.
    ///
    /// ```
    /// use tower_scale::pg::{ConsistencyToken, Lsn};
    /// use tower_scale::shard::{ShardedToken, shard_id};
    ///
    /// let one = shard_id("shard-1");
    /// let mut cookie = ShardedToken::single(one, ConsistencyToken::unknown(), 1);
    /// let written = ShardedToken::single(one, ConsistencyToken::new(Lsn(500)), 1);
    /// cookie.followed_by(&written);
    /// assert_eq!(cookie.shards(), &[(one, ConsistencyToken::new(Lsn(500)))]);
    /// ```
    pub fn followed_by(&mut self, later: &ShardedToken) {
        self.map_version = self.map_version.max(later.map_version);
        self.overflow |= later.overflow;
        for &(id, token) in &later.entries {
            match self.entries.binary_search_by_key(&id, |e| e.0) {
                Ok(i) => self.entries[i].1 = token,
                Err(i) => self.entries.insert(i, (id, token)),
            }
        }
        self.cap();
    }

    fn cap(&mut self) {
        while self.entries.len() > MAX_TOKEN_SHARDS {
            // Drop the lowest position: its shard's reads go to the primary.
            if let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].1) {
                self.entries.remove(i);
            }
            self.overflow = true;
        }
    }

    /// The map version the writes were routed by: an instance with an
    /// older map refreshes it before routing a read that presents this.
    pub fn map_version(&self) -> u64 {
        self.map_version
    }

    /// The shards listed, with their positions.
    pub fn shards(&self) -> &[(u64, ConsistencyToken)] {
        &self.entries
    }

    /// True if shards were dropped for the cap: reads on any unlisted
    /// shard go to its primary.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// The consistency a read on shard `shard_id` needs: read-your-writes
    /// at its position if listed; the primary if the token overflowed; any
    /// replica otherwise (nothing was written there).
    pub fn for_shard(&self, shard_id: u64) -> Consistency {
        match self.entries.binary_search_by_key(&shard_id, |e| e.0) {
            Ok(i) => Consistency::ReadYourWrites(self.entries[i].1),
            Err(_) if self.overflow => Consistency::ReadYourWrites(ConsistencyToken::unknown()),
            Err(_) => Consistency::Any,
        }
    }
}

/// How fresh a routed read must be, across shards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShardConsistency {
    /// The owning shard's primary.
    Strong,
    /// See the writes of this token (per shard, see [`ShardedToken::for_shard`]).
    ReadYourWrites(ShardedToken),
    /// A replica within the bound, else the primary.
    BoundedStaleness(std::time::Duration),
    /// Any healthy replica within the lag budget, else the primary.
    Any,
}

impl ShardConsistency {
    /// The consistency on one shard.
    pub fn on_shard(&self, shard_id: u64) -> Consistency {
        match self {
            Self::Strong => Consistency::Strong,
            Self::ReadYourWrites(t) => t.for_shard(shard_id),
            Self::BoundedStaleness(d) => Consistency::BoundedStaleness(*d),
            Self::Any => Consistency::Any,
        }
    }

    pub(crate) fn map_version(&self) -> u64 {
        match self {
            Self::ReadYourWrites(t) => t.map_version,
            _ => 0,
        }
    }
}

/// Encodes and decodes [`ShardedToken`]s with a [`TokenCodec`] (bound to
/// the sharded cluster's identity, [`ShardedCluster::identity`](super::ShardedCluster::identity)).
///
/// ```
/// use tower_scale::pg::{ConsistencyToken, Lsn, TokenCodec};
/// use tower_scale::shard::{ShardedToken, ShardedTokenCodec, shard_id};
///
/// let codec = ShardedTokenCodec::new(TokenCodec::new(b"0123456789abcdef0123456789abcdef", 7)?);
/// let mut token = ShardedToken::single(shard_id("shard-1"), ConsistencyToken::new(Lsn(10)), 3);
/// token.add(shard_id("shard-2"), ConsistencyToken::new(Lsn(20)));
/// let text = codec.encode(&token);
/// assert_eq!(codec.decode(&text), Some(token));
/// assert_eq!(codec.decode("garbage"), None);
/// # Ok::<(), tower_scale::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ShardedTokenCodec {
    codec: TokenCodec,
}

impl ShardedTokenCodec {
    /// Wraps a codec (its keys, lifetime and cluster identity).
    pub fn new(codec: TokenCodec) -> Self {
        Self { codec }
    }

    /// Encodes `token`, issued now.
    pub fn encode(&self, token: &ShardedToken) -> String {
        self.encode_at(token, SystemTime::now())
    }

    /// Encodes `token` as issued at `now`.
    pub fn encode_at(&self, token: &ShardedToken, now: SystemTime) -> String {
        let issued = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let n = token.entries.len().min(MAX_TOKEN_SHARDS);
        let mut bytes = Vec::with_capacity(HEADER + n * ENTRY + MAC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.codec.cluster().to_be_bytes());
        bytes.extend_from_slice(&issued.to_be_bytes());
        bytes.extend_from_slice(&token.map_version.to_be_bytes());
        bytes.push(if token.overflow { FLAG_OVERFLOW } else { 0 });
        bytes.push(n as u8);
        for (id, t) in token.entries.iter().take(n) {
            bytes.extend_from_slice(&id.to_be_bytes());
            bytes.extend_from_slice(&t.lsn().0.to_be_bytes());
        }
        self.codec.sign(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The token in `text`, or `None` if it is not a valid, current token
    /// of this cluster signed with a known key (never an error).
    pub fn decode(&self, text: &str) -> Option<ShardedToken> {
        self.decode_at(text, SystemTime::now())
    }

    /// Like [`decode`](Self::decode), at a given time.
    pub fn decode_at(&self, text: &str, now: SystemTime) -> Option<ShardedToken> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return None; // cheap rejection of huge input
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() < HEADER + MAC || bytes[0] != VERSION {
            return None;
        }
        let n = usize::from(bytes[HEADER - 1]);
        if n > MAX_TOKEN_SHARDS || bytes.len() != HEADER + n * ENTRY + MAC {
            return None;
        }
        let payload = self.codec.verified(&bytes)?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&payload[i..i + 8]);
            u64::from_be_bytes(w)
        };
        if word(1) != self.codec.cluster() || !self.codec.fresh(word(9), now) {
            return None;
        }
        let flags = payload[HEADER - 2];
        if flags & !FLAG_OVERFLOW != 0 {
            return None;
        }
        let mut token = ShardedToken {
            map_version: word(17),
            entries: Vec::with_capacity(n),
            overflow: flags & FLAG_OVERFLOW != 0,
        };
        for i in 0..n {
            let at = HEADER + i * ENTRY;
            token.add(word(at), ConsistencyToken::new(Lsn(word(at + 8))));
        }
        Some(token)
    }
}
