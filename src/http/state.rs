//! The state every clone of one HTTP cache shares: the core's engine
//! (a [`Store`], the [`InvalidationLog`], single-flight, stats, the shared
//! tier and its [`Gate`]) holding the HTTP cache's values, plus the
//! HTTP-specific parts of a lookup (the key, `Vary` selection).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderMap;

use super::cache_control::RequestDirectives;
use super::config::{HttpConfig, MAX_TAGS};
use super::freshness::HttpCachePolicy;
use super::stored::{Stored, StoredVariants, VaryValues};
use crate::cache::engine::flight::Flights;
use crate::cache::engine::log::{InvalidateTarget, InvalidationLog};
use crate::cache::engine::stats::{Kind, Stats};
use crate::cache::remote::{Gate, LinkTarget, RemoteEntry, RemoteTier};
use crate::cache::{
    CacheStats, Capacity, Clock, Entry, Hashed, Instant, KeyHasher, MokaStore, Store, Tag,
};
use crate::cache::{Deadlines, Invalidation};

/// At most this many variants under one key (the oldest go first).
const MAX_VARIANTS: usize = 16;

type HttpEntry = Entry<StoredVariants, ()>;

/// The HTTP cache's store: the core's moka store (default) or quick_cache
/// one, weighed in bytes.
pub(crate) enum HttpStore {
    Moka(MokaStore<String, StoredVariants, ()>),
    #[cfg(feature = "quick-cache")]
    Quick(crate::cache::QuickStore<String, StoredVariants, ()>),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            HttpStore::Moka($s) => $e,
            #[cfg(feature = "quick-cache")]
            HttpStore::Quick($s) => $e,
        }
    };
}

impl Store for HttpStore {
    type Key = String;
    type Response = StoredVariants;
    type Error = ();

    #[inline]
    fn get(&self, key: &Hashed<String>) -> Option<Arc<HttpEntry>> {
        each!(self, s => s.get(key))
    }
    #[inline]
    fn with_entry<T>(
        &self,
        key: &Hashed<String>,
        f: impl FnOnce(&Arc<HttpEntry>) -> T,
    ) -> Option<T> {
        each!(self, s => s.with_entry(key, f))
    }
    fn insert(&self, key: Hashed<String>, entry: Arc<HttpEntry>) {
        each!(self, s => s.insert(key, entry));
    }
    fn remove(&self, key: &Hashed<String>) {
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

/// Which store an HTTP cache is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Moka,
    #[cfg(feature = "quick-cache")]
    Quick,
}

impl HttpStore {
    /// Calls `f` on every stored entry: a walk of the whole store.
    pub(crate) fn for_each_entry(&self, f: impl FnMut(&Hashed<String>, &Arc<HttpEntry>)) {
        each!(self, s => s.for_each_entry(f));
    }

