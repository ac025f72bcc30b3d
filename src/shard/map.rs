//! The versioned slot map: which shard owns each slot.

use std::fmt;
use std::ops::RangeInclusive;

/// An inclusive range of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotRange {
    /// The first slot.
    pub first: u16,
    /// The last slot (inclusive).
    pub last: u16,
}

impl SlotRange {
    /// `first..=last`.
    pub fn new(first: u16, last: u16) -> Self {
        Self { first, last }
    }

    /// One slot.
    pub fn one(slot: u16) -> Self {
        Self::new(slot, slot)
    }

    /// The slots as a Rust range.
    pub fn slots(self) -> RangeInclusive<u16> {
        self.first..=self.last
    }

    /// How many slots.
    pub fn len(self) -> usize {
        usize::from(self.last).saturating_sub(usize::from(self.first))
            + usize::from(self.first <= self.last)
    }

    /// True when `last < first`.
    pub fn is_empty(self) -> bool {
        self.last < self.first
    }
}

impl fmt::Display for SlotRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// No shard lists the slot (the tables were edited by hand, or a move
/// of an earlier release was interrupted between its two commits).
pub(crate) const NO_OWNER: u16 = u16::MAX;

/// Set in an owner entry whose shard holds the slot fenced: a move's
/// cutover committed the source's side and not yet the target's. The
/// shard still holds it (no other does), and refuses its writes and
/// reads fenced in the read: routing sees no owner.
const FENCED: u16 = 0x8000;

/// Which shard owns each slot, and the map's version (the highest
/// ownership version any shard reported).
///
/// Routing a key is a hash and one array index. Two maps are equal when
/// they give the same slots to the same shards at the same versions.
#[derive(Clone)]
pub struct SlotMap {
    version: u64,
    /// Shard index per slot ([`NO_OWNER`] for none), with [`FENCED`] set
    /// while its holder has fenced it.
    owners: Box<[u16]>,
    /// The map version that gave each slot to its owner (0 for none).
    versions: Box<[u64]>,
    names: Box<[std::sync::Arc<str>]>,
    /// Per shard: the map version its table showed when this map read it,
    /// and the WAL position a replica must have replayed to show the same
    /// (the read lease's condition: `super::lease`). Empty: none known.
    shard_state: Box<[(u64, crate::pg::Lsn)]>,
}

impl PartialEq for SlotMap {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.owners == other.owners
            && self.versions == other.versions
            && self.names == other.names
    }
}

impl Eq for SlotMap {}

impl fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (range, owner) in self.ranges() {
            m.entry(&range.to_string(), &owner.unwrap_or("(none)"));
        }
        m.finish()?;
        write!(f, " version {}", self.version)
    }
}

impl SlotMap {
    /// A map of `slots` slots from `(shard, slot, version, fenced)`
    /// entries: the highest version holds a slot (the first of equals).
    pub(crate) fn from_owned(
        version: u64,
        slots: u16,
        names: Vec<std::sync::Arc<str>>,
        owned: &[(u16, u16, u64, bool)],
    ) -> Self {
        let mut owners = vec![NO_OWNER; usize::from(slots)];
        let mut versions = vec![0u64; usize::from(slots)];
        for &(shard, slot, v, fenced) in owned {
            let i = usize::from(slot);
            if i < owners.len() && shard < FENCED && (owners[i] == NO_OWNER || v > versions[i]) {
                owners[i] = if fenced { shard | FENCED } else { shard };
                versions[i] = v;
            }
        }
        Self {
            version,
            owners: owners.into_boxed_slice(),
            versions: versions.into_boxed_slice(),
            names: names.into_boxed_slice(),
            shard_state: Box::new([]),
        }
    }

    /// This map with what it read of each shard: its map version and the
    /// position its replicas must have replayed (see `shard_state`).
    pub(crate) fn with_shard_state(mut self, state: Vec<(u64, crate::pg::Lsn)>) -> Self {
        self.shard_state = state.into_boxed_slice();
        self
    }

    /// Shard `i`'s map version when this map read it, and the position a
    /// replica of it must have replayed to serve a read by this map
    /// without the in-read fence (`None`: unknown; fence the read).
    pub(crate) fn shard_state(&self, i: usize) -> Option<(u64, crate::pg::Lsn)> {
        self.shard_state.get(i).copied()
    }

    /// An even split of `slots` slots over `names`, in order (the first
    /// shard gets the first range), at version 1.
    pub fn even(slots: u16, names: &[&str]) -> Self {
        let names: Vec<std::sync::Arc<str>> = names.iter().map(|n| (*n).into()).collect();
        let n = names.len().max(1);
        let owned: Vec<(u16, u16, u64, bool)> = (0..slots)
            .map(|s| {
                (
                    (usize::from(s) * n / usize::from(slots.max(1))) as u16,
                    s,
                    1,
                    false,
                )
            })
            .collect();
        Self::from_owned(1, slots, names, &owned)
    }

    /// The version: every change of ownership raises it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many slots the key space has.
    pub fn slot_count(&self) -> u16 {
        self.owners.len() as u16
    }

    /// The index of the shard owning `slot` (`None`: out of range,
    /// unowned, or fenced by its holder).
    pub(crate) fn owner_index(&self, slot: u16) -> Option<usize> {
        match self.owners.get(usize::from(slot)) {
            Some(&o) if o < FENCED => Some(usize::from(o)),
            _ => None,
        }
    }

