//! The engine's crate-private parts, shared by the core cache, the HTTP
//! cache and the gRPC cache: single-flight ([`flight`]), the invalidation
//! log ([`log`]), the striped counters ([`stats`]), the hot-key sketch
//! ([`hot`], whose [`HotKey`](hot::HotKey) is public) and the clock
//! ([`clock`], whose types are public through [`crate::cache`]).

pub(crate) mod clock;
pub(crate) mod flight;
pub(crate) mod hot;
pub(crate) mod log;
pub(crate) mod stats;
