//! The gRPC cache's store: the core's moka store (default) or its
//! quick_cache one, behind one type so the cache core, the service and the
//! future have one type whatever the builder chose.

use std::sync::Arc;

use super::fetch::{FetchFailed, Fetched};
use super::key::GrpcKey;
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
pub(crate) enum GrpcStore {
    Moka(MokaStore<GrpcKey, Fetched, FetchFailed>),
    #[cfg(feature = "quick-cache")]
    Quick(crate::cache::QuickStore<GrpcKey, Fetched, FetchFailed>),
}

impl GrpcStore {
    pub(crate) fn new(kind: StoreKind, capacity: Capacity) -> Self {
        match kind {
            StoreKind::Moka => Self::Moka(MokaStore::new(capacity)),
            #[cfg(feature = "quick-cache")]
            StoreKind::Quick => Self::Quick(crate::cache::QuickStore::new(capacity)),
        }
    }
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            GrpcStore::Moka($s) => $e,
            #[cfg(feature = "quick-cache")]
            GrpcStore::Quick($s) => $e,
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
    fn insert(&self, key: Hashed<GrpcKey>, entry: Arc<GrpcEntry>) {
        each!(self, s => s.insert(key, entry));
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
