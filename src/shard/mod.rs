//! Sharding (feature `shard`): several primaries behind one handle, routed
//! by a shard key, with a fence that makes stale maps harmless.
//!
//! - **Slots.** A key's slot is CRC-32/ISO-HDLC of its bytes modulo the
//!   slot count (4096 by default, fixed for the life of the data): `i64`
//!   as 8 bytes big-endian, text as its UTF-8 bytes, bytes as is
//!   ([`ShardKey`], [`slot_of`]). The values are pinned by tests: no
//!   platform or release moves a key.
//! - **The map** ([`SlotMap`]) gives inclusive slot ranges to shards and
//!   has a version. It lives on the shards: each primary's
//!   `tower_scale_shard_slots` lists the slots it owns (created by the
//!   library on first start, with an even split unless
//!   [`initial_map`](ShardedClusterBuilder::initial_map) says otherwise).
//!   An instance reads it at start and refreshes it when a shard refuses a
//!   request, a token was routed by a newer map, or another instance
//!   announces a move: every change of ownership notifies [`CHANNEL`] in
//!   its own transaction, and every instance listens on every shard's
//!   primary ([`watch_map`](ShardedClusterBuilder::watch_map), on by
//!   default), so a move reaches the others' maps (and their
//!   `on_slots_moved` hooks) within a notification's delay.
//! - **Writes are fenced.** [`ShardedCluster::write`] and
//!   [`transaction`](ShardedCluster::transaction) run in a transaction
//!   that first takes the slot's ownership row `FOR SHARE` (unfenced); a
//!   move takes it `FOR UPDATE` and fences it. So a write and a move never
//!   interleave: the write finishes before the move can start, or waits
//!   for the move and then finds the row fenced. A shard that does not own
//!   the slot refuses the write ([`ShardError::Moved`] inside); the
//!   instance refreshes its map and retries once on the owner.
//! - **Reads are fenced by a lease, or in the read.** An instance holds a
//!   read lease on each shard ([`read_lease`](ShardedClusterBuilder::read_lease),
//!   default 1 s, renewed every quarter: "the shard's map version was at
//!   most *v* at instant *t*"); while it holds for the version its map
//!   read, a read runs its statement as it is. A move's new owner claims
//!   the range only the longest lease (plus 10%) after the old owner let
//!   go, and the old owner's rows go only after the claim, so a read that
//!   a stale map sends to the old owner still finds the range's current
//!   rows. Without a lease (renewals failing, a replica behind the map's
//!   position, `read_lease(0)`), the statement runs as a lateral subquery
//!   of the slot's ownership row, one statement, one snapshot, on the
//!   primary or a replica (which replays the release of a slot at the same
//!   WAL position as everything the move committed before it). A shard
//!   that does not own the slot in the read's snapshot answers nothing at
//!   all, never an empty result that could be taken for "not found"; the
//!   read is retried once on the new owner's primary.
//! - **Cross-shard reads**: [`ShardedCluster::read_all`] on every shard
//!   concurrently, a deadline per shard, rows per shard; [`merge_sorted`],
//!   [`AllRows::sum_i64`] and [`AllRows::count`] combine them. A failed
//!   shard fails the read with an error naming it, unless partial results
//!   were asked for ([`ShardedCluster::read_all_partial`], marked
//!   [`AllRows::partial`]).
//! - **Tokens** ([`ShardedToken`]) carry the commit LSN of each shard
//!   written (at most [`MAX_TOKEN_SHARDS`]; beyond that, reads on the
//!   dropped shards go to their primaries for the token's lifetime) and the
//!   map version; [`ShardedTokenCodec`] signs them like a cluster's tokens.
//! - **Caching**: a key's slot never changes, so cache keys need no shard
//!   part. Tag entries with [`slot_tag`] and invalidate those tags from
//!   [`on_slots_moved`](ShardedClusterBuilder::on_slots_moved), which fires
//!   with the slots whose owner changed when this instance learns of a
//!   move. Each shard runs its own change feed
//!   (`ShardedCluster::change_feeds`, feature `change-feed`: one consumer
//!   per shard, all feeding the same invalidators; see there for
//!   table-wide tags).
//!
//! Moves: [`ShardedCluster::move_ownership`] changes ownership only;
//! [`ShardedCluster::begin_move`] leaves room to copy the range's rows
//! in between. Online resharding — the rows of the declared tables
//! ([`ShardedClusterBuilder::table`]) copied, caught up and cut over under
//! load — is `ShardedCluster::move_slots` (feature `reshard`, see
//! `shard::reshard`).
//!
//! ```no_run
//! use tower_scale::pg::{Cluster, NodeConfig};
//! use tower_scale::shard::{ShardConsistency, ShardedCluster};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let shard = |url: &'static str| async move {
//!     Cluster::builder().primary(NodeConfig::from_url(url)?).build().await
//! };
//! let sharded = ShardedCluster::builder()
//!     .shard("shard-1", shard("postgresql://app@db-1/app").await?)
//!     .shard("shard-2", shard("postgresql://app@db-2/app").await?)
//!     .build()
//!     .await?;
//! let w = sharded.write(&7i64, "INSERT INTO orders (user_id, total) VALUES ($1, 10)", &[&7i64]).await?;
//! let mut token = w.token;
//! let w = sharded.write(&8i64, "INSERT INTO orders (user_id, total) VALUES ($1, 20)", &[&8i64]).await?;
//! token.merge(&w.token);
//! // Every shard at once: the sum of both writes, from replicas that have them.
//! let all = sharded
//!     .read_all(&ShardConsistency::ReadYourWrites(token), "SELECT coalesce(sum(total), 0)::int8 FROM orders", &[])
//!     .await?;
//! assert!(all.sum_i64(0)? >= 30);
//! # Ok(()) }
//! ```

mod all;
mod cluster;
mod error;
#[cfg(feature = "change-feed")]
mod feed;
mod lease;
mod map;
mod moves;
mod ownership;
mod refresh;
#[cfg(feature = "reshard")]
#[cfg_attr(docsrs, doc(cfg(feature = "reshard")))]
pub mod reshard;
mod route;
mod slot;
mod tables;
mod token;
mod watch;

pub use self::all::{AllRows, ShardRows, merge_sorted};
pub use self::cluster::{ShardedCluster, ShardedClusterBuilder, SlotsMoved};
pub use self::error::ShardError;
pub use self::map::{SlotMap, SlotRange};
pub use self::moves::SlotMove;
pub use self::route::{ShardRead, ShardTransaction, ShardWritten};
pub use self::slot::{DEFAULT_SLOTS, MAX_SLOTS, ShardKey, crc32, slot_of};
pub use self::token::{
    MAX_TOKEN_LEN, MAX_TOKEN_SHARDS, ShardConsistency, ShardedToken, ShardedTokenCodec, shard_id,
};
pub use self::watch::{CHANNEL, WeakShardedCluster};

/// The cache tag of a slot's entries, `slot:{n}`: add it to cached reads
/// of a key, and invalidate it from
/// [`on_slots_moved`](ShardedClusterBuilder::on_slots_moved).
///
/// ```
/// assert_eq!(tower_scale::shard::slot_tag(17).as_str(), "slot:17");
/// ```
pub fn slot_tag(slot: u16) -> crate::cache::Tag {
    crate::cache::Tag::from(format!("slot:{slot}"))
}
