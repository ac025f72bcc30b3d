//! Invalidation by key, tag and everything, race-safe against fills in
//! flight.
//!
//! Every invalidation takes the next number of a sequence and leaves a mark
//! (for a key or a tag, with an optional version). A fill reads the sequence
//! before it calls the service; when it stores, it first inserts and then
//! checks whether a mark newer than its start (or a version above its stamp)
//! touches its key or tags, and removes what it inserted if so. The
//! invalidator marks first and removes second, so in every interleaving one
//! of the two sees the other: a fill that began before an invalidation never
//! survives it (the memcache-lease rule, without a round trip).
//!
//! Single-flight is fenced the same way: a flight records the sequence
//! number it began at, and a request that arrives after an invalidation
//! that may touch its key (a mark of the key, any tag mark — the fill's
//! tags are not known yet —, or everything) does not join it but starts a
//! new flight. An entry inserted by a fill is served to readers that saw a
//! newer invalidation only after the fill re-checked the log.
//!
//! Tags are invalidated in O(1): the mark is the whole work, and entries
//! compare their fill sequence against their tags' marks when they are next
//! read. That comparison is skipped entirely while no invalidation happened
//! since the entry was last checked (one atomic load on the hit path).
//!
//! Marks are kept up to a bound ([`CacheLayerBuilder::max_tracked_invalidations`]);
//! past it the oldest half is folded into a floor: entries and fills older
//! than the floor are treated as invalidated. That errs on the side of a
//! miss, never of a stale hit.
//!
//! [`CacheLayerBuilder::max_tracked_invalidations`]: super::CacheLayerBuilder::max_tracked_invalidations

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::cache::entry::Entry;
use crate::cache::key::{Hashed, KeyHasher, PassThrough};

use crate::cache::{Invalidation, Tag};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mark {
    /// Sequence number of the newest invalidation.
    seq: u64,
    /// Highest version invalidated (0 when none was given).
    version: u64,
    /// Sequence number of the newest invalidation given without a version.
    plain_seq: u64,
}

impl Mark {
    /// Whether this mark keeps out (or invalidates) a fill that began at
    /// `fill_seq`, stamped `version`.
    ///
    /// A fill stamped at or above every version this mark was given
    /// already reflects the changes those invalidations were about: only
    /// an invalidation without a version since its start touches it (so a
    /// change feed's late invalidation of a row does not throw away an
    /// entry read after the change). Any other fill is touched by every
    /// invalidation since its start, and kept out when stamped below the
    /// version.
    #[inline]
    fn blocks(&self, fill_seq: u64, version: Option<u64>) -> bool {
        match version {
            Some(v) if self.version > 0 && v >= self.version => self.plain_seq > fill_seq,
            Some(v) => self.seq > fill_seq || self.version > v,
            None => self.seq > fill_seq,
        }
    }

    /// Whether this mark invalidates a stored entry that was filled at
    /// `fill_seq`, stamped `version` (its stamp was checked against the
    /// versions when it was stored): an invalidation since its fill began,
    /// unless the entry already reflects every version this mark was given.
    #[inline]
    fn touches(&self, fill_seq: u64, version: Option<u64>) -> bool {
        match version {
            Some(v) if self.version > 0 && v >= self.version => self.plain_seq > fill_seq,
            _ => self.seq > fill_seq,
        }
    }

    fn merge(&mut self, seq: u64, version: u64) {
        self.seq = self.seq.max(seq);
        self.version = self.version.max(version);
        if version == 0 {
            self.plain_seq = self.plain_seq.max(seq);
        }
    }

    fn absorb(&mut self, other: &Mark) {
        self.seq = self.seq.max(other.seq);
        self.version = self.version.max(other.version);
        self.plain_seq = self.plain_seq.max(other.plain_seq);
    }
}

struct Marks<K> {
    keys: HashMap<Hashed<K>, Mark, PassThrough>,
    tags: HashMap<Tag, Mark>,
    key_floor: Mark,
    tag_floor: Mark,
}

