//! WAL positions and the consistency vocabulary.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A PostgreSQL WAL position (`pg_lsn`), the clock of the consistency model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The highest position: what an unknown commit position is taken as.
    pub const MAX: Lsn = Lsn(u64::MAX);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::lsn_text::format(self.0))
    }
}

/// How a server lays out its WAL: the page size (`wal_block_size`) and
/// the segment size (`wal_segment_size`), both in bytes (0 while unknown).
///
/// A write's token is taken from the WAL *insert* position, which is never
/// below the end of the write's commit record, even under
/// `synchronous_commit = off`, where the write position
/// (`pg_current_wal_lsn()`) can trail a commit that has not been written
/// out yet (a token taken from it would let a replica that lacks the
/// commit serve the read). When the last record ended exactly at a page
/// boundary, the insert position points past the next page's header,
/// where no replica's replay position will ever stop until more WAL is
/// written; [`commit_position`](Self::commit_position) moves it back to
/// the boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct WalLayout {
    pub(crate) block: u64,
    pub(crate) segment: u64,
}

/// The header of a WAL page, and of a segment's first page, on 64-bit
/// servers (`SizeOfXLogShortPHD`, `SizeOfXLogLongPHD`).
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

impl WalLayout {
    /// The token for a commit answered before `insert` (the insert
    /// position) and `written` (the write position) were read: never below
    /// the commit record's end. An insert position right after a page
    /// header becomes the page boundary, or the write position if that is
    /// higher (so a server whose headers are another size, where that
    /// offset could be a real record's end, still gets a token at or above
    /// its durable commits).
    pub(crate) fn commit_position(self, insert: Lsn, written: Lsn) -> Lsn {
        if self.block == 0 || self.segment == 0 {
            return insert;
        }
        let header = if insert.0 % self.segment == LONG_PAGE_HEADER {
            LONG_PAGE_HEADER
        } else if insert.0 % self.block == SHORT_PAGE_HEADER
            && insert.0 % self.segment != SHORT_PAGE_HEADER
        {
            SHORT_PAGE_HEADER
        } else {
            return insert;
        };
        Lsn((insert.0 - header).max(written.0.min(insert.0)))
    }
}

/// `pg_lsn` text that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a pg_lsn: {0:?} (expected two hex numbers like 16/B374D848)")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::lsn_text::parse(s)
            .map(Self)
            .ok_or_else(|| LsnParseError(s.chars().take(64).collect()))
    }
}

/// What a write gives back: the primary's WAL position after its commit.
/// A read that presents it sees the write.
///
/// When the commit succeeded but its position could not be learned (the
/// token query failed or timed out after `COMMIT`, or its answer did not
/// parse), the write still reports success, with the *unknown* token
/// ([`ConsistencyToken::unknown`]): its position is [`Lsn::MAX`], above
/// every real one, so a read presenting it goes straight to the primary
/// (no replica can qualify, and none is waited for) until the token
/// expires, and a cache never serves it an entry. A token never claims
/// less than its write: a failure never turns into "position 0".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsistencyToken(Lsn);

impl ConsistencyToken {
    /// A token for a known WAL position.
    pub fn new(lsn: Lsn) -> Self {
        Self(lsn)
    }

    /// The token of a commit whose WAL position is not known: reads that
    /// present it go to the primary.
    pub const fn unknown() -> Self {
        Self(Lsn::MAX)
    }

    /// True for [`unknown`](Self::unknown).
    pub fn is_unknown(&self) -> bool {
        self.0 == Lsn::MAX
    }

    /// The WAL position ([`Lsn::MAX`] for an unknown token). Use
    /// [`known_lsn`](Self::known_lsn) for cache invalidation versions:
    /// invalidating at `Lsn::MAX` would keep fills out for good.
    pub fn lsn(&self) -> Lsn {
        self.0
    }

    /// The position as a cache version: what to invalidate at after the
    /// write (`None` for the unknown token, so the invalidation carries no
    /// version rather than one that would keep every later fill out).
    ///
    /// ```
    /// # use tower_scale::pg::{ConsistencyToken, Lsn};
    /// assert_eq!(ConsistencyToken::new(Lsn(42)).version(), Some(42));
    /// assert_eq!(ConsistencyToken::unknown().version(), None);
    /// ```
    pub fn version(&self) -> Option<u64> {
        self.known_lsn().map(|l| l.0)
    }

    /// The WAL position, if known.
    pub fn known_lsn(&self) -> Option<Lsn> {
        (!self.is_unknown()).then_some(self.0)
    }

    /// The newer of two tokens (an unknown one is newer than any).
    pub fn max(self, other: Self) -> Self {
        if other.0 > self.0 { other } else { self }
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Consistency {
    /// Read the primary.
    Strong,
    /// Read a replica that has replayed at least the token's position;
    /// wait a bounded time for one to catch up, else read the primary.
    ReadYourWrites(ConsistencyToken),
    /// Read a replica whose lag is within the bound, else the primary.
    BoundedStaleness(Duration),
    /// Any healthy replica within the cluster's lag budget, else the primary.
    Any,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_and_orders() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!(Lsn(1) < lsn);
        for bad in ["", "/", "1/", "/1", "x/1", "1/2/3", "123456789/0", "1 /2"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unknown_token_is_newer_than_any() {
        let unknown = ConsistencyToken::unknown();
        let known = ConsistencyToken::new(Lsn(0xFFFF_FFFF_0000_0000));
        assert!(unknown.is_unknown() && !known.is_unknown());
        assert_eq!(known.max(unknown), unknown);
        assert_eq!(unknown.max(known), unknown);
        assert_eq!(unknown.known_lsn(), None);
        assert_eq!(known.known_lsn(), Some(known.lsn()));
    }

    #[test]
    fn a_commit_position_after_a_page_header_moves_to_the_boundary() {
        let layout = WalLayout {
            block: 8192,
            segment: 16 << 20,
        };
        let seg = 16u64 << 20;
        // Mid-page: the insert position as is.
        assert_eq!(
            layout.commit_position(Lsn(seg + 8192 + 200), Lsn(0)),
            Lsn(seg + 8192 + 200)
        );
        // Right after a page's short header: the boundary.
        assert_eq!(
            layout.commit_position(Lsn(seg + 8192 + 24), Lsn(0)),
            Lsn(seg + 8192)
        );
        // Right after a segment's long header: the boundary.
        assert_eq!(
            layout.commit_position(Lsn(3 * seg + 40), Lsn(0)),
            Lsn(3 * seg)
        );
        // Offset 40 of a page that does not start a segment is a record's end.
        assert_eq!(
            layout.commit_position(Lsn(seg + 8192 + 40), Lsn(0)),
            Lsn(seg + 8192 + 40)
        );
        // The write position is never given away for the boundary.
        assert_eq!(
            layout.commit_position(Lsn(seg + 8192 + 24), Lsn(seg + 8192 + 24)),
            Lsn(seg + 8192 + 24)
        );
        // Unknown layout: the insert position.
        assert_eq!(
            WalLayout::default().commit_position(Lsn(seg + 24), Lsn(0)),
            Lsn(seg + 24)
        );
    }
}
