//! The codec a tier turns keys and responses into bytes with (the HTTP
//! cache brings its own: `HttpCacheLayer::redis_codec`).

/// Turns keys and responses into bytes and back.
pub trait RedisCodec<K, R>: Send + Sync + 'static {
    /// The key's bytes (part of the Redis key).
    fn encode_key(&self, key: &K) -> Vec<u8>;
    /// The key from its bytes (for invalidations from other instances).
    fn decode_key(&self, bytes: &[u8]) -> Option<K>;
    /// The response's bytes.
    fn encode(&self, response: &R) -> Vec<u8>;
    /// The response from its bytes; `None` if they do not decode.
    fn decode(&self, bytes: &[u8]) -> Option<R>;
}
