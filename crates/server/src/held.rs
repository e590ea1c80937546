//! What a user holds on every node together, counted in Redis: the
//! uploads being written. Per user and kind a hash, node id → that node's
//! count (`confab:h:<kind>:<user>`). A node's count stops counting once
//! its heartbeat in `confab:nodes` (kept by `redis_presence.rs`) is older
//! than the presence TTL, so a node killed with `-9` leaks nothing; the
//! next take clears its field. Each node adds and takes away only its own
//! field, so nodes never overwrite each other.

use std::sync::Arc;
use std::time::Duration;

use confab_store::{Clock, UserId};
use redis::Script;
use redis::aio::ConnectionManager;

/// Counts one for this node (ARGV[1]) unless the fresh fields already
/// reach ARGV[2]: returns 1 when taken, 0 at the limit. Dead nodes' fields
/// are taken out on the way.
const TAKE: &str = r"
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local node, n = fields[i], tonumber(fields[i + 1])
  if node == ARGV[1] then
    total = total + n
  else
    local hb = redis.call('ZSCORE', KEYS[2], node)
    if hb and tonumber(hb) >= tonumber(ARGV[3]) then
      total = total + n
    else
      redis.call('HDEL', KEYS[1], node)
    end
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Takes this node's one back.
const RELEASE: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
";

/// How long a user's counts outlive their last take: longer than any
/// upload request runs.
const EXPIRY: Duration = Duration::from_secs(6 * 3600);

#[derive(Clone)]
pub struct Held {
    redis: ConnectionManager,
    node: String,
    clock: Clock,
    ttl: Duration,
    take: Arc<Script>,
    release: Arc<Script>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("node", &self.node).finish()
    }
}

impl Held {
    /// `node` as presence names it in `confab:nodes`; a node is dead once
    /// its heartbeat there is older than `ttl`.
    pub fn new(redis: ConnectionManager, node: u64, clock: Clock, ttl: Duration) -> Self {
        Self {
            redis,
            node: format!("{node:016x}"),
            clock,
            ttl,
            take: Arc::new(Script::new(TAKE)),
            release: Arc::new(Script::new(RELEASE)),
        }
    }

    fn key(kind: &str, user: UserId) -> String {
        format!("confab:h:{kind}:{}", user.0)
    }

    /// One more `kind` for `user` on this node if all nodes together hold
    /// fewer than `limit`. `Err`: Redis could not be asked.
    pub async fn take(&self, kind: &str, user: UserId, limit: usize) -> redis::RedisResult<bool> {
        let taken: i64 = self
            .take
            .key(Self::key(kind, user))
            .key("confab:nodes")
            .arg(&self.node)
            .arg(limit)
            .arg(self.clock.now() - self.ttl.as_millis() as i64)
            .arg(EXPIRY.as_millis() as i64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(taken == 1)
    }

    /// Gives back one `kind` of `user` this node took.
    pub async fn release(&self, kind: &str, user: UserId) {
        let released: redis::RedisResult<i64> = self
            .release
            .key(Self::key(kind, user))
            .arg(&self.node)
            .invoke_async(&mut self.redis.clone())
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %e, "a held count not given back in Redis");
        }
    }
}
