//! The slot of a shard key: CRC-32 (ISO-HDLC, the zlib/PNG polynomial) of
//! the key's bytes, modulo the slot count.
//!
//! The function is written out here (a 256-entry table built at compile
//! time), so no crate upgrade can move a key: the values in the tests are
//! pinned. Keys are turned into bytes by [`ShardKey`]:
//!
//! | key type | bytes |
//! |---|---|
//! | `i64` (and `i32`, `i16` widened to `i64`) | 8 bytes, big-endian two's complement |
//! | `u64` | 8 bytes, big-endian |
//! | `str`, `String` | the UTF-8 bytes, no terminator, no normalisation |
//! | `[u8]`, `Vec<u8>` | as is |
//!
//! So `7i32` and `7i64` share a slot, and the text `"7"` does not.

/// The default number of slots (fixed for the life of the data).
pub const DEFAULT_SLOTS: u16 = 4096;

/// The most slots a map may have (slot numbers fit PostgreSQL's `int4`
/// and Rust's `u16`).
pub const MAX_SLOTS: u16 = 16384;

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32/ISO-HDLC of `bytes` (`crc32("123456789") == 0xCBF43926`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A value that can be a shard key: its stable byte form (see the module
/// docs for each type's). Implement it for your own key types by writing
/// the bytes of one of the documented forms.
pub trait ShardKey {
    /// Passes the key's bytes to `f`.
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R;
}

impl ShardKey for i64 {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.to_be_bytes())
    }
}

impl ShardKey for i32 {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        i64::from(*self).with_bytes(f)
    }
}

impl ShardKey for i16 {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        i64::from(*self).with_bytes(f)
    }
}

impl ShardKey for u64 {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.to_be_bytes())
    }
}

impl ShardKey for str {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(self.as_bytes())
    }
}

impl ShardKey for String {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(self.as_bytes())
    }
}

impl ShardKey for [u8] {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(self)
    }
}

impl ShardKey for Vec<u8> {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(self)
    }
}

impl<T: ShardKey + ?Sized> ShardKey for &T {
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        (**self).with_bytes(f)
    }
}

/// The slot of `key` among `slots` slots (`slots` of 0 is taken as 1).
///
/// ```
/// use tower_scale::shard::{slot_of, DEFAULT_SLOTS};
/// assert_eq!(slot_of(&42i64, DEFAULT_SLOTS), slot_of(&42i32, DEFAULT_SLOTS));
/// assert!(slot_of("user:ada", DEFAULT_SLOTS) < DEFAULT_SLOTS);
/// ```
pub fn slot_of<K: ShardKey + ?Sized>(key: &K, slots: u16) -> u16 {
    let n = u32::from(slots.max(1));
    key.with_bytes(|b| (crc32(b) % n) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn integer_widths_agree() {
        for k in [-5i64, 0, 1, 1 << 40] {
            if let Ok(k32) = i32::try_from(k) {
                assert_eq!(slot_of(&k, DEFAULT_SLOTS), slot_of(&k32, DEFAULT_SLOTS));
            }
        }
        assert_eq!(slot_of(&7u64, 4096), slot_of(&7i64, 4096));
    }
}
