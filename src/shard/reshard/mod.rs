//! Online resharding (feature `reshard`): moving a slot range and its
//! rows from one live shard to another under load.
//!
//! [`ShardedCluster::move_slots`] starts a move and returns a
//! [`MoveHandle`] (progress, result). The rows a slot carries are those of
//! the declared tables ([`ShardedClusterBuilder::table`]) whose shard key
//! hashes to it. The move runs in phases, like Vitess's `Reshard`
//! (VReplication copy + catch-up, then a switch of traffic with writes
//! denied on the source):
//!
//! 1. **Copying.** On the source primary, a publication of the declared
//!    tables and a *temporary* logical replication slot are created on a
//!    replication session, the slot with `EXPORT_SNAPSHOT`; the session is
//!    kept idle while a second session imports the snapshot
//!    (`REPEATABLE READ`, `SET TRANSACTION SNAPSHOT`) and pages through
//!    every declared table by primary key, keeping the rows whose key's
//!    slot is in the range (filtered here: a publication's row filter
//!    cannot call the slot hash), throttled to
//!    [`MoveOptions::copy_rate`] rows read per second, and writes them on
//!    the target primary with `INSERT ... ON CONFLICT (pk) DO UPDATE`.
//!    The copy and the stream join at the slot's consistent point: every
//!    transaction committed before it is in the snapshot, every one after
//!    it is streamed.
//! 2. **Catching up.** The slot is streamed from its consistent point
//!    (pgoutput); the changes to rows of the range are applied on the
//!    target idempotently (upsert by primary key; deletes by primary key,
//!    only of a row whose shard key is in the range). Consecutive source
//!    transactions are applied together, in one target transaction, as
//!    each row's net effect (its last change in commit order: changes to
//!    different rows commute), a few statements per table whatever the
//!    batch's size. No one reads those rows on the target before the
//!    claim (no map routes the range there before it), so only the state at the cutover's marker
//!    is ever seen, and it is the source's.
//! 3. **Cutting over** (below), once the catch-up is within
//!    [`MoveOptions::cutover_lag`] of the source in time: a probe marker
//!    committed on the source comes through the stream within it (WAL
//!    bytes would also count what the stream skips, such as vacuum's).
//! 4. **Cleaning up.** The source's copies of the moved rows are deleted
//!    in throttled batches; each batch runs under a `SHARE` lock on the
//!    source's ownership table and first checks that the source owns none
//!    of the range, so it never deletes a row its shard still owns.
//!
//! The publication is dropped and the slot goes with its session at every
//! end (done, failure, rollback; a killed process's temporary slot is
//! dropped by the server when its connection ends). Each move is recorded
//! in `tower_scale_shard_moves` on both shards (id, range, phase): a move
//! that died leaves its partial copy marked there, to
//! [`resume`](ShardedCluster::resume_move) (which re-snapshots) or
//! [`roll back`](ShardedCluster::rollback_move) (which deletes the
//! target's partial rows).
//!
//! # The cutover and its guarantee
//!
//! The cutover is an attempt bounded by [`MoveOptions::max_pause`],
//! repeated up to [`MoveOptions::cutover_attempts`] times (as gh-ost
//! does): it takes the range's ownership rows `FOR UPDATE` on the source
//! (the write fence's other side: writes in flight finish first, new ones
//! wait on the lock in the database), commits a marker through the
//! source's WAL (a transactional logical message), and waits for the
//! catch-up to apply everything up to that marker on the target. Then it
//! commits the source's release, then the target's claim (with a new map
//! version), refreshes this instance's map and fires
//! [`on_slots_moved`](ShardedClusterBuilder::on_slots_moved). If the
//! marker does not arrive in time, the attempt rolls back: the writes that
//! waited go on at the source, the stream keeps catching up, and the next
//! attempt starts.
//!
//! What holds:
//!
//! - **No acknowledged write is lost or applied twice.** A write for the
//!   range commits on the source before the fence (then it is in the
//!   snapshot or in the stream before the marker, applied once on the
//!   target by key) or after the cutover on the target (it waited on the
//!   lock, found the slot released, and went to the new owner through the
//!   fence's refresh-and-retry). A write is never acknowledged by a shard
//!   that does not own its slot in that write's own transaction.
//! - **No caller sees an error for the move**, unless it waits longer
//!   than its bound: the lock wait is at most [`MoveOptions::max_pause`]
//!   (keep it below the clusters' write timeout), and the wait for the new
//!   owner at most [`moved_wait`](ShardedClusterBuilder::moved_wait); past
//!   that the write fails with [`ShardError::Moved`], which is retryable
//!   and means nothing was written.
//! - **Ownership: exactly one holder of every slot at every moment, by
//!   the ownership tables.** The cutover commits in three steps (see
//!   [`ShardedCluster::begin_move`]): the source fences its rows of the
//!   range (it still holds them, and refuses the range's reads and
//!   writes), the target claims the range at a higher version (from then
//!   on it holds it: the tables' rule is "the highest version holds"),
//!   and the source deletes its fenced rows. Between the first two commits
//!   (the read leases' hold: the longest recorded lease plus 10%, 1.1 s by
//!   default) no shard *serves* the range to an instance that knows of the
//!   release: requests wait for the claim. This keeps reads safe without
//!   a second lock on them: while any instance can still read the source
//!   (a stale map under a lease, which runs out within the hold), the
//!   target has accepted no write and the source has deleted no row of
//!   the range (the cleanup runs after the claim), so a read never returns
//!   old data or a false "not found"; a read fenced in the read answers
//!   nothing from a shard that does not own the slot, and is retried on
//!   the owner (see `shard::lease` and the read fence). If the
//!   process dies between the two commits, the source's move record says
//!   `released` (committed with the fence), the source holds the range
//!   fenced ([`SlotMap::fenced_by`](super::SlotMap::fenced_by); requests
//!   get [`ShardError::Unowned`] or [`ShardError::Moved`] after the moved
//!   wait), and [`resume_move`](ShardedCluster::resume_move) finishes the
//!   claim (the target already has every row: the fence commits only
//!   after the marker was applied) or
//!   [`rollback_move`](ShardedCluster::rollback_move) lifts the fence (the
//!   source's rows are the range's data: no write went elsewhere). A
//!   commit that fails while the process lives is resolved at once from
//!   the ownership tables: fenced and not claimed, the claim is finished
//!   then and there; not fenced, the attempt counts as one that changed
//!   nothing.
//! - **Read-your-writes holds across the move.** The source's and the
//!   target's positions are different clocks, and a token from a write on
//!   the source names no position of the target; it does not need to:
//!   the target claims the range in a transaction that commits after
//!   every row the move applied there. A replica of the target that has
//!   not replayed those rows does not own the slot either: a read fenced
//!   in the read gets nothing there and is retried on the target's
//!   primary, and a leased read goes to a replica only once the monitor
//!   saw it replay the target's position from when the map read the
//!   claim. A write on the target after the move gives a
//!   token with the target's position, as any write.
//! - **A failure before the release changes nothing**: the source still
//!   owns the range (its lock went with its session), the target's partial
//!   rows are marked by the move record until resumed or rolled back.
//!
//! With [`MoveOptions::manual_cutover`] the move copies and keeps
//! catching up until [`MoveHandle::cut_over`] is called (a separate
//! "switch traffic" step).
//!
//! # Limits
//!
//! - The source's role needs `REPLICATION` (the slot) and the right to
//!   create a publication of the declared tables (their owner, or a
//!   superuser); `wal_level = logical` on the source; one replication
//!   connection (`max_wal_senders`) per running move.
//! - Taking the range's ownership rows `FOR UPDATE` waits for writes in
//!   flight, including long [`ShardedCluster::transaction`]s on the range,
//!   within the write timeout (that wait is outside
//!   [`MoveOptions::max_pause`]; new writes queue behind it); a lock that
//!   cannot be had in that time fails the move (nothing changed: resume
//!   it).
//! - Moves are refused while an overlapping move, or another move from or
//!   to one of their shards, is recorded unfinished on any shard; the
//!   check and the records are made under the move lock, so two processes
//!   starting overlapping moves at the same instant start one.
//! - **Every instance must run a release that knows the fence column**
//!   (`fenced` in `tower_scale_shard_slots`, added at an instance's
//!   start) before a move runs: an instance of an earlier release ignores
//!   a fenced row, and would accept writes for a fenced range that the
//!   move never carries. Upgrade every instance first, then move.
//! - **Read leases are off on a database set up by an earlier release**
//!   (`lease_ms` 0): a mover of that release commits its claim without
//!   the hold. Turn them on (`lease_ms` on every shard) only once every
//!   instance runs this release; until then every routed read is fenced
//!   in the read.
//! - Other instances hear of the move through the map announcements
//!   (the cutover changes ownership with [`ShardedCluster::begin_move`],
//!   which announces the new version in its transactions; see
//!   [`watch_map`](ShardedClusterBuilder::watch_map)): tested, a listening
//!   instance had the new owner about 20 ms after the claim. One not
//!   listening learns of it when the old owner refuses it (the fence).
//! - Writes that reach the moving rows without the fence (not through
//!   [`ShardedCluster::write`] or [`transaction`](ShardedCluster::transaction))
//!   are copied or streamed while the move runs but are not held back by
//!   the cutover.
//! - Primary keys must be unique across shards (or contain the shard
//!   key): a copied row whose primary key the target uses for another
//!   shard key fails the move.
//! - A row's shard key should not move it to another slot (the library's
//!   routing assumes it). If an update does so during a move, the row
//!   leaves the target when its new slot is outside the range (found by
//!   its primary key); for a table whose shard key is not part of its
//!   primary key this costs a lookup on the target for every update of
//!   the source's rows outside the range.
//! - A source transaction's changes that may touch the range (rows of
//!   the range, and deletes that name only a primary key) are held in
//!   memory until its commit is streamed: a transaction of millions of
//!   such rows during a move costs that much memory.
//! - `TRUNCATE` of a declared table during a move fails the move; so does
//!   a change of a declared table's columns.
//! - The catch-up is one stream: a sustained write rate to the source
//!   (of declared tables) above what it decodes and applies never comes
//!   within [`MoveOptions::cutover_lag`], and the move fails at
//!   [`MoveOptions::catch_up_timeout`] (nothing changed; resume it when
//!   the load is lower). Here (debug build, a 2-core machine shared with
//!   the servers and a build) the stream kept up with ~1,300 writes/s and
//!   fell behind at ~2,000. A batch of changes costs four round trips on
//!   the target whatever its size (`BEGIN`; the lookups of every table;
//!   the deletes; the upserts; `COMMIT`, each step's statements sent
//!   together).
//! - The target's writes are grouped per table (deletes, then upserts):
//!   foreign keys between declared tables must be `DEFERRABLE INITIALLY
//!   DEFERRED` on the target (or absent), and a unique constraint other
//!   than the primary key can fail an apply when a batch swaps values
//!   between rows (the move fails; resume it).
//! - Values travel as text (`DateStyle ISO`, `bytea_output hex` on the
//!   copy session): types whose text form does not read back as the same
//!   value cannot be moved.

mod apply;
mod catchup;
mod cleanup;
mod copy;
mod handle;
mod record;
mod resume;
mod rows;
mod run;

pub use self::handle::{MoveHandle, MoveOptions, MovePhase, MoveProgress, MoveReport};

#[cfg(doc)]
use super::{ShardError, ShardedCluster, ShardedClusterBuilder};
