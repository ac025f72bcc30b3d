//! The Lua scripts the tier runs on Redis (each one atomic step), and
//! their typed invocations.
//!
//! Keys the scripts touch, under the tier's `prefix`: `{prefix}:e:{key}`
//! (an entry: a hash of the framed value `v` and the tag generations `g`
//! it was stored under), `{prefix}:l:{key}` (a fill lease),
//! `{prefix}:t:{tag}` (a tag's generation counter; every entry also
//! carries the tag standing for "all"), `{prefix}:epoch` (bumped by
//! every invalidation, cancelling puts of fills in flight) and
//! `{prefix}:hb:{instance}` (written by each heartbeat of an instance).

use redis::aio::ConnectionManager;
use redis::{RedisResult, Script};

/// Returns the value if every tag generation recorded with it is current;
/// otherwise deletes it. A generation counter that is missing (deleted by
/// an invalidation whose bump Redis refused) matches nothing.
/// `KEYS[1]` = entry; `ARGV[1]` = the tag-key prefix.
const GET_SCRIPT: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'v', 'g')
if not h[1] then return false end
local g = h[2] or ''
for tag, gen in string.gmatch(g, "([^\n]*)\n([^\n]*)\n") do
  local cur = redis.call('GET', ARGV[1] .. tag)
  if cur ~= gen then
    redis.call('DEL', KEYS[1])
    return false
  end
end
return h[1]
"#;

/// Stores a value unless an invalidation happened since the fill began
/// (the epoch moved or is gone: the lease, if still ours, is given up so
/// others stop waiting) or its lease was cancelled. A missing tag
/// generation is created from a random start, so a counter deleted and
/// created again never repeats a value an old entry recorded; a counter
/// lives at least as long as the entries that recorded it (when it expires
/// later, those entries simply stop matching: a miss).
/// `KEYS[1]` = entry, `KEYS[2]` = epoch, `KEYS[3]` = lease; ARGV = epoch at
/// start, lease token ('' for none), value, px, tag-key prefix, random
/// start, tags...
const PUT_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[2])
local ours = ARGV[2] ~= '' and redis.call('GET', KEYS[3]) == ARGV[2]
if not epoch or epoch ~= ARGV[1] then
  if ours then redis.call('DEL', KEYS[3]) end
  return 0
end
if ARGV[2] ~= '' and not ours then return 0 end
local g = ''
for i = 7, #ARGV do
  local k = ARGV[5] .. ARGV[i]
  local cur = redis.call('GET', k)
  if not cur then
    redis.call('SET', k, ARGV[6])
    cur = ARGV[6]
  end
  if redis.call('PTTL', k) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', k, ARGV[4])
  end
  g = g .. ARGV[i] .. '\n' .. cur .. '\n'
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'g', g)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[2] ~= '' then redis.call('DEL', KEYS[3]) end
return 1
"#;

/// Takes the lease (SET NX PX) and returns the epoch (created from a
/// random start if missing), or false if taken.
/// `KEYS[1]` = lease, `KEYS[2]` = epoch; ARGV = token, px, random start.
const LEASE_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local e = redis.call('GET', KEYS[2])
  if not e then
    redis.call('SET', KEYS[2], ARGV[3])
    e = ARGV[3]
  end
  return e
end
return false
"#;

/// Deletes a lease if it is still ours. `KEYS[1]` = lease; `ARGV[1]` = token.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Applies a batch of invalidations to Redis and publishes them, in one
/// atomic step (so a call that timed out on the client either did all of it
/// or nothing): a key's entry and lease are deleted; a tag's (or
/// everything's) generation is bumped; the epoch is bumped (cancelling puts
/// of fills in flight). A counter that does not exist is left alone (a
/// missing generation or epoch already matches nothing, and `INCR` would
/// restart it at 1, a value an old entry may have recorded). A bump Redis
/// refuses (out of memory) becomes a delete of the counter, which Redis
/// accepts and which fences just as well. Returns 1 if a bump was refused.
/// `KEYS[1]` = epoch, then per item: target (entry or counter), lease (or
/// the target again); `ARGV[1]` = channel, then per item: 'k', 't' or 'a',
/// and the message to publish.
const INVALIDATE_SCRIPT: &str = r#"
local refused = 0
local function bump(k)
  if redis.call('EXISTS', k) == 1 then
    local r = redis.pcall('INCR', k)
    if type(r) == 'table' and r.err then
      redis.call('DEL', k)
      refused = 1
    end
  end
