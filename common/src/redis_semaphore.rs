//! The per-warehouse counting semaphore across processes, in Redis: a sorted set of leases
//! (member = holder id, score = expiry in server milliseconds). Acquire, heartbeat and release
//! are Lua scripts, so each is atomic, and each is safe to retry after a dropped connection
//! (acquiring twice with the same holder id renews instead of taking a second slot). A dead
//! worker's slot frees itself when its lease expires.
//!
//! Redis keeps leases in memory: a restarted (or replaced) server has lost them while their
//! holders may still be working. A holder stops the work a lease guards before the lease
//! could have expired when it cannot renew it, and at once when its renewal finds the lease
//! gone; so every lease of the server's previous life is abandoned within the TTL of the
//! server's start, and a server grants no lease during its first TTL (its uptime is read
//! inside the acquire script). Together they keep the limit across a Redis restart.
//!
//! The semaphore bounds load; correctness never depends on it (the fencing token does).

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::error::BackfillError;
use crate::semaphore::{Lease, Semaphore};

const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
-- A server younger than a lease may have lost (restart) leases still in use: grant nothing
-- until their holders have given them up.
local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)') or '0')
if uptime * 1000 < ttl then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) or redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl * 4)
  local holders = redis.call('ZCARD', KEYS[1])
  local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
  if holders > peak then redis.call('SET', KEYS[2], holders, 'PX', 86400000) end
  return 1
end
return 0
"#;

const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if expiry and tonumber(expiry) > now then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 4)
  return 1
end
return 0
"#;

const RELEASE: &str = r#"return redis.call('ZREM', KEYS[1], ARGV[1])"#;

#[derive(Clone)]
pub struct RedisSemaphore {
    connection: ConnectionManager,
    prefix: String,
    ttl: Duration,
    holder_prefix: String,
    scripts: Arc<Scripts>,
}

struct Scripts {
    acquire: Script,
    heartbeat: Script,
    release: Script,
}

impl std::fmt::Debug for RedisSemaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSemaphore")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn redis_error(error: redis::RedisError) -> BackfillError {
    BackfillError::Semaphore(crate::warehouse::redact_secrets(&error.to_string()))
}

impl RedisSemaphore {
    /// `prefix` namespaces the keys (tests use a unique one); `ttl` is how long a lease
    /// survives without a heartbeat, i.e. how soon a killed worker's slot comes back.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        holder_prefix: &str,
    ) -> Result<RedisSemaphore, BackfillError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let connection = ConnectionManager::new(client).await.map_err(redis_error)?;
        Ok(RedisSemaphore {
            connection,
            prefix: prefix.to_string(),
            ttl,
            holder_prefix: holder_prefix.to_string(),
            scripts: Arc::new(Scripts {
                acquire: Script::new(ACQUIRE),
                heartbeat: Script::new(HEARTBEAT),
                release: Script::new(RELEASE),
            }),
        })
    }

    fn key(&self, resource: &str) -> String {
        format!("{}:semaphore:{resource}", self.prefix)
    }

    fn peak_key(&self, resource: &str) -> String {
        format!("{}:semaphore:{resource}:peak", self.prefix)
    }

    /// Highest number of simultaneous holders recorded for `resource`.
    pub async fn peak_holders(&self, resource: &str) -> Result<u64, BackfillError> {
        let mut connection = self.connection.clone();
        let peak: Option<u64> = redis::cmd("GET")
            .arg(self.peak_key(resource))
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        Ok(peak.unwrap_or(0))
    }

    /// Leases currently held (not expired) on `resource`.
    pub async fn holders(&self, resource: &str) -> Result<u64, BackfillError> {
        let mut connection = self.connection.clone();
        let time: (u64, u64) = redis::cmd("TIME")
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let now = time.0 * 1000 + time.1 / 1000;
        redis::cmd("ZCOUNT")
            .arg(self.key(resource))
            .arg(now)
            .arg("+inf")
            .query_async(&mut connection)
            .await
            .map_err(redis_error)
    }

    /// Deletes this prefix's keys for `resource` (tests clean up with it).
    pub async fn clear(&self, resource: &str) -> Result<(), BackfillError> {
        let mut connection = self.connection.clone();
        redis::cmd("DEL")
            .arg(self.key(resource))
            .arg(self.peak_key(resource))
            .query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)
    }

    async fn try_acquire(
        &self,
        resource: &str,
        limit: u32,
        holder: &str,
    ) -> Result<bool, BackfillError> {
        let mut connection = self.connection.clone();
        let acquired: i64 = self
            .scripts
            .acquire
            .key(self.key(resource))
            .key(self.peak_key(resource))
            .arg(limit)
            .arg(self.ttl.as_millis() as u64)
            .arg(holder)
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        if acquired == -1 {
            // Said once per process: a fresh deployment otherwise waits a TTL in silence.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    ttl = ?self.ttl,
                    "Redis started less than a lease TTL ago: no lease is granted until leases it may have lost have lapsed"
                );
            });
        }
        Ok(acquired == 1)
    }
}

