//! Keys hashed once: the hash travels with the key, and the stores use a
//! pass-through hasher instead of hashing again.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

/// A cache key with its hash, computed once by the cache's [`KeyHasher`].
///
/// Equality compares the hash first and then the whole key: two keys whose
/// hashes collide are still two entries, so a collision can never serve one
/// request's response to another.
#[derive(Clone)]
pub struct Hashed<K> {
    hash: u64,
    key: K,
}

impl<K> Hashed<K> {
    /// The precomputed hash.
    #[inline]
    pub fn hash_value(&self) -> u64 {
        self.hash
    }

    /// The key itself.
    #[inline]
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Gives the key back.
    pub fn into_key(self) -> K {
        self.key
    }

    /// A key with an explicit hash (for tests of collisions, and stores
    /// that rebuild keys); the hash must come from the same [`KeyHasher`].
    pub fn from_parts(hash: u64, key: K) -> Self {
        Self { hash, key }
    }
}

impl<K: fmt::Debug> fmt::Debug for Hashed<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hashed")
            .field("hash", &format_args!("{:#018x}", self.hash))
            .field("key", &self.key)
            .finish()
    }
}

impl<K> Hash for Hashed<K> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl<K: PartialEq> PartialEq for Hashed<K> {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq> Eq for Hashed<K> {}

/// The hasher the cache hashes keys with: foldhash, seeded randomly per
/// cache so that keys chosen by clients cannot be crafted to collide across
/// processes.
#[derive(Clone, Default)]
pub struct KeyHasher(foldhash::fast::RandomState);

impl KeyHasher {
    /// A randomly seeded hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes `key` and keeps the hash with it.
    #[inline]
    pub fn hashed<K: Hash>(&self, key: K) -> Hashed<K> {
        Hashed {
            hash: self.0.hash_one(&key),
            key,
        }
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(foldhash)")
    }
}

/// A [`BuildHasher`] for maps keyed by [`Hashed`]: it passes the stored hash
/// through instead of hashing again.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    #[inline]
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

/// The hasher of [`PassThrough`]: `write_u64` sets the hash; other writes
/// (which [`Hashed`] never makes) are folded in so that it still works as a
/// hasher for anything else.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(5) ^ n;
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_hashes_do_not_make_equal_keys() {
        let a = Hashed::from_parts(42, "alice");
        let b = Hashed::from_parts(42, "bob");
        assert_ne!(a, b);
        assert_eq!(a, Hashed::from_parts(42, "alice"));
    }

    #[test]
    fn pass_through_keeps_the_hash() {
        let hasher = KeyHasher::new();
        let key = hasher.hashed("k");
        assert_eq!(PassThrough.hash_one(&key), key.hash_value());
    }
}