end
local n = (#KEYS - 1) / 2
for i = 1, n do
  if ARGV[2 * i] == 'k' then
    redis.call('DEL', KEYS[2 * i], KEYS[2 * i + 1])
  else
    bump(KEYS[2 * i])
  end
end
bump(KEYS[1])
for i = 1, n do
  redis.call('PUBLISH', ARGV[1], ARGV[2 * i + 1])
end
return refused
"#;

/// Writes this instance's heartbeat key, then publishes the heartbeat, in
/// one atomic step: a Redis that refuses the invalidation scripts' writes
/// (a read-only replica, `MISCONF` after a failed snapshot, an ACL) also
/// refuses this, so no heartbeat goes out and every instance stops trusting
/// its L1 within the isolation window (a bare `PUBLISH` still works on a
/// replica). Out of memory (`noeviction`), where the invalidation script
/// falls back to deletes, the `SET` is refused and the `DEL` (which Redis
/// accepts then, as it does the invalidations') stands in for it. The
/// first write of the script decides: Redis refuses a write in a script
/// only before the script has written anything.
/// `KEYS[1]` = heartbeat key; `ARGV[1]` = channel, `ARGV[2]` = message,
/// `ARGV[3]` = px.
const HEARTBEAT_SCRIPT: &str = r#"
local r = redis.pcall('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if type(r) == 'table' and r.err then
  redis.call('DEL', KEYS[1])
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"#;

/// The scripts of one tier (run by their hash, `EVALSHA`; the client
/// loads a script Redis does not know yet).
pub(super) struct Scripts {
    get: Script,
    put: Script,
    lease: Script,
    invalidate: Script,
    release: Script,
    heartbeat: Script,
}

/// What a put stores, and the fill it belongs to.
pub(super) struct Put<'a> {
    pub(super) entry_key: &'a str,
    pub(super) epoch_key: &'a str,
    pub(super) lease_key: &'a str,
    /// The epoch when the fill's lease was taken.
    pub(super) epoch: &'a str,
    /// The lease token ('' for none).
    pub(super) token: &'a str,
    pub(super) frame: &'a [u8],
    /// How long Redis keeps it.
    pub(super) px: u64,
    pub(super) tag_prefix: &'a str,
    /// Where a missing tag generation starts.
    pub(super) random_start: u64,
    /// The entry's tags, the tag standing for "all" among them.
    pub(super) tags: &'a [String],
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            get: Script::new(GET_SCRIPT),
            put: Script::new(PUT_SCRIPT),
            lease: Script::new(LEASE_SCRIPT),
            invalidate: Script::new(INVALIDATE_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            heartbeat: Script::new(HEARTBEAT_SCRIPT),
        }
    }

    /// The framed value at `entry_key` if every tag generation it recorded
    /// is current ([`GET_SCRIPT`]).
    pub(super) async fn get(
        &self,
        c: &mut ConnectionManager,
        entry_key: &str,
        tag_prefix: &str,
    ) -> RedisResult<Option<Vec<u8>>> {
        self.get
            .key(entry_key)
            .arg(tag_prefix)
            .invoke_async(c)
            .await
    }

    /// Stores a value unless an invalidation came since its fill began
    /// ([`PUT_SCRIPT`]); 1 if stored, 0 if refused.
    pub(super) async fn put(&self, c: &mut ConnectionManager, put: Put<'_>) -> RedisResult<i64> {
        let mut inv = self.put.prepare_invoke();
        inv.key(put.entry_key).key(put.epoch_key).key(put.lease_key);
        inv.arg(put.epoch)
            .arg(put.token)
            .arg(put.frame)
            .arg(put.px)
            .arg(put.tag_prefix)
            .arg(put.random_start);
        for t in put.tags {
            inv.arg(t);
        }
        inv.invoke_async(c).await
    }

    /// Takes the lease `lease_key` with `token` for `px` ms
    /// ([`LEASE_SCRIPT`]): the epoch, or `None` if another holds it.
    pub(super) async fn lease(
        &self,
        c: &mut ConnectionManager,
        lease_key: &str,
        epoch_key: &str,
        token: u64,
        px: u64,
        random_start: u64,
    ) -> RedisResult<Option<String>> {
        self.lease
            .key(lease_key)
            .key(epoch_key)
            .arg(token)
            .arg(px)
            .arg(random_start)
            .invoke_async(c)
            .await
    }

    /// Gives the lease up if it is still `token`'s ([`RELEASE_SCRIPT`]).
    pub(super) async fn release(
        &self,
        c: &mut ConnectionManager,
        lease_key: &str,
        token: u64,
    ) -> RedisResult<i64> {
        self.release.key(lease_key).arg(token).invoke_async(c).await
    }

    /// Applies and publishes a batch of invalidations
    /// ([`INVALIDATE_SCRIPT`], which documents `keys` and `args`); 1 if a
    /// generation bump was refused.
    pub(super) async fn invalidate(
        &self,
        c: &mut ConnectionManager,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> RedisResult<i64> {
        let mut inv = self.invalidate.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a.as_slice());
        }
        inv.invoke_async(c).await
    }

    /// Writes the heartbeat key and publishes `message` on `channel`
    /// ([`HEARTBEAT_SCRIPT`]): an error whenever Redis refuses writes for
    /// another reason than memory.
    pub(super) async fn heartbeat(
        &self,
        c: &mut ConnectionManager,
        heartbeat_key: &str,
        channel: &str,
        message: &[u8],
        px: u64,
    ) -> RedisResult<i64> {
        self.heartbeat
            .key(heartbeat_key)
            .arg(channel)
            .arg(message)
            .arg(px)
            .invoke_async(c)
            .await
    }
}
