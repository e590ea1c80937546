//! Who is online across nodes, in Redis, as the seed design keeps it: per
//! user, the nodes it is connected to and each node's last heartbeat.
//!
//! - `confab:p:<user>`: a hash, node id → the node's last heartbeat (ms)
//!   for this user. The user is online while a field is fresh (younger
//!   than the TTL); the key expires when no node refreshes it.
//! - `confab:n:<node>`: the users the node has put in a hash, so that
//!   whoever sweeps a dead node knows whom to look at.
//! - `confab:nodes`: a sorted set, node id → its last heartbeat.
//! - `confab:s:<user>`: a hash, node id → the user's open connections on
//!   that node, so that the per-user connection limit holds for the
//!   cluster. A count is believed while the node's field in `confab:p` is
//!   fresh. Two nodes admitting the user's connections at the same moment
//!   may together pass the limit by one per node; the next connection
//!   sees the true count.
//!
//! Each node counts its own connections in memory (the local
//! [`LocalPresence`]) and touches Redis only at a user's first and last
//! connection on it, and once per heartbeat for all its users in one
//! pipeline. A node killed with `-9` stops heartbeating: the others see it
//! in `confab:nodes` once the TTL has passed, remove its fields, and
//! announce offline (with last seen = the last heartbeat) each user it was
//! the last node of. Keyspace notifications are not used: Redis does not
//! promise to deliver them.
//!
//! While Redis is away a node answers from what it knows itself (its own
//! connections), and a user's presence seen from another node is wrong
//! until Redis is back; it recovers at the next heartbeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_store::{Clock, UserId};
use redis::Script;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::presence::{LocalPresence, Presence};

const NODES: &str = "confab:nodes";
/// Users one pipeline refreshes.
const CHUNK: usize = 1000;

fn user_key(user: UserId) -> String {
    format!("confab:p:{}", user.0)
}

fn sockets_key(user: UserId) -> String {
    format!("confab:s:{}", user.0)
}

fn node_key(node: u64) -> String {
    format!("confab:n:{node:016x}")
}

fn field(node: u64) -> String {
    format!("{node:016x}")
}

/// Puts this node's field in the user's hash, and its connection count
/// (ARGV[6]) in the user's counts. Returns 1 when no other node had a
/// fresh field: the user has just come online.
const CONNECT: &str = r"
local others = 0
for _, hb in ipairs(redis.call('HVALS', KEYS[1])) do
  if tonumber(hb) >= tonumber(ARGV[3]) then others = others + 1 end
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then others = others - 1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
if others <= 0 then return 1 else return 0 end
";

/// Takes a node's field out of the user's hash. Returns the field's last
/// heartbeat when no fresh field is left (the user has gone offline), -1
/// when another node still has the user, -2 when the field was not there
/// (someone else took it out first).
const DISCONNECT: &str = r"
redis.call('HDEL', KEYS[3], ARGV[1])
local hb = redis.call('HGET', KEYS[1], ARGV[1])
if not hb then return -2 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
for _, other in ipairs(redis.call('HVALS', KEYS[1])) do
  if tonumber(other) >= tonumber(ARGV[2]) then return -1 end
end
return tonumber(hb)
";

pub struct RedisPresence {
    node: u64,
    redis: ConnectionManager,
    local: LocalPresence,
    clock: Clock,
    ttl: Duration,
    connect: Script,
    disconnect: Script,
}

impl RedisPresence {
    pub fn new(node: u64, redis: ConnectionManager, clock: Clock, ttl: Duration) -> Self {
        Self {
            node,
            redis,
            local: LocalPresence::default(),
            clock,
            ttl,
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
        }
    }

    /// Heartbeats older than this are a dead node's.
    fn fresh_after(&self) -> i64 {
        self.clock.now() - self.ttl.as_millis() as i64
    }

    fn expiry_ms(&self) -> i64 {
        2 * self.ttl.as_millis() as i64
    }

