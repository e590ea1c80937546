//! Rates: so many per period per key, so many at once. Counted by this
//! node (governor's keyed limiters), or, with Redis, for all nodes
//! together: a GCRA (the algorithm governor uses too) in a script that
//! reads Redis's clock, so that nodes whose clocks differ agree. While
//! Redis cannot be reached, the node falls back to its own count: the
//! limit then holds per node again rather than not at all.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::held::Held;
use crate::limits::RetryAfter;

/// Takes one from the key's allowance. KEYS[1]: the key's theoretical
/// arrival time (µs); ARGV: µs per one, how many at once. Returns 0 when
/// allowed, else the ms until one more would be.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allow_at = tat + interval - tau
if allow_at > now then return math.ceil((allow_at - now) / 1000) end
redis.call('SET', KEYS[1], string.format('%d', tat + interval), 'PX', math.ceil((tat + interval - now) / 1000) + 1)
return 0
";

/// Redis, where rates (and, with `held`, what users hold) are counted for
/// every node.
pub struct Shared {
    redis: ConnectionManager,
    gcra: Script,
    pub held: Option<Held>,
}

impl Shared {
    pub fn new(redis: ConnectionManager, held: Option<Held>) -> Self {
        Self {
            redis,
            gcra: Script::new(GCRA),
            held,
        }
    }
}

/// One rate, for keys of type `K`.
pub struct Rate<K: Hash + Eq + Clone> {
    /// Its part of the Redis key: `confab:rl:<name>:<key>`.
    name: &'static str,
    local: DefaultKeyedRateLimiter<K>,
    interval: Duration,
    burst: u32,
}

impl<K: Hash + Eq + Clone> Rate<K> {
    /// `n` per `period`: that many at once, then one every `period / n`.
    pub fn per(name: &'static str, period: Duration, n: u32) -> Self {
        let n = n.max(1);
        Self::new(name, period / n, n)
    }

    /// One every `interval`, `burst` at once.
    pub fn new(name: &'static str, interval: Duration, burst: u32) -> Self {
        let interval = interval.max(Duration::from_nanos(1));
        let burst = burst.max(1);
        let quota = Quota::with_period(interval)
            .expect("a positive period")
            .allow_burst(NonZeroU32::new(burst).expect("at least one"));
        Self {
            name,
            local: governor::RateLimiter::keyed(quota),
            interval,
            burst,
        }
    }

    /// Takes one from `key`'s allowance; `id` names the key in Redis.
    pub async fn check(
        &self,
        shared: Option<&Shared>,
        key: &K,
        id: impl std::fmt::Display,
    ) -> Result<(), RetryAfter> {
        if let Some(shared) = shared {
            let answer: redis::RedisResult<i64> = shared
                .gcra
                .key(format!("confab:rl:{}:{id}", self.name))
                .arg(self.interval.as_micros().max(1) as i64)
                .arg(self.burst)
                .invoke_async(&mut shared.redis.clone())
                .await;
            match answer {
                Ok(0) => return Ok(()),
                Ok(wait_ms) => return Err(RetryAfter(Duration::from_millis(wait_ms as u64))),
                Err(e) => {
                    metrics::counter!("confab_rate_checks_local_total").increment(1);
                    tracing::debug!(error = %e, rate = self.name, "rate counted by this node alone");
                }
            }
        }
        self.local.check_key(key).map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Forgets keys whose allowance is full again.
    pub fn retain_recent(&self) {
        self.local.retain_recent();
    }
}
