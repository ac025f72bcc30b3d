//! The change feed (feature `change-feed`): every committed write on the
//! primary, read from its logical replication stream, invalidates the
//! caches it feeds.

#![allow(dead_code)]

mod pgoutput;
pub mod tags;

pub use tags::Change;