    fn new(kind: StoreKind, max_bytes: u64) -> Self {
        let capacity = Capacity::Weight(max_bytes);
        match kind {
            StoreKind::Moka => Self::Moka(MokaStore::new(capacity)),
            #[cfg(feature = "quick-cache")]
            StoreKind::Quick => Self::Quick(crate::cache::QuickStore::new(capacity)),
        }
    }
}

pub(crate) struct HttpShared {
    pub(crate) store: HttpStore,
    pub(crate) config: HttpConfig,
    pub(crate) rules: HttpCachePolicy,
    pub(crate) clock: Clock,
    pub(crate) log: InvalidationLog<String>,
    pub(crate) flights: Arc<Flights<String, StoredVariants, ()>>,
    pub(crate) stats: Stats,
    /// The shared tier, attached after build.
    pub(crate) remote: OnceLock<Arc<dyn RemoteTier<String, StoredVariants>>>,
    pub(crate) gate: Gate,
    /// Cancelled when the last layer or service handle goes.
    pub(crate) closed: tokio_util::sync::CancellationToken,
}

impl HttpShared {
    pub(crate) fn new(config: HttpConfig, clock: Clock, kind: StoreKind) -> Self {
        let rules = config.rules.clone();
        Self {
            store: HttpStore::new(kind, config.max_bytes),
            log: InvalidationLog::new(KeyHasher::new(), 100_000),
            config,
            rules,
            clock,
            flights: Arc::new(Flights::new()),
            stats: Stats::new(),
            remote: OnceLock::new(),
            gate: Gate::new(),
            closed: tokio_util::sync::CancellationToken::new(),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.store.run_pending_tasks();
        self.stats
            .snapshot(self.store.evictions(), self.store.entry_count())
    }

    #[inline]
    pub(crate) fn hashed(&self, key: String) -> Hashed<String> {
        self.log.hasher.hashed(key)
    }

    /// The entry for `key` this instance may serve from now: trusted (the
    /// shared tier's heartbeats), not invalidated (an invalidated one is
    /// removed). The hit path: one store lookup and a few atomic loads.
    #[inline]
    pub(crate) fn entry(&self, key: &Hashed<String>, now: Instant) -> Option<Arc<HttpEntry>> {
        if !self.gate.trusted_at(now) {
            self.stats.incr(Kind::Isolated);
            return None;
        }
        self.valid_entry(key)
    }

    /// The entry for `key` unless it was invalidated (then it is removed).
    #[inline]
    fn valid_entry(&self, key: &Hashed<String>) -> Option<Arc<HttpEntry>> {
        let entry = self.store.get(key)?;
        if self.log.still_valid(&entry) {
            Some(entry)
        } else {
            self.store.remove(key);
            None
        }
    }

    /// Stores a response unless an invalidation of its key or tags happened
    /// since `fill_seq`. It takes the place of the variant with its own
    /// `Vary` values and, after a 304 changed them, of the variant it was
    /// merged into (`replaces`); the other variants stay if they are still
    /// valid.
    pub(crate) fn insert(
        &self,
        key: &Hashed<String>,
        stored: Arc<Stored>,
        fill_seq: u64,
        replaces: Option<&VaryValues>,
    ) -> Option<Arc<HttpEntry>> {
        if !self
            .log
            .may_store(key, &stored.tags, fill_seq, stored.stamp)
        {
            self.stats.incr(Kind::NotStored);
            return None;
        }
        let now = self.clock.now();
        // Only variants this instance could serve now are carried over:
        // one invalidated since it was stored must not come back under
        // this fill's (newer) sequence number.
        let old = if self.gate.trusted_at(now) {
            self.valid_entry(key)
        } else {
            None
        };
        let mut variants: Vec<Arc<Stored>> = old
            .iter()
            .filter_map(|e| e.response())
            .flat_map(|v| v.0.iter())
            .filter(|s| s.vary != stored.vary && Some(&s.vary) != replaces)
            .cloned()
            .collect();
        variants.insert(0, stored);
        variants.truncate(MAX_VARIANTS);
        self.store_variants(key, variants, fill_seq, &[])
    }

    /// Stores `variants` under `key` as one entry (the core's rule: check,
    /// insert, check again; see `cache::invalidate`). The first variant is
    /// the one the caller filled: when an invalidation at a version above
    /// its stamp keeps it out, nothing is stored; another variant kept out
    /// that way is dropped.
    pub(crate) fn store_variants(
        &self,
        key: &Hashed<String>,
        mut variants: Vec<Arc<Stored>>,
        fill_seq: u64,
        extra_tags: &[Tag],
    ) -> Option<Arc<HttpEntry>> {
        let versions_allow = |s: &Arc<Stored>| {
            s.stamp.is_none() || self.log.may_store(key, &s.tags, fill_seq, s.stamp)
        };
        if !variants.first().is_some_and(versions_allow) {
            self.stats.incr(Kind::NotStored);
            return None;
        }
        variants.retain(versions_allow);
        let mut tags: Vec<Tag> = variants
            .iter()
            .flat_map(|s| s.tags.iter().cloned())
            .chain(extra_tags.iter().cloned())
            // A custom key with extra parts: its URL as a tag, so that
            // invalidating the URL reaches every such key.
            .chain(super::custom_key::base_of(key.key()).map(Tag::from))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        if !self.log.may_store(key, &tags, fill_seq, None) {
            self.stats.incr(Kind::NotStored);
            return None;
        }
        let weight = variants
            .iter()
            .map(|s| s.weight())
            .fold(0u32, u32::saturating_add);
        let now = self.clock.now();
        // Freshness is per variant (RFC 9111, checked on every hit); the
        // entry itself is kept until it is evicted, replaced or invalidated.
        let never = Instant::from_nanos(u64::MAX);
        let at = Deadlines {
            stored_at: now,
            early_from: never,
            fresh_until: never,
            stale_until: never,
            error_until: never,
        };
        let version = variants.first().and_then(|s| s.stamp);
        let entry = Arc::new(Entry::new(
            Ok(StoredVariants(variants.into())),
            at,
            fill_seq,
            Duration::ZERO,
            version,
            tags.into_boxed_slice(),
            weight.max(1),
        ));
        self.store.insert(key.clone(), Arc::clone(&entry));
        // Insert, then check again: an invalidation that marked in between
        // either sees our entry (and removes it) or is seen here.
        if !self.log.may_store(key, &entry.tags, fill_seq, None) {
            self.store.remove(key);
            self.stats.incr(Kind::NotStored);
            return None;
        }
        entry.confirmed.store(true, Ordering::Release);
        self.stats.incr(Kind::Stored);
        Some(entry)
    }

    /// Drops every stored variant of a key on this instance (a response
    /// that replaced them may not be kept).
    pub(crate) fn forget(&self, key: &Hashed<String>) {
        // Here only: a client can trigger this (a request that made the
        // origin answer per-user), and a fleet-wide invalidation per such
        // request would let any client flood Redis and every instance.
        // What the tier holds was shared under the rules and stays valid.
        self.store.remove(key);
    }

    /// The version the request's token asks for (see
    /// [`request_version`](super::HttpCacheLayerBuilder::request_version)).
    #[inline]
    pub(crate) fn request_version(&self, headers: &HeaderMap) -> Option<u64> {
        self.config
            .request_version
            .as_ref()
            .and_then(|f| (f.0)(headers))
    }

    pub(crate) fn request_directives(&self, headers: &HeaderMap) -> RequestDirectives {
        let mut d = RequestDirectives::from_headers(headers);
        let honour = &self.config.honour;
        if !honour.no_cache {
            d.no_cache = false;
        }
        if !honour.no_store {
            d.no_store = false;
        }
        if !honour.max_age {
            d.max_age = None;
        }
        if !honour.max_stale {
            d.max_stale = None;
        }
        if !honour.min_fresh {
            d.min_fresh = None;
        }
        if !honour.only_if_cached {
            d.only_if_cached = false;
        }
        d
    }

    /// Marks and removes locally; returns the invalidation's sequence number.
    fn apply_local(&self, what: Invalidation<String>, version: u64) -> u64 {
        self.stats.incr(Kind::Invalidations);
        match what {
            Invalidation::Key(key) => {
                let key = self.hashed(key);
                // Mark first, remove second (see `cache::invalidate`).
                let seq = self.log.mark_key(key.clone(), version);
                self.store.remove(&key);
                seq
            }
            Invalidation::Tag(tag) => self.log.mark_tag(tag, version),
            Invalidation::All => {
                let seq = self.log.mark_all(version);
                self.store.clear();
                seq
            }
        }
    }

    /// The shared tier's entry for `key`, stored here (unless an
    /// invalidation since `fill_seq` keeps it out) and returned. The
    /// codec re-checked every variant's sharing rules and carried its age
    /// over (see `http::remote`); freshness is checked by the caller.
    pub(crate) async fn fill_from_remote(
        &self,
        tier: &dyn RemoteTier<String, StoredVariants>,
        key: &Hashed<String>,
        fill_seq: u64,
    ) -> Option<Arc<HttpEntry>> {
        if !self.gate.remote_usable(self.clock.now()) {
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        // Read before the round trip: what was applied by then is in the
        // tier's answer; anything later may not be.
        let applied = self.gate.applied_seq();
        let found = tier.get(key.key()).await?;
        if found.tags.len() > MAX_TAGS * MAX_VARIANTS {
            // More than this cache ever writes: not a value of ours.
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        let mut variants: Vec<Arc<Stored>> = found.response.0.iter().cloned().collect();
        // Local variants the tier's set does not have stay (when they are
        // still valid here), after the tier's.
        let now = self.clock.now();
        if self.gate.trusted_at(now)
            && let Some(local) = self.valid_entry(key)
            && let Some(local) = local.response()
        {
            for s in local.0.iter() {
                if !variants.iter().any(|v| v.vary == s.vary) {
                    variants.push(Arc::clone(s));
                }
            }
            variants.truncate(MAX_VARIANTS);
        }
        let mut tags: Vec<Tag> = variants
            .iter()
            .flat_map(|s| s.tags.iter().cloned())
            .chain(found.tags.iter().cloned())
            .chain(super::custom_key::base_of(key.key()).map(Tag::from))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        if self.gate.pending_after(applied) && self.log.newest_touching(key, &tags) > applied {
            // The tier may still hold what a local invalidation removed.
            self.stats.incr(Kind::RemoteFenced);
            return None;
        }
        let Some(entry) = self.store_variants(key, variants, fill_seq, &found.tags) else {
            self.stats.incr(Kind::RemoteFenced);
            return None;
        };
        self.stats.incr(Kind::RemoteHits);
        Some(entry)
    }

    /// What the shared tier gets for a fill: the variant the fill fetched
    /// (the first of the entry) alone, `None` when it is not fresh. Never
    /// the other variants this instance holds: they were read before the
    /// fill's lease, so an invalidation this instance has not heard of yet
    /// may have removed them everywhere else, and writing them back under
    /// the new lease would bring them back for every instance. The tier
    /// keeps one variant per URL (the last one filled); others fill on
    /// their own. A variant that varies on credentials (`Authorization`,
    /// `Proxy-Authorization`, `Cookie`) is not shared: `None`.
    pub(crate) fn remote_entry(
        &self,
        key: &str,
        entry: &HttpEntry,
    ) -> Option<RemoteEntry<StoredVariants>> {
        let fetched = entry.response()?.0.first()?;
        // A response that varies on credentials stays here: its `Vary`
        // values would be written to Redis in the clear.
        let secrets = [
            http::header::AUTHORIZATION,
            http::header::PROXY_AUTHORIZATION,
            http::header::COOKIE,
        ];
        if fetched.vary.iter().any(|(name, _)| secrets.contains(name)) {
            return None;
        }
        let fresh_for = fetched.fresh_for(self.clock.now());
        if fresh_for.is_zero() {
            return None;
        }
        let secs = |v: Option<u64>| Duration::from_secs(v.unwrap_or(0));
        let mut remote =
            RemoteEntry::new(StoredVariants(vec![Arc::clone(fetched)].into()), fresh_for);
        remote.stale_while_revalidate = secs(fetched.cc.stale_while_revalidate);
        remote.stale_if_error = secs(fetched.cc.stale_if_error);
        remote.tags = fetched.tags.to_vec();
        // A custom key with parts: its URL too, so that invalidating the
        // URL on any instance reaches this value in the tier.
        if let Some(url) = super::custom_key::base_of(key) {
            remote.tags.push(Tag::from(url));
        }
        remote.version = fetched.stamp;
        Some(remote)
    }
}

impl InvalidateTarget<String> for HttpShared {
    fn invalidate(&self, what: Invalidation<String>, version: u64) {
        let Some(tier) = self.remote.get() else {
            self.apply_local(what, version);
            return;
        };
        // Mark and queue under one lock: the tier gets this instance's
        // invalidations in sequence order, and before this returns the
        // invalidation is queued, so the L2 read path sees it pending.
        let _order = self.gate.order();
        let seq = self.apply_local(what.clone(), version);
        self.gate.queued(seq);
        tier.invalidate(seq, what, (version != 0).then_some(version));
    }
    fn shared_gate(&self) -> Option<&crate::cache::remote::Gate> {
        self.remote.get().map(|_| &self.gate)
    }
}

impl LinkTarget<String> for HttpShared {
    fn apply_remote(&self, what: Invalidation<String>, version: u64) {
        self.stats
            .incr_rare(crate::cache::engine::stats::Rare::RemoteInvalidations);
        self.apply_local(what, version);
    }

    fn applied(&self, seq: u64) {
        self.gate.applied(seq);
    }

    fn isolate(&self, ttl: Duration) {
        self.gate.isolate(ttl);
    }

    fn heard(&self, sent_at: Instant) {
        self.gate.heard(sent_at, self.clock.now(), || {
            self.log.mark_all(0);
            self.store.clear();
        });
    }

    fn lost(&self) {
        self.gate.lost();
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }
}