    /// The index of the shard holding `slot`, fenced or not, and whether
    /// it is fenced (`None`: out of range, or no shard lists it).
    pub(crate) fn holder_index(&self, slot: u16) -> Option<(usize, bool)> {
        match self.owners.get(usize::from(slot)) {
            Some(&o) if o != NO_OWNER => Some((usize::from(o & !FENCED), o & FENCED != 0)),
            _ => None,
        }
    }

    /// The name of the shard holding `slot` fenced: a move of it is
    /// between its cutover's two commits (the slot's reads and writes
    /// wait for the new owner), or was interrupted there (resume or roll
    /// it back).
    pub fn fenced_by(&self, slot: u16) -> Option<&str> {
        match self.holder_index(slot) {
            Some((i, true)) => self.names.get(i).map(|n| &**n),
            _ => None,
        }
    }

    /// The map version that gave `slot` to its owner (0: none, or out of
    /// range).
    pub(crate) fn slot_version(&self, slot: u16) -> u64 {
        self.versions.get(usize::from(slot)).copied().unwrap_or(0)
    }

    /// The name of the shard owning `slot`.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        self.owner_index(slot)
            .and_then(|i| self.names.get(i))
            .map(|n| &**n)
    }

    /// The map as inclusive ranges with their owner, in slot order.
    pub fn ranges(&self) -> Vec<(SlotRange, Option<&str>)> {
        let mut out: Vec<(SlotRange, Option<&str>)> = Vec::new();
        for (slot, _) in self.owners.iter().enumerate() {
            let slot = slot as u16;
            let owner = self.owner(slot);
            match out.last_mut() {
                Some((range, o)) if *o == owner && range.last + 1 == slot => range.last = slot,
                _ => out.push((SlotRange::one(slot), owner)),
            }
        }
        out
    }

    /// The holders of `range`'s slots in slot order, runs of one holder
    /// (and fence) merged: `[Some((i, fenced))]` when one shard holds it
    /// all alike, `[None]` when none lists any of it.
    #[cfg(feature = "reshard")]
    pub(crate) fn holders(&self, range: SlotRange) -> Vec<Option<(usize, bool)>> {
        let mut out: Vec<Option<(usize, bool)>> =
            range.slots().map(|s| self.holder_index(s)).collect();
        out.dedup();
        out
    }

    /// The slots shard `i` holds (fenced or not), with their versions and
    /// whether fenced.
    pub(crate) fn held_by(&self, i: usize) -> impl Iterator<Item = (u16, u64, bool)> + '_ {
        (0..self.slot_count()).filter_map(move |s| match self.holder_index(s) {
            Some((h, fenced)) if h == i => Some((s, self.slot_version(s), fenced)),
            _ => None,
        })
    }

    /// The slots whose owner differs between `self` and `newer`, or was
    /// given again (a slot that moved away and back between two reads of
    /// the map has the same owner and a newer version: its data may have
    /// changed on the other shard meanwhile).
    pub(crate) fn changed_slots(&self, newer: &SlotMap) -> Vec<u16> {
        (0..newer.slot_count())
            .filter(|&s| {
                let i = usize::from(s);
                self.owner(s) != newer.owner(s) || self.versions.get(i) != newer.versions.get(i)
            })
            .collect()
    }

    /// The slots shard `name` owns.
    pub fn slots_of(&self, name: &str) -> Vec<u16> {
        (0..self.slot_count())
            .filter(|&s| self.owner(s) == Some(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_and_ranges() {
        let m = SlotMap::even(4096, &["shard-1", "shard-2"]);
        assert_eq!(
            m.ranges(),
            vec![
                (SlotRange::new(0, 2047), Some("shard-1")),
                (SlotRange::new(2048, 4095), Some("shard-2"))
            ]
        );
        assert_eq!(m.owner(4096), None);
        assert_eq!(SlotRange::new(0, 2047).len(), 2048);
        assert!(SlotRange::new(3, 2).is_empty());
    }

    #[test]
    fn the_higher_version_wins_a_doubly_claimed_slot() {
        let names = vec!["a".into(), "b".into()];
        let m = SlotMap::from_owned(
            3,
            4,
            names,
            &[
                (0, 0, 1, false),
                (1, 0, 3, false),
                (0, 1, 2, false),
                (1, 1, 1, false),
                (0, 2, 2, true),
                (1, 3, 2, false),
                (0, 3, 1, true),
            ],
        );
        assert_eq!(m.owner(0), Some("b"));
        assert_eq!(m.owner(1), Some("a"));
        // Held fenced: no owner to route to, one holder.
        assert_eq!(m.owner(2), None);
        assert_eq!(m.holder_index(2), Some((0, true)));
        assert_eq!(m.fenced_by(2), Some("a"));
        // A fenced entry older than another shard's grant: a leftover.
        assert_eq!(m.owner(3), Some("b"));
        assert_eq!(m.fenced_by(3), None);
        assert_eq!(
            m.held_by(0).collect::<Vec<_>>(),
            vec![(1, 2, false), (2, 2, true)]
        );
    }

    #[test]
    fn a_slot_given_back_to_its_owner_counts_as_changed() {
        let names = || vec!["a".into(), "b".into()];
        let before = SlotMap::from_owned(
            1,
            3,
            names(),
            &[(0, 0, 1, false), (0, 1, 1, false), (1, 2, 1, false)],
        );
        // Slot 1 went to b (version 2) and back to a (version 3) between
        // two reads of the map; slot 2 moved to a.
        let after = SlotMap::from_owned(
            4,
            3,
            names(),
            &[(0, 0, 1, false), (0, 1, 3, false), (0, 2, 4, false)],
        );
        assert_eq!(before.changed_slots(&after), vec![1, 2]);
        assert!(after.changed_slots(&after).is_empty());
    }
}