    /// Refreshes this node's fields of all its users and its own entry.
    async fn heartbeat(&self) -> redis::RedisResult<()> {
        let now = self.clock.now();
        let mut redis = self.redis.clone();
        redis::cmd("ZADD")
            .arg(NODES)
            .arg(now)
            .arg(field(self.node))
            .query_async::<()>(&mut redis)
            .await?;
        for chunk in self.local.users().chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for &user in chunk {
                // Put back, not only refreshed: after a Redis restart
                // this is what restores presence.
                pipe.hset(user_key(user), field(self.node), now)
                    .ignore()
                    .pexpire(user_key(user), self.expiry_ms())
                    .ignore()
                    .sadd(node_key(self.node), user.0)
                    .ignore();
                self.put_count(&mut pipe, user);
            }
            pipe.query_async::<()>(&mut redis).await?;
        }
        Ok(())
    }

    /// Puts this node's connection count of `user` in `pipe`.
    fn put_count(&self, pipe: &mut redis::Pipeline, user: UserId) {
        pipe.hset(
            sockets_key(user),
            field(self.node),
            self.local.connections(user),
        )
        .ignore()
        .pexpire(sockets_key(user), self.expiry_ms())
        .ignore();
    }

    /// Writes this node's connection count of `user` (a connection opened
    /// or closed while others stay).
    async fn update_count(&self, user: UserId) {
        let mut pipe = redis::pipe();
        self.put_count(&mut pipe, user);
        if let Err(e) = pipe.query_async::<()>(&mut self.redis.clone()).await {
            tracing::debug!(error = %e, "connection count not updated in Redis");
        }
    }

    /// Takes the fields of nodes that stopped heartbeating out of their
    /// users' hashes; returns each user that has gone offline by it, with
    /// its last heartbeat.
    async fn sweep(&self) -> redis::RedisResult<Vec<(UserId, i64)>> {
        let mut redis = self.redis.clone();
        let dead: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(NODES)
            .arg("-inf")
            .arg(format!("({}", self.fresh_after()))
            .query_async(&mut redis)
            .await?;
        let mut offline = Vec::new();
        for node in dead {
            let Ok(id) = u64::from_str_radix(&node, 16) else {
                continue;
            };
            if id == self.node {
                continue;
            }
            let users: Vec<i64> = redis::cmd("SMEMBERS")
                .arg(node_key(id))
                .query_async(&mut redis)
                .await?;
            for user in users.into_iter().map(UserId) {
                let last: i64 = self
                    .disconnect
                    .key(user_key(user))
                    .key(node_key(id))
                    .key(sockets_key(user))
                    .arg(&node)
                    .arg(self.fresh_after())
                    .arg(user.0)
                    .invoke_async(&mut redis)
                    .await?;
                if last >= 0 {
                    offline.push((user, last));
                }
            }
            // Another node may be sweeping it too: the script gives each
            // user's last heartbeat to one of them only.
            redis::pipe()
                .del(node_key(id))
                .ignore()
                .zrem(NODES, &node)
                .ignore()
                .query_async::<()>(&mut redis)
                .await?;
        }
        Ok(offline)
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connected(&self, user: UserId) -> bool {
        if !self.local.connected(user).await {
            self.update_count(user).await;
            return false;
        }
        let came: redis::RedisResult<i64> = self
            .connect
            .key(user_key(user))
            .key(node_key(self.node))
            .key(sockets_key(user))
            .arg(field(self.node))
            .arg(self.clock.now())
            .arg(self.fresh_after())
            .arg(self.expiry_ms())
            .arg(user.0)
            .arg(self.local.connections(user))
            .invoke_async(&mut self.redis.clone())
            .await;
        match came {
            Ok(came) => came == 1,
            Err(e) => {
                tracing::warn!(error = %e, "presence in Redis not updated; answering from this node");
                true
            }
        }
    }

    async fn disconnected(&self, user: UserId, last_active: i64) -> Option<i64> {
        let Some(last_seen) = self.local.disconnected(user, last_active).await else {
            self.update_count(user).await;
            return None;
        };
        let left: redis::RedisResult<i64> = self
            .disconnect
            .key(user_key(user))
            .key(node_key(self.node))
            .key(sockets_key(user))
            .arg(field(self.node))
            .arg(self.fresh_after())
            .arg(user.0)
            .invoke_async(&mut self.redis.clone())
            .await;
        match left {
            // Online through another node still.
            Ok(-1) => None,
            Ok(_) => Some(last_seen),
            Err(e) => {
                tracing::warn!(error = %e, "presence in Redis not updated; answering from this node");
                Some(last_seen)
            }
        }
    }

    async fn connections_elsewhere(&self, user: UserId) -> usize {
        let read: redis::RedisResult<(HashMap<String, i64>, HashMap<String, usize>)> =
            redis::pipe()
                .hgetall(user_key(user))
                .hgetall(sockets_key(user))
                .query_async(&mut self.redis.clone())
                .await;
        match read {
            Ok((beats, counts)) => {
                let (me, fresh) = (field(self.node), self.fresh_after());
                counts
                    .iter()
                    .filter(|(node, _)| **node != me)
                    .filter(|(node, _)| beats.get(*node).is_some_and(|&hb| hb >= fresh))
                    .map(|(_, &n)| n)
                    .sum()
            }
            Err(e) => {
                tracing::debug!(error = %e, "connections elsewhere not read: counting this node's");
                0
            }
        }
    }

    async fn online(&self, users: &[UserId]) -> Vec<bool> {
        // A sync with no contacts to show: no round trip for nothing.
        if users.is_empty() {
            return Vec::new();
        }
        let mut pipe = redis::pipe();
        for &user in users {
            pipe.hvals(user_key(user));
        }
        match pipe
            .query_async::<Vec<Vec<i64>>>(&mut self.redis.clone())
            .await
        {
            Ok(beats) => {
                let fresh = self.fresh_after();
                beats
                    .iter()
                    .map(|b| b.iter().any(|&hb| hb >= fresh))
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "presence not read from Redis; answering from this node");
                self.local.online(users).await
            }
        }
    }
}

/// Heartbeats, and sweeps nodes that stopped, every third of the TTL
/// until shutdown.
pub async fn run(presence: Arc<RedisPresence>, state: AppState, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(presence.ttl / 3);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(e) = presence.heartbeat().await {
            tracing::warn!(error = %e, "presence heartbeat failed");
            continue;
        }
        let offline = match presence.sweep().await {
            Ok(offline) => offline,
            Err(e) => {
                tracing::warn!(error = %e, "presence sweep failed");
                continue;
            }
        };
        for (user, last_seen) in offline {
            went_offline(&state, user, last_seen).await;
        }
    }
}

/// A user whose last node died: its last seen is that node's last
/// heartbeat.
async fn went_offline(state: &AppState, user: UserId, last_seen: i64) {
    if let Err(e) = state.store.set_last_seen(user, last_seen).await {
        tracing::warn!(error = %e, "could not store last seen");
    }
    match state.store.user(user).await {
        Ok(Some(record)) => {
            crate::connection::announce(state, user, &record.username, false, Some(last_seen)).await
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "presence not announced"),
    }
}
