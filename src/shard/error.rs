//! Errors of the sharded cluster.

use std::sync::Arc;

use crate::pg::DbError;

/// An error from [`ShardedCluster`](super::ShardedCluster).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The shard refused the slot: it does not own it (the instance's map
    /// was stale). The cluster refreshes its map and retries once by
    /// itself; this error means the retry was refused too (a move in
    /// progress that did not finish within the moved wait). Nothing was
    /// written.
    #[error(
        "slot {slot} is not owned by {shard} (map version {version}); a move is in progress \
         or the ownership tables disagree: retry, or check `ShardedCluster::map`"
    )]
    Moved {
        /// The key's slot.
        slot: u16,
        /// The shard that refused it.
        shard: Arc<str>,
        /// The map version the instance had when it was refused.
        version: u64,
    },
    /// No shard serves the slot, past the moved wait: its holder fenced it
    /// in a move's cutover and the new owner's claim has not committed
    /// (a move stopped between the two: [`SlotMap::fenced_by`](super::SlotMap::fenced_by)
    /// names the holder), or no shard lists it (the ownership tables were
    /// edited). Finish the move (`ShardedCluster::resume_move`, or
    /// [`ShardedCluster::move_ownership`](super::ShardedCluster::move_ownership))
    /// or roll it back (`ShardedCluster::rollback_move`); a later retry
    /// can succeed.
    #[error(
        "no shard serves slot {slot}: a move is in transit, or was interrupted in its cutover; \
         resume it or roll it back (ShardedCluster::resume_move, rollback_move, move_ownership)"
    )]
    Unowned {
        /// The slot.
        slot: u16,
    },
    /// A slot number outside the key space.
    #[error("slot {slot} is outside the key space of {slots} slots")]
    SlotOutOfRange {
        /// The slot given.
        slot: u32,
        /// The number of slots.
        slots: u16,
    },
    /// A shard name that is not configured.
    #[error("no shard is named {0:?}")]
    UnknownShard(String),
    /// A shard's database failed.
    #[error("shard {shard}: {source}")]
    Db {
        /// The shard.
        shard: Arc<str>,
        /// What failed.
        #[source]
        source: DbError,
    },
    /// A cross-shard read did not finish on every shard in time (see
    /// [`ShardedCluster::read_all`](super::ShardedCluster::read_all)).
    #[error("cross-shard read failed on {}: {}", names(failed), failed.first().map(|(_, e)| e.to_string()).unwrap_or_default())]
    Shards {
        /// Each shard that failed, with its error.
        failed: Vec<(Arc<str>, ShardError)>,
    },
    /// A shard's read took longer than the per-shard deadline.
    #[error("shard {shard} did not answer within {after:?}")]
    Timeout {
        /// The shard.
        shard: Arc<str>,
        /// The deadline.
        after: std::time::Duration,
    },
    /// A shard's change feed could not start
    /// ([`ShardedCluster::change_feeds`](super::ShardedCluster::change_feeds)).
    #[cfg(feature = "change-feed")]
    #[error("change feed of shard {shard}: {source}")]
    Feed {
        /// The shard.
        shard: Arc<str>,
        /// Why.
        #[source]
        source: crate::pg::feed::FeedError,
    },
    /// Combining the shards' answers failed (a column of another type
    /// than asked, a sum beyond `i64`).
    #[error("combining the shards' answers: {0}")]
    Combine(String),
    /// A move of slots failed in `phase` (see
    /// [`ShardedCluster::move_slots`](super::ShardedCluster::move_slots)):
    /// before its release on the source the map is unchanged; resume it
    /// or roll it back by its id.
    #[error("move {id} failed while {phase}: {reason}")]
    MoveFailed {
        /// The move's id.
        id: String,
        /// The phase it was in (`copying`, `catching_up`, ...).
        phase: &'static str,
        /// Why.
        reason: String,
    },
    /// Every cutover attempt of a move ran past its pause bound (the
    /// catch-up could not reach the fence in time): nothing changed
    /// owner; retry the move (resume it) when the write load is lower, or
    /// allow a longer pause.
    #[error(
        "move {id}: {attempts} cutover attempts each ran past the pause bound; the source still owns the range: resume the move"
    )]
    CutoverTimeout {
        /// The move's id.
        id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Another move of overlapping slots, or from or to one of the same
    /// shards, is not finished (running, or failed or interrupted: resume
    /// or roll it back).
    #[error(
        "move {id}, of overlapping slots or between the same shards, is not finished: wait \
         for it, or resume or roll it back"
    )]
    MoveConflict {
        /// The running move's id.
        id: String,
    },
    /// No move has this id on any shard.
    #[error("no move {0:?} is recorded on any shard")]
    UnknownMove(String),
    /// The shards' ownership tables or the configuration are not usable
    /// (a shard's table names another shard, slot counts differ...).
    #[error("sharding setup: {0}")]
    Setup(String),
}

fn names(failed: &[(Arc<str>, ShardError)]) -> String {
    failed
        .iter()
        .map(|(n, _)| &**n)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ShardError {
    pub(crate) fn db(shard: &Arc<str>, source: DbError) -> Self {
        Self::Db {
            shard: Arc::clone(shard),
            source,
        }
    }

    /// True if a write that failed with this error may have committed
    /// (see [`DbError::may_have_committed`]).
    pub fn may_have_committed(&self) -> bool {
        match self {
            Self::Db { source, .. } => source.may_have_committed(),
            _ => false,
        }
    }

    /// The shards this error names (the failed ones of a cross-shard
    /// read, or the one shard).
    pub fn shards(&self) -> Vec<&str> {
        match self {
            Self::Moved { shard, .. } | Self::Db { shard, .. } | Self::Timeout { shard, .. } => {
                vec![shard]
            }
            Self::Shards { failed } => failed.iter().map(|(n, _)| &**n).collect(),
            _ => Vec::new(),
        }
    }
}
