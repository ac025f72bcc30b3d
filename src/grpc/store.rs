//! The gRPC cache's store: the core's moka store (default) or its
//! quick_cache one, behind one type so the cache core, the service and the
//! future have one type whatever the builder chose.
//!
//! It keeps only entries the gRPC cache itself would make: tagged with
//! their method's path, without stale windows. A fill here always is; an
//! entry from the shared tier carries the tags and windows its frame in
//! Redis says, and one that is not (a frame without the method's tag would
//! escape `invalidate_tag(method)`) is served to the call that read it but
//! not kept.

use std::sync::Arc;

use super::fetch::{FetchFailed, Fetched};
use super::key::GrpcKey;
use super::layer::GrpcConfig;
use crate::cache::{Capacity, Entry, Hashed, MokaStore, Store};

type GrpcEntry = Entry<Fetched, FetchFailed>;

/// Which store a gRPC cache is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Moka,
    #[cfg(feature = "quick-cache")]
    Quick,
}

/// The store of the cache core: body-type free, so one core serves every
/// service the layer wraps.
pub(crate) struct GrpcStore {
    stores: Stores,
    config: Arc<GrpcConfig>,
}

enum Stores {
    Moka(MokaStore<GrpcKey, Fetched, FetchFailed>),
    #[cfg(feature = "quick-cache")]
    Quick(crate::cache::QuickStore<GrpcKey, Fetched, FetchFailed>),
}

impl GrpcStore {
    pub(crate) fn new(kind: StoreKind, capacity: Capacity, config: Arc<GrpcConfig>) -> Self {
        let stores = match kind {
            StoreKind::Moka => Stores::Moka(MokaStore::new(capacity)),
            #[cfg(feature = "quick-cache")]
            StoreKind::Quick => Stores::Quick(crate::cache::QuickStore::new(capacity)),
        };
        Self { stores, config }
    }

    /// Whether `entry` is one this cache would make for `key`: tagged with
    /// the key's method, no stale windows.
    fn keeps(&self, key: &GrpcKey, entry: &GrpcEntry) -> bool {
        let Some((_, tag)) = self.config.method(key.path()) else {
            return false;
        };
        entry.tags.contains(tag)
            && entry.stale_until <= entry.fresh_until
            && entry.error_until <= entry.fresh_until
    }
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match &$self.stores {
            Stores::Moka($s) => $e,
            #[cfg(feature = "quick-cache")]
            Stores::Quick($s) => $e,
        }
    };
}

impl Store for GrpcStore {
    type Key = GrpcKey;
    type Response = Fetched;
    type Error = FetchFailed;

    #[inline]
    fn get(&self, key: &Hashed<GrpcKey>) -> Option<Arc<GrpcEntry>> {
        each!(self, s => s.get(key))
    }
    /// Keeps only what [`keeps`](GrpcStore::keeps) allows (a store may
    /// drop any entry; the call that filled it is answered all the same).
    fn insert(&self, key: Hashed<GrpcKey>, entry: Arc<GrpcEntry>) {
        if self.keeps(key.key(), &entry) {
            each!(self, s => s.insert(key, entry));
        }
    }
    fn remove(&self, key: &Hashed<GrpcKey>) {
        each!(self, s => s.remove(key));
    }
    fn clear(&self) {
        each!(self, s => s.clear());
    }
    fn entry_count(&self) -> u64 {
        each!(self, s => s.entry_count())
    }
    fn evictions(&self) -> u64 {
        each!(self, s => s.evictions())
    }
    fn run_pending_tasks(&self) {
        each!(self, s => s.run_pending_tasks());
    }
}