/// A held Redis lease: a heartbeat keeps it alive; dropping it releases the slot.
struct RedisLease {
    heartbeat: tokio::task::JoinHandle<()>,
    semaphore: RedisSemaphore,
    key: String,
    holder: String,
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.heartbeat.abort();
        let semaphore = self.semaphore.clone();
        let key = self.key.clone();
        let holder = self.holder.clone();
        // Best effort: if this fails the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut connection = semaphore.connection.clone();
                let released: Result<i64, _> = semaphore
                    .scripts
                    .release
                    .key(&key)
                    .arg(&holder)
                    .invoke_async(&mut connection)
                    .await;
                if let Err(error) = released {
                    tracing::warn!(%error, "could not release a semaphore lease; it will expire");
                }
            });
        }
    }
}

impl Semaphore for RedisSemaphore {
    async fn acquire(&self, resource: &str, limit: u32) -> Result<Lease, BackfillError> {
        let holder = format!("{}:{}", self.holder_prefix, uuid::Uuid::new_v4().simple());
        // A waiter polls at least every 50 ms: a slot another worker frees is taken within
        // that. With a 1 s ceiling, 8 workers x 3 slots against a limit of 16 kept only 12.5
        // leases busy on average (partitions of 0.2 s; bench/README.md).
        let mut waits = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_millis(50))
            .without_max_times()
            .with_jitter()
            .build();
        let mut failures = 0;
        loop {
            match self.try_acquire(resource, limit, &holder).await {
                Ok(true) => break,
                Ok(false) => failures = 0,
                // A dropped connection: the script is safe to run again with the same holder.
                Err(error) if failures < 5 => {
                    failures += 1;
                    tracing::warn!(%error, "semaphore acquire failed; retrying");
                }
                Err(error) => {
                    // The script may have run and only its reply been lost: give back whatever
                    // this holder may hold (best effort; otherwise the lease expires).
                    let mut connection = self.connection.clone();
                    let _: Result<i64, _> = self
                        .scripts
                        .release
                        .key(self.key(resource))
                        .arg(&holder)
                        .invoke_async(&mut connection)
                        .await;
                    return Err(error);
                }
            }
            tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(1))).await;
        }
        let key = self.key(resource);
        let semaphore = self.clone();
        let beat_key = key.clone();
        let beat_holder = holder.clone();
        let (lost_sender, lost) = tokio::sync::watch::channel(false);
        let heartbeat = tokio::spawn(async move {
            let period = semaphore.ttl / 3;
            let mut renewed = std::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                let mut connection = semaphore.connection.clone();
                let mut renewal = semaphore.scripts.heartbeat.key(&beat_key);
                renewal
                    .arg(semaphore.ttl.as_millis() as u64)
                    .arg(&beat_holder);
                // An unanswered renewal must not outlast the lease either.
                let alive: Result<i64, String> =
                    match tokio::time::timeout(period / 2, renewal.invoke_async(&mut connection))
                        .await
                    {
                        Ok(Ok(alive)) => Ok(alive),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err(format!("no answer within {:?}", period / 2)),
                    };
                match alive {
                    Ok(1) => renewed = std::time::Instant::now(),
                    // Expired, or gone with a Redis restart: others may hold the slot now.
                    Ok(_) => {
                        tracing::warn!(holder = %beat_holder, "semaphore lease expired or lost before its heartbeat; stopping the work it guards");
                        let _ = lost_sender.send(true);
                        return;
                    }
                    // The lease may expire before the next renewal: stop now, while it still
                    // holds (waiting a period past the TTL let another worker take the slot
                    // while this one still worked).
                    Err(error) if renewed.elapsed() + period >= semaphore.ttl => {
                        tracing::warn!(%error, "semaphore unreachable for as long as the lease allows; stopping the work it guards");
                        let _ = lost_sender.send(true);
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "semaphore heartbeat failed; retrying"),
                }
            }
        });
        Ok(Lease::with_loss_signal(
            RedisLease {
                heartbeat,
                semaphore: self.clone(),
                key,
                holder,
            },
            lost,
        ))
    }
}