/// The shared record of invalidations of one cache.
pub(crate) struct InvalidationLog<K> {
    seq: AtomicU64,
    all_seq: AtomicU64,
    /// The sequence number of the newest tag invalidation (a flight whose
    /// tags are not known yet is fenced by any of them).
    tag_seq: AtomicU64,
    marks: RwLock<Marks<K>>,
    max_marks: usize,
    pub(crate) hasher: KeyHasher,
}

impl<K: Hash + Eq + Clone> InvalidationLog<K> {
    pub(crate) fn new(hasher: KeyHasher, max_marks: usize) -> Self {
        Self {
            seq: AtomicU64::new(0),
            all_seq: AtomicU64::new(0),
            tag_seq: AtomicU64::new(0),
            marks: RwLock::new(Marks {
                keys: HashMap::with_hasher(PassThrough),
                tags: HashMap::new(),
                key_floor: Mark::default(),
                tag_floor: Mark::default(),
            }),
            max_marks: max_marks.max(2),
            hasher,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Marks<K>> {
        crate::sync::read(&self.marks)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Marks<K>> {
        crate::sync::write(&self.marks)
    }

    /// The sequence number a fill starts at.
    #[inline]
    pub(crate) fn current(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Marks `key` invalidated; returns the invalidation's sequence number.
    pub(crate) fn mark_key(&self, key: Hashed<K>, version: u64) -> u64 {
        let mut marks = self.write();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        marks.keys.entry(key).or_default().merge(seq, version);
        if marks.keys.len() > self.max_marks {
            let floor = fold_oldest_half(&mut marks.keys, self.max_marks);
            marks.key_floor.absorb(&floor);
        }
        seq
    }

    /// Marks `tag` invalidated; returns the invalidation's sequence number.
    pub(crate) fn mark_tag(&self, tag: Tag, version: u64) -> u64 {
        let mut marks = self.write();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        marks.tags.entry(tag).or_default().merge(seq, version);
        self.tag_seq.store(seq, Ordering::SeqCst);
        if marks.tags.len() > self.max_marks {
            let floor = fold_oldest_half(&mut marks.tags, self.max_marks);
            marks.tag_floor.absorb(&floor);
        }
        seq
    }

    /// Marks everything invalidated, and keeps out every fill stamped
    /// below `version` from now on (0: none); returns the invalidation's
    /// sequence number.
    pub(crate) fn mark_all(&self, version: u64) -> u64 {
        let mut marks = self.write();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.all_seq.store(seq, Ordering::SeqCst);
        // The floors' versions: a version-only mark (their sequence numbers
        // stay, so unstamped fills after this one are stored as before).
        marks.key_floor.version = marks.key_floor.version.max(version);
        marks.tag_floor.version = marks.tag_floor.version.max(version);
        seq
    }

    /// Whether an invalidation newer than `since` may touch `key`, whatever
    /// tags its response turns out to carry: any mark of the key, any tag
    /// mark, or an invalidation of everything. The single-flight check: a
    /// flight that began at `since` must not be joined after such an
    /// invalidation. One atomic load while nothing was invalidated.
    pub(crate) fn touched_since(&self, key: &Hashed<K>, since: u64) -> bool {
        if self.seq.load(Ordering::SeqCst) == since {
            return false;
        }
        if self.all_seq.load(Ordering::SeqCst) > since
            || self.tag_seq.load(Ordering::SeqCst) > since
        {
            return true;
        }
        let marks = self.read();
        marks.key_floor.seq > since
            || marks.tag_floor.seq > since
            || marks.keys.get(key).is_some_and(|m| m.seq > since)
    }

    /// The sequence number of the newest invalidation that touches `key`
    /// or any of `tags` (0 when none is tracked): the shared tier's check
    /// that a value it holds is not older than a local invalidation it has
    /// not applied yet.
    pub(crate) fn newest_touching(&self, key: &Hashed<K>, tags: &[Tag]) -> u64 {
        let marks = self.read();
        let mut newest = self
            .all_seq
            .load(Ordering::SeqCst)
            .max(marks.key_floor.seq)
            .max(marks.tag_floor.seq);
        if let Some(m) = marks.keys.get(key) {
            newest = newest.max(m.seq);
        }
        for t in tags {
            if let Some(m) = marks.tags.get(t) {
                newest = newest.max(m.seq);
            }
        }
        newest
    }

    /// Whether a fill that started at `fill_seq`, stamped `version`, may be
    /// stored (checked before and again after the insert).
    pub(crate) fn may_store(
        &self,
        key: &Hashed<K>,
        tags: &[Tag],
        fill_seq: u64,
        version: Option<u64>,
    ) -> bool {
        if self.all_seq.load(Ordering::SeqCst) > fill_seq {
            return false;
        }
        let marks = self.read();
        if marks.key_floor.blocks(fill_seq, version) || marks.tag_floor.blocks(fill_seq, version) {
            return false;
        }
        if marks
            .keys
            .get(key)
            .is_some_and(|m| m.blocks(fill_seq, version))
        {
            return false;
        }
        !tags.iter().any(|t| {
            marks
                .tags
                .get(t)
                .is_some_and(|m| m.blocks(fill_seq, version))
        })
    }

    /// The hit-path check: valid unless an invalidation since the entry was
    /// last checked touches it. One atomic load when nothing happened.
    #[inline]
    pub(crate) fn still_valid<R, E>(&self, entry: &Entry<R, E>) -> bool {
        let now = self.seq.load(Ordering::Acquire);
        if entry.validated_seq.load(Ordering::Relaxed) == now {
            return true;
        }
        self.still_valid_slow(entry, now)
    }

    /// The fast half of [`still_valid`](Self::still_valid): true when no
    /// invalidation happened since the entry was last checked valid; false
    /// means "look at the log", not "invalid". Takes no lock (the hit path
    /// runs it while the store lends the entry under its own).
    #[inline]
    pub(crate) fn validated<R, E>(&self, entry: &Entry<R, E>) -> bool {
        entry.validated_seq.load(Ordering::Relaxed) == self.seq.load(Ordering::Acquire)
    }

    #[cold]
    fn still_valid_slow<R, E>(&self, entry: &Entry<R, E>, now: u64) -> bool {
        // Inserted but not yet re-checked by its fill: an invalidation of
        // its key may have removed the slot just before the insert (the
        // fill's re-check will find the mark and remove it). Not served.
        if !entry.confirmed.load(Ordering::Acquire) {
            return false;
        }
        let fill = entry.fill_seq;
        if self.all_seq.load(Ordering::SeqCst) > fill {
            return false;
        }
        let marks = self.read();
        let version = entry.version();
        if marks.tag_floor.touches(fill, version) {
            return false;
        }
        if entry
            .tags
            .iter()
            .any(|t| marks.tags.get(t).is_some_and(|m| m.touches(fill, version)))
        {
            return false;
        }
        entry.validated_seq.store(now, Ordering::Relaxed);
        true
    }
}

/// Drops the older half of `marks` (by sequence) and returns the floor that
/// stands in for them.
///
/// The newer half moves to a fresh table sized for `max_marks + 1`: removing
/// in place would leave tombstones, and a table full of them grows (to
/// twice the size the bound needs) instead of being reused.
fn fold_oldest_half<Q: Hash + Eq, S: std::hash::BuildHasher + Clone>(
    marks: &mut HashMap<Q, Mark, S>,
    max_marks: usize,
) -> Mark {
    let mut seqs: Vec<u64> = marks.values().map(|m| m.seq).collect();
    seqs.sort_unstable();
    let cut = seqs[seqs.len() / 2];
    let mut floor = Mark::default();
    let mut kept = HashMap::with_capacity_and_hasher(max_marks + 1, marks.hasher().clone());
    for (key, m) in marks.drain() {
        if m.seq <= cut {
            floor.absorb(&m);
        } else {
            kept.insert(key, m);
        }
    }
    *marks = kept;
    floor
}

/// What an [`Invalidator`] acts on: the cache's log and store.
pub(crate) trait InvalidateTarget<K>: Send + Sync {
    /// Applies an invalidation here and queues it for the shared tier (and
    /// through it the other instances).
    fn invalidate(&self, what: Invalidation<K>, version: u64);
    /// The shared tier's gate, when a tier is attached.
    fn shared_gate(&self) -> Option<&crate::cache::remote::Gate>;
}
