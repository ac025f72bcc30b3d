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

/// No shard owns the slot (a move was interrupted between its two
/// commits, or the tables were edited by hand).
pub(crate) const NO_OWNER: u16 = u16::MAX;

/// Which shard owns each slot, and the map's version (the highest
/// ownership version any shard reported).
///
/// Routing a key is a hash and one array index.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    version: u64,
    /// Shard index per slot ([`NO_OWNER`] for none).
    owners: Box<[u16]>,
    /// The map version that gave each slot to its owner (0 for none).
    versions: Box<[u64]>,
    names: Box<[std::sync::Arc<str>]>,
}

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
    /// A map of `slots` slots where shard `i` of `names` owns the slots of
    /// `owners[i]`; later entries win where they overlap.
    pub(crate) fn from_owned(
        version: u64,
        slots: u16,
        names: Vec<std::sync::Arc<str>>,
        owned: &[(u16, u16, u64)],
    ) -> Self {
        // (shard, slot, version): the highest version claims the slot.
        let mut owners = vec![NO_OWNER; usize::from(slots)];
        let mut versions = vec![0u64; usize::from(slots)];
        for &(shard, slot, v) in owned {
            let i = usize::from(slot);
            if i < owners.len() && (owners[i] == NO_OWNER || v > versions[i]) {
                owners[i] = shard;
                versions[i] = v;
            }
        }
        Self {
            version,
            owners: owners.into_boxed_slice(),
            versions: versions.into_boxed_slice(),
            names: names.into_boxed_slice(),
        }
    }

    /// An even split of `slots` slots over `names`, in order (the first
    /// shard gets the first range), at version 1.
    pub fn even(slots: u16, names: &[&str]) -> Self {
        let names: Vec<std::sync::Arc<str>> = names.iter().map(|n| (*n).into()).collect();
        let n = names.len().max(1);
        let owned: Vec<(u16, u16, u64)> = (0..slots)
            .map(|s| {
                (
                    (usize::from(s) * n / usize::from(slots.max(1))) as u16,
                    s,
                    1,
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

    /// The index of the shard owning `slot` (`None`: out of range or
    /// unowned).
    pub(crate) fn owner_index(&self, slot: u16) -> Option<usize> {
        match self.owners.get(usize::from(slot)) {
            Some(&o) if o != NO_OWNER => Some(usize::from(o)),
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
        let m = SlotMap::from_owned(3, 4, names, &[(0, 0, 1), (1, 0, 3), (0, 1, 2), (1, 1, 1)]);
        assert_eq!(m.owner(0), Some("b"));
        assert_eq!(m.owner(1), Some("a"));
        assert_eq!(m.owner(2), None);
    }

    #[test]
    fn a_slot_given_back_to_its_owner_counts_as_changed() {
        let names = || vec!["a".into(), "b".into()];
        let before = SlotMap::from_owned(1, 3, names(), &[(0, 0, 1), (0, 1, 1), (1, 2, 1)]);
        // Slot 1 went to b (version 2) and back to a (version 3) between
        // two reads of the map; slot 2 moved to a.
        let after = SlotMap::from_owned(4, 3, names(), &[(0, 0, 1), (0, 1, 3), (0, 2, 4)]);
        assert_eq!(before.changed_slots(&after), vec![1, 2]);
        assert!(after.changed_slots(&after).is_empty());
    }
}
